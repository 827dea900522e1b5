"""Contract tests over every registered prior, plus prior-specific checks.

A prior that registers (built-in or plug-in) is tested here the moment it appears in
``list_priors()``.
"""

import math
import warnings

import pytest
import torch
from torch import nn

from priorvae.config import load_config
from priorvae.errors import PriorError
from priorvae.likelihoods import build_likelihood
from priorvae.priors import PriorContext, build_prior, list_priors
from priorvae.runs import load_checkpoint, save_checkpoint
from priorvae.vae import build_vae

D = 2
SHAPE = (1, 2, 2)


class TinyEncoder(nn.Module):
    """A small random encoder for the VampPrior: (K, 1, 2, 2) -> (mu, logvar), each (K, 2)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        mu, lv = self.lin(x.flatten(1)).chunk(2, dim=-1)
        return 2 * mu, -1.0 + 0.5 * torch.tanh(lv)


# how far from its start a prior's weight matrices must move to be clearly not N(0, I): the
# resampled prior's acceptance logit sits behind a tanh layer of width 100
PERTURB_SCALE = {"resampled": 10.0}
# smaller than the defaults where a density on the 160,000-point test grid would take minutes
# (the diffusion prior's ODE with an exact divergence)
TEST_ARGS = {"diffusion": {"hidden": 32, "layers": 2, "ode_steps": 8},
             "resampled": {"n_normalizer": 200_000}}


def make(name, latent_dim=D, perturb=0.0, **kwargs):
    """Build a prior with a small random encoder as context; ``perturb`` adds N(0, perturb^2)
    noise to every parameter so a prior is tested away from its (often trivial) start."""
    torch.manual_seed(0)
    ctx = PriorContext(encoder=TinyEncoder(), input_shape=SHAPE, data=torch.rand(50, *SHAPE),
                       likelihood=build_likelihood("bernoulli", SHAPE))
    prior = build_prior(name, latent_dim=latent_dim, context=ctx,
                        **{**TEST_ARGS.get(name, {}), **kwargs})
    with torch.no_grad():
        for p in prior.parameters():  # noise scaled by 1/sqrt(fan-in), as weights are
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * perturb * PERTURB_SCALE.get(name, 1.0)
                       / p.shape[-1] ** 0.5)
            else:
                p.add_(torch.randn_like(p) * perturb)
    return prior


def test_perturbed_priors_are_not_standard_normal():
    """Guards the contract tests below against testing N(0, I) under another name."""
    from priorvae.gaussian import log_standard_normal

    z = torch.randn(200, D)
    for name in set(PRIORS) - {"standard_normal"}:
        with torch.no_grad():
            gap = (make(name, perturb=0.3).log_prob(z) - log_standard_normal(z)).abs().mean()
        assert gap > 0.1, name


PRIORS = list_priors()


def test_builtin_priors_are_registered():
    assert {"standard_normal", "mog", "vampprior", "flow"} <= set(PRIORS)


def _grid(lo=-10.0, hi=10.0, n=401):
    axis = torch.linspace(lo, hi, n)
    zz = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    return zz, (axis[1] - axis[0]).item() ** 2


@pytest.mark.parametrize("name", PRIORS)
def test_density_integrates_to_one(name):
    prior = make(name, perturb=0.3)
    z, cell = _grid()
    with torch.no_grad():
        mass = torch.exp(prior.log_prob(z)).sum().item() * cell
    tol = 0.01
    if prior.estimated_normalizer:  # within the estimate's own error (3 standard errors)
        stderr = prior.log_normalizer_stderr()
        assert stderr is not None and 0 <= stderr < 0.01, f"{name}: stderr {stderr}"
        tol += 3 * stderr
    else:
        assert prior.log_normalizer_stderr() is None
    assert abs(mass - 1) < tol, f"{name}: mass {mass:.4f}"


@pytest.mark.parametrize("name", PRIORS)
def test_samples_agree_with_density(name):
    """Histogram of sample() against the density integrated over the same cells (TV)."""
    prior = make(name, perturb=0.3)
    n = 40_000
    with torch.no_grad():
        s = prior.sample(n)
        z, cell = _grid(-10, 10, 401)  # fine grid, aggregated into 1x1 cells below
        p = torch.exp(prior.log_prob(z)) * cell
    edges = torch.arange(-10.0, 10.0001, 1.0)

    def cell_index(points):
        ij = torch.bucketize(points.clamp(-9.999, 9.999), edges) - 1
        return ij[:, 0] * 20 + ij[:, 1]

    p_cells = torch.zeros(400).index_add_(0, cell_index(z), p)
    q_cells = torch.bincount(cell_index(s), minlength=400).float() / n
    tv = 0.5 * (p_cells / p_cells.sum() - q_cells).abs().sum().item()
    assert tv < 0.03, f"{name}: total variation {tv:.3f} between samples and density"


@pytest.mark.parametrize("name", PRIORS)
def test_shapes_and_shape_errors(name):
    prior = make(name)
    assert prior.log_prob(torch.randn(7, D)).shape == (7,)
    assert prior.sample(5).shape == (5, D)
    with pytest.raises(ValueError, match=r"expects z of shape \(B, 2\)"):
        prior.log_prob(torch.randn(7, 3))


@pytest.mark.parametrize("name", PRIORS)
def test_every_parameter_gets_a_gradient_from_its_objective(name):
    """Through the VAE loss for priors trained jointly; through ``fit_loss`` (the ex-post
    objective) for the others, and for every learnable prior fitted ex-post."""
    cfg = load_config(None, [f"prior.name={name}", "model.hidden=[16]", "model.latent_dim=2"])
    torch.manual_seed(0)
    data = torch.rand(30, 1, 8, 8)
    vae = build_vae(cfg, (1, 8, 8), data=data)
    x = torch.bernoulli(data[:20])
    index = torch.arange(20)  # the images' positions in the data (leave-one-out priors)
    # one step first: layers behind a zero-initialised output layer (flows) get their first
    # gradient on the second step
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        if vae.prior.joint:
            loss = -vae(x, index)["elbo"].mean()
        else:
            loss = vae.prior.fit_loss(torch.randn(20, 2), index)
        loss.backward()
        opt.step()
    params = dict(vae.prior.named_parameters())
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"


@pytest.mark.parametrize("name", PRIORS)
def test_checkpoint_round_trip_reproduces_log_prob(name, tmp_path):
    cfg = load_config(None, [f"prior.name={name}", "model.hidden=[16]", "model.latent_dim=3"])
    torch.manual_seed(1)
    data = torch.rand(30, 1, 8, 8)
    vae = build_vae(cfg, (1, 8, 8), data=data)
    save_checkpoint(tmp_path / "c.pt", {"model": vae.state_dict()})
    torch.manual_seed(2)  # a differently initialised copy; priors made of training images
    # are rebuilt from the same images (the checkpoint keeps indices, not images)
    other = build_vae(cfg, (1, 8, 8), data=data if vae.prior.needs_data else None)
    other.load_state_dict(load_checkpoint(tmp_path / "c.pt")["model"])
    z = torch.randn(64, 3)
    with torch.no_grad():
        assert torch.equal(vae.prior.log_prob(z), other.prior.log_prob(z))
    saved = vae.prior.state_dict()
    for key, value in vae.prior.named_buffers():  # no saved buffer holds training images
        assert key not in saved or value.shape[-3:] != data.shape[-3:], f"{name}: {key} saved"


@pytest.mark.parametrize("name", PRIORS)
def test_prior_follows_to_dtype(name):
    prior = make(name).to(torch.float64)
    out = prior.log_prob(torch.randn(4, D, dtype=torch.float64))
    assert out.dtype == torch.float64 and prior.sample(3).dtype == torch.float64


@pytest.mark.parametrize("name", PRIORS)
def test_frozen_evaluation_gives_the_same_density_and_forgets_on_exit(name):
    prior = make(name, perturb=0.5)
    z = torch.randn(32, D)
    with torch.no_grad():
        plain = prior.log_prob(z)
    frozen = getattr(prior, "frozen", None)
    if frozen is None:
        pytest.skip(f"{name} does not subclass Prior")
    with frozen():
        assert torch.allclose(prior.log_prob(z), plain, atol=1e-6)
        assert torch.allclose(prior.log_prob(z[:5]), plain[:5], atol=1e-6)  # reused work
        assert not torch.is_grad_enabled()
    if not list(prior.parameters()):
        return
    with torch.no_grad():  # parameters change after the block: nothing stale is kept
        for p in prior.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        changed = prior.log_prob(z)
    assert torch.isfinite(changed).all() and not torch.allclose(changed, plain, atol=1e-4)
    with frozen():
        assert torch.allclose(prior.log_prob(z), changed, atol=1e-6)


# ---- prior-specific checks ------------------------------------------------------------------


def test_standard_normal_equals_torch_normal():
    prior = make("standard_normal", latent_dim=5).double()
    z = torch.randn(100, 5, dtype=torch.float64) * 3
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(prior.log_prob(z), ref, rtol=0, atol=1e-12)


def _mog_reference(prior):
    mix = torch.distributions.Categorical(logits=prior.logits)
    comp = torch.distributions.Independent(
        torch.distributions.Normal(prior.means, torch.exp(0.5 * prior.logvars)), 1)
    return torch.distributions.MixtureSameFamily(mix, comp)


def test_mog_equals_mixture_same_family_in_float64():
    prior = make("mog", latent_dim=6, n_components=7).double()
    with torch.no_grad():  # make components and weights distinct
        prior.logvars.copy_(torch.randn_like(prior.logvars) * 0.5)
        prior.logits.copy_(torch.randn_like(prior.logits))
    z = torch.randn(300, 6, dtype=torch.float64) * 2
    torch.testing.assert_close(prior.log_prob(z), _mog_reference(prior).log_prob(z),
                               rtol=0, atol=1e-10)


def test_mog_is_a_joint_mixture_not_a_product():
    prior = make("mog", latent_dim=2, n_components=2).double()
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-3.0, -3.0], [3.0, 3.0]]))
        prior.logvars.zero_()
        prior.logits.zero_()
    # a joint mixture puts (almost) no mass at (-3, 3); a product of 1-d mixtures would
    lp = prior.log_prob(torch.tensor([[-3.0, 3.0], [3.0, 3.0]], dtype=torch.float64))
    assert lp[1] - lp[0] > 15


def test_mog_sample_moments_match_closed_form():
    prior = make("mog", latent_dim=3, n_components=4)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        prior.logvars.copy_(torch.randn_like(prior.logvars) * 0.3)
        s = prior.sample(200_000).double()
        w = torch.softmax(prior.logits, -1).double()
        m, v = prior.means.double(), prior.logvars.exp().double()
    mean = w @ m
    second = torch.einsum("k,kd,ke->de", w, m, m) + torch.diag(w @ v)
    cov = second - torch.outer(mean, mean)
    torch.testing.assert_close(s.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(s.T), cov, atol=0.05, rtol=0)


def test_vampprior_is_mixture_of_encoded_pseudo_inputs():
    prior = make("vampprior", n_components=9)
    z = torch.randn(20, D)
    mu, logvar = prior.encoder(prior.pseudo_inputs())
    comp = torch.distributions.Independent(torch.distributions.Normal(mu, (0.5 * logvar).exp()), 1)
    ref = torch.logsumexp(comp.log_prob(z[:, None, :]), dim=1) - math.log(9)
    torch.testing.assert_close(prior.log_prob(z), ref, atol=1e-5, rtol=0)
    assert prior.pseudo_inputs().min() >= 0 and prior.pseudo_inputs().max() <= 1


def test_vampprior_samples_components_uniformly():
    prior = make("vampprior", n_components=4)
    with torch.no_grad():  # make the 4 components point-like and far apart
        prior.encoder.lin.weight.zero_()
        prior.encoder.lin.bias.zero_()
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])

    class Fixed(nn.Module):
        def forward(self, x):
            return centers, torch.full_like(centers, -12.0)

    prior.encoder = Fixed()
    s = prior.sample(8000)
    counts = torch.bincount(torch.cdist(s, centers).argmin(1), minlength=4).float()
    assert (counts / 8000 - 0.25).abs().max() < 0.03  # uniform, not the first n components


def test_vampprior_paper_and_data_initialisation():
    paper = make("vampprior", n_components=500)
    assert abs(paper.pseudo.mean().item() - 0.05) < 0.005
    assert abs(paper.pseudo.std().item() - 0.01) < 0.002
    data = torch.rand(50, *SHAPE)
    ctx = PriorContext(encoder=TinyEncoder(), input_shape=SHAPE, data=data)
    from_data = build_prior("vampprior", latent_dim=D, context=ctx, n_components=5, init="data")
    flat = from_data.pseudo.reshape(5, -1)
    for row in flat:  # each pseudo-input is one of the training images (clamped to (0, 1))
        d = (data.reshape(50, -1).clamp(0.01, 0.99) - row).abs().sum(1).min()
        assert d < 1e-6


@pytest.mark.parametrize("clamp", [True, False])
def test_vampprior_pseudo_inputs_are_clamped_unless_the_data_are_real(clamp):
    """[0, 1] by default (the paper's hardtanh, every existing run); ``clamp = false`` for
    real-valued data (here in [-3, 3]), whose pseudo-inputs are then the training examples as
    they are. Clamping real data warns when the prior is built; the state is the same."""
    data = torch.linspace(-3, 3, 50 * math.prod(SHAPE)).reshape(50, *SHAPE)
    ctx = PriorContext(encoder=TinyEncoder(), input_shape=SHAPE, data=data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prior = build_prior("vampprior", latent_dim=D, context=ctx, n_components=5,
                            init="data", clamp=clamp)
    assert [str(w.message) for w in caught if "clamp = false" in str(w.message)] == (
        ["vampprior: the training data hold values outside [0, 1] but the pseudo-inputs are "
         "clamped to [0, 1]; set [prior] clamp = false for real-valued data"] if clamp else [])
    u = prior.pseudo_inputs()
    assert bool(u.min() >= 0 and u.max() <= 1) is clamp
    if not clamp:  # each pseudo-input is one of the training examples, as it is
        d = (data.reshape(50, 1, -1) - u.reshape(1, 5, -1)).abs().sum(-1).min(0).values
        assert d.max() < 1e-6
    assert set(prior.state_dict()) == set(make("vampprior", n_components=5).state_dict())
    with pytest.raises(PriorError, match="clamp must be true or false"):
        build_prior("vampprior", latent_dim=D, context=ctx, n_components=5, clamp="no")


@pytest.mark.parametrize("transform", ["maf", "nsf", "realnvp", "coupling_nsf"])
def test_flow_variants_build_and_normalise(transform):
    prior = make("flow", transform=transform, num_layers=2, hidden_features=16, perturb=0.3)
    z, cell = _grid()
    with torch.no_grad():
        mass = torch.exp(prior.log_prob(z)).sum().item() * cell
    assert abs(mass - 1) < 0.01
    assert prior.sample(10).shape == (10, D)


@pytest.mark.parametrize("transform", ["maf", "nsf", "realnvp", "coupling_nsf"])
def test_new_flow_is_standard_normal(transform):
    """Every variant starts as the identity map, so a new flow prior is N(0, I)."""
    from priorvae.gaussian import log_standard_normal

    prior = make("flow", latent_dim=5, transform=transform)
    z = torch.randn(500, 5) * 1.5
    with torch.no_grad():
        torch.testing.assert_close(prior.log_prob(z), log_standard_normal(z), atol=1e-4, rtol=0)


def test_flow_coupling_sampling_is_one_pass():
    """Coupling flows invert in one pass: the conditioner runs once per layer, not D times."""
    prior = make("flow", latent_dim=10, transform="realnvp", num_layers=2, hidden_features=8)
    calls = {"n": 0}
    for module in prior.modules():
        if type(module).__name__ == "ResidualNet":
            module.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    with torch.no_grad():
        prior.sample(4)
    assert calls["n"] == 2
