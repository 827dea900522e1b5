"""priorvae and pythae side by side, alternating in one run (A B A B ...), medians and ratios.

Same environment (pythae installed beside priorvae, so one torch build), same MNIST split
(first 50,000 training images; pythae gets them binarized once, priorvae binarizes per batch),
same architecture and initial weights (MLP 784-300-300-40, ReLU, Hardtanh log-variance, wrapped
for pythae as its BaseEncoder/BaseDecoder), Bernoulli likelihood, batch 100, Adam 5e-4, same
number of threads. Measures:

- ``train_epoch``: seconds per training epoch (pythae: ``BaseTrainer.train_step``, its epoch
  loop; priorvae: the loop of ``priorvae.train``), standard prior and VampPrior (500
  pseudo-inputs); priorvae eager and, with ``--compile``, torch.compile'd, with ``--bf16``
  under bf16 autocast (not the same arithmetic: reported apart). A first round warms up.
- ``test_nll``: seconds for the IWAE NLL of 1,000 test images with K = 500 (pythae:
  ``model.get_nll``), both models holding the same weights, with both values.
- ``expost_gmm``: seconds to fit a 10-component GMM to the 50,000 training codes (pythae:
  ``GaussianMixtureSampler.fit``, scikit-learn, full covariances; priorvae: EM on the device,
  diagonal covariances, as ``priorvae fit-prior --prior mog``), encoding included.

Installs nothing; needs ``pip install pythae`` in the same environment. One JSON line per
measurement. Never downloads: MNIST from $PRIORVAE_DATA or ../shared/data.

    python benchmarks/pythae_side_by_side.py [--reps 5] [--threads 2] [--compile] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from priorvae.config import load_config
from priorvae.data import load_splits
from priorvae.expost import em_fit_mog
from priorvae.likelihoods import build_likelihood, prepare_splits
from priorvae.measure import mean_iwae_nll
from priorvae.registry import build_prior
from priorvae.train import make_optimizer, train_epoch
from priorvae.vae import build_vae

REPO = Path(__file__).resolve().parents[1]


def _pythae():
    try:
        import pythae  # noqa: F401
    except ImportError:
        raise SystemExit("pythae is not installed here: pip install pythae (see "
                         "benchmarks/README.md)") from None
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            mu, logvar = self.net(x)
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    return Encoder, Decoder


def build_pair(prior: str, splits, root: str):
    """(priorvae VAE, pythae model) with identical architecture and initial weights."""
    from pythae.models import VAE, VAMP, VAEConfig, VAMPConfig

    Encoder, Decoder = _pythae()
    cfg = load_config(REPO / "experiments" / "mnist.toml", [
        f"data.root={json.dumps(root)}", "data.download=false", "model.activation=\"relu\"",
        f"prior.name={prior}"])
    torch.manual_seed(0)
    ours = build_vae(cfg, splits.input_shape, data=splits.x_train)
    common = dict(input_dim=tuple(splits.input_shape), latent_dim=cfg.model.latent_dim,
                  reconstruction_loss="bce")
    enc, dec = Encoder(copy.deepcopy(ours.encoder)), Decoder(copy.deepcopy(ours.decoder))
    if prior == "vampprior":
        theirs = VAMP(VAMPConfig(**common, number_components=ours.prior.n_components),
                      encoder=enc, decoder=dec)
    else:
        theirs = VAE(VAEConfig(**common), encoder=enc, decoder=dec)
    copy_weights(ours, theirs)
    return cfg, ours, theirs


@torch.no_grad()
def copy_weights(ours, theirs) -> None:
    """Our encoder/decoder (and pseudo-inputs) into the pythae model."""
    theirs.encoder.net.load_state_dict(ours.encoder.state_dict())
    theirs.decoder.net.load_state_dict(ours.decoder.state_dict())
    if hasattr(theirs, "pseudo_inputs"):  # pythae: hardtanh(Linear(e_k)), ours hardtanh(W_k)
        linear = theirs.pseudo_inputs[0]
        linear.weight.copy_(ours.prior.pseudo.reshape(ours.prior.n_components, -1).T)
        linear.bias.zero_()


def pythae_trainer(model, x_binary, out_dir):
    from pythae.data.preprocessors import DataProcessor
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    config = BaseTrainerConfig(output_dir=out_dir, num_epochs=1, learning_rate=5e-4,
                               per_device_train_batch_size=100, no_cuda=True)
    trainer = BaseTrainer(model, train_dataset=DataProcessor().to_dataset(x_binary),
                          training_config=config)
    trainer.prepare_training()
    return trainer


def our_epoch(model, opt, forward, splits, epoch: int, cfg, autocast: bool = False) -> float:
    """One epoch of priorvae's own training loop (:func:`priorvae.train.train_epoch`, beta 1,
    batch 100); returns the mean loss."""
    tc = replace(cfg.train, warmup_epochs=0, seed=0, batch_size=100, grad_norm="none",
                 precision="bf16" if autocast else "float32")
    return train_epoch(model, opt, splits.x_train, epoch, replace(cfg, train=tc),
                       forward=forward)["loss"]


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def report(bench: str, prior: str, times: dict, extra: dict | None = None) -> None:
    """One JSON line: medians per contender and pythae's median / each other median."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    line = {"bench": bench, "prior": prior, "threads": torch.get_num_threads(),
            **{f"{name}_s": round(v, 3) for name, v in med.items()},
            **{f"{name}_runs_s": [round(t, 3) for t in ts] for name, ts in times.items()}}
    for name, v in med.items():
        if name != "pythae":
            line[f"speedup_{name}"] = round(med["pythae"] / v, 2)
    print(json.dumps({**line, **(extra or {})}), flush=True)


def bench_train(prior, splits, root, reps, compile_, bf16, tmp):
    cfg, ours, theirs = build_pair(prior, splits, root)
    x_binary = torch.bernoulli(splits.x_train, generator=torch.Generator().manual_seed(0))
    trainer = pythae_trainer(theirs, x_binary, tmp)
    opt = make_optimizer(ours.parameters(), cfg.train.lr)
    contenders = {"pythae": lambda e: trainer.train_step(e),
                  "priorvae": lambda e: our_epoch(ours, opt, ours, splits, e, cfg)}
    if bf16:  # the same step under bf16 autocast: matrix products in bf16, the rest float32
        twin16 = copy.deepcopy(ours)
        opt16 = make_optimizer(twin16.parameters(), cfg.train.lr)
        contenders["priorvae_bf16"] = lambda e: our_epoch(twin16, opt16, twin16, splits, e,
                                                          cfg, autocast=True)
    if compile_:
        twin = copy.deepcopy(ours)
        twin_opt = make_optimizer(twin.parameters(), cfg.train.lr)
        compiled = torch.compile(twin, dynamic=False)
        t_compile, _ = timed(lambda: our_epoch(twin, twin_opt, compiled, splits, 0, cfg))
        contenders["priorvae_compiled"] = lambda e: our_epoch(twin, twin_opt, compiled, splits,
                                                              e, cfg)
    times = {name: [] for name in contenders}
    for rep in range(reps + 1):  # A B A B: each contender once per round, same order
        for name, fn in contenders.items():  # round 0 warms up and is not counted
            t = timed(lambda fn=fn, rep=rep: fn(rep + 1))[0]
            if rep > 0:
                times[name].append(t)
    extra = {"images_per_epoch": len(splits.x_train)}
    if compile_:
        extra["compile_and_first_epoch_s"] = round(t_compile, 1)
    report("train_epoch", prior, times, extra)
    return ours, theirs


def bench_nll(prior, ours, theirs, splits, reps, n_images, k):
    copy_weights(ours, theirs)
    ours.eval()
    theirs.eval()
    x = splits.x_test[:n_images]
    values = {"pythae": [], "priorvae": []}
    times = {"pythae": [], "priorvae": []}

    def run_pythae():
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            return -float(theirs.get_nll(x, n_samples=k, batch_size=100))

    for _ in range(reps):
        for name, fn in (("pythae", run_pythae), ("priorvae", lambda: mean_iwae_nll(ours, x, k))):
            t, v = timed(fn)
            times[name].append(t)
            values[name].append(v)
    from full_test_nll import decoder_matmul_seconds  # beside this script

    floor = decoder_matmul_seconds(ours, n_images * k, ours.prior.latent_dim)
    report("test_nll", prior, times, {
        "decoder_matmul_floor_s": round(floor, 3),
        "max_speedup_at_floor": round(statistics.median(times["pythae"]) / floor, 2),
        "images": n_images, "k": k,
        "nll_pythae": round(statistics.mean(values["pythae"]), 3),
        "nll_priorvae": round(statistics.mean(values["priorvae"]), 3),
        "nll_diff": round(statistics.mean(values["pythae"]) - statistics.mean(values["priorvae"]),
                          3)})


def bench_gmm(ours, theirs, splits, reps):
    from pythae.samplers import GaussianMixtureSampler, GaussianMixtureSamplerConfig

    from priorvae.aggregate import encode_split

    copy_weights(ours, theirs)
    ours.eval()
    theirs.eval()
    x_binary = torch.bernoulli(splits.x_train, generator=torch.Generator().manual_seed(0))
    holdout = splits.x_val[:10_000]

    def run_pythae():
        sampler = GaussianMixtureSampler(theirs, GaussianMixtureSamplerConfig(n_components=10))
        sampler.fit(x_binary)
        return sampler

    def run_ours():
        mu, logvar = encode_split(ours.encoder, x_binary)
        mu_v, logvar_v = encode_split(ours.encoder, holdout)
        prior = build_prior("mog", latent_dim=mu.shape[1], n_components=10)
        z_val = mu_v + torch.exp(0.5 * logvar_v) * torch.randn_like(mu_v)
        return em_fit_mog(prior, mu, logvar, z_val)

    times = {"pythae": [], "priorvae": []}
    iters = []
    for _ in range(reps):
        t, _ = timed(run_pythae)
        times["pythae"].append(t)
        t, history = timed(run_ours)
        times["priorvae"].append(t)
        iters.append(len(history))
    report("expost_gmm", "standard_normal", times, {
        "codes": len(x_binary), "components": 10, "priorvae_em_iterations": iters,
        "note": "pythae: sklearn full covariances; priorvae: diagonal EM"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="rounds of A B per measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--priors", nargs="+", default=["standard_normal", "vampprior"])
    p.add_argument("--compile", action="store_true", help="also time priorvae torch.compile'd")
    p.add_argument("--bf16", action="store_true", help="also time priorvae with bf16 autocast")
    p.add_argument("--nll-images", type=int, default=1000)
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "nll", "gmm"])
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("pythae").setLevel(logging.ERROR)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("pythae"):
            logging.getLogger(name).setLevel(logging.ERROR)
    root = os.environ.get("PRIORVAE_DATA", str(REPO.parent / "shared" / "data"))
    splits = load_splits("mnist", root, False)
    splits = prepare_splits(splits, build_likelihood("bernoulli", splits.input_shape))
    _pythae()
    with tempfile.TemporaryDirectory() as tmp:
        for prior in args.priors:
            if "train" in args.skip:
                _, ours, theirs = build_pair(prior, splits, root)
            else:
                ours, theirs = bench_train(prior, splits, root, args.reps, args.compile, args.bf16,
                                           tmp)
            if "nll" not in args.skip:
                bench_nll(prior, ours, theirs, splits, max(2, math.ceil(args.reps / 2)),
                          args.nll_images, args.k)
            if prior == "standard_normal" and "gmm" not in args.skip:
                bench_gmm(ours, theirs, splits, args.reps)


if __name__ == "__main__":
    main()
