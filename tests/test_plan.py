"""The memory planner (plan.py): the seeds' cases, its parts, and its estimate against measured peaks."""

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.plan import GPU_OVERHEAD_BYTES, NF4_BYTES_PER_WEIGHT, parse_size, plan

GiB = 2**30
BENCH = Path(__file__).parent.parent / "bench" / "bench_plan.py"
sys.path.insert(0, str(BENCH.parent))
from bench_plan import fresh_process_bytes  # noqa: E402


def test_qwen2_0_5b_rank_24_full_against_lora():
    full, lora = (plan("qwen2-0.5b", method, rank=24) for method in ("full", "lora"))
    assert lora.trainable_params == 13_197_312  # all linear layers of all 24 blocks
    assert full.trainable_params == 494_032_768
    assert full.gradients_bytes == full.weights_bytes == 2 * 494_032_768  # bf16
    assert full.optimizer_bytes == 2 * full.weights_bytes  # two bf16 moments
    assert lora.optimizer_bytes == 8 * 13_197_312  # two float32 moments
    assert lora.peak_bytes < 0.6 * full.peak_bytes


def test_a_7b_model_on_a_24_gib_gpu():
    def fits(method, checkpointing):
        return plan("llama-2-7b", method, seq=2048, checkpointing=checkpointing, gpu_bytes=24 * GiB).fits

    assert not fits("full", True)  # weights, gradients and AdamW alone are 50 GiB
    assert fits("lora", True) and not fits("lora", False)  # bf16 LoRA fits only with checkpointing
    assert fits("qlora", True) and fits("qlora", False)


def test_fits_leaves_room_for_the_cuda_context():
    peak = plan("smollm2-135m", "lora").peak_bytes
    assert plan("smollm2-135m", "lora", gpu_bytes=peak + GPU_OVERHEAD_BYTES).fits
    assert not plan("smollm2-135m", "lora", gpu_bytes=peak + GPU_OVERHEAD_BYTES - 1).fits


def test_nf4_weights_of_a_7b_model_are_under_0_3_of_bf16():
    qlora, lora = plan("llama-2-7b", "qlora"), plan("llama-2-7b", "lora")
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert NF4_BYTES_PER_WEIGHT / 2 <= 0.30
    other = lora.weights_bytes - 2 * linear  # embeddings, head and norms stay bf16
    assert qlora.weights_bytes == round(linear * NF4_BYTES_PER_WEIGHT) + other
    assert 0.25 < qlora.weights_bytes / lora.weights_bytes < 0.30  # the whole model


def test_activations_grow_with_tokens_and_checkpointing_keeps_one_block():
    short, long = (plan("smollm2-135m", "lora", batch=2, seq=seq) for seq in (128, 256))
    ratio = long.activations_without_checkpointing_bytes / short.activations_without_checkpointing_bytes
    assert 1.9 < ratio < 2.1  # SDPA stores no (seq x seq) matrix
    assert long.activations_with_checkpointing_bytes < 0.15 * long.activations_without_checkpointing_bytes
    # a bf16 base keeps bf16 activations: about half of the float32 model's
    half = plan("smollm2-135m", "lora", batch=2, seq=256, dtype=torch.bfloat16)
    full = plan("smollm2-135m", "lora", batch=2, seq=256, dtype=torch.float32)
    assert half.activations_bytes < 0.75 * full.activations_bytes


def measured_peak(method: str, checkpointing: bool) -> int:
    return fresh_process_bytes(str(BENCH), "--one", f"{method},{int(checkpointing)}", "--batch", "2", "--seq", "256")


@pytest.mark.parametrize("method, checkpointing", [("lora", False), ("qlora", True)])
def test_planned_peak_is_within_20_percent_of_the_measured_one(method, checkpointing):
    """Two of bench/bench_plan.py's runs, on SmolLM2-135M's shapes (the others: test-slow)."""
    dtype = torch.bfloat16 if method == "qlora" else torch.float32
    planned = plan("smollm2-135m", method, 16, 2, 256, dtype, checkpointing).peak_bytes
    assert 0.8 <= planned / measured_peak(method, checkpointing) <= 1.2


@pytest.mark.slow
@pytest.mark.parametrize("method, checkpointing", [("full", False), ("full", True), ("lora", True), ("qlora", False)])
def test_planned_peak_is_within_20_percent_of_the_measured_one_slow(method, checkpointing):
    test_planned_peak_is_within_20_percent_of_the_measured_one(method, checkpointing)


def test_cli_prints_a_table_and_json_with_fits():
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "llama-2-7b", "--seq", "2048", "--gpu", "24GiB", "--gradient-checkpointing"])
    assert result.exit_code == 0, result.output
    assert "qlora r=16" in result.output and "fits" in result.output
    result = runner.invoke(app, ["plan", "qwen2-0.5b", "--rank", "24", "--method", "full", "--method", "lora",
                                 "--gpu", "24GB", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["method"] for row in rows] == ["full", "lora"]
    for row in rows:
        assert isinstance(row["peak_bytes"], int) and row["fits"] is True
        parts = ("weights", "adapter", "gradients", "optimizer", "activations", "logits")
        assert row["peak_bytes"] == sum(row[f"{part}_bytes"] for part in parts)


@pytest.mark.parametrize("args, message", [
    (["--method", "half"], "--method 'half': choose among full, lora, qlora"),
    (["--gpu", "lots"], "cannot read 'lots' as a memory size"),
    (["--batch", "0"], "batch and seq must be >= 1"),
])
def test_cli_bad_input_is_a_clear_error(args, message):
    result = CliRunner().invoke(app, ["plan", "smollm2-135m", *args])
    assert result.exit_code == 2 and message in result.output


def test_sizes_read_as_gpu_memory_is_sold():
    assert parse_size("24GiB") == parse_size("24 GB") == 24 * GiB
    assert parse_size("512MiB") == 512 * 2**20
    with pytest.raises(ValueError):
        parse_size("24")


def test_dpo_plans_two_sequences_per_pair_and_grpo_the_rollout_cache():
    from lorakit.plan import plan

    lora, dpo = plan("smollm2-135m", "lora", batch=4, seq=64), plan("smollm2-135m", "dpo", batch=2, seq=64)
    assert dpo.activations_bytes == lora.activations_bytes  # 2 pairs = 4 sequences
    grpo = plan("smollm2-135m", "grpo", batch=4, seq=64, rollouts=512)
    # SmolLM2-135M: 30 layers, 3 key/value heads of 64, bfloat16
    assert grpo.kv_cache_bytes == 2 * 30 * 512 * 64 * 3 * 64 * 2
    fixed = grpo.weights_bytes + grpo.adapter_bytes + grpo.gradients_bytes + grpo.optimizer_bytes
    assert grpo.peak_bytes == fixed + max(grpo.activations_bytes + grpo.logits_bytes, grpo.kv_cache_bytes)
    assert plan("smollm2-135m", "grpo", batch=4, seq=64).peak_bytes == lora.peak_bytes  # a small cache hides
