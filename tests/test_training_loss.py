"""The chunked head-and-loss (training/loss.py) against plain cross-entropy."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from conftest import MODELS, assert_close_as_sums, token_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.training.batches import Batch
from lorakit.training.data import IGNORE
from lorakit.training.loss import ChunkedHeadLoss, chunk_tokens, loss_sum


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


class LiveLogits(TorchDispatchMode):
    """Counts the (n <= chunk, vocab) buffers alive at once, by storage, over every op run."""

    def __init__(self, chunk: int, vocab: int) -> None:
        super().__init__()
        self.chunk, self.vocab, self.alive, self.most = chunk, vocab, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.alive += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                       and t.dim() == 2 and t.shape[1] == self.vocab and t.shape[0] <= self.chunk]
        self.alive = [ref for ref in self.alive if ref() is not None]
        self.most = max(self.most, len({ref().untyped_storage().data_ptr() for ref in self.alive}))
        return out


def test_one_chunk_of_logits_is_alive_at_a_time():
    generator = torch.Generator().manual_seed(0)
    vocab, width, tokens, chunk = 1000, 8, 12, 4
    hidden = torch.randn(tokens, width, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, width, generator=generator)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    with LiveLogits(chunk, vocab) as live:
        ChunkedHeadLoss.apply(hidden, weight, None, targets, chunk).backward()
    assert live.most == 1


def test_chunks_hold_a_fixed_number_of_logits_whatever_the_vocabulary():
    assert chunk_tokens(49_152) == 341  # SmolLM2
    assert chunk_tokens(128_256) == 130  # Llama 3
    assert chunk_tokens(10**9) == 1
    assert chunk_tokens(37, chunk_logits=5 * 37) == 5


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
    for chunk_logits in (0, 5 * vocab):  # whole, then chunks of 5 tokens
        model.zero_grad()
        loss = loss_sum(model, batch, chunk_logits)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    # Both are sums over the batch's trained tokens, in other orders.
    terms = int((targets != IGNORE).sum())
    assert_close_as_sums(results[1][0], results[0][0], terms)
    for name, grad in results[0][1].items():
        assert_close_as_sums(results[1][1][name], grad, terms, msg=name)
