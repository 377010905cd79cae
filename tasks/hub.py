"""Hugging Face hub datasets as task data, through ``datasets.load_dataset``.

``tasks.loaders.read_records`` sends here any data path that does not exist locally and
looks like a hub name (``openai/gsm8k``, ``gsm8k``). The names people use for the
built-in tasks get their usual config and split (``KNOWN``), so ``path: openai/gsm8k``
works without ``name: main``. Offline (no network, or ``HF_DATASETS_OFFLINE=1``), a
dataset not in the local cache fails with one line that says how to use a local copy.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from grpo.errors import UserError

_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                  "prealgebra", "precalculus")


@dataclass(frozen=True)
class HubSource:
    path: str
    names: tuple[str | None, ...] = (None,)  # configs, concatenated in order
    split: str = "train"
    revision: str | None = None
    note: str = ""  # said once when a name was rewritten


@dataclass(frozen=True)
class _Known:
    path: str
    names: tuple[str | None, ...] = (None,)
    split: str = "train"
    note: str = ""


# Hub names people use for gsm8k and MATH -> where the data lives now, its config(s), default split.
KNOWN: dict[str, _Known] = {
    "gsm8k": _Known("openai/gsm8k", ("main",)),
    "openai/gsm8k": _Known("openai/gsm8k", ("main",)),
    "EleutherAI/hendrycks_math": _Known("EleutherAI/hendrycks_math", _MATH_SUBJECTS),
    "hendrycks/competition_math": _Known("EleutherAI/hendrycks_math", _MATH_SUBJECTS,
                                         note="hendrycks/competition_math is no longer on the hub; "
                                              "reading its copy EleutherAI/hendrycks_math (all 7 subjects)"),
    "competition_math": _Known("EleutherAI/hendrycks_math", _MATH_SUBJECTS,
                               note="competition_math is no longer on the hub; "
                                    "reading its copy EleutherAI/hendrycks_math (all 7 subjects)"),
    "lighteval/MATH": _Known("lighteval/MATH", ("all",)),
    "DigitalLearningGmbH/MATH-lighteval": _Known("DigitalLearningGmbH/MATH-lighteval", ("default",)),
    "HuggingFaceH4/MATH-500": _Known("HuggingFaceH4/MATH-500", split="test"),
}

# owner/name or a bare name: letters, digits, - _ . (no path separators beyond the one slash, no suffix)
_HUB_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".gz", ".zip")


def looks_like_hub_name(spec: str) -> bool:
    """``openai/gsm8k`` or ``gsm8k``; not ``./data/x``, ``/abs/path``, ``~/x`` or ``x.jsonl``."""
    return bool(_HUB_NAME.match(spec)) and not spec.lower().endswith(_FILE_SUFFIXES) and not spec.startswith(".")


def parse_hub_source(spec: str, name: str | list[str] | None = None, split: str | None = None,
                     revision: str | None = None) -> HubSource:
    """Resolve a hub name with the task's ``name`` / ``split`` / ``revision`` (explicit values win)."""
    known = KNOWN.get(spec)
    path = known.path if known else spec
    if name is None:
        names = known.names if known else (None,)
    else:
        names = tuple(name) if isinstance(name, (list, tuple)) else (name,)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise UserError(f"dataset {spec!r}: name must be a config name or a list of them, got {name!r}")
    return HubSource(path, names, split or (known.split if known else "train"), revision,
                     known.note if known else "")


def read_hub_records(source: HubSource, *, streaming: bool = False,
                     limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a hub dataset (several configs are concatenated); at most ``limit``."""
    import datasets

    if source.note:
        import sys

        print(f"note: {source.note}", file=sys.stderr)
    records: list[dict[str, Any]] = []
    for config in source.names:
        remaining = None if limit is None else limit - len(records)
        if remaining is not None and remaining <= 0:
            break
        where = f"hub dataset {source.path!r}" + (f" config {config!r}" if config else "") + f" split {source.split!r}"
        try:
            ds = datasets.load_dataset(source.path, config, split=source.split, revision=source.revision,
                                       streaming=streaming)
            rows = ds if remaining is None else (ds.take(remaining) if streaming else
                                                 ds.select(range(min(remaining, len(ds)))))
            records.extend(dict(r) for r in itertools.islice(rows, remaining))
        except ConnectionError as exc:  # what datasets raises when the hub cannot be reached (offline)
            raise UserError(f"cannot load {where}: {_first_line(exc)}. Offline? On a machine with network run "
                            f"datasets.load_dataset({source.path!r}{', ' + repr(config) if config else ''})"
                            ".save_to_disk('DIR'), copy DIR here and set task.args.path: DIR (with split:); or "
                            "set task.args.path to one of its .parquet files") from exc
        except (OSError, ValueError, RuntimeError) as exc:
            # the hub answered: no such dataset or revision, gated, taken down (HTTP errors are
            # OSErrors), an unknown split or config (ValueError), a loading-script dataset, which
            # datasets 4+ no longer runs (RuntimeError)
            raise UserError(f"cannot load {where}: {_first_line(exc)}") from exc
    return records


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
