"""A shared run folder is hostile input (issue 24, classes 3-8): contracts over every file
priorvae reads or writes in a folder, every command, every non-finite value.

3. no symbolic link (or FIFO, device) in a run folder is followed; the lock file is never
   written; 4. no non-finite number is reported or saved; 5. crafted or damaged state is one
   line naming the cause, nothing half-written; 6. a request's cost is bounded up front;
   7. concurrent compares share a grid, results are tied to their checkpoint, a full disk is
   one line; 8. SIGTERM stops every loop at a safe point (exit 143), a prior overriding the
   public log_prob(z) trains.
"""

import errno
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from conftest import read_metrics, tiny_toml
from priorvae.cli import main
from priorvae.config import load_config
from priorvae.errors import RunError
from priorvae.runs import Run, load_checkpoint
from priorvae.train import train

COMMANDS = {  # every command that opens a run folder, cheap arguments
    "evaluate": lambda run, tmp: ["evaluate", run, "--quiet", "--no-diagnostics"],
    "fit-prior": lambda run, tmp: ["fit-prior", run, "--prior", "mog", "--epochs", "1",
                                   "--quiet", "--set", "prior.n_components=2"],
    "sample": lambda run, tmp: ["sample", run, "--out", tmp / "s.png", "--n", "4"],
    "train": lambda run, tmp: ["train", run.parent / "train.toml", "--out", run, "--quiet"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    cfg = load_config(tiny_toml(d / "c.toml", train={"epochs": 2, "diagnostics_every": 0,
                                                     "image_every": 0}))
    train(cfg, d / "run", progress=False)
    return d / "run"


@pytest.fixture
def run_dir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    shutil.copy(trained.parent / "c.toml", tmp_path / "train.toml")  # its config, outside
    return tmp_path / "run"


def cli(*args, capsys=None):
    code = main([str(a) for a in args])
    return code, (capsys.readouterr().err if capsys else "")


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if "warning:" not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder):
    """Every entry below ``folder`` with its kind, size and modification time."""
    out = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            out[os.path.relpath(os.path.join(top, name), folder)] = (
                st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


# 3. links -----------------------------------------------------------------------------------

# every entry priorvae reads or writes in a run folder (the projector writes 00002/ and
# projector_config.pbtxt by fixed names; an event file by a guessable one)
ENTRIES = [".lock", ".lock.info", "config.toml", "metrics.json", "best.pt", "last.pt",
           "figures", "priors", "priors/expost-mog.toml", "priors/expost-mog.pt",
           "priors/expost-mog", "00002", "projector_config.pbtxt",
           "events.out.tfevents.1.host.1.0"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("entry", ENTRIES)
def test_no_link_in_a_run_folder_is_followed(run_dir, tmp_path, capsys, entry, command):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    target = outside if entry in ("figures", "priors", "priors/expost-mog", "00002") \
        else victim
    path = run_dir / entry
    path.parent.mkdir(exist_ok=True)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.symlink_to(target)
    before = snapshot(outside)
    code, err = cli(*COMMANDS[command](run_dir, tmp_path), capsys=capsys)
    line = one_line(err)
    assert code == 2 and f"{path} is a symbolic link" in line, line
    assert snapshot(outside) == before and victim.read_bytes() == b"precious"
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("kind", ["fifo", "hardlink"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_lock_file_is_never_written(run_dir, tmp_path, capsys, kind, command):
    """A lock file that is a FIFO is refused (never blocked on); one that is a hard link to
    a file elsewhere is used as a lock and never written or truncated."""
    (run_dir / ".lock").unlink()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    if kind == "fifo":
        os.mkfifo(run_dir / ".lock")
    else:
        os.link(victim, run_dir / ".lock")
    code, err = cli(*COMMANDS[command](run_dir, tmp_path), capsys=capsys)
    if kind == "fifo":
        assert code == 2 and f"{run_dir / '.lock'} is a FIFO" in one_line(err)
    else:
        assert code == 0, err
    assert victim.read_bytes() == b"precious"


def test_paths_never_climb_out(run_dir):
    from priorvae.runs import check_inside

    run = Run.open(run_dir)
    for bad in ("../x", "/etc/passwd", "figures/../../x"):
        with pytest.raises(RunError, match="not a path inside"):
            run.file(bad)
    assert check_inside(run_dir, "figures/new/deeper.png") == run_dir / "figures/new/deeper.png"


def test_a_symlinked_compare_cell_is_refused(tmp_path, capsys):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 1, "image_every": 0})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal"]\nseeds = [0]\n')
    out = tmp_path / "grid"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "standard_normal-seed0").symlink_to(tmp_path / "elsewhere")
    code, err = cli("compare", config, "--out", out, "--quiet", capsys=capsys)
    assert code == 2 and "standard_normal-seed0 is a symbolic link" in one_line(err)
    assert not list((tmp_path / "elsewhere").iterdir())


# 4. non-finite numbers ----------------------------------------------------------------------

NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("where", ["train_loss", "validation"])
def test_a_non_finite_training_number_stops_with_one_line(tmp_path, capsys, monkeypatch,
                                                          where, value):
    import priorvae.train as tr

    calls = []
    if where == "validation":
        real = tr.global_mean_elbo

        def fake(*args, **kwargs):
            calls.append(1)
            out = real(*args, **kwargs)
            return {**out, "elbo": value} if len(calls) == 2 else out
        monkeypatch.setattr(tr, "global_mean_elbo", fake)
    else:
        real = tr.train_step

        def fake(*args, **kwargs):
            calls.append(1)
            out = real(*args, **kwargs)
            return out * value if len(calls) == 15 else out  # epoch 2 (13 steps an epoch)
        monkeypatch.setattr(tr, "train_step", fake)
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 3, "diagnostics_every": 0,
                                                   "image_every": 0})
    run = tmp_path / "run"
    code, err = cli("train", config, "--out", run, "--quiet", capsys=capsys)
    line = one_line(err)
    assert code == 2 and "non-finite" in line and "at epoch 2" in line, line
    assert "last good" not in line and "(epoch 1," in line
    metrics = strict_json(run / "metrics.json")
    assert metrics["status"] == "failed" and metrics["epochs_trained"] == 1
    assert load_checkpoint(run / "best.pt")["epoch"] == 1  # never the diverged model
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("command", ["evaluate", "fit-prior", "sample"])
def test_a_diverged_checkpoint_is_refused_by_every_command(run_dir, tmp_path, capsys, command):
    ckpt = load_checkpoint(run_dir / "best.pt")
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], math.nan)
    torch.save(ckpt, run_dir / "best.pt")
    before = snapshot(run_dir)
    code, err = cli(*COMMANDS[command](run_dir, tmp_path), capsys=capsys)
    assert code == 2 and "non-finite weights" in one_line(err) and name in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_a_non_finite_test_metric_writes_nothing(run_dir, capsys, monkeypatch, value):
    import priorvae.evaluate as ev

    def fake_nlls(model, x, k, priors, *args, rows=None, **kwargs):
        if rows is not None:  # the per-image rows the matched column reads: (S, B)
            rows.append(torch.full((len(priors), x.shape[0]), value))
        return [value] * len(priors)

    monkeypatch.setattr(ev, "mean_iwae_nlls", fake_nlls)
    before = (run_dir / "metrics.json").read_bytes()
    code, err = cli("evaluate", run_dir, "--quiet", "--no-diagnostics", capsys=capsys)
    assert code == 2 and "non-finite test_nll" in one_line(err)
    assert (run_dir / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("method", ["em", "gradient"])
def test_a_fit_whose_every_epoch_is_non_finite_is_one_line(run_dir, capsys, monkeypatch,
                                                           method):
    import priorvae.expost as ex

    monkeypatch.setattr(ex, "_val_loss", lambda prior, z: math.nan)
    monkeypatch.setattr(ex, "_mean_nll", lambda prior, z: math.nan)
    code, err = cli("fit-prior", run_dir, "--prior", "mog", "--method", method, "--epochs", "3",
                    "--quiet", capsys=capsys)
    assert code == 2 and "non-finite validation loss" in one_line(err)
    assert not (run_dir / "priors" / "expost-mog.toml").exists()


def test_metrics_json_is_always_json(run_dir):
    run = Run.open(run_dir)
    with run.lock("evaluate"):
        run.update_metrics(test_nll=math.nan, nested={"a": [1.0, -math.inf]})
    metrics = strict_json(run_dir / "metrics.json")
    assert metrics["test_nll"] is None and metrics["nested"] == {"a": [1.0, None]}
    assert metrics["non_finite"] == {"test_nll": "nan", "nested.a[1]": "-inf"}
    # what older versions wrote (NaN, -Infinity) still opens, as null
    (run_dir / "metrics.json").write_text('{"status": "finished", "best_val_elbo": -Infinity}')
    assert Run.open(run_dir).metrics()["best_val_elbo"] is None


def test_non_finite_names_the_current_values_only(run_dir):
    run = Run.open(run_dir)
    with run.lock("evaluate"):
        run.update_metrics(kl_stderr=math.nan, prior_sources={
            "expost-mog": {"kl_stderr": math.nan, "a.b": [1.0, math.inf]}})
        assert read_metrics(run_dir)["non_finite"] == {
            "kl_stderr": "nan", "prior_sources.expost-mog.kl_stderr": "nan",
            "prior_sources.expost-mog.a.b[1]": "inf"}
        run.update_metrics(kl_stderr=0.5)  # a later evaluation's finite value
        assert read_metrics(run_dir)["non_finite"] == {
            "prior_sources.expost-mog.kl_stderr": "nan", "prior_sources.expost-mog.a.b[1]": "inf"}
        # the sources written back whole (the old null carried along): still named
        saved = read_metrics(run_dir)["prior_sources"]
        saved["expost-flow"] = {"kl_stderr": 0.1}
        run.update_metrics(prior_sources=saved)
        assert set(read_metrics(run_dir)["non_finite"]) == {
            "prior_sources.expost-mog.kl_stderr", "prior_sources.expost-mog.a.b[1]"}
        saved["expost-mog"]["kl_stderr"] = 0.2
        run.update_metrics(prior_sources=saved)
        assert read_metrics(run_dir)["non_finite"] == {"prior_sources.expost-mog.a.b[1]": "inf"}
        run.update_metrics(drop=("prior_sources",))
        assert "non_finite" not in read_metrics(run_dir)


def test_an_absurd_result_warns(tmp_path, capsys, monkeypatch):
    import priorvae.train as tr

    real = tr.global_mean_elbo
    monkeypatch.setattr(tr, "global_mean_elbo", lambda *a, **k: {**real(*a, **k),
                                                                  "elbo": -1e14})
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 1, "diagnostics_every": 0,
                                                   "image_every": 0})
    code, err = cli("train", config, "--out", tmp_path / "run", "--quiet", capsys=capsys)
    assert code == 0 and "warning: best_val_elbo = -1e+14 nats per image is absurd" in err
    assert "absurd" in read_metrics(tmp_path / "run")["warnings"][0]


# 5. crafted or damaged state ----------------------------------------------------------------

def _edit_last(run_dir, edit):
    ckpt = load_checkpoint(run_dir / "last.pt")
    edit(ckpt)
    torch.save(ckpt, run_dir / "last.pt")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["status"] = "interrupted"  # so that train resumes from last.pt
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


LAST_CASES = {
    "copy of best.pt": (lambda c: c.pop("optimizer"), "no optimizer (a copy of best.pt?)"),
    "epoch is a str": (lambda c: c.update(epoch="2"), "its 'epoch' is a str, not a int"),
    "history is a dict": (lambda c: c.update(history={}), "its 'history' is a dict"),
    "rng is a list": (lambda c: c.update(rng_cpu=[1, 2]), "its 'rng_cpu' is a list"),
    "bad rng tensor": (lambda c: c.update(rng_cpu=torch.zeros(3)), "is damaged (TypeError"),
    "epochs disagree": (lambda c: c.update(best_epoch=9), "do not add up"),
    "optimizer state": (lambda c: c.update(optimizer={"state": {}, "param_groups": []}),
                        "is damaged (ValueError"),
    "weight is a str": (lambda c: c["model"].update({next(iter(c["model"])): "x"}),
                        "is a str, not a tensor"),
}


@pytest.mark.parametrize("case", sorted(LAST_CASES))
def test_a_crafted_last_checkpoint_is_one_line(run_dir, capsys, case):
    edit, message = LAST_CASES[case]
    _edit_last(run_dir, edit)
    before = snapshot(run_dir)
    code, err = cli(*COMMANDS["train"](run_dir, None), capsys=capsys)
    assert code == 2 and message in one_line(err), err
    assert snapshot(run_dir) == before


def test_a_deeply_nested_file_is_one_line(run_dir, tmp_path, capsys):
    deep = "a = " + "[" * 600 + "]" * 600 + "\n"
    (tmp_path / "deep.toml").write_text(deep)
    code, err = cli("train", tmp_path / "deep.toml", "--out", tmp_path / "new", capsys=capsys)
    assert code == 2 and "deep.toml is nested too deeply" in one_line(err)
    code, err = cli("train", run_dir.parent / "train.toml", "--set", "train." + deep.strip(),
                    "--out", tmp_path / "new", capsys=capsys)
    assert code == 2 and "nested too deeply" in one_line(err)
    assert not (tmp_path / "new").exists()
    (run_dir / "config.toml").write_text(deep)
    code, err = cli("evaluate", run_dir, "--quiet", capsys=capsys)
    assert code == 2 and "config.toml" in one_line(err)
    shutil.copy(run_dir / "best.pt", run_dir / "x")  # metrics.json nested too deeply
    (run_dir / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RunError, match="damaged"):
        Run(run_dir, None).metrics()


def _idx(path, magic, dims, payload):
    path.write_bytes(struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload)


MNIST_CASES = {
    "counts differ": ({"train-labels-idx1-ubyte": (0x801, [10_002], bytes(10_002))},
                      "holds 10001 images but"),
    "truncated images": ({"train-images-idx3-ubyte": (0x803, [60_000, 28, 28], bytes(784))},
                         "truncated or damaged"),
    "not idx": ({"t10k-images-idx3-ubyte": (0x1234, [1, 28, 28], bytes(784))},
                "is not an IDX images file"),
    "label out of range": ({"t10k-labels-idx1-ubyte": (0x801, [1], bytes([200]))},
                           "holds a label 200"),
}


@pytest.mark.parametrize("case", sorted(MNIST_CASES))
def test_damaged_mnist_files_are_named(tmp_path, capsys, case):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n = 10_001
    _idx(raw / "train-images-idx3-ubyte", 0x803, [n, 28, 28], bytes(n * 784))
    _idx(raw / "train-labels-idx1-ubyte", 0x801, [n], bytes(n))
    _idx(raw / "t10k-images-idx3-ubyte", 0x803, [1, 28, 28], bytes(784))
    _idx(raw / "t10k-labels-idx1-ubyte", 0x801, [1], bytes(1))
    files, message = MNIST_CASES[case]
    for name, (magic, dims, payload) in files.items():
        _idx(raw / name, magic, dims, payload)
    config = tiny_toml(tmp_path / "c.toml", data={"name": "mnist", "root": str(tmp_path / "data"),
                                                  "download": False})
    code, err = cli("train", config, "--out", tmp_path / "run", "--quiet", capsys=capsys)
    line = one_line(err)
    assert code == 2 and message in line and "not found" not in line, line
    assert not (tmp_path / "run").exists()


def test_a_corrupt_classifier_cache_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from priorvae import quality
    from priorvae.data import load_splits

    monkeypatch.setattr(quality, "SHIPPED", {})  # digits' shipped classifier is not the cache
    cache = tmp_path / "cache" / "priorvae" / "classifiers"
    cache.mkdir(parents=True)
    from priorvae.likelihoods import build_likelihood

    path = quality.classifier_cache_path(load_splits("digits"), cache,
                                         build_likelihood("bernoulli", (1, 8, 8)))
    path.write_bytes(b"not a checkpoint")
    before = (run_dir / "metrics.json").read_bytes()
    code, err = cli("evaluate", run_dir, "--quiet", capsys=capsys)
    assert code == 2 and "cached sample-quality classifier is unusable" in one_line(err)
    assert str(path) in err
    assert (run_dir / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("device", ["mps", "xpu", "hpu", "meta", "cuda:7", "tpu"])
def test_an_absent_device_is_named_not_a_damaged_checkpoint(run_dir, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is here")
    code, err = cli("evaluate", run_dir, "--quiet", "--device", device, capsys=capsys)
    line = one_line(err)
    assert code == 2 and f"device {device!r}" in line and "damaged" not in line, line


# 6. resource abuse --------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["prior", "aggregate", "posterior"])
def test_a_huge_sample_is_refused_up_front(run_dir, tmp_path, capsys, source):
    extra = ["--index", "0"] if source == "posterior" else []
    code, err = cli("sample", run_dir, "--out", tmp_path / "s.png", "--n", "100000000",
                    "--source", source, *extra, capsys=capsys)
    assert code == 2 and "GiB of memory" in one_line(err)
    code, err = cli("sample", run_dir, "--out", tmp_path / "s.png", "--n", "4", "--scale",
                    "1000000", "--source", source, *extra, capsys=capsys)
    assert code == 2 and "at --scale 1000000" in one_line(err)
    assert not (tmp_path / "s.png").exists()


def test_a_days_long_evaluation_is_refused_up_front(run_dir, capsys, monkeypatch):
    import priorvae.evaluate as ev

    before = snapshot(run_dir)
    code, err = cli("evaluate", run_dir, "--iw-samples", "100000000", capsys=capsys)
    assert code == 2 and "decoder evaluations" in one_line(err)
    assert snapshot(run_dir) == before
    monkeypatch.setattr(ev, "MAX_IWAE_DECODES", 10)  # the flag lifts the bound
    assert cli("evaluate", run_dir, "--quiet", "--no-diagnostics", capsys=capsys)[0] == 2
    assert cli("evaluate", run_dir, "--quiet", "--no-diagnostics", "--allow-expensive",
               capsys=capsys)[0] == 0
    monkeypatch.undo()
    # the folder's own config (and checkpoint) asking for it is refused the same way
    text = (run_dir / "config.toml").read_text()
    (run_dir / "config.toml").write_text(text.replace("iw_samples = 20",
                                                      "iw_samples = 100000000"))
    ckpt = load_checkpoint(run_dir / "best.pt")
    ckpt["config"]["eval"]["iw_samples"] = 100_000_000
    torch.save(ckpt, run_dir / "best.pt")
    code, err = cli("evaluate", run_dir, capsys=capsys)
    assert code == 2 and "--allow-expensive" in one_line(err)


# 7. concurrency and stale results -----------------------------------------------------------

def test_a_cell_whose_config_is_being_written_is_busy_not_foreign(tmp_path, capsys):
    """What a second compare meets: the first holds the cell's lock and is writing its
    config.toml (a temporary file is there): busy (compare skips it), never 'not empty'."""
    import fcntl

    config = tiny_toml(tmp_path / "c.toml")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.toml.abc.tmp").write_text("half")
    fd = os.open(run / ".lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, err = cli("train", config, "--out", run, "--quiet", capsys=capsys)
    finally:
        os.close(fd)
    assert code == 2 and "is in use by" in one_line(err)
    # once free, the leftover of a killed writer is no reason to refuse the folder
    assert cli("train", config, "--out", run, "--quiet", capsys=capsys)[0] == 0


def test_two_compares_started_together_share_the_grid(tmp_path):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 1, "image_every": 0,
                                                   "diagnostics_every": 0})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal", "mog"]\nseeds = [0]\n')
    out = tmp_path / "grid"
    cmd = [sys.executable, "-m", "priorvae", "compare", str(config), "--out", str(out),
           "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0 and "Traceback" not in stderr, stderr
        assert "is not empty" not in stdout + stderr
    for cell in ("standard_normal-seed0", "mog-seed0"):
        assert read_metrics(out / cell)["status"] == "finished"


def test_results_are_tied_to_their_checkpoint(run_dir, capsys):
    assert cli("evaluate", run_dir, "--quiet")[0] == 0
    capsys.readouterr()
    assert "hole_rate" in read_metrics(run_dir)
    # the same checkpoint: a quick evaluation keeps its diagnostics
    assert cli("evaluate", run_dir, "--quiet", "--no-diagnostics")[0] == 0
    assert "hole_rate" in read_metrics(run_dir)
    # retrained: nothing of the earlier model's evaluation stays or is printed
    (run_dir / "last.pt").unlink()
    metrics = read_metrics(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "status": "interrupted"}))
    config = tiny_toml(run_dir.parent / "c.toml", train={"epochs": 2, "diagnostics_every": 0,
                                                         "image_every": 0, "seed": 0})
    assert cli("train", config, "--out", run_dir, "--quiet")[0] == 0
    assert not {"hole_rate", "test_nll", "evaluated_checkpoint"} & set(read_metrics(run_dir))
    capsys.readouterr()
    assert cli("evaluate", run_dir, "--quiet", "--no-diagnostics", "--json")[0] == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "hole_rate" not in printed and "hole_rate" not in read_metrics(run_dir)


def test_results_of_another_best_pt_are_never_shown_as_its(run_dir, capsys):
    from priorvae.compare import _cell_metrics
    from priorvae.runs import save_checkpoint

    assert cli(*COMMANDS["fit-prior"](run_dir, None))[0] == 0
    assert cli("evaluate", run_dir, "--prior-source", "trained", "--prior-source", "expost-mog",
               "--quiet", "--no-diagnostics")[0] == 0
    capsys.readouterr()
    before = read_metrics(run_dir)
    old = before["evaluated_checkpoint"]
    assert before["prior_sources"]["expost-mog"]["evaluated_checkpoint"] == old
    # best.pt changed other than by this version's training (a folder copied over it)
    best = load_checkpoint(run_dir / "best.pt")
    name = next(iter(best["model"]))
    best["model"][name] = best["model"][name] + 1e-3
    save_checkpoint(run_dir / "best.pt", best)
    # what a report reads holds none of the earlier best.pt's results ...
    shown = _cell_metrics(run_dir)
    assert not {"test_nll", "evaluated_checkpoint", "matched", "prior_sources"} & set(shown)
    assert shown["best_epoch"] == before["best_epoch"]  # training's own numbers stay
    # ... and evaluating the new one leaves none of them in metrics.json
    assert cli("evaluate", run_dir, "--quiet", "--no-diagnostics")[0] == 0
    after = read_metrics(run_dir)
    assert after["evaluated_checkpoint"] not in (None, old) and "prior_sources" not in after
    # results that name no checkpoint (written before priorvae recorded it) are read as before
    legacy = {k: v for k, v in after.items() if k != "evaluated_checkpoint"}
    legacy["prior_sources"] = {"expost-mog": {"test_nll": 1.0}}
    (run_dir / "metrics.json").write_text(json.dumps(legacy))
    assert _cell_metrics(run_dir) == legacy


def test_a_full_disk_in_tensorboard_is_one_line(tmp_path, capfd, monkeypatch):
    from tensorboard.summary.writer import record_writer

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 1, "image_every": 0,
                                                   "diagnostics_every": 0})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal"]\nseeds = [0]\n')
    code = main(["compare", str(config), "--out", str(tmp_path / "grid"), "--quiet"])
    time.sleep(0.2)  # a writer thread's report would come now
    err = capfd.readouterr().err
    assert code == 2 and "No space left on device" in one_line(err)
    assert "Exception in thread" not in err


# 8. signals and user priors -----------------------------------------------------------------

def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


@pytest.mark.parametrize("command", ["evaluate", "fit-prior"])
def test_sigterm_stops_evaluation_and_fitting_at_a_safe_point(run_dir, command):
    args = {"evaluate": ["--iw-samples", "200000", "--no-diagnostics"],
            "fit-prior": ["--prior", "mog", "--epochs", "100000", "--patience", "0",
                          "--method", "gradient", "--batch-size", "10"]}[command]
    before = (run_dir / "metrics.json").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "priorvae", command, str(run_dir),
                             "--quiet", *args], stderr=subprocess.PIPE, text=True)
    _wait_for(run_dir / ".lock.info", proc)  # it holds the folder: working
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert "terminated" in err.strip().splitlines()[-1]
    assert (run_dir / "metrics.json").read_bytes() == before
    assert not (run_dir / "priors" / "expost-mog.toml").exists()
    assert not (run_dir / ".lock.info").exists() and Run.open(run_dir).status == "finished"


def test_sigterm_in_compare_marks_the_cell_interrupted(tmp_path, capsys, monkeypatch):
    """In process: the flag that SIGTERM sets, raised in the middle of a cell's training."""
    import priorvae.stop as stop
    import priorvae.train as tr

    real = tr.train_step
    calls = []

    def step_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler, installed by main
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "train_step", step_then_sigterm)
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 5, "image_every": 0,
                                                   "diagnostics_every": 0})
    with open(config, "a") as f:
        f.write('\n[compare]\npriors = ["standard_normal", "mog"]\nseeds = [0]\n')
    code = main(["compare", str(config), "--out", str(tmp_path / "grid"), "--quiet"])
    assert code == 143 and not stop.stop_requested()
    assert read_metrics(tmp_path / "grid" / "standard_normal-seed0")["status"] == "interrupted"
    assert not (tmp_path / "grid" / "mog-seed0").exists()  # no new cell after the signal
    assert signal.getsignal(signal.SIGTERM) is not stop._on_sigterm


OVERRIDES_LOG_PROB = """
import torch
from priorvae.registry import Prior

class Laplace(Prior):
    def __init__(self, latent_dim, scale=1.0):
        super().__init__(latent_dim)
        self.log_scale = torch.nn.Parameter(torch.tensor(float(scale)).log())
    def log_prob(self, z):  # the public method, as a torch.distributions user writes it
        b = self.log_scale.exp()
        return (-z.abs() / b - torch.log(2 * b)).sum(-1)
    def sample(self, n):
        return torch.distributions.Laplace(0.0, self.log_scale.exp()).sample(
            (n, self.latent_dim))
"""


def test_a_prior_overriding_the_public_log_prob_trains_and_fits(tmp_path, capsys):
    path = tmp_path / "laplace.py"
    path.write_text(OVERRIDES_LOG_PROB)
    config = tiny_toml(tmp_path / "c.toml", prior={"name": f"{path}:Laplace"},
                       train={"epochs": 1, "image_every": 0, "diagnostics_every": 0})
    code, err = cli("train", config, "--out", tmp_path / "run", "--quiet", capsys=capsys)
    assert code == 0, err
    code, err = cli("fit-prior", tmp_path / "run", "--prior", f"{path}:Laplace", "--epochs",
                    "2", "--quiet", capsys=capsys)
    assert code == 0, err


def test_an_expost_prior_fitted_to_another_best_checkpoint_is_refused(run_dir, capsys):
    """Class 7 (stale results): priors/LABEL.* fitted before the run trained on belong to the
    old VAE; using them with the new best.pt is refused, naming the fix."""
    code, _ = cli("fit-prior", run_dir, "--prior", "mog", "--set", "prior.n_components=2",
                  "--epochs", "3", "--quiet", capsys=capsys)
    assert code == 0
    code, _ = cli("sample", run_dir, "--prior-source", "expost-mog", "--n", "4", "--out",
                  run_dir.parent / "ok.png", capsys=capsys)
    assert code == 0
    best = torch.load(run_dir / "best.pt", weights_only=True)  # "the run trained on"
    first = next(k for k, v in best["model"].items() if v.is_floating_point())
    best["model"][first] = best["model"][first] + 0.01
    torch.save(best, run_dir / "best.pt")
    code, err = cli("sample", run_dir, "--prior-source", "expost-mog", "--n", "4", "--out",
                    run_dir.parent / "stale.png", capsys=capsys)
    assert code == 2 and "fitted to another best.pt" in one_line(err)
    assert not (run_dir.parent / "stale.png").exists()


def test_crafted_numbers_in_metrics_json_end_evaluate_in_no_traceback(run_dir, capsys):
    # JSON allows 1e999, Python reads it as inf, and writing metrics.json back (allow_nan=False)
    # raised ValueError; a summary metric holding a string or a list (kept: the same
    # checkpoint, no diagnostics asked for) ended evaluate's summary in a TypeError
    metrics = json.loads((run_dir / "metrics.json").read_text())
    text = json.dumps(metrics)[:-1] + ', "matched": {"diff": 1e999, "test_nll": -1e400}}'
    (run_dir / "metrics.json").write_text(text)
    assert Run.open(run_dir).metrics()["matched"] == {"diff": None, "test_nll": None}
    code, err = cli(*COMMANDS["evaluate"](run_dir, None), capsys=capsys)
    assert code == 0 and "Traceback" not in err, err
    assert strict_json(run_dir / "metrics.json")["test_nll"] > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps(metrics | {
        "fd_prior": "abc", "hole_rate": [1] * 1000, "hole_rate_stderr": "x",
        "truncation_share": {"a": 1}, "eval_seconds": "1"}))
    code, err = cli(*COMMANDS["evaluate"](run_dir, None), capsys=capsys)
    assert code == 0 and "Traceback" not in err, err
