"""Adapter algebra on adapter values: exact sums and low-rank re-factoring.

    ΔW = Σ_i w_i · ΔW_i,   ΔW_i = s_i · B_i A_i

- ``cat`` (alias ``linear``): exact. The factors are stacked, A = [A_1; A_2; ...] and
  B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], so B A = Σ w_i s_i B_i A_i with rank Σ r_i. (PEFT's
  ``linear`` adds the A's and the B's separately, which is (Σ A_i)(Σ B_i) and carries
  cross-terms; lorakit never computes that.)
- ``svd``: the best rank-R approximation of the exact sum, without forming any
  out x in matrix: B = Q_B R_B and A^T = Q_A R_A (thin QR), then the SVD of the small
  (Σ r_i) x (Σ r_i) core R_B R_A^T = U S V^T gives ΔW = (Q_B U) S (Q_A V)^T; keeping the
  top R singular values is the Eckart-Young optimum. The kept fraction of ‖ΔW‖²_F is
  Σ_{k<R} S_k² / Σ S_k².

- ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties`` (Yadav et al. 2023,
  arXiv:2306.01708; Yu et al. 2023, arXiv:2311.03099) work on the exact task vectors
  τ_i = w_i ΔW_i of each module: keep the ``density`` largest |τ_i| (or, DARE, keep each
  entry with probability ``density`` and divide by it); TIES then elects a sign per entry
  (``majority_sign`` "total": of Σ τ_i, "frequency": of Σ sign τ_i) and averages the
  entries that agree with it. These are not low-rank, so the result is factored back to
  rank R by the SVD of the (out x in) matrix.

``compress`` is ``svd`` on one adapter, at a fixed rank or at the smallest rank that
keeps a given fraction of each module's energy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import Adapter, LayerWeights
from .config import config_for_layers
from .files import read_adapter
from .layouts import Layout
from .variants import adapter_class, lora_value

AdapterLike = Adapter | str | os.PathLike

METHODS = ("cat", "linear", "svd", "magnitude_prune", "ties", "dare_linear", "dare_ties")
DENSE = ("magnitude_prune", "ties", "dare_linear", "dare_ties")


class CombineError(ValueError):
    """Adapters that cannot be combined as asked; nothing was written."""


@dataclass(frozen=True)
class Combination:
    adapter: Adapter
    kept: dict[str, float]  # module path -> fraction of ‖ΔW‖²_F kept (1.0 for exact methods)


def combine(adapters: Sequence[AdapterLike], weights: Sequence[float] | None = None, method: str = "cat",
            rank: int | None = None, density: float = 1.0, majority_sign: str = "total",
            seed: int = 0) -> Combination:
    """Σ w_i ΔW_i of ``adapters`` per module (a module missing from one adapter adds nothing),
    or its pruned / sign-elected form (``DENSE`` methods, factored to ``rank``). ``adapters``:
    values or adapter directories."""
    if not adapters:
        raise CombineError("no adapters to combine")
    adapters = [as_adapter(adapter) for adapter in adapters]
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise CombineError(f"{len(weights)} weights for {len(adapters)} adapters")
    if method not in METHODS:
        raise CombineError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("svd", *DENSE) and (rank is None or rank < 1):
        raise CombineError(f"{method} needs a rank >= 1, got {rank}")
    if not 0 < density <= 1:
        raise CombineError(f"density must be in (0, 1], got {density}")
    if majority_sign not in ("total", "frequency"):
        raise CombineError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    for i, adapter in enumerate(adapters):
        if adapter.saved:
            raise CombineError(f"adapter {i}: modules_to_save cannot be combined")
        if not adapter_class(adapter.config).combinable:
            raise CombineError(f"adapter {i} is a {adapter.config.variant.upper()} adapter: its change of W is not a "
                               "sum of low-rank terms; merge it into the base (lorakit merge) instead")
    stacked = _stack(adapters, weights)
    if method in ("cat", "linear"):
        return Combination(with_unit_scaling(stacked), {path: 1.0 for path in stacked})
    if method in DENSE:
        generator = torch.Generator().manual_seed(seed)
        return _combination({path: _dense_merge(adapters, weights, path, layer.layout, method, rank, density,
                                                majority_sign, generator) for path, layer in stacked.items()})
    return _combination({path: _truncate(layer, rank) for path, layer in stacked.items()})


def compress(adapter: AdapterLike, rank: int | None = None, energy: float | None = None) -> Combination:
    """``adapter`` re-factored to ``rank`` (at most) per module, or per module to the smallest
    rank that keeps ``energy`` of its ‖ΔW‖²_F."""
    if (rank is None) == (energy is None):
        raise CombineError("give exactly one of rank and energy")
    if rank is not None and rank < 1:
        raise CombineError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise CombineError(f"energy must be in (0, 1], got {energy}")
    adapter = as_adapter(adapter)
    if adapter.saved:
        raise CombineError("modules_to_save cannot be compressed")
    if not adapter_class(adapter.config).combinable:
        raise CombineError(f"a {adapter.config.variant.upper()} adapter cannot be compressed (its magnitude is "
                           "tied to its direction)")
    return _combination({path: _truncate(layer, rank, energy) for path, layer in _stack([adapter], [1.0]).items()})


def as_adapter(adapter: AdapterLike) -> Adapter:
    """An adapter value as it is, or read from its directory."""
    return adapter if isinstance(adapter, Adapter) else read_adapter(adapter)


def _combination(factored: dict[str, tuple[LayerWeights, float]]) -> Combination:
    layers = {path: f[0] for path, f in factored.items()}
    return Combination(with_unit_scaling(layers), {path: f[1] for path, f in factored.items()})


def _stack(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, LayerWeights]:
    """Per module, one factor pair whose B A is Σ w_i s_i B_i A_i exactly (scaling 1)."""
    paths = sorted({path for adapter in adapters for path in adapter.layers})
    stacked, problems = {}, []
    for path in paths:
        parts = [(i, adapter.layers[path], w) for i, (adapter, w) in enumerate(zip(adapters, weights))
                 if path in adapter.layers]
        first = parts[0][1]
        misfits = [(i, layer) for i, layer, _ in parts[1:] if layer.layout != first.layout
                   or _without_rank(layer.A, layer, 0) != _without_rank(first.A, first, 0)
                   or _without_rank(layer.B, layer, 1) != _without_rank(first.B, first, 1)]
        problems += [f"{path}: adapter {i} has A {tuple(layer.A.shape)}, B {tuple(layer.B.shape)} ({layer.layout}); "
                     f"adapter {parts[0][0]} has A {tuple(first.A.shape)}, B {tuple(first.B.shape)} "
                     f"({first.layout}): not the same base model" for i, layer in misfits]
        if misfits:
            continue
        batch = first.layout.batch_dims  # experts: A (E, r, in), B (E, out, r), the rank one axis further in
        A = torch.cat([layer.A.float() for _, layer, _ in parts], dim=batch)
        B = torch.cat([layer.B.float() * (w * layer.scaling) for _, layer, w in parts], dim=1 + batch)
        stacked[path] = lora_value(A, B, 1.0, first.layout)
    if problems:
        raise CombineError("adapters do not fit together:\n  " + "\n  ".join(problems[:10]))
    return stacked


def _without_rank(factor: Tensor, layer: LayerWeights, axis: int) -> tuple[int, ...]:
    """``factor``'s shape without its rank axis (``axis`` for one matrix, one further in for experts)."""
    axis += layer.layout.batch_dims
    return tuple(factor.shape[:axis]) + tuple(factor.shape[axis + 1:])


def task_vectors(adapters: Sequence[Adapter], weights: Sequence[float], path: str) -> list[Tensor]:
    """w_i ΔW_i of every adapter that has module ``path`` (float32, laid out like the weight)."""
    return [w * adapter.layers[path].delta() for adapter, w in zip(adapters, weights) if path in adapter.layers]


def prune(tau: Tensor, method: str, density: float, generator: torch.Generator) -> Tensor:
    """One task vector trimmed to its ``density`` largest magnitudes, or DARE-dropped and rescaled."""
    if density >= 1:
        return tau
    if method.startswith("dare"):
        keep = torch.rand(tau.shape, generator=generator) < density
        return torch.where(keep, tau / density, torch.zeros_like(tau))
    k = max(1, int(density * tau.numel()))
    threshold = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect_and_merge(taus: Tensor, majority_sign: str) -> Tensor:
    """TIES: per entry, the sign of the total (or of the count of signs), then the mean of the
    task values that agree with it (entries with no agreeing task stay zero)."""
    votes = taus.sum(dim=0) if majority_sign == "total" else torch.sign(taus).sum(dim=0)
    agree = torch.sign(taus) == torch.where(votes >= 0, 1.0, -1.0)
    agree &= taus != 0
    return (taus * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _dense_merge(adapters: Sequence[Adapter], weights: Sequence[float], path: str, layout: Layout, method: str,
                 rank: int, density: float, majority_sign: str,
                 generator: torch.Generator) -> tuple[LayerWeights, float]:
    """A pruning method's ΔW of module ``path``, factored to rank ``rank`` by a dense SVD."""
    taus = [prune(tau, method, density, generator) for tau in task_vectors(adapters, weights, path)]
    merged = elect_and_merge(torch.stack(taus), majority_sign) if method.endswith("ties") else sum(taus)
    U, S, Vh = torch.linalg.svd(layout.matrix(merged).double(), full_matrices=False)  # (out, in)
    return _factors(U, S, Vh, rank, layout, tuple(merged.shape))


def _truncate(layer: LayerWeights, rank: int | None, energy: float | None = None) -> tuple[LayerWeights, float]:
    """The best rank-``rank`` (or ``energy``) factors of B A, by QR of the factors and an SVD
    of their small core; and the fraction of ‖B A‖²_F they keep."""
    U, S, Vh = factored_svd(layer)
    if energy is not None:
        rank = rank_for_energy(S, energy)
    return _factors(U, S, Vh, rank, layer.layout, layer.update_shape())


def rank_for_energy(S: Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares hold ``energy`` of the total (for a
    stack of experts' values, the most any of them needs: they share one rank)."""
    if S.dim() > 1:
        return max(rank_for_energy(row, energy) for row in S)
    cumulative = torch.cumsum(S**2, 0) / max(float((S**2).sum()), 1e-300)
    return min(len(S), int((cumulative < energy - 1e-12).sum()) + 1)


def factored_svd(layer: LayerWeights) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD U S Vh of s·B·A (out x in; a Conv2d's in is in·kh·kw), in float64, with
    U (out, R), S (R,), Vh (R, in): a QR of each factor and an SVD of the (R x R) core
    R_B R_A^T, never the out x in matrix."""
    batch = layer.layout.batch_dims  # a stack of E of them (experts): every step below is batched
    A = layer.A.reshape(*layer.A.shape[:batch + 1], -1)  # (R, in), a Conv2d's in being in·kh·kw
    B = layer.B.reshape(*layer.B.shape[:batch + 2]) * layer.scaling  # (out, R)
    Q_B, R_B = torch.linalg.qr(B.double())  # (out, R), (R, R)
    Q_A, R_A = torch.linalg.qr(A.double().mT)  # (in, R), (R, R)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.mT)
    return Q_B @ U, S, Vh @ Q_A.mT


def _factors(U: Tensor, S: Tensor, Vh: Tensor, rank: int, layout: Layout,
             weight_shape: tuple[int, ...]) -> tuple[LayerWeights, float]:
    """B = U_k sqrt(S_k), A = sqrt(S_k) Vh_k from an SVD U S Vh of s·B·A (out, in), the top
    k = ``rank`` values kept, shaped as ``layout``'s pair for a weight of ``weight_shape``;
    and the fraction of ‖ΔW‖²_F they keep."""
    keep = max(1, min(rank, S.shape[-1]))
    root = S[..., :keep].sqrt()  # (k,), or (E, k) for experts
    total = float((S**2).sum())
    kept = float((S[..., :keep] ** 2).sum()) / total if total > 0 else 1.0
    B = (U[..., :keep] * root[..., None, :]).float()  # (out, k)
    A = (root[..., :, None] * Vh[..., :keep, :]).float()  # (k, in)
    A, B = layout.pair(A, B, weight_shape)
    return lora_value(A, B, 1.0, layout), kept


def with_unit_scaling(layers: dict[str, LayerWeights]) -> Adapter:
    """An adapter over ``layers`` whose scaling is 1 everywhere (alpha = r per module): the
    most common rank is ``r``, the others go to rank_pattern / alpha_pattern."""
    ranks = {path: layer.rank for path, layer in layers.items()}
    return Adapter(config_for_layers(ranks, {path: float(rank) for path, rank in ranks.items()}), layers)

