import json

import pytest
from typer.testing import CliRunner

from lorakit.cli import app

runner = CliRunner()


def run_json(*args: str) -> dict:
    result = runner.invoke(app, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_inspect_qwen2_reproduces_the_quoted_figures():
    report = run_json("qwen2-0.5b", "--rank", "24", "--targets", "all-linear")
    assert report["base_params"] == 494_032_768
    assert report["trainable_params"] == 13_197_312
    assert round(report["trainable_percent"], 2) == 2.60
    assert report["by_type"]["q_proj"] == {"modules": 24, "params": 24 * 24 * (896 + 896)}
    assert report["adapter_bytes_fp32"] == 4 * 13_197_312
    assert report["memory_lora_bytes"] < report["memory_full_bytes"]


@pytest.mark.parametrize("rank, expected", [(4, 32_768), (8, 65_536), (16, 131_072), (64, 524_288)])
def test_inspect_single_4096_linear(rank, expected):
    assert run_json("linear:4096x4096", "--rank", str(rank))["trainable_params"] == expected


def test_inspect_table_and_targets_list():
    result = runner.invoke(app, ["inspect", "llama-2-7b", "--rank", "8", "--targets", "q_proj,v_proj"])
    assert result.exit_code == 0, result.output
    assert "q_proj" in result.output and "gate_proj" not in result.output
    assert "4,194,304" in result.output  # 32 layers * 2 modules * 8 * (4096 + 4096)
    assert "6,738,415,616" in result.output


def test_inspect_config_json(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4).save_pretrained(tmp_path)
    report = run_json(str(tmp_path / "config.json"), "--rank", "2", "--targets", "re:.*q_proj")
    assert report["trainable_params"] == 2 * 2 * (64 + 64)


@pytest.mark.parametrize("args, message", [
    (["no-such-model", "--rank", "4"], "is not a model lorakit can load"),
    (["qwen2-0.5b", "--rank", "0"], "rank must be an integer >= 1"),
    (["qwen2-0.5b", "--rank", "4", "--targets", "nope"], "matched no module"),
    (["qwen2-0.5b", "--rank", "4", "--dtype", "fp8"], "expected one of"),
])
def test_inspect_errors_are_one_clear_line(args, message):
    result = runner.invoke(app, ["inspect", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


@pytest.mark.parametrize("loop, message", [("bogus", "--loop must be asyncio or uvloop"),
                                           ("uvloop", "needs the packages uvloop and httptools")])
def test_serve_refuses_an_event_loop_it_cannot_run_before_loading(loop, message):
    import importlib.util

    if loop == "uvloop" and importlib.util.find_spec("uvloop") and importlib.util.find_spec("httptools"):
        pytest.skip("uvloop and httptools are installed here")
    result = runner.invoke(app, ["serve", "no-such-model", "--loop", loop])
    assert result.exit_code == 2 and message in result.output
