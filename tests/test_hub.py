"""Hub ids (``org/name[@revision]``) for models, adapters and datasets, resolved offline
from a Hugging Face cache laid out on disk exactly as huggingface_hub lays it out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.hub import HubError, HubId, parse, split_revision

from conftest import randomize_adapters

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def cache_repo(cache: Path, repo: str, folder: Path, commit: str = COMMIT, refs: tuple[str, ...] = ("main",),
               kind: str = "models") -> Path:
    """Put ``folder``'s files into ``cache`` as snapshot ``commit`` of ``repo``: blobs by
    content, snapshot entries as links to them, and refs naming the commit."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = root / "blobs" / f"{commit[:8]}-{file.relative_to(folder).as_posix().replace('/', '_')}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        entry = snapshot / file.relative_to(folder)
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(os.path.relpath(blob, entry.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that huggingface_hub uses, offline, for this test alone."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def cached_model(hub_cache, tiny_lm_dir):
    cache_repo(hub_cache, "org/tiny-lm", Path(tiny_lm_dir), refs=("main", "v1"))
    return "org/tiny-lm"


def trained_adapter(model_spec: str, directory: Path, seed: int = 3) -> Path:
    model = lorakit.load_model(model_spec)
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")))
    randomize_adapters(model, seed=seed)
    return lorakit.save_adapter(model, directory)


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_ids_parse_and_local_paths_win(tmp_path, monkeypatch):
    assert parse("Qwen/Qwen2.5-0.5B-Instruct") == HubId("Qwen/Qwen2.5-0.5B-Instruct")
    assert parse("org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse("smollm2-135m") is None and parse("/abs/path") is None and parse("a/b/c") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse("org/name") is None  # an existing local path of the same spelling
    assert split_revision("org/name@abc") == ("org/name", "abc")
    assert split_revision("runs/x/adapter") == ("runs/x/adapter", None)


def test_a_cached_model_loads_offline_by_id_and_revision(cached_model, tiny_lm_dir):
    expected = logits(lorakit.load_model(str(tiny_lm_dir)))
    for spec in (cached_model, f"{cached_model}@v1", f"{cached_model}@{COMMIT}"):
        model = lorakit.load_model(spec)
        assert torch.equal(logits(model), expected)
        assert model.config.name_or_path == spec
    assert lorakit.load_tokenizer(cached_model)("hej")["input_ids"]


def test_a_local_directory_wins_over_an_id_of_the_same_spelling(cached_model, tmp_path, monkeypatch):
    from conftest import save_tiny_causal_lm

    monkeypatch.chdir(tmp_path)
    save_tiny_causal_lm(tmp_path / "org" / "tiny-lm", seed=7)  # other weights than the cached model
    local = lorakit.load_model("org/tiny-lm")
    assert torch.equal(logits(local), logits(lorakit.load_model(str(tmp_path / "org" / "tiny-lm"))))


def test_adapter_files_record_the_id_and_revision_and_load_back_by_id(cached_model, hub_cache, tmp_path):
    spec = f"{cached_model}@v1"
    local = trained_adapter(spec, tmp_path / "adapter")
    config = json.loads((local / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == cached_model and config["revision"] == "v1"
    assert lorakit.read_adapter(local).base_model == spec

    cache_repo(hub_cache, "someone/tiny-adapter", local, commit=OTHER)
    model = lorakit.load_model(cached_model)
    assert lorakit.load_adapter(model, "someone/tiny-adapter") == "default"
    assert lorakit.load_adapter(model, "someone/tiny-adapter@main") == "tiny_adapter"  # named after the repo
    reference = lorakit.load_model(cached_model)
    lorakit.load_adapter(reference, local)
    lorakit.set_active(model, "default")
    assert torch.equal(logits(model), logits(reference))


def test_an_uncached_id_offline_is_one_clear_line(hub_cache):
    with pytest.raises(HubError) as error:
        lorakit.load_model("org/not-downloaded")
    message = str(error.value)
    assert "\n" not in message
    assert "org/not-downloaded is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message and "hf download org/not-downloaded" in message
    with pytest.raises(HubError, match="adapter org/no-adapter is not in the Hugging Face cache"):
        lorakit.read_adapter("org/no-adapter")


def _cli(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cwd / "datasets-cache")}
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_cli_commands_take_ids_offline(cached_model, hub_cache, tmp_path):
    adapter = trained_adapter(cached_model, tmp_path / "adapter")
    cache_repo(hub_cache, "someone/tiny-adapter", adapter, commit=OTHER)
    merged = _cli("merge", cached_model, "someone/tiny-adapter", "--out", "merged", cache=hub_cache, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    reference = lorakit.load_model(cached_model)
    lorakit.load_adapter(reference, adapter)
    lorakit.merge(reference)
    assert torch.allclose(logits(lorakit.load_model(str(tmp_path / "merged"))), logits(reference), atol=1e-5)

    inspected = _cli("inspect", cached_model, "--rank", "4", "--json", cache=hub_cache, cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["trainable_params"] > 0
    for args in (("analyze", "someone/tiny-adapter", "--out", "analysis"),
                 ("compress", "someone/tiny-adapter", "--rank", "1", "--out", "small"),
                 ("combine", "someone/tiny-adapter", f"someone/tiny-adapter@{OTHER}", "--out", "sum"),
                 ("plan", cached_model, "--method", "lora")):
        done = _cli(*args, cache=hub_cache, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr)
    generated = _cli("generate", cached_model, "--adapter", "sv=someone/tiny-adapter", "--prompt", "hej",
                     "--max-tokens", "2", "--use", "sv", cache=hub_cache, cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr

    missing = _cli("merge", "org/missing", "someone/tiny-adapter", "--out", "m2", cache=hub_cache, cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "model org/missing is not in the Hugging Face cache" in missing.stderr


def test_train_on_a_hub_model_and_a_hub_dataset_offline(cached_model, hub_cache, tmp_path):
    import pandas as pd

    rows = tmp_path / "rows"
    (rows / "data").mkdir(parents=True)
    pd.DataFrame({"question": ["hej", "tack", "hejdå", "god morgon"] * 2,
                  "answer": ["hej hej", "varsågod", "vi ses", "god morgon!"] * 2}
                 ).to_parquet(rows / "data" / "train-00000-of-00001.parquet")
    cache_repo(hub_cache, "org/qa", rows, kind="datasets")
    result = _cli("train", "--model", cached_model, "--data", "org/qa", "--columns", "prompt=question,completion=answer",
                  "--eval-fraction", "0", "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "4",
                  "--rank", "2", "--out", "run", cache=hub_cache, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == cached_model
    assert "8 prompt-completion" in result.stdout


def test_image_adapters_and_pipelines_by_id(hub_cache, tmp_path):
    from image_models import tiny_pipeline
    from test_formats_kohya import hand_made_file, models_of

    tiny_pipeline(tmp_path / "tokenizer").save_pretrained(tmp_path / "sd")
    cache_repo(hub_cache, "org/tiny-sd", tmp_path / "sd")
    (tmp_path / "style").mkdir()
    hand_made_file(tmp_path / "style" / "my_style.safetensors")  # one kohya file in a repository
    cache_repo(hub_cache, "someone/kohya-style", tmp_path / "style", commit=OTHER)

    result = _cli("convert", "someone/kohya-style", "converted", "--to", "diffusers", "--pipeline", "org/tiny-sd",
                  cache=hub_cache, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    by_id, by_path = tiny_pipeline(tmp_path / "t1"), tiny_pipeline(tmp_path / "t2")
    lorakit.load_pipeline_adapter(models_of(by_id), "someone/kohya-style")
    lorakit.load_pipeline_adapter(models_of(by_path), tmp_path / "converted")
    for component in ("unet", "text_encoder"):
        for (name, a), (_, b) in zip(models_of(by_id)[component].state_dict().items(),
                                     models_of(by_path)[component].state_dict().items()):
            assert torch.equal(a, b), name
