"""What an adapter learned, module by module, and which rank it needs.

Per module, the singular values S of ΔW = s·B·A come from the factors (a QR of each and an
SVD of the r x r core, ``combine.factored_svd``), never from the out x in matrix. From them:

- energy ‖ΔW‖²_F = Σ S_k², and the fewest singular values holding 90 % / 99 % of it;
- effective rank exp(H(p)), p_k = S_k / Σ S (Roy & Vetterli 2007): r when all directions
  are used equally, 1 when one dominates;
- stable rank ‖ΔW‖²_F / ‖ΔW‖²_2 = Σ S_k² / S_1²;
- ‖ΔW‖_F / ‖W‖_F, when the base model's weights are given.

With a second adapter, the subspace similarity of the LoRA paper (Hu et al. 2021, §7) per
common module: with V_1, V_2 the right-singular vectors of A_1 and A_2 (rows of Vh, strongest
first), φ(i, j) = ‖V_1[:i] V_2[:j]^T‖²_F / min(i, j): 1 when the top directions of one lie in
the top directions of the other, about max(i, j) / in for unrelated random ones.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import frozen
from .adapter import LayerWeights
from .combine import AdapterLike, as_adapter, factored_svd, rank_for_energy

ENERGIES = (0.9, 0.99)
BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # "model.layers.11.self_attn.q_proj" -> block 11, "self_attn.q_proj"


def module_stats(layer: LayerWeights, weight: Tensor | None = None) -> dict[str, Any]:
    """The numbers above for one module (``weight``: the base weight it changes, any layout).
    A fused-experts tensor has one spectrum per expert: its singular values are their root
    mean square, its effective and stable ranks their means, its rank_90/99 the most any
    expert needs."""
    S = factored_svd(layer)[1]
    spectra = S if S.dim() > 1 else S[None]  # (E, R); one row for an ordinary module
    energy = float((S**2).sum())
    shown = S.square().mean(0).sqrt() if S.dim() > 1 else S
    stats: dict[str, Any] = {"rank": layer.rank, "singular_values": shown.tolist(), "energy": energy}
    if S.dim() > 1:
        stats["experts"] = S.shape[0]
    trained = [row for row in spectra if float(row.sum()) > 0]
    if not trained:  # an untrained adapter (B = 0): no direction at all
        stats.update(effective_rank=0.0, stable_rank=0.0, **{f"rank_{round(e * 100)}": 0 for e in ENERGIES})
    else:
        stats.update(effective_rank=sum(map(_effective_rank, trained)) / len(trained),
                     stable_rank=sum(float((row**2).sum()) / float(row[0]) ** 2 for row in trained) / len(trained),
                     **{f"rank_{round(e * 100)}": rank_for_energy(S, e) for e in ENERGIES})
    if weight is not None:
        stats["relative_norm"] = math.sqrt(energy) / float(frozen.dense(weight).norm())
    return stats


def _effective_rank(S: Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli, 2007)."""
    p = S / S.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def subspace_similarity(A1: Tensor, A2: Tensor, experts: bool = False) -> Tensor:
    """φ(i, j) for i = 1..r_1, j = 1..r_2 (row i-1, column j-1); for ``experts`` (A (E, r, in))
    the mean over experts of each expert's own."""
    if experts:
        return torch.stack([subspace_similarity(a1, a2) for a1, a2 in zip(A1, A2)]).mean(0)
    V1 = torch.linalg.svd(A1.reshape(A1.shape[0], -1).double(), full_matrices=False)[2]
    V2 = torch.linalg.svd(A2.reshape(A2.shape[0], -1).double(), full_matrices=False)[2]
    overlap = (V1 @ V2.T) ** 2  # (r_1, r_2); its (i, j) prefix sums are ‖V_1[:i] V_2[:j]^T‖²_F
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return overlap.cumsum(0).cumsum(1) / torch.minimum(i, j)


def analyze(adapter: AdapterLike, other: AdapterLike | None = None, base: nn.Module | None = None) -> dict[str, Any]:
    """The report ``lorakit analyze`` writes as analysis.json (see the module's docstring)."""
    first = as_adapter(adapter)
    weights = {}
    if base is not None:
        missing = [p for p in first.layers if _base_weight(base, p) is None]
        if missing:
            raise ValueError(f"the base model has no weight for {missing[0]} (and {len(missing) - 1} more): "
                             "is it the model this adapter was trained on?")
        weights = {path: _base_weight(base, path) for path in first.layers}
    modules = {path: module_stats(first.layers[path], weights.get(path)) for path in sorted(first.layers, key=_order)}
    report: dict[str, Any] = {"modules": modules, "summary": summary(modules)}
    if other is not None:
        second = as_adapter(other)
        common = [p for p in modules if p in second.layers]
        if not common:
            raise ValueError("the two adapters share no module: nothing to compare")
        report["similarity"] = {path: subspace_similarity(first.layers[path].A, second.layers[path].A,
                                                          first.layers[path].layout.batch_dims > 0).tolist()
                                for path in common}
    return report


def summary(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The verdict: the smallest power-of-two rank that keeps ≥ 99 % of the update in at least
    90 % of the modules, and how many it keeps that way."""
    trained = {p: s for p, s in modules.items() if s["energy"] > 0}
    if not trained:
        return {"modules": len(modules), "verdict": "every update is zero: the adapter is untrained"}
    needed = sorted(s["rank_99"] for s in trained.values())
    top = max(s["rank"] for s in trained.values())
    candidates = [2**k for k in range(int(math.log2(top)) + 1) if 2**k < top] + [top]
    rank = next(k for k in candidates if sum(n <= k for n in needed) >= 0.9 * len(needed))
    kept = sum(n <= rank for n in needed)
    effective = sorted(s["effective_rank"] for s in trained.values())
    if rank < top:
        verdict = (f"rank {rank} would keep >= 99 % of the update in {kept} of {len(trained)} modules "
                   f"(it has rank {top})")
    else:
        lower = candidates[-2] if len(candidates) > 1 else top
        verdict = (f"the update uses its full rank {top}: rank {lower} would keep >= 99 % of it in only "
                   f"{sum(n <= lower for n in needed)} of {len(trained)} modules")
    verdict += f"; median effective rank {effective[len(effective) // 2]:.1f}"
    return {"modules": len(modules), "trained_modules": len(trained), "rank": rank, "kept_99": kept,
            "median_rank_99": needed[len(needed) // 2], "median_effective_rank": effective[len(effective) // 2],
            "verdict": verdict}


def report_files(report: dict[str, Any], sources: Sequence[str]) -> dict[str, bytes]:
    """analysis.json and the pictures, as file name -> bytes."""
    files = {"analysis.json": json.dumps({"sources": list(sources), **report}, indent=1).encode() + b"\n",
             "spectra.png": _spectra(report["modules"]), "effective_rank.png": _heat_map(report["modules"])}
    if "similarity" in report:
        files["similarity.png"] = _similarity(report["similarity"])
    return files


def write_report(report: dict[str, Any], sources: Sequence[str], out: str | os.PathLike) -> Path:
    from .files import write_directory

    return write_directory(out, report_files(report, sources))


# -- pictures ----------------------------------------------------------------------
def _figure(width: float, height: float, columns: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height), squeeze=False, layout="constrained")


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _spectra(modules: dict[str, dict[str, Any]]) -> bytes:
    """Six modules from the lowest to the highest effective rank: normalized singular values
    and the energy the first k of them hold."""
    trained = sorted((p for p, s in modules.items() if s["energy"] > 0), key=lambda p: modules[p]["effective_rank"])
    picked = sorted({trained[round(q * (len(trained) - 1))] for q in (0, 0.2, 0.4, 0.6, 0.8, 1)} if trained else [],
                    key=lambda p: modules[p]["effective_rank"])
    figure, axes = _figure(11, 4, 2)
    values, energy = axes[0]
    for path in picked:
        S = torch.tensor(modules[path]["singular_values"])
        k = range(1, len(S) + 1)
        label = f"{path} (eff. rank {modules[path]['effective_rank']:.1f})"
        values.semilogy(k, (S / S[0]).clamp(min=1e-8), marker=".", label=label)
        energy.plot(k, (torch.cumsum(S**2, 0) / (S**2).sum()).tolist(), marker=".", label=label)
    for level in ENERGIES:
        energy.axhline(level, color="grey", linestyle="--", linewidth=0.8)
    values.set(title="singular values of ΔW / the largest", xlabel="k")
    energy.set(title="energy of ΔW kept by the first k directions", xlabel="k", ylim=(0, 1.02))
    energy.legend(fontsize=6, loc="lower right")
    return _png(figure)


def _grid(modules: Sequence[str]) -> tuple[list[int], list[str], dict[str, tuple[int, str]]]:
    """Blocks (rows) and module names (columns) of the paths that carry a block number."""
    cells = {p: (int(m.group(2)), m.group(3)) for p in modules if (m := BLOCK.match(p))}
    blocks = sorted({b for b, _ in cells.values()})
    names = list(dict.fromkeys(n for _, n in cells.values()))
    return blocks, names, cells


def _heat_map(modules: dict[str, dict[str, Any]]) -> bytes:
    blocks, names, cells = _grid(list(modules))
    grid = torch.full((max(len(blocks), 1), max(len(names), 1)), float("nan"))
    for path, (block, name) in cells.items():
        grid[blocks.index(block), names.index(name)] = modules[path]["effective_rank"]
    figure, axes = _figure(1.5 + 1.1 * len(names), 1.5 + 0.22 * len(blocks))
    axis = axes[0][0]
    image = axis.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0)
    axis.set_xticks(range(len(names)), [n.split(".")[-1] for n in names], rotation=45, ha="right")
    axis.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
    axis.set(title="effective rank of ΔW", ylabel="block")
    figure.colorbar(image, ax=axis)
    return _png(figure)


def _similarity(similarity: dict[str, list[list[float]]]) -> bytes:
    """φ(i, j) per module name, averaged over the blocks."""
    _, names, cells = _grid(list(similarity))
    names = names or ["all"]
    figure, axes = _figure(3.2 * len(names), 3.2, len(names))
    for axis, name in zip(axes[0], names):
        grids = [torch.tensor(g) for p, g in similarity.items() if name == "all" or cells.get(p, (0, ""))[1] == name]
        image = axis.imshow(torch.stack(grids).mean(0).numpy(), origin="lower", cmap="magma", vmin=0, vmax=1,
                            extent=(0.5, len(grids[0][0]) + 0.5, 0.5, len(grids[0]) + 0.5))
        axis.set(title=f"φ(i, j): {name.split('.')[-1]}", xlabel="j (second adapter)", ylabel="i (first adapter)")
    figure.colorbar(image, ax=list(axes[0]))
    return _png(figure)


def _order(path: str) -> tuple:
    """Module paths with their numbers compared as numbers (layers.2 before layers.10)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split("."))


def _base_weight(model: nn.Module, path: str) -> Tensor | None:
    """The weight of the module at ``path``, or the expert tensor ``path`` itself."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        try:
            return model.get_parameter(path)
        except AttributeError:
            return None
    return getattr(module, "weight", None) if isinstance(getattr(module, "weight", None), Tensor) else None
