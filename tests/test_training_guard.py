"""The NaN/Inf guard without a host read per step (training/guard.py): a bad step is
skipped on the device, found at the next log line or checkpoint, and the run stops with
its last good checkpoint; steps that log and save nothing read nothing from the device."""

from __future__ import annotations

import math
import traceback

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from lorakit.training import TrainConfig, TrainingError, fit
from lorakit.training import loop
from lorakit.training.guard import Diverged, Guard, adamw
from lorakit.training.text import prepare_data
from lorakit.training.monitor import read_metrics

from test_training_loop import nan_at_forward

SETTINGS = dict(rank=2, alpha=4, lr=3e-3, max_steps=8, batch_size=4, micro_batch_size=2, log_every=4, save_every=4,
                eval_fraction=0)


class HostReads(TorchDispatchMode):
    """Every read of a tensor's value by the host (``.item()``, ``bool()``, ``int()``) made by
    lorakit's code; those inside transformers' model code are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = traceback.extract_stack()
            if not any("/transformers/" in frame.filename for frame in frames):
                self.reads += 1
        return func(*args, **(kwargs or {}))


def test_steps_that_neither_log_nor_save_read_nothing_from_the_device(tiny_lm_dir, tmp_path, monkeypatch):
    config = TrainConfig(model=str(tiny_lm_dir), out=str(tmp_path / "run"), **SETTINGS)
    train_set, eval_set = prepare_data(config, lorakit.load_tokenizer(config.model))
    reads = {}
    step = loop.train_step

    def counted(run, index, started):
        with HostReads() as mode:
            step(run, index, started)
        reads[index + 1] = mode.reads

    monkeypatch.setattr(loop, "train_step", counted)
    fit(lorakit.load_model(config.model), train_set, eval_set, config)
    assert {s: n for s, n in reads.items() if s % 4} == {1: 0, 2: 0, 3: 0, 5: 0, 6: 0, 7: 0}
    assert reads[4] > 0 and reads[8] > 0  # the guard, the loss and the norm, read once for the log line


def test_a_nan_between_checks_stops_the_run_at_the_next_check_with_the_last_good_checkpoint(tiny_lm_dir, tmp_path):
    config = TrainConfig(model=str(tiny_lm_dir), out=str(tmp_path / "nan"), **SETTINGS)
    train_set, eval_set = prepare_data(config, lorakit.load_tokenizer(config.model))
    model = lorakit.load_model(config.model)
    calls = nan_at_forward(model, 9)  # step 5's first micro-batch (two forward passes a step)
    with pytest.raises(TrainingError, match=r"diverged at step 5: loss nan.*last good checkpoint is .*step-000004"):
        fit(model, train_set, eval_set, config)
    out = tmp_path / "nan"
    assert calls["n"] == 16  # it ran on to step 8, where the log line reads the flag
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [4]
    assert not (out / "adapter").exists()
    saved = load_file(out / "checkpoints" / "step-000004" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_bad_step_changes_no_parameter_moment_or_step_count():
    torch.manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = adamw([{"params": [parameter]}], lr=0.1, weight_decay=0.01)
    guard = Guard(optimizer, torch.device("cpu"))
    assert guard.on_device
    parameter.grad = torch.randn(4, 3)
    guard.step([parameter], 1.0, torch.tensor(2.0), 0)
    before = parameter.detach().clone(), {k: v.clone() for k, v in optimizer.state[parameter].items()}
    parameter.grad = torch.full((4, 3), float("inf"))
    norm = guard.step([parameter], 1.0, torch.tensor(3.0), 1)
    assert not torch.isfinite(norm)
    assert torch.equal(parameter.detach(), before[0])
    assert all(torch.equal(optimizer.state[parameter][k], v) for k, v in before[1].items())
    version = parameter._version
    parameter.grad = torch.randn(4, 3)
    guard.step([parameter], 1.0, torch.tensor(1.0), 5)  # fused writes in place: the version moves all the same
    assert parameter._version > version and not torch.equal(parameter.detach(), before[0])
    before = parameter.detach().clone(), {k: v.clone() for k, v in optimizer.state[parameter].items()}
    parameter.grad = torch.randn(4, 3)
    guard.step([parameter], 1.0, torch.tensor(float("nan")), 2)  # a finite norm with a NaN loss: skipped too
    assert torch.equal(parameter.detach(), before[0])
    with pytest.raises(Diverged) as bad:
        guard.check()
    assert bad.value.step == 2 and bad.value.loss == 3.0 and math.isinf(bad.value.grad_norm)  # the first one


def test_an_optimizer_that_cannot_skip_on_the_device_is_checked_every_step():
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([parameter], lr=0.1, foreach=True)
    guard = Guard(optimizer, torch.device("cpu"))
    assert not guard.on_device
    parameter.grad = torch.ones(3)
    with pytest.raises(Diverged, match="step 4: loss nan"):
        guard.step([parameter], None, torch.tensor(float("nan")), 3)
    assert torch.equal(parameter.detach(), torch.ones(3))
