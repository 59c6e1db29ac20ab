"""Naive vs cached autoregressive sampling (PixelCNN or PixelRNN): seconds, speed-up, identical images.

    python bench/sampling.py --model checkpoints/pixelcnn-fmnist --n 1 16 64 [--naive-rows R] [--json]

Both samplers run in the same process on the same device with the same seed. The naive sampler
runs one full forward pass per sub-pixel, so every row costs the same; ``--naive-rows R`` times
only its first R rows and scales the time by H/R (reported as ``naive_rows``), and ``identical``
then compares those rows (the cached sampler draws them from the same generator state).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.base import AutoregressiveModel
from models.checkpoint import load_checkpoint


class _StopAfter(Exception):
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_graphs(
    model: AutoregressiveModel, n: int, seed: int, cached: torch.Tensor, cached_s: float
) -> dict[str, Any]:
    """The cached sampler again with its pixel step replayed as a CUDA graph (PixelCNN or PixelRNN on CUDA):
    seconds (graph capture included), speed-up over the plain cached sampler, identical images."""
    dev = model.device
    y = torch.arange(n, device=dev) % model.n_classes if model.n_classes else None
    model.prepare_for_inference(cuda_graphs=True)
    try:
        model.sample(1, generator=torch.Generator(device=dev).manual_seed(seed), y=y[:1] if y is not None else None)
        _sync(dev)
        t0 = time.perf_counter()
        out = model.sample(n, generator=torch.Generator(device=dev).manual_seed(seed), y=y)
        _sync(dev)
        graphs_s = time.perf_counter() - t0
    finally:
        model.prepare_for_inference(cuda_graphs=False)
    return {
        "graphs_seconds": round(graphs_s, 3),
        "graphs_speedup": round(cached_s / graphs_s, 2),
        "graphs_identical": bool(torch.equal(out.images, cached)),
    }


def measure(
    model: AutoregressiveModel, n: int, seed: int, naive_rows: int | None, *, graphs: bool = False
) -> dict[str, Any]:
    dev = model.device
    height = model.shape[1]
    y = torch.arange(n, device=dev) % model.n_classes if model.n_classes else None

    def gen() -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(seed)

    model.sample(1, generator=gen(), y=y[:1] if y is not None else None)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    cached = model.sample(n, generator=gen(), y=y)
    _sync(dev)
    cached_s = time.perf_counter() - t0

    rows = naive_rows or height
    partial: dict[str, torch.Tensor] = {}

    def stop(done: int, images: torch.Tensor) -> None:
        if done >= rows:
            partial["images"] = images.clone()
            raise _StopAfter

    t0 = time.perf_counter()
    with contextlib.suppress(_StopAfter):
        model.sample_naive(n, generator=gen(), y=y, on_row=stop)
    _sync(dev)
    naive_s = (time.perf_counter() - t0) * height / rows
    identical = bool(torch.equal(partial["images"][:, :, :rows].to(torch.uint8), cached.images[:, :, :rows]))
    out = {
        "n": n,
        "naive_seconds": round(naive_s, 3),
        "cached_seconds": round(cached_s, 3),
        "speedup": round(naive_s / cached_s, 1),
        "identical": identical,
        "naive_rows": rows,
        "rows": height,
    }
    if graphs:
        out |= measure_graphs(model, n, seed, cached.images, cached_s)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/pixelcnn-fmnist")
    p.add_argument("--n", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--naive-rows", type=int, help="time only the first R rows of the naive sampler and scale")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also time the cached sampler with CUDA-graph steps (PixelCNN or PixelRNN on CUDA)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.model, args.device)
    if not isinstance(model, AutoregressiveModel):
        p.error(f"{args.model} is not an autoregressive model")
    if args.cuda_graphs and (model.device.type != "cuda" or not hasattr(model, "sample_cuda_graphs")):
        p.error("--cuda-graphs needs a PixelCNN or PixelRNN on a CUDA device")
    device_name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    results = [measure(model, n, args.seed, args.naive_rows, graphs=args.cuda_graphs) for n in args.n]
    report = {"model": args.model, "device": device_name, "threads": torch.get_num_threads(), "results": results}
    if args.json:
        print(json.dumps(report))  # noqa: T201
    else:
        print(f"{args.model} on {device_name}, {torch.get_num_threads()} threads")  # noqa: T201
        print(f"{'n':>4} {'naive s':>10} {'cached s':>9} {'speedup':>8} {'identical':>9} {'naive rows':>10}")  # noqa: T201
        for r in results:
            print(  # noqa: T201
                f"{r['n']:>4} {r['naive_seconds']:>10.2f} {r['cached_seconds']:>9.3f} {r['speedup']:>7.1f}x "
                f"{r['identical']!s:>9} {r['naive_rows']:>5}/{r['rows']}"
                + (
                    f"   graphs {r['graphs_seconds']:.3f} s ({r['graphs_speedup']:.2f}x,"
                    f" identical {r['graphs_identical']})"
                    if "graphs_seconds" in r
                    else ""
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
