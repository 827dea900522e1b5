"""The command line end to end on digits."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from test_priors import TEST_ARGS

from conftest import REPO, tiny_toml
from priorvae import load_run
from priorvae.cli import main
from priorvae.priors import list_priors


def run_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "priorvae", *args], capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"priorvae {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def main_out(capsys, *args) -> tuple[int, str, str]:
    """``priorvae ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_evaluate_sample_load_run(tmp_path, capsys):
    """In this process (a fresh interpreter per command cost about 3 s of start-up each on a
    busy 2-core machine; `python -m priorvae` is run by the bad-input tests)."""
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 2})
    run = tmp_path / "run"
    code, out, err = main_out(capsys, "train", config, "--out", run, "--set", "train.seed=5",
                              "--quiet")
    assert code == 0, err
    assert '"status": "finished"' in out
    for name in ("config.toml", "best.pt", "last.pt", "metrics.json"):
        assert (run / name).is_file(), name
    assert "seed = 5" in (run / "config.toml").read_text()

    code, out, err = main_out(capsys, "evaluate", run, "--iw-samples", "30", "--quiet", "--json")
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iw_samples"] == 30 and metrics["test_images"] == 300
    assert metrics["test_nll"] > 0 and metrics["test_elbo"] < 0
    # the IWAE bound is tighter than the ELBO
    assert metrics["test_nll"] < -metrics["test_elbo"]
    assert json.loads(out)["test_nll"] == metrics["test_nll"]

    for key in ("kl", "mutual_info", "marginal_kl", "kl_prior_to_agg", "hole_rate", "mmd",
                "mmd_stderr", "active_units", "fd_prior", "fd_aggregate", "class_entropy_prior"):
        assert key in metrics, key
    assert metrics["kl"] == pytest.approx(metrics["mutual_info"] + metrics["marginal_kl"])
    for space in ("latent", "feature"):
        for key in ("precision", "recall", "density", "coverage", "c2st_auc", "c2st_acc"):
            value = metrics[f"{space}_{key}"]
            assert value >= 0 and (key == "density" or value <= 1), (space, key, value)
    for name in ("samples", "latent_atlas", "log_q_histogram", "hole_scores"):
        assert (run / "figures" / f"{name}.png").is_file()

    # without --json: a summary a person reads, each metric with its better direction; and
    # evaluating again says nothing about TensorBoard's existing embedding folder
    code, out, err = main_out(capsys, "evaluate", run, "--iw-samples", "30", "--quiet")
    assert code == 0, err
    assert not out.lstrip().startswith("{")
    assert "hole rate ↓" in out and "(p = q: 1.0%)" in out
    assert f"{100 * metrics['hole_rate']:.1f}%" in out
    assert "metrics.json" in out
    assert "Embedding dir exists" not in out + err
    # the Projector of a 2-d latent: a third column of zeros, named in the tag
    pbtxt = (run / "projector_config.pbtxt").read_text()
    assert "test_posterior_means_2d_plus_zero_column" in pbtxt
    tensors = next(run.glob("*/test_posterior_means_2d_plus_zero_column/tensors.tsv"))
    rows = [line.split("\t") for line in tensors.read_text().splitlines()]
    assert len(rows) == 300 and {len(r) for r in rows} == {3} and {float(r[2]) for r in rows} == {0}

    from PIL import Image
    for source in (["--source", "prior"], ["--source", "aggregate"],
                   ["--source", "posterior", "--index", "3"]):
        png = tmp_path / f"samples-{source[1]}.png"
        code, out, err = main_out(capsys, "sample", run, "--n", "16", "--out", png, *source)
        assert code == 0, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert source[1] in out or "posterior of test image 3" in out
        # 4 x 4 digits of 8 px with 1 px gaps, drawn at 4x: (4 * 9 + 1) * 4 = 148 px
        image = Image.open(png).convert("RGB")
        width = 148 + (13 * 4 if source[1] == "posterior" else 0)  # + the framed test image
        assert image.size == (width, 148), (source, image.size)
        assert f"{image.size[0]}x{image.size[1]} pixels" in out
        red = image.getpixel((5, 5))  # the frame around the test image the samples are of
        assert (red == (255, 0, 0)) == (source[1] == "posterior"), (source, red)
    png = tmp_path / "scale1.png"
    assert main_out(capsys, "sample", run, "--n", "16", "--out", png, "--scale", "1")[0] == 0
    assert Image.open(png).size == (37, 37)
    bad = run_cli("sample", str(run), "--out", str(tmp_path / "x.png"), "--source", "posterior",
                  check=False)
    assert bad.returncode == 2 and "needs --index" in bad.stderr

    vae = load_run(run)
    assert not vae.training
    mu, logvar = vae.encode(torch.rand(3, 1, 8, 8))
    assert mu.shape == (3, 2) and logvar.shape == (3, 2)
    assert vae.decode(mu).shape == (3, 1, 8, 8)
    assert vae.prior.log_prob(mu).shape == (3,) and vae.prior.sample(5).shape == (5, 2)


def test_help_lists_every_command_and_every_option_has_help():
    from priorvae.cli import build_parser

    parser = build_parser()
    text = parser.format_help()
    assert "``" not in text  # no reStructuredText markup in what a person reads
    commands = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    assert set(commands.choices) == {"train", "evaluate", "compare", "sample", "fit-prior",
                                     "priors", "list"}
    for name, sub in commands.choices.items():
        assert name in parser.description, name
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)
        assert "``" not in sub.format_help(), name


def test_sample_canvas_scale_and_condition():
    from priorvae.cli import auto_scale, sample_canvas

    assert (auto_scale(8), auto_scale(28), auto_scale(64)) == (4, 2, 1)
    images = torch.rand(6, 1, 8, 8)
    canvas = sample_canvas(images, nrow=3, scale=2)
    assert canvas.shape == (3, (2 * 9 + 1) * 2, (3 * 9 + 1) * 2)
    framed = sample_canvas(images, nrow=3, scale=2, condition=torch.zeros(1, 8, 8))
    assert framed.shape[2] == canvas.shape[2] + 13 * 2
    assert framed[:, 2, 2].tolist() == [1.0, 0.0, 0.0]  # red frame


def test_vector_rows_shade_each_value_on_one_scale():
    """`sample` on vector data (N, D): one row of D grey cells per item, the condition on the
    same scale (it once tried to unpack (D,) as (C, H, W) and crashed)."""
    from priorvae.cli import sample_canvas, vector_rows

    vectors = torch.linspace(-3, 5, 40).reshape(8, 5)
    images, condition, (low, high) = vector_rows(vectors, vectors[2])
    assert images.shape == (8, 1, 1, 5) and condition.shape == (1, 1, 5)
    assert torch.equal(condition, images[2])  # the same scale
    assert low < high and images.min() >= 0 and images.max() <= 1
    assert images[0, 0, 0, 0] < images[-1, 0, 0, -1]  # larger values are lighter
    canvas = sample_canvas(images, nrow=1, scale=2, condition=condition)
    assert canvas.shape[0] == 3 and canvas.shape[1] >= 8 * 2 * 2


def test_priors_command_lists_the_registry():
    out = run_cli("priors")
    # the registry as a fresh process sees it (this test session may have registered more)
    fresh = subprocess.run([sys.executable, "-c", "from priorvae.priors import list_priors; "
                            "print(' '.join(list_priors()))"], capture_output=True, text=True,
                           check=True, timeout=300)
    assert out.stdout.split() == fresh.stdout.split()
    assert set(out.stdout.split()) <= set(list_priors())
    assert {"flow", "mog", "standard_normal", "vampprior"} <= set(out.stdout.split())


@pytest.mark.parametrize("args, message", [
    (["--set", "train.epoch=3"], "unknown key 'epoch' in [train]"),
    (["--set", "prior.name=vamprior"], "Did you mean: vampprior"),
    (["--set", "prior.n_components=3"], "prior 'standard_normal' got unknown argument"),
    (["--set", "data.name=cifar"], "unknown data set 'cifar'. Known data sets: cifar10"),
    (["--set", "prior.name=mog", "--set", "prior.n_componets=5"], "n_components"),
])
def test_bad_input_gives_one_clear_error(tmp_path, args, message):
    config = tiny_toml(tmp_path / "c.toml")
    proc = run_cli("train", str(config), "--out", str(tmp_path / "r"), *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # checked before anything is written: the corrected command then works in the same folder
    assert not (tmp_path / "r").exists()


def test_custom_prior_from_file_trains_through_the_cli(tmp_path, capsys):
    (tmp_path / "student_t.py").write_text(textwrap.dedent('''
        """Student-t prior with learnable degrees of freedom."""
        import torch
        from torch import nn
        from priorvae.priors import Prior

        class StudentT(Prior):
            def __init__(self, latent_dim, df: float = 5.0):
                super().__init__(latent_dim)
                self.log_df = nn.Parameter(torch.tensor(float(df)).log())

            def _dist(self):
                return torch.distributions.StudentT(self.log_df.exp())

            def _log_prob(self, z):
                return self._dist().log_prob(z).sum(-1)

            def _sample(self, n):
                return self._dist().sample((n, self.latent_dim))
    '''))
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 3})
    run = tmp_path / "run"
    spec = f"{tmp_path / 'student_t.py'}:StudentT"
    assert main(["train", str(config), "--out", str(run), "--quiet",
                 "--set", f'prior.name="{spec}"', "--set", "prior.df=3.0"]) == 0
    assert main(["evaluate", str(run), "--iw-samples", "10", "--quiet"]) == 0
    vae = load_run(run)
    assert type(vae.prior).__name__ == "StudentT"
    assert vae.prior.log_df.exp().item() != pytest.approx(3.0)  # it was learned


@pytest.mark.parametrize("name", list_priors())
def test_quickstart_trains_and_evaluates_every_prior(name, tmp_path):
    """Jointly where the prior allows it, else fitted ex-post to a standard-normal run."""
    from priorvae.registry import get_prior_class

    run = tmp_path / name
    joint = get_prior_class(name).joint
    assert main(["train", str(REPO / "experiments" / "quickstart.toml"), "--out", str(run),
                 "--quiet", "--set", f"prior.name={name if joint else 'standard_normal'}",
                 "--set", "train.epochs=2"]) == 0
    if joint:
        assert main(["evaluate", str(run), "--iw-samples", "10", "--quiet"]) == 0
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["prior"] == name and metrics["test_nll"] > 0
        return
    small = [a for k, v in TEST_ARGS.get(name, {}).items() for a in ("--set", f"prior.{k}={v}")]
    assert main(["fit-prior", str(run), "--prior", name, "--epochs", "2", "--quiet",
                 *small]) == 0
    assert main(["evaluate", str(run), "--iw-samples", "10", "--quiet", "--prior-source",
                 f"expost-{name}"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())["prior_sources"][f"expost-{name}"]
    assert metrics["test_nll"] > 0 and metrics["iw_samples"] == 10


def test_a_warning_is_one_line_naming_the_command():
    """A warning raised under a command (a broken plug-in, torch) printed file:line and a line
    of source; main() prints it as one line like priorvae's own, and restores the format."""
    import warnings

    from priorvae.cli import _warning_lines

    before = warnings.formatwarning
    message = warnings.WarningMessage("plug-in 'x' could not be\nloaded", UserWarning, "f.py", 3)
    with _warning_lines("list"):  # what main() runs every command in
        text = warnings._formatwarnmsg(message)  # what printing a warning writes
    assert text == "priorvae list: warning: plug-in 'x' could not be loaded\n"
    assert warnings.formatwarning is before and "f.py:3" in warnings._formatwarnmsg(message)
