import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest
import torch

from priorvae.errors import PriorError
from priorvae.priors import PRIORS, Prior, PriorContext, build_prior, list_priors, register_prior


@pytest.fixture
def clean_registry():
    """Undo registrations a test makes."""
    before, broken = dict(PRIORS._classes), dict(PRIORS._broken)
    loaded = dict(PRIORS._loaded)
    yield
    PRIORS._classes.clear()
    PRIORS._classes.update(before)
    PRIORS._broken.clear()
    PRIORS._broken.update(broken)
    PRIORS._loaded.update(loaded)


class Shifted(Prior):
    """N(shift, I), a minimal custom prior."""

    def __init__(self, latent_dim, shift: float = 1.0):
        super().__init__(latent_dim)
        self.register_buffer("shift", torch.full((latent_dim,), shift))

    def _log_prob(self, z):
        return torch.distributions.Normal(self.shift, 1.0).log_prob(z).sum(-1)

    def _sample(self, n):
        return self.shift + torch.randn(n, self.latent_dim)


def test_list_priors_with_pattern():
    assert list_priors() == sorted(list_priors())
    assert list_priors("*normal*") == ["standard_normal"]
    assert list_priors("v*") == ["vampprior"]


def test_register_and_build_custom_class(clean_registry):
    register_prior("shifted_test")(Shifted)
    prior = build_prior("shifted_test", latent_dim=3, shift=2.0)
    assert prior.sample(4).shape == (4, 3)
    assert "shifted_test" in list_priors()


def test_duplicate_name_is_an_error(clean_registry):
    register_prior("dup_test")(Shifted)

    class Other(Shifted):
        pass

    with pytest.raises(PriorError, match="'dup_test' is already registered"):
        register_prior("dup_test")(Other)
    with pytest.raises(PriorError, match="already registered"):
        register_prior("mog")(Other)


def test_unknown_name_lists_known_and_close_matches():
    with pytest.raises(ValueError) as info:
        build_prior("vamprior", latent_dim=2)
    msg = str(info.value)
    assert f"Known priors: {', '.join(list_priors())}." in msg
    assert "Did you mean: vampprior" in msg


def test_unknown_kwargs_rejected_with_accepted_ones():
    with pytest.raises(PriorError) as info:
        build_prior("mog", latent_dim=2, n_component=3)
    msg = str(info.value)
    assert "'n_component'" in msg and "n_components=10" in msg and "init_scale=1.0" in msg


def test_context_required_by_vampprior():
    with pytest.raises(PriorError, match="needs the 'encoder' context"):
        build_prior("vampprior", latent_dim=2)


def test_wrong_shapes_fail_at_build_time(clean_registry):
    class BadLogProb(Shifted):
        def _log_prob(self, z):
            return super()._log_prob(z)[:, None]  # (B, 1) instead of (B,)

    class BadSample(Shifted):
        def _sample(self, n):
            return torch.randn(n, self.latent_dim + 1)

    register_prior("bad_lp_test")(BadLogProb)
    register_prior("bad_sample_test")(BadSample)
    with pytest.raises(PriorError, match=r"returned shape \(3, 1\), expected \(3,\)"):
        build_prior("bad_lp_test", latent_dim=2)
    with pytest.raises(PriorError, match=r"returned shape \(2, 3\), expected \(2, 2\)"):
        build_prior("bad_sample_test", latent_dim=2)


def test_duck_typed_module_is_refused_for_the_one_prior_contract(tmp_path):
    path = tmp_path / "duck.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Duck(nn.Module):
            def __init__(self, latent_dim):
                super().__init__()
                self.d = latent_dim
            def log_prob(self, z):
                return z.sum()          # a scalar, not (B,)
            def sample(self, n):
                return torch.randn(n, self.d)
    """))
    with pytest.raises(PriorError, match=r"Duck is not a subclass of priorvae.Prior"):
        build_prior(f"{path}:Duck", latent_dim=2)


def test_class_from_file_path(tmp_path):
    path = tmp_path / "my_prior.py"
    path.write_text(textwrap.dedent("""
        import torch
        from priorvae.priors import Prior

        class Laplace(Prior):
            def __init__(self, latent_dim, scale: float = 1.0):
                super().__init__(latent_dim)
                self.register_buffer("scale", torch.tensor(scale))
            def _log_prob(self, z):
                return torch.distributions.Laplace(0.0, self.scale).log_prob(z).sum(-1)
            def _sample(self, n):
                return torch.distributions.Laplace(0.0, self.scale).sample((n, self.latent_dim))
    """))
    prior = build_prior(f"{path}:Laplace", latent_dim=4, scale=0.5)
    assert prior.log_prob(torch.zeros(2, 4)).shape == (2,)
    with pytest.raises(PriorError, match="has no class 'Nope'"):
        build_prior(f"{path}:Nope", latent_dim=4)
    with pytest.raises(PriorError, match="prior file not found"):
        build_prior(f"{tmp_path / 'missing.py'}:Laplace", latent_dim=4)


def test_class_from_module_path(tmp_path, monkeypatch):
    (tmp_path / "user_priors_mod.py").write_text(textwrap.dedent("""
        import torch
        from priorvae.priors import Prior

        class Wide(Prior):
            def _log_prob(self, z):
                return torch.distributions.Normal(0.0, 3.0).log_prob(z).sum(-1)
            def _sample(self, n):
                return 3 * torch.randn(n, self.latent_dim)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    prior = build_prior("user_priors_mod:Wide", latent_dim=2)
    assert prior.sample(3).shape == (3, 2)
    with pytest.raises(PriorError, match="could not import module"):
        build_prior("no_such_module_xyz:Wide", latent_dim=2)


def test_entry_point_plugins_are_registered(tmp_path, monkeypatch, clean_registry):
    (tmp_path / "plugin_priors_mod.py").write_text(textwrap.dedent("""
        import torch
        from priorvae.priors import Prior

        class Narrow(Prior):
            def _log_prob(self, z):
                return torch.distributions.Normal(0.0, 0.5).log_prob(z).sum(-1)
            def _sample(self, n):
                return 0.5 * torch.randn(n, self.latent_dim)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint(name="narrow", value="plugin_priors_mod:Narrow", group="priorvae.priors"),
           EntryPoint(name="mog", value="plugin_priors_mod:Narrow", group="priorvae.priors")]

    def fake_entry_points(group=None, **kw):
        return eps if group == "priorvae.priors" else []

    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points)
    PRIORS._loaded["entry_points"] = False
    with pytest.warns(UserWarning, match="'mog' .* is not loaded: the name is taken by "
                                         "priorvae.priors.mog.MixtureOfGaussians"):
        assert "narrow" in list_priors()
    assert build_prior("narrow", latent_dim=2).sample(2).shape == (2, 2)
    assert PRIORS.get("mog").__module__ == "priorvae.priors.mog"  # a built-in name stays
    sys.modules.pop("plugin_priors_mod", None)


def test_an_installed_plugin_that_cannot_be_loaded_is_named_with_the_reason(
        tmp_path, monkeypatch, clean_registry):
    """A plug-in whose module fails to import, or whose entry point names a function: asking
    for it by name said 'unknown prior', listing the others, as if it were not installed."""
    (tmp_path / "broken_priors_mod.py").write_text("def f():\n    pass\n"
                                                   "raise RuntimeError('half-installed')\n")
    (tmp_path / "func_priors_mod.py").write_text("def f():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint(name="broken", value="broken_priors_mod:f", group="priorvae.priors"),
           EntryPoint(name="func", value="func_priors_mod:f", group="priorvae.priors")]
    monkeypatch.setattr("importlib.metadata.entry_points",
                        lambda group=None, **kw: eps if group == "priorvae.priors" else [])
    PRIORS._loaded["entry_points"] = False
    with pytest.warns(UserWarning) as caught:
        assert "broken" not in list_priors()
    assert sorted(str(w.message).split(" (")[0] for w in caught) == [
        "could not load prior plug-in 'broken'", "prior plug-in 'func'"]
    with pytest.raises(PriorError, match="prior 'broken' is an installed plug-in .* could not "
                                         "be loaded: .*RuntimeError: half-installed"):
        build_prior("broken", latent_dim=2)
    with pytest.raises(PriorError, match="func_priors_mod:f is a function, not a class"):
        build_prior("func", latent_dim=2)
    sys.modules.pop("func_priors_mod", None)


def test_invalid_names():
    with pytest.raises(PriorError):
        register_prior("a:b")
    with pytest.raises(PriorError, match="must be a string"):
        build_prior(3, latent_dim=2)
    with pytest.raises(PriorError, match="latent_dim must be a positive integer"):
        build_prior("standard_normal", latent_dim=0)


def test_context_is_only_passed_to_priors_that_name_it():
    ctx = PriorContext(encoder=torch.nn.Identity(), input_shape=(1, 2, 2))
    assert build_prior("mog", latent_dim=2, context=ctx).means.shape[1] == 2
