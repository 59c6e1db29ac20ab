"""genserve against a peer (LitServe) on the same checkpoints: images/s at 1 and 32 clients, in one run.

For every model, round after round, the two servers run one at a time in alternating order
(genserve then LitServe, LitServe then genserve, ...), each freshly started, so that the machine's
drift falls on both alike; medians over the rounds and their ratios are printed. Both serve the same
one-image request (the body genserve's /score takes: one base64 28x28 PNG, ``score_type: "nll"``,
``label: 0`` for a class-conditional model) and compute the same thing (``Scorer.compute`` for
"nll", the model loaded by the same loader and prepared as a genserve worker prepares it):

- genserve: the real ``genserve serve`` with that one model (``GENSERVE_MODELS``), default settings;
- LitServe: bench/peer_litserve.py, ``max_batch_size=32``, ``batch_timeout=0`` (the ``bench`` extra).

The in-process row runs the same computation on batches of 32 images with no HTTP (once per round,
between the servers): HTTP at 32 clients over it says what the serving stack costs.

    python bench/peer_bench.py --seconds 10 --rounds 2                  # every shipped model, hey
    python bench/peer_bench.py --models pixelcnn-fmnist --client httpx --json
    python bench/peer_bench.py --pairs 12 --seconds 4    # both servers up, paired phases (bench/paired.py)

The clients are ``hey -z`` (Debian package ``hey``) where installed, else httpx in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import paired  # noqa: E402
from proc_cpu import busiest_threads, cpu_ms_per_request, thread_cpu_seconds, tree_cpu_seconds  # noqa: E402
from throughput import free_port, in_process, random_png  # noqa: E402

from models.checkpoint import META, read_metadata  # noqa: E402

logger = logging.getLogger("bench.peer")

SERVERS = ("genserve", "litserve")
CLIENTS = (1, 32)


def shipped_models(model_dir: Path) -> list[str]:
    """Every checkpoint folder directly under ``model_dir`` (a model's background/ is not one)."""
    return sorted(p.parent.name for p in model_dir.glob(f"*/{META}"))


def request_body(model_dir: Path, model: str) -> dict[str, Any]:
    """The one-image request both servers get: genserve's /score body (LitServe ignores the extra fields)."""
    meta = read_metadata(model_dir / model)
    cfg = meta["config"]
    body: dict[str, Any] = {
        "model": model,
        "images": [random_png([cfg["in_channels"], cfg["height"], cfg["width"]])],
        "score_type": "nll",
    }
    if cfg.get("n_classes"):
        body["label"] = 0
    return body


def start(server: str, model_dir: Path, model: str, port: int, device: str = "cpu") -> subprocess.Popen[bytes]:
    """One server in its own process group (LitServe starts worker processes of its own)."""
    if server == "genserve":
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--model-dir", str(model_dir)]
        cmd += ["--devices", device]
        env = {**os.environ, "GENSERVE_MAX_QUEUE": "4096", "GENSERVE_MODELS": model}
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "peer_litserve.py"), "--model-dir", str(model_dir)]
        cmd += ["--model", model, "--port", str(port), "--device", device]
        env = dict(os.environ)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL after 15 s."""
    with_group = proc.poll() is None
    if with_group:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if with_group:  # LitServe's workers, if any outlived their parent
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server {url} exited with code {proc.returncode}; start it by hand to see why")
        for path in ("/readyz", "/health"):  # genserve, LitServe
            try:
                if httpx.get(url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.2)  # polling another process; there is no event to wait on
    raise SystemExit(f"server {url} not ready after {timeout} s")


def parse_hey(out: str) -> dict[str, float]:
    """images/s (successful responses only), requests and errors from ``hey``'s summary."""
    import re

    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:
        raise ValueError(f"could not read hey's output:\n{out}")
    ok, total = codes.get(200, 0), sum(codes.values())
    return {"images_per_s": float(rate.group(1)) * (ok / total if total else 0.0), "requests": ok, "errors": total - ok}


def hey_load(url: str, body: dict[str, Any], *, clients: int, seconds: float) -> dict[str, float]:
    exe = shutil.which("hey")
    assert exe is not None
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(body, f)
        f.flush()
        cmd = [exe, "-z", f"{seconds:g}s", "-c", str(clients), "-m", "POST", "-T", "application/json", "-D", f.name]
        out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    return parse_hey(out)


async def httpx_load(url: str, body: dict[str, Any], *, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` closed loops posting ``body`` for ``seconds``."""
    ok = errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal ok, errors
            while time.perf_counter() < deadline:
                r = await client.post(url, json=body)
                ok, errors = (ok + 1, errors) if r.status_code == 200 else (ok, errors + 1)

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"images_per_s": ok / elapsed, "requests": ok, "errors": errors}


def serve_and_load(server: str, model_dir: Path, model: str, body: dict[str, Any], args: argparse.Namespace) -> dict:
    """Start ``server``, warm it, load it at 1 then 32 clients, stop it: {clients: phase}."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = base + ("/score" if server == "genserve" else "/predict")
    proc = start(server, model_dir, model, port, args.device)
    try:
        wait_ready(base, proc)
        for _ in range(3):  # warm the path (and LitServe's first batch)
            httpx.post(url, json=body, timeout=120).raise_for_status()
        out = {}
        for clients in CLIENTS:
            cpu_before = tree_cpu_seconds(proc.pid)
            threads_before = thread_cpu_seconds(proc.pid) if args.threads else None
            if args.client == "hey":
                out[clients] = hey_load(url, body, clients=clients, seconds=args.seconds)
            else:
                out[clients] = asyncio.run(httpx_load(url, body, clients=clients, seconds=args.seconds))
            # every process of the server (LitServe's workers, genserve's HTTP processes and model servers)
            got: dict[str, Any] = out[clients]
            got["cpu_ms_per_request"] = cpu_ms_per_request(cpu_before, tree_cpu_seconds(proc.pid), int(got["requests"]))
            if args.threads:  # where that CPU went, the busiest threads first
                after = thread_cpu_seconds(proc.pid)
                got["threads"] = busiest_threads(
                    threads_before, after, int(got["requests"]), root=proc.pid, top=args.threads
                )
        return out
    finally:
        stop(proc)


def load_fn(url: str, body: dict[str, Any], args: argparse.Namespace) -> Any:
    """``load(clients, seconds)``: one phase of ``args.client`` against ``url``."""
    if args.client == "hey":
        return lambda clients, seconds: hey_load(url, body, clients=clients, seconds=seconds)
    return lambda clients, seconds: asyncio.run(httpx_load(url, body, clients=clients, seconds=seconds))


def paired_model(model_dir: Path, model: str, body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Both servers up at once, each frozen while the other is loaded (bench/paired.py): ``args.pairs``
    pairs of phases at 1 and at 32 clients, and the in-process rate before and after (both frozen)."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        loads = {}
        for server in SERVERS:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            url = base + ("/score" if server == "genserve" else "/predict")
            procs[server] = start(server, model_dir, model, port, args.device)
            wait_ready(base, procs[server])
            for _ in range(3):  # warm the path (and LitServe's first batch)
                httpx.post(url, json=body, timeout=120).raise_for_status()
            paired.freeze(procs[server].pid)
            loads[server] = load_fn(url, body, args)
        inproc = [in_process(model_dir / model, args.device, batch=32, seconds=args.seconds, score_type="nll")]
        pids = {name: p.pid for name, p in procs.items()}
        phases = paired.run_pairs(
            pids, loads, clients=CLIENTS, pairs=args.pairs, seconds=args.seconds, warm_seconds=args.warm_seconds
        )
        inproc.append(in_process(model_dir / model, args.device, batch=32, seconds=args.seconds, score_type="nll"))
    finally:
        for p in procs.values():
            paired.thaw(p.pid)
            stop(p)
    out = {"model": model, "inprocess_32": statistics.mean(inproc)}
    return out | {"clients": paired.summarise_pairs(phases, "genserve", "litserve")}


def summarise(model: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of each server's images/s at each client count, and their ratios."""
    s: dict[str, Any] = {"model": model, "rounds": rounds}
    for server in SERVERS:
        for c in CLIENTS:
            s[f"{server}_{c}"] = statistics.median(r[server][c]["images_per_s"] for r in rounds)
    s["inprocess_32"] = statistics.median(r["inprocess_32"] for r in rounds)
    s["errors"] = sum(r[srv][c]["errors"] for r in rounds for srv in SERVERS for c in CLIENTS)
    for server in SERVERS:
        for c in CLIENTS:
            cpu = [r[server][c].get("cpu_ms_per_request") for r in rounds]
            s[f"{server}_{c}_cpu_ms"] = None if None in cpu else statistics.median(cpu)
    for c in CLIENTS:  # > 1: genserve spends less CPU per request than LitServe
        mine, peer = s[f"genserve_{c}_cpu_ms"], s[f"litserve_{c}_cpu_ms"]
        s[f"cpu_ratio_{c}"] = peer / mine if mine and peer is not None else None
    for c in CLIENTS:
        peer = s[f"litserve_{c}"]
        s[f"ratio_{c}"] = s[f"genserve_{c}"] / peer if peer else None
    for server in SERVERS:
        s[f"{server}_32_vs_inprocess"] = s[f"{server}_32"] / s["inprocess_32"] if s["inprocess_32"] else None
    for server in SERVERS:
        for c in CLIENTS:
            s[f"{server}_{c}_threads"] = thread_ranks([r[server][c].get("threads") for r in rounds])
    return s


def thread_ranks(rounds: list[list[dict[str, Any]] | None]) -> list[dict[str, Any]] | None:
    """The busiest threads by rank (the busiest first): the median over rounds of each rank's CPU ms per
    request, and where the first round's thread of that rank ran; None unless every round has them."""
    if not rounds or any(r is None for r in rounds):
        return None
    ranks = min(len(r) for r in rounds if r is not None)
    return [
        {
            "ms_per_request": statistics.median(r[k]["ms_per_request"] for r in rounds if r is not None),
            "where": rounds[0][k]["where"] if rounds[0] is not None else "",
        }
        for k in range(ranks)
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = Path(args.model_dir)
    models = args.models or shipped_models(model_dir)
    result: dict[str, Any] = {"seconds": args.seconds, "rounds": args.rounds, "client": args.client}
    result |= {"device": args.device, "models": []}
    if args.pairs:
        result |= {"pairs": args.pairs, "warm_seconds": args.warm_seconds}
    for model in models:
        body = request_body(model_dir, model)
        if args.pairs:
            result["models"].append(paired_model(model_dir, model, body, args))
            logger.info("%s: %s", model, result["models"][-1])
            continue
        rounds = []
        for r in range(args.rounds):
            order = SERVERS if r % 2 == 0 else SERVERS[::-1]
            got: dict[str, Any] = {}
            got[order[0]] = serve_and_load(order[0], model_dir, model, body, args)
            got["inprocess_32"] = in_process(
                model_dir / model, args.device, batch=32, seconds=args.seconds, score_type="nll"
            )
            got[order[1]] = serve_and_load(order[1], model_dir, model, body, args)
            rounds.append(got)
            logger.info("%s round %d: %s", model, r + 1, got)
        result["models"].append(summarise(model, rounds))
    result["cpu_count"] = os.cpu_count()
    result["torch"] = torch.__version__
    return result


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"images/s, medians of {result['rounds']} alternating rounds of {result['seconds']:g} s per row, "
        f"client {result['client']}; ratio = genserve / LitServe",
        "",
        "| model | genserve, 1 client | LitServe, 1 client | ratio | genserve, 32 clients | LitServe, 32 clients "
        "| ratio | in-process batch 32 | genserve 32 / in-process | LitServe 32 / in-process | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in result["models"]:
        lines.append(
            f"| {s['model']} | {fmt(s['genserve_1'])} | {fmt(s['litserve_1'])} | {fmt(s['ratio_1'], '.2f')} "
            f"| {fmt(s['genserve_32'])} | {fmt(s['litserve_32'])} | {fmt(s['ratio_32'], '.2f')} "
            f"| {fmt(s['inprocess_32'])} | {fmt(s['genserve_32_vs_inprocess'], '.2f')} "
            f"| {fmt(s['litserve_32_vs_inprocess'], '.2f')} | {s['errors']} |"
        )
    lines += [
        "",
        "server CPU ms per answered request (every process of each server; bench/proc_cpu.py), medians; "
        "ratio = LitServe / genserve (above 1: genserve spends less)",
        "",
        "| model | genserve, 1 client | LitServe, 1 client | ratio | genserve, 32 clients | LitServe, 32 clients "
        "| ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in result["models"]:
        lines.append(
            f"| {s['model']} | {fmt(s.get('genserve_1_cpu_ms'), '.2f')} | {fmt(s.get('litserve_1_cpu_ms'), '.2f')} "
            f"| {fmt(s.get('cpu_ratio_1'), '.2f')} | {fmt(s.get('genserve_32_cpu_ms'), '.2f')} "
            f"| {fmt(s.get('litserve_32_cpu_ms'), '.2f')} | {fmt(s.get('cpu_ratio_32'), '.2f')} |"
        )
    if any(s.get("genserve_1_threads") for s in result["models"]):
        lines += ["", *thread_table(result)]
    return "\n".join(lines)


def thread_table(result: dict[str, Any]) -> list[str]:
    """The ``--threads`` section: each server's busiest threads by rank, CPU ms per request."""
    ranks = max(len(s.get(f"{srv}_{c}_threads") or []) for s in result["models"] for srv in SERVERS for c in CLIENTS)
    lines = [
        "busiest threads, CPU ms per answered request by rank (busiest first), medians over rounds; "
        "s: in the server's own process, c: in a child process (LitServe's worker, genserve's model server)",
        "",
        "| model | server | clients | " + " | ".join(f"thread {k + 1}" for k in range(ranks)) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in range(ranks)) + " |",
    ]
    for s in result["models"]:
        for srv in SERVERS:
            for c in CLIENTS:
                row = s.get(f"{srv}_{c}_threads") or []
                cells = [f"{t['ms_per_request']:.2f} ({t['where'][0]})" for t in row] + ["-"] * (ranks - len(row))
                lines.append(f"| {s['model']} | {srv} | {c} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="checkpoints")
    p.add_argument("--models", nargs="*", help="checkpoint folders under --model-dir (default: every one)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each load phase")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per model")
    p.add_argument(
        "--pairs", type=int, default=0, help="instead of rounds: both servers up, N pairs of phases (bench/paired.py)"
    )
    p.add_argument("--warm-seconds", type=float, default=1.0, help="with --pairs: unmeasured load before each phase")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N, for both servers and the in-process row")
    p.add_argument(
        "--client", choices=["hey", "httpx"], default="hey" if shutil.which("hey") else "httpx", help="load generator"
    )
    p.add_argument("--threads", type=int, default=0, metavar="N", help="also the N busiest threads' CPU per request")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.client == "hey" and shutil.which("hey") is None:
        p.error("--client hey needs the hey load generator (Debian: apt-get install hey)")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        import litserve  # noqa: F401
    except ImportError:
        raise SystemExit('the peer needs LitServe: pip install -e ".[bench]"') from None
    result = run(args)
    print(json.dumps(result) if args.json else paired.pairs_table(result) if args.pairs else table(result))  # noqa: T201 - the benchmark's output


if __name__ == "__main__":
    main()
