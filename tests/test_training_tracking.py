"""--report-to: TensorBoard, MLflow and W&B get metrics.jsonl's values at its steps, and
a run that dies and is resumed continues the same curves with no step twice. Each
tracker's files are read back with that tracker's own reader."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

import lorakit
from lorakit.config import ConfigError
from lorakit.training import TrainConfig
from lorakit.training.monitor import Monitor, read_metrics

SETTINGS = dict(rank=2, alpha=4, lr=3e-3, max_steps=6, batch_size=4, micro_batch_size=4, eval_fraction=0.2,
                save_every=3, eval_every=3, report_to=("tensorboard", "mlflow", "wandb"))


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    return client, client.get_run(run_id)


def expected_curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    records = read_metrics(out / "metrics.jsonl")
    return {"train/loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
            "train/lr": [(r["step"], r["lr"]) for r in records if "lr" in r],
            "eval/loss": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]}


def check_trackers(out: Path, curves: dict[str, list[tuple[int, float]]]) -> None:
    scalars = tensorboard_scalars(out)
    client, run = mlflow_run(out)
    for tag, points in curves.items():
        steps, values = [s for s, _ in points], [v for _, v in points]
        assert [s for s, _ in scalars[tag]] == steps, tag  # each step once, in order
        assert [v for _, v in scalars[tag]] == pytest.approx(values, rel=1e-6)  # TensorBoard stores float32
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert [s for s, _ in history] == steps and [v for _, v in history] == values, tag
    wandb = wandb_history(out)
    assert [s for s, _ in wandb] == [s for s, _ in curves["train/loss"]]
    assert [v for _, v in wandb] == [v for _, v in curves["train/loss"]]
    for tag in ("train/grad_norm", "train/tokens_per_second"):
        assert [s for s, _ in scalars[tag]] == [s for s, _ in curves["train/loss"]]
    assert run.data.params["rank"] == "2" and run.data.params["report_to"] == '["tensorboard", "mlflow", "wandb"]'


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (.wandb): a LevelDB-style log, a 7-byte
    file header, then records of (checksum, length, kind) + data in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_history(out: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of every history row of every offline W&B run of ``out``, in order."""
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs, "no offline W&B run"
    rows = []
    for path in runs:
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                if "train/loss" in items:
                    rows.append((items["_step"], items["train/loss"]))
    return rows


def test_every_tracker_gets_the_metrics_and_the_config(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    result = lorakit.train(TrainConfig(model=str(tiny_lm_dir), out=str(out), **SETTINGS))
    assert result.steps == 6
    curves = expected_curves(out)
    assert [s for s, _ in curves["eval/loss"]] == [0, 3, 6]
    check_trackers(out, curves)
    ids = json.loads((out / "tracking.json").read_text())
    assert sorted(ids) == ["mlflow", "wandb"]
    assert (out / "wandb" / "latest-run").exists()


def test_a_resumed_run_continues_the_same_curves_without_a_step_twice(tiny_lm_dir, tmp_path, monkeypatch):
    reference = tmp_path / "uninterrupted"
    lorakit.train(TrainConfig(model=str(tiny_lm_dir), out=str(reference), **SETTINGS))

    out = tmp_path / "run"
    step = Monitor.step

    def dies_after_step_4(self, entry):  # logged (metrics.jsonl and trackers), then the process dies
        step(self, entry)
        if entry["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(Monitor, "step", dies_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        lorakit.train(TrainConfig(model=str(tiny_lm_dir), out=str(out), **SETTINGS))
    monkeypatch.setattr(Monitor, "step", step)
    assert [s for s, _ in tensorboard_scalars(out)["train/loss"]] == [1, 2, 3, 4]
    ids = json.loads((out / "tracking.json").read_text())

    lorakit.train(TrainConfig(model=str(tiny_lm_dir), out=str(out), **SETTINGS))  # resumes from step 3
    assert json.loads((out / "tracking.json").read_text()) == ids  # the same tracker runs
    curves = expected_curves(out)
    assert curves["train/loss"] == expected_curves(reference)["train/loss"]  # a resume is bit-exact on CPU
    check_trackers(out, curves)  # step 4, logged before the crash and run again, was not sent twice
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2


def test_unknown_trackers_are_refused_when_the_config_is_built():
    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) \['tensorbored'\]"):
        TrainConfig(report_to=("tensorbored",))
    assert TrainConfig.from_dict({"report_to": "tensorboard,mlflow"}).report_to == ("tensorboard", "mlflow")
    assert TrainConfig.from_dict({"report_to": ["wandb"]}).report_to == ("wandb",)
