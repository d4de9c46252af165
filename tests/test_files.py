"""PEFT-format files: round trips, the pinned format, bad files, atomic saves."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
import lorakit.files
from lorakit import AdapterFileError, AttachError, LoraConfig

from conftest import MODELS, assert_unchanged, randomize_adapters, snapshot, token_batch


@pytest.fixture
def saved(tmp_path):
    """A llama model with a random q/v adapter, saved to tmp_path / "adapter"."""
    model = MODELS["llama"]()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    randomize_adapters(model)
    return model, lorakit.save_adapter(model, tmp_path / "adapter")


def test_round_trip_restores_identical_tensors_and_logits(saved):
    model, directory = saved
    fresh = MODELS["llama"]()
    assert lorakit.load_adapter(fresh, directory) == "default"
    x = token_batch(97)
    assert torch.equal(fresh(x).logits, model(x).logits)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_file_format_is_pinned(saved):
    _, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(directory / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (32, 4),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": (2, 32),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": (16, 2),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": (4, 32),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": (32, 4),
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": (2, 32),
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": (16, 2),
    }
    config = json.loads((directory / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "rank_pattern",
                                   "alpha_pattern", "use_rslora", "bias", "use_dora", "fan_in_fan_out")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}, "alpha_pattern": {},
        "use_rslora": False, "bias": "none", "use_dora": False, "fan_in_fan_out": False,
    }


def test_all_linear_is_saved_expanded_to_module_paths(tmp_path):
    model = MODELS["gpt2"]()
    paths = lorakit.attach(model, LoraConfig(rank=2, alpha=4))
    config = json.loads((lorakit.save_adapter(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(paths)
    assert config["fan_in_fan_out"] is True


def test_second_load_without_name_is_named_after_its_directory(saved, tmp_path):
    model, directory = saved
    lorakit.save_adapter(model, tmp_path / "my-task")
    fresh = MODELS["llama"]()
    assert lorakit.load_adapter(fresh, directory) == "default"
    assert lorakit.load_adapter(fresh, tmp_path / "my-task") == "my_task"
    assert lorakit.adapters(fresh) == ["default", "my_task"]


def test_modules_to_save_round_trip(tmp_path):
    model = MODELS["llama"]()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=["q_proj"], modules_to_save=["lm_head"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    directory = lorakit.save_adapter(model, tmp_path / "a")
    assert "base_model.model.lm_head.weight" in load_file(directory / "adapter_model.safetensors")
    fresh = MODELS["llama"]()
    lorakit.load_adapter(fresh, directory)
    x = token_batch(97)
    assert torch.equal(fresh(x).logits, model(x).logits)


# -- bad files: a clear error and an untouched model ---------------------------------
def _rewrite_tensors(directory: Path, change) -> None:
    tensors = load_file(directory / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, directory / "adapter_model.safetensors")


def _rewrite_config(directory: Path, change) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    change(config)
    (directory / "adapter_config.json").write_text(json.dumps(config))


Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

BAD_FILES = {
    "missing key": (lambda d: _rewrite_tensors(d, lambda t: t.pop(Q0A)),
                    r"model\.layers\.0\.self_attn\.q_proj: missing key " + Q0A.replace(".", r"\.")),
    "unexpected key": (lambda d: _rewrite_tensors(d, lambda t: t.update({"base_model.model.extra.lora_A.weight": torch.ones(1)})),
                       r"unexpected key base_model\.model\.extra\.lora_A\.weight"),
    "wrong shape": (lambda d: _rewrite_tensors(d, lambda t: t.update({Q0A: torch.ones(4, 31)})),
                    r"q_proj: .* has shape \(4, 31\), expected \(4, 32\)"),
    "rank differs from config": (lambda d: _rewrite_config(d, lambda c: c.update(r=8, rank_pattern={})),
                                 r"has shape \(4, 32\), expected \(8, 32\)"),
    "wrong dtype": (lambda d: _rewrite_tensors(d, lambda t: t.update({Q0A: torch.ones(4, 32, dtype=torch.int64)})),
                    r"dtype torch\.int64, expected a floating-point tensor"),
    "truncated weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-100]), r"not a readable safetensors file"),
    "garbage weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
                        r"not a readable safetensors file"),
    "corrupt json": (lambda d: (d / "adapter_config.json").write_text('{"r": 4,\n "lora_alpha": }'),
                     r"adapter_config\.json: invalid JSON at line 2, column 16"),
    "missing config": (lambda d: (d / "adapter_config.json").unlink(), r"adapter_config\.json: missing"),
    "dora": (lambda d: _rewrite_config(d, lambda c: c.update(use_dora=True)), r"lora_magnitude_vector"),
    "not lora": (lambda d: _rewrite_config(d, lambda c: c.update(peft_type="IA3")), r"peft_type is 'IA3', lorakit reads 'LORA', 'LOHA', 'LOKR' adapters"),
    "bad rank": (lambda d: _rewrite_config(d, lambda c: c.update(r=0)), r"invalid LoRA config: rank must be"),
    "pickled weights": (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"),
                        r"adapter_model\.bin: pickled weights are never loaded"),
    "targets absent from model": (lambda d: _rewrite_config(d, lambda c: c.update(target_modules=["c_attn"])),
                                  r"does not fit this model: targets .* matched no module"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_adapter_files_raise_clear_errors_and_change_nothing(saved, tmp_path, case):
    _, directory = saved
    damage, message = BAD_FILES[case]
    damage(directory)
    model = MODELS["llama"]()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=["k_proj"]), name="existing")
    randomize_adapters(model, "existing")
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=message) as error:
        lorakit.load_adapter(model, directory, name="new")
    assert str(directory) in str(error.value)
    assert_unchanged(model, before)


def test_loading_under_a_used_name_changes_nothing(saved):
    _, directory = saved
    model = MODELS["llama"]()
    lorakit.load_adapter(model, directory, name="x")
    before = snapshot(model)
    with pytest.raises(AttachError, match="already used"):
        lorakit.load_adapter(model, directory, name="x")
    assert_unchanged(model, before)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(AdapterFileError, match="not an adapter directory"):
        lorakit.load_adapter(MODELS["llama"](), tmp_path / "nowhere")


# -- atomic saves ---------------------------------------------------------------------
def test_crash_while_saving_leaves_no_partial_adapter(saved, tmp_path, monkeypatch):
    model, _ = saved

    def crash(*args, **kwargs):
        raise OSError("disk vanished")

    monkeypatch.setattr(lorakit.files.os, "replace", crash)
    with pytest.raises(OSError, match="disk vanished"):
        lorakit.save_adapter(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_crash_while_overwriting_keeps_the_old_adapter(saved, tmp_path, monkeypatch):
    model, directory = saved
    old_bytes = (directory / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model, seed=9)
    monkeypatch.setattr(lorakit.files, "safetensors_bytes", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        lorakit.save_adapter(model, directory)
    assert (directory / "adapter_model.safetensors").read_bytes() == old_bytes
    monkeypatch.undo()
    lorakit.save_adapter(model, directory)  # a real overwrite replaces it whole
    assert (directory / "adapter_model.safetensors").read_bytes() != old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_saving_over_a_file_is_refused(saved, tmp_path):
    model, _ = saved
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterFileError, match="is not a directory"):
        lorakit.save_adapter(model, tmp_path / "file")


def test_load_adapter_with_dropout_is_deterministic_until_the_model_trains(tmp_path):
    model = MODELS["llama"]()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, dropout=0.5, targets="all-linear"))
    randomize_adapters(model)
    directory = lorakit.save_adapter(model, tmp_path / "adapter")

    fresh = MODELS["llama"]()  # built in eval mode, as a loaded model is
    lorakit.load_adapter(fresh, directory)
    assert not any(m.training for m in fresh.modules())
    x = token_batch(97)
    assert torch.equal(fresh(x).logits, fresh(x).logits)
    fresh.train()
    torch.manual_seed(0)
    first = fresh(x).logits
    assert not torch.equal(first, fresh(x).logits)  # dropout is on once the model trains


def test_saved_directories_follow_the_umask_like_any_other_file(tmp_path):
    import os

    model = MODELS["llama"]()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4))
    previous = os.umask(0o022)
    try:
        directory = lorakit.save_adapter(model, tmp_path / "adapter")
        lorakit.save_adapter(model, directory)  # replacing an existing adapter too
    finally:
        os.umask(previous)
    assert directory.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in directory.iterdir()} == {0o644}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
