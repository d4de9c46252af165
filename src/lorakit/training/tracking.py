"""Experiment trackers beside ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow.

Each tracker gets the same metrics at the same steps as ``metrics.jsonl`` (``train/loss``,
``train/lr``, ``train/grad_norm``, ``train/tokens_per_second``, ``train/tokens``,
``eval/loss``; images/s for image runs), and the run's settings once. Their clients are
optional (``pip install 'lorakit[tracking]'``) and imported only when asked for:

- ``tensorboard``: event files in ``<out>/tensorboard`` (``torch.utils.tensorboard``);
- ``wandb``: a W&B run in ``<out>/wandb``; offline unless ``WANDB_MODE`` says otherwise
  or an API key is set (``WANDB_API_KEY``, or ``wandb login``'s netrc entry);
  ``WANDB_PROJECT`` names the project (default ``lorakit``);
- ``mlflow``: an MLflow run at ``MLFLOW_TRACKING_URI``, by default a file store in
  ``<out>/mlruns`` (read it with ``MLFLOW_ALLOW_FILE_STORE=true``, which MLflow 3 asks for); ``MLFLOW_EXPERIMENT_NAME`` names the experiment (default ``lorakit``).

A resumed run continues the same tracker runs (their ids are kept in
``<out>/tracking.json``). What the interrupted run already sent past its last
checkpoint is not sent again: a resumed run recomputes those steps identically, and
a curve with two points at one step is a curve nobody can read.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from .checkpoint import write_text

TRACKERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "tracking.json"
EXTRA = "pip install 'lorakit[tracking]'"


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_trackers(names: tuple[str, ...]) -> list[str]:
    """The problems with a ``report_to`` setting: unknown names, clients not installed."""
    import importlib.util

    unknown = sorted(set(names) - {*TRACKERS, "none"})
    if unknown:
        return [f"report_to: unknown tracker(s) {unknown}; choose from none, {', '.join(TRACKERS)}"]
    return [f"report_to {name} needs the package {name}: {EXTRA}" for name in dict.fromkeys(names)
            if name != "none" and importlib.util.find_spec(name) is None]


def metrics_of(entry: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker metrics: train values under ``train/``, held-out ones
    under ``eval/`` (``eval_loss`` as ``eval/loss``); the step and wall-clock time are the
    trackers' own axes."""
    held_out = {f"eval/{key.removeprefix('eval_')}": float(value) for key, value in entry.items()
                if key.startswith("eval_")}
    if held_out:
        return held_out
    return {f"train/{key}": float(value) for key, value in entry.items()
            if key not in ("step", "time") and isinstance(value, (int, float))}


def open_trackers(names: tuple[str, ...], out: Path, settings: dict[str, Any], fresh: bool) -> list[Tracker]:
    """The trackers ``names`` for the run in ``out``; ``fresh``: nothing was sent before,
    so the settings are sent too."""
    names = tuple(dict.fromkeys(n for n in names if n != "none"))
    if not names:
        return []
    ids_path = out / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    trackers = []
    try:
        for name in names:
            trackers.append(MAKERS[name](out, settings, fresh, ids))
    except Exception:
        for tracker in trackers:
            tracker.close()
        raise
    write_text(ids_path, json.dumps(ids, indent=2) + "\n")
    return trackers


def flat(settings: dict[str, Any]) -> dict[str, str]:
    """Settings as strings (MLflow parameters and TensorBoard text take no nesting)."""
    return {key: json.dumps(value) if not isinstance(value, str) else value for key, value in settings.items()}


class TensorBoard:
    def __init__(self, out: Path, settings: dict[str, Any], fresh: bool, ids: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        if fresh:
            table = "\n".join(f"| {key} | {value} |" for key, value in flat(settings).items())
            self.writer.add_text("config", "| setting | value |\n|---|---|\n" + table, global_step=0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc

    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class WandB:
    def __init__(self, out: Path, settings: dict[str, Any], fresh: bool, ids: dict[str, str]) -> None:
        import wandb

        ids.setdefault("wandb", uuid.uuid4().hex[:8])  # W&B run ids are [a-z0-9]
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), name=out.name, id=ids["wandb"],
                              resume="allow", dir=str(out), config=settings, mode=_wandb_mode(),
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, out: Path, settings: dict[str, Any], fresh: bool, ids: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a file store needs no server and no database driver (mlflow-skinny has none)
            uri = (out / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if "mlflow" not in ids:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorakit")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            ids["mlflow"] = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        self.run_id = ids["mlflow"]
        if fresh:
            self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in flat(settings).items()])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


MAKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
