"""Run folders have one owner, are checked before anything is written, and never run code
that the user did not choose. One test per defect of the run-folder issue, and the faults."""

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import read_metrics, tiny_toml
from priorvae.cli import main
from priorvae.config import load_config
from priorvae.errors import ConfigError, PriorError, RunError
from priorvae.runs import TRUST_ENV, Run, load_checkpoint
from priorvae.train import train

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from priorvae.priors import Prior
from priorvae.gaussian import log_standard_normal
import torch

class Evil(Prior):
    def __init__(self, latent_dim):
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(latent_dim))  # as standard_normal's weights
    def _log_prob(self, z):
        return log_standard_normal(z)
    def _sample(self, n):
        return torch.randn(n, self.latent_dim)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny digits run, copied fresh for every test that changes it."""
    d = tmp_path_factory.mktemp("trained")
    cfg = load_config(tiny_toml(d / "c.toml", train={"epochs": 2, "diagnostics_every": 0}))
    train(cfg, d / "run", progress=False)
    return d / "run"


@pytest.fixture
def run_dir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def cli(*args, capsys=None):
    code = main([str(a) for a in args])
    return code, (capsys.readouterr().err if capsys else "")


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def plant(run_dir, marker, inside=True, relative=False):
    """config.toml names Evil from a file (inside the run folder, or a relative path)."""
    path = run_dir / "evil.py"
    path.write_text(EVIL.format(marker=str(marker)))
    name = "evil.py:Evil" if relative else f"{path}:Evil"
    text = (run_dir / "config.toml").read_text().replace('name = "standard_normal"',
                                                         f'name = "{name}"')
    (run_dir / "config.toml").write_text(text)
    for ckpt in ("best.pt", "last.pt"):  # a consistent folder, as an author would send it
        payload = load_checkpoint(run_dir / ckpt)
        payload["config"]["prior"]["name"] = name
        torch.save(payload, run_dir / ckpt)
    return name


# 1. code from a run folder ---------------------------------------------------------------

@pytest.mark.parametrize("relative", [False, True], ids=["inside-run", "relative-path"])
def test_a_run_folder_never_runs_its_own_code(run_dir, tmp_path, capsys, monkeypatch,
                                              relative):
    marker = tmp_path / "marker"
    monkeypatch.chdir(run_dir)  # the relative path would resolve here
    plant(run_dir, marker, relative=relative)
    for command in (["evaluate", run_dir, "--quiet", "--iw-samples", "2"],
                    ["sample", run_dir, "--out", tmp_path / "s.png"],
                    ["fit-prior", run_dir, "--prior", "mog", "--quiet", "--epochs", "1"]):
        code, err = cli(*command, capsys=capsys)
        assert code == 2 and "--trust-remote-code" in one_line(err)
        assert not marker.exists(), f"{command[0]} ran the folder's code"
    # the explicit opt-in runs it
    code, _ = cli("sample", run_dir, "--out", tmp_path / "s.png", "--trust-remote-code")
    assert code == 0 and marker.exists()


def test_opt_in_by_environment_variable(run_dir, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    plant(run_dir, marker)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert cli("sample", run_dir, "--out", tmp_path / "s.png")[0] == 0 and marker.exists()


def test_a_file_the_user_chose_reopens_only_while_unchanged(tmp_path, capsys):
    marker = tmp_path / "marker"
    prior_file = tmp_path / "mine.py"
    prior_file.write_text(EVIL.format(marker=str(marker)))
    config = tiny_toml(tmp_path / "c.toml", prior={"name": f"{prior_file}:Evil"},
                       train={"epochs": 1, "diagnostics_every": 0})
    assert cli("train", config, "--out", tmp_path / "run", "--quiet")[0] == 0
    assert "file_sha256" in (tmp_path / "run" / "config.toml").read_text()
    assert cli("sample", tmp_path / "run", "--out", tmp_path / "a.png")[0] == 0
    capsys.readouterr()
    prior_file.write_text(prior_file.read_text() + "\n# changed\n")
    code, err = cli("sample", tmp_path / "run", "--out", tmp_path / "b.png", capsys=capsys)
    assert code == 2 and "changed since the run was made" in one_line(err)


def test_a_module_is_imported_only_if_the_user_imported_it(run_dir, tmp_path, capsys,
                                                           monkeypatch):
    (tmp_path / "evilmod.py").write_text(EVIL.format(marker=str(tmp_path / "marker")))
    monkeypatch.syspath_prepend(str(tmp_path))
    text = (run_dir / "config.toml").read_text().replace('name = "standard_normal"',
                                                         'name = "evilmod:Evil"')
    (run_dir / "config.toml").write_text(text)
    code, err = cli("sample", run_dir, "--out", tmp_path / "s.png", capsys=capsys)
    assert code == 2 and "module 'evilmod', which would be imported" in one_line(err)
    assert not (tmp_path / "marker").exists()


def test_no_checkpoint_field_picks_code(run_dir, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    # an old-style ex-post prior whose checkpoint names the code to build
    (run_dir / "priors").mkdir()
    torch.save({"name": f"{evil}:Evil", "kwargs": {}, "latent_dim": 2, "state_dict": {}},
               run_dir / "priors" / "expost-evil.pt")
    code, err = cli("evaluate", run_dir, "--prior-source", "expost-evil", "--quiet",
                    capsys=capsys)
    assert code == 2 and "written by an older priorvae" in one_line(err)
    # and a best.pt whose recorded config names it: the model comes from config.toml
    best = load_checkpoint(run_dir / "best.pt")
    best["config"]["prior"]["name"] = f"{evil}:Evil"
    torch.save(best, run_dir / "best.pt")
    code, err = cli("sample", run_dir, "--out", tmp_path / "s.png", capsys=capsys)
    assert code == 2 and "belongs to another run" in one_line(err)
    assert not marker.exists()


def test_a_prior_source_spec_inside_the_run_is_refused(run_dir, tmp_path, capsys):
    assert cli("fit-prior", run_dir, "--prior", "mog", "--quiet", "--epochs", "2")[0] == 0
    assert (run_dir / "priors" / "expost-mog.toml").is_file()
    assert cli("sample", run_dir, "--out", tmp_path / "a.png", "--prior-source",
               "expost-mog")[0] == 0
    marker = tmp_path / "marker"
    plant_file = run_dir / "priors" / "evil.py"
    plant_file.write_text(EVIL.format(marker=str(marker)))
    spec = run_dir / "priors" / "expost-mog.toml"
    spec.write_text(spec.read_text().replace('name = "mog"', f'name = "{plant_file}:Evil"'))
    capsys.readouterr()
    code, err = cli("sample", run_dir, "--out", tmp_path / "b.png", "--prior-source",
                    "expost-mog", capsys=capsys)
    assert code == 2 and "a file inside the run folder" in one_line(err)
    assert not marker.exists()


def test_a_refused_pickle_never_advises_weights_only_false(run_dir, capsys):
    torch.save({"model": {}, "thing": argparse.Namespace(x=1)}, run_dir / "best.pt")
    code, err = cli("evaluate", run_dir, "--quiet", capsys=capsys)
    line = one_line(err)
    assert code == 2 and "never unpickles" in line and "weights_only=False" not in line


# 2. the wrong model, silently --------------------------------------------------------------

def test_a_checkpoint_of_another_run_is_refused_by_name(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    cfg = load_config(tiny_toml(tmp_path / "o.toml", model={"latent_dim": 3},
                                train={"epochs": 1, "diagnostics_every": 0}))
    train(cfg, other, progress=False)
    shutil.copy(other / "best.pt", run_dir / "best.pt")
    before = (run_dir / "metrics.json").read_text()
    code, err = cli("evaluate", run_dir, "--quiet", capsys=capsys)
    assert code == 2 and "[model] latent_dim: 3 in best.pt, 2 in config.toml" in one_line(err)
    assert (run_dir / "metrics.json").read_text() == before


def test_an_edited_config_is_not_ignored(run_dir, capsys):
    text = (run_dir / "config.toml").read_text().replace("latent_dim = 2", "latent_dim = 5")
    (run_dir / "config.toml").write_text(text)
    code, err = cli("evaluate", run_dir, "--quiet", capsys=capsys)
    assert code == 2 and "latent_dim: 2 in best.pt, 5 in config.toml" in one_line(err)


def test_shapes_are_checked_even_without_a_recorded_config(run_dir, capsys):
    best = load_checkpoint(run_dir / "best.pt")
    del best["config"]
    best["model"]["decoder.net.0.weight"] = torch.zeros(3, 3)
    best["model"] = {k: v for k, v in best["model"].items() if "decoder" in k} | {
        k: torch.zeros(1) for k in best["model"] if "encoder" in k}
    torch.save(best, run_dir / "best.pt")
    code, err = cli("evaluate", run_dir, "--quiet", capsys=capsys)
    assert code == 2 and "does not fit the model its run describes" in one_line(err)


# 3. one owner --------------------------------------------------------------------------------

def test_a_run_in_training_is_held_and_a_killed_one_is_free(tmp_path, capsys):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 400, "diagnostics_every": 0,
                                                   "image_every": 0})
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "priorvae", "train", str(config), "--out",
                             str(run), "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        from test_train import _wait_for_epoch

        _wait_for_epoch(run, 1, proc)
        for command in (["train", config, "--out", run, "--quiet"],
                        ["evaluate", run, "--quiet"],
                        ["fit-prior", run, "--prior", "mog", "--quiet"],
                        ["sample", run, "--out", tmp_path / "s.png"]):
            code, err = cli(*command, capsys=capsys)
            assert code == 2 and "is in use by priorvae train (pid" in one_line(err), command
        assert Run.open(run).status == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_metrics(run)["status"] == "running"  # what the dead process left
    assert Run.open(run).status == "interrupted"  # nobody holds it: the lock died with it
    assert cli("sample", run, "--out", tmp_path / "s.png")[0] == 0
    assert not (tmp_path / "s.png").is_dir()


def test_sigterm_leaves_the_run_interrupted_not_running(tmp_path):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 400, "diagnostics_every": 0,
                                                   "image_every": 0})
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "priorvae", "train", str(config), "--out",
                             str(run), "--quiet"], stderr=subprocess.PIPE, text=True)
    from test_train import _wait_for_epoch

    _wait_for_epoch(run, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err
    assert read_metrics(run)["status"] == "interrupted"


# 4. checked before written -------------------------------------------------------------------

def test_compare_checks_every_cell_before_it_starts(tmp_path, capsys):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 1})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal", "mog"]\nseeds = [0]\n'
                "[compare.args.mog]\nn_componets = 3\n")
    code, err = cli("compare", config, "--out", tmp_path / "exp", "--quiet", capsys=capsys)
    assert code == 2 and "grid cell mog-seed0" in one_line(err) and "n_components" in err
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(("compare", "message"), [
    ('seeds = ["a"]', "seeds must be a non-empty list of integers >= 0"),
    ("seeds = [0, 0]", "seeds lists a value twice"),
    ("seeds = []", "seeds must be a non-empty list"),
    ('priors = ["mog", "mog"]', "priors lists a value twice"),
    ("latent_dims = [0]", "latent_dims must be a non-empty list of integers >= 1"),
    ('expost_on = ["flow"]', "expost_on names 'flow', which is not in"),
    ('priors = ["standard_normal"]\n[compare.args.mog]\nn_components = 2', "not in [compare]"),
])
def test_bad_compare_grids_are_refused(tmp_path, capsys, compare, message):
    config = tiny_toml(tmp_path / "c.toml")
    with open(config, "a") as f:
        f.write(f"\n[compare]\n{compare}\n")
    code, err = cli("compare", config, "--out", tmp_path / "exp", "--quiet", capsys=capsys)
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "exp").exists()


# 5. bad values -------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["evaluate", "RUN", "--iw-samples", "-5"], ["evaluate", "RUN", "--iw-samples", "0"],
    ["evaluate", "RUN", "--limit", "0"], ["evaluate", "RUN", "--limit", "-1"],
    ["fit-prior", "RUN", "--prior", "mog", "--epochs", "0"],
    ["fit-prior", "RUN", "--prior", "mog", "--batch-size", "0"],
    ["fit-prior", "RUN", "--prior", "mog", "--lr", "nan"],
    ["fit-prior", "RUN", "--prior", "mog", "--lr", "-1"],
    ["fit-prior", "RUN", "--prior", "mog", "--patience", "-1"],
    ["sample", "RUN", "--out", "x.png", "--nrow", "-1"],
    ["sample", "RUN", "--out", "x.png", "--n", "0"],
    ["sample", "RUN", "--out", "x.png", "--source", "posterior", "--index", "-1"],
])
def test_bad_command_line_values_are_one_line(args, tmp_path, capfd):
    proc = subprocess.run([sys.executable, "-m", "priorvae",
                           *[a.replace("RUN", str(tmp_path)) for a in args]],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    option = next(a for a in args if a.startswith("--") and a not in ("--prior", "--out",
                                                                        "--source"))
    assert option in line, line


def test_a_prior_whose_init_raises_or_exits_is_one_line(tmp_path, capsys):
    for body, message in (("1 / 0", "ZeroDivisionError"), ("import sys; sys.exit(0)",
                                                          "sys.exit(0)")):
        path = tmp_path / "bad.py"
        path.write_text(textwrap.dedent(f"""
            from priorvae.priors import Prior
            class Bad(Prior):
                def __init__(self, latent_dim):
                    {body}
        """))
        config = tiny_toml(tmp_path / "c.toml", prior={"name": f"{path}:Bad"})
        code, err = cli("train", config, "--out", tmp_path / "r", "--quiet", capsys=capsys)
        assert code == 2 and message in one_line(err)
        assert not (tmp_path / "r").exists()
    path = tmp_path / "exits.py"
    path.write_text("import sys\nsys.exit(0)\n")
    config = tiny_toml(tmp_path / "c.toml", prior={"name": f"{path}:Bad"})
    code, err = cli("train", config, "--out", tmp_path / "r", "--quiet", capsys=capsys)
    assert code == 2 and "it called sys.exit(0)" in one_line(err)


# 6. files and faults -------------------------------------------------------------------------

def test_a_damaged_metrics_file_is_named_before_any_work(run_dir, capsys):
    (run_dir / "metrics.json").write_text('{"status": "finished",')
    code, err = cli("evaluate", run_dir, "--quiet", capsys=capsys)
    assert code == 2 and f"{run_dir / 'metrics.json'} is damaged" in one_line(err)


def test_a_read_only_run_folder_is_named_before_any_work(run_dir, tmp_path, capsys,
                                                         monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).startswith(str(run_dir)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    code, err = cli("evaluate", run_dir, "--quiet", capsys=capsys)
    assert code == 2 and "cannot write in" in one_line(err) and "Read-only" in err
    # reading needs no lock file: sample still works in a read-only folder
    assert cli("sample", run_dir, "--out", tmp_path / "s.png")[0] == 0


def test_a_full_disk_is_named_before_any_work_and_mid_write(run_dir, tmp_path, capsys,
                                                            monkeypatch):
    import priorvae.runs as runs

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(runs.shutil, "disk_usage",
                        lambda p: usage._replace(free=2**20))
    code, err = cli("evaluate", run_dir, "--quiet", capsys=capsys)
    assert code == 2 and "only 1.0 MB free" in one_line(err)
    monkeypatch.undo()

    real_fsync, calls = os.fsync, []

    def fills_up(fd):  # writes 1-5: config, status, best/last/metrics of epoch 1; then full
        calls.append(fd)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 3, "diagnostics_every": 0})
    monkeypatch.setattr(runs.os, "fsync", fills_up)
    run = tmp_path / "fresh"
    code, err = cli("train", config, "--out", run, "--quiet", capsys=capsys)
    assert code == 2 and "No space left on device" in one_line(err)
    monkeypatch.undo()
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # the last good one, intact
    assert not list(run.glob(".*.tmp")), "temporary files are removed"
    assert Run.open(run).status == "interrupted"  # not "running": nobody holds it


def test_out_naming_a_file_and_a_non_empty_folder(tmp_path, capsys):
    config = tiny_toml(tmp_path / "c.toml")
    (tmp_path / "file").write_text("x")
    code, err = cli("train", config, "--out", tmp_path / "file", "--quiet", capsys=capsys)
    assert code == 2 and "is a file, not a folder" in one_line(err)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    code, err = cli("train", config, "--out", tmp_path / "full", "--quiet", capsys=capsys)
    assert code == 2 and "is not empty and holds no config.toml" in one_line(err)


def test_a_folder_from_an_older_priorvae_opens(run_dir):
    # what older versions wrote: no lock file, no evaluated_epoch, a registered prior
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("evaluated_epoch", None)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / ".lock").unlink(missing_ok=True)
    assert Run.open(run_dir).load_model().prior.latent_dim == 2


def test_api_errors_are_priorvae_errors(run_dir):
    with pytest.raises(RunError, match="not a run folder"):
        Run.open(run_dir / "nope")
    with pytest.raises(PriorError):
        from priorvae.expost import fit_prior

        fit_prior(run_dir, "mog", epochs=0, progress=False)
    with pytest.raises(ConfigError):
        load_config(None, ["train.epochs=0"])


def test_a_huge_network_size_from_the_command_line_is_one_line(tmp_path, capsys):
    """--set network.hidden=[10000000000]: one line naming the key and the memory, no
    folder (it was torch's allocation error naming only the network)."""
    from priorvae.config import dump_toml

    config = tmp_path / "c.toml"
    config.write_text(dump_toml({"data": {"name": "digits"}, "model": {"latent_dim": 2},
                                 "train": {"epochs": 1}}))
    code, err = cli("train", config, "--out", tmp_path / "r", "--quiet", "--set",
                    "network.hidden=[10000000000]", capsys=capsys)
    line = one_line(err)
    assert code == 2 and "[network] hidden = [10000000000] with [model] latent_dim = 2" in line
    assert "GiB of memory are available here; choose smaller sizes" in line, line
    assert not (tmp_path / "r").exists()
