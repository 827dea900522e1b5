"""The exemplar, resampled (LARS) and diffusion priors against answers known in closed form,
and how the trainer, fit-prior and evaluate treat them (leave-one-out, ex-post only,
estimated normalisers, evaluation fallbacks). The registry contract tests in test_priors.py
cover them too."""

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import read_metrics, tiny_toml
from priorvae.config import load_config
from priorvae.errors import PriorError
from priorvae.gaussian import log_standard_normal
from priorvae.likelihoods import build_likelihood
from priorvae.priors import PriorContext, build_prior
from priorvae.vae import build_vae

SHAPE = (1, 4, 4)  # 65,536 binary images: no two exemplars alike


class MeanEncoder(nn.Module):
    """x (B, 1, 4, 4) -> (mu, logvar) with mu a fixed linear map of the pixels."""

    def __init__(self, dim=3):
        super().__init__()
        self.lin = nn.Linear(16, dim)

    def forward(self, x):
        mu = self.lin(x.flatten(1))
        return mu, torch.zeros_like(mu)


def _exemplar(n=40, dim=3, **kw):
    # not seed 0: the prior binarizes with seed 0, and uniforms from the same stream as the
    # grey levels would binarize every pixel to 0
    torch.manual_seed(1)
    data = torch.rand(n, *SHAPE)
    ctx = PriorContext(encoder=MeanEncoder(dim), input_shape=SHAPE, data=data,
                       likelihood=build_likelihood("bernoulli", SHAPE))
    return build_prior("exemplar", latent_dim=dim, context=ctx, **kw).double()


def _brute_force(prior, z, leave_out=None):
    """1/M sum_m N(z; mu(x_m), s^2 I) over the exemplars (but the one left out), float64."""
    mu = prior.encoder(prior.images[prior.index].double())[0]
    var = prior.logvar.exp()
    log_comp = torch.distributions.Normal(mu[None], var.sqrt()).log_prob(z[:, None]).sum(-1)
    if leave_out is not None:
        log_comp[torch.arange(len(z)), leave_out] = -math.inf
        return torch.logsumexp(log_comp, 1) - math.log(len(mu) - 1)
    return torch.logsumexp(log_comp, 1) - math.log(len(mu))


def test_exemplar_at_init_is_the_brute_force_mixture_in_float64():
    prior = _exemplar().eval()
    z = torch.randn(50, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(prior.log_prob(z), _brute_force(prior, z), rtol=0, atol=1e-9)
        with prior.frozen():  # all encodings once
            torch.testing.assert_close(prior.log_prob(z), _brute_force(prior, z), rtol=0,
                                       atol=1e-9)


def test_exemplar_leaves_each_training_image_out():
    prior = _exemplar(subset=10_000, init_logvar=-6.0)  # all in the subset; narrow
    idx = torch.tensor([0, 5, 39])
    mu = prior.encoder(prior.images[idx].double())[0]
    z = mu + 1e-3  # a code on top of its own exemplar
    loo = prior.log_prob(z, exclude=idx)  # a training step: module in training mode, grads on
    torch.testing.assert_close(loo, _brute_force(prior, z, leave_out=idx), rtol=0, atol=1e-9)
    with torch.no_grad():
        assert (prior.log_prob(z) > loo + 1).all()  # its own component would dominate


def test_exemplar_training_step_uses_a_random_subset():
    prior = _exemplar(subset=5)
    z = torch.randn(4, 3, dtype=torch.float64)
    a, b = prior.log_prob(z), prior.log_prob(z)  # two steps, two subsets
    assert not torch.allclose(a, b)
    with torch.no_grad():  # outside a step: all exemplars, deterministic
        torch.testing.assert_close(prior.log_prob(z), prior.log_prob(z))


def test_exemplar_keeps_indices_and_refuses_other_data():
    prior = _exemplar(n=40, n_exemplars=7)
    assert prior.index.shape == (7,) and "images" not in prior.state_dict()
    ctx = PriorContext(encoder=MeanEncoder(), input_shape=SHAPE, data=torch.rand(12, *SHAPE),
                       likelihood=build_likelihood("bernoulli", SHAPE))
    other = build_prior("exemplar", latent_dim=3, context=ctx, n_exemplars=7)
    other.load_state_dict(prior.float().state_dict())
    with pytest.raises(PriorError, match="built on 40 training images, but 12"):
        other.log_prob(torch.randn(2, 3))
    with pytest.raises(PriorError, match=r"n_exemplars must be in \[2, 40\]"):
        _exemplar(n=40, n_exemplars=41)


def test_exemplar_vae_needs_the_training_images_to_be_rebuilt():
    cfg = load_config(None, ["prior.name=exemplar", "model.hidden=[8]", "model.latent_dim=2"])
    with pytest.raises(PriorError, match="made of the training images"):
        build_vae(cfg, (1, 8, 8))


def test_resampled_with_constant_acceptance_is_the_base_exactly():
    prior = build_prior("resampled", latent_dim=4, truncation=50, n_normalizer=10_000)
    prior = prior.double().eval()
    z = torch.randn(100, 4, dtype=torch.float64) * 2
    with torch.no_grad():
        prior.logit[-1].bias.fill_(30.0)  # a(z) = 1
        torch.testing.assert_close(prior.log_prob(z), log_standard_normal(z), rtol=0,
                                   atol=1e-12)
        prior.logit[-1].bias.fill_(-1.3)  # any constant: accepted or not, the same N(0, I)
        torch.testing.assert_close(prior.log_prob(z), log_standard_normal(z), rtol=0,
                                   atol=1e-12)


class Slope(nn.Module):
    """logit a(z) = 2 z_0 - 1 (a known acceptance)."""

    def forward(self, z):
        return 2 * z[:, :1] - 1


def test_resampled_normaliser_matches_quadrature_within_its_error():
    prior = build_prior("resampled", latent_dim=2, n_normalizer=400_000).eval()
    prior.logit = Slope()
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    quad = (torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi) * torch.sigmoid(2 * x - 1)).sum() \
        * (x[1] - x[0])
    with torch.no_grad():
        z_hat, stderr = prior.normalizer()
    assert 0 < stderr < 0.01
    assert abs(math.log(z_hat.item()) - math.log(quad.item())) < 4 * stderr
    # the truncated density integrates to one and follows a(z): more mass where z_0 > 0
    axis = torch.linspace(-9, 9, 361)
    zz = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        p = prior.log_prob(zz).exp() * (axis[1] - axis[0]) ** 2
    assert abs(p.sum().item() - 1) < 0.01 + 3 * stderr
    assert p[zz[:, 0] > 0].sum() > 0.6


def test_resampled_truncation_one_is_the_base_and_sampling_rejects():
    prior = build_prior("resampled", latent_dim=2, truncation=1).eval()
    prior.logit = Slope()
    z = torch.randn(10, 2)
    with torch.no_grad():
        torch.testing.assert_close(prior.log_prob(z), log_standard_normal(z))
        prior.truncation = 100
        s = prior.sample(20_000)
    assert s[:, 0].mean() > 0.3  # accepted where a(z) is large


def test_resampled_training_uses_a_moving_average_of_z():
    prior = build_prior("resampled", latent_dim=2, batch_normalizer=64)
    prior.logit = nn.Sequential(nn.Linear(2, 1))
    assert prior.z_average.item() < 0
    prior.log_prob(torch.randn(5, 2)).sum().backward()  # a training step
    first = prior.z_average.item()
    assert 0 < first < 1 and "z_average" in prior.state_dict()
    prior.log_prob(torch.randn(5, 2))
    assert prior.z_average.item() != first


def _gaussian_residual(prior, var):
    """The exact r(z, t) for data N(0, diag(var)): eps = sigma z / (alpha^2 var + sigma^2)."""

    class Exact(nn.Module):
        def forward(self, z, t):
            alpha, sigma = prior.alpha_sigma(t)
            total = alpha[:, None] ** 2 * var + sigma[:, None] ** 2
            return z / total - z  # eps / sigma - z

    return Exact()


@pytest.mark.parametrize("dim", [2, 16])
def test_diffusion_ode_density_of_a_gaussian_matches_the_closed_form(dim):
    torch.manual_seed(0)
    var = (torch.rand(dim) * 2 + 0.1).double()
    prior = build_prior("diffusion", latent_dim=dim, ode_steps=16).double()
    prior.residual = _gaussian_residual(prior, var)
    z = torch.randn(300, dim, dtype=torch.float64) * var.sqrt()
    alpha, sigma = prior.alpha_sigma(torch.tensor(prior.t_min, dtype=torch.float64))
    exact = torch.distributions.Normal(0, (alpha**2 * var + sigma**2).sqrt()).log_prob(z).sum(-1)
    with torch.no_grad():
        err = (prior.log_prob(z) - exact).abs().max().item()
    assert err < 2e-3, err  # the base N(0, I) at t = 1 is exact here up to 1e-4 of variance


def test_new_diffusion_prior_is_standard_normal_and_refuses_joint_training(tmp_path):
    prior = build_prior("diffusion", latent_dim=3, hidden=16, ode_steps=4)
    z = torch.randn(20, 3)
    with torch.no_grad():
        torch.testing.assert_close(prior.log_prob(z), log_standard_normal(z))
    assert not prior.joint
    config = tiny_toml(tmp_path / "c.toml")
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "priorvae", "train", str(config), "--out",
                          str(out), "--quiet", "--set", "prior.name=diffusion"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and not out.exists()
    assert res.stderr.strip().count("\n") == 0
    assert "ex-post only" in res.stderr and "fit-prior" in res.stderr


def test_diffusion_fitted_to_a_gaussian_mixture_recovers_its_log_density():
    """Denoising score matching on 2-D samples of a two-component mixture; the ODE
    log-density on held-out points is within 0.2 nats (mean absolute error) of the truth
    (0.12 measured; N(0, I), where the prior starts, is 1.1 nats off)."""
    torch.manual_seed(0)
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5]])
    scales = torch.tensor([[0.5, 0.4], [0.4, 0.6]])

    def draw(n):
        k = torch.randint(2, (n,))
        return means[k] + scales[k] * torch.randn(n, 2)

    def true_log_prob(z):
        comp = torch.distributions.Normal(means, scales).log_prob(z[:, None]).sum(-1)
        return torch.logsumexp(comp, 1) - math.log(2)

    prior = build_prior("diffusion", latent_dim=2, hidden=64, layers=2, ode_steps=16)
    opt = torch.optim.Adam(prior.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3000)
    for _ in range(3000):
        loss = prior.fit_loss(draw(1024))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    held = draw(500)
    with torch.no_grad():
        err = (prior.log_prob(held) - true_log_prob(held)).abs().mean().item()
        base = (log_standard_normal(held) - true_log_prob(held)).abs().mean().item()
    assert base > 0.5  # N(0, I) (where it started) is far off
    assert err < 0.2, err


def _trained_digits_run(tmp_path, **tables):
    from priorvae.train import train

    cfg = load_config(tiny_toml(tmp_path / "c.toml", **tables))
    train(cfg, tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_exemplar_trains_jointly_and_restores_the_same_exemplars(tmp_path):
    from priorvae.evaluate import evaluate_run
    from priorvae.runs import Run

    run = _trained_digits_run(tmp_path, prior={"name": "exemplar", "n_exemplars": 300,
                                               "subset": 50}, train={"epochs": 2})
    ckpt = torch.load(run / "best.pt", weights_only=True)
    model = Run.open(run).load_model("best")
    assert torch.equal(model.prior.index, ckpt["model"]["prior.index"])
    assert len(model.prior.index) == 300
    metrics = evaluate_run(run, progress=False, diagnostics=False)
    assert math.isfinite(metrics["test_nll"]) and metrics["evaluation_fallback"] is None


def test_fit_prior_uses_each_priors_objective_and_evaluate_records_fallback_and_error(tmp_path):
    from priorvae.evaluate import evaluate_run
    from priorvae.expost import fit_prior

    run = _trained_digits_run(tmp_path, eval={"iw_samples": 60})
    before = torch.load(run / "best.pt", weights_only=True)["model"]
    fitted = fit_prior(run, "diffusion", {"hidden": 32, "ode_steps": 4}, epochs=3,
                       progress=False)
    assert "val_nll" not in fitted and math.isfinite(fitted["val_loss"])
    exemplar = fit_prior(run, "exemplar", epochs=3, progress=False)  # one variance, LOO
    resampled = fit_prior(run, "resampled", {"n_normalizer": 20_000}, epochs=3, progress=False)
    assert exemplar["val_nll"] == exemplar["val_loss"] and math.isfinite(resampled["val_nll"])
    after = torch.load(run / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the VAE is untouched

    slow = evaluate_run(run, progress=False, prior_source="expost-diffusion", n_diagnostic=2400)
    assert slow["iw_samples"] == 50 and "K 60 -> 50" in slow["evaluation_fallback"]
    # only the prior's log-densities fall back; the sample-based measures keep every sample
    assert (slow["diagnostic_points"], slow["log_prob_points"]) == (2400, 2000)
    assert "log-densities in the diagnostics 2400 -> 2000" in slow["evaluation_fallback"]
    assert math.isfinite(slow["test_nll"]) and "log_normalizer_stderr" not in slow
    z_est = evaluate_run(run, progress=False, prior_source="expost-resampled", diagnostics=False)
    assert 0 <= z_est["log_normalizer_stderr"] < 0.05 and z_est["evaluation_fallback"] is None
    # the LARS truncation share (1 - Z)^(T - 1) is recorded beside it (T = 100: tiny here)
    assert 0 <= z_est["truncation_share"] < 0.05 and z_est["truncation"] == 100
    stored = read_metrics(run)["prior_sources"]
    assert stored["expost-diffusion"]["evaluation_fallback"] == slow["evaluation_fallback"]
    assert stored["expost-resampled"]["log_normalizer_stderr"] == z_est["log_normalizer_stderr"]


def test_evaluation_limits_with_unknown_keys_are_refused_in_one_line():
    from priorvae.errors import RunError
    from priorvae.evaluate import _fallback

    class Old:
        evaluation_limits = {"diagnostic_points": 2000}  # the key before log_prob_points

    with pytest.raises(RunError, match="keys are iw_samples, test_images, log_prob_points"):
        _fallback(Old(), "expost-old", 5000, None, None, 10_000, 10_000)
    Old.evaluation_limits = {"log_prob_points": 100, "iw_samples": 50}
    assert _fallback(Old(), "expost-old", 5000, None, None, 10_000, 10_000)[:3] == (50, None, 100)


def test_matched_column_scores_every_source_on_the_same_images_and_draws(tmp_path):
    # the diffusion prior falls back to K = 50; the other sources ride along in its decoder
    # pass (same images, same draws): paired differences with standard errors, and riding
    # along changes no source's own numbers
    import shutil

    from priorvae.evaluate import evaluate_sources, paired_difference
    from priorvae.expost import fit_prior

    run = _trained_digits_run(tmp_path, eval={"iw_samples": 80}, train={"epochs": 3})
    fit_prior(run, "diffusion", {"hidden": 16, "ode_steps": 2}, epochs=2, progress=False)
    fit_prior(run, "mog", {"n_components": 3}, epochs=5, progress=False)
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)
    out = evaluate_sources(run, ["trained", "expost-mog", "expost-diffusion"], progress=False,
                           diagnostics=False)
    assert (out["trained"]["iw_samples"], out["expost-diffusion"]["iw_samples"]) == (80, 50)
    records = {label: out[label]["matched"] for label in out}
    assert {(r["iw_samples"], r["test_images"]) for r in records.values()} == {
        (50, out["trained"]["test_images"])}
    assert records["trained"]["diff"] == 0 and records["trained"]["reference"] == "trained"
    for label in ("expost-mog", "expost-diffusion"):
        r = records[label]
        assert r["diff"] == pytest.approx(r["test_nll"] - records["trained"]["test_nll"],
                                          abs=1e-9)
        assert 0 < r["diff_stderr"] < 5
    # the diffusion prior's own pass is the matched pass: the same number
    assert records["expost-diffusion"]["test_nll"] == pytest.approx(
        out["expost-diffusion"]["test_nll"], rel=1e-6)  # float64 mean vs float32 batch sums
    saved = read_metrics(run)
    assert saved["matched"] == records["trained"]
    assert saved["prior_sources"]["expost-mog"]["matched"] == records["expost-mog"]
    # evaluated alone (only the run's own prior rides along), the numbers are the same bits
    solo = evaluate_sources(alone, ["expost-diffusion"], progress=False, diagnostics=False)
    assert solo["expost-diffusion"]["test_nll"] == out["expost-diffusion"]["test_nll"]
    assert solo["expost-diffusion"]["matched"]["diff"] == pytest.approx(
        records["expost-diffusion"]["diff"], abs=1e-9)
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 1.0, 3.0])
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(5 / 6) and se == pytest.approx(
        torch.tensor([0.5, 1.0, 1.0]).double().std().item() / 3 ** 0.5)


def test_resampled_truncation_share_is_what_the_sampler_does():
    # a(z) = 1/2 everywhere: Z = 1/2, and with T = 3 a quarter of the samples are the third,
    # unfiltered proposal; the sampler's last round takes exactly those
    prior = build_prior("resampled", latent_dim=2, truncation=3, n_normalizer=1000).eval()
    report = prior.sampler_report()
    assert report == {"truncation_share": pytest.approx(0.25), "truncation": 3.0}
    sizes = []
    draw = prior.base.sample
    prior.base.sample = lambda n: sizes.append(n) or draw(n)
    torch.manual_seed(0)
    prior.sample(20_000)
    assert len(sizes) == 3 and abs(sizes[-1] / 20_000 - 0.25) < 0.02


def test_exemplar_refuses_a_single_training_image():
    """One training image: leave-one-out leaves it no exemplar, and training stopped on a NaN
    loss at step 1 with a half-written run folder; now one line when the prior is built."""
    with pytest.raises(PriorError, match="needs at least 2 training images, the data set has 1"):
        _exemplar(n=1)


def test_matched_record_counts_the_images_it_scored(tmp_path):
    # a --limit beyond the test split scores every test image; the matched record gave the
    # limit as its number of images (10^6 here), which a table would print as matched_test_images
    from priorvae.evaluate import evaluate_sources
    from priorvae.expost import fit_prior

    run = _trained_digits_run(tmp_path, eval={"iw_samples": 5},
                              train={"epochs": 1, "image_every": 0, "diagnostics_every": 0})
    fit_prior(run, "mog", {"n_components": 2}, epochs=2, progress=False)
    out = evaluate_sources(run, ["trained", "expost-mog"], progress=False, diagnostics=False,
                           limit=10**6)
    n = out["trained"]["test_images"]
    assert n < 10**6 and out["expost-mog"]["test_images"] == n
    assert out["trained"]["matched"]["test_images"] == n
    assert out["expost-mog"]["matched"]["test_images"] == n
    # experiments/matched_nll.py (runs evaluated before 'matched'): --limit -5 scored all but
    # the last 5 images, and one image printed a NaN standard error (not JSON)
    import json
    from pathlib import Path

    script = Path(__file__).parents[1] / "experiments" / "matched_nll.py"
    args = [sys.executable, str(script), str(run), "--sources", "trained", "expost-mog",
            "--iw-samples", "3", "--limit"]
    bad = subprocess.run([*args, "-5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--limit: must be a positive integer" in bad.stderr
    one = subprocess.run([*args, "1"], capture_output=True, text=True, check=True)
    lines = [json.loads(line, parse_constant=pytest.fail) for line in one.stdout.splitlines()]
    assert [r["test_images"] for r in lines] == [1, 1] and lines[1]["diff_stderr"] is None


def test_sources_evaluated_before_join_the_matched_pass_of_a_resumed_evaluation(tmp_path):
    # compare interrupted in its matched pass resumes by evaluating only the missing sources;
    # those evaluated before lost their matched record (only the missing source and the run's
    # own prior were scored together). match_with brings them into the pass again: the same
    # records as one joint evaluation
    import shutil

    from priorvae.evaluate import evaluate_sources
    from priorvae.expost import fit_prior

    run = _trained_digits_run(tmp_path, eval={"iw_samples": 4},
                              train={"epochs": 1, "image_every": 0, "diagnostics_every": 0})
    fit_prior(run, "mog", {"n_components": 2}, epochs=2, progress=False)
    fit_prior(run, "mog", {"n_components": 3}, label="mog3", epochs=2, progress=False)
    joint = tmp_path / "joint"
    shutil.copytree(run, joint)
    together = evaluate_sources(joint, ["trained", "expost-mog", "mog3"], progress=False,
                                diagnostics=False)
    evaluate_sources(run, ["trained", "expost-mog"], progress=False, diagnostics=False)
    resumed = evaluate_sources(run, ["mog3"], progress=False, diagnostics=False,
                               match_with=["expost-mog", "gone", "trained"])
    saved = read_metrics(run)
    records = {"trained": saved["matched"], "mog3": resumed["mog3"]["matched"],
               "expost-mog": saved["prior_sources"]["expost-mog"]["matched"]}
    assert {tuple(sorted(r["shared_with"])) for r in records.values()} == {
        ("expost-mog", "mog3", "trained")}
    for label, record in records.items():
        want = together[label]["matched"]
        assert record["diff"] == pytest.approx(want["diff"], abs=1e-9), label
        assert record["diff_stderr"] == pytest.approx(want["diff_stderr"], abs=1e-9), label
