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

import re

from .. import config as _config
from ..config import ConfigError, LoraConfig, init_kind
from .dora import DoraAdapter
from .kind import Kind
from .lora import LoraAdapter, lora_value
from .lycoris import LohaAdapter, LokrAdapter, ProductAdapter
from .principal import PISSA_NITER, PrincipalAdapter

__all__ = ["Kind", "LoraAdapter", "DoraAdapter", "PrincipalAdapter", "LohaAdapter", "LokrAdapter", "ProductAdapter",
           "VARIANTS", "adapter_class", "register", "register_init", "unregister", "tensor_names", "kind_name",
           "lora_value"]

VARIANTS = _config.KINDS  # LoraConfig.variant -> the adapter class each layer gets (the one registry)


def register(name: str, kind: type[Kind], display: str | None = None) -> None:
    """Make ``LoraConfig(variant=name)`` build ``kind`` adapters (``display``: its name in
    messages, where the class says none)."""
    if not (isinstance(kind, type) and issubclass(kind, Kind)):
        raise TypeError(f"a variant is a subclass of lorakit.variants.Kind, got {kind!r}")
    if "display" not in vars(kind):
        kind.display = display or name
    VARIANTS[name] = kind


def register_init(name: str, kind: type[Kind], names: str | None = None) -> None:
    """Make ``LoraConfig(init=name)`` start ``kind`` adapters (``names``: a regular expression
    of a family of inits shown as ``name``; ``kind`` a subclass of the variant it is an init of)."""
    _config.INIT_KINDS[name] = (re.compile(names or re.escape(name)), kind)
    if names is None:
        _config.INITS.append(name)


def unregister(name: str) -> None:
    """Forget the kind registered as ``name``."""
    kind = VARIANTS.pop(name)
    if vars(kind).get("display") == name:
        del kind.display


def adapter_class(config: LoraConfig) -> type[Kind]:
    """The adapter class ``config`` asks for (its variant's, or that of the init it takes)."""
    kind = VARIANTS.get(config.variant)
    if kind is None:  # a name LoraConfig knows but no class was registered for
        raise ConfigError(f"variant {config.variant!r} has no adapter class; known: {', '.join(VARIANTS)}")
    return init_kind(config.init) or kind


for _name, _kind in {"lora": LoraAdapter, "dora": DoraAdapter, "loha": LohaAdapter, "lokr": LokrAdapter}.items():
    register(_name, _kind)
register_init("pissa", PrincipalAdapter)
register_init("olora", PrincipalAdapter)
register_init("pissa_niter_K", PrincipalAdapter, PISSA_NITER.pattern)


def tensor_names() -> set[str]:
    """The file key suffixes of every registered kind's tensors."""
    return {name for kind in VARIANTS.values() for name in kind.names()}


def kind_name(kind: type[Kind]) -> str:
    """The variant name ``kind`` is registered under (a PiSSA/OLoRA adapter's: lora)."""
    return next((name for name, known in VARIANTS.items() if known is kind),
                next(name for name, known in VARIANTS.items() if issubclass(kind, known)))
