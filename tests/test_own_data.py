"""Your own data end to end: colour images from a .npz (labels: the classifier is trained with
the data set's class count) and vectors without labels (diagnostics and pictures work; the
feature measures are skipped with the reason)."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_toml
from priorvae.cli import main
from priorvae.config import dump_toml
from priorvae.datasets import Splits
from priorvae.evaluate import write_figures
from priorvae.figures import latent_atlas, samples_figure
from priorvae.likelihoods import build_likelihood
from priorvae.measure import DIAGNOSTIC_KEYS, diagnose
from priorvae.priors import build_prior
from priorvae.quality import classifier_unavailable, get_classifier
from priorvae.vae import VAE


def coloured_squares(n: int, size: int = 8, seed: int = 0):
    """(n, size, size, 3) uint8 images of a square in one of three colours (the label)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size, 3), np.uint8)
    y = rng.integers(0, 3, n)
    for i in range(n):
        top, left = rng.integers(0, size // 2, 2)
        x[i, top:top + size // 2, left:left + size // 2, y[i]] = 200 + rng.integers(0, 56)
    return x, y


def test_colour_images_train_evaluate_with_a_classifier_of_their_classes(tmp_path):
    x, y = coloured_squares(90)
    np.savez(tmp_path / "squares.npz", x=x, y=y)
    config = tiny_toml(tmp_path / "c.toml",
                       data={"name": "tensors", "path": str(tmp_path / "squares.npz")},
                       train={"epochs": 2, "batch_size": 30, "image_every": 1,
                              "diagnostics_every": 1})
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    assert main(["evaluate", str(run), "--iw-samples", "5", "--quiet"]) == 0
    # `sample` sizes its picture from the whole [data] table (it once built 'tensors' from
    # its name alone, which has no path: exit 2)
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["quality_classifier_origin"] in ("trained", "cached")
    assert "feature_measures_skipped" not in metrics
    for key in DIAGNOSTIC_KEYS:
        assert np.isfinite(metrics[key]), key
    for name in ("samples", "latent_atlas", "log_q_histogram", "hole_scores"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 0


def _vector_vae(d: int, latent: int = 2) -> VAE:
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(d, 2 * latent)

        def forward(self, x):
            mu, logvar = self.net(x).chunk(2, -1)
            return mu, logvar.clamp(-6, 2)

    prior = build_prior("standard_normal", latent_dim=latent)
    return VAE(Encoder(), nn.Linear(latent, d), prior, build_likelihood("bernoulli", (d,)))


def test_vectors_without_labels_diagnose_and_draw(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(60, 7)  # intensities in [0, 1], (N, D)
    splits = Splits("tensors", x[:40], None, x[40:50], None, x[50:], None, "intensity", None)
    model = _vector_vae(7).eval()
    assert get_classifier(splits, tmp_path, likelihood=build_likelihood("bernoulli", (7,))) \
        is None
    metrics, extras = diagnose(model, splits, None, n=50)
    for key in ("kl", "hole_rate", "mmd", "active_units", "latent_c2st_auc"):
        assert np.isfinite(metrics[key]), key
    assert not any(k.startswith(("fd_", "feature_", "class_entropy")) for k in metrics)
    assert extras["labels"] is None and extras["x_prior"].shape[1:] == (7,)
    assert "no labels" in classifier_unavailable(splits)
    # pictures: heat maps of vectors, an atlas in one colour that says so
    fig = latent_atlas(extras["mu_heldout"], None, extras["z_prior"], model.prior,
                       extras["agg"], extras["threshold"])
    assert "no labels: one colour" in fig.axes[0].get_title()
    fig = samples_figure(extras["x_prior"], extras["x_agg"], extras["x_orig"],
                         extras["x_recon"])
    assert fig.axes[0].get_xlabel() == "dimension"

    class FakeRun:  # write_figures saves through the run folder's owner
        def save_figure(self, relative, fig):
            path = tmp_path / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
            return path

    extras["hole_rate"] = metrics["hole_rate"]
    paths = write_figures(extras, model.prior, FakeRun(), "figures")
    assert len(paths) == 4 and all(p.stat().st_size > 0 for p in paths)


def _saturated_share(png) -> float:
    """Share of a PNG's pixels that are clearly coloured (max - min channel > 0.25): black
    text, grey images and white space are not."""
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    return float(((rgb.max(-1) - rgb.min(-1)) > 0.25).mean())


def test_a_compare_grid_on_colour_images_reports_bits_per_dim_and_draws_in_colour(tmp_path):
    x, y = coloured_squares(90)
    np.savez(tmp_path / "squares.npz", x=x, y=y)
    config = tmp_path / "c.toml"  # experiments/shapes.toml in miniature
    config.write_text(dump_toml({
        "data": {"name": "tensors", "path": str(tmp_path / "squares.npz")},
        "likelihood": {"name": "discretized_logistic", "n_mixtures": 1},
        "network": {"name": "resconv", "channels": [4, 8], "n_res": 1, "res_hidden": 4},
        "model": {"latent_dim": 2},
        "train": {"epochs": 1, "batch_size": 30, "image_every": 0, "diagnostics_every": 0},
        "eval": {"iw_samples": 3},
        "compare": {"priors": ["standard_normal", "vampprior"], "seeds": [0],
                    "args": {"vampprior": {"n_components": 4}}}}))
    out = tmp_path / "grid"
    assert main(["compare", str(config), "--out", str(out), "--quiet"]) == 0
    rows = {r["prior"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"standard_normal", "vampprior"}
    for row in rows.values():  # bits/dim: the NLL over D = 3 x 8 x 8 values, in bits
        assert float(row["test_bits_per_dim"]) == pytest.approx(
            float(row["test_nll"]) / (3 * 8 * 8 * math.log(2)))
    md = (out / "results.md").read_text()
    assert "| test NLL | bits/dim | ELBO |" in md and "test_bits_per_dim" in md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    for name in rows:  # the images are drawn in their colours, not in grey
        assert _saturated_share(out / f"{name}-seed0" / "figures" / "samples.png") > 0.002, name


def test_the_shapes_experiment_config_is_a_valid_grid():
    """experiments/shapes.toml (the README's colour example) still reads as its grid."""
    from pathlib import Path

    from priorvae.compare import grid
    from priorvae.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "experiments" / "shapes.toml")
    cells = dict(grid(cfg))
    assert sorted(cells) == ["standard_normal-seed0", "vampprior-seed0"]
    assert {(c.likelihood.name, c.network.name, c.data.name) for c in cells.values()} == {
        ("discretized_logistic", "resconv", "tensors")}
    assert cfg.extra["compare"]["expost"] == ["mog"]


def test_a_run_refuses_data_that_changed_since_training(tmp_path, capsys):
    """The run records the sha256 of the data it was trained on; evaluate and fit-prior on a
    [data] file rewritten since (another seed, other values) stop with one line instead of
    reporting numbers of another test set as the run's."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", rng.random((60, 4)).astype(np.float32))
    config = tiny_toml(tmp_path / "c.toml",
                       data={"name": "tensors", "path": str(tmp_path / "v.npy")},
                       likelihood={"name": "gaussian"}, model={"hidden": [8]},
                       train={"epochs": 1, "batch_size": 30, "image_every": 0})
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    assert main(["evaluate", str(run), "--iw-samples", "2", "--no-diagnostics", "--quiet"]) == 0
    np.save(tmp_path / "v.npy", rng.random((60, 4)).astype(np.float32))
    capsys.readouterr()
    for argv in (["evaluate", str(run), "--iw-samples", "2", "--quiet"],
                 ["fit-prior", str(run), "--prior", "mog", "--quiet"],
                 ["sample", str(run), "--source", "posterior", "--index", "0",
                  "--out", str(tmp_path / "p.png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "was trained on other data than [data] gives now" in err, err
