"""The kinds of adapter, each a module class that owns its behaviour (lora.py names the hooks).

    lora       W + s·B·A                                  lora.py
    dora       m ⊙ (W + s·B·A) / ‖W + s·B·A‖              dora.py
    pissa/olora inits: plain LoRA that starts as part of W  principal.py
    loha       W + s·(W1a W1b) ⊙ (W2a W2b)                lycoris.py
    lokr       W + s·W1 ⊗ (W2a W2b)                       lycoris.py

``adapter_class(config)`` is the one place that maps a config to its class; the rest of
lorakit asks that class (kind.py lists what it is asked), never its name. ``register``
adds a kind (a subclass of ``Kind``) under a new name; a layout is registered in layouts.py.
"""

from __future__ import annotations

from .. import config as _config
from ..config import ConfigError, LoraConfig
from .dora import DoraAdapter
from .kind import Kind
from .lora import LoraAdapter, lora_value
from .lycoris import LohaAdapter, LokrAdapter, ProductAdapter
from .principal import PrincipalAdapter, moves_weight

__all__ = ["Kind", "LoraAdapter", "DoraAdapter", "PrincipalAdapter", "LohaAdapter", "LokrAdapter", "ProductAdapter",
           "VARIANTS", "adapter_class", "register", "tensor_names", "kind_name", "lora_value"]

# LoraConfig.variant -> the adapter class each layer gets
VARIANTS: dict[str, type[Kind]] = {"lora": LoraAdapter, "dora": DoraAdapter, "loha": LohaAdapter,
                                   "lokr": LokrAdapter}


def register(name: str, kind: type[Kind], display: str | None = None) -> None:
    """Make ``LoraConfig(variant=name)`` build ``kind`` adapters (``display``: its name in messages)."""
    if not (isinstance(kind, type) and issubclass(kind, Kind)):
        raise TypeError(f"a variant is a subclass of lorakit.variants.Kind, got {kind!r}")
    VARIANTS[name] = kind
    _config.VARIANTS[name] = display or name


def adapter_class(config: LoraConfig) -> type[Kind]:
    """The adapter class ``config`` asks for (its variant; PiSSA/OLoRA by its init)."""
    kind = VARIANTS.get(config.variant)
    if kind is None:  # a name LoraConfig knows but no class was registered for
        raise ConfigError(f"variant {config.variant!r} has no adapter class; known: {', '.join(VARIANTS)}")
    return PrincipalAdapter if moves_weight(config.init) else kind


def tensor_names() -> set[str]:
    """The file key suffixes of every registered kind's tensors."""
    return {name for kind in VARIANTS.values() for name in kind.names()}


def kind_name(kind: type[Kind]) -> str:
    """The variant name ``kind`` is registered under (a PiSSA/OLoRA adapter's: lora)."""
    return next((name for name, known in VARIANTS.items() if known is kind),
                next(name for name, known in VARIANTS.items() if issubclass(kind, known)))
