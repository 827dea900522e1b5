"""A user's own data set, likelihood and encoder/decoder family, end to end from the command
line, named in the three ways the README offers: by file path (``my_data.py:MyData``), by
module (``my_data:MyData``) and by the entry point of an installed distribution (``blobs``).
A run folder naming the file or module code, opened by another user, is refused in one line
before that code runs (each file leaves a marker when it is imported); ``--trust-remote-code``
opens it. A folder naming an entry-point name that is not installed is one line listing the
known names.

The installed distribution is real as far as :mod:`importlib.metadata` can tell: a
``my_plugins-0.1.dist-info`` folder with ``METADATA`` and ``entry_points.txt`` on
``PYTHONPATH`` of a subprocess, which then discovers the plug-ins exactly as after
``pip install``; no registry of this process sees them.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from priorvae import trust
from priorvae.cli import main
from priorvae.config import dump_toml, load_config

MARK = """import pathlib
pathlib.Path(__file__).with_suffix(".ran").write_text("imported")  # the code ran
"""

SOURCES = {
    "data": ("my_data", "MyData", MARK + '''
import torch
from priorvae.datasets import DataSet, Splits


class MyData(DataSet):
    """Two blobs of real 6-d vectors, made in load()."""
    value_type, n_classes, shape = "real", None, (6,)

    def __init__(self, root=None, download=True, n: int = 200):
        super().__init__(root, download)
        self.n = n

    def load(self) -> Splits:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, 6, generator=g) + 3.0 * (torch.arange(self.n) % 2)[:, None]
        a, b = int(0.8 * self.n), int(0.9 * self.n)
        return Splits(self.name, x[:a], None, x[a:b], None, x[b:], None, self.value_type)
'''),
    "likelihood": ("my_lik", "Laplace", MARK + '''
import math

import torch
from priorvae.likelihoods import Likelihood


class Laplace(Likelihood):
    """log p(x) = sum_j -log(2 b) - |x_j - m_j| / b, real-valued data."""
    value_types = frozenset({"intensity", "8bit", "real"})

    def __init__(self, input_shape, scale: float = 0.5):
        super().__init__(input_shape)
        self.b = scale

    def log_prob(self, out, x):
        return (-math.log(2 * self.b) - (x - out).abs() / self.b).flatten(1).sum(-1)

    def mean(self, out):
        return out

    def sample(self, out, generator=None):
        u = torch.rand(out.shape, generator=generator, device=out.device) - 0.5
        return out - self.b * u.sign() * torch.log1p(-2 * u.abs())
'''),
    "network": ("my_nets", "Tiny", MARK + '''
import math

from torch import nn
from priorvae.networks import Networks
from priorvae.networks.layers import GaussianHead


class Tiny(Networks):
    """One hidden layer of ``width`` units each way."""
    input_ranks = frozenset({1, 3})

    def __init__(self, input_shape, latent_dim, out_channels, logvar_min=-6.0, logvar_max=2.0,
                 width: int = 16):
        super().__init__(input_shape, latent_dim, out_channels, logvar_min, logvar_max)
        d, spatial = math.prod(self.input_shape), self.input_shape[1:]
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.Tanh(),
                                     GaussianHead(width, latent_dim, logvar_min, logvar_max))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, width), nn.Tanh(),
            nn.Linear(width, out_channels * math.prod(spatial)),
            nn.Unflatten(1, (out_channels, *spatial)))
'''),
}
KIND_ARGS = {"data": {"n": 200}, "likelihood": {"scale": 0.5}, "network": {"width": 16}}
ENTRY_POINTS = {"data": ("priorvae.datasets", "blobs"),
                "likelihood": ("priorvae.likelihoods", "laplace"),
                "network": ("priorvae.networks", "tiny")}
QUICK = ["--iw-samples", "4", "--no-diagnostics", "--quiet"]


def write_plugins(folder: Path) -> dict[str, Path]:
    """The three plug-in files in ``folder``; returns their import markers by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    markers = {}
    for kind, (module, _, source) in SOURCES.items():
        (folder / f"{module}.py").write_text(source)
        markers[kind] = folder / f"{module}.ran"
    return markers


def write_config(path: Path, names: dict[str, str]) -> Path:
    tables = {kind: {"name": names[kind], **KIND_ARGS[kind]} for kind in SOURCES}
    path.write_text(dump_toml({
        **tables, "model": {"latent_dim": 2}, "prior": {"name": "standard_normal"},
        "train": {"epochs": 1, "batch_size": 80, "image_every": 0, "diagnostics_every": 0},
        "eval": {"iw_samples": 4}}))
    return path


def forget_user_code(folder: Path) -> None:
    """Drop the modules imported from ``folder`` (as modules or as files), so that the next
    import runs their code again (and the trust gate sees a module not imported yet)."""
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if (name.startswith("priorvae_user_code_") or name in ("my_data", "my_lik", "my_nets")) \
                and Path(file).parent == folder:
            del sys.modules[name]


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def as_new_user(monkeypatch, config_home: Path) -> None:
    """A user with an empty trust record of their own, in a fresh process (nothing chosen)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    monkeypatch.delenv(trust.TRUST_ENV, raising=False)
    monkeypatch.setattr(trust, "_CHOSEN", set())


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The owner writes the plug-ins and trains one run naming them by file path and one by
    module (the folder on sys.path), each recorded in the owner's trust record."""
    root = tmp_path_factory.mktemp("own_plugins")
    user = root / "user"
    markers = write_plugins(user)
    mp = pytest.MonkeyPatch()
    try:
        as_new_user(mp, root / "owner_config")
        mp.chdir(user)
        mp.syspath_prepend(str(user))
        by_path = {k: f"{m}.py:{c}" for k, (m, c, _) in SOURCES.items()}
        by_module = {k: f"{m}:{c}" for k, (m, c, _) in SOURCES.items()}
        for label, names in (("path", by_path), ("module", by_module)):
            config = write_config(root / f"{label}.toml", names)
            assert main(["train", str(config), "--out", str(root / label), "--quiet"]) == 0
        yield {"root": root, "user": user, "markers": markers, "path": root / "path",
               "module": root / "module", "owner_config": root / "owner_config"}
    finally:
        forget_user_code(user)
        mp.undo()


@pytest.fixture
def user_code(made, monkeypatch):
    """The plug-in folder importable (as after the owner's ``cd``), none of its modules
    imported and no markers left: what runs from here on leaves a marker."""
    monkeypatch.syspath_prepend(str(made["user"]))
    forget_user_code(made["user"])
    for marker in made["markers"].values():
        marker.unlink(missing_ok=True)
    yield made["markers"]
    forget_user_code(made["user"])


@pytest.mark.parametrize("how", ["path", "module"])
def test_own_plugins_by_path_and_by_module_train_evaluate_and_sample(made, user_code, how,
                                                                     monkeypatch, capsys,
                                                                     tmp_path):
    run = made[how]
    recorded = load_config(run / "config.toml")
    for kind, (module, cls, _) in SOURCES.items():
        body = getattr(recorded, kind)
        if how == "path":  # pinned: absolute path and the file's hash
            assert body.name == f"{made['user'] / module}.py:{cls}", body.name
            assert body.file_sha256 == trust.file_sha256(made["user"] / f"{module}.py")
        else:
            assert body.name == f"{module}:{cls}"
        assert body.kwargs == KIND_ARGS[kind]
    # the owner, in a new process: the trust record (not this process's memory) opens it
    as_new_user(monkeypatch, made["owner_config"])
    capsys.readouterr()
    code = main(["evaluate", str(run), *QUICK])
    out, err = capsys.readouterr()
    assert code == 0, err
    # its summary counts test vectors as sample does: test examples, not test images
    assert "20 test examples, K = 4" in out and "test image" not in out, out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_nll"] == metrics["test_nll"] and metrics["test_nll"] > 0  # finite
    assert all(m.exists() for m in user_code.values())  # every plug-in's code ran
    png = tmp_path / "samples.png"
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "8", "--out", str(png)]) == 0
    assert "each vector's 6 values as a row of cells" in capsys.readouterr().out
    assert png.stat().st_size > 0
    # one test vector's posterior: said as a test example, not a test image
    assert main(["sample", str(run), "--n", "8", "--out", str(png), "--source", "posterior",
                 "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert "posterior of test example 1" in out and "framed in red: test example 1" in out, out
    assert "test image" not in out, out
    code, err = cli(capsys, "sample", run, "--out", png, "--source", "posterior", "--index", 99)
    assert code == 2 and "--index must be in [0, 20) (the test examples), got 99" in one_line(err)


@pytest.mark.parametrize("refused", sorted(SOURCES))
def test_another_user_is_refused_each_file_before_it_runs(made, user_code, refused,
                                                          monkeypatch, capsys, tmp_path):
    """The path-trained folder copied to another user who chose the other two files
    themselves: the third is refused in one line before its code runs."""
    run = tmp_path / "run"
    shutil.copytree(made["path"], run)
    as_new_user(monkeypatch, tmp_path / "their_config")
    for kind, (module, cls, _) in SOURCES.items():
        if kind != refused:
            trust.pin(f"{made['user'] / module}.py:{cls}", kind)
    monkeypatch.setattr(trust, "_CHOSEN", set())  # only the record counts, as in a new process
    code, err = cli(capsys, "evaluate", run, *QUICK)
    line = one_line(err)
    assert code == 2
    module = SOURCES[refused][0]
    assert f"{made['user'] / module}.py" in line and "not in your trust record" in line, line
    assert "--trust-remote-code" in line, line
    assert not user_code[refused].exists(), f"{refused}: its code ran before the refusal"
    code, err = cli(capsys, "evaluate", run, *QUICK, "--trust-remote-code")
    assert code == 0, err
    assert user_code[refused].exists()


def test_another_user_is_refused_a_module_before_it_runs(made, user_code, monkeypatch,
                                                         capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made["module"], run)
    as_new_user(monkeypatch, tmp_path / "their_config")
    code, err = cli(capsys, "evaluate", run, *QUICK)
    line = one_line(err)
    assert code == 2
    assert "module 'my_data', which would be imported" in line, line
    assert "not in your trust record" in line and "--trust-remote-code" in line, line
    assert not any(m.exists() for m in user_code.values()), "user code ran before the refusal"
    # from where the module is not importable, opting in would not help: the line says so
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(made["user"])])
    code, err = cli(capsys, "evaluate", run, *QUICK)
    line = one_line(err)
    assert code == 2 and "module 'my_data' is not found from here" in line, line
    assert "PYTHONPATH" in line and line.count("config.toml") == 1, line
    code, err = cli(capsys, "evaluate", run, *QUICK, "--trust-remote-code")
    assert code == 2 and "No module named 'my_data'" in one_line(err)
    monkeypatch.undo()  # back on sys.path, in the user's folder
    as_new_user(monkeypatch, tmp_path / "their_config")
    for command in (["evaluate", run, *QUICK], ["sample", run, "--n", "4", "--out",
                                               tmp_path / "s.png"]):
        code, err = cli(capsys, *command, "--trust-remote-code")
        assert code == 0, err
    assert all(m.exists() for m in user_code.values())


def write_distribution(site: Path) -> dict[str, Path]:
    """An installed distribution ``my_plugins`` as pip leaves it: the package and its
    ``.dist-info`` with the entry points of the three kinds. Returns the markers by kind."""
    markers = write_plugins(site / "my_plugins")
    (site / "my_plugins" / "__init__.py").write_text("")
    info = site / "my_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugins\nVersion: 0.1\n")
    groups = "".join(f"[{group}]\n{name} = my_plugins.{SOURCES[kind][0]}:{SOURCES[kind][1]}\n\n"
                     for kind, (group, name) in ENTRY_POINTS.items())
    (info / "entry_points.txt").write_text(groups)
    return markers


DRIVER = """
import json, sys
from priorvae.cli import main
codes = [main(args) for args in json.loads(sys.argv[1])]
print(json.dumps(codes))
"""


def test_own_plugins_by_entry_point_of_an_installed_distribution(tmp_path, monkeypatch,
                                                                 capsys):
    site = tmp_path / "site"
    write_distribution(site)
    names = {kind: name for kind, (_, name) in ENTRY_POINTS.items()}
    config = write_config(tmp_path / "ep.toml", names)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1",
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop(trust.TRUST_ENV, None)

    def run(*argv):
        done = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=900)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert "plug-in" not in done.stderr, done.stderr  # no "could not load plug-in"
        return done.stdout

    listing = run("-m", "priorvae", "list")
    for kind, name in names.items():
        line = next(ln for ln in listing.splitlines() if ln.startswith(f"[{kind}] name = "))
        assert name in line.split(" = ", 1)[1].split(" | "), line
    run_dir = tmp_path / "run"
    commands = [["list", "likelihood", "laplace"],
                ["train", str(config), "--out", str(run_dir), "--quiet"],
                ["evaluate", str(run_dir), *QUICK],
                ["sample", str(run_dir), "--n", "4", "--out", str(tmp_path / "s.png")]]
    out = run("-c", DRIVER, json.dumps(commands))
    assert json.loads(out.strip().splitlines()[-1]) == [0, 0, 0, 0], out
    assert "laplace: log p(x) = sum_j" in out and "scale = 0.5" in out, out
    recorded = tomllib.loads((run_dir / "config.toml").read_text())  # not installed here
    for kind, name in names.items():  # the run names the plug-ins by entry-point name only
        assert recorded[kind]["name"] == name and "file_sha256" not in recorded[kind]
    assert (tmp_path / "s.png").stat().st_size > 0
    # here the distribution is not installed: one line with the known names, exit code 2
    as_new_user(monkeypatch, tmp_path / "their_config")
    code, err = cli(capsys, "evaluate", run_dir, *QUICK)
    line = one_line(err)
    assert code == 2
    assert "unknown data set 'blobs'" in line and "Known data sets: " in line, line
    assert "digits" in line and "'priorvae.datasets'" in line, line
    for kind in ("likelihood", "network"):
        code, err = cli(capsys, "list", kind, names[kind])
        line = one_line(err)
        assert code == 2 and f"no {kind} {names[kind]!r} is registered; registered: " in line



BROKEN = '''
import torch
from torch import nn
from priorvae.datasets import DataSet
from priorvae.likelihoods import Likelihood
from priorvae.networks import Networks


class LoadRaises(DataSet):
    value_type, n_classes, shape = "intensity", None, (1, 8, 8)

    def load(self):
        raise ValueError("bad column")


class InitRaises(DataSet):
    value_type = "intensity"

    def __init__(self, root=None, download=True):
        raise ValueError("bad column")


class Lik(Likelihood):
    value_types = frozenset({"intensity"})

    def log_prob(self, out, x):
        return -((x - out) ** 2).flatten(1).sum(-1)

    def mean(self, out):
        return out

    def sample(self, out, generator=None):
        return out


class LikInitRaises(Lik):
    def __init__(self, input_shape):
        raise ValueError("bad column")


class PrepareRaises(Lik):
    def prepare_fixed(self, x, generator):
        raise ValueError("bad column")


class Raises(nn.Module):
    def forward(self, x):
        raise ValueError("bad column")


class ForwardRaises(Networks):
    def __init__(self, input_shape, latent_dim, out_channels, logvar_min=-6.0, logvar_max=2.0,
                 hidden=(32,)):
        super().__init__(input_shape, latent_dim, out_channels, logvar_min, logvar_max)
        self.encoder, self.decoder = Raises(), Raises()


class NetInitRaises(ForwardRaises):
    def __init__(self, input_shape, latent_dim, out_channels, logvar_min=-6.0, logvar_max=2.0,
                 hidden=(32,)):
        raise ValueError("bad column")
'''


@pytest.mark.parametrize(("table", "cls", "says"), [
    ("data", "LoadRaises", "data set '{spec}' failed to load"),
    ("data", "InitRaises", "could not build data set '{spec}'"),
    ("likelihood", "LikInitRaises", "could not build likelihood '{spec}'"),
    ("likelihood", "PrepareRaises", "likelihood 'PrepareRaises': prepare_fixed failed on the "
                                    "validation split"),
    ("network", "NetInitRaises", "could not build network '{spec}'"),
    ("network", "ForwardRaises", "network '{spec}': the encoder failed on a batch of 2 items "
                                 "(1, 8, 8)"),
])
def test_an_exception_in_a_users_plugin_is_one_line_naming_it(tmp_path, monkeypatch, capsys,
                                                              table, cls, says):
    """A user's data set whose load() or __init__ raises, a likelihood or network whose
    __init__ or first use raises: one line naming the plug-in and the exception, exit code 2,
    no run folder (it was a traceback from load()); PRIORVAE_DEBUG=1 shows the traceback."""
    from conftest import tiny_toml
    from priorvae.errors import PluginError

    path = tmp_path / "broken.py"
    path.write_text(BROKEN)
    spec = f"{path}:{cls}"
    config = tiny_toml(tmp_path / "c.toml", **{table: {"name": spec}},
                       train={"epochs": 1, "image_every": 0, "diagnostics_every": 0})
    code, err = cli(capsys, "train", config, "--out", tmp_path / "run", "--quiet")
    line = one_line(err)
    assert code == 2 and line.startswith("priorvae train: error: "), line
    assert says.format(spec=spec) + ": ValueError: bad column" in line, line
    assert "PRIORVAE_DEBUG=1 shows the traceback" in line, line
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("PRIORVAE_DEBUG", "1")
    with pytest.raises(PluginError) as info:
        main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"])
    assert isinstance(info.value.__cause__, ValueError)  # the user's own, with its traceback
