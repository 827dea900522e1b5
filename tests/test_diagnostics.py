"""Every estimator against a case whose answer is known in closed form."""

import math

import pytest
import torch

from priorvae.aggregate import AggregatedPosterior, encode_split
from priorvae.diagnostics import active_units, elbo_surgery, hole_rate, kl_prior_to_agg, mmd
from priorvae.likelihoods import build_likelihood
from priorvae.priors import build_prior


def normal_kl(m, logvar):
    """KL(N(m, diag e^logvar) || N(0, I)), closed form."""
    return 0.5 * (logvar.exp() + m**2 - 1 - logvar).sum().item()


def test_aggregate_log_prob_matches_naive_and_samples_match_density():
    torch.manual_seed(0)
    mu, logvar = torch.randn(300, 3) * 2, torch.randn(300, 3) * 0.3 - 1
    agg = AggregatedPosterior(mu.double(), logvar.double(), max_elements=1000)  # many chunks
    z = torch.randn(50, 3, dtype=torch.float64) * 2
    comp = torch.distributions.Independent(
        torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp()), 1)
    ref = torch.logsumexp(comp.log_prob(z[:, None, :]), 1) - math.log(300)
    torch.testing.assert_close(agg.log_prob(z), ref, rtol=0, atol=1e-10)
    # samples: the mean of a mixture is the mean of its component means
    s = agg.sample(200_000)
    torch.testing.assert_close(s.mean(0), mu.double().mean(0), atol=0.03, rtol=0)


def test_posteriors_equal_to_prior_give_zero_mi_and_marginal_kl():
    prior = build_prior("standard_normal", latent_dim=4)
    mu, logvar = torch.zeros(500, 4), torch.zeros(500, 4)
    out = elbo_surgery(mu, logvar, prior)
    assert abs(out["kl"]) < 1e-5 and abs(out["mutual_info"]) < 1e-5
    assert abs(out["marginal_kl"]) < 1e-5


def test_point_like_separated_posteriors_give_mi_log_n():
    torch.manual_seed(0)
    n = 200
    mu = torch.randn(n, 5) * 100
    out = elbo_surgery(mu.double(), torch.full((n, 5), -10.0, dtype=torch.float64),
                       build_prior("standard_normal", latent_dim=5).double())
    assert out["mutual_info"] == pytest.approx(math.log(n), abs=1e-6)


def test_single_posterior_kl_is_closed_form_and_all_marginal():
    torch.manual_seed(0)
    m = torch.tensor([[0.7, -1.2, 0.1]], dtype=torch.float64)
    lv = torch.tensor([[-0.5, 0.3, -1.0]], dtype=torch.float64)
    prior = build_prior("standard_normal", latent_dim=3).double()
    exact = normal_kl(m, lv)
    # one image: I(n; z) = 0, so the whole KL is marginal; average many single draws
    agg = AggregatedPosterior(m, lv)
    out = elbo_surgery(m.expand(20_000, 3), lv.expand(20_000, 3), prior)
    assert out["kl"] == pytest.approx(exact, abs=0.03)
    assert abs(out["mutual_info"]) < 1e-9  # identical components
    # KL(p || q) with q one Gaussian, closed form: KL(N(0,I) || N(m, s^2))
    var = lv.exp()
    reverse = 0.5 * (1 / var + m**2 / var - 1 + lv).sum().item()
    assert kl_prior_to_agg(prior, agg, n=200_000) == pytest.approx(reverse, abs=0.03)


def test_hole_rate_is_the_quantile_when_prior_equals_aggregate():
    torch.manual_seed(0)
    mu, logvar = torch.randn(2000, 2) * 2, torch.full((2000, 2), -1.0)
    agg = AggregatedPosterior(mu, logvar)
    held_mu, held_lv = mu[:1000], logvar[:1000]  # same distribution of components
    train_agg = AggregatedPosterior(mu[1000:], logvar[1000:])
    out = hole_rate(agg, train_agg, held_mu, held_lv, n=50_000)
    assert out["hole_rate"] == pytest.approx(0.01, abs=0.005)
    assert out["log_q_prior"].shape == (50_000,) and out["log_q_posterior"].shape == (1000,)


def test_hole_rate_is_high_for_a_prior_far_wider_than_the_aggregate():
    torch.manual_seed(0)
    mu, logvar = torch.randn(2000, 2) * 0.1, torch.full((2000, 2), -6.0)
    agg = AggregatedPosterior(mu[1000:], logvar[1000:])
    prior = build_prior("standard_normal", latent_dim=2)
    assert hole_rate(prior, agg, mu[:1000], logvar[:1000])["hole_rate"] > 0.9


def test_mmd_is_zero_for_identical_distributions_and_positive_otherwise():
    torch.manual_seed(0)
    same = [mmd(torch.randn(500, 3), torch.randn(500, 3)) for _ in range(20)]
    assert abs(sum(same) / len(same)) < 1e-3  # unbiased: zero on average
    assert mmd(torch.randn(500, 3), torch.randn(500, 3) + 1.0) > 0.05
    with pytest.raises(ValueError):
        mmd(torch.randn(1, 3), torch.randn(5, 3))


def test_active_units_counts_dimensions_with_variance_above_threshold():
    torch.manual_seed(0)
    scales = torch.tensor([1.0, 0.5, 0.05, 0.0])  # variances 1, 0.25, 0.0025, 0
    mu = torch.randn(10_000, 4) * scales
    assert active_units(mu) == 2


def test_active_units_of_one_posterior_mean_is_zero_without_a_warning(recwarn):
    """One test image: var() over one row was NaN with a torch warning on stderr."""
    assert active_units(torch.randn(1, 4)) == 0
    assert not [w for w in recwarn if "degrees of freedom" in str(w.message)]


def test_encode_split_binarizes_grey_images_reproducibly():
    enc = lambda x: (x.flatten(1)[:, :2], x.flatten(1)[:, 2:4])  # noqa: E731
    enc.training = False
    enc.eval = lambda: None
    enc.train = lambda mode=True: None
    x = torch.rand(10, 1, 2, 2)
    lik = build_likelihood("bernoulli", (1, 2, 2))
    a, _ = encode_split(enc, x, likelihood=lik)
    b, _ = encode_split(enc, x, likelihood=lik)
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(encode_split(enc, x)[0], x.flatten(1)[:, :2])  # no likelihood: as is


def test_monte_carlo_errors_match_the_spread_of_repeated_draws():
    # each error is computed from one evaluation; the spread over 40 independent evaluations
    # (fresh prior samples, fresh held-out draws) is what it must predict
    torch.manual_seed(0)
    mu, logvar = torch.randn(600, 2) * 0.5, torch.full((600, 2), -3.0)
    agg = AggregatedPosterior(mu[:400], logvar[:400])
    prior = build_prior("standard_normal", latent_dim=2)
    holes, kls = [], []
    for _ in range(40):
        held = torch.randn(200, 2) * 0.5
        holes.append(hole_rate(prior, agg, held, logvar[:200], n=1000))
        kls.append(kl_prior_to_agg(prior, agg, n=1000, stderr=True))
    rates = torch.tensor([h["hole_rate"] for h in holes])
    assert 0.05 < rates.mean() < 0.5  # a measure with something to be noisy about
    spread = rates.std().item()
    predicted = torch.tensor([h["hole_rate_stderr"] for h in holes]).mean().item()
    assert 0.6 < predicted / spread < 1.6, (predicted, spread)
    kl_spread = torch.tensor([v for v, _ in kls]).std().item()
    kl_predicted = torch.tensor([se for _, se in kls]).mean().item()
    assert 0.7 < kl_predicted / kl_spread < 1.4, (kl_predicted, kl_spread)
    surgery = elbo_surgery(mu, logvar, prior, n_points=300)
    assert {"kl_stderr", "mutual_info_stderr", "marginal_kl_stderr"} <= set(surgery)
    assert all(0 < surgery[k] < 1 for k in ("kl_stderr", "marginal_kl_stderr"))


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_mmd_stderr_matches_the_spread_of_repeated_draws(shift):
    # MMD² is a sample-based measure like the hole rate: its Monte-Carlo error (from the other
    # chunks of one evaluation's samples) must predict the spread of independent evaluations
    from priorvae.diagnostics import mmd_stderr
    from priorvae.measure import STDERR_KEYS
    from priorvae.runs import EVALUATION_KEYS

    gen = torch.Generator().manual_seed(0)
    m = 300

    def draw(n):
        return torch.randn(n, 3, generator=gen), torch.randn(n, 3, generator=gen) + shift

    spread = torch.tensor([mmd(*draw(m)) for _ in range(60)]).std().item()
    predicted = sum(mmd_stderr(*draw(5 * m), m) for _ in range(30)) / 30
    assert 0.7 < predicted / spread < 1.4, (predicted, spread)
    assert mmd_stderr(*draw(m + 10), m) is None  # one chunk: no error to give
    assert "mmd" in STDERR_KEYS  # recorded as mmd_stderr, dropped with the other results
    assert {f"{k}_stderr" for k in STDERR_KEYS} <= set(EVALUATION_KEYS)
