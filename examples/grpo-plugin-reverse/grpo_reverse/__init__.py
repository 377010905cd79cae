"""A word-reversal task and an exact-match verifier, registered through entry points."""

from __future__ import annotations

import random
import re

from tasks.base import Task
from verifiers.base import Score, Verifier

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "light", "music", "paper", "house",
         "bread", "chair", "dream", "earth", "flame", "grape", "heart", "juice", "lemon", "mango"]


class ReverseWords(Task):
    """Reverse a word letter by letter (answer inside <answer></answer>)."""

    def __init__(self, seed: int = 0, heldout: int = 5):
        words = WORDS[:]
        random.Random(seed).shuffle(words)
        self.splits = {"train": words[heldout:], "heldout": words[:heldout]}

    def rows(self, split):
        return [{"id": f"reverse-{w}",
                 "prompt": [{"role": "user", "content": f"Reverse the word '{w}'. Reply as <answer>...</answer>."}],
                 "target": w[::-1], "verifiers": {"reversed_exact": 1.0}} for w in self.splits[split]]


class ReversedExact(Verifier):
    """1 if the text inside the last <answer></answer> equals the reversed word."""

    fields = ("target",)

    def score(self, completions, target):
        out = []
        for text, want in zip(completions, target):
            found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
            if not found:
                out.append(Score(0.0, "no <answer> tag"))
            else:
                got = found[-1].strip()
                out.append(Score(float(got == want), "correct" if got == want else f"wrong: {got[:30]!r}"))
        return out
