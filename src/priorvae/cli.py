"""The ``priorvae`` command line: train, evaluate, compare, sample, fit-prior, priors."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path

from .errors import DEBUG_ENV, PriorVAEError
from .stop import Terminated

__all__ = ["main", "default_run_dir", "evaluation_summary", "item_name", "auto_scale",
           "sample_canvas", "vector_rows", "Terminated"]


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {low}, got {text!r}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


positive_int, nonnegative_int = _int_at_least(1), _int_at_least(0)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def default_run_dir(config_path: str | None, cfg) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    prior = cfg.prior.name.rpartition(":")[2]  # a custom spec path/file.py:Class -> Class
    return Path("runs") / f"{stem}-{prior}-seed{cfg.train.seed}"


def _cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.set)  # train() pins the code it names: the user's choice
    run_dir = Path(args.out) if args.out else default_run_dir(args.config, cfg)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    if main_rank:
        print(f"run folder: {run_dir}   (TensorBoard: tensorboard --logdir {run_dir.parent})")
    metrics = train(cfg, run_dir, progress=not args.quiet)
    if not main_rank:
        return 0
    summary = {k: metrics.get(k) for k in
               ("status", "epochs_trained", "best_epoch", "best_val_elbo", "train_seconds")}
    print(json.dumps(summary))
    return 0


def item_name(shape) -> str:
    """What one test example is called in messages: 'test image' for a (C, H, W) example,
    'test example' for a vector (D,)."""
    return "test image" if len(shape) == 3 else "test example"


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate_sources
    from .measure import DIAGNOSTIC_KEYS, STDERR_KEYS

    sources = list(dict.fromkeys(args.prior_source or ["trained"]))
    results = evaluate_sources(args.run_dir, sources, iw_samples=args.iw_samples,
                               device=args.device, progress=not args.quiet, limit=args.limit,
                               diagnostics=not args.no_diagnostics,
                               trust_remote_code=args.trust_remote_code,
                               allow_expensive=args.allow_expensive)
    keys = ("test_elbo", "test_nll", "iw_samples", "test_images", "eval_seconds",
            *DIAGNOSTIC_KEYS, *(f"{k}_stderr" for k in STDERR_KEYS), "log_normalizer_stderr",
            "truncation_share", "truncation", "fit_improved", "matched")
    if not args.json:  # the summary names what was scored: images, or vectors
        from .data import input_shape
        from .runs import Run

        item = item_name(input_shape(Run.open(args.run_dir, args.trust_remote_code).config.data))
    for source, metrics in results.items():
        if args.json:  # one JSON line per source, every number in full
            line = {k: metrics[k] for k in keys if k in metrics}
            print(json.dumps(line if len(results) == 1 else {"prior_source": source, **line}))
        else:
            print(evaluation_summary(args.run_dir, source, metrics, item))
    if not args.json:
        print(f"every number: {Path(args.run_dir) / 'metrics.json'} (or --json); pictures: "
              f"{Path(args.run_dir) / 'figures'}")
    return 0


def _number(value) -> bool:
    """A finite int or float (metrics.json is data: a crafted one holds anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def evaluation_summary(run_dir, source: str, metrics: dict, item: str = "test image") -> str:
    """A few lines a person reads: the key metrics of one prior source with their Monte-Carlo
    error where there is one, their better direction and the value they take when p = q (from
    :mod:`priorvae.metrics_schema`); then the LARS truncation share, the matched difference
    from the run's own prior and a fit that did not improve, when the source has them.
    ``item``: what one test example is (:func:`item_name`: 'test image' or 'test example')."""
    from .metrics_schema import SUMMARY_KEYS, metric

    head = (f"{run_dir} with prior {source!r}: {metrics.get('test_images')} {item}s, "
            f"K = {metrics.get('iw_samples')}")
    if _number(metrics.get("eval_seconds")):
        head += f", {metrics['eval_seconds']:.0f} s"
    lines = [head]
    for key in (*SUMMARY_KEYS, "truncation_share"):
        if not _number(metrics.get(key)):
            continue
        m = metric(key)
        value = m.format(metrics[key])
        if _number(metrics.get(f"{key}_stderr")):
            value += f" ± {m.format(metrics[f'{key}_stderr'])}"
        ref = f"   (p = q: {m.format(m.reference)})" if m.reference is not None else ""
        lines.append(f"  {m.label:<26} {value:>12}   {m.cue}{ref}".rstrip())
    matched = metrics.get("matched")
    if source != "trained" and isinstance(matched, dict) and _number(matched.get("diff")) \
            and _number(matched.get("diff_stderr")):
        lines.append(f"  {'Δ NLL vs own prior':<26} {matched['diff']:>+12.3f} ± "
                     f"{matched['diff_stderr']:.2g} nats, matched: K = "
                     f"{matched.get('iw_samples')}, {matched.get('test_images')} {item}s, "
                     f"the same draws")
    if metrics.get("fit_improved") is False:
        lines.append("  its ex-post fit did not improve on its starting point: kept as it "
                     "started")
    return "\n".join(lines)


def _cmd_sample(args) -> int:
    import torch
    from torchvision.utils import save_image

    from .aggregate import AggregatedPosterior, encode_split
    from .data import load_splits
    from .datasets import check_same_data
    from .expost import load_prior_source
    from .likelihoods import prepare_splits
    from .measure import decode_samples
    from .runs import TRAINED, Run, atomic_write_bytes

    if args.index is not None and args.source != "posterior":
        raise PriorVAEError("--index goes with --source posterior")
    if args.source == "posterior" and args.index is None:
        raise PriorVAEError("--source posterior needs --index I (which test example)")
    out = Path(args.out)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise PriorVAEError(f"--out must name a .png file, got {args.out!r}")
    run = Run.open(args.run_dir, args.trust_remote_code)
    _check_sample_memory(args.n, run, args.scale)
    with run.lock("sample", exclusive=False):
        torch.manual_seed(args.seed)
        best = run.load_checkpoint("best")
        model = run.load_model(checkpoint=best)
        if args.source == "prior":
            z = load_prior_source(run, model, args.prior_source).sample(args.n)
            what = "prior samples" + (f" ({args.prior_source})"
                                      if args.prior_source != TRAINED else "")
        else:
            splits = load_splits(run.config.data)  # the data it was trained on, or one line
            check_same_data(best.get("data_sha256"), splits.digest(), run.checkpoint_path("best"))
            splits = prepare_splits(splits, model.likelihood)
            if args.source == "posterior":
                item = item_name(splits.x_test.shape[1:])
                if not 0 <= args.index < len(splits.x_test):
                    raise PriorVAEError(f"--index must be in [0, {len(splits.x_test)}) (the "
                                        f"{item}s), got {args.index}")
                mu, logvar = model.encode(splits.x_test[args.index:args.index + 1])
                z = mu + torch.exp(0.5 * logvar) * torch.randn(args.n, mu.shape[1])
                what = f"samples of the posterior of {item} {args.index}"
            else:
                z = AggregatedPosterior(*encode_split(model.encoder, splits.x_train,
                                                      likelihood=model.likelihood)).sample(args.n)
                what = "aggregated-posterior samples"
        images = decode_samples(model, z)
        condition = splits.x_test[args.index] if args.source == "posterior" else None
    vectors = images.dim() == 2
    if vectors:  # (N, D): one row of D grey cells per sample
        images, condition, (low, high) = vector_rows(images, condition)
    nrow = args.nrow or (1 if vectors else max(1, round(args.n**0.5)))
    scale = args.scale or auto_scale(images.shape[-1])
    canvas = sample_canvas(images, nrow, scale, condition)
    buffer = io.BytesIO()
    save_image(canvas, buffer, format="png")
    atomic_write_bytes(out, buffer.getvalue())
    shown = (f"; left, framed in red: {item} {args.index}" if condition is not None else "")
    each = (f"each vector's {images.shape[-1]} values as a row of cells, black {low:.3g} to "
            f"white {high:.3g}" if vectors else f"each image {images.shape[-1]} px")
    print(f"wrote {args.n} {what} to {out} ({canvas.shape[2]}x{canvas.shape[1]} pixels, "
          f"{each} at {scale}x{shown})")
    return 0


MIN_IMAGE_PIXELS = 32  # `sample` enlarges smaller images (8x8 digits: 4x) unless --scale says


def auto_scale(width: int) -> int:
    """The smallest integer zoom that shows an image ``width`` pixels wide at 32 pixels or
    more (8x8 digits: 4; 28x28 MNIST: 2)."""
    return max(1, -(-MIN_IMAGE_PIXELS // width))


def sample_canvas(images, nrow: int, scale: int, condition=None):
    """The picture ``sample`` writes: a grid of ``images`` (N, C, H, W) in [0, 1], each pixel
    a ``scale`` x ``scale`` block, with ``condition`` (C, H, W), the image the samples are
    conditioned on, to the left in a red frame. Returns (3, H', W')."""
    import torch
    from torchvision.utils import make_grid

    grid = make_grid(images.float().clamp(0, 1).cpu(), nrow=nrow, padding=1, pad_value=1.0)
    if condition is not None:
        c = condition.float().clamp(0, 1).cpu().expand(3, -1, -1)
        red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
        framed = red.expand(3, c.shape[1] + 2, c.shape[2] + 2).clone()
        framed[:, 1:-1, 1:-1] = c
        left = torch.ones(3, max(grid.shape[1], framed.shape[1]), framed.shape[2] + 3)
        left[:, 1:1 + framed.shape[1], 1:1 + framed.shape[2]] = framed
        if grid.shape[1] < left.shape[1]:
            grid = torch.cat([grid, torch.ones(3, left.shape[1] - grid.shape[1],
                                               grid.shape[2])], 1)
        grid = torch.cat([left, grid], 2)
    return grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def vector_rows(vectors, condition=None):
    """Vectors (N, D) as images (N, 1, 1, D) for :func:`sample_canvas`: each value a grey
    cell, black to white over the 1st-99th percentiles of the values (the scale of the
    heat maps in ``figures/``), ``condition`` (D,) on the same scale as (1, 1, D). Returns
    (images, condition, (low, high))."""
    from einops import rearrange

    from .figures import _value_range

    low, high = _value_range(vectors, *([condition[None]] if condition is not None else []))

    def grey(v):
        return ((v.float() - low) / (high - low)).clamp(0, 1)

    images = rearrange(grey(vectors), "n d -> n 1 1 d")
    if condition is not None:
        condition = rearrange(grey(condition), "d -> 1 1 d")
    return images, condition, (low, high)


def _check_sample_memory(n: int, run, scale: int | None) -> None:
    """Refuse, before any work, a picture of ``n`` samples at ``scale`` that would not fit in
    half of the memory available (codes, decoded images, the grid, its enlarged float copies
    and the 8-bit copy the PNG encoder reads)."""
    from .data import input_shape
    from .datasets import available_memory

    shape = input_shape(run.config.data)  # the [data] table: its own keys, its pinned file
    c, h, w = shape if len(shape) == 3 else (1, 1, shape[0])  # vectors: one row of cells
    scale = scale or auto_scale(w)
    cell = 3 * (h + 1) * (w + 1)
    per_image = 4 * (2 * c * h * w + cell + run.config.model.latent_dim) + 9 * cell * scale**2
    need, have = n * per_image, available_memory()
    if need > have // 2:
        raise PriorVAEError(f"--n {n} at --scale {scale}: the picture would need about "
                            f"{need / 2**30:.3g} GiB of memory and {have / 2**30:.3g} GiB are "
                            f"available here; ask for at most {max(1, have // 2 // per_image)} "
                            f"samples at this scale")


def _cmd_compare(args) -> int:
    from .compare import run_compare

    out = run_compare(args.config, args.set, args.out, progress=not args.quiet,
                      report_only=args.report_only)
    print((out / "results.md").read_text())
    return 0


def _cmd_fit_prior(args) -> int:
    from .config import parse_override
    from .expost import fit_prior

    kwargs = {}
    for text in args.set:
        table, key, value = parse_override(text)
        if table != "prior":
            raise PriorVAEError(f"fit-prior takes --set prior.KEY=VALUE, got {text!r}")
        kwargs[key] = value
    result = fit_prior(args.run_dir, args.prior, kwargs, label=args.label, method=args.method,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       patience=args.patience, device=args.device, progress=not args.quiet,
                       trust_remote_code=args.trust_remote_code)
    print(json.dumps(result))
    print(f"evaluate it with: priorvae evaluate {args.run_dir} --prior-source {result['label']}")
    return 0


def _cmd_priors(args) -> int:
    from .priors import PRIORS

    if args.pattern in PRIORS:  # one prior: its arguments
        print("\n".join(PRIORS.describe(args.pattern)))
        return 0
    names = PRIORS.list(args.pattern)
    if not names:
        raise PriorVAEError(f"no prior matches {args.pattern!r}; registered: "
                            f"{', '.join(PRIORS.list())}")
    for name in names:
        print(name)
    return 0


_KIND_WORDS = {"data": "data", "dataset": "data", "datasets": "data",
               "likelihood": "likelihood", "likelihoods": "likelihood",
               "network": "network", "networks": "network", "prior": "prior", "priors": "prior"}


def _cmd_list(args) -> int:
    from .config import _BUILTIN_ARGS
    from .registry import KINDS, kind_registry

    if args.kind is not None and args.kind not in _KIND_WORDS:
        raise PriorVAEError(f"priorvae list takes one of {', '.join(KINDS)} (or a plural), "
                            f"got {args.kind!r}")
    kinds = [_KIND_WORDS[args.kind]] if args.kind else list(KINDS)
    for kind in kinds:
        registry = kind_registry(kind)
        if args.name is not None:
            if registry is None or args.name not in registry:
                known = registry.list() if registry else list(_BUILTIN_ARGS[kind])
                raise PriorVAEError(f"no {kind} {args.name!r} is registered; registered: "
                                    f"{', '.join(known)}")
            print("\n".join(registry.describe(args.name)))
            continue
        names = registry.list() if registry else list(_BUILTIN_ARGS[kind])
        print(f"[{kind}] name = {' | '.join(names)}")
    return 0


DESCRIPTION = ("VAEs with pluggable priors. Commands: train, evaluate, compare, sample, "
               "fit-prior, priors, list; 'priorvae COMMAND --help' describes each. Errors are one "
               "line with exit code 2.")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="priorvae", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    trust = dict(action="store_true", help="allow code (a file or module) that the run folder "
                 "names but you did not choose (it is not in your trust record); only for "
                 "folders whose author you trust (also PRIORVAE_TRUST_REMOTE_CODE=1)")

    t = sub.add_parser("train", help="train a VAE from a TOML config (resumes if interrupted)")
    t.add_argument("config", help="TOML file with [data] [model] [prior] [train] tables")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (a TOML value; a bare word is a string)")
    t.add_argument("--out", help="run folder (default: runs/CONFIG-PRIOR-seedN)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="test ELBO, IWAE NLL and every prior-vs-q(z) "
                       "diagnostic of a run's best model; pictures and TensorBoard")
    e.add_argument("run_dir", help="a trained run folder")
    e.add_argument("--iw-samples", type=positive_int,
                   help="importance samples K (default: [eval])")
    e.add_argument("--device", help="cpu, cuda, ... (default: the run's [train] device)")
    e.add_argument("--limit", type=positive_int,
                   help="only the first N test examples (images or vectors)")
    e.add_argument("--prior-source", action="append", metavar="trained|aggregate|LABEL",
                   help="the prior to evaluate the VAE with: its own (trained, the default), "
                        "the aggregated posterior, or an ex-post prior fitted with fit-prior; "
                        "repeat it to evaluate several with one decoder pass for their test NLL")
    e.add_argument("--no-diagnostics", action="store_true",
                   help="only test ELBO and NLL, no prior-vs-aggregate diagnostics or pictures")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.add_argument("--json", action="store_true",
                   help="print every number as one JSON line per prior source instead of "
                        "the summary")
    e.add_argument("--allow-expensive", action="store_true",
                   help="allow more than 2.5e8 decoder evaluations (test images x K)")
    e.add_argument("--trust-remote-code", **trust)
    e.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("sample", help="an image grid of samples from a run's prior, its "
                       "aggregated posterior, or one test example's posterior")
    s.add_argument("run_dir", help="a trained run folder")
    s.add_argument("--n", type=positive_int, default=64, help="number of samples (default 64)")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--nrow", type=positive_int,
                   help="images per row (default: about the square root of --n)")
    s.add_argument("--scale", type=positive_int,
                   help="draw each pixel as an S x S block (default: enough to show each image "
                        f"at {MIN_IMAGE_PIXELS} pixels or more, e.g. 4 for 8x8 digits)")
    s.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    s.add_argument("--source", choices=["prior", "aggregate", "posterior"], default="prior",
                   help="prior p(z) (default); aggregate q(z) of the training split; "
                        "posterior q(z|x_I) of test example (image or vector) --index I "
                        "('digits like this one')")
    s.add_argument("--index", type=nonnegative_int,
                   help="test example index, with --source posterior")
    s.add_argument("--prior-source", default="trained", metavar="trained|aggregate|LABEL",
                   help="with --source prior: the run's own prior, q(z), or an ex-post prior")
    s.add_argument("--trust-remote-code", **trust)
    s.set_defaults(func=_cmd_sample)

    c = sub.add_parser("compare", help="train and evaluate the grid of a config's [compare] "
                       "table (priors x seeds); results.csv, results.md, comparison.png")
    c.add_argument("config", help="TOML file with a [compare] table beside the run tables")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value for every run of the grid")
    c.add_argument("--out", help="experiment folder (default: runs/CONFIG-compare)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--report-only", action="store_true",
                   help="train nothing: write the tables and figure from the cells finished "
                   "so far (safe beside the processes running the grid)")
    c.set_defaults(func=_cmd_compare)

    f = sub.add_parser("fit-prior", help="fit a registered prior to a trained run's aggregated "
                       "posterior (ex-post) and save it in the run as a prior source")
    f.add_argument("run_dir", help="a trained run folder")
    f.add_argument("--prior", required=True, help="registered name or file.py:Class")
    f.add_argument("--set", action="append", default=[], metavar="prior.KEY=VALUE",
                   help="an argument of the prior, e.g. prior.n_components=50")
    f.add_argument("--as", dest="label", help="label of the fitted prior (default expost-NAME)")
    f.add_argument("--method", default="auto", choices=["auto", "em", "gradient"],
                   help="auto: EM for mog, gradient (Adam) otherwise")
    f.add_argument("--epochs", type=positive_int, help="epochs (EM: iterations); default: "
                   "the prior's fit_defaults, else 100")
    f.add_argument("--batch-size", type=positive_int, help="default: 1000")
    f.add_argument("--lr", type=_positive_float, help="default: 1e-3 (diffusion: 2e-3)")
    f.add_argument("--patience", type=nonnegative_int, help="default: 10 (diffusion: 100)")
    f.add_argument("--device", help="cpu, cuda, ... (default: the run's [train] device)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.add_argument("--trust-remote-code", **trust)
    f.set_defaults(func=_cmd_fit_prior)

    r = sub.add_parser("priors", help="list the registered priors, or show one's arguments")
    r.add_argument("pattern", nargs="?", default="*",
                   help="glob, e.g. '*flow*', or a prior's name (its arguments and defaults)")
    r.set_defaults(func=_cmd_priors)

    li = sub.add_parser("list", help="what is registered for every plug-in kind (data sets, "
                        "likelihoods, networks, priors), or one's arguments")
    li.add_argument("kind", nargs="?", help="data | likelihood | network | prior")
    li.add_argument("name", nargs="?", help="a registered name: its arguments and defaults")
    li.set_defaults(func=_cmd_list)
    return p


@contextlib.contextmanager
def _warning_lines(command: str):
    """Print a warning (a plug-in that cannot be loaded, torch's) as one line like priorvae's
    own, ``priorvae COMMAND: warning: MESSAGE``, not file:line plus a line of source. Only
    the printed form changes: warnings recorded (``pytest.warns``) stay recorded."""
    before = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: (
        f"priorvae {command}: warning: {' '.join(str(message).split())}\n")
    try:
        yield
    finally:
        warnings.formatwarning = before


def main(argv: list[str] | None = None) -> int:
    from .stop import handle_sigterm, stop_requested

    args = build_parser().parse_args(argv)
    with handle_sigterm(), _warning_lines(args.command):  # SIGTERM: a flag; the loops stop
        try:  # at their next safe point
            code = args.func(args)
        except PriorVAEError as exc:
            if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
                raise  # the traceback, and the plug-in's exception chained to it
            print(f"priorvae {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except RecursionError:  # a crafted file nested hundreds of levels deep
            what = getattr(args, "config", None) or "an input file"
            print(f"priorvae {args.command}: error: {what} is nested too deeply to be read "
                  f"(a crafted file?)", file=sys.stderr)
            return 2
        except Terminated:
            code = 143
        except KeyboardInterrupt:
            return 130
        if stop_requested():  # asked to stop: whatever finished is saved, the rest is not
            print(f"priorvae {args.command}: terminated (SIGTERM)", file=sys.stderr)
            return 143
        return code


if __name__ == "__main__":
    raise SystemExit(main())
