"""Only lorakit's own lines: no third-party warnings, "Failed to load" lines or progress
bars reach stderr from the Python API, the CLI or the demo, unless asked for (--verbose)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "LORAKIT_VERBOSE"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_loading_the_default_model_from_python_prints_nothing(tmp_path):
    result = run("-c", "import lorakit; lorakit.load_model('smollm2-135m'); lorakit.load_tokenizer('smollm2-135m')",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""


def test_cli_commands_write_only_their_own_lines(tiny_lm_dir, tmp_path):
    trained = run("-m", "lorakit", "train", "--model", str(tiny_lm_dir), "--out", "run", "--max-steps", "2",
                  "--batch-size", "4", "--micro-batch-size", "4", "--rank", "2", "--quantize", "nf4",
                  "--report-to", "tensorboard", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert trained.stderr == ""
    assert "held-out loss" in trained.stdout
    for args in (("inspect", "smollm2-135m", "--rank", "8"),
                 ("merge", str(tiny_lm_dir), "run/adapter", "--out", "merged", "--quantize", "nf4"),
                 ("generate", "smollm2-135m", "--prompt", "Hi", "--max-tokens", "2")):
        result = run("-m", "lorakit", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", args


def test_verbose_lets_the_third_party_lines_through(tmp_path):
    quiet = run("-m", "lorakit", "generate", "smollm2-135m", "--prompt", "Hi", "--max-tokens", "1", cwd=tmp_path)
    loud = run("-m", "lorakit", "--verbose", "generate", "smollm2-135m", "--prompt", "Hi", "--max-tokens", "1",
               cwd=tmp_path)
    assert quiet.returncode == loud.returncode == 0, loud.stderr
    if "torchao" not in loud.stderr:  # where torchao loads all its kernels, there is nothing to hide
        pytest.skip("this machine's torchao logs nothing while loading")
    assert quiet.stderr == ""


def test_the_demo_writes_only_its_own_lines(tmp_path):
    """The whole demo (load, answer, train, reload, merge, load the merged model with
    transformers, answer again), on one training step instead of 39."""
    result = run(str(ROOT / "examples" / "demo.py"), "--out", str(tmp_path / "demo"), "--epochs", "0.1",
                 cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[load]") and lines[-1].startswith("[files]"), lines
    assert result.stderr == ""
