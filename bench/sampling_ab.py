"""Cached sampling, this tree against an earlier commit's, alternating in one run.

    python bench/sampling_ab.py --model checkpoints/pixelcnn-fmnist --n 16 --rounds 3 [--baseline REV]

The baseline's code (``git archive REV``, by default 0ac0100, the tree when issue #18 was filed,
whose sampler was still the one of 36becfa) is unpacked into a temporary folder. Each round runs
one child process per tree, alternating which goes first: the child loads the same checkpoint
with its tree's loader, draws one image to warm up, then times ``model.sample(n)`` from a seeded
generator, and writes the images. The report gives every round's seconds, the medians, the
speed-up (baseline / this tree) and whether both trees drew the same images. ``--threads`` sets
torch's thread count in the children (default: torch's own, the cores), ``--row-threads`` this
tree's ``models.sampling.cached.ROW_THREADS`` (the threads of its row steps); ``--labels`` gives a
conditional model labels 0, 1, 2, ...; ``--busy K`` runs K busy-loop processes alongside, a
loaded machine. Only ratios measured in one run mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_trees import ROOT, alternate, unpack

BASELINE = "0ac0100"


def child(root: Path, model_dir: Path, n: int, seed: int, out: Path, labels: bool, row_threads: int) -> None:
    """In a child process: time one seeded generation with the code under ``root``; write JSON."""
    sys.path.insert(0, str(root))
    import numpy as np
    import torch

    from models.checkpoint import load_checkpoint  # the tree under ``root``

    if row_threads:
        import models.sampling.cached as cached

        cached.ROW_THREADS = row_threads  # this tree's setting

    loaded = load_checkpoint(model_dir, "cpu")
    model = (loaded[0] if isinstance(loaded, tuple) else loaded).eval()
    n_classes = getattr(model, "n_classes", None)
    y = torch.arange(n) % n_classes if labels and n_classes else None
    model.sample(1, generator=torch.Generator().manual_seed(seed + 1), y=None if y is None else y[:1])
    t0 = time.perf_counter()
    drawn = model.sample(n, generator=torch.Generator().manual_seed(seed), y=y)
    seconds = time.perf_counter() - t0
    np.save(out.with_suffix(".npy"), drawn.images.numpy())
    out.write_text(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


def run_child(root: Path, args: argparse.Namespace, out: Path) -> float:
    cmd = [sys.executable, __file__, "--child", str(root), "--model", str(args.model), "--n", str(args.n)]
    cmd += ["--seed", str(args.seed), "--out", str(out)] + (["--labels"] if args.labels else [])
    if args.row_threads and root == ROOT:
        cmd += ["--row-threads", str(args.row_threads)]
    env = None
    if args.threads:
        import os

        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env, cwd=root)
    return float(json.loads(out.read_text())["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "pixelcnn-fmnist")
    ap.add_argument("--n", type=int, default=16, help="images per generation")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the children (0: torch's default)")
    ap.add_argument("--row-threads", type=int, default=0, help="this tree's ROW_THREADS (0: its default)")
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes to run alongside (a loaded machine)")
    ap.add_argument("--labels", action="store_true", help="labels 0, 1, 2, ... for a conditional model")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model.resolve()
    if args.child is not None:
        child(args.child, args.model, args.n, args.seed, args.out, args.labels, args.row_threads)
        return

    times: dict[str, list[float]] = {"baseline": [], "this tree": []}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        identical = _rounds(args, times)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    report: dict[str, Any] = {
        "model": args.model.name,
        "n": args.n,
        "baseline": args.baseline,
        "busy": args.busy,
        "rounds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "speedup": round(med["baseline"] / med["this tree"], 2),
        "identical_images": identical,
    }
    if args.json:
        print(json.dumps(report, indent=2))  # noqa: T201
        return
    busy = f", {args.busy} busy-loop processes alongside" if args.busy else ""
    print(f"{report['model']}, {args.n} images, seed {args.seed}, baseline {args.baseline}{busy}")  # noqa: T201
    for k, v in report["rounds"].items():
        print(f"  {k:9s}: {' '.join(f'{t:.3f}' for t in v)} s, median {report['median_seconds'][k]:.3f} s")  # noqa: T201
    print(f"  speed-up {report['speedup']:.2f}x, identical images: {identical}")  # noqa: T201


def _rounds(args: argparse.Namespace, times: dict[str, list[float]]) -> bool:
    """Alternate the two trees' children for ``args.rounds`` rounds, filling ``times``; whether
    both drew the same images in every round."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="sampling-ab-") as tmp:
        trees = {"baseline": unpack(args.baseline, Path(tmp) / "baseline"), "this tree": ROOT}

        def run(name: str, root: Path, r: int) -> float:
            return run_child(root, args, Path(tmp) / f"{name.replace(' ', '-')}-{r}.json")

        times.update(alternate(trees, args.rounds, run))
        return all(
            np.array_equal(np.load(Path(tmp) / f"baseline-{r}.npy"), np.load(Path(tmp) / f"this-tree-{r}.npy"))
            for r in range(args.rounds)
        )


if __name__ == "__main__":
    main()
