"""What a person reads: the metric schema, figures' notes, TensorBoard's HParams and Projector."""

import subprocess
import sys

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


def test_results_headline_headers_come_from_the_schema(tmp_path, monkeypatch):
    """compare's results.md headline: each column's header and divisor are its schema entry's,
    so a title changed in the schema changes the table (no second list of titles)."""
    from dataclasses import replace

    from priorvae import metrics_schema
    from priorvae.compare import RESULT_COLUMNS, write_results
    from priorvae.metrics_schema import HEADLINE_KEYS

    assert set(HEADLINE_KEYS) <= set(METRICS) and metric("test_elbo").header == "ELBO"
    monkeypatch.setitem(metrics_schema.METRICS, "hole_rate",
                        replace(METRICS["hole_rate"], column="holes"))
    row = {c: None for c in RESULT_COLUMNS} | {"prior": "flow", "latent_dim": 2, "run": "r",
                                               "seed": 0, "test_nll": 80.0,
                                               "train_seconds": 150.0}
    write_results(tmp_path, [row])
    lines = (tmp_path / "results.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| prior |"))
    cells = [c.strip() for c in header.strip("| ").split(" | ")][5:]
    assert cells == [metric(k).header for k in HEADLINE_KEYS if k != "test_bits_per_dim"]
    assert "holes" in cells and "hole rate" not in cells
    flow = [c.strip() for c in next(line for line in lines if line.startswith("| flow |"))
            .strip("| ").split(" | ")]
    assert flow[5 + cells.index("train min")] == "2.5"  # 150 s in minutes: the divisor


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
    values = _hparams(cfg, ["prior.name", "data.download", "network.hidden", "prior.missing"])
    assert values == {"prior.name": "standard_normal", "data.download": "True",
                      "network.hidden": "[32, 32]", "prior.missing": "–"}


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


def _one_line(text: str) -> str:
    return " ".join(text.split())


LAPLACE = """
import torch
from torch import nn

from priorvae.priors import Prior, register_prior


@register_prior("laplace")
class Laplace(Prior):
    def __init__(self, latent_dim: int, scale: float = 1.0):
        super().__init__(latent_dim)
        self.log_scale = nn.Parameter(torch.full((latent_dim,), float(scale)).log())

    def _log_prob(self, z):
        b = self.log_scale.exp()
        return (-torch.log(2 * b) - z.abs() / b).sum(-1)

    def _sample(self, n):
        return torch.distributions.Laplace(0.0, self.log_scale.exp()).sample((n,))
"""


def _train_in_subprocess(cwd, config, runs: dict):
    """Train each {run folder: prior name} with ``priorvae train`` in one Python process that
    imported the module first (the README's "register and import")."""
    calls = "".join(f"main(['train', {str(config)!r}, '--set', 'prior.name={prior}', '--out', "
                    f"{str(run)!r}, '--quiet'])\n" for run, prior in runs.items())
    code = (f"import sys; sys.path.insert(0, {str(cwd)!r}); import nc_laplace\n"
            f"from priorvae.cli import main\n{calls}")
    subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, timeout=300,
                   capture_output=True)


def test_messages_say_how_to_reopen_runs_of_custom_priors(tmp_path, capsys, monkeypatch):
    """The README's "register and import" run, and a module-path run opened from another
    folder: the messages say why the command line cannot open them and what works (not an
    opt-in that would not help)."""
    from priorvae.cli import main

    made = tmp_path / "made"
    made.mkdir()
    (made / "nc_laplace.py").write_text(LAPLACE)
    config = tiny_toml(made / "c.toml", train={"epochs": 1, "diagnostics_every": 0})
    _train_in_subprocess(made, config, {made / "registered": "laplace",
                                        made / "module": "nc_laplace:Laplace"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    capsys.readouterr()
    code = main(["sample", str(made / "registered"), "--out", "a.png"])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "unknown prior 'laplace'" in err
    assert "registered by a program" in err and "after the same import" in err
    assert "entry point 'laplace' in group 'priorvae.priors'" in err

    code = main(["sample", str(made / "module"), "--out", "b.png"])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "module 'nc_laplace' is not found from here" in err
    assert "PYTHONPATH" in err and "--trust-remote-code" not in err
    code = main(["sample", str(made / "module"), "--out", "b.png", "--trust-remote-code"])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "No module named 'nc_laplace'" in err and "PYTHONPATH" in err
    monkeypatch.syspath_prepend(str(made))  # as PYTHONPATH=made does
    assert main(["sample", str(made / "module"), "--out", "c.png"]) == 0


def test_evaluate_summary_shows_errors_truncation_matched_and_a_fit_without_gain():
    from priorvae.cli import evaluation_summary

    metrics = {"test_images": 500, "iw_samples": 50, "test_nll": 85.1, "hole_rate": 0.041,
               "hole_rate_stderr": 0.0052, "truncation_share": 0.406, "fit_improved": False,
               "matched": {"diff": -0.383, "diff_stderr": 0.061, "iw_samples": 50,
                           "test_images": 500}}
    text = evaluation_summary("run", "expost-resampled", metrics)
    assert "4.1% ± 0.5%" in text and "LARS truncation share ↓" in text and "40.6%" in text
    assert "-0.383 ± 0.061 nats, matched: K = 50, 500 test images" in text
    assert "did not improve on its starting point" in text
    assert "Δ NLL" not in evaluation_summary("run", "trained", metrics)  # 0 by definition
    assert metric("truncation_share").label == "LARS truncation share ↓"
