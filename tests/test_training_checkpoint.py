"""Checkpoints and resume: a run killed with SIGKILL and started again ends with the
same adapter, bit for bit, as a run that was never interrupted."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lorakit.training import TrainConfig, TrainingError, train
from lorakit.training.checkpoint import latest_checkpoint

from conftest import logged_step

SETTINGS = ["--rank", "4", "--alpha", "8", "--lr", "3e-3", "--max-steps", "60", "--batch-size", "4",
            "--micro-batch-size", "2", "--dropout", "0.1", "--save-every", "7", "--eval-every", "20", "--seed", "5"]


def command(model_dir, out):
    return [sys.executable, "-m", "lorakit", "train", "--model", str(model_dir), "--out", str(out), *SETTINGS]


def environment():
    # Same threads in every run: float sums must be done in the same order to match bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigkill_then_rerun_gives_the_uninterrupted_adapter_bit_for_bit(tiny_lm_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(tiny_lm_dir, straight), env=environment(), check=True, capture_output=True)

    process = subprocess.Popen(command(tiny_lm_dir, killed), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while logged_step(killed) < 23 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "adapter").exists()
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None and 14 <= int(resumed_from.name.split("-")[1]) < 60

    rerun = subprocess.run(command(tiny_lm_dir, killed), env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (killed / "adapter" / name).read_bytes() == (straight / "adapter" / name).read_bytes(), name
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] == int(resumed_from.name.split("-")[1])
    # the metrics of the re-run steps replace what the killed run logged after its checkpoint
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 61))


def small(tiny_lm_dir, out, **changes):
    values = dict(model=str(tiny_lm_dir), out=str(out), rank=4, alpha=8, max_steps=6, batch_size=4,
                  micro_batch_size=4, save_every=2, log_every=100)
    return TrainConfig(**{**values, **changes})


def test_resume_from_any_checkpoint_in_process(tiny_lm_dir, tmp_path):
    full = train(small(tiny_lm_dir, tmp_path / "full", keep_checkpoints=3))
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(full.out / "config.yaml", partial / "config.yaml")
    shutil.copytree(full.out / "checkpoints" / "step-000002", partial / "checkpoints" / "step-000002")
    resumed = train(small(tiny_lm_dir, partial), resume=True)
    assert resumed.resumed_from == 2
    assert ((resumed.adapter / "adapter_model.safetensors").read_bytes()
            == (full.adapter / "adapter_model.safetensors").read_bytes())


def test_an_output_directory_refuses_a_run_with_other_settings(tiny_lm_dir, tmp_path):
    train(small(tiny_lm_dir, tmp_path / "run", max_steps=2))
    with pytest.raises(TrainingError, match=r"holds a run with other settings \(rank: 4 -> 8\)"):
        train(small(tiny_lm_dir, tmp_path / "run", max_steps=2, rank=8))
    # settings that do not change the result may differ
    again = train(small(tiny_lm_dir, tmp_path / "run", max_steps=2, log_every=1))
    assert again.finished_before and again.steps == 2


def test_resume_needs_a_run(tiny_lm_dir, tmp_path):
    with pytest.raises(TrainingError, match="has no run to resume"):
        train(small(tiny_lm_dir, tmp_path / "empty"), resume=True)


def test_a_resumed_run_reports_what_an_uninterrupted_one_does(tiny_lm_dir, tmp_path):
    full = train(small(tiny_lm_dir, tmp_path / "full", keep_checkpoints=3))
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(full.out / name, partial / name)
    shutil.copytree(full.out / "checkpoints" / "step-000004", partial / "checkpoints" / "step-000004")
    resumed = train(small(tiny_lm_dir, partial))
    assert resumed.resumed_from == 4
    expected, summary = full.to_json(), json.loads((partial / "summary.json").read_text())
    for key in ("eval_loss_before", "eval_loss_after", "train_loss", "steps"):
        assert summary[key] == expected[key] and summary[key] is not None, key


def test_a_finished_run_run_again_changes_nothing(tiny_lm_dir, tmp_path):
    first = train(small(tiny_lm_dir, tmp_path / "run"))
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.out.rglob("*") if p.is_file()}
    again = train(small(tiny_lm_dir, tmp_path / "run", log_every=1), resume=True)
    assert again.finished_before and again.resumed_from is None
    assert again.to_json() == first.to_json()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.out.rglob("*") if p.is_file()} == files


def test_killed_after_the_last_checkpoint_evaluates_once(tiny_lm_dir, tmp_path):
    """Killed between the final checkpoint and summary.json: the re-run finishes the
    run and metrics.jsonl keeps one final evaluation, not two."""
    first = train(small(tiny_lm_dir, tmp_path / "run"))
    shutil.rmtree(first.adapter)
    (first.out / "summary.json").unlink()
    again = train(small(tiny_lm_dir, tmp_path / "run"))
    assert again.resumed_from == 6 and not again.finished_before
    assert again.eval_loss_before == first.eval_loss_before and again.train_loss == first.train_loss
    evaluations = [r["step"] for r in map(json.loads, (first.out / "metrics.jsonl").read_text().splitlines())
                   if "eval_loss" in r]
    assert evaluations == [0, 6]


def test_stale_temporaries_of_a_killed_run_are_removed_at_its_next_start(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    first = train(small(tiny_lm_dir, out, max_steps=4))
    shutil.rmtree(first.adapter)
    (out / "summary.json").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not lorakit's")
    stale = [out / ".adapter.tmp-1a2b3c4d", out / ".adapter.old-5e6f7a8b", out / "checkpoints" / ".step-000006.tmp-x1",
             out / ".summary.json.tmp-4242", out / ".loss.png.tmp-77"]
    for path in stale[:3]:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"half")
    for path in stale[3:]:
        path.write_text("half")
    (out / ".metrics.jsonl.tmp-99").symlink_to(outside)
    (out / "notes.txt").write_text("the user's")
    train(small(tiny_lm_dir, out, max_steps=4))
    assert not any(p.exists() or p.is_symlink() for p in [*stale, out / ".metrics.jsonl.tmp-99"])
    assert (outside / "keep.txt").read_text() == "not lorakit's" and (out / "notes.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "config.yaml", "loss.png",
                                                     "metrics.jsonl", "notes.txt", "summary.json"]


def test_two_runs_into_one_directory_at_once_are_refused(tiny_lm_dir, tmp_path):
    from lorakit.training.checkpoint import OutputInUse, run_lock

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".step-000002.tmp-abcd").mkdir()
    with run_lock(out):
        assert not (out / "checkpoints" / ".step-000002.tmp-abcd").exists()
        child = subprocess.run([sys.executable, "-c", "import sys, pathlib\n"
                                "from lorakit.training.checkpoint import run_lock\n"
                                "with run_lock(pathlib.Path(sys.argv[1])): pass", str(out)],
                               capture_output=True, text=True)
        assert child.returncode != 0 and "is being written by another lorakit train run" in child.stderr
    with run_lock(out):  # released with the first
        pass


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    from lorakit.training.monitor import Monitor, read_metrics

    whole = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"step": 4, "lo')
    assert read_metrics(tmp_path / "metrics.jsonl") == whole

    monitor = Monitor(tmp_path, total_steps=10, start_step=3, enabled=True, log_every=1)
    monitor.record({"step": 4, "loss": 0.5})
    monitor.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [*whole, {"step": 4, "loss": 0.5}]
