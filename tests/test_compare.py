import csv
import re
import shutil
from pathlib import Path

import pytest

from conftest import tiny_toml
from priorvae.cli import main
from priorvae.compare import execution_order, grid
from priorvae.config import load_config
from priorvae.errors import ConfigError
from priorvae.runs import Run


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
    for table, match in [("flow = [0]", "names 'flow', which is not in"),
                         ("mog = [0, 0]", "prior_seeds.mog .*twice"),
                         ("mog = [-1]", "prior_seeds.mog must be .*>= 0")]:
        with pytest.raises(ConfigError, match=match):
            grid(load_config(_with_compare(tmp_path, f"[compare.prior_seeds]\n{table}\n")))
    with pytest.raises(ConfigError, match="must be a table of PRIOR"):
        grid(load_config(_with_compare(tmp_path, "prior_seeds = 3\n")))


def _with_compare(tmp_path, extra: str, priors='["standard_normal", "mog"]', seeds="[0]"):
    config = tiny_toml(tmp_path / "c.toml")
    with open(config, "a") as f:
        f.write(f"\n[compare]\npriors = {priors}\nseeds = {seeds}\n{extra}")
    return config


def test_prior_seeds_and_seed_by_seed_order(tmp_path):
    cfg = load_config(_with_compare(tmp_path, "[compare.prior_seeds]\nflow = [0, 1, 2]\n"
                                    "mog = [5]\n", '["standard_normal", "mog", "flow"]', "[0, 1]"))
    runs = grid(cfg)
    assert [n for n, _ in runs] == ["standard_normal-seed0", "standard_normal-seed1",
                                    "mog-seed5", "flow-seed0", "flow-seed1", "flow-seed2"]
    assert dict(runs)["flow-seed2"].train.seed == 2
    # run seed by seed, so stopping early leaves the priors with the same seeds
    assert [n for n, _ in execution_order(runs)] == [
        "standard_normal-seed0", "flow-seed0", "standard_normal-seed1", "flow-seed1",
        "mog-seed5", "flow-seed2"]


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
    assert md.count("| standard_normal | 2 | 0, 1 | 2 | cpu |") == 2  # headline, every column
    assert "| test NLL | ELBO | hole rate | KL(p‖q) |" in md and "| train min | fit min |" in md
    assert "±" in md and "latent_c2st_auc" in md
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
    # an ex-post row carries its fit's cost; the others have no fit
    assert [bool(r["fit_seconds"]) for r in rows] == [False, True, False, False]
    # every row names the classifier behind its fd_* and feature_* numbers: one here
    assert len({r["quality_classifier"] for r in rows}) == 1
    assert re.fullmatch("[0-9a-f]{12}", rows[0]["quality_classifier"])
    assert "standard_normal+expost-mog" in (out / "results.md").read_text()


def test_compare_skips_a_cell_another_process_holds(tmp_path, capsys):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 2})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal", "mog"]\nseeds = [0]\n')
    out = tmp_path / "exp"
    busy = out / "mog-seed0"
    busy.mkdir(parents=True)
    # the lock is per open file, so holding it here stands for a second process
    with Run(busy, load_config(config)).lock("train"):
        assert main(["compare", str(config), "--out", str(out), "--quiet"]) == 0
        printed = capsys.readouterr().out
        # --report-only beside the process that works: tables from what is finished, no work
        (out / "results.md").unlink()
        assert main(["compare", str(config), "--out", str(out), "--report-only"]) == 0
        assert "partial: mog-seed0" in (out / "results.md").read_text()
        assert not (busy / "last.pt").exists() and "[1/2]" not in capsys.readouterr().out
    assert "mog-seed0: skipped" in printed and "in use by priorvae train" in printed
    assert "tables without 1 unfinished cell(s): mog-seed0" in printed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["prior"] for r in rows] == ["standard_normal"]
    assert "partial: mog-seed0 not finished" in (out / "results.md").read_text()
    # once the other process is gone, the next call does the cell and writes the full table
    assert main(["compare", str(config), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["prior"] for r in rows] == ["standard_normal", "mog"]
    assert "partial" not in (out / "results.md").read_text()
    assert main(["compare", str(config), "--out", str(tmp_path / "none"), "--report-only"]) == 2
    assert "--report-only: " in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_expost_sources_share_one_decoder_pass_and_change_no_number(tmp_path):
    from priorvae.evaluate import evaluate_run

    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 3})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal"]\nseeds = [0]\n'
                'expost = ["mog", "aggregate"]\n')
    out = tmp_path / "exp"
    assert main(["compare", str(config), "--out", str(out), "--quiet"]) == 0
    cell = out / "standard_normal-seed0"
    joint = Run.open(cell).metrics()
    sources = {"trained": joint, **joint["prior_sources"]}
    assert sorted(sources["trained"]["test_nll_shared_with"]) == ["aggregate", "expost-mog"]
    # each source evaluated alone, in a copy of the cell, gives the very same numbers
    alone = tmp_path / "alone"
    shutil.copytree(cell, alone)
    for label, shared in sources.items():
        own = evaluate_run(alone, prior_source=label, progress=False)
        assert own["test_nll_shared_with"] is None
        for key in ("test_nll", "test_elbo", "hole_rate", "kl_prior_to_agg", "latent_c2st_auc",
                    "fd_prior"):
            assert own[key] == shared[key], (label, key)
    assert len({sources[s]["test_nll"] for s in sources}) == 3  # the priors do differ


def _local_patterns() -> list[str]:
    """What .gitignore keeps out of a grid committed under experiments/results/."""
    prefix = "experiments/results/**/"
    lines = (Path(__file__).parents[1] / ".gitignore").read_text().splitlines()
    return [line[len(prefix):].rstrip("/") for line in lines if line.startswith(prefix)]


def test_a_grid_committed_without_its_local_files_is_still_done(tmp_path, capsys):
    """A new machine gets a grid's finished cells from git, without what .gitignore keeps
    local (resume checkpoints, locks, TensorBoard's projector data): compare must find them
    done."""
    patterns = _local_patterns()
    assert {"last.pt", ".lock"} <= set(patterns)
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 2})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal"]\nseeds = [0, 1]\n'
                'expost = ["mog"]\n')
    out = tmp_path / "exp"
    assert main(["compare", str(config), "--out", str(out), "--quiet"]) == 0
    clone = tmp_path / "clone"
    shutil.copytree(out, clone, ignore=shutil.ignore_patterns(*patterns))
    assert not list(clone.rglob("last.pt")) and not list(clone.rglob("projector_config.pbtxt"))
    assert list(clone.rglob("best.pt")) and list(clone.rglob("figures/*.png"))
    capsys.readouterr()
    assert main(["compare", str(config), "--out", str(clone), "--quiet"]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 2
    assert (clone / "results.csv").read_text() == (out / "results.csv").read_text()


def test_results_say_when_rows_come_from_different_quality_classifiers(tmp_path):
    from priorvae.compare import RESULT_COLUMNS, write_results

    row = {c: None for c in RESULT_COLUMNS} | {"prior": "standard_normal", "latent_dim": 2,
                                               "run": "r", "test_nll": 1.0}
    write_results(tmp_path, [row | {"seed": 0, "quality_classifier": "aaaa"},
                             row | {"seed": 1, "quality_classifier": "aaaa"}])
    assert "quality classifiers" not in (tmp_path / "results.md").read_text()
    write_results(tmp_path, [row | {"seed": 0, "quality_classifier": "aaaa"},
                             row | {"seed": 1, "quality_classifier": "bbbb"}])
    assert "come from 2 quality classifiers (aaaa, bbbb;" in (tmp_path / "results.md").read_text()


def test_classifier_columns_average_only_the_most_common_classifier(tmp_path):
    """fd_* / feature_* of two classifiers are on different scales: their mean over seeds
    keeps the most common classifier's rows and marks the row; other columns keep every seed."""
    from priorvae.compare import RESULT_COLUMNS, write_results

    row = {c: None for c in RESULT_COLUMNS} | {"prior": "flow", "latent_dim": 2, "run": "r"}
    rows = [row | {"seed": s, "test_nll": nll, "fd_prior": fd, "quality_classifier": clf}
            for s, nll, fd, clf in [(0, 80.0, 1.0, "aaaa"), (1, 82.0, 3.0, "aaaa"),
                                    (2, 84.0, 100.0, "bbbb")]]
    write_results(tmp_path, rows)
    text = (tmp_path / "results.md").read_text()
    table = next(line for line in text.splitlines() if line.startswith("| flow |"))
    cells = [c.strip() for c in table.split("|")]
    assert cells[6] == "82 ± 2"  # test NLL: every seed
    assert "2 ± 1.4 †" in cells  # fd_prior: seeds 0 and 1 (classifier aaaa) only
    assert "rows of aaaa, the most common" in text and "(flow seed 2)" in text
    # one classifier: nothing left out, no mark
    write_results(tmp_path, [r | {"quality_classifier": "aaaa"} for r in rows])
    text = (tmp_path / "results.md").read_text()
    assert "†" not in text and "34.67 ± 57" in text


def test_table_cells_keep_every_nat_of_large_values():
    from priorvae.compare import _mean_std

    assert _mean_std([10818.8]) == "10819"  # colour images: not 1.08e+04
    assert _mean_std([10818.8, 10900.2]) == "10860 ± 58"
    assert _mean_std([84.45]) == "84.5" and _mean_std([22.7, 22.5, 22.9]) == "22.7 ± 0.2"
    assert _mean_std([None]) == "–"


def _script(name: str):
    """experiments/NAME.py as a module (a script, not part of the package)."""
    import importlib.util

    path = Path(__file__).parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matched_grid_scores_every_row_at_one_k_on_the_same_images(tmp_path, monkeypatch,
                                                                   capsys):
    import json
    import statistics
    import sys

    import torch

    from priorvae.data import load_splits
    from priorvae.likelihoods import prepare_splits
    from priorvae.measure import mean_iwae_nll

    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 1})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal", "mog"]\nseeds = [0]\n'
                'expost = ["mog"]\nexpost_on = ["standard_normal"]\n'
                "[compare.args.mog]\nn_components = 3\n")
    out = tmp_path / "exp"
    assert main(["compare", str(config), "--out", str(out), "--quiet"]) == 0
    script = _script("matched_grid")
    argv = ["matched_grid.py", str(out), "--iw-samples", "4", "--limit", "12"]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    rows = list(csv.DictReader(open(out / "matched" / "matched.csv")))
    assert sorted({(r["row"], r["seed"]) for r in rows}) == sorted(
        (row, seed) for row in ("standard_normal", "standard_normal+expost-mog", "mog")
        for seed in ("0",))
    assert {(r["iw_samples"], r["test_images"]) for r in rows} == {("4", "12")}
    # the own prior's row is what a separate IWAE pass from the run's seed gives
    run = Run.open(out / "standard_normal-seed0")
    model = run.load_model("best", torch.device("cpu"))
    splits = prepare_splits(load_splits(run.config.data), model.likelihood)
    torch.manual_seed(run.config.train.seed)
    own = mean_iwae_nll(model, splits.x_test[:12], 4)
    by = {(r["row"], r["seed"]): r for r in rows}
    assert float(by[("standard_normal", "0")]["test_nll"]) == pytest.approx(own, abs=1e-3)
    # differences are per image against the same seed's N(0, I) VAE, with their se over images
    for s in (0,):
        ref = torch.tensor(json.loads((out / "matched" / f"standard_normal-seed{s}.json")
                                      .read_text())["rows"]["trained"], dtype=torch.float64)
        mog = torch.tensor(json.loads((out / "matched" / f"mog-seed{s}.json").read_text())
                           ["rows"]["trained"], dtype=torch.float64)
        assert len(ref) == 12
        assert float(by[("standard_normal", str(s))]["diff_vs_standard_normal"]) == 0
        assert float(by[("mog", str(s))]["diff_vs_standard_normal"]) == pytest.approx(
            (mog - ref).mean().item(), abs=1e-3)
        assert float(by[("mog", str(s))]["diff_stderr"]) == pytest.approx(
            statistics.stdev((mog - ref).tolist()) / 12 ** 0.5, abs=1e-3)
    md = (out / "matched" / "matched.md").read_text()
    assert "| standard_normal | 0 |" in md and "0 (reference)" in md
    # a second call reuses each cell's values (same best.pt, K and images)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "matched").glob("*-seed*.json")}
    capsys.readouterr()
    script.main()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "matched").glob("*-seed*.json")} \
        == stamps
    # a table of cells without their seed's reference says so instead of a number
    monkeypatch.setattr(sys, "argv", [*argv, "--only", "mog-*"])
    script.main()
    assert "| mog | 0 | " in capsys.readouterr().out
    assert "– (no reference)" in (out / "matched" / "matched.md").read_text()
    # an ex-post prior fitted again under its label is another prior: its cell is scored
    # again (its cached values were reused, the old prior's numbers under the new one's name)
    from priorvae.expost import fit_prior

    cached = json.loads((out / "matched" / "standard_normal-seed0.json").read_text())
    fit_prior(out / "standard_normal-seed0", "mog", {"n_components": 2}, label="expost-mog",
              epochs=3, progress=False)
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    again = json.loads((out / "matched" / "standard_normal-seed0.json").read_text())
    assert again["rows"]["trained"] == cached["rows"]["trained"]  # the same VAE, seed, images
    assert again["rows"]["expost-mog"] != cached["rows"]["expost-mog"]
    # --limit beyond the test split: the csv and the table give the images scored
    monkeypatch.setattr(sys, "argv", [*argv[:-1], "1000000"])
    script.main()
    n = str(len(splits.x_test))
    assert {r["test_images"] for r in csv.DictReader(open(out / "matched" / "matched.csv"))} \
        == {n}
    assert f"on the first {n} test images" in (out / "matched" / "matched.md").read_text()
    # --save records each cell's matched entries, so compare's tables show the column
    monkeypatch.setattr(sys, "argv", [*argv, "--save"])
    script.main()
    cached = json.loads((out / "matched" / "standard_normal-seed0.json").read_text())["rows"]
    d = (torch.tensor(cached["expost-mog"], dtype=torch.float64)
         - torch.tensor(cached["trained"], dtype=torch.float64))
    metrics = Run.open(out / "standard_normal-seed0").metrics()
    assert (metrics["matched"]["iw_samples"], metrics["matched"]["test_images"]) == (4, 12)
    record = metrics["prior_sources"]["expost-mog"]["matched"]
    assert record["diff"] == pytest.approx(d.mean().item(), abs=1e-6)
    assert record["diff_stderr"] == pytest.approx(d.std().item() / 12 ** 0.5, abs=1e-6)
    assert "matched" not in Run.open(out / "mog-seed0").metrics()  # one source: nothing to pair
    assert main(["compare", str(config), "--out", str(out), "--report-only", "--quiet"]) == 0
    row = next(r for r in csv.DictReader(open(out / "results.csv"))
               if r["prior"] == "standard_normal+expost-mog")
    assert float(row["matched_diff"]) == pytest.approx(d.mean().item(), abs=1e-4)


def test_crafted_values_in_a_cells_metrics_are_left_out_of_the_tables(tmp_path, capsys):
    # metrics.json is data: the new fields (matched, *_stderr, truncation_share, fit_improved)
    # holding a string, a list or a number beyond a float ended compare in a traceback
    # ('str' object has no attribute 'get', could not convert string to float) or wrote
    # Infinity into results.json
    import json

    from priorvae.compare import _collect_rows, _row, write_results

    cfg = load_config(tiny_toml(tmp_path / "c.toml"))
    good = {"status": "finished", "test_nll": 22.5, "hole_rate": 0.05,
            "hole_rate_stderr": 0.004, "epochs_trained": 3, "device": "cpu"}
    crafted = [{"matched": "x"}, {"matched": [1, 2]}, {"matched": {"diff": "abc"}},
               {"hole_rate_stderr": "abc"}, {"truncation_share": [0.5] * 10_000},
               {"truncation_share": float("inf")}, {"fit_improved": [1]},
               {"test_nll": "22"}, {"epochs_trained": "3"}, {"device": ["cpu"]}]
    rows = [_row(f"cell{i}", cfg, good | bad) for i, bad in enumerate(crafted)]
    assert "is not a value of that column; left out" in capsys.readouterr().err
    write_results(tmp_path, rows)
    assert "22.5" in (tmp_path / "results.md").read_text()
    body = (tmp_path / "results.csv").read_text().partition("\n")[2]  # mutual_info: a name
    assert "inf" not in body and "abc" not in body and "[" not in body
    json.loads(json.dumps(rows), parse_constant=lambda c: pytest.fail(c))  # no Infinity
    # an ex-post source's results that are not a JSON object are no results
    out = tmp_path / "grid"
    cell = out / "standard_normal-seed0"
    cell.mkdir(parents=True)
    (cell / "config.toml").write_text((tmp_path / "c.toml").read_text())
    for sources in ("x", [1], {"expost-mog": "latent_c2st_auc"}, {"expost-mog": 3}):
        (cell / "metrics.json").write_text(json.dumps(
            good | {"latent_c2st_auc": 0.5, "best_epoch": 3, "prior_sources": sources}))
        rows, unfinished = _collect_rows(out, [(cell.name, cfg)], ["mog"], None)
        assert len(rows) == 1 and unfinished == ["standard_normal-seed0+expost-mog"]


def test_monte_carlo_error_of_a_mean_uses_the_rows_the_mean_averages(tmp_path):
    # fd_prior of two classifiers: the mean keeps the most common one's rows (seeds 0, 1), and
    # so must its error: sqrt(0.3² + 0.4²) / 2 = 0.25, not the 33 that seed 2's error made it
    from priorvae.compare import RESULT_COLUMNS, write_results

    row = {c: None for c in RESULT_COLUMNS} | {"prior": "flow", "latent_dim": 2, "run": "r"}
    rows = [row | {"seed": s, "fd_prior": fd, "fd_prior_stderr": se, "quality_classifier": c,
                   "hole_rate": 0.1, "hole_rate_stderr": hse}
            for s, fd, se, c, hse in [(0, 1.0, 0.3, "aaaa", 0.01), (1, 3.0, 0.4, "aaaa", None),
                                      (2, 100.0, 100.0, "bbbb", 0.01)]]
    write_results(tmp_path, rows)
    table = next(line for line in (tmp_path / "results.md").read_text().splitlines()
                 if line.startswith("| flow |"))
    assert "2 ± 1.4 † [0.25]" in table
    # a row without an error (evaluated before errors were recorded): no error for the mean
    assert "0.1 ± 1.7e-17 |" in table


def test_stage_grid_stages_what_a_grid_needs_and_refuses_links_fifos_and_huge_files(tmp_path):
    # a grid folder is data: the old script ran `git add GRID` (a symbolic link to /etc/passwd
    # and a stray log went into the commit) and read metrics.json through a FIFO (it hung)
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "experiments" / "stage_grid.py"
    repo = tmp_path / "repo"
    grid = repo / "experiments" / "results" / "g"

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True).stdout

    for name, status in (("done-seed0", "finished"), ("busy-seed0", "running")):
        (grid / name / "figures").mkdir(parents=True)
        for entry, text in (("config.toml", "[data]\n"), ("best.pt", "b"), ("last.pt", "l"),
                            ("figures/samples.png", "p"), ("events.out.tfevents.1.vm", "e"),
                            ("metrics.json", json.dumps({"status": status}))):
            (grid / name / entry).write_text(text)
    (grid / "compare.toml").write_text("[compare]\n")
    (grid / "busy-seed0" / "nohup.out").write_text("a stray log")
    git("init", "-q")
    shutil.copy(script.parents[1] / ".gitignore", repo / ".gitignore")

    def stage():
        return subprocess.run([sys.executable, str(script), str(grid.relative_to(repo))],
                              cwd=repo, capture_output=True, text=True, timeout=60)

    assert stage().returncode == 0
    staged = sorted(git("diff", "--cached", "--name-only").split())
    prefix = "experiments/results/g/"
    assert staged == [prefix + p for p in (
        "busy-seed0/best.pt", "busy-seed0/config.toml", "busy-seed0/events.out.tfevents.1.vm",
        "busy-seed0/figures/samples.png", "busy-seed0/last.pt", "busy-seed0/metrics.json",
        "compare.toml", "done-seed0/best.pt", "done-seed0/config.toml",
        "done-seed0/events.out.tfevents.1.vm", "done-seed0/figures/samples.png",
        "done-seed0/metrics.json")]
    git("reset", "-q")
    (grid / "done-seed0" / "figures" / "evil.png").symlink_to("/etc/passwd")
    hostile = {"evil.png is a symbolic link": lambda: None}
    metrics = grid / "busy-seed0" / "metrics.json"

    def fifo():
        (grid / "done-seed0" / "figures" / "evil.png").unlink()
        metrics.unlink()
        os.mkfifo(metrics)

    def huge():
        metrics.unlink()
        metrics.write_text(json.dumps({"status": "running"}))
        with open(grid / "busy-seed0" / "last.pt", "wb") as f:
            f.truncate(200 * 2**20)  # sparse: no disk used

    hostile["metrics.json is not a regular file"] = fifo
    hostile["last.pt is 200 MB, over the 95 MB"] = huge
    for message, plant in hostile.items():
        plant()
        done = stage()
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "nothing was staged" in done.stderr
        assert git("diff", "--cached", "--name-only") == ""


def test_rows_at_another_k_or_other_images_say_so(tmp_path):
    # a cell evaluated by hand at another K (evaluate --iw-samples / --limit, no fallback) and
    # a matched pass at other (K, images) went into the same columns with nothing said
    from priorvae.compare import RESULT_COLUMNS, write_results

    row = {c: None for c in RESULT_COLUMNS} | {"prior": "flow", "latent_dim": 2, "run": "r",
                                               "test_nll": 80.0, "matched_diff": -0.4,
                                               "matched_diff_stderr": 0.06}
    rows = [row | {"seed": s, "iw_samples": k, "test_images": n, "matched_iw_samples": mk,
                   "matched_test_images": mn}
            for s, k, n, mk, mn in [(0, 5000, 10000, 50, 500), (1, 5000, 10000, 50, 500),
                                    (2, 100, 500, 5000, 10000)]]
    write_results(tmp_path, rows)
    text = (tmp_path / "results.md").read_text()
    assert "test NLL: IWAE bound (K = 5000 on 10000 test images unless noted below)" in text
    assert "(K = 50 on 500 test images unless noted below)" in text
    assert "- flow (seed 2): test NLL at K = 100 on 500 test images; Δ NLL, matched, at " \
           "K = 5000 on 10000 test images" in text
    assert "(seed 0)" not in text and "(seed 1)" not in text


def test_figure_marks_bars_estimated_at_another_k_or_other_images():
    # comparison.png's test-NLL bars used each row's own K: a K = 50 ex-post row stood beside
    # K = 5000 rows with nothing to tell them apart
    from priorvae.compare import unmatched_evaluations

    def row(prior, seed, k, n):
        return {"prior": prior, "latent_dim": 40, "seed": seed, "iw_samples": k,
                "test_images": n}

    rows = [row("standard_normal", 0, 5000, 10000), row("standard_normal", 1, 5000, 10000),
            row("vampprior", 0, 5000, 10000), row("standard_normal+expost-diffusion", 0, 50, 500),
            row("flow", 0, 5000, 500), row("mog", 0, None, None)]
    labels = sorted({f"{r['prior']} d40" for r in rows})
    assert unmatched_evaluations(rows, labels) == {
        "standard_normal+expost-diffusion d40": (50, 500), "flow d40": (5000, 500)}
    assert unmatched_evaluations(rows[:3], labels) == {}  # all at one (K, images): none marked
    assert unmatched_evaluations(rows, ["flow d40"]) == {"flow d40": (5000, 500)}


def test_c2st_grid_replaces_planted_classifier_tests_and_saves_idempotently(tmp_path,
                                                                           monkeypatch, capsys):
    # commit 78f52a0 changed the classifier test's halves (random, not first and second):
    # experiments/c2st_grid.py redoes the saved tests of every cell and source of a grid
    import json
    import sys

    import torch

    from priorvae.aggregate import encode_split
    from priorvae.data import load_splits
    from priorvae.evaluate import evaluate_run, evaluate_sources
    from priorvae.expost import fit_prior, load_prior_source
    from priorvae.likelihoods import prepare_splits
    from priorvae.measure import HELDOUT_CODES
    from priorvae.twosample import classifier_two_sample

    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 1}, eval={"iw_samples": 2})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal"]\nseeds = [0]\n'
                'expost = ["mog"]\nexpost_on = ["standard_normal"]\n')
    out = tmp_path / "exp"
    cell = out / "standard_normal-seed0"
    # the grid's one cell, trained and evaluated as compare does, with fewer diagnostic points
    assert main(["train", str(config), "--out", str(cell), "--quiet"]) == 0
    fit_prior(cell, "mog", {"n_components": 3}, label="expost-mog", epochs=3, progress=False)
    evaluate_sources(cell, ["trained", "expost-mog"], progress=False, n_diagnostic=600)
    run = Run.open(cell)
    keys = ("latent_c2st_auc", "latent_c2st_acc", "feature_c2st_auc", "feature_c2st_acc")
    planted = {k: 0.01 for k in keys} | {f"{k}_stderr": 0.5 for k in keys}
    sources = run.metrics()["prior_sources"]
    sources["expost-mog"].update(planted)
    sources["expost-mog"]["evaluated_checkpoint"] = "0" * 64  # of another best.pt: left alone
    run.update_metrics(**planted, prior_sources=sources)
    own_fig, mog_fig = (cell / "figures" / "hole_scores.png",
                        cell / "figures" / "expost-mog" / "hole_scores.png")
    figs = {own_fig: own_fig.read_bytes(), mog_fig: mog_fig.read_bytes()}  # evaluate's
    script = _script("c2st_grid")
    monkeypatch.setattr(sys, "argv", ["c2st_grid.py", str(out)])  # without --save: no figure
    script.main()
    assert {f: f.read_bytes() for f in figs} == figs
    monkeypatch.setattr(sys, "argv", ["c2st_grid.py", str(out), "--save"])
    script.main()
    metrics = run.metrics()
    # the own prior's hole-score figure is drawn again from the new test; the skipped keeps its
    assert own_fig.read_bytes() != figs[own_fig] and mog_fig.read_bytes() == figs[mog_fig]
    # the new values are the classifier test of n prior samples against one posterior draw of
    # each held-out image (several per image on the small test split), from the run's seed
    n = metrics["diagnostic_points"]
    model = run.load_model("best", torch.device("cpu"))
    splits = prepare_splits(load_splits(run.config.data), model.likelihood)
    mu, logvar = encode_split(model.encoder, splits.x_test)
    draws = max(1, min(n, HELDOUT_CODES) // len(mu))
    assert draws > 1  # the digits' test split is small: the halves keep each image's codes
    mu, logvar = mu.repeat_interleave(draws, 0), logvar.repeat_interleave(draws, 0)
    torch.manual_seed(run.config.train.seed)
    z_prior = load_prior_source(run, model, "trained", splits).sample(n)
    m = min(n, len(mu))
    z_held = mu[:m] + torch.exp(0.5 * logvar[:m]) * torch.randn_like(mu[:m])
    want = classifier_two_sample(z_prior[:m], z_held, q_block=draws)
    assert metrics["latent_c2st_auc"] == pytest.approx(want["auc"], abs=1e-9)
    assert metrics["latent_c2st_acc_stderr"] == pytest.approx(want["accuracy_stderr"], abs=1e-9)
    assert all(metrics[k] != 0.01 for k in keys) and 0.3 < metrics["feature_c2st_auc"] <= 1
    record = metrics["c2st_recomputed"]
    assert record["split"] == "random halves" and record["points"] == n
    assert record["replaced"] == planted and record["feature"] == "recomputed"
    assert metrics["prior_sources"]["expost-mog"]["latent_c2st_auc"] == 0.01  # stale: untouched
    assert "c2st_recomputed" not in metrics["prior_sources"]["expost-mog"]
    rows = {r["source"]: r for r in csv.DictReader(open(out / "c2st" / "c2st.csv"))}
    assert float(rows["trained"]["old_latent_c2st_auc"]) == 0.01
    assert float(rows["trained"]["new_latent_c2st_auc"]) == pytest.approx(want["auc"])
    assert rows["expost-mog"]["skipped"] == "evaluated with another best.pt"
    # today's checkpoint again: the source is redone; a second --save changes no byte
    sources = metrics["prior_sources"]
    sources["expost-mog"]["evaluated_checkpoint"] = metrics["evaluated_checkpoint"]
    run.update_metrics(prior_sources=sources)
    script.main()
    saved = (cell / "metrics.json").read_bytes()
    mog = json.loads(saved)["prior_sources"]["expost-mog"]
    assert mog["latent_c2st_auc"] != 0.01 and mog["c2st_recomputed"]["replaced"] == planted
    assert mog_fig.read_bytes() != figs[mog_fig]
    figs = {f: f.read_bytes() for f in figs}
    script.main()
    assert (cell / "metrics.json").read_bytes() == saved
    assert {f: f.read_bytes() for f in figs} == figs  # the same draws: the same PNG bytes
    # the record survives the filters of what a reader shows, and the tables take the values
    assert Run.open(cell).current_metrics()["c2st_recomputed"]["replaced"] == planted
    assert main(["compare", str(config), "--out", str(out), "--report-only", "--quiet"]) == 0
    row = next(r for r in csv.DictReader(open(out / "results.csv"))
               if r["prior"] == "standard_normal")
    assert float(row["latent_c2st_auc"]) == pytest.approx(metrics["latent_c2st_auc"])
    # an evaluation of the same best.pt writes its own tests: the record of the redone goes
    evaluate_run(cell, progress=False, n_diagnostic=600)
    assert "c2st_recomputed" not in Run.open(cell).metrics()
    # bad input: one line
    monkeypatch.setattr(sys, "argv", ["c2st_grid.py", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="not a compare output folder"):
        script.main()
    # hostile cells, each its own line, the others done: a grid of copies of the cell
    import fcntl
    import os

    grid_dir = tmp_path / "hostile"
    grid_dir.mkdir()

    def copy(name, edit=None):
        dst = grid_dir / name
        shutil.copytree(cell, dst)
        m = json.loads((dst / "metrics.json").read_text())
        m["prior_sources"]["expost-mog"].pop("c2st_recomputed", None)
        if edit is not None:
            edit(m, m["prior_sources"]["expost-mog"])
        (dst / "metrics.json").write_text(json.dumps(m))
        return dst

    def not_numbers(m, mog):  # old values that are no numbers: none, and said so
        m["c2st_recomputed"] = {"replaced": planted | {"latent_c2st_acc": "abc"}}
        mog["feature_c2st_auc"] = [1]
    copy("standard_normal-seed0", not_numbers)
    copy("standard_normal-seed1", lambda m, mog: (m.update(diagnostic_points=10**12),
                                                  mog.update(latent_c2st_auc=None)))
    copy("exemplar-seed0", lambda m, mog: mog.update(diagnostic_points=4))

    def unknown(m, mog):  # no checkpoint, no epoch: unknown; an epoch only (old MNIST): ok
        del m["evaluated_checkpoint"], m["evaluated_epoch"]
        del mog["evaluated_checkpoint"]
    copy("standard_normal-seed2", unknown)
    copy("vampprior-seed0", lambda m, mog: (m.update(quality_classifier="other"),
                                            mog.update(diagnostic_points=900)))
    for name, planted_file, text in (("mog-seed0", "metrics.json", "[1, 2]"),  # damaged cells
                                     ("mog-seed1", "config.toml", "[[[ garbage"),
                                     ("mog-seed2", "metrics.json", None)):
        bad = copy(name)
        if text is None:
            outside = (bad / planted_file).read_bytes()
            (tmp_path / "outside.json").write_bytes(outside)
            (bad / planted_file).unlink()
            (bad / planted_file).symlink_to(tmp_path / "outside.json")
        else:
            (bad / planted_file).write_text(text)
    busy = copy("resampled-seed0")
    busy_bytes = (busy / "metrics.json").read_bytes()
    (grid_dir / "flow-seed0").symlink_to(cell)
    (grid_dir / "c2st").mkdir()
    victim = tmp_path / "victim.md"
    victim.write_text("victim\n")
    (grid_dir / "c2st" / "c2st.md").symlink_to(victim)
    real = script.classifier_two_sample

    def nan_for_900(p, q, q_block=1):  # vampprior-seed0's expost-mog (900 points, 3 codes)
        out = real(p, q, q_block=q_block)
        return out | {"auc_stderr": float("nan")} if q_block == 3 else out
    monkeypatch.setattr(script, "classifier_two_sample", nan_for_900)
    monkeypatch.setattr(sys, "argv", ["c2st_grid.py", str(grid_dir), "--save"])
    holder = os.open(busy / ".lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_SH)  # another process reads it: --save may not write
    try:
        with pytest.raises(SystemExit, match="4 of 9 cells not done"):
            script.main()
    finally:
        os.close(holder)
    said = capsys.readouterr().out
    assert "Traceback" not in said
    assert "flow-seed0: a symbolic link, ignored" in said
    assert re.search(r"mog-seed0: .*metrics.json is damaged.*; skipped", said)
    assert re.search(r"mog-seed1: .*config.toml.*; skipped", said)
    assert re.search(r"mog-seed2: .*metrics.json is a symbolic link.*; skipped", said)
    assert re.search(r"resampled-seed0: .* is in use by .*; skipped", said)
    assert (busy / "metrics.json").read_bytes() == busy_bytes
    assert (tmp_path / "outside.json").read_bytes() == outside
    assert "standard_normal-seed1 expost-mog: skipped (no saved latent AUC)" in said
    assert "old latent_c2st_acc not a number" in said and "old feature_c2st_auc not" in said
    rows = {(r["cell"], r["source"]): r
            for r in csv.DictReader(open(grid_dir / "c2st" / "c2st.csv"))}
    assert set(rows) == {(c, s) for c in ("standard_normal-seed0", "standard_normal-seed1",
                                          "standard_normal-seed2", "exemplar-seed0",
                                          "vampprior-seed0") for s in ("trained", "expost-mog")}
    assert rows["standard_normal-seed0", "trained"]["old_latent_c2st_acc"] == ""
    assert float(rows["standard_normal-seed0", "trained"]["old_latent_c2st_auc"]) == 0.01
    assert rows["standard_normal-seed0", "expost-mog"]["old_feature_c2st_auc"] == ""
    saved0 = json.loads((grid_dir / "standard_normal-seed0" / "metrics.json").read_text())
    assert saved0["c2st_recomputed"]["replaced"]["latent_c2st_acc"] is None
    assert saved0["prior_sources"]["expost-mog"]["c2st_recomputed"]["replaced"][
        "feature_c2st_auc"] is None
    assert "diagnostic_points 1000000000000 not understood" in rows[
        "standard_normal-seed1", "trained"]["skipped"]
    assert "diagnostic_points 4 not understood" in rows["exemplar-seed0", "expost-mog"]["skipped"]
    assert rows["exemplar-seed0", "trained"]["new_latent_c2st_auc"] != ""
    assert rows["standard_normal-seed2", "trained"]["skipped"].startswith("checkpoint unknown")
    assert rows["standard_normal-seed2", "expost-mog"]["new_latent_c2st_auc"] != ""
    assert "non-finite new latent_c2st_auc_stderr" in rows["vampprior-seed0",
                                                            "expost-mog"]["skipped"]
    vamp = json.loads((grid_dir / "vampprior-seed0" / "metrics.json").read_text())
    assert "c2st_recomputed" not in vamp["prior_sources"]["expost-mog"]
    assert "NaN" not in json.dumps(vamp) and "non_finite" not in vamp
    assert victim.read_text() == "victim\n"  # the planted link is replaced, not followed
    table = grid_dir / "c2st" / "c2st.md"
    assert not table.is_symlink() and "(not a number)" in table.read_text()
    vamp_row = next(line for line in table.read_text().splitlines()
                    if line.startswith("| vampprior | "))
    assert vamp_row.endswith("| – | – |") and "()" not in vamp_row  # feature: none redone
    # the tables' entries: a FIFO, a folder, a folder we may not write in: one line, no work
    monkeypatch.setattr(sys, "argv", ["c2st_grid.py", str(grid_dir), "--only", "exemplar-*"])
    for kind, make in (("a FIFO", os.mkfifo), ("a folder", os.mkdir)):
        table.unlink() if not table.is_dir() else table.rmdir()
        make(table)
        with pytest.raises(SystemExit, match=f"c2st.md is {kind}, not a regular file"):
            script.main()
    table.rmdir()
    with monkeypatch.context() as mp:
        mp.setattr(script.os, "access", lambda *a, **k: False)
        with pytest.raises(SystemExit, match="cannot write in .*c2st"):
            script.main()
