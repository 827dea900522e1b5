"""Stage a comparison grid under experiments/results/ for git, so that the next machine goes on
with it: a machine is not kept between sessions, and a grid of many CPU-hours outlives one.

    python experiments/stage_grid.py experiments/results/mnist_remedies_e100 [--dry-run]

- a finished, evaluated cell: what the tables and a re-evaluation need, as far as .gitignore
  lets it through (config.toml, best.pt, metrics.json, figures/, priors/, the TensorBoard
  events); a resume checkpoint committed earlier is dropped from git;
- a cell still training: the same plus its last.pt (ignored by default, added on purpose), so
  that ``priorvae compare`` on the new machine resumes it instead of starting it again;
- the grid's own files (compare.toml, results.*, comparison.png, pictures beside them).

Nothing else in a cell is staged (a stray log, a core dump). A grid folder is data: a
symbolic link, a FIFO or device, or a file over :data:`MAX_BYTES` among those entries stops
the script with one line before anything is staged (git would commit the link, which the next
machine's ``priorvae`` refuses, or a file a git host refuses).

Reads metrics.json only (no lock taken: safe beside the processes that run the grid). Then
``git commit`` as usual.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

FINISHED = ("finished", "early_stopped")
CELL_ENTRIES = ("config.toml", "metrics.json", "best.pt", "figures", "priors")
MAX_BYTES = 95 * 2**20  # a git host refuses files of 100 MB; a grid's largest is ~20 MB
MAX_METRICS_BYTES = 2**20


class Refused(Exception):
    """An entry of the grid folder that must not be staged (one line)."""


def _git(*args: str, dry_run: bool) -> None:
    print("git " + " ".join(args))
    if not dry_run:
        done = subprocess.run(["git", *args], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"stage_grid: git {args[0]} failed: "
                             f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")


def _check(path: Path) -> None:
    """``path`` (and everything below it) is a regular file or folder of a sane size."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:  # a temporary file the running grid has just renamed
        return
    if stat.S_ISDIR(mode):
        for child in sorted(path.iterdir()):
            _check(child)
    elif not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise Refused(f"{path} is {kind}")
    elif os.lstat(path).st_size > MAX_BYTES:
        raise Refused(f"{path} is {os.lstat(path).st_size / 2**20:.0f} MB, over the "
                      f"{MAX_BYTES // 2**20} MB a staged file may have")


def _status(cell: Path) -> str | None:
    """The status in a cell's metrics.json (None: none, or not readable as a small JSON
    object). Never follows a link or opens a FIFO: _check has passed every entry."""
    path = cell / "metrics.json"
    if not path.is_file() or path.stat().st_size > MAX_METRICS_BYTES:
        return None
    try:
        metrics = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    status = metrics.get("status") if isinstance(metrics, dict) else None
    return status if isinstance(status, str) else None


def _entries(grid: Path) -> tuple[list[Path], list[tuple[Path, str | None]]]:
    """The grid's own files and every cell's entries to stage; the cells with their status."""
    if grid.is_symlink() or not grid.is_dir():
        raise Refused(f"{grid} is not a folder")
    paths = [p for p in sorted(grid.iterdir())  # hidden: temporaries of a running grid
             if not p.name.startswith(".") and (p.is_symlink() or not p.is_dir())]
    cells = []
    for cell in sorted(grid.iterdir()):
        if not os.path.lexists(cell / "config.toml"):
            continue  # not a cell (or not started)
        if cell.is_symlink():
            raise Refused(f"{cell} is a symbolic link")
        paths += [cell / e for e in CELL_ENTRIES if os.path.lexists(cell / e)]
        paths += sorted(cell.glob("events.out.tfevents.*"))
        cells.append(cell)
    for path in paths:
        _check(path)
    with_status = []
    for cell in cells:
        status = _status(cell)
        if status not in FINISHED and os.path.lexists(cell / "last.pt"):
            _check(cell / "last.pt")
        with_status.append((cell, status))
    return paths, with_status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="the grid folder (compare --out)")
    parser.add_argument("--dry-run", action="store_true", help="print the git commands only")
    args = parser.parse_args()
    if not (args.grid / "compare.toml").is_file():
        print(f"stage_grid: {args.grid} is not a grid folder (no compare.toml)", file=sys.stderr)
        return 2
    try:
        paths, cells = _entries(args.grid)
    except (Refused, OSError) as exc:
        print(f"stage_grid: {exc}; nothing was staged", file=sys.stderr)
        return 2
    _git("add", "--", *map(str, paths), dry_run=args.dry_run)  # .gitignore still applies
    for cell, status in cells:
        last = cell / "last.pt"
        if status in FINISHED:
            tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(last)],
                                     capture_output=True).returncode == 0
            if tracked:  # its resume point is no longer needed by anyone
                _git("rm", "--cached", "--quiet", str(last), dry_run=args.dry_run)
        elif last.is_file():
            _git("add", "--force", str(last), dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
