"""The drift monitor's worked example (docs/drift.md): Fashion-MNIST test images, then MNIST mixed in.

1. **Scoring pass through the real /score path**: the app runs in-process (service.app.create_app,
   the model's calibrated default score) and scores ``--n-test`` Fashion-MNIST test images, then
   ``--n-mnist`` MNIST images, as PNG uploads in requests of 64; each image's score and flag are kept
   (and cached in ``--cache``). ``GET /models/{name}/drift`` is read after the test images (a window of
   test images only) and after the MNIST images.
2. **Streams**: from those per-image results, ``--streams`` random streams per MNIST rate (0, 5, 20,
   50%): ``--window`` test uploads (a full, clean window), then uploads that are MNIST with the given
   probability, fed to the service's own :class:`service.drift.DriftWindow`; the tests are read every
   ``--step`` uploads and the first upload after the switch at which each fires (p < alpha) is reported.
3. **False alarms**: ``--windows`` windows of ``--window`` uploads drawn with replacement from the
   test images' results (a bootstrap of the clean upload stream); the fraction in which each test
   fires. Also the disjoint windows of the test set in its own order.

    python bench/drift_example.py --model checkpoints/pixelcnn-fmnist --cache /tmp/drift_scores.npz
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.drift import DriftWindow, binomial_sf, ks_against_quantiles

logger = logging.getLogger("bench.drift_example")

RATES = (0.0, 0.05, 0.20, 0.50)
BATCH = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("checkpoints/pixelcnn-fmnist"), help="model folder")
    p.add_argument("--mnist", default="/work/shared/data", help="GENSERVE_DATA_DIR holding mnist-5k")
    p.add_argument("--n-test", type=int, default=10_000, help="Fashion-MNIST test images to score")
    p.add_argument("--n-mnist", type=int, default=5_000, help="MNIST images to score")
    p.add_argument("--cache", type=Path, help="npz of the scoring pass: reused when present")
    p.add_argument("--window", type=int, default=1000, help="drift window (GENSERVE_DRIFT_WINDOW)")
    p.add_argument("--alpha", type=float, default=0.001, help="GENSERVE_DRIFT_ALPHA")
    p.add_argument("--margin", type=float, help="GENSERVE_DRIFT_FPR_MARGIN (default: unset, the confidence bound)")
    p.add_argument("--streams", type=int, default=40, help="random streams per MNIST rate")
    p.add_argument("--after", type=int, default=3000, help="uploads per stream after the switch")
    p.add_argument("--step", type=int, default=10, help="read the tests every this many uploads")
    p.add_argument("--windows", type=int, default=10_000, help="bootstrap windows of clean uploads")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the scoring pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if min(args.n_test, args.n_mnist, args.window, args.streams, args.step, args.windows) < 1:
        p.error("counts must be at least 1")
    return args


def png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def score_pass(args: argparse.Namespace, sets: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every image of each set through POST /score; per set its scores and flags, and the drift reading after it."""
    import httpx

    from service.app import create_app
    from service.settings import Settings

    name = args.model.name
    settings = Settings(model_dir=args.model.parent, models=name, torch_threads=args.threads,
                        drift_window=args.window, drift_alpha=args.alpha, drift_fpr_margin=args.margin,
                        max_images=BATCH)  # fmt: skip
    app = create_app(settings)
    out: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        await app.state.registry.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            for set_name, images in sets.items():
                scores, flags, start = [], [], time.perf_counter()
                for i in range(0, len(images), BATCH):
                    body = {"model": name, "images": [png_b64(im) for im in images[i : i + BATCH]]}
                    r = await client.post("/score", json=body)
                    r.raise_for_status()
                    for res in r.json()["results"]:
                        scores.append(res["score"])
                        flags.append(bool(res["is_outlier"]))
                seconds = time.perf_counter() - start
                drift = (await client.get(f"/models/{name}/drift")).json()
                out[set_name] = {"scores": np.array(scores), "flags": np.array(flags), "drift": drift,
                                 "images_per_s": len(images) / seconds}  # fmt: skip
                logger.info("scored %d %s images in %.0f s; drift after them: %s", len(images), set_name, seconds,
                            json.dumps(drift))  # fmt: skip
        entry = app.state.registry.entries[name]
        out["calibration"] = entry.meta["calibration"]
        out["score_type"] = entry.default_score_type
    return out


def load_sets(args: argparse.Namespace) -> dict[str, np.ndarray]:
    import os

    os.environ.setdefault("GENSERVE_DATA_DIR", args.mnist)
    from models.tools.data import load_named

    rng = np.random.default_rng(args.seed)
    test = load_named("fashion-mnist", "test").images.numpy()[:, 0]
    mnist = load_named("mnist", "test").images.numpy()[:, 0]
    return {
        "fashion-mnist-test": test[rng.permutation(len(test))[: args.n_test]],
        "mnist": mnist[rng.permutation(len(mnist))[: args.n_mnist]],
    }


def reference(args: argparse.Namespace, cal: dict[str, Any], score_type: str) -> dict[str, Any]:
    """The window's arguments as the service builds them (service/drift_monitor.py null_rate)."""
    from models.scoring.calibration import threshold_sample_size
    from service.drift_monitor import null_rate
    from service.settings import Settings

    settings = Settings(drift_alpha=args.alpha, drift_fpr_margin=args.margin)
    return {"fpr": null_rate({"calibration": cal}, score_type, settings),
            "quantiles": cal["scores"][score_type]["quantiles"],
            "reference_n": threshold_sample_size({"calibration": cal}, score_type)}  # fmt: skip


def first_fire(args: argparse.Namespace, ref: dict[str, Any], data: dict[str, Any], rate: float, rng: Any) -> dict:
    """One stream: a clean window, then uploads that are MNIST with probability ``rate``; the first
    upload after the switch at which each test fires (None: not within ``--after``)."""
    clean, bad = data["fashion-mnist-test"], data["mnist"]
    window = DriftWindow(size=args.window, max_age_s=1e9, alpha=args.alpha, min_uploads=args.window, **ref)
    for i in rng.integers(0, len(clean["scores"]), args.window):
        window.add(float(clean["scores"][i]), bool(clean["flags"][i]))
    fired: dict[str, int | None] = {"binomial": None, "ks": None}
    for t in range(1, args.after + 1):
        src = bad if rng.random() < rate else clean
        i = rng.integers(0, len(src["scores"]))
        window.add(float(src["scores"][i]), bool(src["flags"][i]))
        if t % args.step:
            continue
        s = window.stats()
        assert s.binomial_p_value is not None and s.ks_p_value is not None
        if fired["binomial"] is None and s.binomial_p_value < args.alpha:
            fired["binomial"] = t
        if fired["ks"] is None and s.ks_p_value < args.alpha:
            fired["ks"] = t
        if None not in fired.values():
            break
    return fired


def summarize(times: list[int | None], within: int) -> dict[str, Any]:
    hit = sorted(t for t in times if t is not None)
    return {
        "fired": f"{len(hit)}/{len(times)}",
        "within_one_window": f"{sum(1 for t in hit if t <= within)}/{len(times)}",
        "median_uploads": statistics.median(hit) if hit else None,
        "max_uploads": hit[-1] if hit else None,
    }


def streams(args: argparse.Namespace, ref: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed + 1)
    out = {}
    for rate in RATES:
        runs = [first_fire(args, ref, data, rate, rng) for _ in range(args.streams)]
        out[f"{rate:.0%}"] = {test: summarize([r[test] for r in runs], args.window) for test in ("binomial", "ks")}
    return out


def false_alarms(args: argparse.Namespace, ref: dict[str, Any], clean: dict[str, Any]) -> dict[str, Any]:
    """The fraction of clean windows in which each test fires: bootstrap windows, and the disjoint ones."""
    rng = np.random.default_rng(args.seed + 2)
    scores, flags = clean["scores"], clean["flags"]

    def fires(idx: np.ndarray) -> tuple[bool, bool]:
        p_b = binomial_sf(int(flags[idx].sum()), len(idx), ref["fpr"])
        p_ks = ks_against_quantiles(scores[idx], ref["quantiles"], reference_n=ref["reference_n"]).p_value
        return p_b < args.alpha, p_ks < args.alpha

    boot = [fires(rng.integers(0, len(scores), args.window)) for _ in range(args.windows)]
    disjoint = [fires(np.arange(i, i + args.window)) for i in range(0, len(scores) - args.window + 1, args.window)]
    return {
        "test_flagged_fraction": float(flags.mean()),
        "bootstrap_windows": args.windows,
        "bootstrap_binomial": sum(b for b, _ in boot) / len(boot),
        "bootstrap_ks": sum(k for _, k in boot) / len(boot),
        "bootstrap_either": sum(b or k for b, k in boot) / len(boot),
        "disjoint_windows": len(disjoint),
        "disjoint_binomial_fired": sum(b for b, _ in disjoint),
        "disjoint_ks_fired": sum(k for _, k in disjoint),
    }


def scored(args: argparse.Namespace) -> dict[str, Any]:
    """The scoring pass's results, from the cache where it has them."""
    if args.cache and args.cache.is_file():
        z = np.load(args.cache, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        return {**{k: {"scores": z[f"{k}_scores"], "flags": z[f"{k}_flags"], **meta["sets"][k]} for k in meta["sets"]},
                "calibration": meta["calibration"], "score_type": meta["score_type"]}  # fmt: skip
    data = asyncio.run(score_pass(args, load_sets(args)))
    if args.cache:
        names = ("fashion-mnist-test", "mnist")
        sets = {k: {"drift": data[k]["drift"], "images_per_s": data[k]["images_per_s"]} for k in names}
        arrays = {f"{k}_{f}": data[k][f] for k in sets for f in ("scores", "flags")}
        meta = {"sets": sets, "calibration": data["calibration"], "score_type": data["score_type"]}
        np.savez(args.cache, meta=json.dumps(meta), **arrays)
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = scored(args)
    ref = reference(args, data["calibration"], data["score_type"])
    result = {
        "model": str(args.model), "score_type": data["score_type"], "window": args.window, "alpha": args.alpha,
        "null_rate": ref["fpr"], "margin": args.margin,
        "service_drift_after": {k: data[k]["drift"] for k in ("fashion-mnist-test", "mnist")},
        "images_per_s": {k: round(data[k]["images_per_s"], 1) for k in ("fashion-mnist-test", "mnist")},
        "mnist_flagged_fraction": float(data["mnist"]["flags"].mean()),
        "false_alarms": false_alarms(args, ref, data["fashion-mnist-test"]),
        "streams": streams(args, ref, data),
    }  # fmt: skip
    lines = [f"{'MNIST rate':>10} {'test':>9} {'fired':>7} {'<=1 window':>10} {'median':>7} {'max':>6}"]
    for rate, tests in result["streams"].items():
        for test, s in tests.items():
            lines.append(f"{rate:>10} {test:>9} {s['fired']:>7} {s['within_one_window']:>10} "
                         f"{s['median_uploads']!s:>7} {s['max_uploads']!s:>6}")  # fmt: skip
    print("\n".join(lines) + "\n" + json.dumps(result, indent=2, default=float))  # noqa: T201 - the output
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
