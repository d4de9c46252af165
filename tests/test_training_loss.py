"""The chunked head-and-loss (training/loss.py) against plain cross-entropy."""

import pytest
import torch
import torch.nn.functional as F
from conftest import MODELS, token_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.training.batches import Batch
from lorakit.training.data import IGNORE
from lorakit.training.loss import ChunkedHeadLoss, loss_sum


def plain(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 40), chunk=st.integers(1, 50), seed=st.integers(0, 2**16),
       with_bias=st.booleans(), train_head=st.booleans())
def test_chunked_loss_and_gradients_equal_the_plain_form(tokens, chunk, seed, with_bias, train_head):
    generator = torch.Generator().manual_seed(seed)
    vocab, width = 37, 16
    hidden = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64)
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    results = []
    for chunked in (False, True):
        leaves = [t.clone().requires_grad_(t is hidden or train_head) for t in inputs]
        h, w, b = leaves[0], leaves[1], leaves[2] if with_bias else None
        loss = ChunkedHeadLoss.apply(h, w, b, targets, chunk) if chunked else plain(h, w, b, targets)
        (loss * 0.5).backward()  # a non-unit upstream gradient, as from dividing by the token count
        results.append([loss.detach()] + [t.grad for t in leaves])
    for ours, reference in zip(results[1], results[0]):
        if reference is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_loss_sum_is_the_same_chunked_or_whole_with_ignore_masks(family):
    model = MODELS[family]()
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    vocab = model.config.vocab_size
    ids = token_batch(vocab, shape=(3, 11))
    targets = token_batch(vocab, seed=4, shape=(3, 11))
    targets[0, :6] = IGNORE  # a prompt
    targets[2, 8:] = IGNORE  # padding
    positions = torch.arange(11).expand(3, 11)
    batch = Batch(input_ids=ids, position_ids=positions, targets=targets, length=33)
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        loss = loss_sum(model, batch, chunk)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
