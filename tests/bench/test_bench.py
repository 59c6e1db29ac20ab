"""The benchmark scripts run end to end on a tiny model (their numbers live in docs/, not here)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from settings_ab import parse_config, parse_sample  # noqa: E402
from throughput import server_command  # noqa: E402


def test_a_configs_devices_are_not_overridden_by_the_benchs_device_flag() -> None:
    plain = server_command(Path("ckpt"), "cpu", 8000, {})
    assert plain[-2:] == ["--devices", "cpu"]
    # GENSERVE_DEVICES=cpu,cpu reaches the server: a --devices flag would win over the variable
    assert "--devices" not in server_command(Path("ckpt"), "cpu", 8000, {"GENSERVE_DEVICES": "cpu,cpu"})


def test_settings_ab_parses_configs_and_names_a_bad_one() -> None:
    assert parse_config("GENSERVE_MAX_BATCH_WAIT_MS=5, GENSERVE_MAX_BATCH_SIZE=8") == {
        "GENSERVE_MAX_BATCH_WAIT_MS": "5",
        "GENSERVE_MAX_BATCH_SIZE": "8",
    }
    assert parse_config("") == {}
    assert parse_config("GENSERVE_DEVICES=cpu,cpu,GENSERVE_TORCH_THREADS=1") == {
        "GENSERVE_DEVICES": "cpu,cpu",
        "GENSERVE_TORCH_THREADS": "1",
    }
    assert parse_config("GOMP_SPINCOUNT=10000,OMP_WAIT_POLICY=passive") == {
        "GOMP_SPINCOUNT": "10000",
        "OMP_WAIT_POLICY": "passive",
    }
    with pytest.raises(argparse.ArgumentTypeError, match="'MAX_BATCH=5' is not a NAME=value assignment of a GENSERVE_"):
        parse_config("MAX_BATCH=5")
    with pytest.raises(argparse.ArgumentTypeError, match="'cpu' is not a NAME=value"):
        parse_config("cpu,GENSERVE_DEVICES=cpu")
    assert parse_sample("pixelcnn-fmnist:16") == ("pixelcnn-fmnist", 16)
    for bad in ("pixelcnn-fmnist", "pixelcnn:0", ":4", "pixelcnn:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not MODEL:N"):
            parse_sample(bad)


def run_json(*args: str) -> dict:
    out = subprocess.run([sys.executable, *args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def skip_unless_git_checkout() -> None:
    """The cross-tree benches unpack their baseline's source with ``git archive``."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: the bench unpacks its baseline with git archive")


@pytest.mark.slow
def test_omp_pools_times_its_three_cases() -> None:
    r = run_json("bench/omp_pools.py", "--repeats", "20", "--others", "1")
    assert r["others"] == 1 and all(r[case] > 0 for case in ("alone", "idle pools", "pools gone"))
    assert r["slowdown_idle_pools"] == r["idle pools"] / r["alone"]


@pytest.mark.slow
def test_omp_pools_times_a_checkpoints_one_image_score_over_rounds(model_dir: Path) -> None:
    r = run_json("bench/omp_pools.py", "--repeats", "3", "--others", "1", "--rounds", "2",
                 "--model", str(model_dir / "pixelcnn-cond"))  # fmt: skip
    assert r["work"] == "pixelcnn-cond, one image's score"
    for case in ("alone", "idle pools", "pools gone"):
        assert len(r["rounds"][case]) == 2 and all(v > 0 for v in r["rounds"][case])
        assert r[case] == pytest.approx(sum(r["rounds"][case]) / 2)  # the median of two


def test_fast_forward_times_the_fast_pass_at_each_chunk_size(model_dir: Path) -> None:
    r = run_json("bench/fast_forward.py", "--model", str(model_dir / "pixelcnn"), "--batch", "4", "--seconds", "0.2",
                 "--chunks", "0", "1", "3")  # fmt: skip
    (row,) = r["rows"]
    assert row["batch"] == 4 and row["calls"] >= 1 and row["default_chunk"] >= 1
    assert sorted(row["images_per_s"]) == ["0", "1", "3"] and all(v > 0 for v in row["images_per_s"].values())


@pytest.mark.slow
def test_throughput_and_settings_ab_run_on_a_tiny_model(model_dir: Path) -> None:
    r = run_json("bench/throughput.py", "--model-dir", str(model_dir), "--model", "vae", "--seconds", "0.3")
    assert r["http_1_clients"]["requests"] > 0 and r["http_32_clients"]["requests"] > 0
    assert r["http_1_clients"]["errors"] == r["http_32_clients"]["errors"] == 0
    if sys.platform == "linux":  # the server's CPU per request, from /proc (bench/proc_cpu.py)
        assert r["http_32_clients"]["cpu_ms_per_request"] > 0
    assert r["http_32_clients"]["mean_batch_images"] >= 1.0

    ab = run_json(
        "bench/settings_ab.py", "--model-dir", str(model_dir), "--model", "vae", "--seconds", "0.3",
        "--rounds", "1", "--config", "GENSERVE_MAX_BATCH_SIZE=1", "--config", "GENSERVE_MODELS=",
        "--sample", "pixelcnn:2",
    )  # fmt: skip
    first, second = ab["configs"]
    assert first["settings"] == {"GENSERVE_MAX_BATCH_SIZE": "1"} and second["settings"] == {"GENSERVE_MODELS": ""}
    assert first["mean_batch_32_clients"] == 1.0  # batching off really was off in that server
    assert first["errors"] == second["errors"] == 0
    assert first["ratio_32_clients"] == 1.0
    # the sampling model is served by the second server only (every model in the folder)
    assert first["sample_seconds"] is None and second["sample_seconds"] > 0
    assert second["score_ms_p95_while_sampling"] >= second["score_ms_median_while_sampling"] > 0


@pytest.mark.slow
def test_settings_ab_pairs_two_configurations_both_up(model_dir: Path) -> None:
    ab = run_json(
        "bench/settings_ab.py", "--model-dir", str(model_dir), "--model", "vae", "--seconds", "0.3",
        "--pairs", "2", "--warm-seconds", "0.1", "--config", "", "--config", "GENSERVE_MAX_BATCH_SIZE=1",
    )  # fmt: skip
    assert ab["configs"] == {"A": "(the defaults)", "B": "GENSERVE_MAX_BATCH_SIZE=1"} and ab["pairs"] == 2
    for c in ("1", "32"):
        e = ab["models"][0]["clients"][c]
        assert e["errors"] == 0 and len(e["pairs"]) == 2 and e["A"] > 0 and e["B"] > 0
        assert e["ratio_low"] <= e["ratio"] <= e["ratio_high"]
    three = [
        sys.executable, "bench/settings_ab.py", "--model-dir", str(model_dir), "--model", "vae", "--pairs", "1",
        "--config", "", "--config", "GENSERVE_MAX_BATCH_SIZE=1", "--config", "GENSERVE_MAX_BATCH_SIZE=2",
    ]  # fmt: skip
    out = subprocess.run(three, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--pairs compares two configurations" in out.stderr


@pytest.mark.slow
def test_settings_ab_serves_an_earlier_commit_first_with_the_first_configs_settings(model_dir: Path) -> None:
    skip_unless_git_checkout()
    ab = run_json(
        "bench/settings_ab.py", "--model-dir", str(model_dir), "--model", "vae", "--seconds", "0.3",
        "--rounds", "1", "--baseline", "HEAD", "--config", "GENSERVE_MAX_BATCH_SIZE=1",
    )  # fmt: skip
    baseline, this = ab["configs"]
    assert baseline["tree"] == "HEAD" and this["tree"] is None
    assert baseline["settings"] == this["settings"] == {"GENSERVE_MAX_BATCH_SIZE": "1"}
    assert baseline["errors"] == this["errors"] == 0
    assert baseline["http_32_clients_images_per_s"] > 0 and baseline["ratio_32_clients"] == 1.0
    assert baseline["mean_batch_32_clients"] == this["mean_batch_32_clients"] == 1.0  # both servers took it


@pytest.mark.slow
def test_sampling_ab_times_both_trees_and_compares_their_images(model_dir: Path) -> None:
    skip_unless_git_checkout()
    r = run_json(
        "bench/sampling_ab.py", "--model", str(model_dir / "pixelcnn-cond"), "--n", "3", "--rounds", "2",
        "--baseline", "HEAD", "--labels", "--row-threads", "2",
    )  # fmt: skip
    assert r["model"] == "pixelcnn-cond" and r["n"] == 3 and r["baseline"] == "HEAD"
    assert len(r["rounds"]["baseline"]) == len(r["rounds"]["this tree"]) == 2
    ratio = r["median_seconds"]["baseline"] / r["median_seconds"]["this tree"]  # of medians rounded to 0.1 ms
    assert r["speedup"] == pytest.approx(ratio, rel=0.05, abs=0.01)
    assert r["identical_images"] is True  # HEAD's sampler and this tree's draw the same images


@pytest.mark.slow
# p(x|y) with each image's label; p(x) over the classes; what /score runs for "nll" (the tree's Scorer)
@pytest.mark.parametrize("mode", [[], ["--marginal"], ["--scorer"]])
def test_log_prob_ab_times_both_trees_and_compares_their_log_likelihoods(
    model_dir: Path, tmp_path: Path, mode: list[str]
) -> None:
    skip_unless_git_checkout()
    import numpy as np

    from models.checkpoint import read_metadata

    cfg = read_metadata(model_dir / "pixelcnn-cond")["config"]
    shape = (5, cfg["in_channels"], cfg["height"], cfg["width"])
    images = np.random.default_rng(0).integers(0, cfg["levels"], shape).astype(np.uint8)
    np.savez(tmp_path / "x.npz", images=images, labels=np.array([0, 1, 2, 0, 1]))
    r = run_json(
        "bench/log_prob_ab.py", "--model", str(model_dir / "pixelcnn-cond"), "--batch", "1", "4", "--seconds", "0.2",
        "--rounds", "2", "--baseline", "HEAD", "--images", f"npz:{tmp_path / 'x.npz'}", *mode,
    )  # fmt: skip
    assert r["model"] == "pixelcnn-cond" and r["baseline"] == "HEAD" and [row["batch"] for row in r["rows"]] == [1, 4]
    for row in r["rows"]:
        assert len(row["baseline"]) == len(row["this tree"]) == 2 and min(row["baseline"] + row["this tree"]) > 0
        assert row["speedup"] == pytest.approx(row["median"]["this tree"] / row["median"]["baseline"], abs=0.01)
        assert row["max_diff_nats_per_dim"] < 1e-4  # HEAD's log_prob and this tree's agree


def test_upload_probe_builds_set_6_and_reports_every_kind(model_dir: Path, tmp_path: Path) -> None:
    """bench/upload_probe.py --set 6 on a tiny calibrated model: every kind built, one cell per kind,
    each a share flagged (with the checks) and, in brackets, by the score alone, never more."""
    import re
    import shutil

    import numpy as np
    import torch

    if not list(Path("/usr/share/icons/Adwaita").glob("*/*/*symbolic*.png")):
        pytest.skip("set 6's dark-mode icons need Adwaita's symbolic PNGs (apt-get install adwaita-icon-theme)")
    pytest.importorskip("matplotlib")
    from models.checkpoint import update_metadata
    from models.scoring.scorer import load_scorer
    from models.tools.score_sets import calibrate

    shutil.copytree(model_dir / "pixelcnn", tmp_path / "pc")
    scorer, _ = load_scorer(tmp_path / "pc")
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(30, 1, 8, 8), dtype=np.uint8))
    update_metadata(tmp_path / "pc", calibration=calibrate(scorer, noise, data_spec="test", show_progress=False))
    args = ["bench/upload_probe.py", "--set", "6", "--out", str(tmp_path / "probe"), "--cache", ""]
    args += ["--model", str(tmp_path / "pc")]
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    head, _, row = out.stdout.strip().splitlines()
    kinds = ["dark-charts (20)", "dark-icons (30)", "negatives (58)", "inverted-codes (30)", "night-sky (20)"]
    assert all(k in head for k in [*kinds, "pixel-art (20)"])
    cells = re.findall(r"([\d.]+)% \(([\d.]+)%\)", row)
    assert row.startswith("| pc |") and len(cells) == 6
    assert all(float(served) >= float(alone) for served, alone in cells)  # the checks only add refusals


@pytest.mark.slow
def test_startup_times_this_tree_against_a_commit(model_dir: Path) -> None:
    skip_unless_git_checkout()
    r = run_json("bench/startup.py", "--rev", "HEAD", "--model-dir", str(model_dir), "--models", "vae", "--rounds", "1")
    assert set(r["medians"]) == {"HEAD", "this tree"} and all(0 < s < 120 for s in r["medians"].values())
    assert r["ratio"] == r["medians"]["HEAD"] / r["medians"]["this tree"]
