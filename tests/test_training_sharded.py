"""FSDP2 (``--shard fsdp``) on CPU with gloo: 2 processes train the adapter 1 process and
2-process DDP train; a rank killed with SIGKILL takes the job down and the run resumes
from its last complete sharded checkpoint, also with another number of processes; two
torchrun "nodes" on loopback equal one node; bad settings are refused before any work."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import ConfigError
from lorakit.training import TrainConfig, TrainingError, train
from lorakit.training.checkpoint import latest_checkpoint

from conftest import logged_step

SETTINGS = ["--rank", "4", "--alpha", "8", "--lr", "3e-3", "--batch-size", "8", "--micro-batch-size", "2",
            "--seed", "2", "--log-every", "1"]


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def lorakit_train(model_dir, out, steps, *extra):
    return ["-m", "lorakit", "train", "--model", str(model_dir), "--out", str(out), "--max-steps", str(steps),
            *SETTINGS, *extra]


def torchrun(processes, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            *extra]


def run(command, **kwargs):
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a, b, rtol=1e-4, atol=5e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=atol, msg=key)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_fsdp_on_two_processes_trains_what_one_process_and_ddp_train(tiny_lm_dir, tmp_path):
    run([sys.executable, *lorakit_train(tiny_lm_dir, tmp_path / "one", 5)])
    run(torchrun(2, *lorakit_train(tiny_lm_dir, tmp_path / "fsdp", 5, "--shard", "fsdp")))
    run(torchrun(2, *lorakit_train(tiny_lm_dir, tmp_path / "ddp", 5, "--shard", "ddp")))
    one, fsdp, ddp = adapter(tmp_path / "one"), adapter(tmp_path / "fsdp"), adapter(tmp_path / "ddp")
    assert_same_adapter(one, fsdp)
    assert_same_adapter(ddp, fsdp)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000005" / ".metadata").exists()  # a DCP checkpoint
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "fsdp")), torch.tensor(losses(tmp_path / "one")),
                               rtol=1e-5, atol=0)
    config = json.loads((tmp_path / "fsdp" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_resumes_bit_for_bit_and_on_other_world_sizes(tiny_lm_dir, tmp_path):
    settings = ("--shard", "fsdp", "--save-every", "4", "--dropout", "0.1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(torchrun(2, *lorakit_train(tiny_lm_dir, straight, 24, *settings)))
    job = subprocess.Popen(torchrun(2, *lorakit_train(tiny_lm_dir, killed, 24, *settings)), env=environment(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while logged_step(killed) < 10 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    workers = children(job.pid)
    assert workers, "the job ended before a rank could be killed"
    os.kill(workers[-1], signal.SIGKILL)
    assert job.wait(timeout=120) != 0  # torchrun tears the whole job down
    assert not (killed / "adapter").exists()
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None and (resumed_from / "state.json").exists()
    assert int(resumed_from.name.split("-")[1]) < 24
    run(torchrun(2, *lorakit_train(tiny_lm_dir, killed, 24, *settings)))
    assert (killed / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (straight / "adapter" / "adapter_model.safetensors").read_bytes()
    assert json.loads((killed / "summary.json").read_text())["resumed_from"] == int(resumed_from.name[5:])

    # 2 -> 1 and 1 -> 2 processes: without dropout (its masks are drawn per process)
    plain = ("--shard", "fsdp", "--save-every", "4", "--schedule", "constant")  # step 8 of 8 = step 8 of 12
    for first, then in ((2, 1), (1, 2)):
        whole, split = tmp_path / f"whole-{first}", tmp_path / f"split-{first}{then}"
        run(torchrun(first, *lorakit_train(tiny_lm_dir, whole, 12, *plain)))
        run(torchrun(first, *lorakit_train(tiny_lm_dir, split, 8, *plain)))
        # the same run, longer: max_steps is a setting, so continue from a copy of its checkpoint
        resumed = tmp_path / f"resumed-{first}{then}"
        (resumed / "checkpoints").mkdir(parents=True)
        os.rename(split / "checkpoints" / "step-000008", resumed / "checkpoints" / "step-000008")
        done = run(torchrun(then, *lorakit_train(tiny_lm_dir, resumed, 12, *plain)))
        assert "resuming after step 8" in done.stdout + done.stderr
        assert_same_adapter(adapter(whole), adapter(resumed))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_loopback_nodes_equal_one_node_with_two_processes(tiny_lm_dir, tmp_path):
    run(torchrun(2, *lorakit_train(tiny_lm_dir, tmp_path / "one-node", 4, "--shard", "fsdp")))
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               endpoint, "--rdzv-id", "lorakit-test",
                               *lorakit_train(tiny_lm_dir, tmp_path / "two-nodes", 4, "--shard", "fsdp")],
                              env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    assert_same_adapter(adapter(tmp_path / "one-node"), adapter(tmp_path / "two-nodes"), rtol=0, atol=0)


def small(tiny_lm_dir, out, **changes):
    values = dict(model=str(tiny_lm_dir), out=str(out), rank=4, alpha=8, max_steps=2, batch_size=4,
                  micro_batch_size=2, save_every=1)
    return TrainConfig(**{**values, **changes})


def test_bad_sharded_settings_are_refused_before_any_work(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="--shard fsdp runs under torchrun"):
        train(small(tiny_lm_dir, tmp_path / "a", shard="fsdp"))
    for changes, message in ((dict(quantize="nf4"), "fsdp with quantize is not supported yet"),
                             (dict(variant="dora"), "fsdp with variant dora is not supported yet"),
                             (dict(init="pissa"), "fsdp with init pissa is not supported yet"),
                             (dict(shard="zero3"), "shard must be one of"),
                             (dict(shard="ddp", fsdp_offload=True), "fsdp_offload needs --shard fsdp")):
        with pytest.raises(ConfigError, match=message):
            small(tiny_lm_dir, tmp_path / "b", **{"shard": "fsdp", **changes})
    assert not (tmp_path / "a").exists()
    # a world size that does not divide the batch: refused at start, nothing written
    bad = subprocess.run(torchrun(2, *lorakit_train(tiny_lm_dir, tmp_path / "c", 2, "--shard", "fsdp",
                                                    "--batch-size", "6")), env=environment(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "must be a multiple of micro_batch_size 2 x 2 process" in bad.stderr
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_a_checkpoint_of_another_run_is_refused_and_kept(tiny_lm_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(small(tiny_lm_dir, out))  # a plain (unsharded) run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # one process, as torchrun would start it
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TrainingError, match="a plain checkpoint cannot be resumed with --shard fsdp"):
        train(small(tiny_lm_dir, out, shard="fsdp"))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(TrainingError, match="rank: 4 -> 8"):
        train(small(tiny_lm_dir, out, rank=8))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_activation_checkpointing_composes_with_fsdp_and_bf16_runs(tiny_lm_dir, tmp_path):
    run(torchrun(2, *lorakit_train(tiny_lm_dir, tmp_path / "plain", 4, "--shard", "fsdp")))
    run(torchrun(2, *lorakit_train(tiny_lm_dir, tmp_path / "checkpointed", 4, "--shard", "fsdp",
                                   "--gradient-checkpointing")))
    assert_same_adapter(adapter(tmp_path / "plain"), adapter(tmp_path / "checkpointed"), rtol=0, atol=1e-6)
    run(torchrun(2, *lorakit_train(tiny_lm_dir, tmp_path / "bf16", 4, "--shard", "fsdp", "--bf16")))
    half = adapter(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 for t in half.values())  # float32 master weights
    # bfloat16 compute: the same training, to bfloat16's precision (the adapters, starting at B = 0,
    # differ relatively more than the losses do)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "bf16")), torch.tensor(losses(tmp_path / "plain")),
                               rtol=0.02, atol=0)
