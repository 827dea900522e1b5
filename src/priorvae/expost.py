"""Ex-post priors: fit a density to the aggregated posterior of a trained VAE.

The second remedy for prior holes (Dai & Wipf 2019; Ghosh et al. 2020): leave the trained
encoder and decoder alone and fit p(z) to codes z ~ q(z|x) of the training images afterwards,
by maximum likelihood. Any learnable prior of the registry serves (``mog``, ``flow``, a custom
one); ``mog`` can also use EM. A prior may bring its own objective (``fit_loss``: the
diffusion prior trains by denoising score matching; the others by maximum likelihood, a prior
made of training images by leave-one-out likelihood). Every epoch draws fresh codes
z = mu + sigma * eps from the (frozen) posteriors; codes of the validation images (one fixed
draw) give early stopping, on the objective with its noise fixed.

The fitted prior is saved as ``RUN_DIR/priors/LABEL.toml`` (its name and arguments, data) and
``RUN_DIR/priors/LABEL.pt`` (its weights; default label ``expost-NAME``) and becomes a *prior
source* of the run, next to ``trained`` (the prior learned with the VAE) and
``aggregate`` (the aggregated posterior itself, which needs no fitting). The VAE's weights are
never changed.

References:
    | Diagnosing and Enhancing VAE Models (Dai & Wipf, 2019) https://arxiv.org/abs/1903.05789
    | From Variational to Deterministic Autoencoders (Ghosh et al., 2020)
    | https://arxiv.org/abs/1903.12436
"""

from __future__ import annotations

import copy
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .aggregate import AggregatedPosterior, encode_split
from .config import dump_toml, tomllib
from .data import input_shape, load_splits
from .datasets import check_same_data
from .errors import PriorError, RunError
from .gaussian import component_log_probs
from .likelihoods import prepare_splits
from .priors import PRIORS, Prior, PriorContext, build_prior, get_prior_class
from .runs import (
    AGGREGATE,
    EXPOST_PREFIX,
    PRIORS_DIR,
    TRAINED,
    Run,
    atomic_write_bytes,
    load_checkpoint,
    load_weights,
    read_regular,
    resolve_device,
    save_checkpoint,
)
from .stop import check_stop
from .trust import file_sha256, reading_folder

__all__ = ["fit_prior", "em_fit_mog", "fit_record", "load_prior_source", "prior_sources"]

FIT_DEFAULTS = {"epochs": 100, "batch_size": 1000, "lr": 1e-3, "patience": 10}
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def _frozen(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module)
    module.requires_grad_(False)
    return module.eval()


def _draw(mu: torch.Tensor, logvar: torch.Tensor, generator=None) -> torch.Tensor:
    eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + torch.exp(0.5 * logvar) * eps


@torch.no_grad()
def _mean_nll(prior, z: torch.Tensor, batch: int = 10_000) -> float:
    return -sum(prior.log_prob(z[i:i + batch]).sum().item()
                for i in range(0, len(z), batch)) / len(z)


@torch.no_grad()
def em_fit_mog(prior, mu: torch.Tensor, logvar: torch.Tensor, z_val: torch.Tensor,
               iterations: int = 200, patience: int = 10, var_floor: float = 1e-4,
               callback=None) -> list[dict]:
    """Fit a ``mog`` prior by EM to fresh code draws each iteration (diagonal components).

    Initialisation: means by k-means++ seeding on one draw of codes, variances at the codes'
    per-dimension variance, uniform weights. Keeps the iterate with the best validation
    log-likelihood.
    """
    k = prior.means.shape[0]
    z = _draw(mu, logvar)
    means = _kmeans_pp(z, k)
    var = z.var(0, keepdim=True).expand(k, -1).clone()
    log_w = torch.full((k,), -math.log(k), device=z.device, dtype=z.dtype)
    best, best_params, bad, history = math.inf, None, 0, []
    for it in range(1, iterations + 1):
        z = _draw(mu, logvar)
        stats_n = torch.zeros(k, device=z.device, dtype=torch.float64)
        stats_z = torch.zeros(k, z.shape[1], device=z.device, dtype=torch.float64)
        stats_zz = torch.zeros_like(stats_z)
        for start in range(0, len(z), 10_000):  # E-step in chunks, sufficient statistics
            zc = z[start:start + 10_000]
            r = torch.softmax(component_log_probs(zc, means, var.log(), log_w), dim=1).double()
            stats_n += r.sum(0)
            stats_z += r.T @ zc.double()
            stats_zz += r.T @ (zc.double() ** 2)
        nk = stats_n.clamp_min(1e-10)[:, None]
        means = (stats_z / nk).to(z.dtype)
        var = (stats_zz / nk - (stats_z / nk) ** 2).clamp_min(var_floor).to(z.dtype)
        log_w = torch.log(stats_n.clamp_min(1e-10) / stats_n.sum()).to(z.dtype)
        prior.means.copy_(means)
        prior.logvars.copy_(var.log())
        prior.logits.copy_(log_w)
        val = _mean_nll(prior, z_val)
        history.append({"iteration": it, "val_nll": val})
        if callback:
            callback(it, None, val)
        if val < best - 1e-4:
            best, bad = val, 0
            best_params = [t.clone() for t in (prior.means, prior.logvars, prior.logits)]
        else:
            bad += 1
            if bad >= patience:
                break
    if best_params is None:
        raise PriorError("no EM iteration gave a finite validation likelihood; nothing was saved")
    for t, v in zip((prior.means, prior.logvars, prior.logits), best_params, strict=True):
        t.copy_(v)
    return history


def _kmeans_pp(z: torch.Tensor, k: int, sample: int = 20_000) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each new center is drawn with
    probability proportional to the squared distance to the nearest chosen one."""
    if len(z) > sample:
        z = z[torch.randperm(len(z), device=z.device)[:sample]]
    centers = [z[torch.randint(len(z), (1,), device=z.device)]]
    dist = ((z - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        idx = torch.multinomial(dist.clamp_min(0) + 1e-12, 1)
        centers.append(z[idx])
        dist = torch.minimum(dist, ((z - z[idx]) ** 2).sum(1))
    return torch.cat(centers).clone()


def fit_prior(run_dir: str | Path, name: str, kwargs: dict[str, Any] | None = None,
              label: str | None = None, method: str = "auto", epochs: int | None = None,
              batch_size: int | None = None, lr: float | None = None,
              patience: int | None = None, device: str | None = None, seed: int = 0,
              progress: bool = True, trust_remote_code: bool = False,
              min_epochs: int | None = None) -> dict:
    """Fit the registered prior ``name`` to the run's aggregated posterior and save it.

    Returns:
        dict with ``label``, ``path``, ``val_loss`` (the objective per validation code),
        ``val_nll`` (nats per validation code; only where the objective is the likelihood: a
        diffusion prior's density costs an ODE solve per code), ``epochs``, ``method``,
        ``seconds``.

    ``epochs``, ``batch_size``, ``lr`` and ``patience`` left as None take the prior class's
    ``fit_defaults`` (a diffusion model needs far more steps than a mixture), else
    100, 1000, 1e-3 and 10. A gradient fit never stops before ``min_epochs`` (default: twice
    the patience, at least 20, at most ``epochs``) and counts its patience on the smoothed
    validation curve (:class:`_Stopper`), so noise cannot end it at its start. The result and
    the fit record say whether the fit beat its starting point (``improved``,
    ``start_val_loss``); one that did not keeps its starting point and prints a warning.
    """
    pinned, sha, kwargs = PRIORS.pin(name, kwargs)  # the user chose it here: pinned, recorded
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience}
    settings = {**FIT_DEFAULTS, **get_prior_class(pinned, sha).fit_defaults,
                **{k: v for k, v in given.items() if v is not None}}
    epochs, batch_size, lr, patience = (settings[k] for k in given)
    _check_positive(epochs=epochs, batch_size=batch_size)
    if min_epochs is None:
        min_epochs = settings.get("min_epochs")
    if min_epochs is None and isinstance(patience, int) and isinstance(epochs, int):
        min_epochs = min(epochs, max(2 * patience, 20))
    if isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or min_epochs < 0:
        raise PriorError(f"min_epochs must be an integer >= 0, got {min_epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
            or lr <= 0:
        raise PriorError(f"--lr must be a finite number > 0, got {lr!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise PriorError(f"--patience must be an integer >= 0, got {patience!r}")
    if method not in ("auto", "em", "gradient"):
        raise PriorError(f"--method must be auto, em or gradient, got {method!r}")
    name = pinned
    label = label or f"{EXPOST_PREFIX}{name.rpartition(':')[2]}"
    if label in (TRAINED, AGGREGATE) or not _LABEL.fullmatch(label):
        raise PriorError(f"--as {label!r}: a label is 1-64 letters, digits, '_', '.', '+', '-' "
                         f"(not starting with a symbol) and not 'trained' or 'aggregate'")
    if method == "auto":
        method = "em" if name == "mog" else "gradient"
    if method == "em" and name != "mog":
        raise PriorError(f"--method em is for the mog prior, not {name!r}")
    run = Run.open(run_dir, trust_remote_code)
    cfg = run.config
    with run.lock("fit-prior"):
        dev = resolve_device(device or cfg.train.device)
        best = run.load_checkpoint("best", dev)
        model = run.load_model("best", dev, best)
        fitted_to = file_sha256(run.checkpoint_path("best"))  # the VAE this prior belongs to
        splits = load_splits(cfg.data, device=dev)
        check_same_data(best.get("data_sha256"), splits.digest(), run.checkpoint_path("best"))
        splits = prepare_splits(splits, model.likelihood)
        torch.manual_seed(seed)
        context = PriorContext(encoder=_frozen(model.encoder), input_shape=splits.input_shape,
                               likelihood=model.likelihood,
                               data=splits.x_train)
        prior = build_prior(name, latent_dim=cfg.model.latent_dim, context=context,
                            file_sha256=sha, **kwargs).to(dev)
        params = [p for p in prior.parameters() if p.requires_grad]
        if not params:
            raise PriorError(f"prior {name!r} has nothing to fit (no learnable parameters); use "
                             f"it as it is, or fit a learnable prior such as mog or flow")
        mu_tr, lv_tr = encode_split(model.encoder, splits.x_train, likelihood=model.likelihood)
        mu_va, lv_va = encode_split(model.encoder, splits.x_val)
        z_val = _draw(mu_va, lv_va, torch.Generator(device=dev).manual_seed(seed + 1))
        spec_path, weights_path = run.prior_source_files(label)
        t0 = time.perf_counter()
        with run.tensorboard(f"{PRIORS_DIR}/{label}") as writer, \
                tqdm(total=epochs, desc=f"fit {label} ({method})", disable=not progress,
                     dynamic_ncols=True) as bar:

            def log(step, train_loss, val_loss):
                if not math.isfinite(val_loss):  # every epoch is checked: a diverged fit stops
                    raise PriorError(f"non-finite validation loss ({val_loss}) while fitting "
                                     f"{label}, epoch {step}; nothing was saved. Try a lower "
                                     f"--lr or other --set arguments")
                check_stop()  # SIGTERM: stop between epochs; nothing of this fit is saved
                if train_loss is not None:
                    writer.add_scalar("fit/train_loss", train_loss, step)
                writer.add_scalar("fit/val_loss", val_loss, step)
                bar.update(1)
                bar.set_postfix(val_loss=f"{val_loss:.3f}")

            start = _val_loss(prior.eval(), z_val)  # the prior as built: the starting point
            start_state = copy.deepcopy(prior.state_dict())
            if method == "em":
                history = em_fit_mog(prior, mu_tr, lv_tr, z_val, iterations=epochs,
                                     patience=patience, callback=log)
            else:
                history, stopper = _gradient_fit(prior, params, mu_tr, lv_tr, z_val, epochs,
                                                 batch_size, lr, patience, log, min_epochs,
                                                 start)
        val_loss = _val_loss(prior, z_val)
        if not math.isfinite(val_loss):
            raise PriorError(f"the fitted {label} has a non-finite validation loss "
                             f"({val_loss}); nothing was saved")
        improved = val_loss < start - 1e-4 if method == "em" else stopper.improved
        if not improved:  # no progress beyond noise (a lucky epoch is none): kept as it started
            prior.load_state_dict(start_state)
            val_loss = _val_loss(prior.eval(), z_val)
        scores = {"val_loss": val_loss, "start_val_loss": start, "improved": improved}
        if _likelihood_objective(prior):
            scores["val_nll"] = val_loss
        # weights first, then the spec that makes the source visible: never a spec without
        # its weights
        seconds = time.perf_counter() - t0
        save_checkpoint(weights_path, {"state_dict": prior.state_dict(), "method": method,
                                       **scores, "history": history})
        # what the fit cost goes beside its spec (data, read without loading the weights): an
        # ex-post remedy's price is this plus the VAE's training
        spec = {"prior": {"name": name, "file_sha256": sha}, "kwargs": kwargs,
                "fit": {"seconds": round(seconds, 3), "epochs": len(history), "method": method,
                        "device": str(dev), "min_epochs": min_epochs, "patience": patience,
                        "start_val_loss": start, "val_loss": val_loss,
                        "improved": improved, "fitted_to": fitted_to}}
        atomic_write_bytes(spec_path, dump_toml(spec).encode())
    if not improved:
        print(f"fit-prior: {label} did not improve on its starting point (validation loss "
              f"{start:.4f} at the start, {val_loss:.4f} at the end, {len(history)} epochs); "
              f"it is kept as it started: try more --epochs, another --lr or --patience",
              file=sys.stderr, flush=True)
    return {"label": label, "path": str(weights_path), **scores, "epochs": len(history),
            "method": method, "seconds": seconds}


def _check_positive(**values) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PriorError(f"--{key.replace('_', '-')} must be a positive integer, "
                             f"got {value!r}")


class _Stopper:
    """Early stopping of an ex-post fit that does not end it on noise.

    The validation loss of a fit is noisy (fresh code draws every epoch, a stochastic
    objective), so a run of ``patience`` epochs is counted against the *smoothed* curve (the
    running median of the last ``window`` validation losses, counted once the window is full:
    one lucky epoch cannot set the bar), no fit stops before ``min_epochs``, and none while
    single epochs still set new bests (the median lags a descent by half a window: a fit
    that oscillated and is descending again must not stop at its new best).
    The state kept is the best single validation loss, starting from the prior as it was
    built (a fit that never beats it keeps it); ``improved`` says whether the smoothed curve
    ever went below the starting point, so a lucky epoch does not count as progress.
    """

    def __init__(self, start: float, patience: int, min_epochs: int, window: int = 5,
                 tol: float = 1e-4):
        self.start, self.best, self.patience, self.min_epochs = start, start, patience, min_epochs
        self.window, self.tol, self.recent = window, tol, []
        self.best_smooth, self.bad, self.since_best = math.inf, 0, 0

    def step(self, epoch: int, val: float) -> tuple[bool, bool]:
        """(this epoch is the best so far, stop now)."""
        better = val < self.best - self.tol
        if better:
            self.best, self.since_best = val, 0
        else:
            self.since_best += 1
        self.recent = (self.recent + [val])[-self.window:]
        if len(self.recent) < self.window:
            return better, False
        smooth = sorted(self.recent)[self.window // 2]
        if smooth < self.best_smooth - self.tol:
            self.best_smooth, self.bad = smooth, 0
        else:
            self.bad += 1
        return better, (epoch >= self.min_epochs and self.bad >= self.patience
                        and self.since_best >= self.patience)

    @property
    def improved(self) -> bool:
        """Whether the smoothed curve went below the starting point (the best single epoch
        when the fit was shorter than the window)."""
        best = self.best_smooth if math.isfinite(self.best_smooth) else self.best
        return best < self.start - self.tol


def _gradient_fit(prior, params, mu, logvar, z_val, epochs, batch_size, lr, patience, log,
                  min_epochs: int = 0, start: float | None = None):
    """Adam on ``fit_loss`` over fresh code draws; returns (history, the :class:`_Stopper`).
    ``start``: the validation loss of the prior as it is now (computed when None)."""
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    prior.eval()
    stopper = _Stopper(_val_loss(prior, z_val) if start is None else start, patience,
                       min_epochs)
    best_state = copy.deepcopy(prior.state_dict())  # the starting point, until beaten
    prior.train()
    for epoch in range(1, epochs + 1):
        z = _draw(mu, logvar)  # fresh codes every epoch
        total = 0.0
        for idx in torch.randperm(len(z), device=z.device).split(batch_size):
            # the codes' positions in the training split: a prior made of training images
            # leaves each code's own image out
            loss = prior.fit_loss(z[idx], idx if prior.needs_data else None)
            if not torch.isfinite(loss):
                raise PriorError(f"non-finite loss while fitting, epoch {epoch}; nothing was "
                                 f"saved. Try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        prior.eval()
        val = _val_loss(prior, z_val)
        prior.train()
        history.append({"epoch": epoch, "train_loss": total / len(z), "val_loss": val})
        log(epoch, total / len(z), val)
        better, stop = stopper.step(epoch, val)
        if better:
            best_state = copy.deepcopy(prior.state_dict())
        if stop:
            break
    prior.load_state_dict(best_state)
    prior.eval()
    return history, stopper


def _likelihood_objective(prior) -> bool:
    return type(prior).fit_loss is Prior.fit_loss


@torch.no_grad()
def _val_loss(prior, z_val: torch.Tensor, batch: int = 10_000) -> float:
    """The fit objective per validation code, in evaluation mode: the mean negative
    log-likelihood, or a prior's own ``fit_loss`` with its noise fixed (the same draws every
    epoch, the caller's random stream untouched), so epochs compare."""
    if _likelihood_objective(prior):
        return _mean_nll(prior, z_val, batch)
    with torch.random.fork_rng(devices=[z_val.device] if z_val.device.type == "cuda" else []):
        torch.manual_seed(0)
        return sum(prior.fit_loss(z_val[i:i + batch]).item() * len(z_val[i:i + batch])
                   for i in range(0, len(z_val), batch)) / len(z_val)


def prior_sources(run: Run) -> list[str]:
    """``trained``, ``aggregate`` and the labels of the ex-post priors fitted in the run."""
    folder = run.prior_source_files("x")[0].parent
    labels = sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []
    return [TRAINED, AGGREGATE, *labels]


def fit_record(run: Run, source: str) -> dict[str, Any]:
    """The ``[fit]`` table of an ex-post source's spec: ``seconds``, ``epochs``, ``method``,
    ``device`` ({} for ``trained``/``aggregate``, or a spec written before priorvae kept it)."""
    spec_path = run.prior_source_files(source)[0]
    if source in (TRAINED, AGGREGATE) or not _LABEL.fullmatch(source) or \
            not spec_path.is_file():
        return {}
    try:
        fit = tomllib.loads(read_regular(spec_path).decode()).get("fit", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return {}
    return fit if isinstance(fit, dict) else {}


def load_prior_source(run: Run, model, source: str = TRAINED, splits=None):
    """The prior called ``source`` for the run's (loaded) ``model``: ``trained`` (its own),
    ``aggregate`` (q(z) of the training split) or an ex-post LABEL. The ex-post prior's name
    comes from ``priors/LABEL.toml`` under the same rules as config.toml (never from the
    checkpoint)."""
    if source == TRAINED:
        return model.prior
    device = next(model.parameters()).device
    if source == AGGREGATE:
        if splits is None:
            splits = load_splits(run.config.data, device=device)
        return AggregatedPosterior(*encode_split(model.encoder, splits.x_train,
                                                 likelihood=model.likelihood))
    spec_path, weights_path = run.prior_source_files(source)
    if not _LABEL.fullmatch(source) or not spec_path.is_file():
        old = " (its priors/*.pt was written by an older priorvae, which kept the prior's name " \
              "inside the checkpoint: fit it again)" if weights_path.is_file() else ""
        raise RunError(f"no prior source {source!r} in {run.path}{old}; available: "
                       f"{', '.join(prior_sources(run))} (fit one with priorvae fit-prior)")
    try:
        spec = tomllib.loads(read_regular(spec_path).decode())
        name, kwargs = spec["prior"]["name"], dict(spec.get("kwargs", {}))
        sha = spec["prior"].get("file_sha256")
        fitted_to = spec.get("fit", {}).get("fitted_to")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError,
            ValueError, AttributeError, RecursionError) as exc:
        raise RunError(f"{spec_path} is damaged ({type(exc).__name__}); fit the prior again") \
            from None
    # a prior fitted to another best.pt (the run trained on after the fit) is stale: refused
    # (a spec written before priorvae recorded this has no fitted_to and is taken as it is)
    if fitted_to is not None and fitted_to != file_sha256(run.checkpoint_path("best")):
        raise RunError(f"{spec_path} was fitted to another best.pt than the run's current one "
                       f"(the run trained on after the fit); fit it again: priorvae fit-prior "
                       f"{run.path} --prior {name} --as {source}")
    shape = input_shape(run.config.data)
    with reading_folder(run.path, spec_path, run.trust_remote_code):  # every spec to the gate
        if PRIORS.resolve(name, sha, kwargs).needs_data:  # made of training images: again
            if splits is None:
                splits = load_splits(run.config.data, device=device)
            data = splits.x_train
        else:
            data = torch.zeros(1, *shape)
        context = PriorContext(encoder=_frozen(model.encoder), input_shape=shape, data=data,
                               likelihood=model.likelihood)
        prior = build_prior(name, latent_dim=run.config.model.latent_dim, context=context,
                            file_sha256=sha, **kwargs).to(device)
    saved = load_checkpoint(weights_path, map_location=device)
    if not isinstance(saved.get("state_dict"), dict):
        raise RunError(f"{weights_path} is not a fitted prior (no state_dict)")
    load_weights(prior, saved["state_dict"], weights_path)
    return prior.eval()
