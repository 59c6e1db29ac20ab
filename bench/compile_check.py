"""Does ``torch.compile`` pay for a shipped model's exact ``log_prob``? Eager against compiled, one run.

Loads one checkpoint on ``--device``, compiles its ``log_prob`` (inductor, ``dynamic=False``: one
graph per batch size, compiled before timing) and times both on the same random images at each batch
size, alternating call by call so that the machine's drift falls on both alike. Checks that the two
agree: the largest difference in log p(x) per dimension, in nats (issue 18 allows 1e-4). The compile
time is printed too: a server pays it once per batch size it meets (or it pads to a few sizes).

On CUDA each timed call ends with ``torch.cuda.synchronize()``. The eager PixelCNN on CPU runs its
fast forward (models/fast.py, what ``prepare_for_inference`` turns on); the compiled one compiles the
module's own convolutions (``model.fast`` is switched off for it).

    python bench/compile_check.py --model checkpoints/pixelcnn-fmnist --device cuda --batch 1 32 256 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import load_checkpoint


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(model: Any, compiled: Any, batch: int, seconds: float, device: torch.device) -> dict[str, Any]:
    """images/s of eager and compiled ``log_prob`` at one batch size, and their largest difference."""
    c, h, w = model.shape
    gen = torch.Generator().manual_seed(batch)
    x = torch.randint(0, model.levels, (batch, c, h, w), generator=gen).to(torch.uint8).to(device)
    y = (torch.arange(batch) % model.n_classes).to(device) if model.n_classes else None
    fast = getattr(model, "fast", None)

    def eager() -> torch.Tensor:
        return model.log_prob(x, y)

    def comp() -> torch.Tensor:
        if fast is not None:
            model.fast = None
        try:
            return compiled(x, y)
        finally:
            if fast is not None:
                model.fast = fast

    t0 = time.perf_counter()
    out_c = comp()  # compiles this batch size
    _sync(device)
    compile_s = time.perf_counter() - t0
    out_e = eager()
    dims = c * h * w
    max_diff = float((out_c.double() - out_e.double()).abs().max()) / dims
    variants = {"eager": eager, "compiled": comp}
    spent = dict.fromkeys(variants, 0.0)
    calls = dict.fromkeys(variants, 0)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for name, fn in variants.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            spent[name] += time.perf_counter() - t
            calls[name] += 1
    row: dict[str, Any] = {"batch": batch, "compile_s": compile_s, "max_diff_nats_per_dim": max_diff}
    for name in variants:
        row[f"{name}_images_per_s"] = calls[name] * batch / spent[name] if spent[name] else math.nan
    row["speedup"] = row["compiled_images_per_s"] / row["eager_images_per_s"]
    row["calls"] = calls["eager"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="checkpoints/pixelcnn-fmnist")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seconds", type=float, default=5.0, help="per batch size, both variants together")
    p.add_argument("--mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    model, _ = load_checkpoint(args.model, device=device)
    model.eval()
    model.prepare_for_inference()
    compiled = torch.compile(model.log_prob, dynamic=False, mode=args.mode)
    rows = [measure(model, compiled, b, args.seconds, device) for b in args.batch]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    result = {"model": args.model, "device": name, "torch": torch.__version__, "mode": args.mode, "rows": rows}
    if args.json:
        print(json.dumps(result))  # noqa: T201 - the benchmark's output
        return
    lines = [f"{args.model} on {name}, torch {torch.__version__}, compile mode {args.mode or 'default'}", ""]
    lines.append("| batch | eager (images/s) | compiled (images/s) | speed-up | max diff (nats/dim) | compile (s) |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['eager_images_per_s']:.1f} | {r['compiled_images_per_s']:.1f} | {r['speedup']:.2f}x "
            f"| {r['max_diff_nats_per_dim']:.2e} | {r['compile_s']:.1f} |"
        )
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
