"""Write a model directory with random weights from another's config and tokenizer.

For benchmarks on machines that cannot hold or fetch the real weights (a GPU host with
no network): the shapes, tokenizer and chat template are the real model's; only the
weights are random (seeded).

    python bench/random_model.py CONFIG_AND_TOKENIZER_DIR OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.source))
    model.save_pretrained(args.out)
    for path in Path(args.source).iterdir():
        if path.is_file() and path.name not in ("config.json", "generation_config.json") \
                and not path.name.endswith(".safetensors"):
            shutil.copy(path, Path(args.out) / path.name)


if __name__ == "__main__":
    main()
