"""Image training: the denoising loss against its formula, held-out loss that falls, a run
killed with SIGKILL that resumes to the same adapter bit for bit, two processes that
match one, and bad input refused before the model loads."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorakit.config import ConfigError
from lorakit.pipelines import load_pipeline_adapter
from lorakit.training import TrainingError
from lorakit.training.checkpoint import latest_checkpoint
from lorakit.training.data import DataError
from lorakit.training.diffusion import (ImageBatch, ImageTrainConfig, check_batch, denoising_loss, draw,
                                        load_pipeline, train_image)
from lorakit.training.distributed import Processes

from conftest import logged_step
from image_models import image_folder, pipeline_folder

SETTINGS = ["--rank", "4", "--alpha", "8", "--lr", "2e-3", "--batch-size", "4", "--micro-batch-size", "2",
            "--caption", "a square", "--targets", "attention-conv", "--sample-steps", "3", "--samples-per-prompt",
            "2", "--seed", "3", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    return pipeline_folder(root / "model"), image_folder(root / "data"), pipeline_folder(root / "v", "v_prediction")


def command(folders, out, steps, *extra):
    return [sys.executable, "-m", "lorakit", "train-image", "--model", str(folders[0]), "--data", str(folders[1]),
            "--out", str(out), "--max-steps", str(steps), *SETTINGS, *extra]


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def config(folders, out, **changes):
    values = dict(model=str(folders[0]), data=str(folders[1]), caption="a square", out=str(out), rank=4, alpha=8,
                  lr=2e-3, max_steps=20, batch_size=4, micro_batch_size=4, targets="attention-conv",
                  sample_steps=3, samples_per_prompt=2, save_every=10, log_every=100, eval_fraction=0.2)
    return ImageTrainConfig(**{**values, **changes})


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoising_loss_is_the_formula(folders, prediction):
    pipeline = load_pipeline(folders[0] if prediction == "epsilon" else folders[2])
    x0, noise = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16)
    t = torch.tensor([0, 40, 99])
    states = torch.randn(3, 16, 32)
    a = pipeline.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    with torch.no_grad():
        expected = ((pipeline.unet(noisy, t, states).sample - target) ** 2).mean(dim=(1, 2, 3))
        got = denoising_loss(pipeline.unet, pipeline.scheduler, ImageBatch(x0, states, noise, t))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_noise_depends_on_seed_step_and_image_only():
    a, ta = draw(1, 5, 2, (1, 4, 4), 100)
    b, tb = draw(1, 5, 2, (1, 4, 4), 100)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a, draw(1, 5, 3, (1, 4, 4), 100)[0])
    assert not torch.equal(a, draw(1, 6, 2, (1, 4, 4), 100)[0])
    assert not torch.equal(a, draw(2, 5, 2, (1, 4, 4), 100)[0])


def test_training_lowers_held_out_loss_and_writes_every_file(folders, tmp_path):
    result = train_image(config(folders, tmp_path / "run"))
    assert result.eval_loss_after < result.eval_loss_before
    assert result.trainable_parameters / result.unet_parameters < 0.2
    out = result.out
    for name in ("adapter/adapter_model.safetensors", "diffusers/pytorch_lora_weights.safetensors",
                 "kohya.safetensors", "samples.png", "loss.png", "metrics.jsonl", "summary.json", "config.yaml"):
        assert (out / name).is_file(), name
    with Image.open(out / "samples.png") as picture:
        assert picture.convert("L").getextrema()[0] < picture.convert("L").getextrema()[1]
    # the three files hold one adapter: loaded from each, the UNet computes the same
    outputs = []
    for path in (out / "diffusers", out / "kohya.safetensors"):
        unet = load_pipeline(folders[0]).unet
        load_pipeline_adapter({"unet": unet}, path)
        with torch.no_grad():
            outputs.append(unet(torch.ones(1, 1, 16, 16), 5, torch.ones(1, 16, 32)).sample)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)


def test_sigkill_then_rerun_gives_the_uninterrupted_adapter_bit_for_bit(folders, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = ("--save-every", "4")
    subprocess.run(command(folders, straight, 24, *extra), env=environment(), check=True, capture_output=True)
    process = subprocess.Popen(command(folders, killed, 24, *extra), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while logged_step(killed) < 10 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "adapter").exists()
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None and 8 <= int(resumed_from.name.split("-")[1]) < 24
    rerun = subprocess.run(command(folders, killed, 24, *extra), env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in ("adapter/adapter_model.safetensors", "kohya.safetensors"):
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] == int(resumed_from.name.split("-")[1])


def test_two_processes_match_one_process(folders, tmp_path):
    single = subprocess.run(command(folders, tmp_path / "one", 3, "--dropout", "0"), env=environment(),
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    double = subprocess.run([*torchrun, *command(folders, tmp_path / "two", 3, "--dropout", "0")[1:]],
                            env=environment(), capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=5e-5, msg=key)


def test_bad_input_is_refused_before_anything_is_written(folders, tmp_path):
    data = image_folder(tmp_path / "data", count=4)
    with pytest.raises(DataError, match="000.png: no caption"):
        train_image(config(folders, tmp_path / "a", data=str(data), caption=None))
    (data / "003.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="003.png: not a readable image"):
        train_image(config(folders, tmp_path / "b", data=str(data)))
    with pytest.raises(TrainingError, match=r"missing unet/, scheduler/, text_encoder/, tokenizer/"):
        train_image(config(folders, tmp_path / "c", model=str(tmp_path)))
    with pytest.raises(TrainingError, match="must be a multiple of micro_batch_size 2 x 2 process"):
        check_batch(config(folders, tmp_path / "d", batch_size=6, micro_batch_size=2), Processes(0, 2))
    with pytest.raises(ConfigError, match="data is required"):
        ImageTrainConfig(model="m", data="", out=str(tmp_path / "e"))
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_a_run_with_other_settings_is_refused(folders, tmp_path):
    train_image(config(folders, tmp_path / "run", max_steps=2, eval_fraction=0))
    before = (tmp_path / "run" / "kohya.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="rank: 4 -> 8"):
        train_image(config(folders, tmp_path / "run", max_steps=2, eval_fraction=0, rank=8))
    assert (tmp_path / "run" / "kohya.safetensors").read_bytes() == before
