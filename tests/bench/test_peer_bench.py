"""The peer bench (bench/peer_bench.py, bench/peer_litserve.py) on tiny models; its figures live in docs/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import peer_bench  # noqa: E402
from peer_litserve import ScoreAPI, decode_png  # noqa: E402
from throughput import random_png  # noqa: E402

from models.scoring.scorer import load_scorer  # noqa: E402

HEY_OUTPUT = """
Summary:
  Total:	10.0110 secs
  Requests/sec:	41.2546

Status code distribution:
  [200]	400 responses
  [503]	13 responses
"""


def test_arguments_models_and_request_bodies(model_dir: Path) -> None:
    args = peer_bench.parse_args(["--model-dir", str(model_dir), "--client", "httpx", "--seconds", "0.5"])
    assert (args.client, args.seconds, args.rounds, args.models) == ("httpx", 0.5, 2, None)
    assert peer_bench.shipped_models(model_dir) == ["pixelcnn", "pixelcnn-cond", "vae"]
    body = peer_bench.request_body(model_dir, "pixelcnn-cond")
    assert body["score_type"] == "nll" and body["label"] == 0 and len(body["images"]) == 1
    assert "label" not in peer_bench.request_body(model_dir, "pixelcnn")


def test_hey_output_counts_only_successful_images() -> None:
    got = peer_bench.parse_hey(HEY_OUTPUT)
    assert got["requests"] == 400 and got["errors"] == 13
    assert got["images_per_s"] == pytest.approx(41.2546 * 400 / 413)
    with pytest.raises(ValueError, match="could not read hey's output"):
        peer_bench.parse_hey("nothing")


def test_summary_takes_medians_and_ratios() -> None:
    def phase(rate: float, cpu: float | None = 2.0) -> dict[str, float | None]:
        return {"images_per_s": rate, "requests": 1, "errors": 0, "cpu_ms_per_request": cpu}

    rounds = [
        {
            "genserve": {1: phase(10), 32: phase(30, 3)},
            "litserve": {1: phase(5), 32: phase(20, 6)},
            "inprocess_32": 40.0,
        },
        {
            "genserve": {1: phase(12), 32: phase(34, 5)},
            "litserve": {1: phase(6, None), 32: phase(20, 6)},
            "inprocess_32": 40.0,
        },
    ]
    s = peer_bench.summarise("m", rounds)
    assert s["genserve_32_cpu_ms"] == 4 and s["litserve_32_cpu_ms"] == 6 and s["cpu_ratio_32"] == 1.5
    assert s["litserve_1_cpu_ms"] is None and s["cpu_ratio_1"] is None  # a round without /proc: no median
    assert s["genserve_1"] == 11 and s["litserve_1"] == 5.5 and s["ratio_1"] == 2.0
    assert s["genserve_32"] == 32 and s["ratio_32"] == pytest.approx(1.6)
    assert s["genserve_32_vs_inprocess"] == pytest.approx(0.8) and s["errors"] == 0
    text = peer_bench.table({"rounds": 2, "seconds": 1.0, "client": "httpx", "models": [s]})
    assert "| m | 11.0 | 5.5 | 2.00 | 32.0 | 20.0 | 1.60 | 40.0 | 0.80 | 0.50 | 0 |" in text


def test_threads_are_summarised_by_rank_and_tabled() -> None:
    def phase(*ms: float, where: str = "server") -> dict[str, Any]:
        threads = [{"ms_per_request": m, "where": where} for m in ms]
        return {"images_per_s": 1.0, "requests": 1, "errors": 0, "cpu_ms_per_request": sum(ms), "threads": threads}

    rounds = [
        {"genserve": {1: phase(10, 8), 32: phase(6, 5)}, "litserve": {1: phase(9, 9, where="child"),
         32: phase(5, 4, where="child")}, "inprocess_32": 1.0},
        {"genserve": {1: phase(12, 6), 32: phase(8, 3)}, "litserve": {1: phase(11, 7, where="child"),
         32: phase(7, 2, where="child")}, "inprocess_32": 1.0},
    ]  # fmt: skip
    s = peer_bench.summarise("m", rounds)
    assert s["genserve_1_threads"] == [
        {"ms_per_request": 11, "where": "server"},
        {"ms_per_request": 7, "where": "server"},
    ]
    assert [t["ms_per_request"] for t in s["litserve_32_threads"]] == [6, 3]
    text = peer_bench.table({"rounds": 2, "seconds": 1.0, "client": "httpx", "models": [s]})
    assert "| m | genserve | 1 | 11.00 (s) | 7.00 (s) |" in text
    assert "| m | litserve | 32 | 6.00 (c) | 3.00 (c) |" in text
    bare = [{**r, "genserve": {c: {**p, "threads": None} for c, p in r["genserve"].items()}} for r in rounds]
    without = peer_bench.summarise("m", bare)
    assert without["genserve_1_threads"] is None  # a round without the readings: no medians
    assert peer_bench.parse_args(["--threads", "3", "--client", "httpx"]).threads == 3


def test_the_peer_computes_what_genserve_computes_for_nll(model_dir: Path) -> None:
    """LitServe's steps, called directly (LitServe itself is not needed for them)."""
    api = ScoreAPI(model_dir / "pixelcnn-cond")
    api.setup("cpu")
    requests = [{"images": [random_png([1, 8, 8], seed=s)], "label": s % 3, "score_type": "nll"} for s in range(3)]
    decoded = [api.decode_request(r) for r in requests]
    x, y = api.batch(decoded)
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.uint8 and y is not None and y.tolist() == [0, 1, 2]
    out = api.unbatch(api.predict((x, y)))
    scorer, _ = load_scorer(model_dir / "pixelcnn-cond")
    scorer.model.prepare_for_inference()
    with torch.inference_mode():
        want = scorer.compute(x, y, ["nll"]).log_prob["nll"]
    assert out == pytest.approx(want.tolist(), abs=1e-3)
    answer = api.encode_response(out[0])
    assert answer["log_likelihood_nats"] == out[0] and answer["bits_per_dim"] > 0
    with pytest.raises(ValueError, match="the model takes 8x8"):
        decode_png(random_png([1, 4, 4]), (1, 8, 8))


@pytest.mark.slow
def test_the_driver_runs_both_servers_on_a_tiny_model(model_dir: Path) -> None:
    pytest.importorskip("litserve", reason="the peer needs the bench extra (LitServe)")
    cmd = [sys.executable, "bench/peer_bench.py", "--model-dir", str(model_dir), "--models", "pixelcnn"]
    cmd += ["--seconds", "0.3", "--rounds", "1", "--client", "httpx", "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (s,) = json.loads(out.stdout)["models"]
    assert s["model"] == "pixelcnn" and s["errors"] == 0
    assert s["genserve_1"] > 0 and s["litserve_1"] > 0 and s["genserve_32"] > 0 and s["litserve_32"] > 0
    if sys.platform == "linux":  # each server's processes spent CPU on the requests they answered
        assert s["genserve_32_cpu_ms"] > 0 and s["litserve_32_cpu_ms"] > 0


@pytest.mark.slow
def test_the_driver_runs_paired_phases_with_both_servers_up(model_dir: Path) -> None:
    pytest.importorskip("litserve", reason="the peer needs the bench extra (LitServe)")
    cmd = [sys.executable, "bench/peer_bench.py", "--model-dir", str(model_dir), "--models", "vae", "--pairs", "2"]
    cmd += ["--seconds", "0.3", "--warm-seconds", "0.1", "--client", "httpx", "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    (m,) = result["models"]
    assert result["pairs"] == 2 and m["model"] == "vae" and m["inprocess_32"] > 0
    for c in ("1", "32"):
        e = m["clients"][c]
        assert e["errors"] == 0 and len(e["pairs"]) == 2 and e["genserve"] > 0 and e["litserve"] > 0
        assert e["ratio_low"] <= e["ratio"] <= e["ratio_high"]
        if sys.platform == "linux":
            assert e["genserve_cpu_ms"] > 0 and e["litserve_cpu_ms"] > 0
