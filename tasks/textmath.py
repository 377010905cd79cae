"""Word and competition maths: ``gsm8k`` and ``math``, from local files or the hub.

Both read their data with ``tasks.loaders.read_records`` (``.jsonl``, ``.json``,
``.parquet``, ``.csv``, ``.arrow``, a ``datasets`` directory or a hub dataset), rename columns with ``fields`` (row field ->
column in the file), and produce chat rows whose ``answer`` the ``math`` verifier checks:

* ``gsm8k``: ``question`` + ``answer`` where the answer text ends with ``#### <n>``;
  the row's ``answer`` is ``<n>`` (thousands separators removed).
* ``math``: ``problem`` + ``answer``, or ``problem`` + ``solution`` whose last
  ``\\boxed{...}`` is the answer (as in the MATH dataset).

The held-out split is a second file (``heldout_path``; train rows whose question also
appears there are dropped, so the splits stay disjoint) or else a deterministic share
of the file chosen by a hash of the question text (duplicates land in the same split).
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any, Mapping

from grpo.errors import UserError
from grpo.registry import TASKS
from tasks.base import Split, Task
from tasks.loaders import map_fields, read_records

DEFAULT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


class _TextMath(Task):
    """Shared loading, prompting and splitting; subclasses turn a record into (question, answer)."""

    task_name = ""
    required: tuple[str, ...] = ()

    def __init__(self, path: str, heldout_path: str | None = None, heldout_fraction: float = 0.1,
                 fields: Mapping[str, str] | None = None, template: str = DEFAULT_TEMPLATE,
                 system: str | None = None, train_size: int | None = None, heldout_size: int | None = None,
                 split: str | None = None, seed: int = 0, verifiers: dict[str, float] | None = None,
                 name: str | list[str] | None = None, revision: str | None = None, streaming: bool = False,
                 heldout_split: str | None = None, max_records: int | None = None):
        task = self.task_name
        if not path:
            raise UserError(f"{task}: set task.args.path to a data file (.jsonl, .json, .parquet, .csv), a "
                            "datasets directory or a hub dataset name such as openai/gsm8k")
        if max_records is not None and (not isinstance(max_records, int) or max_records < 1):
            raise UserError(f"{task}: max_records must be an integer >= 1 (or left out), got {max_records!r}")
        self.source = {"name": name, "revision": revision, "streaming": bool(streaming), "limit": max_records}
        self.heldout_split = heldout_split
        if heldout_path is None and heldout_split is None and not 0 <= heldout_fraction < 1:
            raise UserError(f"{task}: heldout_fraction must be in [0, 1), got {heldout_fraction}")
        if "{question}" not in template:
            raise UserError(f"{task}: template must contain {{question}} (where the problem text goes)")
        for what, size in (("train_size", train_size), ("heldout_size", heldout_size)):
            if size is not None and size < 1:
                raise UserError(f"{task}: {what} must be >= 1 (or left out for all rows)")
        if fields is not None and not isinstance(fields, Mapping):
            raise UserError(f"{task}: fields must map row fields to column names, e.g. {{question: prompt}}")
        self.path, self.heldout_path = path, heldout_path
        self.heldout_fraction, self.fields, self.template = heldout_fraction, dict(fields or {}), template
        self.system, self.split, self.seed = system, split, seed
        self.sizes = {"train": train_size, "heldout": heldout_size}
        self.verifiers = dict(verifiers or {"math": 1.0})
        self._cache: dict[str, list[dict[str, Any]]] | None = None

    # Subclasses: (question, answer) of one mapped record; ``where`` names it in errors.
    def parse_record(self, row: dict[str, Any], where: str) -> tuple[str, str]:
        raise NotImplementedError

    def _load(self, path: str, split: str | None) -> list[tuple[str, str]]:
        records = read_records(path, split=split, **self.source)
        rows = map_fields(records, self.fields, self.required, f"{self.task_name} data {path}")
        return [self.parse_record(row, f"{self.task_name} data {path}: record {i}")
                for i, row in enumerate(rows, 1)]

    def _split_of(self, question: str) -> Split:
        h = int(hashlib.sha256(f"{self.seed}:{_same_text(question)}".encode()).hexdigest()[:8], 16)
        return "heldout" if h / 0xFFFFFFFF < self.heldout_fraction else "train"

    def _splits(self) -> dict[str, list[tuple[str, str]]]:
        if self._cache is None:
            items = self._load(self.path, self.split)
            if self.heldout_path is not None or self.heldout_split is not None:
                heldout = self._load_heldout()
                seen = {_same_text(q) for q, _ in heldout}
                train = [it for it in items if _same_text(it[0]) not in seen]
                if len(train) < len(items):
                    print(f"warning: {self.task_name}: dropped {len(items) - len(train)} train rows that also "
                          f"appear in the held-out data", file=sys.stderr)
            else:
                train = [it for it in items if self._split_of(it[0]) == "train"]
                heldout = [it for it in items if self._split_of(it[0]) == "heldout"]
            if not train:
                raise UserError(f"{self.task_name}: no training rows left in {self.path} after the held-out "
                                "split; lower heldout_fraction or add data")
            self._cache = {"train": train, "heldout": heldout}
        return self._cache

    def _load_heldout(self) -> list[tuple[str, str]]:
        """The held-out rows: ``heldout_path`` (its ``heldout_split``, if it holds splits), or the
        ``heldout_split`` of ``path``."""
        source = self.heldout_path if self.heldout_path is not None else self.path
        local = Path(str(source)).expanduser()
        if self.heldout_split is not None and local.is_file():
            raise UserError(f"{self.task_name}: heldout_split names a split of a datasets directory or a hub "
                            f"dataset; {source} is a file (name the held-out file with heldout_path)")
        try:
            return self._load(source, self.heldout_split if self.heldout_path is not None else
                              self.heldout_split or self.split)
        except UserError as exc:
            if "name one with split=" not in str(exc):
                raise
            raise UserError(str(exc).replace("with split=", "with heldout_split=")) from None

    def prompt(self, question: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        # str.replace, not str.format: LaTeX braces in the template or question stay as written
        messages.append({"role": "user", "content": self.template.replace("{question}", question)})
        return messages

    def rows(self, split: Split) -> list[dict[str, Any]]:
        items = self._splits()[split]
        if self.sizes[split] is not None:
            items = items[:self.sizes[split]]
        return [{
            "id": f"{self.task_name}-{split}-{i}",
            "prompt": self.prompt(question),
            "answer": answer,
            "verifiers": dict(self.verifiers),
        } for i, (question, answer) in enumerate(items)]


@TASKS.register("gsm8k")
class GSM8K(_TextMath):
    """Grade-school word problems (question, answer ending in '#### n'), local or openai/gsm8k; math verifier.

    Args:
        path: a data file (.jsonl/.json/.parquet/.csv/.arrow), a datasets directory, or a
            hub dataset (``openai/gsm8k`` or ``gsm8k``: config ``main`` by default).
        name / revision / streaming: hub dataset config (a list concatenates several),
            git revision, and streaming (with ``max_records``: only those are downloaded).
        max_records: read at most this many records from each source.
        heldout_path: a second source for the held-out split (e.g. the test set);
            ``heldout_split`` alone takes that split of ``path`` (``test`` for openai/gsm8k);
            without either, ``heldout_fraction`` of ``path`` is held out by a hash of the question.
        fields: row field -> column name, e.g. ``{question: prompt, answer: solution}``.
        template: the user message; ``{question}`` is replaced by the problem text.
        system: optional system message.
        train_size / heldout_size: at most this many rows per split (default all).
        split: the split read from a hub dataset or a ``datasets`` directory holding several
            (hub default ``train``).
        seed: salt of the split hash.
        verifiers: verifier name -> weight (default ``{"math": 1.0}``; add e.g. ``format: 0.1``).
    Rows: chat prompt, ``answer`` (the number after ``####``).
    """

    task_name = "gsm8k"
    required = ("question", "answer")

    def parse_record(self, row: dict[str, Any], where: str) -> tuple[str, str]:
        question, text = str(row["question"]), str(row["answer"])
        if "####" not in text:
            raise UserError(f"{where}: answer has no '#### <number>' final line: {text[-60:]!r}")
        answer = text.rsplit("####", 1)[1].strip().replace(",", "").rstrip(".")
        if not answer:
            raise UserError(f"{where}: nothing after '####' in the answer")
        if not re.fullmatch(r"[-+]?\d+(\.\d+)?(/\d+)?", answer):  # no completion could ever match it
            raise UserError(f"{where}: the answer after '####' is not a number: {answer[:40]!r}")
        return question, answer


@TASKS.register("math")
class MATH(_TextMath):
    """Competition maths (problem + answer, or the last \\boxed{} of solution), local or a MATH hub copy; math verifier.

    Args: as ``gsm8k`` (``fields`` may map ``problem``, ``answer`` and ``solution``). Hub names:
    ``EleutherAI/hendrycks_math`` (all 7 subject configs unless ``name`` picks some; also
    for the retired ``hendrycks/competition_math``), ``lighteval/MATH``,
    ``DigitalLearningGmbH/MATH-lighteval``, ``HuggingFaceH4/MATH-500`` (split ``test``).
    Rows: chat prompt (``{question}`` in the template is the problem), ``answer`` (the
    ``answer`` column when present and non-empty, else the last ``\\boxed{}`` of ``solution``).
    """

    task_name = "math"
    required = ("problem",)

    def parse_record(self, row: dict[str, Any], where: str) -> tuple[str, str]:
        answer = row.get("answer")
        if answer is None or not str(answer).strip():
            solution = row.get("solution")
            if solution is None or not str(solution).strip():
                raise UserError(f"{where}: needs an 'answer' or a 'solution' with \\boxed{{}}; "
                                f"columns: {sorted(row)} (map them with task.args.fields)")
            answer = last_boxed(str(solution))
            if answer is None:
                raise UserError(f"{where}: no 'answer' and no complete \\boxed{{...}} in 'solution'")
        answer = str(answer).strip()
        if not answer:
            raise UserError(f"{where}: the \\boxed{{}} answer in 'solution' is empty")
        return str(row["problem"]), answer


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces; a space before the brace
    allowed), or of a last ``\\boxed 5`` (up to the next ``$``, as MATH writes it); None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    body = rest.lstrip()
    if not body.startswith("{"):
        if not rest[:1].isspace():  # \boxedx: another command
            return None
        return body.split("$")[0].strip() or None  # \boxed 5$: a space, no braces
    depth = 0
    for i, ch in enumerate(body):  # no import from verifiers/: tasks register before verifiers load
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return body[1:i]
    return None


def _same_text(text: str) -> str:
    """A question as the split and the train/held-out comparison see it: whitespace runs as one space
    (the same problem spaced differently must not land on both sides)."""
    return " ".join(text.split())
