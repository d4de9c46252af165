"""GGUF for llama.cpp and Ollama, checked inside llama.cpp (the prebuilt ``xllamacpp`` wheel):
the next-token top-5 log-probabilities llama.cpp computes from files lorakit wrote equal
lorakit's own within 0.01 (top-1 identical), and the adapter moves them at least 20 times
that from the base's, for a plain LoRA, an rsLoRA, per-module ranks and alphas, a PiSSA
adapter and a merged DoRA model, on tiny random Llama, Qwen2 and Qwen3 models."""

import pytest
import torch
from conftest import corpus_tokenizer, randomize_adapters, save_tiny_causal_lm
from typer.testing import CliRunner

import lorakit
from lorakit.attach import lora_layers
from lorakit.formats import AdapterFileError

xllamacpp = pytest.importorskip("xllamacpp")

TOLERANCE = 0.01  # llama.cpp and PyTorch, both float32, differ by a few 1e-3 with no adapter at all


def prompt_for(directory: str, *models) -> list[int]:
    """A prompt after which every model's likeliest token is whole UTF-8 text: llama.cpp holds a
    token that ends inside a character back, and its log-probabilities with it."""
    tokenizer = lorakit.load_tokenizer(directory)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        prompt = torch.randint(3, min(len(tokenizer), 300), (8,), generator=generator).tolist()
        if all("\ufffd" not in tokenizer.decode([int(ours(m, prompt).argmax())]) for m in models):
            return prompt
    raise AssertionError("no prompt found")


def save_tiny_qwen(directory, family: str):
    """A random Qwen2 (q/k/v biases, tied embeddings) or Qwen3 (q/k norms) model with a corpus tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = corpus_tokenizer("swedish")
    torch.manual_seed(1)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.1,
                                  eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def base(request, tmp_path_factory):
    """A tiny model directory and its float32 GGUF, written by lorakit."""
    from lorakit.llamacpp import write_base_gguf

    root = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        directory = save_tiny_causal_lm(root / "model")
    else:
        directory = save_tiny_qwen(root / "model", request.param)
    return str(directory), write_base_gguf(str(directory), root / "base.gguf")


def llama_cpp_top5(prompt, model_path, adapter_path=None) -> dict[int, float]:
    """Token id -> log-probability of llama.cpp's five likeliest next tokens after ``prompt``."""
    params = xllamacpp.CommonParams()
    params.model.path = str(model_path)
    params.n_ctx, params.warmup = 64, False
    params.cpuparams.n_threads = 2
    params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32  # keys and values as PyTorch keeps them
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if adapter_path is not None:
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(adapter_path), 1.0)]
    server = xllamacpp.Server(params)
    reply = server.handle_completions({"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 5,
                                      "ignore_eos": True})
    assert reply["choices"][0]["logprobs"] is not None, reply
    return {t["id"]: t["logprob"] for t in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}


def ours(model, prompt) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)


def assert_agree(theirs: dict[int, float], mine: torch.Tensor) -> None:
    assert max(theirs, key=theirs.get) == int(mine.argmax())  # the same top-1
    for token, logprob in theirs.items():
        assert abs(logprob - float(mine[token])) <= TOLERANCE, (token, logprob, float(mine[token]))


def trained(directory, tmp_path, config, scale=0.3):
    model = lorakit.load_model(directory).eval()
    lorakit.attach(model, config)
    randomize_adapters(model, scale=scale)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            adapter = layer.adapters["default"]
            if hasattr(adapter, "moved_A") and adapter.moved_A is not None:  # PiSSA: keep A, move B away from B0
                adapter.lora_A.copy_(adapter.moved_A)
                adapter.lora_B.add_(adapter.moved_B)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


ADAPTERS = {
    "lora": lorakit.LoraConfig(rank=4, alpha=8, targets="all-linear"),
    "rslora": lorakit.LoraConfig(rank=4, alpha=3, targets="all-linear", use_rslora=True),
    "patterns": lorakit.LoraConfig(rank=4, alpha=8, targets="all-linear", rank_pattern={"q_proj": 6},
                                   alpha_pattern={"down_proj": 3.0}),
    "pissa": lorakit.LoraConfig(rank=4, alpha=4, targets=["q_proj", "k_proj", "v_proj", "down_proj"], init="pissa"),
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_llama_cpp_applies_the_adapter_as_lorakit_does(base, kind, tmp_path):
    from lorakit.llamacpp import export_adapter_gguf

    directory, base_gguf = base
    model, adapter_dir = trained(directory, tmp_path, ADAPTERS[kind])
    path = export_adapter_gguf(adapter_dir, directory, tmp_path / "adapter.gguf")
    original = lorakit.load_model(directory).eval()
    prompt = prompt_for(directory, model, original)
    with_adapter = llama_cpp_top5(prompt, base_gguf, path)
    assert_agree(with_adapter, ours(model, prompt))
    assert_agree(llama_cpp_top5(prompt, base_gguf), ours(original, prompt))
    assert max(abs(with_adapter[t] - float(ours(original, prompt)[t])) for t in with_adapter) >= 20 * TOLERANCE


def test_a_merged_dora_model_runs_in_llama_cpp(base, tmp_path):
    from lorakit.llamacpp import merge_to_gguf

    directory, _ = base
    model, adapter_dir = trained(directory, tmp_path, lorakit.LoraConfig(rank=4, alpha=8, targets="all-linear",
                                                                         variant="dora"))
    path = merge_to_gguf(directory, adapter_dir, tmp_path / "merged.gguf")
    original = lorakit.load_model(directory).eval()
    prompt = prompt_for(directory, model)
    merged = llama_cpp_top5(prompt, path)
    assert_agree(merged, ours(model, prompt))
    assert max(abs(merged[t] - float(ours(original, prompt)[t])) for t in merged) >= 20 * TOLERANCE
    modelfile = path.with_suffix(".Modelfile").read_text()
    assert "FROM ./merged.gguf" in modelfile


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_a_merged_model_in_a_smaller_dtype_runs_in_llama_cpp(base, tmp_path, dtype):
    """Rounded weights: lorakit's top-1 among llama.cpp's top 5, log-probabilities within what the
    dtype's rounding moves them on these small random models."""
    from lorakit.llamacpp import merge_to_gguf

    directory, _ = base
    model, adapter_dir = trained(directory, tmp_path, ADAPTERS["lora"])
    path = merge_to_gguf(directory, adapter_dir, tmp_path / f"merged-{dtype}.gguf", dtype)
    prompt = prompt_for(directory, model)
    theirs, mine = llama_cpp_top5(prompt, path), ours(model, prompt)
    assert int(mine.argmax()) in theirs
    assert max(abs(v - float(mine[t])) for t, v in theirs.items()) <= {"f16": 0.02, "bf16": 0.3, "q8_0": 0.3}[dtype]


def test_an_adapter_round_trips_through_gguf(base, tmp_path):
    from lorakit.llamacpp import export_adapter_gguf, import_adapter_gguf

    directory, _ = base
    _, adapter_dir = trained(directory, tmp_path, ADAPTERS["patterns"])
    path = export_adapter_gguf(adapter_dir, directory, tmp_path / "a.gguf")
    back = lorakit.read_adapter(import_adapter_gguf(path, directory, tmp_path / "back"))
    original = lorakit.read_adapter(adapter_dir)
    assert set(back.layers) == set(original.layers)
    for module, layer in original.layers.items():
        assert back.layers[module].rank == layer.rank
        torch.testing.assert_close(back.layers[module].A, layer.A, rtol=0, atol=0)  # A is never changed
        torch.testing.assert_close(back.layers[module].delta(), layer.delta(), rtol=1e-6, atol=1e-7)
    plain = lorakit.read_adapter(trained(directory, tmp_path / "plain", ADAPTERS["lora"])[1])
    exported = export_adapter_gguf(tmp_path / "plain" / "adapter", directory, tmp_path / "p.gguf")
    again = lorakit.read_adapter(import_adapter_gguf(exported, directory, tmp_path / "p-back"))
    for module, layer in plain.layers.items():  # scaling α / r already llama.cpp's: the same bits
        assert torch.equal(again.layers[module].B, layer.B) and again.layers[module].scaling == layer.scaling


def test_what_llama_cpp_cannot_apply_is_refused_by_name(base, tmp_path):
    from lorakit.llamacpp import export_adapter_gguf

    directory, _ = base
    _, dora = trained(directory, tmp_path / "dora", lorakit.LoraConfig(rank=2, alpha=4, targets=["q_proj"],
                                                                      variant="dora"))
    with pytest.raises(AdapterFileError, match=r"q_proj: a DoRA adapter, .*use lorakit merge --to gguf"):
        export_adapter_gguf(dora, directory, tmp_path / "dora.gguf")
    _, embedding = trained(directory, tmp_path / "emb", lorakit.LoraConfig(rank=2, alpha=4, targets=["embed_tokens"]))
    with pytest.raises(AdapterFileError, match=r"embed_tokens: a trained embedding or output head"):
        export_adapter_gguf(embedding, directory, tmp_path / "emb.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_bad_input_is_refused_in_one_line_and_writes_nothing(base, tmp_path):
    from lorakit.llamacpp import export_adapter_gguf, import_adapter_gguf, merge_to_gguf

    directory, base_gguf = base
    other = save_tiny_causal_lm(tmp_path / "other", hidden=32)
    _, adapter_dir = trained(str(other), tmp_path, ADAPTERS["lora"])
    with pytest.raises(AdapterFileError, match=r"does not fit this model: .*expected") as err:
        export_adapter_gguf(adapter_dir, directory, tmp_path / "x.gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "x.gguf").exists()
    with pytest.raises(AdapterFileError, match="not a LoRA adapter GGUF"):
        import_adapter_gguf(base_gguf, directory, tmp_path / "y")
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(AdapterFileError, match="not a readable GGUF file"):
        import_adapter_gguf(tmp_path / "corrupt.gguf", directory, tmp_path / "z")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    from conftest import tiny_gpt2

    gpt2 = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    with pytest.raises(AdapterFileError, match=r"lorakit writes .*not 'gpt2'"):
        merge_to_gguf(str(gpt2), adapter_dir, tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()


def test_the_command_line_converts_both_ways(base, tmp_path):
    from lorakit.cli import app

    directory, _ = base
    _, adapter_dir = trained(directory, tmp_path, ADAPTERS["lora"])
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(adapter_dir), "--to", "gguf", "--base", directory,
                                 "--out", str(tmp_path / "a.gguf")])
    assert result.exit_code == 0, result.output
    modelfile = (tmp_path / "a.Modelfile").read_text()
    assert "ADAPTER ./a.gguf" in modelfile and "FROM " in modelfile
    result = runner.invoke(app, ["convert", str(tmp_path / "a.gguf"), "--to", "peft", "--base", directory,
                                 "--out", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert set(lorakit.read_adapter(tmp_path / "back").layers) == set(lorakit.read_adapter(adapter_dir).layers)


def test_lorakit_merge_to_gguf_from_the_command_line(base, tmp_path):
    from lorakit.cli import app

    directory, _ = base
    model, adapter_dir = trained(directory, tmp_path, ADAPTERS["rslora"])
    result = CliRunner().invoke(app, ["merge", directory, str(adapter_dir), "--to", "gguf", "--dtype", "fp32",
                                      "--out", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    prompt = prompt_for(directory, model)
    assert_agree(llama_cpp_top5(prompt, tmp_path / "m.gguf"), ours(model, prompt))
    assert (tmp_path / "m.Modelfile").read_text().startswith("# ollama create NAME -f m.Modelfile")


@pytest.mark.slow
def test_smollm2_with_an_adapter_in_llama_cpp(tmp_path):
    """The embedded default model, its float32 GGUF and an adapter, both written by lorakit."""
    from lorakit.llamacpp import export_adapter_gguf, write_base_gguf

    base_gguf = write_base_gguf("smollm2-135m", tmp_path / "smollm2.gguf")
    model, adapter_dir = trained("smollm2-135m", tmp_path, ADAPTERS["lora"], scale=0.05)
    path = export_adapter_gguf(adapter_dir, "smollm2-135m", tmp_path / "adapter.gguf")
    original = lorakit.load_model("smollm2-135m").eval()
    prompt = lorakit.load_tokenizer("smollm2-135m")("The capital of Sweden is a city where")["input_ids"]
    with_adapter = llama_cpp_top5(prompt, base_gguf, path)
    assert_agree(with_adapter, ours(model, prompt))
    assert_agree(llama_cpp_top5(prompt, base_gguf), ours(original, prompt))
    assert max(abs(with_adapter[t] - float(ours(original, prompt)[t])) for t in with_adapter) >= 20 * TOLERANCE
    assert "TEMPLATE" in path.with_suffix(".Modelfile").read_text()
