import pytest
import torch

import lorakit
from lorakit.pretrained import ModelSpecError, build_meta, default_gguf, load_config

from conftest import token_batch, tiny_llama


@pytest.mark.parametrize("preset, params", [
    ("qwen2-0.5b", 494_032_768),
    ("llama-3.2-1b", 1_235_814_400),
    ("llama-2-7b", 6_738_415_616),
    ("smollm2-135m", 134_515_008),
])
def test_presets_have_the_published_parameter_counts(preset, params):
    model = build_meta(preset)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == params


def test_presets_load_on_the_meta_device():
    model = lorakit.load_model("llama-3.2-1b")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_local_model_directory_loads_with_its_weights(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    loaded = lorakit.load_model(str(tmp_path))
    x = token_batch(97)
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert load_config(str(tmp_path)).hidden_size == 32


def test_unknown_spec_names_what_is_accepted(tmp_path):
    with pytest.raises(ModelSpecError, match="local model directory .* '.gguf' file|.gguf file"):
        lorakit.load_model(str(tmp_path / "missing"))


@pytest.mark.slow
def test_embedded_default_model_loads_and_answers(tmp_path, monkeypatch):
    """GGUF -> float32 safetensors cache -> a model that answers (about a minute on 2 cores)."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    model, tokenizer = lorakit.load_model("smollm2-135m"), lorakit.load_tokenizer("smollm2-135m")
    assert (tmp_path / "smollm2-135m" / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
    # the GGUF file itself is a spec too, and gives the same weights as the cached copy
    from_gguf = lorakit.load_model(str(default_gguf()))
    x = token_batch(100)
    assert torch.equal(from_gguf(x).logits, model(x).logits)


def test_adapter_files_name_the_base_as_the_user_gave_it(tmp_path, monkeypatch, capfd):
    """Not the resolved cache path, which does not exist on other machines; and no
    progress bar for a load from local disk."""
    import json

    tiny_llama().save_pretrained(tmp_path / "cache")
    monkeypatch.setattr("lorakit.pretrained._cached_default", lambda: tmp_path / "cache")
    for spec in ("smollm2-135m", str(tmp_path / "cache")):
        model = lorakit.load_model(spec)
        lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4))
        saved = lorakit.save_adapter(model, tmp_path / "adapter")
        assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == spec
    assert "Loading weights" not in capfd.readouterr().err
