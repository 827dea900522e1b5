"""Contract tests over every registered likelihood (a newly registered one is tested too):
normalised, sampling agrees with log_prob, finite gradients, declared flags; and the
Bernoulli preparation that every MNIST number was measured on."""

import math

import pytest
import torch

from priorvae.data import load_splits
from priorvae.datasets import check_suits
from priorvae.errors import ConfigError, PluginError
from priorvae.likelihoods import (
    TEST_SEED,
    VALIDATION_SEED,
    VALUE_TYPES,
    build_likelihood,
    get_likelihood_class,
    list_likelihoods,
    prepare_once,
    prepare_splits,
)

# extra argument sets worth checking beyond the defaults
VARIANTS = {"gaussian": [{"variance": "decoder"}, {"variance": "per_pixel", "sigma": 0.3}],
            "discretized_logistic": [{"n_mixtures": 1}]}
CASES = [(n, kw) for n in list_likelihoods() for kw in [{}, *VARIANTS.get(n, [])]]
IDS = [f"{n}-{'-'.join(map(str, kw.values())) or 'default'}" for n, kw in CASES]


def _support(lik):
    """The values log_prob is a mass over (None: a density on the real line)."""
    if lik.binarizes:
        return torch.tensor([0.0, 1.0])
    if lik.bits_per_dim:
        return torch.arange(256.0) / 255
    return None


def _one_value(name, kw, seed=0):
    """A likelihood of one value (input shape (1,)) and decoder output for it, (1, P)."""
    lik = build_likelihood(name, (1,), **kw)
    gen = torch.Generator().manual_seed(seed)
    return lik, torch.randn(1, *lik.out_shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_flags_and_output_shape(name, kw):
    lik = build_likelihood(name, (3, 4, 5), **kw)
    assert lik.value_types and lik.value_types <= set(VALUE_TYPES)
    assert lik.out_shape == (lik.out_channels(3), 4, 5) and lik.out_channels(3) % 3 == 0
    vec = build_likelihood(name, (7,), **kw)
    assert vec.out_shape == (vec.out_channels(7),)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_log_prob_is_normalised(name, kw):
    lik, out = _one_value(name, kw)
    lik = lik.double()
    support = _support(lik)
    if support is not None:
        logp = lik.log_prob(out.expand(len(support), -1), support.double()[:, None])
        assert logp.shape == (len(support),)
        assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-6)
    else:  # a density: integrate on a fine grid around its mean
        m = lik.mean(out).item()
        grid = torch.linspace(m - 40, m + 40, 400_001, dtype=torch.float64)[:, None]
        dens = lik.log_prob(out.expand(len(grid), -1), grid).exp()
        assert torch.trapezoid(dens, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_sample_and_mean_agree_with_log_prob(name, kw):
    lik, out = _one_value(name, kw, seed=1)
    lik = lik.double()
    n = 40_000
    draws = lik.sample(out.expand(n, -1), generator=torch.Generator().manual_seed(2))
    assert draws.shape == (n, 1)
    support = _support(lik)
    if support is not None:
        p = lik.log_prob(out.expand(len(support), -1), support.double()[:, None]).exp()
        idx = torch.round(draws[:, 0] * (len(support) - 1)).long()  # levels k / (L - 1)
        assert torch.allclose(support.double()[idx], draws[:, 0], atol=1e-6)
        freq = torch.bincount(idx, minlength=len(support)).double() / n
        assert 0.5 * (freq - p).abs().sum().item() < 0.06  # total variation, noise ~0.03
        mean = (p * support.double()).sum()
    else:
        m, v = lik.mean(out)[0, 0], None
        grid = torch.linspace(m.item() - 40, m.item() + 40, 400_001, dtype=torch.float64)
        dens = lik.log_prob(out.expand(len(grid), -1), grid[:, None]).exp()
        mean = torch.trapezoid(dens * grid, grid)
        v = torch.trapezoid(dens * (grid - mean) ** 2, grid)
        assert draws.var().item() == pytest.approx(v.item(), rel=0.05)
    assert lik.mean(out)[0, 0].item() == pytest.approx(mean.item(), abs=1e-6)
    se = draws.std().item() / math.sqrt(n)
    assert abs(draws.mean().item() - mean.item()) < 5 * se + 1e-9


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_gradients_are_finite_even_for_extreme_parameters(name, kw):
    lik = build_likelihood(name, (2, 3, 3), **kw)
    gen = torch.Generator().manual_seed(3)
    x = lik.prepare_fixed(torch.randint(0, 256, (4, 2, 3, 3), generator=gen).float() / 255, gen)
    for scale in (1.0, 30.0):
        out = (scale * torch.randn(4, *lik.out_shape, generator=gen)).requires_grad_()
        logp = lik.log_prob(out, x)
        assert logp.shape == (4,) and torch.isfinite(logp).all()
        logp.sum().backward()
        assert torch.isfinite(out.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in lik.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list_likelihoods())
def test_fixed_preparation_is_reproducible_and_in_the_support(name):
    lik = build_likelihood(name, (1, 8, 8))
    x = torch.randint(0, 256, (50, 1, 8, 8), generator=torch.Generator().manual_seed(4)) / 255
    a, b = prepare_once(lik, x, 5), prepare_once(lik, x, 5)
    assert torch.equal(a, b) and a.shape == x.shape
    support = _support(lik)
    if lik.binarizes:
        assert bool(((a == 0) | (a == 1)).all())
    elif support is not None:
        assert torch.equal(a * 255, (a * 255).round())


def test_bernoulli_prepares_exactly_as_before(mnist_root):
    """The binarization of every published number: validation and test by torch.bernoulli with
    seeds 1234 / 1235 on the CPU, training batches u < x with u ~ U[0, 1) from the global RNG."""
    raw = load_splits("mnist", root=mnist_root, download=False)
    lik = build_likelihood("bernoulli", raw.input_shape)
    s = prepare_splits(raw, lik)
    assert (VALIDATION_SEED, TEST_SEED) == (1234, 1235)
    assert torch.equal(s.x_val, torch.bernoulli(raw.x_val, generator=torch.Generator()
                                                 .manual_seed(1234)))
    assert torch.equal(s.x_test, torch.bernoulli(raw.x_test, generator=torch.Generator()
                                                   .manual_seed(1235)))
    assert s.x_train is raw.x_train  # binarized per batch, during training
    torch.manual_seed(9)
    batch = lik.prepare(raw.x_train[:100])
    torch.manual_seed(9)
    assert torch.equal(batch, (torch.rand(100, 1, 28, 28) < raw.x_train[:100]).float())


def test_value_type_mismatch_is_one_line():
    with pytest.raises(ConfigError, match="data set 'vectors' holds real values") as e:
        check_suits("real", "bernoulli", get_likelihood_class("bernoulli").value_types,
                    "vectors")
    assert "\n" not in str(e.value)
    check_suits("real", "gaussian", get_likelihood_class("gaussian").value_types, "vectors")


def test_bits_per_dim_is_nll_over_d_ln2():
    lik = build_likelihood("discretized_logistic", (3, 32, 32))
    assert lik.nll_bits_per_dim(3072 * math.log(2) * 3.5) == pytest.approx(3.5)
    assert build_likelihood("gaussian", (3, 32, 32)).nll_bits_per_dim(1.0) is None


def test_unknown_likelihood_and_argument_are_refused():
    with pytest.raises(PluginError, match="Did you mean: gaussian"):
        build_likelihood("gausian", (1,))
    with pytest.raises(PluginError, match="unknown argument.*'mixtures'"):
        build_likelihood("discretized_logistic", (1,), mixtures=3)
    with pytest.raises(ConfigError, match="variance must be one of"):
        build_likelihood("gaussian", (1,), variance="learned")


def test_exemplar_prior_takes_its_images_as_the_likelihood_prepares_them():
    from priorvae.priors import PriorContext, build_prior

    shape = (1, 4, 4)
    data = torch.rand(30, *shape)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))

    def encoder(x):
        h = enc(x)
        return h[:, :2], h[:, 2:]

    class Enc(torch.nn.Module):
        def forward(self, x):
            return encoder(x)

    for name in ("bernoulli", "gaussian"):
        lik = build_likelihood(name, shape)
        ctx = PriorContext(encoder=Enc(), input_shape=shape, data=data, likelihood=lik)
        prior = build_prior("exemplar", latent_dim=2, context=ctx, subset=5)
        if name == "bernoulli":  # binarized once with seed 0, as every published run was
            want = torch.bernoulli(data, generator=torch.Generator().manual_seed(0))
            assert prior.images.dtype == torch.uint8
            assert torch.equal(prior.images.float(), want)
        else:
            assert torch.equal(prior.images, data)


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("gaussian", {"sigma": math.inf}, "sigma of 'gaussian' must be a number in \\[1e-06, 1e"),
    ("gaussian", {"sigma": 1e-300}, "sigma of 'gaussian' must be a number"),  # exp(-logvar): inf
    ("gaussian", {"variance": "decoder", "logvar_min": "x"}, "logvar_min of 'gaussian'"),
    ("gaussian", {"dequantize": "no"}, "dequantize of 'gaussian' must be true or false"),
    ("discretized_logistic", {"n_mixtures": True}, "n_mixtures of 'discretized_logistic' must"),
    ("discretized_logistic", {"n_mixtures": 10**9}, "an integer in \\[1, 100\\]"),
    ("discretized_logistic", {"log_scale_min": math.nan}, "log_scale_min of"),
])
def test_bad_likelihood_arguments_are_one_line(name, kwargs, match):
    """Arguments that would train on a NaN loss at step 1 (sigma inf or tiny), silently
    dequantize ('no' is a true string), take True for 1 mixture, or ask for 10**9 mixtures: one
    line naming the key and its domain, before a run folder is written."""
    with pytest.raises(ConfigError, match=match) as info:
        build_likelihood(name, (1, 4, 4), **kwargs)
    assert "\n" not in str(info.value)
