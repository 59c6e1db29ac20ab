"""Shared by the cross-tree benches (``sampling_ab.py``, ``log_prob_ab.py``, ``startup.py``,
``settings_ab.py --baseline``): an earlier commit's ``models/`` (and ``service/``) unpacked beside this
tree, and rounds that alternate which tree's child runs first."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unpack(rev: str, dest: Path, parts: tuple[str, ...] = ("models",)) -> Path:
    """``git archive REV PART`` for each of ``parts``, extracted under ``dest`` (created); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in parts:
        archive = subprocess.run(["git", "archive", rev, part], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def alternate(trees: dict[str, Path], rounds: int, run: Callable[[str, Path, int], float]) -> dict[str, list[float]]:
    """``run(name, root, round)`` for every tree in every round, the order reversed every other
    round so that the machine's drift falls on both; the figures it returns, by tree."""
    out: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(rounds):
        for name in list(trees) if r % 2 == 0 else list(reversed(trees)):
            out[name].append(run(name, trees[name], r))
            print(f"round {r + 1} {name}: {out[name][-1]:.4g}", file=sys.stderr)  # noqa: T201
    return out
