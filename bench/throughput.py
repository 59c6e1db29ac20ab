"""How many images per second does /score serve, and how much does dynamic batching buy?

Measures, in one run and on one machine:
  1. in-process: what /score runs (``Scorer.compute`` for the score type, on batches of 32 and of 1),
     no HTTP;
  2. HTTP with 1 client, each request one image (no batching possible);
  3. HTTP with 32 concurrent clients, each request one image (the batcher merges them).
The server is the real ``genserve serve`` (uvicorn) in a subprocess on loopback. The clients are
httpx in this process (``--client httpx``, the default) or the ``hey`` load generator
(``--client hey``; Debian package ``hey``), a compiled client that takes far less of the CPU the
server shares with it on a small machine.

    python bench/throughput.py --model-dir checkpoints --model pixelcnn-fmnist --seconds 10 [--json]
    python bench/throughput.py --model vae-fmnist --client hey

``batching_gain`` = 32-client ÷ 1-client images/s; ``http_vs_inprocess`` = 32-client HTTP ÷ in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from proc_cpu import cpu_ms_per_request, tree_cpu_seconds  # noqa: E402

from models.scoring.scorer import load_scorer  # noqa: E402

logger = logging.getLogger("bench.throughput")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_png(shape: list[int], seed: int = 0) -> str:
    """A random image of the model's (C, H, W), base64 PNG."""
    c, h, w = shape
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w) if c == 1 else (h, w, c), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@torch.inference_mode()
def in_process(folder: Path, device: str, *, batch: int, seconds: float, score_type: str) -> float:
    """Images/s of the scorer the service runs (``Scorer.compute`` for ``score_type``: for a VAE the
    calibrated IWAE k, not log_prob's k=128) on batches of ``batch`` random images, without HTTP,
    with the model prepared as a worker prepares it (``prepare_for_inference``)."""
    scorer, _ = load_scorer(folder, device)
    model = scorer.model
    model.prepare_for_inference()
    c, h, w = model.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.levels, (batch, c, h, w), generator=gen).to(torch.uint8).to(device)
    y = torch.zeros(batch, dtype=torch.long, device=device) if model.n_classes is not None else None
    scorer.compute(x, y, [score_type])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        scorer.compute(x, y, [score_type])
        done += batch
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


async def http_phase(url: str, body: dict[str, Any], *, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` concurrent loops, each posting one-image /score requests for ``seconds``."""
    ok = errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await client.post("/score", json=body)  # open a connection and warm the path
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal ok, errors
            while time.perf_counter() < deadline:
                r = await client.post("/score", json=body)
                if r.status_code == 200:
                    ok += 1
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"images_per_s": ok / elapsed, "requests": ok, "errors": errors}


def hey_phase(url: str, body: dict[str, Any], *, clients: int, seconds: float) -> dict[str, float]:
    """The same load from ``hey``: ``clients`` workers posting one-image /score requests."""
    exe = shutil.which("hey")
    if exe is None:
        raise SystemExit("--client hey needs the hey load generator (Debian: apt-get install hey)")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(body, f)
        f.flush()
        httpx.post(f"{url}/score", json=body, timeout=60).raise_for_status()  # warm the path
        cmd = [exe, "-z", f"{seconds:g}s", "-c", str(clients), "-m", "POST", "-T", "application/json"]
        out = subprocess.run([*cmd, "-D", f.name, f"{url}/score"], capture_output=True, text=True, check=True).stdout
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:
        raise SystemExit(f"could not read hey's output:\n{out}")
    ok = codes.get(200, 0)
    total = sum(codes.values())
    # Requests/sec counts every response; images/s counts the successful ones (one image each).
    return {"images_per_s": float(rate.group(1)) * (ok / total if total else 0.0), "requests": ok, "errors": total - ok}


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram, summed over workers."""
    total = count = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("genserve_batch_images_sum{") and 'op="score"' in line:
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("genserve_batch_images_count{") and 'op="score"' in line:
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def start_server(
    model_dir: Path,
    model: str,
    device: str,
    port: int,
    *,
    settings: dict[str, str] | None = None,
    tree: Path = ROOT,
) -> subprocess.Popen[bytes]:
    """``genserve serve`` for one model; ``settings``: GENSERVE_* variables over this environment's
    (``GENSERVE_MODELS`` among them serves others beside it; empty: every model in the folder);
    ``tree``: the folder whose ``service/`` and ``models/`` run (an earlier commit's, unpacked).
    ``device`` is the server's ``--devices`` unless ``settings`` sets ``GENSERVE_DEVICES`` (a flag
    would override it: ``cpu,cpu`` for two CPU workers)."""
    env = {**os.environ, "GENSERVE_MAX_QUEUE": "4096", "GENSERVE_MODELS": model, **(settings or {})}
    cmd = server_command(model_dir, device, port, settings or {})
    return subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def server_command(model_dir: Path, device: str, port: int, settings: dict[str, str]) -> list[str]:
    """The ``genserve serve`` command line: ``--devices device`` unless the settings choose the devices."""
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--model-dir", str(model_dir)]
    return cmd if "GENSERVE_DEVICES" in settings else [*cmd, "--devices", device]


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()  # reaped, not left a zombie


def score_body(url: str, model: str, score_type: str) -> dict[str, Any]:
    """A one-image /score request for the served model (labelled if the model is conditional)."""
    info = httpx.get(f"{url}/models/{model}", timeout=10).json()
    if "pass_sizes" in info:  # the warm-up sweep's choice (GENSERVE_BATCH_SWEEP)
        print(f"{model}: passes of up to {info['pass_sizes']} images", file=sys.stderr)  # noqa: T201
    body: dict[str, Any] = {"model": model, "images": [random_png(info["shape"])], "score_type": score_type}
    if info["conditional"]:
        body["label"] = 0
    return body


def http_phases(
    url: str, body: dict[str, Any], *, client: str, seconds: float, pid: int | None = None
) -> dict[str, Any]:
    """Images/s (and the mean batch the server formed) with 1 and with 32 concurrent clients; with
    the server's ``pid``, the CPU milliseconds its processes spent per answered request (bench/proc_cpu.py)."""
    out: dict[str, Any] = {}
    for clients in (1, 32):
        before = batch_stats(url)
        cpu_before = None if pid is None else tree_cpu_seconds(pid)
        phase: dict[str, Any] = {}
        if client == "hey":
            phase.update(hey_phase(url, body, clients=clients, seconds=seconds))
        else:
            phase.update(asyncio.run(http_phase(url, body, clients=clients, seconds=seconds)))
        cpu_after = None if pid is None else tree_cpu_seconds(pid)
        after = batch_stats(url)
        batches = after[1] - before[1]
        phase["mean_batch_images"] = (after[0] - before[0]) / batches if batches else 0.0
        phase["cpu_ms_per_request"] = cpu_ms_per_request(cpu_before, cpu_after, int(phase["requests"]))
        out[f"http_{clients}_clients"] = phase
    return out


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}; run `genserve serve` by hand to see why")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling another process; there is no event to wait on
    raise SystemExit(f"server not ready after {timeout} s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.model_dir) / args.model
    result: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "seconds": args.seconds,
        "score_type": args.score_type,
        "client": args.client,
    }
    kw = {"seconds": args.seconds, "score_type": args.score_type}
    result["inprocess_batch32_images_per_s"] = in_process(folder, args.device, batch=32, **kw)
    # The ceiling for any batching gain: how much faster the model itself runs at batch 32 than at 1.
    result["inprocess_batch1_images_per_s"] = in_process(folder, args.device, batch=1, **kw)
    result["inprocess_batching_ceiling"] = (
        result["inprocess_batch32_images_per_s"] / result["inprocess_batch1_images_per_s"]
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(Path(args.model_dir), args.model, args.device, port)
    try:
        wait_ready(url, proc)
        # the same score type as the in-process rows: the server computes what they compute, like for like
        body = score_body(url, args.model, args.score_type)
        result |= http_phases(url, body, client=args.client, seconds=args.seconds, pid=proc.pid)
    finally:
        stop_server(proc)
    one = result["http_1_clients"]["images_per_s"]
    many = result["http_32_clients"]["images_per_s"]
    result["batching_gain"] = many / one if one else None
    result["http_vs_inprocess"] = many / result["inprocess_batch32_images_per_s"]
    result["cpu_count"] = os.cpu_count()
    result["torch"] = torch.__version__
    result["server_settings"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("GENSERVE_")}
    return result


def cpu_cell(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def table(r: dict[str, Any]) -> str:
    rows = [
        ("in-process scorer, batch 1", r["inprocess_batch1_images_per_s"], "", "", ""),
        ("in-process scorer, batch 32", r["inprocess_batch32_images_per_s"], "", "", ""),
        *(
            (
                f"HTTP /score, {c} client{'s' if c > 1 else ''}",
                r[f"http_{c}_clients"]["images_per_s"],
                f"{r[f'http_{c}_clients']['mean_batch_images']:.1f}",
                cpu_cell(r[f"http_{c}_clients"].get("cpu_ms_per_request")),
                str(r[f"http_{c}_clients"]["errors"]),
            )
            for c in (1, 32)
        ),
    ]
    lines = [f"model {r['model']} on {r['device']}, {r['seconds']:g} s per row, HTTP client {r['client']}"]
    settings = " ".join(f"{k}={v}" for k, v in r["server_settings"].items())
    lines += [f"server settings from the environment: {settings or 'none (the defaults)'}", ""]
    lines.append(f"{'':32} {'images/s':>10} {'mean batch':>11} {'server CPU ms/request':>22} {'errors':>7}")
    lines += [f"{name:32} {ips:10.1f} {mb:>11} {cpu:>22} {err:>7}" for name, ips, mb, cpu, err in rows]
    lines.append("")
    lines.append(f"batching gain (32 clients / 1 client): {r['batching_gain']:.2f}x")
    lines.append(f"HTTP (32 clients) / in-process:        {r['http_vs_inprocess']:.2f}")
    lines.append(f"in-process batch 32 / batch 1 (ceiling): {r['inprocess_batching_ceiling']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="checkpoints")
    p.add_argument("--model", required=True, help="checkpoint folder name under --model-dir")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each of the three measurements")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N, for the server and the in-process pass")
    p.add_argument("--score-type", default="nll", help="score_type sent to /score (nll = log_prob only)")
    p.add_argument("--client", choices=["httpx", "hey"], default="httpx", help="HTTP load generator")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    result = run(args)
    print(json.dumps(result) if args.json else table(result))  # noqa: T201 - the benchmark's output


if __name__ == "__main__":
    main()
