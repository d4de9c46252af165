"""The rank table of docs/cli.md: LoRA parameters of one 4096 x 4096 linear layer per rank.

    python bench/rank_table.py
"""

from lorakit import LoraConfig
from lorakit.report import inspect_model

print("| rank | trainable params | % of the 16,777,216 weights | adapter (fp32) |")
print("|---:|---:|---:|---:|")
for rank in (4, 8, 16, 64):
    report = inspect_model("linear:4096x4096", LoraConfig(rank=rank, alpha=2 * rank))
    share = 100 * report.trainable_params / report.base_params
    print(f"| {rank} | {report.trainable_params:,} | {share:.2f} % | {report.adapter_bytes_fp32 // 1024:,} KiB |")
