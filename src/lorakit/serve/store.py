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

import torch
from torch import Tensor, nn

from ..files import PREFIX, AdapterFileError, read_config, read_tensors
from ..layers import lora_scaling
from .pool import LoraWeights
from .slots import SlotLinear, slot_layers

NAME = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def _finite(tensor: Tensor) -> bool:
    low, high = torch.aminmax(tensor)  # one pass; NaN and inf reach the min or the max
    return bool(torch.isfinite(low) and torch.isfinite(high))


class StoreError(ValueError):
    """An adapter request that cannot be served; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise StoreError(f"adapter name {name!r} has characters other than letters, digits, . _ - /", 400)


@dataclass
class Prepared:
    """An adapter read and checked against the model, not yet in a slot."""

    name: str
    path: Path
    weights: dict[str, LoraWeights]  # layer path -> weights
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
        self.root = Path(root).resolve() if root is not None else None
        self.layers: dict[str, SlotLinear] = slot_layers(model)
        self.capacity = model.lorakit_router.capacity
        self.max_adapters = min(max_adapters, self.capacity)
        self.max_bytes = max_bytes
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()  # least recently used first
        self.extra: dict[str, Path] = {}  # adapters registered at runtime (load_lora_adapter)
        self.lock = threading.Lock()

    # -- names and files -----------------------------------------------------------
    def resolve(self, name: str, path: str | None = None) -> Path:
        """The directory of adapter ``name`` (or of ``path``), confined to the root."""
        if name in self.extra and path is None:
            return self.extra[name]
        if self.root is None:
            raise StoreError(f"no adapter named {name!r} (and no adapter root)", 404)
        relative = path if path is not None else name
        if not isinstance(relative, str) or not relative or os.path.isabs(relative) or ".." in Path(relative).parts:
            raise StoreError(f"adapter path {relative!r} must be a relative path inside the adapter root", 400)
        if path is None:
            check_name(relative)
        resolved = (self.root / relative).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise StoreError(f"adapter {relative!r} leads outside the adapter root", 400)
        if not (resolved / "adapter_config.json").is_file():
            raise StoreError(f"no adapter named {relative!r}", 404)
        return resolved

    def available(self) -> list[str]:
        """Adapter names under the root (directories with an adapter_config.json), and runtime ones."""
        if self.root is None:
            return sorted(self.extra)
        found = {str(p.parent.relative_to(self.root)) for p in self.root.rglob("adapter_config.json")
                 if self.root in p.resolve().parents}
        return sorted(found | set(self.extra))

    def prepare(self, name: str, path: Path) -> Prepared:
        """Read and check the adapter at ``path``; raises StoreError(422) if it does not fit."""
        try:
            config = read_config(path)
            tensors = read_tensors(path)
        except AdapterFileError as err:
            raise StoreError(str(err), 422) from None
        pairs: dict[str, dict[str, object]] = {}
        problems = []
        for key, tensor in tensors.items():
            match = re.match(rf"^{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight$", key)
            if match is None:
                problems.append(f"{key}: only lora_A / lora_B of linear layers can be served")
                continue
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
        weights: dict[str, LoraWeights] = {}
        for layer_path, pair in pairs.items():
            layer = self.layers.get(layer_path)
            if layer is None:
                problems.append(f"{layer_path}: no such linear layer in this model")
                continue
            if set(pair) != {"A", "B"}:
                problems.append(f"{layer_path}: needs both lora_A and lora_B")
                continue
            A, B = pair["A"].float(), pair["B"].float()
            if not (_finite(A) and _finite(B)):  # it would poison other adapters' rows too
                problems.append(f"{layer_path}: lora_A or lora_B has NaN or infinite values")
                continue
            rank = config.rank_for(layer_path)
            if tuple(A.shape) != (rank, layer.in_features) or tuple(B.shape) != (layer.out_features, rank):
                problems.append(f"{layer_path}: A {tuple(A.shape)}, B {tuple(B.shape)}; expected A "
                                f"{(rank, layer.in_features)}, B {(layer.out_features, rank)}")
                continue
            scaling = lora_scaling(config.alpha_for(layer_path), rank, config.use_rslora)
            weights[layer_path] = LoraWeights(A.to(layer.weight.device), B.to(layer.weight.device), scaling)
        if config.modules_to_save:
            problems.append(f"modules_to_save {list(config.modules_to_save)} cannot be served per request")
        if problems or not weights:
            shown = problems[:10] or ["no LoRA weights"]
            raise StoreError(f"adapter {name!r} ({path}) does not fit this model: " + "; ".join(shown), 422)
        nbytes = sum(w.nbytes for w in weights.values())
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise StoreError(f"adapter {name!r} needs {nbytes} bytes, more than the store's {self.max_bytes}", 422)
        return Prepared(name, path, weights, nbytes)

    # -- slots ---------------------------------------------------------------------
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
        return entry

    def _evict(self, name: str) -> None:
        slot = self.loaded.pop(name).slot
        for layer in self.layers.values():
            layer.empty(slot)

    def add_directory(self, name: str, path: str | os.PathLike) -> None:
        """Make the adapter directory ``path`` available as ``name``, wherever it is (the
        operator's own choice, e.g. ``lorakit generate --adapter``; requests never reach this)."""
        check_name(name)
        self.extra[name] = Path(path).resolve()

    def register(self, name: str, path: str) -> None:
        """vLLM's load_lora_adapter: make ``path`` (inside the root) available as ``name`` and load it."""
        check_name(name)
        resolved = self.resolve(name, path)
        prepared = self.prepare(name, resolved)
        with self.lock:
            if name in self.loaded or name in self.extra:
                raise StoreError(f"adapter {name!r} is already loaded", 400)
            self.extra[name] = resolved
            self.install(prepared)

    def unregister(self, name: str) -> None:
        """vLLM's unload_lora_adapter: forget ``name``; its slot is freed as soon as no request
        in flight holds it (those finish with the adapter they started with)."""
        with self.lock:
            if name not in self.loaded and name not in self.extra:
                raise StoreError(f"adapter {name!r} is not loaded", 404)
            self.extra.pop(name, None)
            entry = self.loaded.get(name)
            if entry is not None and entry.users == 0:
                self._evict(name)
            elif entry is not None:
                entry.retiring = True
