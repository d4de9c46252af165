"""LoRA for a diffusion UNet: the standard noise-prediction loss, read top to bottom.

    for each optimizer step s:
        x0    = the step's images (as the VAE's latents, when the model has one)
        t, ε  = timesteps and noise drawn from a generator seeded by (seed, s, image)
        x_t   = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε                 the scheduler's add_noise
        loss  = ‖ unet(x_t, t, text) − target ‖² / size   target ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0
        mean over the batch's images, backward per micro-batch, clip, AdamW step

(Ho et al., DDPM, arXiv:2006.11239; v-prediction: Salimans & Ho, arXiv:2202.00512; the
prediction type is the scheduler config's.) Noise and timesteps depend only on the seed,
the step and the image, so a resumed run, or one split over processes, draws the same
ones. The text encoder and VAE stay frozen: captions and latents are computed once.
``DiffusionTask`` is this loss as a task of the one training loop (loop.py).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import hub
from ..attach import disabled
from ..config import ConfigError, LoraConfig
from ..pipelines import save_pipeline_adapter
from ..quiet import no_progress_bars
from .batches import micro_batches, split_eval, step_indices
from .checkpoint import run_lock
from .config import SCHEDULES, Settings, setting
from .distributed import Processes
from .images import ImageExample, encode_captions, read_image_folder, sample, save_grid
from .loop import Run, TrainingError, check_batch, check_output_dir, fit, held_out, peak_memory
from .sources import DataError
from .strategy import Plain
from .tracking import check_trackers

PREDICTIONS = ("epsilon", "v_prediction")
EVAL_STEP = 2**40  # the noise of held-out evaluation is drawn as at this step
NOT_RESUMABLE_IF_CHANGED = ("model", "rank", "alpha", "dropout", "targets", "data", "caption", "resolution",
                            "eval_fraction", "max_steps", "batch_size", "micro_batch_size", "lr", "loraplus_ratio",
                            "weight_decay", "warmup_steps", "schedule", "min_lr_ratio", "max_grad_norm", "seed")


@dataclass(frozen=True)
class ImageTrainConfig(Settings):
    """Every setting of an image run; each is a ``lorakit train-image`` flag and a YAML key."""

    model: str = setting("", "Diffusers pipeline folder: unet/, scheduler/, text_encoder/ + tokenizer/, "
                             "and vae/ for a latent model.")
    data: str = setting("", "Folder of images; a caption per image in a .txt of the same name.")
    caption: str | None = setting(None, "Caption of images without a .txt (a class token: 'a photo of sks dog').")
    resolution: int | None = setting(None, "Image side in pixels; none: the UNet's sample size (x the VAE's "
                                           "downscaling).")
    rank: int = setting(8, "LoRA rank r.")
    alpha: float = setting(8.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = setting(0.0, "Dropout on the adapter's input while training.")
    targets: str | tuple[str, ...] = setting("attention", "attention, attention-conv, or comma-separated "
                                                          "module names.")
    eval_fraction: float = setting(0.1, "Fraction of the images held out for the denoising loss (0: none).")
    max_steps: int = setting(200, "Optimizer steps.")
    batch_size: int = setting(8, "Images per optimizer step, over all processes.")
    micro_batch_size: int = setting(8, "Images per forward pass and process; the rest is accumulated.")
    lr: float = setting(1e-4, "Peak learning rate.")
    loraplus_ratio: float | None = setting(None, "LoRA+: B learns at lr x ratio.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    warmup_steps: int = setting(0, "Linear warmup steps.")
    schedule: str = setting("constant", "Decay after warmup: cosine, linear or constant.")
    min_lr_ratio: float = setting(0.0, "The schedule ends at lr x min_lr_ratio.")
    max_grad_norm: float | None = setting(1.0, "Gradient clipping norm (none: no clipping).")
    seed: int = setting(0, "Seed of the adapter's init, the noise and the samples.")
    sample_prompts: str | None = setting(None, "Prompts of the before/after grid, separated by '|'; none: the "
                                               "training captions (up to 4).")
    samples_per_prompt: int = setting(4, "Images per prompt in the grid.")
    sample_steps: int = setting(25, "DDIM steps per sample.")
    out: str = setting("runs/lorakit-image", "Run directory: adapter, checkpoints, metrics, samples.")
    save_every: int = setting(50, "Checkpoint every N steps (and always at the end).")
    keep_checkpoints: int = setting(2, "Newest checkpoints kept.")
    log_every: int = setting(1, "Log every N steps.")
    report_to: tuple[str, ...] = setting((), "Experiment tracker: tensorboard, wandb or mlflow (repeatable; "
                                            "metrics.jsonl and loss.png are always written).")
    device: str = setting("auto", "auto (cuda if available), cpu or cuda.")

    def __post_init__(self) -> None:
        problems = [f"{name} is required" for name in ("model", "data") if not getattr(self, name)]
        problems += check_trackers(self.report_to)
        positive = ("rank", "max_steps", "batch_size", "micro_batch_size", "save_every", "keep_checkpoints",
                    "log_every", "samples_per_prompt", "sample_steps")
        problems += [f"{name} must be >= 1, got {getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if self.resolution is not None and self.resolution < 8:
            problems.append(f"resolution must be >= 8, got {self.resolution}")
        if self.lr <= 0 or not 0 <= self.eval_fraction < 1 or self.warmup_steps < 0:
            problems.append("lr must be > 0, eval_fraction in [0, 1), warmup_steps >= 0")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.batch_size % self.micro_batch_size:
            problems.append(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                            f"{self.micro_batch_size}")
        if problems:
            raise ConfigError("invalid image training config:\n  " + "\n  ".join(problems))
        self.lora()

    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)


@dataclass
class Pipeline:
    """The parts of a diffusers pipeline folder that training uses."""

    unet: nn.Module
    scheduler: Any  # a diffusers scheduler: add_noise, get_velocity, its config
    text_encoder: nn.Module
    tokenizer: Any
    vae: nn.Module | None

    def sample_shape(self, resolution: int) -> tuple[int, int, int]:
        """The UNet's input for images of ``resolution`` pixels: the latent's size under a VAE."""
        side = resolution // vae_downscale(self.vae.config.block_out_channels) if self.vae is not None else resolution
        return (self.unet.config.in_channels, side, side)


def load_pipeline(folder: str | Path) -> Pipeline:
    """The UNet, noise scheduler, text encoder, tokenizer and optional VAE of ``folder``."""
    folder = _check_pipeline_folder(folder)
    with no_progress_bars():  # a local load takes seconds
        return _load_pipeline(folder)


def _load_pipeline(folder: Path) -> Pipeline:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    if scheduler.config.prediction_type not in PREDICTIONS:
        raise TrainingError(f"{folder}/scheduler: prediction_type {scheduler.config.prediction_type!r} is not "
                            f"supported (supported: {', '.join(PREDICTIONS)})")
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval() if (folder / "vae").is_dir() else None
    return Pipeline(UNet2DConditionModel.from_pretrained(folder / "unet"), scheduler,
                    CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
                    AutoTokenizer.from_pretrained(folder / "tokenizer"), vae)


def _check_pipeline_folder(folder: str | Path) -> Path:
    folder = hub.local(folder, hub.MODEL_FILES, "pipeline")
    missing = [part for part in ("unet", "scheduler", "text_encoder", "tokenizer") if not (folder / part).is_dir()]
    if missing:
        raise TrainingError(f"{folder}: not a diffusers pipeline folder (missing "
                            f"{', '.join(part + '/' for part in missing)})")
    return folder


def vae_downscale(block_out_channels: list[int]) -> int:
    """Pixels per latent along a side: an AutoencoderKL halves the size between its blocks."""
    return 2 ** (len(block_out_channels) - 1)


def image_shape(config: ImageTrainConfig) -> tuple[int, int]:
    """(resolution, channels) of the training images, from the pipeline's config files alone
    (so the images are checked before any weights load)."""
    folder = _check_pipeline_folder(config.model)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    if (folder / "vae").is_dir():
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return config.resolution or unet["sample_size"] * vae_downscale(vae["block_out_channels"]), 3
    return config.resolution or unet["sample_size"], unet["in_channels"]


@dataclass
class ImageBatch:
    latents: Tensor
    states: Tensor
    noise: Tensor
    timesteps: Tensor

    def to(self, device: torch.device) -> ImageBatch:
        return ImageBatch(*(t.to(device) for t in (self.latents, self.states, self.noise, self.timesteps)))


class DenoisingLoss(nn.Module):
    """The UNet and its loss in one module (what DistributedDataParallel wraps): the sum over
    the batch of each image's mean squared error."""

    def __init__(self, unet: nn.Module, scheduler) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler

    def forward(self, batch: ImageBatch) -> Tensor:
        return denoising_loss(self.unet, self.scheduler, batch).sum()


def denoising_loss(unet: nn.Module, scheduler, batch: ImageBatch) -> Tensor:
    """Each image's mean squared error between the UNet's prediction and its target."""
    noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
    else:
        target = batch.noise
    prediction = unet(noisy, batch.timesteps, batch.states).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def draw(seed: int, step: int, index: int, shape: tuple[int, ...], timesteps: int) -> tuple[Tensor, Tensor]:
    """The noise and timestep of image ``index`` at ``step``: a function of the three numbers alone."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0]))
    return torch.randn(shape, generator=generator), torch.randint(0, timesteps, (1,), generator=generator)


def make_batch(latents: Tensor, states: Tensor, indices: list[int], seed: int, step: int, timesteps: int,
               ) -> ImageBatch:
    noise, times = zip(*(draw(seed, step, i, tuple(latents.shape[1:]), timesteps) for i in indices))
    return ImageBatch(latents[indices], states[indices], torch.stack(noise), torch.cat(times))


@dataclass
class ImageTrainResult:
    out: Path
    adapter: Path
    steps: int
    resumed_from: int | None
    train_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    images_per_second: float
    seconds: float
    peak_memory_bytes: int
    trainable_parameters: int
    unet_parameters: int

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def train_image(config: ImageTrainConfig, resume: bool = False) -> ImageTrainResult:
    """Teach a diffusers UNet the images of ``config.data`` with a LoRA adapter."""
    processes = Processes.from_env()
    try:
        check_batch(config, processes)
        check_output_dir(config, resume, NOT_RESUMABLE_IF_CHANGED, Plain(processes))
        resolution, channels = image_shape(config)
        examples = read_image_folder(config.data, config.caption, resolution, channels)
        pipeline = load_pipeline(config.model)
        with run_lock(config.out_dir) if processes.main else nullcontext():
            task = DiffusionTask(pipeline, examples, resolution, config, processes)
            return fit(task, Plain(processes), config, processes)
    finally:
        processes.close()


@torch.no_grad()
def encode_images(pipeline: Pipeline, examples: list[ImageExample], device: torch.device, seed: int) -> Tensor:
    """The UNet's inputs x0: pixels, or the VAE's latents (one seeded draw per image)."""
    pixels = torch.stack([e.pixels for e in examples]).to(device)
    if pipeline.vae is None:
        return pixels
    pipeline.vae.to(device)
    generator = torch.Generator(device).manual_seed(seed)
    return pipeline.vae.encode(pixels).latent_dist.sample(generator) * pipeline.vae.config.scaling_factor


class DiffusionTask:
    """A pipeline's UNet and its images, encoded once: the denoising loss per image."""

    counter = "images"
    loss_label = "denoising loss (mean squared error)"

    def __init__(self, pipeline: Pipeline, examples: list[ImageExample], resolution: int, config: ImageTrainConfig,
                 processes: Processes) -> None:
        self.pipeline, self.config, self.resolution = pipeline, config, resolution
        self.model = pipeline.unet
        self.total_steps = config.max_steps
        device = processes.device(config.device)
        kept, held_out = split_eval(examples, config.eval_fraction, config.seed) if config.eval_fraction else (
            examples, [])
        if not kept:
            raise DataError(f"{config.data}: no images left for training after holding out {config.eval_fraction}")
        self.captions = [e.caption for e in kept]
        self.kept, self.held_out = len(kept), bool(held_out)
        pipeline.text_encoder.to(device)
        states = encode_captions([e.caption for e in examples], pipeline.tokenizer, pipeline.text_encoder, device)
        self.latents = encode_images(pipeline, kept, device, config.seed).cpu()
        self.states = torch.stack([states[e.caption] for e in kept]).cpu()
        self.eval_latents = encode_images(pipeline, held_out, device, config.seed).cpu() if held_out else None
        self.eval_states = torch.stack([states[e.caption] for e in held_out]).cpu() if held_out else None
        self.timesteps = pipeline.scheduler.config.num_train_timesteps

    def adapted(self, model: nn.Module) -> None:
        pass

    def loss_module(self) -> nn.Module:
        return DenoisingLoss(self.model, self.pipeline.scheduler)

    def note(self, trainable: int) -> str:
        config, size = self.config, self.resolution
        held_out = 0 if self.eval_latents is None else len(self.eval_latents)
        share = 100 * trainable / sum(p.numel() for p in self.model.parameters())
        return (f"data: {self.kept} training images, {held_out} held out, {size}x{size}; {config.max_steps} steps "
                f"of {config.batch_size}; {trainable:,} trainable parameters ({share:.2f} % of the UNet)")

    def batches(self, step: int, processes: Processes, device: torch.device) -> tuple[list[ImageBatch], int, int]:
        config = self.config
        indices = step_indices(self.kept, config.batch_size, step, config.seed)
        batches = [make_batch(self.latents, self.states, chunk, config.seed, step, self.timesteps).to(device)
                   for chunk in micro_batches(indices, processes.rank, processes.world_size, config.micro_batch_size)]
        return batches, config.batch_size, config.batch_size

    @torch.no_grad()
    def evaluate(self, loss: nn.Module, processes: Processes, device: torch.device,
                 autocast) -> dict[str, float] | None:
        """Mean denoising loss over the held-out images, with noise and timesteps fixed by the
        seed (as a step no run reaches), so every evaluation of a run sees the same noisy inputs."""
        if self.eval_latents is None:
            return None
        was_training = loss.training
        loss.eval()
        total = 0.0
        for chunk in micro_batches(list(range(len(self.eval_latents))), processes.rank, processes.world_size,
                                   self.config.micro_batch_size):
            batch = make_batch(self.eval_latents, self.eval_states, chunk, self.config.seed, EVAL_STEP,
                               self.timesteps).to(device)
            total += loss(batch).item()
        loss.train(was_training)
        return {"eval_loss": processes.sum(total, device) / len(self.eval_latents)}

    def metrics(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"images_per_second": state["images"] / state["seconds"]}

    def result(self, run: Run, resumed_from: int | None, eval_after: dict[str, float] | None) -> ImageTrainResult:
        """The adapter in diffusers' and kohya's formats too, and samples.png; the result."""
        config, state, unet = self.config, run.state, self.model
        out = config.out_dir
        if run.processes.main:
            save_pipeline_adapter({"unet": unet}, out / "diffusers")
            save_pipeline_adapter({"unet": unet}, out / "kohya.safetensors", file_format="kohya")
            prompts = config.sample_prompts.split("|") if config.sample_prompts else sorted(set(self.captions))[:4]
            before, after = sample_grid(self.pipeline, prompts, config, self.resolution, run.device)
            save_grid(out / "samples.png", {"before": before, "after": after}, prompts)
        return ImageTrainResult(
            out=out, adapter=out / "adapter", steps=config.max_steps, resumed_from=resumed_from,
            train_loss=state["train_loss"], eval_loss_before=held_out(state["eval_before"]),
            eval_loss_after=held_out(eval_after),
            images_per_second=state["images"] / max(state["seconds"], 1e-9), seconds=state["seconds"],
            peak_memory_bytes=peak_memory(run.device), trainable_parameters=sum(p.numel() for p in run.parameters),
            unet_parameters=sum(p.numel() for p in unet.parameters()))


def sample_grid(pipeline: Pipeline, prompts: list[str], config: ImageTrainConfig, resolution: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """Images of each prompt without the adapter and with it, from the same noise."""
    states = encode_captions(prompts, pipeline.tokenizer, pipeline.text_encoder, device)
    k = config.samples_per_prompt
    batch = torch.stack([states[p] for p in prompts for _ in range(k)])
    shape = pipeline.sample_shape(resolution)
    unet = pipeline.unet.eval()
    with disabled(unet):
        before = sample(unet, pipeline.scheduler.config, batch, shape, config.seed, config.sample_steps, pipeline.vae)
    after = sample(unet, pipeline.scheduler.config, batch, shape, config.seed, config.sample_steps, pipeline.vae)
    return before.unflatten(0, (len(prompts), k)), after.unflatten(0, (len(prompts), k))
