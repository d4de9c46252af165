"""Mixed-adapter batches: each row equals running its adapter alone."""

import copy
import random

import pytest
import torch
from conftest import MODELS, randomize_adapters

import lorakit
from lorakit.serve.slots import BASE, SlotLinear, enable_slots, make_route, routing
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
# and scattered per layer), segments with rows grouped by adapter once (every segment a
# contiguous view), and the compiled gathered kernel (each token reads its own adapter's rows).
PATHS = {"segments, shuffled rows": 0, "segments, grouped rows": 0, "gathered kernel": 10**6}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("ranks", [[4], [2, 8, 5], [4, 4, 4], [1, 2, 3, 4, 5, 6, 7, 8], [3] * 8])
def test_every_row_equals_its_adapter_alone(family, ranks, path, tmp_path):
    from lorakit.serve import slots as module

    base, singles, served, store = build(family, tmp_path, ranks)
    served.lorakit_router.gather_tokens = PATHS[path]
    names = [*singles, None] * 2 + ["a0"] * 2  # a0 has a longer segment than the others
    random.Random(len(ranks)).shuffle(names)
    slots = [store.acquire(n) if n else BASE for n in names]
    ids = torch.randint(0, base.config.vocab_size, (len(names), 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if path == "segments, grouped rows":
            mixed = module.mixed_forward(served, ids, slots)
        else:
            with routing(served, slots, ids.shape[1]):
                gathered = served.lorakit_router.current.token_slots is not None
                mixed = served(ids).logits
            assert gathered == (path == "gathered kernel" and len(ranks) > 1)
        for row, name in enumerate(names):
            expected = (singles[name] if name else base)(ids[row:row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], expected, rtol=0, atol=1e-5, msg=f"row {row} ({name})")
    assert served.lorakit_router.gather_tokens == PATHS[path]  # the kernel compiled: no fallback to segments


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
    assert route.token_slots is None and already.token_slots is None  # gather_tokens=0: segments only


def test_route_takes_the_gathered_kernel_only_when_adapters_have_few_tokens():
    decode = make_route([2, BASE, 0, 2], seq_len=1, gather_tokens=2)  # 3 tokens on 2 adapters
    assert decode.token_slots.tolist() == [2, BASE, 0, 2]  # in batch order: no grouping needed
    assert make_route([2, BASE, 0, 2], seq_len=2, gather_tokens=3).token_slots.tolist() == [2, 2, BASE, BASE, 0, 0, 2, 2]
    assert make_route([2, 0, 0, 2], seq_len=3, gather_tokens=2).token_slots is None  # 6 tokens per adapter
    assert make_route([2, 2, 2], seq_len=1, gather_tokens=8).token_slots is None  # one adapter: one segment


def test_gathered_kernel_equals_its_eager_form_and_dense_math():
    from lorakit.serve.pool import Pool, SlotWeights
    from lorakit.serve.slots import _gathered_kernel, add_gathered

    generator = torch.Generator().manual_seed(0)
    pool = Pool.empty(4, 16, 24, torch.device("cpu"))
    adapters = {}
    for slot, rank in [(0, 3), (2, 7), (3, 1)]:
        A, B = torch.randn(rank, 16, generator=generator), torch.randn(24, rank, generator=generator)
        adapters[slot] = (A, B)
        pool = pool.filled(slot, SlotWeights.of(A, B, 0.5))
    tokens = torch.randn(9, 16, generator=generator)
    token_slots = torch.tensor([3, 0, BASE, 2, 2, 0, 3, BASE, 0])
    y = torch.randn(9, 24, generator=generator)
    expected = y.clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot != BASE:
            A, B = adapters[slot]
            expected[t] += 0.5 * B @ (A @ tokens[t])
    eager, compiled = y.clone(), y.clone()
    add_gathered(eager, tokens, pool.A, pool.scaled_Bt, pool.block_of, token_slots)
    _gathered_kernel(compiled, tokens, pool.A, pool.scaled_Bt, pool.block_of, token_slots)
    torch.testing.assert_close(eager, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-5)


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


@pytest.mark.parametrize("ranks, kernel_runs", [([4, 4, 4], True), ([2, 2, 16], False)])
def test_gathered_kernel_is_skipped_where_padding_would_more_than_double_the_work(ranks, kernel_runs, tmp_path,
                                                                                  monkeypatch):
    from lorakit.serve import slots as module

    calls = []
    compiled = module._gathered_kernel
    monkeypatch.setattr(module, "_gathered_kernel", lambda *args: calls.append(1) or compiled(*args))
    base, singles, served, store = build("llama", tmp_path, ranks)
    for name in singles:
        store.acquire(name)
    names = ["a0", "a1", "a0", "a1", None]  # the rank-16 adapter a2 is loaded (it sets the width) but unused
    slots = [store.acquire(n) if n else BASE for n in names]
    ids = torch.randint(0, 97, (len(names), 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mixed = module.mixed_forward(served, ids, slots)
        torch.testing.assert_close(mixed, _row_by_row(base, singles, names, ids), rtol=0, atol=1e-5)
    assert bool(calls) == kernel_runs


def test_a_kernel_that_cannot_be_built_falls_back_to_segments_with_the_same_rows(tmp_path, monkeypatch):
    from lorakit.serve import slots as module

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(module, "_gathered_kernel", broken)
    base, singles, served, store = build("llama", tmp_path, [3, 3])
    names = ["a1", "a0", None, "a0"]
    slots = [store.acquire(n) if n else BASE for n in names]
    ids = torch.randint(0, 97, (len(names), 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mixed = module.mixed_forward(served, ids, slots)
    torch.testing.assert_close(mixed, _row_by_row(base, singles, names, ids), rtol=0, atol=1e-5)
    assert served.lorakit_router.gather_tokens == 0  # segments from now on
