"""Tiny diffusers / CLIP models with random weights, built from configs (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def tiny_unet(seed: int = 0, channels: int = 4) -> nn.Module:
    """A UNet2DConditionModel with cross-attention, 3x3/1x1 convs, down/upsamplers (~0.8M parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=channels, out_channels=channels, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def tiny_dit(seed: int = 0) -> nn.Module:
    """An SD3Transformer2DModel (MMDiT, joint attention with context projections)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4).eval()


def tiny_clip(seed: int = 0) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1)).eval()


def unet_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 7, 32, generator=generator))


def dit_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 4, 16, 16, generator=generator),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=generator),
            "pooled_projections": torch.randn(2, 16, generator=generator), "timestep": torch.tensor([3, 700])}


def tiny_tokenizer(directory: Path):
    """A CLIPTokenizer over a few letters, written to ``directory`` (BPE vocab + merges)."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in letters:
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


def tiny_pipeline(directory: Path):
    """A StableDiffusionPipeline of tiny random parts: what ``load_lora_weights`` works on."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, sample_size=16)
    return StableDiffusionPipeline(vae=vae, text_encoder=tiny_clip(), tokenizer=tiny_tokenizer(directory),
                                   unet=tiny_unet(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def pipeline_outputs(pipe) -> dict[str, torch.Tensor]:
    """What a LoRA changes in a pipeline: the UNet's noise prediction and the text encoder's states."""
    with torch.no_grad():
        return {"unet": pipe.unet(*unet_inputs()).sample,
                "text_encoder": pipe.text_encoder(torch.tensor([[0, 5, 9, 2, 1]])).last_hidden_state}


def pipeline_folder(directory: Path, prediction: str = "epsilon") -> Path:
    """A diffusers pipeline folder for pixel-space training: a one-channel 16x16 UNet, a DDPM
    scheduler, a tiny CLIP text encoder and its tokenizer."""
    from diffusers import DDPMScheduler

    tiny_unet(channels=1).save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=100, prediction_type=prediction).save_pretrained(directory / "scheduler")
    tiny_clip().save_pretrained(directory / "text_encoder")
    tiny_tokenizer(directory / "tokenizer").save_pretrained(directory / "tokenizer")
    return directory


def image_folder(directory: Path, count: int = 10, seed: int = 0) -> Path:
    """``count`` 20x20 grey PNGs of a bright square at random places, half captioned by a .txt."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.zeros((20, 20), dtype=np.uint8)
        x, y = rng.integers(0, 12, size=2)
        pixels[y:y + 8, x:x + 8] = 255
        Image.fromarray(pixels).save(directory / f"{i:03d}.png")
        if i % 2:
            (directory / f"{i:03d}.txt").write_text("a square")
    return directory
