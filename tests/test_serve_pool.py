"""A layer's pool of adapter blocks: slots keep their weights through fills, empties,
reuse of free blocks and growth, and a snapshot in use never changes under a reader."""

import random

import pytest
import torch

from lorakit.adapter import LayerWeights
from lorakit.variants import lora_value
from lorakit.serve.pool import Pool


def weights(rank: int, seed: int) -> LayerWeights:
    generator = torch.Generator().manual_seed(seed)
    return lora_value(torch.randn(rank, 6, generator=generator), torch.randn(5, rank, generator=generator), 0.5)


def check(pool: Pool, expected: dict[int, LayerWeights]) -> None:
    for slot in range(len(pool.spans)):
        got = pool.weights(slot)
        if slot not in expected:
            assert got is None and pool.rank(slot) == 0
            continue
        assert torch.equal(got.A, expected[slot].A) and torch.equal(got.scaled_Bt, 0.5 * expected[slot].B.T)
        block, rank = pool.spans[slot]
        assert pool.block_of[slot] == block and block > 0
        assert not pool.A[block, rank:].any() and not pool.scaled_Bt[block, rank:].any()  # zeros past the rank
    assert pool.block_of[-1] == 0 and not pool.A[0].any() and not pool.scaled_Bt[0].any()  # BASE reads zeros
    blocks = [span[0] for span in pool.spans if span is not None]
    assert len(blocks) == len(set(blocks))  # no two slots share a block


def test_random_fills_and_empties_keep_every_slot_intact():
    pool, expected = Pool.empty(6, 6, 5, torch.device("cpu")), {}
    rng = random.Random(0)
    for step in range(200):
        slot = rng.randrange(6)
        if slot in expected:
            pool = pool.emptied(slot)
            del expected[slot]
        else:
            expected[slot] = weights(rng.choice([1, 2, 4, 8, 16]), step)
            pool = pool.filled(slot, expected[slot])
        check(pool, expected)
    # growth is bounded: at most twice the slots plus the zero block, no wider than the widest adapter
    assert pool.A.shape[0] <= 2 * 6 + 1 and pool.A.shape[1] <= 16


def test_a_free_block_is_reused_before_the_buffers_grow():
    pool = Pool.empty(3, 6, 5, torch.device("cpu"))
    pool = pool.filled(0, weights(4, 0)).filled(1, weights(4, 1))
    buffer, block = pool.A, pool.spans[0][0]
    pool = pool.emptied(0).filled(2, weights(3, 2))
    assert pool.A is buffer and pool.spans[2] == (block, 3)
    check(pool, {1: weights(4, 1), 2: weights(3, 2)})


def test_a_snapshot_in_use_is_unchanged_by_later_fills():
    old = Pool.empty(2, 6, 5, torch.device("cpu")).filled(0, weights(2, 0))
    before = (old.A.clone(), old.scaled_Bt.clone())
    new = old.filled(1, weights(16, 1))  # wider: new buffers
    assert new.A.data_ptr() != old.A.data_ptr()
    assert torch.equal(old.A, before[0]) and torch.equal(old.scaled_Bt, before[1])
    assert old.spans[1] is None and old.block_of[1] == 0


def test_filling_a_slot_in_use_is_refused():
    pool = Pool.empty(2, 6, 5, torch.device("cpu")).filled(0, weights(2, 0))
    with pytest.raises(ValueError, match="slot 0 is in use"):
        pool.filled(0, weights(2, 1))


def test_buffers_shrink_when_the_widest_adapter_leaves():
    pool = Pool.empty(3, 6, 5, torch.device("cpu"))
    pool = pool.filled(0, weights(2, 0)).filled(1, weights(64, 1)).filled(2, weights(2, 2))
    assert pool.A.shape[1] == 64 and not pool.uniform
    pool = pool.emptied(1)
    assert pool.A.shape[1] == 2 and pool.uniform
    check(pool, {0: weights(2, 0), 2: weights(2, 2)})


def test_consecutive_blocks_are_one_slice_and_anything_else_is_not():
    pool = Pool.empty(4, 6, 5, torch.device("cpu"))
    for slot in range(4):
        pool = pool.filled(slot, weights(2, slot))
    blocks = [pool.spans[slot][0] for slot in range(4)]
    assert blocks == [1, 2, 3, 4]  # filled in order: side by side
    run = pool.consecutive((1, 2, 3))
    assert run == slice(2, 5) and torch.equal(pool.A[run], pool.A.index_select(0, pool.block_of[[1, 2, 3]]))
    assert pool.consecutive((-1, 0, 1)) == slice(0, 3)  # BASE reads the zero block, just before
    assert pool.consecutive((0, 2)) is None  # a gap
    assert pool.consecutive((1, 1)) is None  # a repeat
    assert pool.consecutive((2, 1)) is None  # out of order
    assert pool.emptied(1).consecutive((0, 1, 2)) is None  # an emptied slot reads block 0
