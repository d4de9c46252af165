"""`lorakit train` (YAML + flags, errors before training) and `lorakit merge`."""

import json
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.training import TrainConfig
from lorakit.config import ConfigError

runner = CliRunner()


def test_flags_override_the_yaml_and_the_resolved_config_is_written(tiny_lm_dir, tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text(yaml.safe_dump({"model": str(tiny_lm_dir), "rank": 2, "alpha": 4, "lr": "1e-3",
                                        "max_steps": 3, "batch_size": 4, "micro_batch_size": 2,
                                        "targets": ["q_proj", "v_proj"]}))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(settings), "--rank", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["rank"] == 4 and resolved["alpha"] == 4 and resolved["lr"] == 1e-3
    assert resolved["targets"] == ["q_proj", "v_proj"]
    assert "held-out loss" in result.output and "adapter" in result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("lines, message", [
    (["{\"text\": \"hej\"}", "{oops"], r"data\.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes at column 2"),
    (["{\"messages\": [{\"role\": \"user\", \"content\": \"hej\"}]}"], r"data\.jsonl:1: no trainable token"),
    ([""], r"data\.jsonl: no examples"),
])
def test_bad_data_fails_before_training_with_file_and_line(tiny_lm_dir, tmp_path, lines, message):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(tiny_lm_dir), "--data", str(data), "--out", str(out)])
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split()))
    assert not out.exists()  # nothing started


@pytest.mark.parametrize("text, message", [
    ("rank: 4\nrnak: 8\n", r"unknown setting\(s\) \['rnak'\]"),
    ("rank: [1\n", r"invalid YAML at line 2"),
    ("rank: 0\n", r"rank must be >= 1"),
    ("lr: fast\n", r"lr must be a number, got 'fast'"),
    ("batch_size: 6\nmicro_batch_size: 4\n", r"batch_size 6 is not a multiple of micro_batch_size 4"),
])
def test_bad_settings_are_named(tmp_path, text, message):
    settings = tmp_path / "run.yaml"
    settings.write_text(text)
    result = runner.invoke(app, ["train", "--config", str(settings), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split())), result.output


def test_config_round_trips_through_yaml():
    config = TrainConfig(targets=("q_proj", "v_proj"), loraplus_ratio=16.0, max_grad_norm=None)
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="schedule must be one of"):
        TrainConfig(schedule="step")


def test_merge_writes_a_model_that_transformers_loads(tiny_lm_dir, tmp_path):
    from conftest import randomize_adapters
    from transformers import AutoModelForCausalLM

    model = lorakit.load_model(str(tiny_lm_dir))
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    result = runner.invoke(app, ["merge", str(tiny_lm_dir), str(tmp_path / "adapter"), "--out",
                                 str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    ids = torch.tensor([[3, 17, 40, 8, 99]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, lorakit.load_model(str(tiny_lm_dir))(ids).logits)
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_merge_refuses_an_adapter_that_does_not_fit(tiny_lm_dir, tmp_path):
    result = runner.invoke(app, ["merge", str(tiny_lm_dir), str(tmp_path / "nothing"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "not an adapter directory" in " ".join(result.output.split())
    assert not (tmp_path / "m").exists()


def test_every_setting_is_a_flag_and_a_yaml_key_with_its_default_in_help():
    import dataclasses

    import typer.main

    command = typer.main.get_command(app).commands["train"]
    flags = {p.name for p in command.params} - {"config", "resume", "help"}
    yaml_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    assert flags == yaml_keys
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert result.exit_code == 0
    help_text = " ".join(result.output.split())
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        shown = ("none" if default in (None, ()) else f"{flag[2:]}" if default is True else
                 f"no-{flag[2:]}" if default is False else str(default))
        assert re.search(re.escape(flag) + r" .*?\[default: \(?" + re.escape(shown) + r"\)?\]", help_text), flag


def test_settings_that_were_yaml_only_are_flags_too(tiny_lm_dir, tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text(yaml.safe_dump({"max_grad_norm": 0.5, "weight_decay": 0.3}))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(settings), "--model", str(tiny_lm_dir), "--out", str(out),
                                 "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "2",
                                 "--dtype", "float32", "--weight-decay", "0.01", "--min-lr-ratio", "0.1",
                                 "--keep-checkpoints", "1", "--max-grad-norm", "none", "--save-every", "1"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["weight_decay"], resolved["min_lr_ratio"], resolved["keep_checkpoints"],
            resolved["max_grad_norm"], resolved["dtype"]) == (0.01, 0.1, 1, None, "float32")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    bad = runner.invoke(app, ["train", "--max-steps", "many"])
    assert bad.exit_code == 2 and "expected a int or 'none', got 'many'" in bad.output


def _cli(*args, cwd=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "COLUMNS": "80"})


def test_data_errors_come_before_the_model_loads_and_are_never_wrapped(tmp_path):
    """A bad last line of a 100,000-line file is reported although the model spec could
    not load: the data is checked first. Output to a pipe is not wrapped at 80 columns."""
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "for-the-data"
    deep.mkdir(parents=True)
    data = deep / "data.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n' * 99_999 + '{"prompt": "p", "completion": "c", "x": 1}\n')
    result = _cli("train", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--out",
                  str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert f"error: {data}:100000: unknown key(s) ['x'] in a prompt-completion example (expected exactly " \
           "['completion', 'prompt'])" in lines
    assert not (tmp_path / "run").exists()


def test_a_finished_run_says_so(tiny_lm_dir, tmp_path):
    args = ["train", "--model", str(tiny_lm_dir), "--out", str(tmp_path / "run"), "--max-steps", "2",
            "--batch-size", "2", "--micro-batch-size", "2"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 0
    text = " ".join(again.output.split())
    assert "holds a finished run (2 steps); nothing was changed" in text and "held-out loss" in text


def test_a_run_refused_after_the_data_check_leaves_no_output_directory(tiny_lm_dir, tmp_path):
    """Targets that match no module are found once the model is loaded, after the run
    directory is locked: the directory the run made is removed again."""
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(tiny_lm_dir), "--out", str(out), "--targets",
                                 "no_such_module", "--max-steps", "1"])
    assert result.exit_code != 0
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # a directory the user made stays, even empty
    runner.invoke(app, ["train", "--model", str(tiny_lm_dir), "--out", str(kept), "--targets", "no_such_module"])
    assert kept.exists()
