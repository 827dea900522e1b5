import pytest

from priorvae.config import (
    apply_overrides,
    config_from_dict,
    dump_toml,
    load_config,
    parse_override,
)
from priorvae.errors import ConfigError


def test_defaults_match_the_paper_protocol():
    cfg = load_config()
    assert cfg.model.hidden == [300, 300] and cfg.model.latent_dim == 40
    assert cfg.model.activation == "gated"
    assert (cfg.train.batch_size, cfg.train.lr) == (100, 5e-4)


def test_unknown_table_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"unknown table \[trian\].*did you mean 'train'"):
        config_from_dict({"trian": {"epochs": 3}})


def test_unknown_key_is_rejected_with_valid_keys():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"train": {"epoch": 3}})
    msg = str(info.value)
    assert "unknown key 'epoch' in [train]" in msg and "did you mean 'epochs'" in msg
    assert "valid keys: epochs, batch_size" in msg


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match=r"\[train\] epochs must be an integer"):
        config_from_dict({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"\[model\] hidden must be a list of integers"):
        config_from_dict({"model": {"hidden": 300}})
    with pytest.raises(ConfigError, match=r"\[data\] download must be true or false"):
        config_from_dict({"data": {"download": 1}})


def test_overrides_are_typed():
    assert parse_override("train.epochs=10") == ("train", "epochs", 10)
    assert parse_override("train.lr=1e-3") == ("train", "lr", 1e-3)
    assert parse_override("data.download=false") == ("data", "download", False)
    assert parse_override("model.hidden=[64, 64]") == ("model", "hidden", [64, 64])
    assert parse_override("prior.name=mog") == ("prior", "name", "mog")
    assert parse_override('prior.name="mog"') == ("prior", "name", "mog")
    assert parse_override("prior.name=my_prior.py:MyPrior")[2] == "my_prior.py:MyPrior"


def test_override_applied_and_prior_kwargs_kept(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nepochs = 5\n[prior]\nname = "mog"\n')
    cfg = load_config(path, ["train.epochs=7", "prior.n_components=3", "train.lr=0.01"])
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.01
    assert cfg.prior.name == "mog" and cfg.prior.kwargs == {"n_components": 3}
    # an int where a float is expected is accepted and converted
    assert isinstance(load_config(path, ["train.lr=1"]).train.lr, float)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["epochs"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["epochs=3"])


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["prior.name=flow", "prior.transform=nsf", "train.epochs=3"])
    path = tmp_path / "r.toml"
    path.write_text(dump_toml(cfg.to_dict()))
    assert load_config(path).to_dict() == cfg.to_dict()


def test_compare_table_is_kept_aside(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[compare]\npriors = ["mog"]\n')
    assert load_config(path).extra == {"compare": {"priors": ["mog"]}}


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
