"""Run metrics: ``metrics.jsonl`` (one JSON object per step), the ``report_to`` trackers, ``reward.png``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends step metrics to ``metrics.jsonl`` and sends them to the ``report_to`` trackers
    (``grpo/trackers.py``); on resume, drops lines past the checkpoint's step first."""

    def __init__(self, run_dir: Path, resume_step: int = 0, report_to: list[str] | None = None,
                 run_name: str = "run", project: str = "grpo-lora", config: dict[str, Any] | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        if resume_step and self.path.exists():
            kept = [json.dumps(r) for r in self.records(warn=True) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")  # a kill mid-rewrite leaves the old file whole
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif self.path.exists() and not resume_step:
            self.path.unlink()
        from grpo.trackers import open_trackers

        self.trackers = open_trackers(["tensorboard"] if report_to is None else report_to, run_dir, run_name,
                                      project, config or {}, resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        from grpo.trackers import finite_numbers

        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = finite_numbers(record)
        for tracker in self.trackers:
            tracker.log(step, numbers)

    def records(self, warn: bool = False) -> list[dict[str, Any]]:
        """The logged records; a line that is not a JSON object (a write cut short by a full disk or a
        kill) is left out, with a warning when ``warn``."""
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record = "bad"
            if isinstance(record, dict):
                out.append(record)
            elif record is not None and warn:
                print(f"warning: {self.path} line {number} is not a whole record (a write cut short?); "
                      "dropped", file=sys.stderr)
        return out

    def plot(self) -> Path:
        return plot_rewards(self.records(), self.run_dir / "reward.png")

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def plot_rewards(records: list[dict[str, Any]], out: Path) -> Path:
    """Reward and accuracy over steps (train batches), with held-out accuracy points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "reward/mean" in r]
    evals = [r for r in records if "heldout/accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["reward/mean"] for r in train], color="tab:blue", alpha=0.35, label="train reward (batch)")
        ax.plot(steps, _smooth([r["reward/mean"] for r in train]), color="tab:blue", label="train reward (smoothed)")
        if "train/accuracy" in train[0]:
            ax.plot(steps, _smooth([r["train/accuracy"] for r in train]), color="tab:green",
                    label="train accuracy (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["heldout/accuracy"] for r in evals], "o-", color="tab:red",
                label="held-out accuracy (sampled)")
        if "heldout/greedy_accuracy" in evals[0]:
            ax.plot([r["step"] for r in evals], [r["heldout/greedy_accuracy"] for r in evals], "s--",
                    color="tab:purple", label="held-out accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, max(1.02, max((r.get("reward/mean", 0) for r in train), default=1) + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _smooth(values: list[float], alpha: float = 0.2) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out
