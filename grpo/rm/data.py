"""Preference rows: reading, validation with line numbers, and the text a reward model scores.

A row holds a prompt and two responses, ``chosen`` (preferred) and ``rejected``, in
either of TRL's two shapes:

* standard: ``{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}``; the model
  reads ``prompt + response`` as it is;
* conversational: ``{"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
  "chosen": [{"role": "assistant", "content": "4"}], "rejected": [...]}``; the
  tokenizer's chat template is applied to prompt + response. A plain-text response
  under a conversational prompt is read as one assistant message (that is how the
  ``reward_model`` verifier scores a policy's completion).

Conversational rows may leave ``prompt`` out when ``chosen`` and ``rejected`` are whole
conversations (TRL's implicit prompt): their shared leading messages become the prompt.
An optional numeric ``margin`` column sets that pair's margin in the loss; other
columns are ignored.

Bad rows (not a JSON object, a missing field, an empty text, ``chosen`` identical to
``rejected``, a response shape that does not match the prompt's) are collected with
their line numbers and either stop the run or are skipped with a warning
(``bad_rows: error | skip``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from grpo.errors import UserError
from tasks.loaders import InvalidLine, read_jsonl, read_records

Messages = list[dict[str, str]]
Text = str | Messages
FIELDS = ("prompt", "chosen", "rejected")
SHOWN_PROBLEMS = 5  # bad rows named in a one-line error; warnings list up to 20


@dataclass(frozen=True)
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None  # the row's own margin (None: the config's)
    where: str = ""  # "line 12" (JSONL) or "record 12" (other formats), for messages


@dataclass(frozen=True)
class BadRow:
    where: str
    problem: str


# ---------------------------------------------------------------------------- reading
def load_preferences(path: str | Path, bad_rows: Literal["error", "skip"] = "error",
                     *, split: str | None = None) -> list[PreferencePair]:
    """Read and validate preference rows from ``.jsonl`` (line numbers), ``.json``,
    ``.parquet`` or a ``datasets`` directory (record numbers). Bad rows raise one
    ``UserError`` naming them, or are dropped with a warning, per ``bad_rows``."""
    source = str(path)
    records = _read_records(Path(path).expanduser(), split)
    pairs, bad = [], []
    for where, record in records:
        parsed = parse_row(record)
        if isinstance(parsed, str):
            bad.append(BadRow(where, parsed))
        else:
            pairs.append(PreferencePair(parsed.prompt, parsed.chosen, parsed.rejected, parsed.margin, where))
    report_bad_rows(source, bad, len(records), bad_rows)
    if not pairs:
        raise UserError(f"{source}: no usable preference rows (need prompt, chosen, rejected)")
    return pairs


def _read_records(path: Path, split: str | None) -> list[tuple[str, Any]]:
    if not path.exists():
        raise UserError(f"preference data not found: {path}")
    if path.is_file() and path.suffix == ".jsonl":
        out = [(f"line {lineno}", value) for lineno, value in read_jsonl(path, strict=False)]
        if not out:
            raise UserError(f"{path}: no records (the file is empty)")
        return out
    return [(f"record {i}", r) for i, r in enumerate(read_records(path, split=split), 1)]


def parse_row(record: Any) -> PreferencePair | str:
    """A valid row as a ``PreferencePair``, or the problem with it as one short phrase."""
    if isinstance(record, InvalidLine):
        return record.problem
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    row = dict(record)
    if row.get("prompt") is None and _is_messages(row.get("chosen")) and _is_messages(row.get("rejected")):
        split = _split_implicit_prompt(row["chosen"], row["rejected"])
        if split is None:
            return "no 'prompt' and chosen/rejected share no leading messages (implicit prompt)"
        row["prompt"], row["chosen"], row["rejected"] = split
    missing = [f for f in FIELDS if row.get(f) is None]
    if missing:
        return f"missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(f) for f in missing)}"
    for f in FIELDS:
        value = row[f]
        if value == []:
            return f"'{f}' is empty"
        if not isinstance(value, str) and not _is_messages(value):
            return f"'{f}' must be text or a list of {{role, content}} messages, got {_short(value)}"
        if _is_empty(value):
            return f"'{f}' is empty"
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        return "'chosen' and 'rejected' must have the same shape (both text or both messages)"
    if isinstance(prompt, str) and not isinstance(chosen, str):
        return "'prompt' is text but the responses are messages: use messages for all three (conversational)"
    if _plain(chosen).strip() == _plain(rejected).strip():
        return "'chosen' and 'rejected' are identical"
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            return f"'margin' must be a finite number, got {_short(margin)}"
        margin = float(margin)
    return PreferencePair(prompt, chosen, rejected, margin)


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))


def _is_empty(value: Text) -> bool:
    return not value.strip() if isinstance(value, str) else all(not m["content"].strip() for m in value)


def _plain(value: Text) -> str:
    return value if isinstance(value, str) else "\n".join(f"{m['role']}: {m['content']}" for m in value)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _split_implicit_prompt(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages] | None:
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        return None
    return chosen[:shared], chosen[shared:], rejected[shared:]


def report_bad_rows(source: str, bad: Sequence[BadRow], total: int, policy: Literal["error", "skip"]) -> None:
    """``error``: one UserError naming the first bad rows; ``skip``: a warning listing them."""
    if not bad:
        return
    if policy == "error":
        named = "; ".join(f"{b.where}: {b.problem}" for b in bad[:SHOWN_PROBLEMS])
        more = f"; ... and {len(bad) - SHOWN_PROBLEMS} more" if len(bad) > SHOWN_PROBLEMS else ""
        raise UserError(f"{source}: {len(bad)} of {total} preference rows are bad ({named}{more}); "
                        "fix them, or set bad_rows=skip to drop them")
    if policy != "skip":
        raise UserError(f"bad_rows must be 'error' or 'skip', got {policy!r}")
    print(f"warning: {source}: skipping {len(bad)} of {total} bad preference rows:", file=sys.stderr)
    for b in bad[:20]:
        print(f"  {source}: {b.where}: {b.problem}", file=sys.stderr)
    if len(bad) > 20:
        print(f"  ... and {len(bad) - 20} more", file=sys.stderr)


# --------------------------------------------------------------------- held-out split
def prompt_key(prompt: Text) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def split_by_prompt(pairs: Sequence[PreferencePair], fraction: float,
                    seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): whole prompts go to one side, so held-out accuracy is measured
    on prompts the model never saw (pairs of one prompt share most of their text).
    ``round(fraction * prompts)`` prompts are held out, at least one when fraction > 0."""
    keys = sorted({prompt_key(p.prompt) for p in pairs},
                  key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    if fraction <= 0 or len(keys) < 2:
        return list(pairs), []
    n_heldout = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    heldout_keys = set(keys[:n_heldout])
    train = [p for p in pairs if prompt_key(p.prompt) not in heldout_keys]
    heldout = [p for p in pairs if prompt_key(p.prompt) in heldout_keys]
    return train, heldout


def shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# ------------------------------------------------------------------------- formatting
def encode_conversation(tokenizer, prompt: Text, response: Text, system_prompt: str | None = None,
                        max_length: int | None = None) -> tuple[list[int], bool]:
    """Token ids of prompt + response as the reward model reads them; (ids, truncated).

    Standard rows: ``prompt + response`` as raw text. Conversational rows: the chat
    template over the messages (a text response becomes an assistant message), with
    ``system_prompt`` prepended when the prompt has no system message, the way
    ``grpo.prompts.encode_prompt`` builds the policy's prompt. Without a chat template
    the message contents are joined by newlines, as the policy saw them. Sequences
    longer than ``max_length`` keep their end, where the reward is read.
    """
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise ValueError("a text prompt needs a text response")
        ids = tokenizer(prompt + response, add_special_tokens=True).input_ids
    else:
        messages = list(prompt)
        if system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}] + messages
        reply = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages + reply, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            text = "\n".join(m["content"] for m in messages) + "\n" + "\n".join(m["content"] for m in reply)
            ids = tokenizer(text, add_special_tokens=True).input_ids
    if max_length is not None and len(ids) > max_length:
        return list(ids[-max_length:]), True
    return list(ids), False
