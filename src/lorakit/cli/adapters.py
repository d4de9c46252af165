"""lorakit combine, convert, compress, analyze and merge: adapters as files."""

from __future__ import annotations

from typing import Annotated

import typer

from ..quantize import QUANTIZATIONS
from .base import DTYPES, _size, app, console, user_errors


@app.command()
def combine(
    adapters: Annotated[list[str], typer.Argument(help="PEFT-format adapter directories or Hub ids.")],
    out: Annotated[str, typer.Option(help="Directory for the combined adapter.")],
    weights: Annotated[str | None, typer.Option(help="Comma-separated weight per adapter (default: all 1).")] = None,
    method: Annotated[str, typer.Option(help="cat (exact; alias linear), svd (best rank-R of the exact sum), "
                                             "magnitude_prune, ties, dare_linear, dare_ties.")] = "cat",
    rank: Annotated[int | None, typer.Option(help="Rank of the result (all but cat).")] = None,
    density: Annotated[float, typer.Option(help="Fraction of each task vector kept (pruning methods).")] = 1.0,
    majority_sign: Annotated[str, typer.Option(help="TIES sign election: total or frequency.")] = "total",
    seed: Annotated[int, typer.Option(help="Seed of DARE's random drop.")] = 0,
) -> None:
    """Combine adapters: ΔW = Σ wᵢ·ΔWᵢ per module, written as a PEFT-format adapter.

    Example: lorakit combine runs/style/adapter runs/domain/adapter --weights 0.7,0.3 --method svd --rank 16 --out runs/mix
    """
    from ..combine import combine as combine_adapters
    from ..files import read_adapter, write_adapter

    with user_errors():
        try:
            values = [float(w) for w in weights.split(",")] if weights else None
        except ValueError:
            raise ValueError(f"--weights: expected comma-separated numbers, got {weights!r}") from None
        result = combine_adapters([read_adapter(path) for path in adapters], values, method, rank, density,
                                  majority_sign, seed)
        path = write_adapter(result.adapter, out)
    _report_kept(result, f"combined {len(adapters)} adapters ({method}) into {path}")


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="A PEFT adapter directory, a diffusers / kohya LoRA file, or a "
                                               "llama.cpp adapter .gguf.")],
    target: Annotated[str | None, typer.Argument(help="Where to write (or --out): a directory (peft, diffusers) "
                                                      "or a file (kohya, gguf).")] = None,
    to: Annotated[str, typer.Option(help="peft, diffusers, kohya or gguf.")] = "peft",
    out: Annotated[str | None, typer.Option(help="Where to write (instead of the second argument).")] = None,
    base: Annotated[str | None, typer.Option(help="GGUF: the base model (HF dir, Hub id, .gguf, smollm2-135m); "
                                                  "only its config and tensor names are read.")] = None,
    pipeline: Annotated[str | None, typer.Option(help="Image models: the diffusers pipeline folder the adapter "
                                                      "belongs to (only its config.json files are read).")] = None,
    component: Annotated[str, typer.Option(help="The model a PEFT directory belongs to.")] = "unet",
) -> None:
    """Convert an adapter: for llama.cpp / Ollama (GGUF, with --base) or between image-model files.

    Examples: lorakit convert runs/chat/adapter --to gguf --base smollm2-135m --out chat.gguf;
    lorakit convert chat.gguf --to peft --base smollm2-135m --out runs/chat-back;
    lorakit convert civitai_style.safetensors runs/style --to diffusers --pipeline sd15/
    """
    with user_errors():
        destination = out or target
        if destination is None:
            raise ValueError("say where to write: a second argument or --out")
        if to == "gguf" or source.endswith(".gguf"):
            path = _convert_gguf(source, destination, to, base)
        else:
            from ..pipelines import convert as convert_adapter

            if pipeline is None:
                raise ValueError("--pipeline is needed for image-model adapters (--to gguf needs --base)")
            path = convert_adapter(source, destination, to, pipeline, component)
    console.print(f"wrote {path}")


def _convert_gguf(source: str, destination: str, to: str, base: str | None):
    from ..llamacpp import export_adapter_gguf, import_adapter_gguf

    if base is None:
        raise ValueError("--base is needed with GGUF: the model the adapter belongs to")
    if to == "gguf":
        return export_adapter_gguf(source, base, destination)
    if to != "peft":
        raise ValueError(f"a GGUF adapter converts to peft, not {to}")
    return import_adapter_gguf(source, base, destination)


@app.command()
def compress(
    adapter: Annotated[str, typer.Argument(help="PEFT-format adapter directory or Hub id.")],
    out: Annotated[str, typer.Option(help="Directory for the compressed adapter.")],
    rank: Annotated[int | None, typer.Option(help="Rank of every module.")] = None,
    energy: Annotated[float | None, typer.Option(help="Per module, the smallest rank keeping this fraction of "
                                                      "‖ΔW‖² (e.g. 0.99).")] = None,
) -> None:
    """Re-factor an adapter to a lower rank by the SVD of its factors (no out×in matrix).

    Example: lorakit compress runs/sv/adapter --energy 0.99 --out runs/sv-small
    """
    from pathlib import Path

    from ..combine import compress as compress_adapter
    from ..files import WEIGHTS_NAME, locate, read_adapter, write_adapter

    with user_errors():
        result = compress_adapter(read_adapter(adapter), rank, energy)
        path = write_adapter(result.adapter, out)
        before, after = (Path(d) / WEIGHTS_NAME for d in (locate(adapter), path))
    _report_kept(result, f"compressed {adapter} into {path}: {_size(before.stat().st_size)} -> "
                         f"{_size(after.stat().st_size)}")


@app.command()
def analyze(
    adapter: Annotated[str, typer.Argument(help="PEFT-format adapter directory or Hub id.")],
    other: Annotated[str | None, typer.Argument(help="A second adapter: adds the subspace similarity.")] = None,
    out: Annotated[str, typer.Option(help="Directory for analysis.json and the PNG pictures.")] = "analysis",
    base: Annotated[str | None, typer.Option(help="Base model (with weights): adds ‖ΔW‖/‖W‖.")] = None,
) -> None:
    """Singular values, effective and stable rank of each module's ΔW (from the factors), the
    rank that keeps 90 % / 99 % of it, and with OTHER the subspace similarity of the two.

    Example: lorakit analyze runs/demo/adapter --base smollm2-135m --out runs/demo/analysis
    """
    from ..analyze import analyze as analyze_adapter
    from ..analyze import write_report
    from ..files import read_adapter
    from ..pretrained import load_model

    with user_errors():
        first = read_adapter(adapter)
        second = read_adapter(other) if other else None
        model = None
        if base:
            model = load_model(base)
            if any(p.is_meta for p in model.parameters()):
                raise ValueError(f"--base {base!r} has no weights (a preset is built on the meta device): "
                                 "give a model directory, a .gguf file or smollm2-135m")
        report = analyze_adapter(first, second, model)
        path = write_report(report, [adapter, *([other] if other else []), *([f"base: {base}"] if base else [])], out)
    modules = report["modules"].values()
    console.print(f"{len(modules)} modules; rank for 99 % of ‖ΔW‖²: median {report['summary'].get('median_rank_99', 0)}"
                  + (f"; ‖ΔW‖/‖W‖: median {sorted(m['relative_norm'] for m in modules)[len(modules) // 2]:.4f}"
                     if base else "")
                  + (f"; subspace similarity φ(1, 1): mean "
                     f"{sum(g[0][0] for g in report['similarity'].values()) / len(report['similarity']):.3f}"
                     if other else ""), highlight=False)
    console.print(report["summary"]["verdict"], highlight=False)
    console.print(f"[files] {path}: " + ", ".join(sorted(p.name for p in path.iterdir())), highlight=False,
                  markup=False)


def _report_kept(result, headline: str) -> None:
    ranks = sorted({layer.rank for layer in result.adapter.layers.values()})
    total = len(result.kept)
    exact = sum(kept >= 1 - 1e-9 for kept in result.kept.values())
    console.print(headline, highlight=False)
    console.print(f"{total} modules, rank {ranks[0]}" + (f"–{ranks[-1]}" if len(ranks) > 1 else "")
                  + f"; kept energy (‖ΔW‖² fraction): lowest {min(result.kept.values()):.4f}, "
                  f"mean {sum(result.kept.values()) / total:.4f}; {exact} of {total} exact", highlight=False)


@app.command()
def merge(
    model: Annotated[str, typer.Argument(help="Base model: HF model dir, Hub id (org/name[@revision]), .gguf file, or smollm2-135m.")],
    adapter: Annotated[str, typer.Argument(help="PEFT-format adapter directory or Hub id.")],
    out: Annotated[str, typer.Option(help="Directory for the merged model (a .gguf file with --to gguf).")],
    dtype: Annotated[str, typer.Option(help="Weight dtype: fp32, bf16, fp16; with --to gguf also f32, f16, "
                                            "q8_0.")] = "fp32",
    to: Annotated[str, typer.Option(help="transformers (a model directory) or gguf (one file for llama.cpp and "
                                         "Ollama, with a Modelfile beside it).")] = "transformers",
    quantize: Annotated[str | None, typer.Option(
        help="The base was quantized (nf4, int8) when the adapter was trained: merge into those "
             "dequantized weights, the function the adapter learned. The result is written dense "
             "in --dtype, never re-quantized.")] = None,
) -> None:
    """Merge an adapter into its base model and save a plain transformers model, or a GGUF file.

    Examples: lorakit merge smollm2-135m runs/chat/adapter --out merged/;
    lorakit merge smollm2-135m runs/chat/adapter --to gguf --dtype q8_0 --out chat.gguf
    """
    import torch

    from ..pretrained import save_merged

    if to == "gguf":
        from ..llamacpp import merge_to_gguf

        with user_errors():
            path = merge_to_gguf(model, adapter, out, {"fp32": "f32", "fp16": "f16"}.get(dtype, dtype), quantize)
        console.print(f"merged model written to {path} (llama.cpp, Ollama: {path.with_suffix('.Modelfile').name})")
        return
    if to != "transformers":
        raise typer.BadParameter("expected transformers or gguf", param_hint="--to")
    if dtype not in DTYPES:
        why = (" (a merged model is written dense; re-quantizing W + delta would round the adapter's small "
               "update away: quantize when loading it, e.g. lorakit serve --quantize)") if dtype in QUANTIZATIONS else ""
        raise typer.BadParameter(f"expected one of {sorted(DTYPES)}{why}", param_hint="--dtype")
    with user_errors():
        path = save_merged(model, adapter, out, getattr(torch, DTYPES[dtype]), quantize)
    console.print(f"merged model written to {path} (loads with transformers' from_pretrained)")
