"""Images for diffusion training: a folder read and checked, captions encoded once, and
fixed-seed sampling into one picture.

A data folder holds images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``) and, for
each, an optional caption in a ``.txt`` file of the same name; images without one use
the run's ``caption`` (a class token such as "a photo of sks dog"). Every file is
opened and checked before the model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .data import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageExample:
    source: str
    pixels: Tensor  # (channels, resolution, resolution) in [-1, 1]
    caption: str


def read_image_folder(folder: str | os.PathLike, caption: str | None, resolution: int,
                      channels: int) -> list[ImageExample]:
    """Every image of ``folder`` resized (shorter side, then centre crop) to ``resolution``,
    as ``channels`` (1: grey, 3: RGB) in [-1, 1], with its caption; problems name the file."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    examples, problems = [], []
    for path in files:
        text = path.with_suffix(".txt")
        found = text.read_text(encoding="utf-8").strip() if text.exists() else caption
        if not found:
            problems.append(f"{path.name}: no caption ({text.name} missing or empty, and no --caption)")
            continue
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                pixels = _square(image, resolution)
        except (UnidentifiedImageError, OSError) as err:
            problems.append(f"{path.name}: not a readable image ({err})")
            continue
        examples.append(ImageExample(str(path), pixels, found))
    if problems:
        raise DataError(f"{folder}: " + "; ".join(problems[:10]))
    return examples


def _square(image, resolution: int) -> Tensor:
    import numpy as np
    from PIL import Image

    scale = resolution / min(image.size)
    size = (max(resolution, round(image.size[0] * scale)), max(resolution, round(image.size[1] * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    array = array[None] if array.dim() == 2 else array.permute(2, 0, 1)
    return array / 127.5 - 1.0


@torch.no_grad()
def encode_captions(captions: list[str], tokenizer, text_encoder: nn.Module, device: torch.device) -> dict[str, Tensor]:
    """Caption -> the frozen text encoder's last hidden states (sequence, width), each once."""
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    states = text_encoder(ids)[0].float()
    return {caption: states[i] for i, caption in enumerate(unique)}


@torch.no_grad()
def sample(unet: nn.Module, scheduler_config, states: Tensor, shape: tuple[int, ...], seed: int, steps: int,
           vae: nn.Module | None = None) -> Tensor:
    """Images in [0, 1] for the text states ``states`` (one per image), by DDIM in ``steps``
    steps from noise drawn with ``seed``: the same seed gives the same starting noise."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    device = states.device
    x = torch.randn((states.shape[0], *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        prediction = unet(scheduler.scale_model_input(x, t), t, states).sample
        x = scheduler.step(prediction, t, x).prev_sample
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample
    return ((x.float() + 1) / 2).clamp(0, 1).cpu()


def save_grid(path: Path, panels: dict[str, Tensor], prompts: list[str]) -> None:
    """One PNG: a panel per entry of ``panels`` (title -> images (prompts, k, C, H, W)),
    a row per prompt; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = next(iter(panels.values())).shape[1]
    rows = len(prompts) * len(panels)
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns + 2.2, 1.25 * rows), dpi=100, squeeze=False)
    for p, (title, images) in enumerate(panels.items()):
        for i, prompt in enumerate(prompts):
            row = p * len(prompts) + i
            for j in range(columns):
                image = images[i, j]
                axes[row, j].imshow(image[0] if image.shape[0] == 1 else image.permute(1, 2, 0),
                                    cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=1)
                axes[row, j].set_xticks([])
                axes[row, j].set_yticks([])
            axes[row, 0].set_ylabel(f"{title}\n{prompt}", rotation=0, ha="right", va="center", fontsize=8)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(temporary, format="png")
    plt.close(figure)
    temporary.replace(path)
