"""The gated PixelCNN today and with this branch's speed-ups, in one run: log_prob and cached sampling.

Loads one checkpoint and times ``log_prob`` on random images at each batch size with the reference
forward pass (``PixelCNN.logits``: the convolutions of models/layers.py) and with the fast one
(:class:`models.fast.FastPixelCNN`, what ``prepare_for_inference`` turns on for CPU), alternating
the variants call by call so that the machine's drift falls on all alike; the fast pass also with its
direct products only (``FastPixelCNN(model, winograd=False)``: the row convolutions as unfolded
matrix products, the pass before session 17's Winograd transforms, models/winograd.py). Prints
images/s, GFLOP/s (the multiply-adds of the convolutions as direct computation does them, counted
from the config, times two: with Winograd's transforms an effective rate, not the machine's) and
the speed-ups.

``--peak`` also times plain float32 matrix products on the same threads (a 2048^3 one, and the
vertical stack's convolution as one product at the largest batch), the ceiling any forward pass of
this many FLOPs meets on the machine.

``--sample N`` also times the cached sampler drawing N images on the caller's threads (today's) and
on one thread (``models.sampling.cached.CPU_THREADS = 1``, this branch's default), alternating,
``--sample-rounds`` times each, and checks that both draw the same images for the same seed.

``--chunks N ...`` also times the fast pass with each thread's share of a batch taken N images at
a time (``FastPixelCNN.chunk``; 0: the whole share at once, the pass before session 22), alternating
call by call, at each batch size (models/fast.py ``CHUNK_BYTES`` sets the default).

    python bench/fast_forward.py --model checkpoints/pixelcnn-fmnist --batch 1 32 --seconds 20 --sample 16 [--json]
    python bench/fast_forward.py --batch 8 16 32 --seconds 30 --chunks 0 1 2 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import load_checkpoint
from models.fast import FastPixelCNN
from models.pixelcnn import PixelCNN
from models.sampling import cached


def gflop_per_image(model: PixelCNN) -> float:
    """2 x the multiply-adds of one image's forward pass (every convolution, every pixel)."""
    cfg = model.config
    c, h = cfg.in_channels, cfg.hidden
    macs = 0
    for i, k in enumerate([cfg.first_kernel] + [cfg.kernel] * cfg.n_blocks):
        in_ch = c if i == 0 else h
        macs += in_ch * 2 * h * (k // 2 + 1) * k  # vertical conv
        macs += 2 * h * 2 * h  # v_to_h
        macs += in_ch * 2 * h * (k // 2 + 1)  # horizontal conv, both halves
        macs += 2 * h * h  # residual and skip
    macs += h * cfg.out_hidden + cfg.out_hidden * c * cfg.levels  # output head
    return 2 * macs * cfg.height * cfg.width / 1e9


@torch.inference_mode()
def measure(model: PixelCNN, batch: int, seconds: float) -> dict[str, Any]:
    model.prepare_for_inference()
    fast = model.fast
    c, h, w = model.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.levels, (batch, c, h, w), generator=gen).to(torch.uint8)
    y = torch.zeros(batch, dtype=torch.long) if model.n_classes is not None else None
    variants = {"masked": None, "direct": FastPixelCNN(model, winograd=False), "fast": fast}
    spent = dict.fromkeys(variants, 0.0)
    calls = dict.fromkeys(variants, 0)
    for f in variants.values():  # warm-up
        model.fast = f
        model.log_prob(x, y)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for name, f in variants.items():
            model.fast = f
            t0 = time.perf_counter()
            model.log_prob(x, y)
            spent[name] += time.perf_counter() - t0
            calls[name] += 1
    model.fast = fast
    gflop = gflop_per_image(model)
    out: dict[str, Any] = {"batch": batch, "calls": calls["fast"]}
    for name in variants:
        ips = calls[name] * batch / spent[name]
        out[f"{name}_images_per_s"] = ips
        out[f"{name}_gflop_per_s"] = ips * gflop
    out["speedup"] = out["fast_images_per_s"] / out["masked_images_per_s"]
    out["winograd_gain"] = out["fast_images_per_s"] / out["direct_images_per_s"]
    return out


@torch.inference_mode()
def measure_chunks(model: PixelCNN, batch: int, seconds: float, chunks: list[int]) -> dict[str, Any]:
    """Images/s of the fast pass at ``batch`` with each chunk size (0: a thread's whole share at once)."""
    model.prepare_for_inference()
    fast = model.fast
    assert fast is not None, "the fast pass is built on CPU"
    default = fast.chunk
    c, h, w = model.shape
    x = torch.randint(0, model.levels, (batch, c, h, w), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    y = torch.zeros(batch, dtype=torch.long) if model.n_classes is not None else None
    spent, calls = dict.fromkeys(chunks, 0.0), dict.fromkeys(chunks, 0)
    try:
        for n in chunks:  # warm-up
            fast.chunk = n or batch
            model.log_prob(x, y)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for n in chunks:
                fast.chunk = n or batch
                t0 = time.perf_counter()
                model.log_prob(x, y)
                spent[n] += time.perf_counter() - t0
                calls[n] += 1
    finally:
        fast.chunk = default
    return {"batch": batch, "default_chunk": default, "images_per_s": {n: calls[n] * batch / spent[n] for n in chunks},
            "calls": calls[chunks[0]]}  # fmt: skip


@torch.inference_mode()
def measure_sampling(model: PixelCNN, n: int, rounds: int) -> dict[str, Any]:
    """Seconds for n images (seed 0) with the generation on the caller's threads and on one thread."""
    variants = {f"caller_{torch.get_num_threads()}_threads": None, "one_thread": 1}
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    images: dict[str, torch.Tensor] = {}
    y = torch.arange(n) % model.n_classes if model.n_classes else None
    for r in range(rounds):
        for name in variants if r % 2 == 0 else list(variants)[::-1]:
            cached.CPU_THREADS = variants[name]
            t0 = time.perf_counter()
            images[name] = model.sample(n, generator=torch.Generator().manual_seed(0), y=y).images
            seconds[name].append(time.perf_counter() - t0)
    cached.CPU_THREADS = 1
    today, new = list(variants)
    return {
        "n": n,
        "seconds": seconds,
        "speedup": min(seconds[today]) / min(seconds[new]),
        "identical": bool(torch.equal(images[today], images[new])),
    }


def matmul_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    """GFLOP/s of torch.matmul on (m, k) @ (k, n) float32, best of ``repeats`` after a warm-up."""
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    torch.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def peak(model: PixelCNN, batch: int) -> dict[str, float]:
    """Matrix-product rates: 2048^3, and the vertical convolution of a block as one product."""
    cfg = model.config
    vertical = (batch * cfg.height * cfg.width, (cfg.kernel // 2 + 1) * cfg.kernel * cfg.hidden, 2 * cfg.hidden)
    return {"matmul_2048": matmul_gflops(2048, 2048, 2048), "vertical_conv_as_matmul": matmul_gflops(*vertical)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="checkpoints/pixelcnn-fmnist")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seconds", type=float, default=20.0, help="per batch size, both variants together")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--sample", type=int, default=0, help="also time the cached sampler drawing this many images")
    p.add_argument("--sample-rounds", type=int, default=2)
    p.add_argument("--peak", action="store_true", help="also time plain matrix products (the machine's ceiling)")
    p.add_argument("--chunks", type=int, nargs="+", help="only time the fast pass with these chunk sizes (0: whole)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.model)
    if not isinstance(model, PixelCNN):
        raise SystemExit(f"{args.model} is a {model.architecture}, not a gated PixelCNN")
    if args.chunks:
        chunk_report(model, args)
        return
    rows = [measure(model, b, args.seconds) for b in args.batch]
    result = {"model": args.model, "gflop_per_image": gflop_per_image(model), "rows": rows,
              "threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    if args.sample:
        result["sampling"] = measure_sampling(model, args.sample, args.sample_rounds)
    if args.peak:
        result["peak_gflop_per_s"] = peak(model, max(args.batch))
    if args.json:
        print(json.dumps(result))  # noqa: T201 - the benchmark's output
        return
    lines = [f"{args.model}: {result['gflop_per_image']:.2f} GFLOP per image, {result['threads']} threads", ""]
    lines.append(
        "| batch | masked (images/s) | fast, direct products | fast (images/s) | masked GFLOP/s | fast GFLOP/s "
        "| speed-up | Winograd's part | calls each |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['masked_images_per_s']:.2f} | {r['direct_images_per_s']:.2f} "
            f"| {r['fast_images_per_s']:.2f} "
            f"| {r['masked_gflop_per_s']:.1f} | {r['fast_gflop_per_s']:.1f} | {r['speedup']:.2f}x "
            f"| {r['winograd_gain']:.2f}x | {r['calls']} |"
        )
    if args.peak:
        pk = result["peak_gflop_per_s"]
        lines += [
            "",
            f"matrix products on the same threads: 2048^3 {pk['matmul_2048']:.1f} GFLOP/s, the vertical "
            f"convolution as one product at batch {max(args.batch)} {pk['vertical_conv_as_matmul']:.1f} GFLOP/s",
        ]
        lines += [f"  1.6x the masked pass at batch {r['batch']} would be {1.6 * r['masked_gflop_per_s']:.1f} GFLOP/s"
                  for r in rows]  # fmt: skip
    if args.sample:
        smp = result["sampling"]
        lines += ["", f"cached sampling of {smp['n']} images (seconds per round, seed 0):"]
        lines += [f"  {name}: {', '.join(f'{t:.2f}' for t in ts)}" for name, ts in smp["seconds"].items()]
        lines.append(f"  speed-up (best of each): {smp['speedup']:.2f}x, identical images: {smp['identical']}")
    print("\n".join(lines))  # noqa: T201


def chunk_report(model: PixelCNN, args: argparse.Namespace) -> None:
    """``--chunks``: the fast pass's images/s by chunk size, one row per batch size."""
    rows = [measure_chunks(model, b, args.seconds, args.chunks) for b in args.batch]
    if args.json:
        print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "rows": rows}))  # noqa: T201
        return
    names = [f"chunk {n}" if n else "whole share" for n in args.chunks]
    threads, default = torch.get_num_threads(), rows[0]["default_chunk"]
    lines = [f"{args.model}: fast pass, {threads} threads, default chunk {default}", ""]
    lines += ["| batch | " + " | ".join(f"{n} (images/s)" for n in names) + " | calls each |"]
    lines += ["| --- | " + " | ".join("---" for _ in names) + " | --- |"]
    for r in rows:
        rates = " | ".join(f"{r['images_per_s'][n]:.2f}" for n in args.chunks)
        lines.append(f"| {r['batch']} | {rates} | {r['calls']} |")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
