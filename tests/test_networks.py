"""Contract tests over every registered encoder/decoder family (a newly registered one is
tested too): builds for its declared input shapes, outputs of the right shapes, checkpoint
round trip; and a wrong family is refused when built."""

import pytest
import torch
from torch import nn

from priorvae.errors import ConfigError, PluginError
from priorvae.likelihoods import build_likelihood
from priorvae.networks import build_networks, check_networks, get_network_class, list_networks
from priorvae.priors import build_prior
from priorvae.vae import VAE

CASES = [(n, s) for n in list_networks() for s in get_network_class(n).example_shapes]
IDS = [f"{n}-{'x'.join(map(str, s))}" for n, s in CASES]
D = 3


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
@pytest.mark.parametrize("params", [1, 3])
def test_family_builds_with_the_right_shapes(name, shape, params):
    enc, dec = build_networks(name, shape, D, params * shape[0], logvar_min=-4.0, logvar_max=1.0)
    x = torch.rand(5, *shape)
    mu, logvar = enc(x)
    assert mu.shape == logvar.shape == (5, D)
    assert logvar.min() >= -4.0 and logvar.max() <= 1.0
    out = dec(torch.randn(5, D))
    assert out.shape == (5, params * shape[0], *shape[1:])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_checkpoint_round_trip(name, shape):
    torch.manual_seed(0)
    enc, dec = build_networks(name, shape, D, shape[0])
    torch.manual_seed(1)  # other weights, then the saved ones
    enc2, dec2 = build_networks(name, shape, D, shape[0])
    x, z = torch.rand(4, *shape), torch.randn(4, D)
    assert not torch.equal(dec(z), dec2(z))
    enc2.load_state_dict(enc.state_dict())
    dec2.load_state_dict(dec.state_dict())
    for a, b in zip(enc(x), enc2(x), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(dec(z), dec2(z))


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_every_likelihood_trains_through_the_family(name, shape):
    """One ELBO step with each likelihood: finite loss and gradients for every parameter."""
    for lik_name in ("bernoulli", "gaussian", "discretized_logistic"):
        lik = build_likelihood(lik_name, shape)
        enc, dec = build_networks(name, shape, D, lik.out_channels(shape[0]))
        vae = VAE(enc, dec, build_prior("standard_normal", latent_dim=D), lik)
        x = lik.prepare(torch.randint(0, 256, (6, *shape)) / 255)
        terms = vae(x)
        terms["elbo"].mean().neg().backward()
        assert torch.isfinite(terms["elbo"]).all()
        assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)
        assert vae.iwae(x, 3).shape == (6,) and vae.sample(2).shape == (2, *shape)


def test_a_wrong_decoder_is_refused_when_built_saying_what_was_expected():
    class Enc(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), D), torch.zeros(len(x), D)

    with pytest.raises(ConfigError, match=r"decoder must return \(2, 2, 8, 8\).*got \(2, 1, 8"):
        check_networks("mine", Enc(), _Dec((1, 8, 8)), (1, 8, 8), D, 2)
    with pytest.raises(ConfigError, match=r"encoder must return \(mu, logvar\), each \(2, 3\)"):
        check_networks("mine", nn.Flatten(), _Dec((1, 8, 8)), (1, 8, 8), D, 1)


class _Dec(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.lin = nn.Linear(D, 64)
        self.shape = shape

    def forward(self, z):
        return self.lin(z).unflatten(1, self.shape)


def test_bad_family_arguments_are_one_line():
    for name, shape, kw, msg in [
        ("conv", (1, 7, 7), {}, "divisible by 4"),
        ("conv", (5,), {}, "takes images"),
        ("resconv", (3, 30, 30), {}, "divisible by 4"),
        ("mlp", (1, 8, 8), {"hidden": []}, "hidden must list"),
        ("mlp", (1, 8, 8), {"activation": "tanh"}, "activation must be"),
        ("mlp", (1, 8, 8), {"hiden": [3]}, "unknown argument"),
        ("mpl", (1, 8, 8), {}, "Did you mean: mlp"),
    ]:
        with pytest.raises((ConfigError, PluginError), match=msg) as e:
            build_networks(name, shape, D, 1, **kw)
        assert "\n" not in str(e.value)


def test_conv_channels_and_resconv_sizes_refuse_booleans():
    """channels = [true, 4] was taken as a size of 1 by the check and failed in torch;
    n_res = true built one residual block."""
    with pytest.raises(ConfigError, match=r"channels must list 2 positive sizes, got \[True, 4\]"):
        build_networks("conv", (1, 8, 8), 2, 1, hidden=[8], channels=[True, 4])
    for bad in ({"n_res": True}, {"res_hidden": True}):
        with pytest.raises(ConfigError, match=r"n_res must be >= 0 and res_hidden >= 1"):
            build_networks("resconv", (3, 8, 8), 2, 3, channels=[4, 4], **bad)


@pytest.mark.parametrize(("name", "shape", "kwargs", "key"), [
    ("mlp", (1, 8, 8), {"hidden": [10**10]}, "[network] hidden = [10000000000]"),
    ("conv", (1, 8, 8), {"hidden": [8], "channels": [10**6, 10**6]},
     "[network] hidden = [8], channels = [1000000, 1000000]"),
    ("resconv", (3, 8, 8), {"channels": [4, 10**9]}, "[network] channels = [4, 1000000000]"),
])
def test_a_network_too_large_for_memory_is_refused_naming_its_sizes(name, shape, kwargs, key):
    """A size with a few zeros too many was an allocation error from inside torch naming
    the network, not the key (or, below the machine's total, a process the kernel kills):
    now counted without allocating and refused in one line with the key and the memory."""
    with pytest.raises(ConfigError) as info:
        build_networks(name, shape, D, 1, **kwargs)
    line = str(info.value)
    assert "\n" not in line and line.startswith(key + " with [model] latent_dim = 3: "), line
    assert "GiB as float32, but " in line and "GiB of memory are available here" in line, line


def test_room_to_train_a_network_counts_its_gradients_and_adam_moments(monkeypatch):
    """Training needs 4 copies of the weights (weights, gradients, Adam's two moments):
    a network whose weights fit but whose training would not is refused when training."""
    import priorvae.datasets

    weights = sum(p.numel() * 4 for m in build_networks("mlp", (1, 8, 8), D, 1, hidden=[16])
                  for p in m.parameters())
    monkeypatch.setattr(priorvae.datasets, "available_memory", lambda: 2 * weights)
    build_networks("mlp", (1, 8, 8), D, 1, hidden=[16])  # evaluating it: fits
    with pytest.raises(ConfigError, match=r"\[network\] hidden = \[16\] with \[model\] "
                                          r"latent_dim = 3: .* and .* GiB to train \(with "
                                          r"gradients and Adam's moments\), but"):
        build_networks("mlp", (1, 8, 8), D, 1, training=True, hidden=[16])
