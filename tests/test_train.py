import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import read_metrics, tiny_toml
from priorvae.config import load_config
from priorvae.errors import ConfigError, RunError, TrainingError
from priorvae.runs import load_checkpoint
from priorvae.train import beta_at, train
from priorvae.vae import VAE


def test_beta_warmup_schedule():
    assert [beta_at(e, 4) for e in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert beta_at(1, 0) == 1.0


def test_a_few_epochs_lower_the_validation_loss(tmp_path):
    cfg = load_config(tiny_toml(tmp_path / "c.toml", train={"epochs": 12}))
    metrics = train(cfg, tmp_path / "run", progress=False)
    hist = load_checkpoint(tmp_path / "run" / "last.pt")["history"]
    assert metrics["status"] == "finished" and len(hist) == 12
    assert hist[-1]["val_elbo"] > hist[0]["val_elbo"] + 5  # nats
    assert metrics["best_val_elbo"] == max(h["val_elbo"] for h in hist)
    mode = (tmp_path / "run" / "last.pt").stat().st_mode & 0o777
    assert mode & 0o044 or os.umask(os.umask(0)) & 0o044, "checkpoints follow the umask"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "val/loss", "val/elbo", "train/kl", "train/beta", "train/lr"):
        assert tag in tags["scalars"], tag
        assert len(events.Scalars(tag)) == 12
    assert {"images/reconstructions", "images/prior_samples"} <= set(tags["images"])
    for tag in ("diagnostics/hole_rate", "diagnostics/marginal_kl", "diagnostics/fd_prior",
                "diagnostics/latent_precision", "diagnostics/latent_c2st_auc",
                "diagnostics/feature_coverage"):
        assert [e.step for e in events.Scalars(tag)] == [10, 12]  # every 10 and the last
    assert events.Images("images/prior_samples")[0].width >= 256  # 8x8 digits enlarged
    assert any("config" in t for t in tags["tensors"])


def test_early_stopping_waits_for_warmup(tmp_path, monkeypatch):
    # validation peaks at epoch 1 and never improves again: with warm-up 3 and patience 2 the
    # counter starts at epoch 4, so training stops after epoch 5 (not 3), keeping epoch 1
    import priorvae.train as train_module

    epochs_seen = []

    def scripted(model, x, batch_size=1000):
        epochs_seen.append(len(epochs_seen) + 1)
        elbo = -100.0 if len(epochs_seen) == 1 else -200.0
        return {"elbo": elbo, "recon": elbo, "kl": 0.0}

    monkeypatch.setattr(train_module, "mean_elbo", scripted)
    cfg = load_config(tiny_toml(tmp_path / "c.toml", train={
        "epochs": 20, "warmup_epochs": 3, "patience": 2}))
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert metrics["status"] == "early_stopped"
    assert metrics["epochs_trained"] == 5 and metrics["best_epoch"] == 1
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 1


def _wait_for_epoch(run_dir, epoch, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if read_metrics(run_dir).get("epochs_trained", 0) >= epoch:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("training did not reach the epoch in time")


def test_kill_and_resume_continues_from_checkpoint(tmp_path):
    config = tiny_toml(tmp_path / "c.toml", prior={"name": "mog", "n_components": 3},
                       train={"epochs": 40, "seed": 3})
    cfg = load_config(config)
    train(cfg, tmp_path / "straight", progress=False)

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "priorvae", "train", str(config), "--out",
                             str(run), "--quiet"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_epoch(run, 5, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = load_checkpoint(run / "last.pt")["epoch"]
    assert 5 <= killed_at < 40, "the kill should land mid-training"
    assert read_metrics(run)["status"] == "running"

    metrics = train(cfg, run, progress=False)
    assert metrics["status"] == "finished" and metrics["epochs_trained"] == 40
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert len(b["history"]) == 40
    # RNG state travels with the checkpoint: the resumed run equals the uninterrupted one
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_finished_run_says_so_and_different_config_is_refused(tmp_path, capsys):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 2})
    train(load_config(config), tmp_path / "run", progress=False)
    train(load_config(config), tmp_path / "run", progress=False)
    assert "already finished" in capsys.readouterr().out
    with pytest.raises(RunError, match=r"\[train\] epochs: 2 in the run, 5 now"):
        train(load_config(config, ["train.epochs=5"]), tmp_path / "run", progress=False)


def test_non_finite_loss_stops_cleanly(tmp_path, monkeypatch):
    cfg = load_config(tiny_toml(tmp_path / "c.toml", train={"epochs": 5}))
    forward = VAE.forward
    calls = {"n": 0}
    steps_per_epoch = 13  # 1297 digits / batch 100

    def poisoned(self, x):
        terms = forward(self, x)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2 * steps_per_epoch + 4:  # epoch 3, step 4
                terms["recon"] = terms["recon"] * float("nan")
        return terms

    monkeypatch.setattr(VAE, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"epoch 3, step 4.*last.pt \(epoch 2, the last epoch "
                                            r"whose loss and validation ELBO were finite\)"):
        train(cfg, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert read_metrics(tmp_path / "run")["status"] == "failed"


def test_adam_norm_grad_scales_each_gradient_to_unit_norm():
    from priorvae.train import normalize_gradients

    layer = torch.nn.Linear(5, 3)
    (layer(torch.randn(7, 5)) ** 2).sum().mul(100).backward()
    before = [p.grad.clone() for p in layer.parameters()]
    normalize_gradients(list(layer.parameters()))
    for p, g in zip(layer.parameters(), before, strict=True):
        assert torch.allclose(p.grad.norm(), torch.tensor(1.0), atol=1e-6)
        assert torch.allclose(p.grad, g / g.norm(), atol=1e-6)  # direction kept


def test_grad_norm_option_trains_and_bad_values_are_refused(tmp_path):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 6, "grad_norm": "unit",
                                                   "diagnostics_every": 0})
    train(load_config(config), tmp_path / "run", progress=False)
    history = load_checkpoint(tmp_path / "run" / "last.pt")["history"]
    assert history[-1]["val_elbo"] > history[0]["val_elbo"] + 3
    with pytest.raises(ConfigError, match="grad_norm must be one of 'none', 'unit'"):
        train(load_config(config, ["train.grad_norm=clip"]), tmp_path / "bad", progress=False)


@pytest.mark.parametrize("prior", [{"name": "exemplar", "subset": 50},
                                   {"name": "vampprior", "n_components": 10},
                                   {"name": "flow", "num_layers": 2, "hidden_features": 16}])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, monkeypatch, prior):
    # the priors of the full-protocol grid: 4 epochs straight against 2 + interrupt + resume
    # give the same weights, Adam state and per-epoch metrics, to the last bit
    import priorvae.train as train_module

    cfg = load_config(tiny_toml(tmp_path / "c.toml", prior=prior, train={
        "epochs": 4, "seed": 5, "image_every": 3, "diagnostics_every": 0}))
    train(cfg, tmp_path / "straight", progress=False)

    end_of_epoch = train_module._end_of_epoch

    def interrupt_after_two(run, cfg, writer, model, opt, splits, classifier, device, env,
                            state, row, **kwargs):
        end_of_epoch(run, cfg, writer, model, opt, splits, classifier, device, env, state, row,
                     **kwargs)
        if state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_end_of_epoch", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_module, "_end_of_epoch", end_of_epoch)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    assert train(cfg, tmp_path / "resumed", progress=False)["status"] == "finished"

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    drop = {"seconds"}  # wall time is the one thing allowed to differ
    assert ([{k: v for k, v in row.items() if k not in drop} for row in a["history"]]
            == [{k: v for k, v in row.items() if k not in drop} for row in b["history"]])
    assert (a["best_val"], a["best_epoch"]) == (b["best_val"], b["best_epoch"])
