import dataclasses
import math

import pytest

from priorvae.config import (
    TABLES,
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
    with pytest.raises(ConfigError, match=r"\[model\] hidden must be a non-empty list of "):
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


def bad_values(f: dataclasses.Field) -> list:
    """Values outside a field's domain: the wrong types for its annotation, and one value past
    every bound or choice it declares."""
    kind, m = str(f.type), f.metadata
    if "list[int]" in kind:
        bad = [5, "5", [1.5], ["a"], [True]]
        if m.get("nonempty"):
            bad.append([])
        if m.get("item_low") is not None:
            bad.append([m["item_low"] - 1])
        return bad
    bad = {"bool": [1, "yes", None], "int": ["x", 1.5, True, None],
           "float": ["x", math.nan, math.inf, -math.inf, True, None]}.get(kind, [5, [], True])
    if m.get("choices"):
        bad.append("no-such-choice")
    if m.get("pattern"):
        bad += ["", "no such thing!"]
    if m.get("low") is not None:
        bad.append(m["low"] if m.get("low_open") else m["low"] - 1)
    if m.get("high") is not None:
        bad.append(m["high"] * 2 + 1)
    return bad


# [data] kwargs: the data set's own keys, checked by the data set (tests/test_datasets.py)
FIELDS = [(table, f) for table, cls in TABLES.items() for f in dataclasses.fields(cls)
          if f.name != "kwargs"]


@pytest.mark.parametrize(("table", "field"), FIELDS, ids=[f"{t}.{f.name}" for t, f in FIELDS])
def test_every_field_rejects_values_outside_its_domain_in_one_line(table, field):
    default = config_from_dict({})
    assert getattr(getattr(default, table), field.name) == getattr(TABLES[table](), field.name)
    for value in bad_values(field):
        if value is None and "None" in str(field.type):
            continue
        with pytest.raises(ConfigError) as info:
            config_from_dict({table: {field.name: value}})
        msg = str(info.value)
        assert msg.startswith(f"[{table}] {field.name} must be "), msg
        assert "\n" not in msg and repr(value) in msg, msg


@pytest.mark.parametrize(("table", "field"), FIELDS, ids=[f"{t}.{f.name}" for t, f in FIELDS])
def test_every_field_declares_a_domain(table, field):
    # a number, list or non-free string says what it accepts: nothing is accepted by accident
    m, kind = field.metadata, str(field.type)
    if kind in ("int", "float"):
        assert m.get("low") is not None, f"[{table}] {field.name} has no lower bound"
    if "list" in kind:
        assert m.get("item_low") is not None and m.get("nonempty")
    if kind == "str":
        assert m.get("choices") or m.get("pattern"), f"[{table}] {field.name} is free text"


@pytest.mark.parametrize("override", [
    "train.batch_size=0", "train.val_batch_size=0", "train.lr=nan", "train.lr=-1",
    "train.lr=0", "model.hidden=[-5]", "model.hidden=[0]", "eval.iw_samples=0",
    "train.epochs=0", "train.device=gpu", "data.name=cifar", "model.latent_dim=0"])
def test_listed_bad_values_are_refused(override):
    with pytest.raises(ConfigError, match=r"^\[\w+\] \w+ must be"):
        load_config(None, [override])


def test_logvar_bounds_must_be_ordered():
    with pytest.raises(ConfigError, match=r"\[model\] logvar_min \(3\) must be below logvar_max"):
        load_config(None, ["model.logvar_min=3", "model.logvar_max=2"])


def test_config_that_is_not_utf8_is_named(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[data]\nname = "d\xefgits"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(bad)
