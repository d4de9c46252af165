"""lorakit on an image model, offline: a small diffusers UNet learns to draw digits, then a
LoRA adapter teaches it a digit it has never seen.

No pretrained diffusion weights can be downloaded here, so the demo makes its own base:
scikit-learn's 8x8 handwritten digits (1,797 images that ship with the package), the
classes 0-6 only, train a 0.8M-parameter UNet2DConditionModel from scratch (full
training, a few minutes on 2 CPU cores; kept in <out>/base and reused). The captions
("a digit three") are encoded by a frozen, randomly initialised CLIP text encoder: the
UNet learns to tell the captions apart, not language. Then ``lorakit train-image``
trains a rank-8 LoRA on the attention projections (about 2 % of the UNet) on the sevens,
captioned "a digit seven", and the demo samples both prompts with the same noise without
and with the adapter.

    python examples/demo_image.py [--out runs/demo-image] [--base-steps 1500] [--lora-steps 300]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lorakit.attach import disabled
from lorakit.training.diffusion import ImageTrainConfig, denoising_loss, load_pipeline, make_batch, train_image
from lorakit.training.images import read_image_folder, save_grid, sample
from lorakit.training.batches import step_indices

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BASE_CLASSES = range(7)
NEW_CLASS = 7
PROMPTS = ["a digit seven", "a digit three"]


def write_digits(out: Path) -> tuple[Path, Path]:
    """The digits as 8x8 PNGs: classes 0-6 with a caption file each, and the sevens alone."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    base, sevens = out / "data" / "base", out / "data" / "sevens"
    for folder in (base, sevens):
        folder.mkdir(parents=True, exist_ok=True)
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        image = Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8))
        if label in BASE_CLASSES:
            image.save(base / f"{i:04d}.png")
            (base / f"{i:04d}.txt").write_text(f"a digit {NAMES[label]}")
        elif label == NEW_CLASS:
            image.save(sevens / f"{i:04d}.png")
    return base, sevens


def make_base_pipeline(folder: Path) -> None:
    """A random-weight pipeline folder: UNet, DDPM scheduler, CLIP text encoder, word tokenizer."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(folder / "scheduler")
    vocab = {word: i for i, word in enumerate(["<pad>", "<unk>", "a", "digit", *NAMES])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>",
                            model_max_length=6).save_pretrained(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=6, bos_token_id=0, eos_token_id=0,
                                 pad_token_id=0)).save_pretrained(folder / "text_encoder")


def train_base(folder: Path, data: Path, steps: int, batch_size: int = 64) -> float:
    """Full training of the UNet on the base classes (the "pretraining" a real base had)."""
    from lorakit.training.images import encode_captions

    pipeline = load_pipeline(folder)
    examples = read_image_folder(data, None, 8, 1)
    captions = encode_captions([e.caption for e in examples], pipeline.tokenizer, pipeline.text_encoder,
                               torch.device("cpu"))
    pixels = torch.stack([e.pixels for e in examples])
    states = torch.stack([captions[e.caption] for e in examples])
    unet = pipeline.unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    started = time.perf_counter()
    for step in range(steps):
        batch = make_batch(pixels, states, step_indices(len(examples), batch_size, step, 0), 0, step, 1000)
        loss = denoising_loss(unet, pipeline.scheduler, batch).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            print(f"[base]    step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)
    unet.eval().save_pretrained(folder / "unet")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/demo-image")
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--lora-steps", type=int, default=300)
    args = parser.parse_args()
    from transformers.utils import logging

    logging.disable_progress_bar()
    out = Path(args.out)
    base_data, sevens = write_digits(out)
    base = out / "base"
    if not (base / "unet" / "diffusion_pytorch_model.safetensors").exists() or not (base / "trained").exists():
        make_base_pipeline(base)
        seconds = train_base(base, base_data, args.base_steps)
        (base / "trained").write_text(json.dumps({"steps": args.base_steps, "seconds": seconds}) + "\n")
        print(f"[base]    trained on the digits 0-6 in {seconds:.0f} s; kept in {base}", flush=True)
    else:
        print(f"[base]    reusing {base}", flush=True)

    config = ImageTrainConfig(model=str(base), data=str(sevens), caption=f"a digit {NAMES[NEW_CLASS]}",
                              out=str(out / "lora"), targets="attention", rank=8, alpha=8, lr=2e-3,
                              max_steps=args.lora_steps, batch_size=32, micro_batch_size=32, eval_fraction=0.1,
                              sample_prompts="|".join(PROMPTS), samples_per_prompt=8, sample_steps=50,
                              save_every=100, log_every=25)
    result = train_image(config)
    print(f"[lora]    {result.trainable_parameters:,} trainable parameters "
          f"({100 * result.trainable_parameters / result.unet_parameters:.2f} % of the UNet), "
          f"{result.steps} steps in {result.seconds:.0f} s; held-out denoising loss of the sevens "
          f"{result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}")

    pipeline = load_pipeline(base)
    from lorakit.files import load_adapter
    from lorakit.training.images import encode_captions

    load_adapter(pipeline.unet, result.adapter)
    states = encode_captions(PROMPTS, pipeline.tokenizer, pipeline.text_encoder, torch.device("cpu"))
    batch = torch.stack([states[p] for p in PROMPTS for _ in range(8)])
    unet = pipeline.unet.eval()
    with disabled(unet):
        before = sample(unet, pipeline.scheduler.config, batch, (1, 8, 8), 0, 50)
    after = sample(unet, pipeline.scheduler.config, batch, (1, 8, 8), 0, 50)
    save_grid(out / "before.png", {"base": before.unflatten(0, (2, 8))}, PROMPTS)
    save_grid(out / "after.png", {"with LoRA": after.unflatten(0, (2, 8))}, PROMPTS)
    print(f"[files]   {out}/before.png, {out}/after.png, {out}/lora/loss.png, {out}/lora/samples.png")


if __name__ == "__main__":
    main()
