"""The adapter store: LRU by count and bytes, slots held by requests in flight, names
confined to the root, bad files refused without touching any slot."""

import os

import pytest
from serving import save_adapters

import lorakit
from lorakit.serve.slots import SlotLinear, enable_slots
from lorakit.serve.store import AdapterStore, StoreError


@pytest.fixture(scope="module")
def root(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_adapters(tiny_lm_dir, root, [2, 4, 8, 16])
    return root


def served(model_dir, capacity):
    model = lorakit.load_model(str(model_dir))
    enable_slots(model, capacity)
    return model


def filled_slots(model):
    layer = next(m for m in model.modules() if isinstance(m, SlotLinear))
    return [i for i, s in enumerate(layer.slots) if s is not None]


def test_lru_by_count_evicts_the_least_recently_used_idle_adapter(tiny_lm_dir, root):
    model = served(tiny_lm_dir, 2)
    store = AdapterStore(model, root, max_adapters=2)
    for name in ("a0", "a1"):
        store.acquire(name)
        store.release(name)
    store.acquire("a0")  # a0 is now more recent than a1
    store.release("a0")
    store.acquire("a2")
    assert list(store.loaded) == ["a0", "a2"]
    assert filled_slots(model) == [0, 1]


def test_lru_by_bytes_counts_each_adapter_by_its_size(tiny_lm_dir, root):
    store = AdapterStore(served(tiny_lm_dir, 8), root, max_adapters=8)
    sizes = {n: store.prepare(n, store.resolve(n)).nbytes for n in ("a0", "a1", "a2", "a3")}
    assert sizes["a3"] == 8 * sizes["a0"]  # rank 16 vs rank 2
    store.max_bytes = sizes["a3"] + sizes["a1"]
    for name in ("a0", "a1", "a3"):  # a0 + a1 + a3 > budget: a0 goes
        store.acquire(name)
        store.release(name)
    assert list(store.loaded) == ["a1", "a3"]
    with pytest.raises(StoreError, match="needs .* bytes") as err:
        AdapterStore(served(tiny_lm_dir, 2), root, 2, max_bytes=sizes["a0"]).acquire("a3")
    assert err.value.status == 422


def test_adapters_in_use_are_never_evicted(tiny_lm_dir, root):
    store = AdapterStore(served(tiny_lm_dir, 1), root, max_adapters=1)
    store.acquire("a0")
    with pytest.raises(StoreError, match="in use by requests in flight") as err:
        store.acquire("a1")
    assert err.value.status == 503 and list(store.loaded) == ["a0"]
    store.release("a0")
    store.acquire("a1")
    assert list(store.loaded) == ["a1"]


def test_unload_while_in_use_frees_the_slot_when_the_last_request_ends(tiny_lm_dir, root):
    model = served(tiny_lm_dir, 2)
    store = AdapterStore(model, root, max_adapters=2)
    store.register("mine", "a1")
    store.acquire("mine")
    store.unregister("mine")
    assert filled_slots(model) == [0]  # still there for the request in flight
    with pytest.raises(StoreError, match="being unloaded"):
        store.acquire("mine")
    store.release("mine")
    assert filled_slots(model) == [] and not store.loaded
    with pytest.raises(StoreError, match="not loaded") as err:
        store.unregister("mine")
    assert err.value.status == 404


@pytest.mark.parametrize("name, status, as_name, as_path", [
    ("../a0", 400, "must be 1-255 letters", "inside the adapter root"),
    ("/etc", 400, "must be 1-255 letters", "inside the adapter root"),
    ("a0/../../x", 400, "must be 1-255 letters", "inside the adapter root"),
    ("nothing", 404, "no adapter named", "no adapter named"),
    ("a 0", 400, "must be 1-255 letters", "no adapter named"),  # a path may hold spaces; a name may not
    ("escape", 400, "leads outside the adapter root", "leads outside the adapter root"),
])
def test_names_resolve_only_inside_the_root(tiny_lm_dir, root, tmp_path, name, status, as_name, as_path):
    outside = tmp_path / "outside"
    save_adapters(tiny_lm_dir, outside, [2]) if not outside.exists() else None
    link = root / "escape"
    if not link.exists():
        os.symlink(outside / "a0", link)
    store = AdapterStore(served(tiny_lm_dir, 1), root, 1)
    with pytest.raises(StoreError, match=as_name) as err:
        store.acquire(name)
    assert err.value.status == status and not store.loaded
    # the same paths through vLLM's load_lora_adapter
    with pytest.raises(StoreError, match=as_path):
        store.register("x", name)


def _poison(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    key = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[key][0, 0] = float("nan")  # one weight of one layer
    save_file(tensors, path)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"garbage"), "not a readable safetensors"),
    (lambda d: ((d / "adapter_model.safetensors").unlink(), (d / "adapter_model.bin").write_bytes(b"x")),
     "pickled weights are never loaded"),
    (lambda d: (d / "adapter_config.json").write_text("{oops"), "invalid JSON at line 1"),
    (lambda d: _poison(d / "adapter_model.safetensors"), "has NaN or infinite values"),
])
def test_bad_files_fail_with_422_and_leave_every_slot_alone(tiny_lm_dir, root, tmp_path, damage, message):
    import shutil

    bad_root = tmp_path / "root"
    shutil.copytree(root / "a0", bad_root / "good")
    shutil.copytree(root / "a1", bad_root / "bad")
    damage(bad_root / "bad")
    model = served(tiny_lm_dir, 2)
    store = AdapterStore(model, bad_root, 2)
    store.acquire("good")
    with pytest.raises(StoreError, match=message) as err:
        store.acquire("bad")
    assert err.value.status == 422 and list(store.loaded) == ["good"] and filled_slots(model) == [0]


def test_an_adapter_for_another_model_is_refused(tiny_lm_dir, tmp_path):
    from conftest import save_tiny_causal_lm

    other = save_tiny_causal_lm(tmp_path / "other", hidden=32)
    save_adapters(other, tmp_path / "root", [2])
    with pytest.raises(StoreError, match=r"does not fit this model: .*lora_A.weight has shape \(2, \d+\), expected \(2, \d+\)") as err:
        AdapterStore(served(tiny_lm_dir, 1), tmp_path / "root", 1).acquire("a0")
    assert err.value.status == 422


def test_a_runtime_load_refused_for_lack_of_slots_changes_nothing(tiny_lm_dir, root):
    store = AdapterStore(served(tiny_lm_dir, 1), root, 1)
    store.acquire("a0")  # the only slot, held by a request in flight
    with pytest.raises(StoreError, match="every adapter slot is in use") as err:
        store.register("late", "a1")
    assert err.value.status == 503 and "late" not in store.extra and list(store.loaded) == ["a0"]
    store.release("a0")
    store.register("late", "a1")  # the retry succeeds once a slot is free
    assert "late" in store.loaded


def test_a_dora_adapter_is_refused_with_422_saying_to_merge_it(tiny_lm_dir, root, tmp_path):
    model = lorakit.load_model(str(tiny_lm_dir))
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, variant="dora"))
    lorakit.save_adapter(model, tmp_path / "dora")
    served_model = served(tiny_lm_dir, 2)
    store = AdapterStore(served_model, root, max_adapters=2)
    store.add_directory("dora", tmp_path / "dora")
    with pytest.raises(StoreError, match="DoRA adapter.*merge it first") as err:
        store.acquire("dora")
    assert err.value.status == 422 and filled_slots(served_model) == []
