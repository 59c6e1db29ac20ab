"""What does a server setting do to /score throughput? Configurations against each other, in one run.

On a shared, noisy machine two separate runs minutes apart differ by more than most settings do.
This bench alternates the configurations round after round (A B, B A, A B, ...), restarting the
real ``genserve serve`` for each, measures HTTP images/s with 1 and with 32 concurrent clients
(one image per request, as ``bench/throughput.py``), and reports each configuration's median over
the rounds and its ratio to the first configuration's median, with the CPU milliseconds the
server's processes spent per answered request (bench/proc_cpu.py: steadier than the rates on a
shared machine, since other work does not add to them).

    python bench/settings_ab.py --model vae-fmnist --client hey --rounds 3 \\
        --config GENSERVE_MAX_BATCH_WAIT_MS=0 --config GENSERVE_MAX_BATCH_WAIT_MS=5

A ``--config`` is a comma list of GENSERVE_* assignments, or of the thread libraries' variables
(OMP_*, GOMP_*, MKL_*, KMP_*: read once, when torch loads) (empty: the defaults; the server serves
``--model`` alone unless a config sets ``GENSERVE_MODELS``, ``GENSERVE_MODELS=`` serving every model
in the folder). With ``--sample MODEL:N`` each round also times sequential ``/sample`` requests of N
images from MODEL where that model is served, while one more client keeps scoring one image of
``--model`` at a time: the latency those scores see while a generation runs. With ``--baseline REV``
the first configuration is an earlier commit's server (its ``service/`` and ``models/``, unpacked with
``git archive``) with the first ``--config``'s settings, and each ``--config`` runs this tree: what a
change did to a served model, in one run (``--config GENSERVE_MODELS=``: with every model served).

    python bench/settings_ab.py --model pixelcnn-fmnist --client hey --baseline HEAD~1 --config ""
    python bench/settings_ab.py --model vae-fmnist --client hey --baseline HEAD~1 --config GENSERVE_MODELS=

With ``--pairs N`` two configurations run as the peer bench's paired phases (bench/paired.py): both
servers up at once, the idle one frozen, N pairs of short phases at each client count, and the median
of the pairs' ratios (B, the second, over A) with its confidence interval.

    python bench/settings_ab.py --model vae-fmnist --client hey --pairs 12 --seconds 4 --config "" \
        --config GENSERVE_MODEL_PROCESS=true
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_trees import ROOT, unpack
from paired import freeze, pairs_table, run_pairs, summarise_pairs, thaw
from throughput import (
    free_port,
    hey_phase,
    http_phase,
    http_phases,
    score_body,
    start_server,
    stop_server,
    wait_ready,
)

# What a configuration may set: genserve's settings, and the variables its thread libraries read at
# start (OpenMP's, GNU OpenMP's, MKL's), which no setting reaches once torch is loaded.
ENV_PREFIXES = ("GENSERVE_", "OMP_", "GOMP_", "MKL_", "KMP_")


def parse_config(text: str) -> dict[str, str]:
    """'GENSERVE_A=1,GENSERVE_B=x' -> {'GENSERVE_A': '1', 'GENSERVE_B': 'x'}. An item without '=' continues
    the value before it, so a setting that is itself a comma list reads as written:
    'GENSERVE_DEVICES=cpu,cpu,GENSERVE_TORCH_THREADS=1' -> {'GENSERVE_DEVICES': 'cpu,cpu', ...}."""
    out: dict[str, str] = {}
    last = ""
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep and last:
            out[last] += f",{item}"
            continue
        if not sep or not name.startswith(ENV_PREFIXES):
            raise argparse.ArgumentTypeError(
                f"'{item}' is not a NAME=value assignment of a GENSERVE_ setting or a thread library's variable "
                f"({', '.join(p + '*' for p in ENV_PREFIXES[1:])})"
            )
        out[name] = value
        last = name
    return out


def measure(args: argparse.Namespace, settings: dict[str, str], tree: Path = ROOT) -> dict[str, Any]:
    """One round of one configuration: a fresh server (run from ``tree``), the 1- and 32-client phases."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model_dir = Path(args.model_dir).resolve()  # the server's working folder may be another tree
    proc = start_server(model_dir, args.model, args.device, port, settings=settings, tree=tree)
    try:
        wait_ready(url, proc)
        body = score_body(url, args.model, args.score_type)
        out = http_phases(url, body, client=args.client, seconds=args.seconds, pid=proc.pid)
        if args.sample:
            out["sample"] = sample_phase(url, *args.sample, requests=args.sample_requests, score=body)
        return out
    finally:
        stop_server(proc)


def parse_sample(text: str) -> tuple[str, int]:
    """'pixelcnn-fmnist:16' -> ('pixelcnn-fmnist', 16)."""
    model, sep, n = text.rpartition(":")
    if not sep or not model or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not MODEL:N (N images per /sample request)")
    return model, int(n)


def sample_phase(url: str, model: str, n: int, *, requests: int, score: dict[str, Any]) -> dict[str, Any] | None:
    """``requests`` sequential /sample requests of ``n`` images (after one to warm up), while
    another client posts ``score`` in a loop; None where the server does not serve ``model``.

    Returns the median seconds per /sample and the median and 95th-percentile milliseconds of the
    scores answered meanwhile."""
    with httpx.Client(base_url=url, timeout=300) as client:
        if client.get(f"/models/{model}").status_code == 404:
            return None
        body = {"model": model, "n": n, "seed": 0}
        client.post("/sample", json=body).raise_for_status()
        stop, latencies = threading.Event(), []

        def score_loop() -> None:
            with httpx.Client(base_url=url, timeout=300) as scorer:
                while True:  # at least one score, even when the samples end before the first answer
                    start = time.perf_counter()
                    scorer.post("/score", json=score).raise_for_status()
                    latencies.append(1000 * (time.perf_counter() - start))
                    if stop.is_set():
                        break

        scoring = threading.Thread(target=score_loop)
        scoring.start()
        times = []
        try:
            for _ in range(requests):
                start = time.perf_counter()
                client.post("/sample", json=body).raise_for_status()
                times.append(time.perf_counter() - start)
        finally:
            stop.set()
            scoring.join()
    ordered = sorted(latencies)
    return {
        "seconds": statistics.median(times),
        "score_ms_median": statistics.median(ordered),
        "score_ms_p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "scores": len(ordered),
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    return statistics.median(r[key] for r in runs) if runs else None


def median_cpu(runs: list[Any], phase: str) -> float | None:
    """The median server CPU ms per request of a phase over rounds (None where /proc could not tell)."""
    values = [r[phase].get("cpu_ms_per_request") for r in runs]
    return None if any(v is None for v in values) else statistics.median(values)


def configurations(args: argparse.Namespace, tmp: Path) -> tuple[list[dict[str, str]], list[Path], list[str | None]]:
    """(settings, tree, name of an earlier commit or None) of each configuration: ``--baseline``'s first
    (its tree unpacked under ``tmp``, with the first ``--config``'s settings), then each ``--config``."""
    configs: list[dict[str, str]] = list(args.config)
    trees: list[Path] = [ROOT] * len(configs)
    names: list[str | None] = [None] * len(configs)
    if args.baseline:
        old = unpack(args.baseline, tmp, ("models", "service"))
        configs, trees = [dict(configs[0]), *configs], [old, *trees]
        names = [args.baseline, *names]
    return configs, trees, names


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration in every round (``--baseline``'s first), the order reversed every other round."""
    with tempfile.TemporaryDirectory() as tmp:
        configs, trees, names = configurations(args, Path(tmp))
        rounds: list[list[dict[str, Any] | None]] = [[None] * len(configs) for _ in range(args.rounds)]
        for r in range(args.rounds):
            order = range(len(configs)) if r % 2 == 0 else reversed(range(len(configs)))  # cancel drift
            for k in order:
                rounds[r][k] = measure(args, configs[k], trees[k])
    summary = []
    for k, settings in enumerate(configs):
        runs = [rounds[r][k] for r in range(args.rounds)]
        assert all(run is not None for run in runs)

        def median(key: str, field: str, runs: list[Any] = runs) -> float:
            return statistics.median(run[key][field] for run in runs)

        one, many = median("http_1_clients", "images_per_s"), median("http_32_clients", "images_per_s")
        sampled = [run["sample"] for run in runs if run.get("sample") is not None]
        summary.append(
            {
                "settings": settings,
                "tree": names[k],  # None: this tree
                "http_1_client_images_per_s": one,
                "http_32_clients_images_per_s": many,
                "mean_batch_32_clients": median("http_32_clients", "mean_batch_images"),
                "cpu_ms_per_request_1_client": median_cpu(runs, "http_1_clients"),
                "cpu_ms_per_request_32_clients": median_cpu(runs, "http_32_clients"),
                "errors": sum(run[key]["errors"] for run in runs for key in ("http_1_clients", "http_32_clients")),
                "batching_gain": many / one if one else None,
                "sample_seconds": median_of(sampled, "seconds"),
                "score_ms_median_while_sampling": median_of(sampled, "score_ms_median"),
                "score_ms_p95_while_sampling": median_of(sampled, "score_ms_p95"),
                "rounds": runs,
            }
        )
    base = summary[0]
    for s in summary:
        s["ratio_1_client"] = s["http_1_client_images_per_s"] / base["http_1_client_images_per_s"]
        s["ratio_32_clients"] = s["http_32_clients_images_per_s"] / base["http_32_clients_images_per_s"]
    return {
        "model": args.model,
        "device": args.device,
        "client": args.client,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "score_type": args.score_type,
        "sample": None if args.sample is None else {"model": args.sample[0], "n": args.sample[1]},
        "torch": torch.__version__,
        "configs": summary,
    }


def config_name(settings: dict[str, str], tree: str | None) -> str:
    name = " ".join(f"{k}={v}" for k, v in settings.items()) or "(the defaults)"
    return f"{tree}'s tree, {name}" if tree else name


def paired_server(args: argparse.Namespace, settings: dict[str, str], tree: Path) -> tuple[Any, Any]:
    """A server of one configuration, ready and frozen, and its ``load(clients, seconds)``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(Path(args.model_dir).resolve(), args.model, args.device, port, settings=settings, tree=tree)
    try:
        wait_ready(url, proc)
        body = score_body(url, args.model, args.score_type)
    except BaseException:
        stop_server(proc)
        raise
    freeze(proc.pid)

    def load(clients: int, seconds: float) -> dict[str, Any]:
        if args.client == "hey":
            return hey_phase(url, body, clients=clients, seconds=seconds)
        return asyncio.run(http_phase(url, body, clients=clients, seconds=seconds))

    return proc, load


def run_paired(args: argparse.Namespace) -> dict[str, Any]:
    """Two configurations, both servers up, each frozen while the other is loaded (bench/paired.py):
    ``--pairs`` pairs of phases at 1 and at 32 clients; ratios are B (the second) over A (the first)."""
    with tempfile.TemporaryDirectory() as tmp:
        configs, trees, names = configurations(args, Path(tmp))
        if len(configs) != 2:
            raise SystemExit("--pairs compares two configurations: --config twice, or --baseline REV and one --config")
        procs, loads = {}, {}
        try:
            for key, settings, tree in zip("AB", configs, trees, strict=True):
                procs[key], loads[key] = paired_server(args, settings, tree)
            pids = {key: proc.pid for key, proc in procs.items()}
            phases = run_pairs(
                pids, loads, clients=(1, 32), pairs=args.pairs, seconds=args.seconds, warm_seconds=args.warm_seconds
            )
        finally:
            for proc in procs.values():
                thaw(proc.pid)
                stop_server(proc)
    described = {key: config_name(settings, name) for key, settings, name in zip("AB", configs, names, strict=True)}
    return {
        "model": args.model, "device": args.device, "client": args.client, "seconds": args.seconds,
        "pairs": args.pairs, "warm_seconds": args.warm_seconds, "torch": torch.__version__, "configs": described,
        "models": [{"model": args.model, "clients": summarise_pairs(phases, "B", "A")}],
    }  # fmt: skip


def paired_text(result: dict[str, Any]) -> str:
    legend = "\n".join(f"{key}: {name}" for key, name in result["configs"].items())
    return f"model {result['model']} on {result['device']}\n{legend}\n\n" + pairs_table(result, "B", "A", ("B", "A"))


def cpu_pair(one: float | None, many: float | None) -> str:
    return "-" if one is None or many is None else f"{one:.2f} / {many:.2f}"


def table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']} on {result['device']}, HTTP client {result['client']}, "
        f"{result['seconds']:g} s per phase, medians of {result['rounds']} alternating rounds",
        "",
        f"{'settings':44} {'1 client':>9} {'32 clients':>11} {'batch':>6} {'gain':>6} {'vs first (1 / 32)':>18} "
        f"{'CPU ms/req (1 / 32)':>20}",
    ]
    sample = result["sample"]
    if sample:
        lines[0] += (
            f"; /sample: median seconds of a {sample['n']}-image request from {sample['model']}, and the "
            "median / 95th-percentile ms of one client's scores meanwhile"
        )
        lines[-1] += f" {'/sample s':>10} {'score ms':>13}"
    for s in result["configs"]:
        name = config_name(s["settings"], s["tree"])
        per_round = " ".join(f"{run['http_32_clients']['images_per_s']:.0f}" for run in s["rounds"])
        line = (
            f"{name:44} {s['http_1_client_images_per_s']:9.1f} {s['http_32_clients_images_per_s']:11.1f} "
            f"{s['mean_batch_32_clients']:6.1f} {s['batching_gain']:5.2f}x "
            f"{s['ratio_1_client']:8.2f} / {s['ratio_32_clients']:.2f} "
            f"{cpu_pair(s['cpu_ms_per_request_1_client'], s['cpu_ms_per_request_32_clients']):>20}"
        )
        if sample and s["sample_seconds"] is not None:
            during = f"{s['score_ms_median_while_sampling']:.0f} / {s['score_ms_p95_while_sampling']:.0f}"
            line += f" {s['sample_seconds']:10.2f} {during:>13}"
        elif sample:
            line += f" {'-':>10} {'-':>13}"
        lines.append(f"{line}   (32 clients by round: {per_round})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="checkpoints")
    p.add_argument("--model", required=True, help="checkpoint folder name under --model-dir")
    p.add_argument("--config", type=parse_config, action="append", default=[], help="GENSERVE_A=1,GENSERVE_B=2")
    p.add_argument("--baseline", metavar="REV", help="first, an earlier commit's server with the first --config")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every configuration once")
    p.add_argument("--seconds", type=float, default=8.0, help="duration of each HTTP phase")
    p.add_argument("--pairs", type=int, default=0, help="instead of rounds: two configurations both up, N pairs of "
                   "phases, the idle server frozen (bench/paired.py)")  # fmt: skip
    p.add_argument("--warm-seconds", type=float, default=1.0, help="with --pairs: unmeasured load before each phase")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--score-type", default="nll")
    p.add_argument("--client", choices=["httpx", "hey"], default="httpx")
    p.add_argument("--sample", type=parse_sample, help="MODEL:N: also time /sample of N images from MODEL")
    p.add_argument("--sample-requests", type=int, default=3, help="timed /sample requests per round")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    if len(args.config) < (1 if args.baseline else 2):
        p.error("give at least two configurations to compare: --config twice, or --baseline REV and a --config")
    if args.pairs and args.sample:
        p.error("--sample times /sample within rounds; leave out --pairs to use it")
    if args.pairs:
        result = run_paired(args)
        print(json.dumps(result) if args.json else paired_text(result))  # noqa: T201 - the benchmark's output
        return
    result = run(args)
    print(json.dumps(result) if args.json else table(result))  # noqa: T201 - the benchmark's output


if __name__ == "__main__":
    main()
