"""The one gate for spec strings (priorvae.trust), as a contract over every place a run folder
can name code, in both directions: a folder naming a file or module that the user did not
choose is refused before any of its code runs, even with the file's correct (public) sha256;
the user who trained or fitted with that code reopens the folder; --trust-remote-code opts in.
"""

import hashlib
import json
import shutil

import pytest

from conftest import tiny_toml
from priorvae import trust
from priorvae.cli import main
from priorvae.config import load_config
from priorvae.errors import UntrustedCodeError
from priorvae.registry import KINDS, Registry, kind_registry
from priorvae.train import train

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
import torch
from priorvae.priors import Prior
from priorvae.gaussian import log_standard_normal

class Evil(Prior):
    def __init__(self, latent_dim):
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(latent_dim))
    def _log_prob(self, z):
        return log_standard_normal(z)
    def _sample(self, n):
        return torch.randn(n, self.latent_dim)
"""


@pytest.fixture(autouse=True)
def own_trust_record(tmp_path, monkeypatch):
    """Each test starts with an empty trust record of its own and nothing chosen."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(trust.TRUST_ENV, raising=False)
    monkeypatch.setattr(trust, "_CHOSEN", set())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    cfg = load_config(tiny_toml(d / "c.toml", train={"epochs": 1, "diagnostics_every": 0}))
    train(cfg, d / "run", progress=False)
    return d / "run"


@pytest.fixture
def run_dir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def cli(*args):
    return main([str(a) for a in args])


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def evil_file(tmp_path, name="evil.py"):
    """A file outside the run folder whose top-level code leaves a marker."""
    marker = tmp_path / f"marker-{name}"
    path = tmp_path / "elsewhere" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(EVIL.format(marker=str(marker)))
    return path, marker, hashlib.sha256(path.read_bytes()).hexdigest()


def set_prior_table(run_dir, body: str):
    text = (run_dir / "config.toml").read_text()
    start = text.index("[prior]")
    end = text.index("[", start + 1)
    (run_dir / "config.toml").write_text(text[:start] + "[prior]\n" + body + "\n\n" + text[end:])


def write_label(run_dir, body: str):
    (run_dir / "priors").mkdir(exist_ok=True)
    (run_dir / "priors" / "x.toml").write_text(body)


# every place a run folder can name code: (how to plant it, the command that reads it)
def _config_name(run_dir, spec, sha):
    set_prior_table(run_dir, f'name = "{spec}"\nfile_sha256 = "{sha}"')
    return ["sample", run_dir, "--out", run_dir.parent / "s.png"]


def _config_base(run_dir, spec, sha):
    set_prior_table(run_dir, f'name = "resampled"\nbase = "{spec}"')
    return ["sample", run_dir, "--out", run_dir.parent / "s.png"]


def _config_nested_base(run_dir, spec, sha):
    set_prior_table(run_dir, 'name = "resampled"\nbase = "resampled"\n'
                             f'base_args = {{ base = "{spec}" }}')
    return ["sample", run_dir, "--out", run_dir.parent / "s.png"]


def _label_name(run_dir, spec, sha):
    write_label(run_dir, f'[prior]\nname = "{spec}"\nfile_sha256 = "{sha}"\n')
    return ["sample", run_dir, "--out", run_dir.parent / "s.png", "--prior-source", "x"]


def _label_base(run_dir, spec, sha):
    write_label(run_dir, f'[prior]\nname = "resampled"\n\n[kwargs]\nbase = "{spec}"\n')
    return ["evaluate", run_dir, "--prior-source", "x", "--quiet", "--iw-samples", "2"]


PLACES = {"config.toml [prior] name": _config_name,
          "config.toml [prior] base of resampled": _config_base,
          "config.toml [prior] base_args.base of resampled": _config_nested_base,
          "priors/LABEL.toml name": _label_name,
          "priors/LABEL.toml kwargs.base of resampled": _label_base}


@pytest.mark.parametrize("place", PLACES)
def test_code_named_by_a_folder_is_refused_even_with_its_public_hash(run_dir, tmp_path, capsys,
                                                                     place):
    path, marker, sha = evil_file(tmp_path)
    command = PLACES[place](run_dir, f"{path}:Evil", sha)
    capsys.readouterr()
    assert cli(*command) == 2
    line = one_line(capsys.readouterr().err)
    assert "not in your trust record" in line and "--trust-remote-code" in line, line
    assert not marker.exists(), f"{place}: the file's top-level code ran before the refusal"
    # the explicit opt-in runs it (whatever the folder then makes of it)
    cli(*command, "--trust-remote-code")
    assert marker.exists()


@pytest.mark.parametrize("place", PLACES)
def test_a_relative_path_or_a_file_inside_the_folder_is_refused(run_dir, tmp_path, capsys,
                                                                 monkeypatch, place):
    inside = run_dir / "evil.py"
    inside.write_text(EVIL.format(marker=str(tmp_path / "marker")))
    sha = hashlib.sha256(inside.read_bytes()).hexdigest()
    monkeypatch.chdir(run_dir)
    for spec, reason in ((f"{inside}:Evil", "a file inside the run folder"),
                         ("evil.py:Evil", "a relative path")):
        command = PLACES[place](run_dir, spec, sha)
        capsys.readouterr()
        assert cli(*command) == 2
        assert reason in one_line(capsys.readouterr().err)
        assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("table", sorted(KINDS))
def test_every_kind_resolves_specs_through_the_gate(tmp_path, table):
    """The generic Registry.get path (data sets, likelihoods, networks, priors): inside a run
    folder's context a spec not chosen by the user is refused before its code runs."""
    path, marker, sha = evil_file(tmp_path)
    registry = kind_registry(table) or Registry(table, object, f"priorvae.test_{table}",
                                                builtins="")
    run = tmp_path / "run"
    run.mkdir()
    with trust.reading_folder(run, run / "config.toml", trust=False):
        with pytest.raises(UntrustedCodeError, match="not in your trust record"):
            registry.get(f"{path}:Evil", sha)
    assert not marker.exists()


def test_the_user_who_trained_with_a_file_reopens_the_folder(tmp_path, capsys, monkeypatch):
    """Direction (b): a relative file spec in the user's own config, at the top and one level
    down, is pinned (absolute path, hash) and recorded in the trust record; the folder then
    reopens without any flag, and stops reopening once the file changes."""
    base, marker, _ = evil_file(tmp_path, "mybase.py")
    monkeypatch.chdir(base.parent)
    config = tiny_toml(tmp_path / "c.toml",
                       prior={"name": "resampled", "base": "mybase.py:Evil",
                              "hidden": [4], "n_normalizer": 64, "batch_normalizer": 8},
                       train={"epochs": 1, "diagnostics_every": 0})
    assert cli("train", config, "--out", tmp_path / "run", "--quiet") == 0
    assert f'base = "{base}:Evil"' in (tmp_path / "run" / "config.toml").read_text()
    record = json.loads(trust.trust_record_path().read_text())["trusted"]
    assert [e["path"] for e in record] == [str(base)]
    monkeypatch.setattr(trust, "_CHOSEN", set())  # as a new process: only the record counts
    assert cli("sample", tmp_path / "run", "--out", tmp_path / "a.png") == 0
    base.write_text(base.read_text() + "\n# edited\n")
    capsys.readouterr()
    assert cli("sample", tmp_path / "run", "--out", tmp_path / "b.png") == 2
    assert "not in your trust record" in one_line(capsys.readouterr().err)


def test_a_module_is_allowed_when_chosen_or_imported_already(run_dir, tmp_path, capsys,
                                                             monkeypatch):
    (tmp_path / "evilmod_trust.py").write_text(EVIL.format(marker=str(tmp_path / "marker")))
    monkeypatch.syspath_prepend(str(tmp_path))
    sha = hashlib.sha256((tmp_path / "evilmod_trust.py").read_bytes()).hexdigest()
    command = _config_name(run_dir, "evilmod_trust:Evil", sha)
    capsys.readouterr()
    assert cli(*command) == 2
    assert "which would be imported" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "marker").exists()
    trust.pin("evilmod_trust:Evil")  # the user chooses it (train / fit-prior do this)
    monkeypatch.setattr(trust, "_CHOSEN", set())
    assert trust.check_folder_spec("evilmod_trust:Evil", sha, run_dir / "config.toml",
                                   run_dir, False) is None
    monkeypatch.delitem(__import__("sys").modules, "evilmod_trust", raising=False)


def test_a_damaged_trust_record_is_named_and_trusts_nothing(run_dir, tmp_path, capsys):
    path, marker, sha = evil_file(tmp_path)
    trust.trust_record_path().parent.mkdir(parents=True)
    trust.trust_record_path().write_text("{not json")
    command = _config_name(run_dir, f"{path}:Evil", sha)
    capsys.readouterr()
    assert cli(*command) == 2
    assert "is unreadable" in one_line(capsys.readouterr().err)
    assert not marker.exists()
