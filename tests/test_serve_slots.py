"""Mixed-adapter batches: each row equals running its adapter alone."""

import copy
import random

import pytest
import torch
from conftest import MODELS, randomize_adapters

import lorakit
from lorakit.serve.slots import BASE, SlotLinear, enable_slots, make_route, router_of, routing
from lorakit.serve.store import AdapterStore


def build(family, tmp_path, ranks):
    base = MODELS[family]()
    singles = {}
    for i, rank in enumerate(ranks):
        model = copy.deepcopy(base)
        config = lorakit.LoraConfig(rank=rank, alpha=rank * (i + 1), use_rslora=i % 3 == 2,
                                    targets="all-linear" if i % 2 == 0 else ("q_proj", "v_proj", "c_attn"))
        lorakit.attach(model, config)
        randomize_adapters(model, seed=i, scale=0.2)
        lorakit.save_adapter(model, tmp_path / f"a{i}")
        singles[f"a{i}"] = model.eval()
    served = copy.deepcopy(base)
    enable_slots(served, len(ranks))
    store = AdapterStore(served, tmp_path, len(ranks))
    return base, singles, served, store


# Every way to add the adapters must agree: segments with rows in any order (tokens gathered
# and scattered per layer) or grouped by adapter once (every segment a contiguous view), and
# stacked batched matmuls (here one group per token: the adapters have unequal token counts).
PATHS = {"segments, shuffled rows": 0, "segments, grouped rows": 0, "stacked, shuffled rows": 10**6,
         "stacked, grouped rows": 10**6}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("ranks", [[4], [2, 8, 5], [4, 4, 4], [1, 2, 3, 4, 5, 6, 7, 8], [3] * 8])
def test_every_row_equals_its_adapter_alone(family, ranks, path, tmp_path):
    from lorakit.serve import slots as module

    base, singles, served, store = build(family, tmp_path, ranks)
    router_of(served).stack_tokens = PATHS[path]
    names = [*singles, None] * 2 + ["a0"] * 2  # a0 has a longer segment than the others
    random.Random(len(ranks)).shuffle(names)
    slots = [store.acquire(n) if n else BASE for n in names]
    ids = torch.randint(0, base.config.vocab_size, (len(names), 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if path.endswith("grouped rows"):
            mixed = module.mixed_forward(served, ids, slots)
        else:
            with routing(served, slots, ids.shape[1]):
                stacked = router_of(served).current.stack is not None
                mixed = served(ids).logits
            assert stacked == (path.startswith("stacked") and len(ranks) > 1)
        for row, name in enumerate(names):
            expected = (singles[name] if name else base)(ids[row:row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], expected, rtol=0, atol=1e-5, msg=f"row {row} ({name})")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stacked_groups_of_one_adapter_each_after_the_base_rows(family, tmp_path):
    from lorakit.serve.slots import mixed_forward

    base, singles, served, store = build(family, tmp_path, [2, 8, 5])
    names = ["a2", None, "a0", "a1", "a0", "a2", "a1", None]  # two rows per adapter, two on the base
    slots = [store.acquire(n) if n else BASE for n in names]
    ids = torch.randint(0, base.config.vocab_size, (len(names), 3), generator=torch.Generator().manual_seed(6))
    grouped = sorted(slots)
    with routing(served, grouped, 3):
        stack = router_of(served).current.stack
    assert (stack.start, stack.end, stack.length) == (6, 24, 6) and stack.slots.tolist() == sorted(set(slots) - {BASE})
    with torch.no_grad():
        logits = mixed_forward(served, ids, slots)
        for row, name in enumerate(names):
            expected = (singles[name] if name else base)(ids[row:row + 1]).logits[0]
            torch.testing.assert_close(logits[row], expected, rtol=0, atol=1e-5, msg=f"row {row} ({name})")


@pytest.mark.parametrize("names", [["a0", "a1", "a2", "a3"], ["a0", "a2", "a3"]], ids=["side by side", "gap"])
def test_stacked_blocks_side_by_side_are_read_in_place_with_the_same_result(names, tmp_path, monkeypatch):
    """A decode step with one row per adapter reads the pool's blocks as a view when they are
    consecutive, and gathers them otherwise; either way the same bits as a forced gather."""
    from lorakit.serve.pool import Pool
    from lorakit.serve.slots import mixed_forward

    base, singles, served, store = build("llama", tmp_path, [4, 4, 4, 4])
    slot_of = {name: store.acquire(name) for name in singles}  # loaded in order: blocks 1-4
    slots = [slot_of[name] for name in names]
    ids = torch.randint(0, base.config.vocab_size, (len(names), 1), generator=torch.Generator().manual_seed(8))
    in_place = []
    consecutive = Pool.consecutive
    monkeypatch.setattr(Pool, "consecutive", lambda pool, s: in_place.append(consecutive(pool, s)) or in_place[-1])
    with torch.no_grad():
        logits = mixed_forward(served, ids, slots)
        monkeypatch.setattr(Pool, "consecutive", lambda pool, s: None)
        gathered = mixed_forward(served, ids, slots)
    # a1 and a3 adapt only q and v: there the four blocks are 1-4, elsewhere those two read block 0
    side_by_side = names == ["a0", "a1", "a2", "a3"]
    assert any(run is not None for run in in_place) == side_by_side and None in in_place
    assert torch.equal(logits, gathered)
    with torch.no_grad():
        for row, name in enumerate(names):
            expected = singles[name](ids[row:row + 1]).logits[0]
            torch.testing.assert_close(logits[row], expected, rtol=0, atol=1e-5, msg=f"row {row} ({name})")


def test_mixed_forward_groups_rows_once_and_returns_them_in_order(tmp_path):
    from lorakit.serve.slots import mixed_forward

    base, singles, served, store = build("qwen2" if "qwen2" in MODELS else "llama", tmp_path, [3, 5])
    names = ["a1", None, "a0", "a1", None]
    slots = [store.acquire(n) if n else BASE for n in names]
    ids = torch.randint(0, base.config.vocab_size, (5, 4), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = mixed_forward(served, ids, slots)
        for row, name in enumerate(names):
            expected = (singles[name] if name else base)(ids[row:row + 1]).logits[0]
            torch.testing.assert_close(logits[row], expected, rtol=0, atol=1e-5)


def test_route_groups_tokens_by_slot_once():
    route = make_route([2, BASE, 0, 2], seq_len=3)
    # rows in slot order: row 1 (base), row 2 (slot 0), rows 0 and 3 (slot 2); base rows get no segment
    assert route.segments == ((0, 3, 6), (2, 6, 12))
    assert route.order.tolist() == [3, 4, 5, 6, 7, 8, 0, 1, 2, 9, 10, 11]
    already = make_route([BASE, 0, 0, 3], seq_len=2)
    assert already.order is None and already.segments == ((0, 2, 6), (3, 6, 8))
    assert route.stack is None and already.stack is None  # stack_tokens=0: segments only


def test_route_stacks_equal_groups_or_few_tokens_per_adapter():
    per_token = make_route([2, BASE, 0, 2], seq_len=1, stack_tokens=2)  # 3 tokens on 2 adapters, unequal
    assert per_token.stack.slots.tolist() == [2, BASE, 0, 2] and per_token.stack.length == 1  # batch order
    equal = make_route([BASE, 0, 2], seq_len=2, stack_tokens=2)  # grouped, 2 tokens per adapter
    assert (equal.stack.start, equal.stack.end, equal.stack.length) == (2, 6, 2)
    assert equal.stack.slots.tolist() == [0, 2]
    assert make_route([2, 0, 0, 2], seq_len=3, stack_tokens=2).stack is None  # 6 tokens per adapter, ungrouped
    prefill = make_route([BASE, 0, 0, 2, 2], seq_len=64, stack_tokens=8)  # grouped, 128 tokens per adapter
    assert (prefill.stack.start, prefill.stack.end, prefill.stack.length) == (64, 320, 128)
    assert make_route([BASE, 0, 0, 2, 2], seq_len=64, stack_tokens=0).stack is None  # 0: segments only
    assert make_route([2, 2, 2], seq_len=1, stack_tokens=8).stack is None  # one adapter: one segment


def test_bf16_base_keeps_the_adapter_product_in_float32(tmp_path):
    base, singles, served, store = build("llama", tmp_path, [4])
    served.to(torch.bfloat16)
    slot = store.acquire("a0")
    layer = next(m for m in served.modules() if isinstance(m, SlotLinear))
    assert layer.slots[slot].A.dtype == torch.float32
    reference = copy.deepcopy(base).to(torch.bfloat16)
    lorakit.load_adapter(reference, tmp_path / "a0")  # lorakit's LoRA layers keep fp32 adapters on a bf16 base
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), routing(served, [slot], 5):
        torch.testing.assert_close(served(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_state_dict_keeps_the_base_keys(tmp_path):
    base, _, served, _ = build("llama", tmp_path, [2])
    assert served.state_dict().keys() == base.state_dict().keys()


def _row_by_row(base, singles, names, ids):
    return torch.cat([(singles[n] if n else base)(ids[i:i + 1]).logits for i, n in enumerate(names)])


@pytest.mark.parametrize("ranks, stacks", [([4, 4, 4], True), ([2, 2, 16], False)])
def test_stacking_is_skipped_where_padding_would_more_than_double_the_work(ranks, stacks, tmp_path, monkeypatch):
    from lorakit.serve import slots as module

    taken = []
    stacked = module.SlotLinear._stacked
    spy = staticmethod(lambda *args: taken.append(stacked(*args)) or taken[-1])
    monkeypatch.setattr(module.SlotLinear, "_stacked", spy)
    base, singles, served, store = build("llama", tmp_path, ranks)
    for name in singles:
        store.acquire(name)
    names = ["a0", "a1", "a0", "a1", None]  # the rank-16 adapter a2 is loaded (it sets the width) but unused
    slots = [store.acquire(n) if n else BASE for n in names]
    ids = torch.randint(0, 97, (len(names), 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mixed = module.mixed_forward(served, ids, slots)
        torch.testing.assert_close(mixed, _row_by_row(base, singles, names, ids), rtol=0, atol=1e-5)
    assert taken and all(t == stacks for t in taken)


def test_bf16_base_stacked_rows_match_each_adapter_alone(tmp_path):
    base, singles, served, store = build("llama", tmp_path, [4, 4])
    served.to(torch.bfloat16)
    names = ["a0", "a1", "a1", "a0"]
    slots = [store.acquire(n) for n in names]
    references = {}
    for name in ("a0", "a1"):
        references[name] = copy.deepcopy(base).to(torch.bfloat16)
        lorakit.load_adapter(references[name], tmp_path / name)
    ids = torch.randint(0, 97, (4, 1), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), routing(served, slots, 1):
        assert router_of(served).current.stack is not None
        logits = served(ids).logits
        for row, name in enumerate(names):
            # the same fp32 update, summed in another order: equal up to one bf16 rounding per layer
            torch.testing.assert_close(logits[row], references[name](ids[row:row + 1]).logits[0])
