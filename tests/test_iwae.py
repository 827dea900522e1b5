"""IWAE math on a linear-Gaussian model whose log p(x) is known in closed form.

p(z) = N(0, I_2), p(x|z) = N(W z + b, s^2 I_5)  =>  p(x) = N(b, W W^T + s^2 I).
The encoder is the exact posterior mean with twice the diagonal of the exact covariance, so
q(z|x) != p(z|x): the ELBO is strictly below log p(x) and IWAE_k closes the gap as k grows.
"""

import math

import pytest
import torch
from torch import nn

from priorvae.likelihoods.gaussian import Gaussian
from priorvae.priors import build_prior
from priorvae.vae import VAE

D, P, S = 2, 5, 0.5


class DiagPosterior(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        prec = torch.eye(D, dtype=w.dtype) + w.T @ w / S**2
        self.cov = torch.linalg.inv(prec)
        self.w, self.b = w, b

    def forward(self, x):
        mu = (x - self.b) @ self.w @ self.cov.T / S**2
        # twice the exact marginal variances: wider than p(z|x), so a safe proposal
        logvar = torch.log(2 * torch.diagonal(self.cov)).expand_as(mu)
        return mu, logvar


@pytest.fixture
def model_and_data():
    torch.manual_seed(1)
    dtype = torch.float64
    w = torch.randn(P, D, dtype=dtype) * 1.5
    b = torch.randn(P, dtype=dtype)
    dec = nn.Linear(D, P).to(dtype)
    with torch.no_grad():
        dec.weight.copy_(w)
        dec.bias.copy_(b)
    prior = build_prior("standard_normal", latent_dim=D).to(dtype)
    vae = VAE(DiagPosterior(w, b), dec, prior, Gaussian((P,), sigma=S)).to(dtype)
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + S**2 * torch.eye(P, dtype=dtype))
    x = marginal.sample((400,))
    return vae, x, marginal.log_prob(x)


def test_iwae_converges_to_exact_log_likelihood(model_and_data):
    vae, x, exact = model_and_data
    gaps = {}
    for k in (1, 10, 100, 2000):
        est = vae.iwae(x, k)
        gap = est - exact  # should be <= 0 in expectation
        stderr = gap.std().item() / math.sqrt(len(gap))
        gaps[k] = gap.mean().item()
        assert gaps[k] <= 3 * stderr + 1e-6, f"IWAE_{k} above log p(x) beyond noise"
    assert gaps[1] < -0.05, "the diagonal posterior should leave a visible ELBO gap"
    assert gaps[1] < gaps[10] < gaps[100] <= gaps[2000] + 1e-3
    assert abs(gaps[2000]) < 0.01


def test_iwae_at_least_elbo_on_average(model_and_data):
    vae, x, _ = model_and_data
    elbo = torch.stack([vae.elbo(x) for _ in range(20)]).mean()
    assert vae.iwae(x, 50).mean() > elbo


def test_iwae_chunking_matches_closed_form(model_and_data):
    vae, x, exact = model_and_data
    # force chunks of 3 samples with k = 1000 (not a multiple of 3)
    est = vae.iwae(x[:50], 1000, max_elements=3 * 50 * P)
    assert est.shape == (50,)
    assert (est - exact[:50]).mean().abs() < 0.02


def test_iwae_rejects_bad_k(model_and_data):
    vae, x, _ = model_and_data
    with pytest.raises(ValueError, match="k must be positive"):
        vae.iwae(x, 0)



def test_iwae_under_several_priors_equals_each_alone(model_and_data):
    """One decoder pass for S priors: row s is exactly iwae() with prior s from the same
    random state, and the second prior's row converges to its own closed-form log p(x)."""
    vae, x, exact = model_and_data
    x, exact = x[:60], exact[:60]
    wide = build_prior("mog", latent_dim=D, n_components=1).double()  # N(0, 4 I)
    with torch.no_grad():
        wide.means.zero_()
        wide.logvars.fill_(math.log(4.0))
    w, b = vae.decoder.weight.detach(), vae.decoder.bias.detach()
    exact_wide = torch.distributions.MultivariateNormal(
        b, 4.0 * w @ w.T + S**2 * torch.eye(P, dtype=w.dtype)).log_prob(x)
    priors = [vae.prior, wide]
    torch.manual_seed(3)
    rows = vae.iwae_priors(x, 2000, priors, max_elements=7 * 60 * P)  # many chunks
    assert rows.shape == (2, 60)
    for s, prior in enumerate(priors):
        alone = VAE(vae.encoder, vae.decoder, prior, vae.likelihood)
        torch.manual_seed(3)
        assert torch.equal(alone.iwae(x, 2000, max_elements=7 * 60 * P), rows[s])
    assert abs((rows[0] - exact).mean()) < 0.02
    # q(z|x) fits the N(0, I) posterior, a poorer proposal here: a looser tolerance
    assert abs((rows[1] - exact_wide).mean()) < 0.05
    assert (exact_wide - exact).abs().mean() > 0.5  # the two priors differ a lot
