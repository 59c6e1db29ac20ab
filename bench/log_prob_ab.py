"""The exact log-likelihood in process, this tree against an earlier commit's, alternating in one run.

    python bench/log_prob_ab.py --model checkpoints/pixelcnn-fmnist --batch 1 32 --seconds 15 --rounds 3
        [--baseline REV] [--images SPEC] [--marginal | --scorer] [--json]

The baseline's ``models/`` (``git archive REV``; by default 8a5d7ef, the tree before the fast
PixelCNN pass of session 8, whose ``log_prob`` ran the masked convolutions when issue #18 was
filed) is unpacked into a temporary folder. The first ``max(--batch)`` images of ``--images``
(default the Fashion-MNIST test set, this tree's loader, ``$GENSERVE_DATA_DIR``) are written once.
Each round runs one child process per tree, alternating which goes first: the child loads the
checkpoint with its tree's loader, prepares it as a genserve worker does (``eval()``,
``prepare_for_inference()``), and for each batch size calls ``log_prob`` without gradients once
to warm up, then again and again for ``--seconds`` (``--marginal``: a conditional model's log p(x)
under a uniform prior instead, from the tree's ``class_log_likelihood``, as /score computes it for
a request without a label; ``--scorer``: what /score's ``score_type: "nll"`` runs, the tree's
``Scorer.compute``, for a VAE the calibrated IWAE with its own sample count). The report gives
images/s per round and tree,
the medians, the speed-up (this tree / baseline), and the largest difference between the trees'
log-likelihoods in nats per dimension. Only ratios measured in one run mean anything on a shared
machine.
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

BASELINE = "8a5d7ef"


def child(
    root: Path,
    model_dir: Path,
    data: Path,
    batches: list[int],
    seconds: float,
    out: Path,
    *,
    marginal: bool = False,
    scorer: bool = False,
) -> None:
    """In a child process: images/s of ``log_prob`` per batch size with the code under ``root`` (with
    ``marginal``, of a conditional model's log p(x) under a uniform prior, from that tree's
    ``class_log_likelihood``: what /score computes for a conditional model given no label)."""
    sys.path.insert(0, str(root))
    import math

    import numpy as np
    import torch

    from models.checkpoint import load_checkpoint  # the tree under ``root``

    if scorer:
        from models.scoring.scorer import load_scorer

        served, _ = load_scorer(model_dir, "cpu")
        model = served.model.eval()
    else:
        loaded = load_checkpoint(model_dir, "cpu")
        model = (loaded[0] if isinstance(loaded, tuple) else loaded).eval()
    model.prepare_for_inference()
    images = torch.from_numpy(np.load(data / "images.npy"))
    labels = torch.from_numpy(np.load(data / "labels.npy"))
    conditional = getattr(model, "n_classes", None) is not None
    score = model.log_prob
    if scorer:

        def score(x: Any, y: Any) -> Any:
            return served.compute(x, y, ["nll"]).log_prob["nll"]

    if marginal:
        from models.scoring.classify import class_log_likelihood

        def score(x: Any, _: Any) -> Any:
            return torch.logsumexp(class_log_likelihood(model, x), dim=1) - math.log(model.n_classes)

    report: dict[str, Any] = {}
    with torch.no_grad():
        for b in batches:
            x, y = images[:b], labels[:b] if conditional else None
            lp = score(x, y)  # warm-up, and the values compared
            calls, t0 = 0, time.perf_counter()
            while (spent := time.perf_counter() - t0) < seconds or calls == 0:
                score(x, y)
                calls += 1
            report[str(b)] = {"images_per_s": calls * b / spent, "calls": calls, "log_prob": lp.tolist()}
    out.write_text(json.dumps(report))


def write_data(folder: Path, spec: str, n: int) -> None:
    """The first n images of ``spec`` (this tree's loader) and their labels (0 without), as .npy."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from models.tools.data import load_dataset

    data = load_dataset(spec)
    if len(data) < n:
        raise SystemExit(f"{spec} has {len(data)} images; --batch asks for {n}")
    np.save(folder / "images.npy", data.images[:n].numpy())
    labels = data.labels[:n].numpy() if data.labels is not None else np.zeros(n, dtype=np.int64)
    np.save(folder / "labels.npy", labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "pixelcnn-fmnist")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seconds", type=float, default=15.0, help="per batch size, child and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    ap.add_argument("--images", default="fashion-mnist:test", help="dataset spec of the images scored")
    ap.add_argument("--marginal", action="store_true", help="a conditional model's p(x) over its classes")
    ap.add_argument("--scorer", action="store_true", help='what /score runs for score_type "nll" (Scorer.compute)')
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model.resolve()
    if args.child is not None:
        child(
            args.child, args.model, args.data, args.batch, args.seconds, args.out,
            marginal=args.marginal, scorer=args.scorer,
        )  # fmt: skip
        return
    with tempfile.TemporaryDirectory(prefix="log-prob-ab-") as tmp:
        write_data(Path(tmp), args.images, max(args.batch))
        trees = {"baseline": unpack(args.baseline, Path(tmp) / "baseline"), "this tree": ROOT}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}

        def run(name: str, root: Path, r: int) -> float:
            out = Path(tmp) / f"{name.replace(' ', '-')}-{r}.json"
            cmd = [sys.executable, __file__, "--child", str(root), "--model", str(args.model), "--data", tmp]
            cmd += ["--out", str(out), "--seconds", str(args.seconds), "--batch", *map(str, args.batch)]
            cmd += ["--marginal"] if args.marginal else []
            cmd += ["--scorer"] if args.scorer else []
            subprocess.run(cmd, check=True, cwd=root)
            results[name].append(json.loads(out.read_text()))
            return float(results[name][-1][str(args.batch[-1])]["images_per_s"])

        alternate(trees, args.rounds, run)
    report = summarise(args, results)
    report["images"] = args.images
    if args.json:
        print(json.dumps(report, indent=2))  # noqa: T201
        return
    what = "log p(x) over the classes" if args.marginal else "Scorer.compute nll" if args.scorer else "log_prob"
    print(f"{report['model']}: {what}, baseline {args.baseline}, {args.rounds} rounds of {args.seconds:g} s")  # noqa: T201
    for row in report["rows"]:
        print(  # noqa: T201
            f"  batch {row['batch']}: baseline {row['baseline']} images/s (median {row['median']['baseline']:.2f}), "
            f"this tree {row['this tree']} (median {row['median']['this tree']:.2f}): "
            f"speed-up {row['speedup']:.2f}x; largest difference {row['max_diff_nats_per_dim']:.2e} nats/dim"
        )


def summarise(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    import numpy as np

    rows = []
    dims = None
    for b in map(str, args.batch):
        rates = {name: [r[b]["images_per_s"] for r in rs] for name, rs in results.items()}
        med = {name: statistics.median(v) for name, v in rates.items()}
        lps = {name: np.array([r[b]["log_prob"] for r in rs]) for name, rs in results.items()}
        if dims is None:
            from models.checkpoint import read_metadata

            cfg = read_metadata(args.model)["config"]
            dims = cfg["in_channels"] * cfg["height"] * cfg["width"]
        diff = float(np.abs(lps["baseline"] - lps["this tree"]).max()) / dims
        rows.append({
            "batch": int(b),
            **{name: [round(v, 2) for v in vs] for name, vs in rates.items()},
            "median": med,
            "speedup": round(med["this tree"] / med["baseline"], 2),
            "max_diff_nats_per_dim": diff,
        })  # fmt: skip
    return {"model": args.model.name, "baseline": args.baseline, "rows": rows}


if __name__ == "__main__":
    main()
