"""Cost of LoRA on fused MoE experts: one Qwen3-MoE sparse block (router + experts), forward.

Variants, interleaved in one process on the same tokens (bench_core's ``interleaved``):

- base: the block as transformers runs it in a loaded model (its default experts kernel,
  ``grouped_mm``), and with its eager per-expert loop;
- lorakit, no adapter: the block with lorakit's experts module, adapter inactive;
- lorakit unmerged: a rank-r adapter on gate_up_proj and down_proj of every expert, unmerged;
- lorakit merged: the same adapter merged into the expert tensors;
- PEFT unmerged: PEFT's ``target_parameters`` on the same tensors (its parametrization adds
  ΔW to every expert's weight each forward).

Shapes: a Qwen3-30B-A3B block scaled down (hidden 512, expert width 192, 32 experts, 4 per
token), 2 x 256 tokens, rank 16; every one can be changed.

    python bench/bench_experts.py [--rounds 9] [--hidden 512] [--expert-width 192] [--experts 32]
                                  [--top-k 4] [--tokens 512] [--rank 16]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import interleaved, table  # noqa: E402


def build_block(hidden: int, width: int, experts: int, top_k: int, seed: int = 0):
    """One sparse MoE block of a Qwen3-MoE model built from its config, so that its experts
    run the kernel transformers picks for a loaded model (``config._experts_implementation``)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=hidden, moe_intermediate_size=width, num_experts=experts,
                            num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=hidden // 8, initializer_range=0.02)
    return Qwen3MoeForCausalLM(config).eval().model.layers[0].mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert-width", type=int, default=192)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import peft

    import lorakit

    base = build_block(args.hidden, args.expert_width, args.experts, args.top_k)
    x = torch.randn(2, args.tokens // 2, args.hidden)
    config = lorakit.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=["experts"])

    def adapted(merged: bool):
        block = copy.deepcopy(base)
        lorakit.attach(block, config)
        with torch.no_grad():
            for name, p in block.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        if merged:
            lorakit.merge(block)
        return block

    unmerged, merged = adapted(False), adapted(True)
    idle = adapted(False)
    lorakit.set_active(idle, [])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"], init_lora_weights=False)).eval()

    def run(module):
        def call() -> None:
            with torch.inference_mode():
                module(x)
        return call

    eager = copy.deepcopy(base)
    eager.experts.config = copy.copy(eager.experts.config)
    eager.experts.config._experts_implementation = "eager"
    kernel = base.experts.config._experts_implementation
    variants = {"base": run(base), "base, eager experts": run(eager), "lorakit, no adapter": run(idle), "lorakit unmerged": run(unmerged),
                "lorakit merged": run(merged), "PEFT unmerged": run(theirs)}
    medians = interleaved(variants, args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; base experts kernel {kernel}; hidden {args.hidden}, expert width "
          f"{args.expert_width}, {args.experts} experts, top-{args.top_k}, {args.tokens} tokens, rank {args.rank}; "
          f"median of {args.rounds} interleaved rounds\n")
    print(table("MoE block forward", medians, "base"))


if __name__ == "__main__":
    main()
