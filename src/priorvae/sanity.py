"""Numbers a command may not report: non-finite values (refused) and absurd ones (warned).

A non-finite loss, validation value or test metric stops the command with one line; nothing
non-finite reaches metrics.json (:meth:`priorvae.runs.Run.update_metrics` would write null).
A finite value beyond :data:`NATS_PER_PIXEL` nats per pixel in magnitude is absurd for a
likelihood of images (a uniform Bernoulli pixel costs log 2 = 0.69 nats): it is kept, with a
warning on stderr and under ``warnings`` in metrics.json.
"""

from __future__ import annotations

import math
import sys

__all__ = ["NATS_PER_PIXEL", "non_finite", "absurd", "warn"]

NATS_PER_PIXEL = 100.0


def non_finite(values: dict) -> list[str]:
    """The keys of ``values`` whose value is a float that is NaN or infinite."""
    return [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]


def absurd(values: dict, pixels: int) -> list[str]:
    """'KEY = VALUE' for each nats value beyond NATS_PER_PIXEL * ``pixels`` in magnitude."""
    bound = NATS_PER_PIXEL * pixels
    return [f"{k} = {v:.6g}" for k, v in values.items()
            if isinstance(v, float) and math.isfinite(v) and abs(v) > bound]


def warn(command: str, line: str) -> str:
    print(f"priorvae {command}: warning: {line}", file=sys.stderr, flush=True)
    return line
