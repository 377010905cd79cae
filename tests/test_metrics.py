"""grpo/metrics.py directly: metrics.jsonl records, resume truncation, smoothing by hand, the plot; the trainer's phase clock."""

from __future__ import annotations

import json

import pytest
import torch

from grpo.metrics import MetricsLogger, _smooth, plot_rewards


def test_log_writes_one_plain_json_record_per_call(tmp_path):
    logger = MetricsLogger(tmp_path, report_to=[])
    logger.log(1, {"loss": torch.tensor(0.25), "reward/mean": 0.5, "tokens": 7})
    logger.log(2, {"loss": float("nan")})  # kept in the file (json writes NaN), trackers get finite numbers only
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 0.25, "reward/mean": 0.5, "tokens": 7}  # tensor -> float
    assert len(lines) == 2 and json.loads(lines[1])["step"] == 2
    assert [r["step"] for r in logger.records()] == [1, 2]


def test_a_fresh_run_starts_a_new_file_and_resume_drops_lines_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 4)) + "\n")
    MetricsLogger(tmp_path, resume_step=2, report_to=[]).close()  # the run resumes from step 2's checkpoint
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    resumed = MetricsLogger(tmp_path, resume_step=2, report_to=[])
    resumed.log(3, {"loss": 0.9})
    assert [r["step"] for r in resumed.records()] == [1, 2, 3]  # step 3 logged once, by the resumed run
    resumed.close()
    fresh = MetricsLogger(tmp_path, report_to=[])
    assert fresh.records() == [] and not path.exists()
    fresh.close()


def test_smoothing_is_an_exponential_moving_average_by_hand():
    # alpha 0.2: 1.0; 0.8 * 1.0 + 0.2 * 0.0 = 0.8; 0.8 * 0.8 + 0.2 * 1.0 = 0.84
    assert _smooth([1.0, 0.0, 1.0]) == pytest.approx([1.0, 0.8, 0.84])
    assert _smooth([]) == []


def test_plot_rewards_writes_a_png_with_or_without_evaluations(tmp_path):
    records = [{"step": 1, "reward/mean": 0.2, "train/accuracy": 0.1},
               {"step": 2, "reward/mean": 0.4, "train/accuracy": 0.3},
               {"step": 2, "heldout/accuracy": 0.5, "heldout/greedy_accuracy": 0.6}]
    for name, recs in (("full.png", records), ("train.png", records[:2]), ("empty.png", [])):
        out = plot_rewards(recs, tmp_path / name)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_phase_clock_waits_for_cuda_kernels_and_is_the_plain_clock_on_cpu(monkeypatch):
    """Trainer._now: on a CUDA device each phase's time is read after ``torch.cuda.synchronize``
    (kernels run asynchronously: otherwise a phase's tail is timed in the next one); on CPU no wait."""
    import types

    from grpo.trainer import Trainer

    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    t = Trainer._now(gpu)
    assert waits == [torch.device("cuda", 0)] and isinstance(t, float)
    Trainer._now(types.SimpleNamespace(device=torch.device("cpu")))
    assert len(waits) == 1
