"""Run metrics: ``metrics.jsonl`` (one JSON object per step), the ``report_to`` trackers, ``reward.png``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any


_MAX_TRACKER_FAILURES = 3  # consecutive failed logs before a tracker is dropped


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
        elif not resume_step:  # a fresh run: nothing of an earlier one in this directory mixes in
            self.path.unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            shutil.rmtree(run_dir / "eval", ignore_errors=True)
            (run_dir / "trackers.json").unlink(missing_ok=True)
        from grpo.trackers import open_trackers

        self.trackers = open_trackers(["tensorboard"] if report_to is None else report_to, run_dir, run_name,
                                      project, config or {}, resume_step)
        self._failures: dict[str, int] = {}  # consecutive failed logs per tracker

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        from grpo.trackers import finite_numbers

        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = finite_numbers(record)
        for tracker in list(self.trackers):
            name = getattr(tracker, "report_to_name", type(tracker).__name__)
            try:
                tracker.log(step, numbers)
            except Exception as exc:  # metrics.jsonl has the record: a tracker costs its copy, not the run
                failures = self._failures[name] = self._failures.get(name, 0) + 1
                dropped = failures >= _MAX_TRACKER_FAILURES
                if dropped:
                    self.trackers.remove(tracker)
                    try:
                        tracker.close(True)  # its run ends as failed, not left "running"
                    except Exception:
                        pass
                print(f"warning: {name} failed to log step {step}: {type(exc).__name__}: {exc}"
                      + ("; it is dropped for the rest of the run (metrics.jsonl has every step)" if dropped else ""),
                      file=sys.stderr)
            else:
                self._failures.pop(name, None)

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
                if isinstance(record.get("heldout/reward"), (int, float)):  # written before the rename
                    record["heldout/reward/mean"] = record.pop("heldout/reward")
                out.append(record)
            elif record is not None and warn:
                print(f"warning: {self.path} line {number} is not a whole record (a write cut short?); "
                      "dropped", file=sys.stderr)
        return out

    def plot(self) -> Path:
        return plot_rewards(self.records(), self.run_dir / "reward.png")

    def close(self, failed: bool = False) -> None:
        """Close every tracker (marking the run failed where the tracker records that); the first
        tracker that fails to close is raised after the others are closed."""
        error = None
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error


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
    means = [r["reward/mean"] for r in train]  # rewards may be negative (penalties, a reward model)
    ax.set_ylim(min(-0.02, min(means, default=0) - 0.05), max(1.02, max(means, default=1) + 0.05))
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
