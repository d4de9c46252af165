"""Batches: exact layout, packing without cross-example attention, the step stream."""

import pytest
import torch
from conftest import MODELS, assert_close_as_sums

from lorakit.training.batches import collate, micro_batches, samples, split_eval, step_indices
from lorakit.training.data import IGNORE, DataError, Example
from lorakit.training.loss import loss_sum

M = IGNORE


def random_examples(vocab: int, lengths, seed: int = 0) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        keep = torch.rand(n, generator=generator) < 0.6
        keep[-1] = True
        out.append(Example(ids, [t if k else IGNORE for t, k in zip(ids, keep.tolist())]))
    return out


def test_collate_shifts_targets_per_example_and_restarts_positions():
    a = Example([5, 6, 7], [M, 6, 7])
    b = Example([8, 9], [8, 9])
    batch = collate([(a, b), (b,)], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [8, 9, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # position t predicts token t+1 of its own example; an example's last token predicts nothing
    assert batch.targets.tolist() == [[6, 7, M, 9, M], [9, M, M, M, M]]
    assert batch.tokens == 4 and batch.length == 7


def test_collate_fills_rows_instead_of_padding_to_the_longest():
    five, three, two = (Example(list(range(n)), list(range(n))) for n in (5, 3, 2))
    batch = collate([(two,), (five,), (three,)])
    assert batch.input_ids.shape == (2, 5)  # [five], [three + two]: 10 slots instead of 15
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert batch.length == 10


def test_packing_keeps_every_example_once_within_max_length():
    examples = random_examples(50, [3, 9, 4, 7, 2, 8, 1 + 1, 5])
    rows = samples(examples, max_length=10, pack=True)
    assert all(sum(len(e.input_ids) for e in row) <= 10 for row in rows)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in examples)
    assert len(rows) < len(examples)
    assert samples(examples, 10, pack=False) == [(e,) for e in examples]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_packed_and_padded_batches_give_each_example_its_own_loss(family):
    model = MODELS[family]()
    examples = random_examples(model.config.vocab_size, [5, 9, 3, 7, 4])
    alone = [loss_sum(model, collate([(e,)])) for e in examples]
    padded = loss_sum(model, collate([(e,) for e in examples]))
    packed = loss_sum(model, collate(samples(examples, 16, pack=True)))
    terms = sum(len(e.input_ids) for e in examples)  # one loss term per token, summed in other orders
    assert_close_as_sums(padded, sum(alone), terms)
    assert_close_as_sums(packed, sum(alone), terms)


def test_each_epoch_visits_every_sample_once_and_steps_are_a_function_of_seed_and_step():
    count, batch = 10, 4
    stream = [i for step in range(5) for i in step_indices(count, batch, step, seed=3)]  # two epochs exactly
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new order each epoch
    assert step_indices(count, batch, 3, seed=3) == stream[12:16]  # crosses the epoch boundary
    assert step_indices(count, batch, 3, seed=4) != stream[12:16]


@pytest.mark.parametrize("world, micro", [(1, 8), (1, 2), (2, 2), (4, 1)])
def test_processes_split_a_step_without_overlap(world, micro):
    indices = step_indices(20, 8, 1, seed=0)
    shares = [micro_batches(indices, rank, world, micro) for rank in range(world)]
    flat = [i for share in shares for chunk in share for i in chunk]
    assert sorted(flat) == sorted(indices)
    assert all(len(chunk) == micro for share in shares for chunk in share)


def test_eval_split_is_seeded_disjoint_and_checked():
    examples = random_examples(20, [2] * 20)
    train, held_out = split_eval(examples, 0.1, seed=0)
    assert len(held_out) == 2 and len(train) == 18
    assert not {id(e) for e in train} & {id(e) for e in held_out}
    assert split_eval(examples, 0.1, seed=0)[1] == held_out
    with pytest.raises(DataError, match="cannot be split"):
        split_eval(examples[:1], 0.5, seed=0)
