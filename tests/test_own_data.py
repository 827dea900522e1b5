"""Your own data end to end: colour images from a .npz (labels: the classifier is trained with
the data set's class count) and vectors without labels (diagnostics and pictures work; the
feature measures are skipped with the reason)."""

import json

import numpy as np
import torch
from torch import nn

from conftest import tiny_toml
from priorvae.cli import main
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
