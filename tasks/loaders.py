"""Read task data into records, with clear errors: the one data reader of the package.

Local: ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects), ``.parquet``,
``.csv``, ``.arrow`` (a ``datasets`` Arrow file) and a directory written by
``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``, with ``split=`` naming the
split). A path that does not exist locally and looks like a hub name
(``openai/gsm8k``) is loaded with ``datasets.load_dataset`` (``tasks/hub.py``), with
``name`` (config), ``split``, ``revision`` and optional streaming.
"""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from grpo.errors import UserError


def read_records(path: str | Path, *, split: str | None = None, name: str | list[str] | None = None,
                 revision: str | None = None, streaming: bool = False,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """The records of a local data file, a ``datasets`` directory or a hub dataset, as plain dicts.

    ``limit`` keeps the first records only (with ``streaming`` on a hub dataset, only
    those are downloaded). ``name``, ``revision`` and ``streaming`` apply to hub datasets.
    """
    if limit is not None and limit < 1:
        raise UserError(f"{path}: the record limit must be >= 1, got {limit}")
    spec = str(path)
    path = Path(spec).expanduser()
    if not path.exists():
        from tasks.hub import looks_like_hub_name, parse_hub_source, read_hub_records

        if not looks_like_hub_name(spec):
            raise UserError(f"data file not found: {path}")
        try:
            records = read_hub_records(parse_hub_source(spec, name, split, revision), streaming=streaming,
                                       limit=limit)
        except UserError as exc:
            raise UserError(f"{spec} is not a local file or directory, and as a hub dataset: {exc}") from exc
        if not records:
            raise UserError(f"hub dataset {spec!r}: no records")
        return records
    if path.is_dir():
        records = _read_datasets_dir(path, split)
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        records = _read_jsonl(path)
    elif path.suffix == ".json":
        text = read_text_utf8(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines named .json
                return _limited(_read_jsonl(path), path, limit)  # (datasets' to_json writes those)
            raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a JSON list of objects")
        records = data
    elif path.suffix in (".parquet", ".csv", ".arrow"):
        records = _read_with_datasets(path)
    else:
        raise UserError(f"{path}: unsupported data format {path.suffix!r}; use .jsonl, .jsonl.gz, .json, .parquet, "
                        ".csv, .arrow, a datasets directory or a hub dataset name")
    return _limited(records, path, limit)


def _limited(records: list[dict[str, Any]], path: Path, limit: int | None) -> list[dict[str, Any]]:
    if not records:
        raise UserError(f"{path}: no records (the dataset is empty)")
    return records[:limit] if limit is not None else records


def _read_with_datasets(path: Path) -> list[dict[str, Any]]:
    import datasets

    reader = {".parquet": datasets.Dataset.from_parquet, ".csv": datasets.Dataset.from_csv,
              ".arrow": datasets.Dataset.from_file}[path.suffix]
    try:
        return reader(str(path)).to_list()
    except Exception as exc:  # pyarrow / pandas parse errors: say which file and what
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{path}: cannot read as {path.suffix[1:]} ({type(exc).__name__}: {first})") from exc


def read_text_utf8(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 is a one-line UserError naming the line."""
    return _decode_utf8(path.read_bytes(), path)


def _decode_utf8(data: bytes, source: Any) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{source}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        "convert the file to UTF-8") from exc


@dataclass(frozen=True)
class InvalidLine:
    """A JSONL line that does not parse, kept by ``read_jsonl(..., strict=False)`` for callers
    that report every bad row at once (preference data)."""

    problem: str


def read_jsonl(path: str | Path, *, strict: bool = True, what: str = "data file") -> list[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSONL file: the package's one JSONL reader.

    ``-`` reads standard input; a ``.gz`` file is decompressed. Lines end at ``\n`` only, so a
    U+2028 inside a JSON string does not split a row. ``strict``: a line that is not a JSON
    object is a UserError naming the file and line; otherwise a line that does not parse comes
    back as ``InvalidLine`` and other values as they are. ``what`` names the file in errors.
    """
    if str(path) == "-":
        buffer = getattr(sys.stdin, "buffer", None)  # a text-only stdin (tests) has none
        text = _decode_utf8(buffer.read(), "standard input") if buffer is not None else sys.stdin.read()
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"{what} not found: {path}")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            text = _decode_utf8(f.read(), path)
    out: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if strict:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            value = InvalidLine(f"not valid JSON ({exc.msg})")
        if strict and not isinstance(value, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(value).__name__}")
        out.append((lineno, value))
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in read_jsonl(path)]


def _read_datasets_dir(path: Path, split: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"{path}: not a dataset directory written by save_to_disk ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise UserError(f"{path}: holds splits {list(ds)}; name one with split=")
        if split not in ds:
            raise UserError(f"{path}: no split {split!r}; it has {list(ds)}")
        ds = ds[split]
    return ds.to_list()


def map_fields(records: list[dict[str, Any]], mapping: Mapping[str, str] | None,
               required: tuple[str, ...], source: str) -> list[dict[str, Any]]:
    """Rename columns (``mapping``: row field -> column in the file) and check required fields.

    A record missing a required field is an error naming the record's index
    (1-based, matching the line number of a JSONL file without blank lines).
    """
    mapping = dict(mapping or {})
    out = []
    for i, record in enumerate(records, 1):
        row = dict(record)
        for field, column in mapping.items():
            if column not in record:
                raise UserError(f"{source}: record {i} has no column {column!r} "
                                f"(mapped to field {field!r}); columns: {sorted(record)}")
            row[field] = record[column]
        missing = [f for f in required if row.get(f) in (None, "")]
        if missing:
            raise UserError(f"{source}: record {i} is missing {missing}; columns: {sorted(record)}"
                            + ("" if mapping else "; map columns with task.args.fields"))
        out.append(row)
    return out
