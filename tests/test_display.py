"""What a person reads: the metric schema, figures' notes, TensorBoard's HParams and Projector."""

import matplotlib.pyplot as plt
import torch

from conftest import REPO, tiny_toml
from priorvae.compare import grid
from priorvae.config import load_config
from priorvae.evaluate import _hparams, hparam_keys, projector_points
from priorvae.figures import auc_noise, hole_score_figure
from priorvae.measure import DIAGNOSTIC_KEYS
from priorvae.metrics_schema import FIGURE_KEYS, METRICS, SUMMARY_KEYS, metric


def test_schema_covers_every_diagnostic_and_formats():
    assert set(DIAGNOSTIC_KEYS) <= set(METRICS)
    assert set(SUMMARY_KEYS) <= set(METRICS) and set(FIGURE_KEYS) <= set(METRICS)
    for m in METRICS.values():
        assert m.better in (None, "lower", "higher"), m
    assert metric("hole_rate").format(0.0412) == "4.1%"
    assert metric("hole_rate").label == "hole rate ↓" and metric("latent_coverage").arrow == "↑"
    assert metric("latent_c2st_auc").reference == 0.5
    assert metric("no_such_metric").label == "no_such_metric"


def _texts(fig) -> str:
    return " ".join(t.get_text() for t in fig.findobj(plt.Text))


def test_hole_scores_figure_says_when_the_classifier_sees_nothing():
    imgs, scores = torch.rand(32, 1, 8, 8), torch.rand(32)
    se = auc_noise(150, 150)
    assert abs(se - ((301 / (12 * 150 * 150)) ** 0.5)) < 1e-12
    blind = hole_score_figure(imgs, scores, imgs, scores, auc=0.48, n_heldout=(150, 150))
    assert "NOT holes" in _texts(blind) and "cannot tell" in _texts(blind)
    sharp = hole_score_figure(imgs, scores, imgs, scores, auc=0.5 + 3 * se, n_heldout=(150, 150))
    assert "NOT holes" not in _texts(sharp) and "in holes" in _texts(sharp)
    plt.close("all")


def test_hparams_are_what_the_grid_varies(tmp_path):
    runs = grid(load_config(REPO / "experiments" / "quickstart.toml"))
    keys = hparam_keys([cfg for _, cfg in runs])
    assert keys[0] == "prior.name"
    assert "train.seed" in keys  # the grid has several seeds
    assert not {"data.name", "data.download", "eval.batch_size", "train.lr"} & set(keys)
    cfg = load_config(tiny_toml(tmp_path / "c.toml"))
    one = hparam_keys([cfg])
    assert one == ["prior.name"]  # one run varies nothing
    values = _hparams(cfg, ["prior.name", "data.download", "model.hidden", "prior.missing"])
    assert values == {"prior.name": "standard_normal", "data.download": "True",
                      "model.hidden": "[32, 32]", "prior.missing": "–"}


def test_projector_points_pad_a_2d_latent():
    mu = torch.randn(10, 2)
    points, tag = projector_points(mu)
    assert points.shape == (10, 3) and torch.equal(points[:, :2], mu)
    assert (points[:, 2] == 0).all() and tag == "test_posterior_means_2d_plus_zero_column"
    mu5 = torch.randn(10, 5)
    points, tag = projector_points(mu5)
    assert points is mu5 and tag == "test_posterior_means"


def test_a_small_heldout_set_gives_several_codes_per_image(tmp_path):
    """300 test digits against n = 600 prior samples: 2 codes per image, image by image, so
    the classifier's held-out half holds other images than its training half; as many images
    as n (MNIST's 10,000) keeps one code each."""
    from priorvae.data import load_splits
    from priorvae.measure import diagnose
    from priorvae.vae import build_vae

    cfg = load_config(tiny_toml(tmp_path / "c.toml"))
    splits = load_splits(cfg.data)
    model = build_vae(cfg, splits.input_shape)
    _, extras = diagnose(model, splits, n=600)
    assert len(extras["log_q_posterior"]) == 600 and extras["c2st_heldout"] == (300, 300)
    _, extras = diagnose(model, splits, n=300)
    assert len(extras["log_q_posterior"]) == 300 and extras["c2st_heldout"] == (150, 150)
