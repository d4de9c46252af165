"""Training-step cost and peak memory of LoRA vs full fine-tuning of one diffusers UNet.

The UNet has Stable Diffusion 1.5's layout at a smaller width (4 latent channels, 32x32
latents, as for 256x256 images; block widths 128-256-512-512, two layers per block,
cross-attention to 77 text states of width 384; random weights, float32). Every variant
runs lorakit's training step (``training.diffusion.DenoisingLoss`` through
``training.loop.accumulate``: the noise-prediction loss, backward, AdamW) on the same
batch with the same noise. LoRA variants: r=16 (alpha 16) on the "attention" targets
(to_q/k/v/out.0, what diffusers' DreamBooth-LoRA trains) and on "attention-conv"
(plus the resnets' and resamplers' convolutions, kohya's LoCon); PEFT's LoRA on the
attention targets for reference. Steps are interleaved in one process, every round in
rotating order, median over rounds; peak resident memory is measured in a fresh process
per variant (model + 3 steps).

    python bench/bench_image_train.py [--rounds 5] [--batch 2]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import interleaved, table  # noqa: E402

RANK = 16


WIDTH = 128  # SD 1.5's is 320


def build(width: int = WIDTH):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=384, attention_head_dim=8, norm_num_groups=32).train()


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def make_batch(size: int):
    from lorakit.training.diffusion import make_batch as batch_of

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(size, 4, 32, 32, generator=generator)
    states = torch.randn(size, 77, 384, generator=generator)
    return batch_of(latents, states, list(range(size)), seed=0, step=0, timesteps=1000)


def step(unet, batch, targets: str | None, peft_targets: bool = False):
    """A closure running one training step of ``unet`` (its adapter attached first)."""
    import lorakit
    from lorakit.training.diffusion import DenoisingLoss
    from lorakit.training.loop import accumulate

    if targets is not None and not peft_targets:
        lorakit.attach(unet, lorakit.LoraConfig(rank=RANK, alpha=RANK, targets=targets))
    if peft_targets:
        import peft

        from lorakit.config import TARGET_SETS

        unet = peft.get_peft_model(unet, peft.LoraConfig(r=RANK, lora_alpha=RANK,
                                                         target_modules=list(TARGET_SETS[targets])))
    runner = DenoisingLoss(unet, scheduler())
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5)

    def call():
        accumulate(runner, [batch], len(batch.latents), 1, nullcontext())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return call


VARIANTS = {
    "full fine-tuning": dict(targets=None),
    "lorakit LoRA, attention": dict(targets="attention"),
    "lorakit LoRA, attention-conv": dict(targets="attention-conv"),
    "peft LoRA, attention": dict(targets="attention", peft_targets=True),
}


def peak_rss(variant: str, batch: int, steps: int = 3) -> int:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_image_train as b; "
            f"b.memory_run({variant!r}, {batch}, {steps})")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def memory_run(variant: str, batch: int, steps: int) -> None:
    call = step(build(), make_batch(batch), **VARIANTS[variant])
    for _ in range(steps):
        call()
    from lorakit.training.loop import peak_memory

    print(peak_memory(torch.device("cpu")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()

    batch = make_batch(args.batch)
    base = build()
    total = sum(p.numel() for p in base.parameters())
    steps, trainable = {}, {}
    for name, kwargs in VARIANTS.items():
        unet = copy.deepcopy(base)
        steps[name] = step(unet, batch, **kwargs)
        trainable[name] = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    del base, unet
    print(f"UNet2DConditionModel, SD-1.5 layout at widths 128-256-512-512 ({total / 1e6:.1f}M parameters, random "
          f"weights, fp32); batch of {args.batch} 4x32x32 latents, 77x384 text states; LoRA r={RANK}; "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; median of {args.rounds} interleaved rounds\n")
    medians = interleaved(steps, args.rounds, warmup=1)
    print(table("Training step (noise-prediction loss, backward, AdamW)", medians, "full fine-tuning"))
    del steps

    print("\n### Peak resident memory (fresh process each, model + 3 steps)\n")
    print("| variant | trainable parameters | peak RSS MiB | ratio to full fine-tuning |\n|---|---:|---:|---:|")
    memory = {name: peak_rss(name, args.batch) for name in VARIANTS}
    for name, size in memory.items():
        count = trainable[name]
        print(f"| {name} | {count:,} ({100 * count / total:.2f} %) | {size / 2**20:,.0f} | "
              f"{size / memory['full fine-tuning']:.3f} |")


if __name__ == "__main__":
    main()
