import csv

import pytest

from conftest import tiny_toml
from priorvae.cli import main
from priorvae.compare import grid
from priorvae.config import load_config
from priorvae.errors import ConfigError


def test_grid_expands_priors_seeds_and_latent_sizes(tmp_path):
    cfg = load_config(tiny_toml(tmp_path / "c.toml"), [
        'compare.priors=["standard_normal", "mog"]', "compare.seeds=[0, 1]",
        "compare.latent_dims=[2, 3]"])
    runs = grid(cfg)
    assert len(runs) == 8
    names = [n for n, _ in runs]
    assert "mog-d3-seed1" in names
    cfg_mog = dict(runs)["mog-d3-seed1"]
    assert (cfg_mog.prior.name, cfg_mog.model.latent_dim, cfg_mog.train.seed) == ("mog", 3, 1)


def test_grid_errors(tmp_path):
    with pytest.raises(ConfigError, match="no \\[compare\\] table"):
        grid(load_config(tiny_toml(tmp_path / "c.toml")))
    with pytest.raises(ConfigError, match="unknown key"):
        grid(load_config(tiny_toml(tmp_path / "c.toml"), ["compare.prior=[1]"]))


def test_compare_writes_results_and_resumes(tmp_path, capsys):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 2})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal", "mog"]\nseeds = [0, 1]\n'
                "[compare.args.mog]\nn_components = 3\n")
    out = tmp_path / "exp"
    assert main(["compare", str(config), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["prior"], r["seed"]) for r in rows] == [
        ("standard_normal", "0"), ("standard_normal", "1"), ("mog", "0"), ("mog", "1")]
    for col in ("test_elbo", "test_nll", "kl", "mutual_info", "marginal_kl", "kl_prior_to_agg",
                "hole_rate", "mmd", "active_units", "fd_prior", "fd_aggregate", "train_seconds",
                "latent_precision", "latent_recall", "latent_coverage", "latent_c2st_auc",
                "feature_precision", "feature_c2st_auc"):
        assert all(r[col] not in ("", None) for r in rows), col
    md = (out / "results.md").read_text()
    assert "| standard_normal | 2 | 2 |" in md and "±" in md and "latent_c2st_auc" in md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "n_components = 3" in (out / "mog-seed0" / "config.toml").read_text()
    capsys.readouterr()
    # everything finished: a second call skips every run
    assert main(["compare", str(config), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 4


def test_compare_adds_expost_rows(tmp_path):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 3})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal", "mog"]\nseeds = [0]\n'
                'expost = ["mog", "aggregate"]\nexpost_on = ["standard_normal"]\n')
    out = tmp_path / "exp"
    assert main(["compare", str(config), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["prior"] for r in rows] == [
        "standard_normal", "standard_normal+expost-mog", "standard_normal+aggregate", "mog"]
    assert all(r["test_nll"] and r["hole_rate"] for r in rows)
    assert "standard_normal+expost-mog" in (out / "results.md").read_text()
