"""Write a small data set of coloured shapes as a user would bring it: a ``.npz`` of uint8
images (N, 32, 32, 3) and integer labels (0 disc, 1 square, 2 triangle).

Each image: a random dark background colour, one shape of random colour, size and position.
Seeded, so the file is the same everywhere::

    python experiments/colour_shapes.py runs/shapes.npz --n 3000
    priorvae compare experiments/shapes.toml --out experiments/results/shapes  # the grid
    priorvae train experiments/shapes.toml            # or one run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["make_shapes"]


def make_shapes(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, size, size, 3) uint8, labels (n,) int64)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    images = np.empty((n, size, size, 3), np.uint8)
    labels = rng.integers(0, 3, n)
    for i, kind in enumerate(labels):
        background = rng.integers(0, 96, 3)
        colour = rng.integers(96, 256, 3)
        r = rng.uniform(5, 11)
        cx, cy = rng.uniform(r, size - r, 2)
        if kind == 0:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        elif kind == 1:
            mask = (np.abs(xx - cx) <= r * 0.8) & (np.abs(yy - cy) <= r * 0.8)
        else:  # upward triangle: below the apex, inside both slanted edges
            mask = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
        images[i] = np.where(mask[..., None], colour, background)
    return images, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the .npz file to write")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    x, y = make_shapes(args.n, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, x=x, y=y)
    print(f"{args.out}: {x.shape} uint8, labels {np.bincount(y).tolist()}")


if __name__ == "__main__":
    main()
