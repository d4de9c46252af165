"""lorakit and PEFT read each other's adapter files and compute the same outputs."""

from collections import OrderedDict

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig

from conftest import MODELS, randomize_adapters, token_batch

CASES = {
    "all-linear": dict(lorakit=dict(rank=4, alpha=8), peft=dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "rank_pattern": dict(
        lorakit=dict(rank=4, alpha=8, targets=["q_proj", "v_proj", "c_attn", "up_proj", "c_fc"],
                     rank_pattern={"v_proj": 2, "c_fc": 6}, alpha_pattern={"up_proj": 3}, use_rslora=True),
        peft=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "c_attn", "up_proj", "c_fc"],
                  rank_pattern={"v_proj": 2, "c_fc": 6}, alpha_pattern={"up_proj": 3}, use_rslora=True)),
}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_peft_loads_lorakit_adapters_with_the_same_logits(kind, case, tmp_path):
    model = MODELS[kind]()
    lorakit.attach(model, LoraConfig(**CASES[case]["lorakit"]))
    randomize_adapters(model)
    x = token_batch(model.config.vocab_size)
    expected = logits(model, x)
    lorakit.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_lorakit_loads_peft_adapters_with_the_same_logits(kind, case, tmp_path):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(init_lora_weights=False, **CASES[case]["peft"]))
    theirs.eval()
    x = token_batch(theirs.config.vocab_size)
    expected = logits(theirs, x)
    theirs.save_pretrained(tmp_path / "a")
    ours = MODELS[kind]()
    lorakit.load_adapter(ours, tmp_path / "a")
    torch.testing.assert_close(logits(ours, x), expected, rtol=0, atol=1e-5)
    # and merged, as PEFT's merge_and_unload would give
    merged_theirs = theirs.merge_and_unload()
    lorakit.merge(ours)
    torch.testing.assert_close(logits(ours, x), logits(merged_theirs, x), rtol=0, atol=1e-5)


class Mixed(nn.Module):
    """Embedding, Conv2d and Linear in one small model (an image-model-like path)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8, padding_idx=0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, 5)

    def forward(self, ids, image):
        pooled = self.conv(image).mean(dim=(2, 3))  # (N, 8)
        return self.proj(self.embed(ids).mean(1) + pooled)


def mixed_model():
    torch.manual_seed(0)
    return Mixed().eval()


def mixed_inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 30, (4, 6), generator=generator), torch.randn(4, 3, 9, 9, generator=generator)


def test_embedding_and_conv2d_adapters_interoperate_both_ways(tmp_path):
    ids, image = mixed_inputs()
    ours = mixed_model()
    lorakit.attach(ours, LoraConfig(rank=2, alpha=4, targets=["embed", "conv", "proj"]))
    randomize_adapters(ours)
    expected = ours(ids, image)
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(mixed_model(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(ids, image), expected, rtol=0, atol=1e-5)

    torch.manual_seed(4)
    theirs = peft.get_peft_model(mixed_model(), peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["embed", "conv", "proj"], init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = mixed_model()
    lorakit.load_adapter(ours, tmp_path / "theirs")
    torch.testing.assert_close(ours(ids, image), theirs(ids, image), rtol=0, atol=1e-5)


def test_merging_rounds_like_peft_merge_and_unload(tmp_path):
    """Merged logits differ from the unmerged adapter's only by float32 rounding of
    W + ΔW, as PEFT's merge_and_unload's do: the merged weights agree to the last bit or
    two, and the logit error is PEFT's own, times at most two."""
    torch.manual_seed(3)
    theirs = peft.get_peft_model(MODELS["llama"](), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                     init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "a")
    x = token_batch(theirs.config.vocab_size, shape=(4, 32))
    unmerged_theirs = logits(theirs, x)
    merged_theirs = theirs.merge_and_unload()
    ours = MODELS["llama"]()
    lorakit.load_adapter(ours, tmp_path / "a")
    unmerged_ours = logits(ours, x)
    plain = lorakit.detach(ours)
    for key, weight in merged_theirs.state_dict().items():
        # Two roundings of W + ΔW (ours and PEFT's ΔW may differ in their last bit): 2 ulps
        # of each element, and near zero, 2 ulps of the weight's own scale.
        torch.testing.assert_close(plain.state_dict()[key], weight, rtol=2.5e-7,
                                   atol=2 * torch.finfo(weight.dtype).eps * weight.abs().max().item(), msg=key)
    error_theirs = (logits(merged_theirs, x) - unmerged_theirs).abs().max().item()
    error_ours = (logits(plain, x) - unmerged_ours).abs().max().item()
    assert 0 < error_ours <= 2 * error_theirs + 1e-7
