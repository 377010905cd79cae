"""Read local data files into records, with clear errors.

Supported: ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects),
``.parquet`` and a directory written by ``datasets.Dataset.save_to_disk`` (or a
``DatasetDict``, with ``split=`` naming the split). No hub access.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from grpo.errors import UserError


def read_records(path: str | Path, *, split: str | None = None) -> list[dict[str, Any]]:
    """All records of a local data file or ``datasets`` directory, as plain dicts."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if path.is_dir():
        records = _read_datasets_dir(path, split)
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path)
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a JSON list of objects")
        records = data
    elif path.suffix == ".parquet":
        import datasets

        records = datasets.Dataset.from_parquet(str(path)).to_list()
    else:
        raise UserError(f"{path}: unsupported data format {path.suffix!r}; "
                        "use .jsonl, .json, .parquet or a datasets directory")
    if not records:
        raise UserError(f"{path}: no records (the dataset is empty)")
    return records


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(obj)
    return records


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
