"""lorakit analyze: every figure against a dense SVD of ΔW, the pictures, and bad input."""

import json
import math

import pytest
import torch
from test_adapter import every_layout
from test_training_loop import run

import lorakit
from lorakit.adapter import Adapter
from lorakit.layouts import LAYOUTS
from lorakit.variants import lora_value
from lorakit.analyze import analyze, subspace_similarity, summary
from lorakit.cli import app
from lorakit.files import export_adapter, read_adapter, write_adapter


@pytest.fixture(scope="module")
def trained(tiny_lm_dir, tmp_path_factory):
    """A real adapter: 12 steps of training on dialogs (rank 8), and the base it changes."""
    model, result = run(tiny_lm_dir, tmp_path_factory.mktemp("analyze"), rank=8, alpha=16, lr=3e-3, max_steps=12,
                        batch_size=8, eval_fraction=0, save_every=12)
    return result.adapter, lorakit.load_model(str(tiny_lm_dir))


def dense_figures(delta: torch.Tensor, layout: str, weight: torch.Tensor | None = None) -> dict:
    """The same figures from the out x in matrix, the slow way."""
    S = torch.linalg.svdvals(LAYOUTS[str(layout)].matrix(delta).double())
    energy = float((S**2).sum())
    p = S / S.sum()
    p = p[p > 0]
    cumulative = torch.cumsum(S**2, 0) / energy
    figures = {"energy": energy, "effective_rank": math.exp(float(-(p * p.log()).sum())),
               "stable_rank": energy / float(S[0]) ** 2, "S": S,
               "rank_90": int((cumulative < 0.9 - 1e-12).sum()) + 1,
               "rank_99": int((cumulative < 0.99 - 1e-12).sum()) + 1}
    if weight is not None:
        figures["relative_norm"] = float(delta.norm() / weight.detach().float().norm())
    return figures


def test_figures_of_a_trained_adapter_equal_the_dense_svd_on_three_layers(trained):
    directory, base = trained
    adapter = read_adapter(directory)
    report = analyze(adapter, base=base)
    paths = sorted(adapter.layers)
    assert list(report["modules"]) == sorted(paths, key=lambda p: [int(x) if x.isdigit() else x
                                                                   for x in p.split(".")])
    for path in (paths[0], paths[len(paths) // 2], paths[-1]):
        layer, got = adapter.layers[path], report["modules"][path]
        expected = dense_figures(layer.delta(), layer.layout, base.get_submodule(path).weight)
        r = layer.rank
        torch.testing.assert_close(torch.tensor(got["singular_values"], dtype=torch.float64), expected["S"][:r],
                                   rtol=1e-6, atol=1e-6 * float(expected["S"][0]))
        tail = expected["S"][r:]  # a rank-r update has no more directions
        assert tail.numel() == 0 or float(tail.max()) <= 1e-5 * float(expected["S"][0])
        for key in ("energy", "effective_rank", "stable_rank", "relative_norm"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key
        assert (got["rank_90"], got["rank_99"]) == (expected["rank_90"], expected["rank_99"])
        assert 1 <= got["rank_90"] <= got["rank_99"] <= r


@pytest.mark.parametrize("layout", ["linear", "conv1d", "conv2d", "embedding"])
def test_figures_hold_for_every_layout(layout):
    layer = export_adapter(every_layout()).layers[layout]
    assert layer.layout == layout
    got = analyze(Adapter(lorakit.LoraConfig(rank=layer.rank, alpha=layer.rank), {"m": layer}))["modules"]["m"]
    expected = dense_figures(layer.delta(), layout)
    assert got["energy"] == pytest.approx(expected["energy"], rel=1e-6)
    assert got["effective_rank"] == pytest.approx(expected["effective_rank"], rel=1e-6)


def test_subspace_similarity_is_the_papers_phi():
    generator = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(6, 40, generator=generator), torch.randn(4, 40, generator=generator)
    phi = subspace_similarity(A1, A2)
    V1 = torch.linalg.svd(A1.double(), full_matrices=False)[2]
    V2 = torch.linalg.svd(A2.double(), full_matrices=False)[2]
    for i in range(1, 7):
        for j in range(1, 5):
            expected = float((V1[:i] @ V2[:j].T).norm() ** 2) / min(i, j)
            assert float(phi[i - 1, j - 1]) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert torch.allclose(torch.diagonal(subspace_similarity(A1, 3 * A1)), torch.ones(6, dtype=torch.float64))
    orthogonal = torch.zeros(2, 40)
    orthogonal[0, 0], orthogonal[1, 1] = 1, 1
    assert float(subspace_similarity(orthogonal, torch.eye(40)[2:5]).max()) < 1e-12


def test_verdict_finds_the_rank_the_update_really_has():
    """Rank-8 adapters whose updates are exactly rank 2: rank 2 keeps everything."""
    generator = torch.Generator().manual_seed(3)
    layers = {}
    for block in range(4):
        A = torch.randn(8, 16, generator=generator)
        B = torch.randn(12, 8, generator=generator)
        B[:, 2:] = 0
        layers[f"model.layers.{block}.mlp.up_proj"] = lora_value(A, B, 0.5)
    report = analyze(Adapter(lorakit.LoraConfig(rank=8, alpha=8), layers))
    assert all(m["rank_99"] <= 2 for m in report["modules"].values())
    assert report["summary"]["verdict"].startswith("rank 2 would keep >= 99 % of the update in 4 of 4 modules")
    untrained = summary({"m": {"energy": 0.0, "rank": 8, "rank_99": 0, "effective_rank": 0.0}})
    assert "untrained" in untrained["verdict"]


def test_cli_writes_json_and_pictures_that_open(trained, tiny_lm_dir, tmp_path):
    from matplotlib.image import imread
    from typer.testing import CliRunner

    directory, _ = trained
    # the trained adapter's modules with other A's: a full similarity grid
    other = read_adapter(directory)
    other = Adapter(other.config, {p: lora_value(torch.randn_like(l.A), l.B, l.scaling, l.layout)
                                   for p, l in other.layers.items()})
    write_adapter(other, tmp_path / "other")
    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["analyze", str(directory), str(tmp_path / "other"), "--base", str(tiny_lm_dir),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "would keep >= 99 % of" in result.output and "[files]" in result.output
    report = json.loads((out / "analysis.json").read_text())
    assert set(report) == {"sources", "modules", "summary", "similarity"}
    assert all("relative_norm" in m for m in report["modules"].values())
    grid = report["similarity"][next(iter(report["similarity"]))]
    assert len(grid) == len(grid[0]) == 8 and all(0 <= v <= 1 + 1e-9 for row in grid for v in row)
    for name in ("spectra.png", "effective_rank.png", "similarity.png"):
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert float(image[..., :3].std()) > 0.01  # something was drawn


def test_bad_input_names_the_problem_and_writes_nothing(trained, tmp_path):
    from typer.testing import CliRunner

    directory, _ = trained
    out = tmp_path / "analysis"
    for args, message in (([str(tmp_path / "missing")], "missing"),
                          ([str(directory), "--base", "qwen2-0.5b"], "has no weights"),
                          ([str(directory), "--base", str(_saved_other_model(tmp_path))], "has no weight for")):
        result = CliRunner().invoke(app, ["analyze", *args, "--out", str(out)])
        assert result.exit_code != 0 and message in result.output, result.output
        assert not out.exists()
    with pytest.raises(ValueError, match="share no module"):
        layer = export_adapter(every_layout()).layers["linear"]
        analyze(Adapter(lorakit.LoraConfig(rank=layer.rank, alpha=layer.rank), {"x": layer}),
                Adapter(lorakit.LoraConfig(rank=layer.rank, alpha=layer.rank), {"y": layer}))


def _saved_other_model(tmp_path):
    """A model directory whose modules the adapter does not name (GPT-2 blocks)."""
    from conftest import tiny_gpt2

    path = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(path)
    return path
