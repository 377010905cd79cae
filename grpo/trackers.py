"""Experiment trackers (``report_to``): TensorBoard (default), Weights & Biases, Trackio, MLflow.

Each tracker gets the same thing: the resolved run config once at the start, then
every ``metrics.jsonl`` record (finite numbers only) at its step. Libraries other
than TensorBoard are optional extras (``pip install 'grpo-lora[wandb]'`` etc.),
imported only when named; a missing one is a one-line error naming the extra.

Where each one writes, by default (their own environment variables still apply):

* ``tensorboard``: ``RUN_DIR/tensorboard``;
* ``wandb``: ``RUN_DIR/wandb``, online unless ``WANDB_MODE=offline`` (then
  ``wandb sync`` uploads later); project ``tracker_project``, run name ``name``;
* ``trackio``: its local database (``TRACKIO_DIR``, default
  ``~/.cache/huggingface/trackio``; ``trackio show`` opens the dashboard);
* ``mlflow``: ``MLFLOW_TRACKING_URI`` when set, else ``RUN_DIR/mlflow.db`` (SQLite, with the
  full ``mlflow``) or the file store ``RUN_DIR/mlruns`` (``mlflow-skinny``); experiment
  ``tracker_project`` (``mlflow ui --backend-store-uri <that URI>``).

On ``--resume`` the wandb and MLflow runs continue (their ids are kept in
``RUN_DIR/trackers.json``); TensorBoard drops events past the checkpoint's step.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any, Protocol

import yaml

from grpo.errors import UserError
from grpo.resume import flatten  # dotted keys, as the resume check compares them

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def check_available(names: list[str]) -> None:
    """Raise a UserError naming the extra for every tracker whose library is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        module = _MODULES[name]
        if name != "tensorboard" and importlib.util.find_spec(module.split(".")[0]) is None:
            raise UserError(f"report_to includes {name}, but {module} is not installed: "
                            f"pip install 'grpo-lora[{name}]' (or remove it from report_to)")


def open_trackers(names: list[str], run_dir: Path, run_name: str, project: str, config: dict[str, Any],
                  resume_step: int = 0) -> list[Tracker]:
    check_available(names)
    ids_path = run_dir / "trackers.json"
    ids = json.loads(ids_path.read_text()) if resume_step and ids_path.is_file() else {}
    opened: list[Tracker] = []
    for name in dict.fromkeys(names):  # each once, in the given order
        cls = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker,
               "mlflow": MLflowTracker}[name]
        try:
            tracker = cls(run_dir, run_name, project, config, resume_step, ids.get(name))
        except Exception as exc:  # no login, an unreachable server, a bad URI: one line, not a traceback
            for done in opened:
                done.close(failed=True)
            detail = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"report_to: {name} failed to start: {type(exc).__name__}: {detail}") from exc
        tracker.report_to_name = name  # for warnings
        opened.append(tracker)
        if getattr(tracker, "run_id", None):
            ids[name] = tracker.run_id
    if ids:
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    return opened


def finite_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict[str, Any], resume_step: int,
                 run_id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if not resume_step:
            # Markdown code block: TensorBoard's text plugin renders it as written.
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict[str, Any], resume_step: int,
                 run_id: str | None):
        import wandb

        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, config=config, dir=str(run_dir), id=run_id,
                              resume="allow" if run_id else None, reinit="create_new")
        self.run_id = self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # a crashed run shows as failed, not finished


class TrackioTracker:
    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict[str, Any], resume_step: int,
                 run_id: str | None):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_name, config=config,
                                resume="allow" if resume_step else "never", embed=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^\w\-. /]")


def mlflow_key(key: str) -> str:
    """MLflow accepts letters, digits, ``_ - . space /`` in metric names and no ``//`` or leading ``/``."""
    return re.sub(r"/{2,}", "/", _MLFLOW_BAD.sub("_", key)).lstrip("/")


def mlflow_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else a local store in the run directory: SQLite (``mlflow.db``,
    MLflow's recommended local backend) when SQLAlchemy is installed (full ``mlflow``), else the
    file store ``mlruns/`` (``mlflow-skinny``; MLflow 3 keeps it behind ``MLFLOW_ALLOW_FILE_STORE``)."""
    import os

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if importlib.util.find_spec("sqlalchemy") is not None:
        return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run_dir / "mlruns").resolve().as_uri()


class MLflowTracker:
    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict[str, Any], resume_step: int,
                 run_id: str | None):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=mlflow_uri(run_dir))
        if run_id is None:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            run = self.client.create_run(experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            for key, value in flatten(config).items():
                self.client.log_param(self.run_id, key[:250], str(value)[:6000])
            self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        else:
            self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, now, step) for k, v in metrics.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
