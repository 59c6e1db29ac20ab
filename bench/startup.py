"""Seconds from ``genserve serve`` to a ready server (/readyz 200): this tree against an earlier commit's.

The earlier commit's ``models/`` and ``service/`` are unpacked into a temporary folder and served
from there with this tree's checkpoints; the rounds alternate which tree starts first.
Startup is what an autoscaler waits for on every new replica, and what a reload costs.

    python bench/startup.py --rev HEAD~1 --models pixelcnn-fmnist --rounds 5
    python bench/startup.py --rev HEAD~1 --models ""            # every shipped model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from ab_trees import alternate, unpack  # noqa: E402
from throughput import free_port, stop_server  # noqa: E402


def seconds_to_ready(tree: Path, model_dir: Path, models: str, timeout: float = 300.0) -> float:
    """Start ``python -m service.cli serve`` from ``tree`` (its packages come first on the path) and
    time it until /readyz answers 200; the server is stopped before returning."""
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--model-dir", str(model_dir)]
    env = {**os.environ, "GENSERVE_MODELS": models}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"the server in {tree} exited with code {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling another process; there is no event to wait on
        raise SystemExit(f"the server in {tree} was not ready after {timeout} s")
    finally:
        stop_server(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", default="HEAD", help="the earlier commit to compare with")
    p.add_argument("--model-dir", default=str(ROOT / "checkpoints"))
    p.add_argument("--models", default="pixelcnn-fmnist", help="GENSERVE_MODELS for both (empty: every model)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    model_dir = Path(args.model_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        old = unpack(args.rev, Path(tmp), ("models", "service"))
        trees = {args.rev: old, "this tree": ROOT}
        got = alternate(trees, args.rounds, lambda _name, tree, _r: seconds_to_ready(tree, model_dir, args.models))
    medians = {name: statistics.median(v) for name, v in got.items()}
    result = {"models": args.models or "(every model)", "rounds": got, "medians": medians}
    result["ratio"] = medians[args.rev] / medians["this tree"]
    if args.json:
        print(json.dumps(result))  # noqa: T201 - the benchmark's output
        return
    print(f"seconds to /readyz 200, GENSERVE_MODELS={result['models']}, medians of {args.rounds} alternating rounds")  # noqa: T201
    for name, v in got.items():
        print(f"{name:12} {medians[name]:7.2f}   by round: {', '.join(f'{s:.2f}' for s in v)}")  # noqa: T201
    print(f"{args.rev} / this tree: {result['ratio']:.2f}x")  # noqa: T201


if __name__ == "__main__":
    main()
