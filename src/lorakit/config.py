"""LoRA configuration and the rules that pick which modules get an adapter.

Each targeted module W gets W' = W + (alpha / rank) * B @ A (Hu et al., 2021,
arXiv:2106.09685), or alpha / sqrt(rank) with rsLoRA (Kalajdzievski, 2023,
arXiv:2312.03732). Target matching follows PEFT's rules so that a config means the
same module set in both libraries:

- a list of names matches a module whose path equals a name or ends with "." + name;
- a single string other than "all-linear" is a regular expression matched against
  the whole module path;
- ``rank_pattern`` / ``alpha_pattern`` keys are regular expressions matched against
  the end of the path (``(.*\\.)?(key)$``); the first key that matches wins.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

ALL_LINEAR = "all-linear"
# The one registry of kinds of adapter, filled by variants/ (its kinds, and the inits some of them
# take over) and by variants.register / register_init:
KINDS: dict[str, type] = {}  # LoraConfig.variant -> the adapter class (variants/kind.py)
INITS: list[str] = ["default", "gaussian"]  # every init by name; these two are every kind's
INIT_KINDS: dict[str, tuple[re.Pattern[str], type]] = {}  # an init (or family) -> (its names, the kind taking it over)

# Named target sets for image models. "attention" is what diffusers' DreamBooth-LoRA
# scripts train: a UNet's or DiT's attention projections (to_q/k/v, to_out.0, and the
# DiT's context projections) and the CLIP text encoder's (q/k/v/out_proj).
# "attention-conv" adds the resnets' and resamplers' convolutions, 3x3 kernels included,
# as kohya's LoCon files do.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "q_proj", "k_proj", "v_proj", "out_proj")
TARGET_SETS = {
    "attention": ATTENTION,
    "attention-conv": ATTENTION + ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"),
}


class ConfigError(ValueError):
    """A LoraConfig value is out of range or of the wrong kind."""



def known_init(init: str) -> bool:
    """Whether ``init`` is a registered init."""
    return init in INITS or init_kind(init) is not None


def init_kind(init: str) -> type | None:
    """The kind that takes ``init`` over (None: the variant's own kind draws it)."""
    return next((kind for names, kind in INIT_KINDS.values() if names.fullmatch(init)), None)


def init_names() -> str:
    """Every init, as messages name them."""
    return ", ".join(dict.fromkeys([*INITS, *INIT_KINDS]))


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank

@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    Args:
        rank: r, the inner dimension of B @ A.
        alpha: numerator of the scaling alpha / r (often 2 * rank).
        dropout: dropout probability on the adapter's input, 0 <= p < 1.
        targets: "all-linear" (every Linear / GPT-2 Conv1D except the output head, and
            the fused expert tensors of MoE blocks; PEFT's set, except that PEFT 0.21 also
            adapts a transformers-5 MoE router's weight, ``mlp.gate``, which lorakit leaves
            to the base so an adapted model routes tokens as its base does), a target
            set ("attention", "attention-conv": ``TARGET_SETS``), a list of module names
            or path suffixes, or one regular expression.
        exclude: names / suffixes (or one regex) never adapted, even if targeted.
        layers: only adapt modules inside these transformer block indices.
        layers_pattern: the name of the block list ("layers", "h") used with
            ``layers``; by default the first numbered path segment.
        rank_pattern: regex -> rank overrides for matching modules.
        alpha_pattern: regex -> alpha overrides for matching modules.
        use_rslora: scale by alpha / sqrt(rank) instead of alpha / rank.
        init: "default" (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r)), or
            "pissa" / "pissa_niter_K" / "olora" (A and B from W's SVD / QR, moved out of W).
        variant: "lora", "dora" (a learned magnitude per output unit; dora.py), or the
            LyCORIS kinds "loha" / "lokr" (Hadamard / Kronecker products; lycoris.py).
        modules_to_save: modules trained in full and stored in the adapter file
            (e.g. a classification head).
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ALL_LINEAR
    exclude: str | tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    layers_pattern: str | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "default"
    variant: str = "lora"
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples so the config is hashable-ish
        # and cannot be mutated behind an attached adapter's back.
        if isinstance(self.targets, str) and self.targets in TARGET_SETS:
            object.__setattr__(self, "targets", TARGET_SETS[self.targets])
        for name in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        self._validate()

    def _validate(self) -> None:
        _check_rank("rank", self.rank)
        _check_alpha("alpha", self.alpha)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not known_init(self.init):
            raise ConfigError(f"init must be one of {init_names()}, got {self.init!r}")
        if self.variant not in KINDS:
            raise ConfigError(f"variant must be one of {tuple(KINDS)}, got {self.variant!r}")
        owner, kind = init_kind(self.init), KINDS[self.variant]
        if owner is not None and not issubclass(owner, kind):  # an init that starts another kind of adapter
            raise ConfigError(f"init {self.init!r} with {kind.display} is not supported (it starts a "
                              f"{owner.display} adapter, which computes from a part of W moved into it)")
        if isinstance(self.targets, str):
            if self.targets != ALL_LINEAR:
                _check_regex("targets", self.targets)
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"targets must be '{ALL_LINEAR}', a regex or a non-empty list of names, got {self.targets!r}")
        if isinstance(self.exclude, str):
            _check_regex("exclude", self.exclude)
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ConfigError(f"layers must be non-negative block indices, got {self.layers!r}")
        for key, rank in self.rank_pattern.items():
            _check_regex("rank_pattern key", key)
            _check_rank(f"rank_pattern[{key!r}]", rank)
        for key, alpha in self.alpha_pattern.items():
            _check_regex("alpha_pattern key", key)
            _check_alpha(f"alpha_pattern[{key!r}]", alpha)

    def is_target(self, path: str) -> bool:
        """Whether the module at ``path`` is named by ``targets`` (type not checked here)."""
        if _matches_names(self.exclude, path) or self.saves(path):
            return False
        if self.targets == ALL_LINEAR:
            found = True  # the caller restricts all-linear to linear layers
        elif isinstance(self.targets, str):
            found = re.fullmatch(self.targets, path) is not None
        else:
            found = _matches_names(self.targets, path)
        return found and self._in_layers(path)

    def excludes(self, path: str) -> bool:
        """Whether ``exclude`` names the module at ``path``."""
        return _matches_names(self.exclude, path)

    def saves(self, path: str) -> bool:
        """Whether ``path`` is one of ``modules_to_save``."""
        return any(names_module(m, path) for m in self.modules_to_save)

    def scaling(self, alpha: float, rank: int) -> float:
        return lora_scaling(alpha, rank, self.use_rslora)

    def scaling_for(self, path: str) -> float:
        return self.scaling(self.alpha_for(path), self.rank_for(path))

    def rank_for(self, path: str) -> int:
        return _pattern_value(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        return _pattern_value(self.alpha_pattern, path, self.alpha)

    def _in_layers(self, path: str) -> bool:
        if self.layers is None:
            return True
        if self.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){self.layers_pattern}\.(\d+)\.", path)
        else:
            match = re.match(r".*?\.[^.]*\.(\d+)\.", path)
        return match is not None and int(match.group(1)) in self.layers


def config_for_layers(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> LoraConfig:
    """The LoraConfig whose targets are exactly these module paths: the commonest rank and
    alpha, and for each module that differs a pattern anchored to its path alone."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    exact = {path: "^" + re.escape(path) for path in ranks}
    return LoraConfig(rank=rank, alpha=alpha, targets=tuple(ranks),
                      rank_pattern={exact[p]: r for p, r in ranks.items() if r != rank},
                      alpha_pattern={exact[p]: a for p, a in alphas.items() if a != alpha})


def _matches_names(names: str | tuple[str, ...], path: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(names_module(n, path) for n in names)


def names_module(name: str, path: str) -> bool:
    """PEFT's rule for a listed name: the whole path, or its last dotted parts."""
    return path == name or path.endswith("." + name)


def _pattern_value(patterns: Mapping[str, float], path: str, default: float):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _check_rank(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")


def _check_alpha(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{what} must be a number > 0, got {value!r}")


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression: {err}") from None

