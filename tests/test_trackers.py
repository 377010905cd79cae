"""`report_to` trackers: the same metrics and the run config reach each library (offline/local modes)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from grpo.config import load_config
from grpo.errors import UserError
from grpo.metrics import MetricsLogger
from grpo.trackers import check_available, finite_numbers, mlflow_key

CONFIG = {"name": "t", "loss": {"beta": 0.04}, "task": {"name": "arith"}}
STEPS = [(1, {"reward/mean": 0.25, "loss": 1.5, "note": "text", "bad": float("nan")}),
         (2, {"reward/mean": 0.5, "loss": 1.0})]


def _log(tmp_path, report_to, project="grpo-test", close=True):
    logger = MetricsLogger(tmp_path, 0, report_to, "t", project, CONFIG)
    for step, metrics in STEPS:
        logger.log(step, metrics)
    if close:
        logger.close()
    return logger


def test_finite_numbers_and_mlflow_keys():
    assert finite_numbers({"step": 3, "a": 1, "b": float("inf"), "c": "x", "d": True, "e": 0.5}) == {"a": 1.0, "e": 0.5}
    assert mlflow_key("reward//tmp/r.py:accuracy") == "reward/tmp/r.py_accuracy"
    assert mlflow_key("reward_corr/learned~math") == "reward_corr/learned_math"


def test_report_to_is_validated_and_missing_library_named(monkeypatch):
    with pytest.raises(UserError, match=r"report_to\[0\]: expected one of .*Did you mean 'wandb'"):
        load_config(None, ["report_to=[wandbb]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError, match=r"report_to includes mlflow, but mlflow is not installed: "
                                        r"pip install 'grpo-lora\[mlflow\]'"):
        check_available(["tensorboard", "mlflow"])


def test_tensorboard_default_gets_metrics_and_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(tmp_path, None)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.25), (2, 0.5)]
    assert "bad" not in acc.Tags()["scalars"] and "note" not in acc.Tags()["scalars"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "beta: 0.04" in text
    assert len(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])) == 5  # jsonl keeps all


def test_empty_report_to_writes_only_jsonl(tmp_path):
    _log(tmp_path, [])
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "tensorboard").exists()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_mlflow_file_store(tmp_path, monkeypatch):
    import mlflow

    from grpo.trackers import mlflow_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _log(tmp_path, ["mlflow"])
    uri = mlflow_uri(tmp_path)
    assert str(tmp_path) in uri  # a local store inside the run directory
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.data.params["loss.beta"] == "0.04" and run.info.run_name == "t"
    history = client.get_metric_history(run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
    assert "bad" not in run.data.metrics and run.info.status == "FINISHED"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = _log(tmp_path, ["wandb"], close=False)
    run = logger.trackers[0].run
    assert run.config["loss"]["beta"] == 0.04 and run.name == "t"
    assert "bad" not in run.summary.keys() and "note" not in run.summary.keys()
    logger.close()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    (log_file,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = log_file.read_bytes()  # the offline transaction log `wandb sync` uploads
    assert b"reward/mean" in data and b"beta" in data
    assert b"0.25" in data and b"0.5" in data  # both steps' values (wandb holds a step until the next one)


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio not installed")
def test_trackio_local(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import trackio.sqlite_storage as storage

    monkeypatch.setattr("trackio.utils.TRACKIO_DIR", tmp_path / "trackio", raising=False)
    monkeypatch.setattr(storage, "TRACKIO_DIR", tmp_path / "trackio", raising=False)
    _log(tmp_path, ["trackio"], project="grpo-trackio-test")
    logs = storage.SQLiteStorage.get_logs("grpo-trackio-test", "t")
    assert [(r["step"], r["reward/mean"]) for r in logs] == [(1, 0.25), (2, 0.5)]


class _Flaky:
    """A tracker whose server is unreachable: every log raises; records how it was closed."""
    closed: list[bool] = []

    def __init__(self, *args):
        pass

    def log(self, step, metrics):
        raise ConnectionError("tracker server unreachable")

    def close(self, failed=False):
        _Flaky.closed.append(failed)


def test_a_failing_tracker_costs_its_copy_not_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("grpo.trackers.TensorBoardTracker", _Flaky)
    logger = MetricsLogger(tmp_path, 0, ["tensorboard"], "t", "p", CONFIG)
    for step in range(1, 6):
        logger.log(step, {"reward/mean": 0.1 * step})
    err = capsys.readouterr().err
    assert err.count("warning: tensorboard failed to log step") == 3  # then dropped
    assert "dropped for the rest of the run" in err and logger.trackers == []
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_close_tells_trackers_whether_the_run_failed(tmp_path, monkeypatch):
    monkeypatch.setattr("grpo.trackers.TensorBoardTracker", _Flaky)
    _Flaky.closed = []
    MetricsLogger(tmp_path, 0, None, "t", "p", CONFIG).close(failed=True)
    MetricsLogger(tmp_path, 0, None, "t", "p", CONFIG).close()
    assert _Flaky.closed == [True, False]


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    def no_login(*args):
        raise RuntimeError("No API key configured.\nRun `wandb login`")

    monkeypatch.setattr("grpo.trackers.TensorBoardTracker", no_login)
    with pytest.raises(UserError, match=r"^report_to: tensorboard failed to start: RuntimeError: No API key configured\.$"):
        MetricsLogger(tmp_path, 0, None, "t", "p", CONFIG)


def test_a_fresh_run_drops_an_earlier_runs_tensorboard_points(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, 0, None, "t", "p", CONFIG)
    logger.log(1, {"reward/mean": 0.9})
    logger.close()
    _log(tmp_path, None)  # killed before any checkpoint, started again without --resume
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.25), (2, 0.5)]


def test_reward_plot_shows_negative_rewards(tmp_path, monkeypatch):
    import matplotlib.axes

    from grpo.metrics import plot_rewards

    limits = []
    real = matplotlib.axes.Axes.set_ylim
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim", lambda ax, *a, **k: limits.append(a) or real(ax, *a, **k))
    plot_rewards([{"step": 1, "reward/mean": -1.7}, {"step": 2, "reward/mean": 0.4}], tmp_path / "r.png")
    bottom, top = next(a for a in limits if len(a) == 2)
    assert bottom < -1.7 and top >= 1.0


def test_records_written_before_the_heldout_reward_rename_read_as_now(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "heldout/reward": 0.5, "heldout/reward/math": 0.5}\n')
    logger = MetricsLogger(tmp_path, 1, [], "t", "p", CONFIG)  # resumed: the old line is kept
    assert logger.records() == [{"step": 0, "heldout/reward/mean": 0.5, "heldout/reward/math": 0.5}]
