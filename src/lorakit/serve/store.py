"""The adapter store: PEFT-format adapter directories under one root, loaded into
slots on first use and kept in an LRU cache bounded by count and by bytes.

Reading and checking an adapter (``prepare``) touches no slot, so it can run in a
request's own thread while the batch keeps decoding; only the final assignment of
tensors to a free slot (``install``) changes the model, and it never touches a slot
that a request in flight holds. Names resolve only inside the root: ``..``,
absolute paths and symlinks that lead outside are refused; only safetensors are read.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..adapter import Adapter, LayerWeights
from ..attach import Target
from ..files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, fit_problems, locate, read_adapter
from ..formats.peft import tensor_key
from ..variants import adapter_class
from .slots import SlotLinear, router_of, slot_layers

# Path segments of letters, digits, . _ -, none starting with a dot (so no "..", no hidden files).
NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class StoreError(ValueError):
    """An adapter request that cannot be served; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_name(name: str) -> None:
    if not isinstance(name, str) or len(name) > 255 or not NAME.match(name):
        raise StoreError(f"adapter name {name!r} must be 1-255 letters, digits, . _ - and / between parts "
                         "that do not start with a dot", 400)


class Lease:
    """One request's hold on a loaded adapter's slot; released once, however often called."""

    def __init__(self, store: AdapterStore, name: str, slot: int) -> None:
        self.store, self.name, self.slot = store, name, slot
        self._released = threading.Lock()

    def release(self) -> None:
        if self._released.acquire(blocking=False):
            self.store.release(self.name)


@dataclass(frozen=True)
class AdapterInfo:
    """What /v1/models shows of an adapter that loads."""

    name: str
    root: str  # its directory, relative to the adapter root when it lies there
    rank: int


@dataclass
class Prepared:
    """An adapter read and checked against the model, not yet in a slot."""

    name: str
    path: Path
    weights: dict[str, LayerWeights]  # layer path -> weights
    nbytes: int


@dataclass
class Loaded:
    slot: int
    nbytes: int
    users: int = 0  # requests in flight that hold this slot
    retiring: bool = False  # unloaded while in use: freed when the last user releases it


class AdapterStore:
    def __init__(self, model: nn.Module, root: str | os.PathLike | None, max_adapters: int,
                 max_bytes: int | None = None) -> None:
        if root is not None and not Path(root).is_dir():
            raise StoreError(f"adapter root {root} is not a directory", 400)
        self.root = Path(root).resolve() if root is not None else None
        self.layers: dict[str, SlotLinear] = slot_layers(model)
        self.capacity = router_of(model).capacity
        self.max_adapters = min(max_adapters, self.capacity)
        self.max_bytes = max_bytes
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()  # least recently used first
        self.extra: dict[str, Path] = {}  # adapters registered at runtime (load_lora_adapter)
        self.unloaded: set[str] = set()  # root adapters unloaded at runtime: unavailable until loaded again
        self.loads = self.evictions = 0  # over the store's life, for metrics
        self.checked: dict[str, tuple] = {}  # name -> (file stamps, what /v1/models shows or None)
        self.lock = threading.Lock()

    # -- names and files -----------------------------------------------------------
    def resolve(self, name: str, path: str | None = None) -> Path:
        """The directory of adapter ``name`` (or of ``path``), confined to the root: the
        directory and every file read from it resolve inside the root, symlinks included."""
        if name in self.extra and path is None:
            return self.extra[name]
        if path is None and name in self.unloaded:
            raise StoreError(f"adapter {name!r} was unloaded; load it again with /v1/load_lora_adapter", 404)
        if self.root is None:
            raise StoreError(f"no adapter named {name!r} (and no adapter root)", 404)
        relative = path if path is not None else name
        if path is None:
            check_name(relative)
        if not isinstance(relative, str) or CONTROL.search(relative):
            raise StoreError(f"adapter path {relative!r} has control characters", 400)
        if not relative or os.path.isabs(relative) or ".." in Path(relative).parts:
            raise StoreError(f"adapter path {relative!r} must be a relative path inside the adapter root", 400)
        resolved = self._inside(self.root / relative, relative)
        if not (resolved / CONFIG_NAME).is_file():
            raise StoreError(f"no adapter named {relative!r}", 404)
        for file_name in (CONFIG_NAME, WEIGHTS_NAME):
            self._inside(resolved / file_name, relative)
        return resolved

    def _inside(self, path: Path, shown: str) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise StoreError(f"adapter {shown!r} leads outside the adapter root", 400)
        return resolved

    def knows(self, name: str) -> bool:
        return name in self.loaded or name in self.extra

    def catalog(self) -> list[AdapterInfo]:
        """The adapters a request can use: under the root (not unloaded) and registered at
        runtime, each listed only if it loads into this model. Checks are cached by the
        files' size and modification time."""
        candidates = dict(self.extra)
        if self.root is not None:
            for config in self.root.rglob(CONFIG_NAME):
                name = str(config.parent.relative_to(self.root))
                if name not in self.unloaded and NAME.match(name):
                    candidates.setdefault(name, config.parent)
        listed = []
        for name, directory in sorted(candidates.items()):
            info = self._check(name, directory)
            if info is not None:
                listed.append(info)
        return listed

    def _check(self, name: str, directory: Path) -> AdapterInfo | None:
        try:
            if directory != self.extra.get(name):
                directory = self.resolve(name)
            stats = [(directory / f).stat() for f in (CONFIG_NAME, WEIGHTS_NAME)]
        except (StoreError, OSError):
            return None
        stamp = (str(directory), tuple((st.st_size, st.st_mtime_ns) for st in stats))
        if self.checked.get(name, (None,))[0] != stamp:  # new, or its files changed
            try:
                prepared = self.prepare(name, directory)
                rank = max(w.rank for w in prepared.weights.values())
                shown = str(directory.relative_to(self.root)) if self.root and self.root in directory.parents \
                    else str(directory)
                self.checked[name] = (stamp, AdapterInfo(name, shown, rank))
            except StoreError:
                self.checked[name] = (stamp, None)
        return self.checked[name][1]

    def prepare(self, name: str, path: Path) -> Prepared:
        """Read and check the adapter at ``path``; raises StoreError(422) if it does not fit."""
        try:
            adapter = read_adapter(path)
        except AdapterFileError as err:
            raise StoreError(str(err), 422) from None
        if not adapter_class(adapter.config).servable:
            raise StoreError(f"adapter {name!r} ({path}) is a {adapter_class(adapter.config).display} adapter: its "
                             "change is not the B·A·x a serving slot adds per request; merge it first (lorakit merge) "
                             "and serve the merged model", 422)
        problems, targets = [], []
        for layer_path, given in adapter.layers.items():
            layer = self.layers.get(layer_path)
            if not given.layout.servable:
                problems.append(f"{layer_path}: a {given.layout} layer is not served")
            elif layer is None:
                problems.append(f"{layer_path}: no such linear layer or expert tensor in this model (only those "
                                "are served)")
            else:
                config = adapter.config
                targets.append(Target(layer_path, layer.base_module, layer.layer_class, config.rank_for(layer_path),
                                      config.alpha_for(layer_path)))
        served = Adapter(adapter.config, {t.path: adapter.layers[t.path] for t in targets})
        problems += fit_problems(served, targets, tensor_key)  # the check loading into a model makes
        if adapter.saved:
            problems.append(f"modules_to_save {list(adapter.config.modules_to_save)} cannot be served per request")
        if problems or not targets:
            shown = problems[:10] or ["no LoRA weights"]
            raise StoreError(f"adapter {name!r} ({path}) does not fit this model: " + "; ".join(shown), 422)
        weights = {}
        for target in targets:  # a slot holds A and s·B in float32 (read_adapter refused NaN and infinity)
            value, device = adapter.layers[target.path], self.layers[target.path].weight.device
            weights[target.path] = value.replace({n: value.tensors[n].float().to(device) for n in ("lora_A", "lora_B")})
        nbytes = sum(w.nbytes for w in weights.values())
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise StoreError(f"adapter {name!r} needs {nbytes} bytes, more than the store's {self.max_bytes}", 422)
        return Prepared(name, path, weights, nbytes)

    # -- slots ---------------------------------------------------------------------
    def lease(self, name: str) -> Lease:
        """A lease on adapter ``name``'s slot (loading it if needed); release it when done."""
        return Lease(self, name, self.acquire(name))

    def lease_loaded(self, name: str) -> Lease | None:
        """A lease on ``name``'s slot if it is loaded already (no file read, no tensor touched), else None."""
        with self.lock:
            if name not in self.loaded or self.loaded[name].retiring:
                return None
            return Lease(self, name, self._use(name))

    def acquire(self, name: str) -> int:
        """The slot of adapter ``name``, loading it if needed; the caller must ``release`` it."""
        with self.lock:
            if name in self.loaded:
                return self._use(name)
        prepared = self.prepare(name, self.resolve(name))  # outside the lock: reading files is slow
        with self.lock:
            if name not in self.loaded:  # unless another request loaded it meanwhile
                self.install(prepared)
            return self._use(name)

    def _use(self, name: str) -> int:
        entry = self.loaded[name]
        if entry.retiring:
            raise StoreError(f"adapter {name!r} is being unloaded; retry later", 503)
        entry.users += 1
        self.loaded.move_to_end(name)
        return entry.slot

    def release(self, name: str) -> None:
        with self.lock:
            entry = self.loaded.get(name)
            if entry is None:
                return
            entry.users -= 1
            if entry.users == 0 and entry.retiring:
                self._evict(name)

    def install(self, prepared: Prepared) -> Loaded:
        """Put a prepared adapter into a free slot, evicting idle adapters (LRU) as needed. Holds the lock."""
        def over() -> bool:
            used = sum(e.nbytes for e in self.loaded.values())
            too_many = len(self.loaded) >= self.max_adapters
            too_big = self.max_bytes is not None and used + prepared.nbytes > self.max_bytes
            return too_many or too_big

        while over():
            idle = next((n for n, e in self.loaded.items() if e.users == 0), None)
            if idle is None:
                raise StoreError("every adapter slot is in use by requests in flight; retry later", 503)
            self._evict(idle)
        taken = {e.slot for e in self.loaded.values()}
        slot = next(i for i in range(self.capacity) if i not in taken)
        for path, weights in prepared.weights.items():
            self.layers[path].fill(slot, weights)
        entry = Loaded(slot, prepared.nbytes)
        self.loaded[prepared.name] = entry
        self.loads += 1
        return entry

    def _evict(self, name: str) -> None:
        slot = self.loaded.pop(name).slot
        self.evictions += 1
        for layer in self.layers.values():
            layer.empty(slot)

    def add_directory(self, name: str, path: str | os.PathLike) -> None:
        """Make the adapter directory ``path`` available as ``name``, wherever it is (the
        operator's own choice, e.g. ``lorakit generate --adapter``; requests never reach this)."""
        check_name(name)
        self.extra[name] = locate(path).resolve()

    def register(self, name: str, path: str) -> None:
        """vLLM's load_lora_adapter: make ``path`` (inside the root) available as ``name`` and load it."""
        check_name(name)
        resolved = self.resolve(name, path)
        prepared = self.prepare(name, resolved)
        with self.lock:
            if name in self.loaded or name in self.extra:
                raise StoreError(f"adapter {name!r} is already loaded", 400)
            self.install(prepared)  # may raise (503: every slot in use): then nothing has changed
            self.unloaded.discard(name)
            self.extra[name] = resolved

    def unregister(self, name: str) -> None:
        """vLLM's unload_lora_adapter: forget ``name``; its slot is freed as soon as no request
        in flight holds it (those finish with the adapter they started with). An adapter of
        the root stays unavailable until it is loaded again."""
        check_name(name)
        with self.lock:
            in_root = self.root is not None and (self.root / name / CONFIG_NAME).is_file()
            if name not in self.loaded and name not in self.extra and (not in_root or name in self.unloaded):
                raise StoreError(f"adapter {name!r} is not loaded", 404)
            if in_root:
                self.unloaded.add(name)
            self.extra.pop(name, None)
            entry = self.loaded.get(name)
            if entry is not None and entry.users == 0:
                self._evict(name)
            elif entry is not None:
                entry.retiring = True
