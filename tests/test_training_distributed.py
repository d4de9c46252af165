"""torchrun with 2 CPU processes (gloo) trains the same adapter as one process with
the same global batch."""

import json
import math
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

SETTINGS = ["--rank", "4", "--alpha", "8", "--lr", "3e-3", "--max-steps", "5", "--batch-size", "8",
            "--micro-batch-size", "2", "--save-every", "5", "--seed", "2"]


def test_two_processes_match_one_process(tiny_lm_dir, tmp_path):
    _run_both(tiny_lm_dir, tmp_path, SETTINGS)

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    # one writer: every step and evaluation logged once
    assert [r["step"] for r in records("two") if "loss" in r] == [1, 2, 3, 4, 5]
    for a, b in zip(records("one"), records("two")):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, a, b)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["steps"] == 5


def _run_both(tiny_lm_dir, tmp_path, flags):
    """``lorakit train`` with ``flags`` in one process and under torchrun in two: the same adapter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["-m", "lorakit", "train", "--model", str(tiny_lm_dir), *flags]
    single = subprocess.run([sys.executable, *train, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    double = subprocess.run([*torchrun, *train, "--out", str(tmp_path / "two")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=5e-5, msg=key)


def test_dpo_on_two_processes_matches_one(tiny_lm_dir, tmp_path):
    records = [{"prompt": f"Säg {w}", "chosen": f" {w} {w}", "rejected": " nej"} for w in ("hej", "tack", "bra", "ja")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records * 3))
    _run_both(tiny_lm_dir, tmp_path, ["--method", "dpo", "--data", str(data), *SETTINGS[:-4], "--seed", "2",
                                      "--eval-fraction", "0"])


def test_grpo_on_two_processes_matches_one(tiny_lm_dir, tmp_path):
    """Each process samples whole groups (its share of the prompts, seeded per completion), so
    two processes sample the completions one does and train the same adapter."""
    records = [{"prompt": f"Säg {w}", "answer": w} for w in ("hej", "tack", "bra", "ja")]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records * 3))
    _run_both(tiny_lm_dir, tmp_path, ["--method", "grpo", "--data", str(data), "--reward", "length:3",
                                      "--num-generations", "2", "--max-completion-length", "5", *SETTINGS[:-4],
                                      "--seed", "2", "--eval-fraction", "0"])
