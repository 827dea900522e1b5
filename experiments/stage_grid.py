"""Stage a comparison grid under experiments/results/ for git, so that the next machine goes on
with it: a machine is not kept between sessions, and a grid of many CPU-hours outlives one.

    python experiments/stage_grid.py experiments/results/mnist_remedies_e100 [--dry-run]

- a finished, evaluated cell: its folder as .gitignore lets it through (config.toml, best.pt,
  metrics.json, figures/, priors/); a resume checkpoint committed earlier is dropped from git;
- a cell still training: the same plus its last.pt (ignored by default, added on purpose), so
  that ``priorvae compare`` on the new machine resumes it instead of starting it again;
- the grid's own files (compare.toml, results.*, comparison.png).

Reads metrics.json only (no lock taken: safe beside the processes that run the grid). Then
``git commit`` as usual.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FINISHED = ("finished", "early_stopped")


def _git(*args: str, dry_run: bool) -> None:
    print("git " + " ".join(args))
    if not dry_run:
        done = subprocess.run(["git", *args], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"stage_grid: git {args[0]} failed: "
                             f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="the grid folder (compare --out)")
    parser.add_argument("--dry-run", action="store_true", help="print the git commands only")
    args = parser.parse_args()
    if not (args.grid / "compare.toml").is_file():
        print(f"stage_grid: {args.grid} is not a grid folder (no compare.toml)", file=sys.stderr)
        return 2
    _git("add", str(args.grid), dry_run=args.dry_run)  # finished cells and the grid's files
    for cell in sorted(p for p in args.grid.iterdir() if (p / "config.toml").is_file()):
        try:
            status = json.loads((cell / "metrics.json").read_text()).get("status")
        except (OSError, ValueError):
            status = None
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
