"""``genserve calibrate`` and ``genserve eval-ood``: metrics on known cases, synthetic sets, and both
commands end to end on a tiny checkpoint with npz data sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import read_metadata, save_checkpoint, sha256_file
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.scoring.classify import class_posterior
from models.scoring.scorer import load_scorer
from models.tools.cli import main
from models.tools.ood_eval import auprc, auroc, fpr_at_tpr, load_eval_set
from models.tools.score_sets import score_images
from tests.helpers import TINY_PIXELCNN, dataset_meta

SHAPE = (1, 8, 8)


# ---- metrics ---------------------------------------------------------------------------------------


def test_auroc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 50).astype(float)
    b = rng.integers(2, 8, 40).astype(float)
    pairs = (b[None, :] > a[:, None]).mean() + 0.5 * (b[None, :] == a[:, None]).mean()
    assert auroc(a, b) == pytest.approx(pairs)
    assert auroc(np.zeros(3), np.ones(3)) == 1.0 and auroc(np.ones(3), np.zeros(3)) == 0.0
    assert auroc(np.ones(4), np.ones(5)) == pytest.approx(0.5)


def test_auprc_and_fpr_at_95_tpr():
    assert auprc(np.zeros(5), np.ones(5)) == pytest.approx(1.0)
    # Out-of-distribution scores 1..100, in-distribution 96..105: flagging 95 of 100 needs a threshold of 6.
    out, inn = np.arange(1, 101, dtype=float), np.arange(96, 106, dtype=float)
    assert fpr_at_tpr(inn, out, 0.95) == pytest.approx(1.0)
    assert fpr_at_tpr(np.arange(10.0), np.arange(5.0, 105.0), 0.95) == pytest.approx(0.0)
    assert fpr_at_tpr(np.arange(10.0), np.arange(0.0, 100.0), 0.95) == pytest.approx(0.5)  # threshold 5
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 300), rng.normal(1, 1, 300)
    assert 0.5 < auprc(a, b) < 1.0


# ---- synthetic sets -------------------------------------------------------------------------------------


def test_synthetic_sets_are_deterministic_and_shaped_like_the_model(tmp_path: Path):
    noise = load_eval_set("noise:uniform:20", shape=SHAPE, levels=256, seed=3)
    again = load_eval_set("noise:uniform:20", shape=SHAPE, levels=256, seed=3)
    assert noise.images.shape == (20, *SHAPE) and noise.images.dtype == torch.uint8
    assert torch.equal(noise.images, again.images)
    assert not torch.equal(noise.images, load_eval_set("noise", shape=SHAPE, levels=256, seed=4).images[:20])
    const = load_eval_set("constant", shape=SHAPE, levels=256)
    assert len(const) == 256 and (const.images.flatten(1).float().std(1) == 0).all()
    assert const.images[0].max() == 0 and const.images[-1].min() == 255
    images = torch.randint(0, 256, (6, 8, 8), dtype=torch.uint8).numpy()
    np.savez(tmp_path / "d.npz", images=images)
    flipped = load_eval_set(f"flip:npz:{tmp_path / 'd.npz'}", shape=SHAPE, levels=256)
    assert np.array_equal(flipped.images[:, 0].numpy(), images[:, ::-1, :])
    assert len(load_eval_set(f"npz:{tmp_path / 'd.npz'}", shape=SHAPE, levels=256, limit=4)) == 4
    with pytest.raises(ValueError, match="the model takes"):
        load_eval_set(f"npz:{tmp_path / 'd.npz'}", shape=(1, 4, 4), levels=256)


# ---- the commands end to end ------------------------------------------------------------------------


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "m"
    save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)), folder, dataset=dataset_meta())
    save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)), folder / "background", dataset=dataset_meta())
    return folder


def npz(path: Path, n: int, seed: int, high: int = 256) -> str:
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, high, size=(n, 8, 8), dtype=np.uint8))
    return f"npz:{path}"


def test_recalibrating_with_a_kept_guarded_score_keeps_its_floor(tiny_model: Path, tmp_path: Path):
    valid = npz(tmp_path / "valid.npz", 60, 0, high=64)
    assert main(["calibrate", "--model", str(tiny_model), "--data", valid, "--no-progress", "--cache", ""]) == 0
    first = read_metadata(tiny_model)["calibration"]
    fewer = npz(tmp_path / "fewer.npz", 24, 5, high=48)  # another set: its own largest NLL
    argv = ["calibrate", "--model", str(tiny_model), "--data", fewer, "--keep", "complexity_guarded"]
    assert main([*argv, "--neighbours", "3", "--no-progress", "--cache", ""]) == 0
    second = read_metadata(tiny_model)["calibration"]
    assert second["n"] == 24 and second["dose"]["neighbours"] == 3 and second["dose"]["n_threshold"] == 24
    kept = second["scores"]["complexity_guarded"]
    assert kept["threshold"] == first["scores"]["complexity_guarded"]["threshold"] and "kept_from" in kept
    assert second["nll_cap"] == first["nll_cap"] == kept["nll_cap"]  # the kept threshold's own floor
    assert second["scores"]["nll"]["threshold"] != first["scores"]["nll"]["threshold"]  # the rest refitted


def test_folds_alone_mean_the_mahalanobis_combination(tiny_model: Path, tmp_path: Path):
    valid = npz(tmp_path / "valid.npz", 40, 0, high=64)
    argv = ["calibrate", "--model", str(tiny_model), "--data", valid, "--no-progress", "--cache", ""]
    assert main([*argv, "--folds", "2"]) == 0  # a session-11 command reproduces a session-11 calibration
    dose = read_metadata(tiny_model)["calibration"]["dose"]
    assert "neighbours" not in dose and "reference" not in dose and dose["split"].startswith("2-fold")
    assert main([*argv, "--folds", "2", "--neighbours", "5"]) == 2  # leave-one-out has no folds: refused


def test_calibrate_then_eval_ood_end_to_end(tiny_model: Path, tmp_path: Path, capsys):
    weights_sha = sha256_file(tiny_model / "model.safetensors")
    valid = npz(tmp_path / "valid.npz", 60, 0, high=64)
    assert main(["calibrate", "--model", str(tiny_model), "--data", valid, "--fpr", "0.05", "--no-progress"]) == 0
    meta = read_metadata(tiny_model)
    cal = meta["calibration"]
    assert cal["default_score"] == "dose" and cal["target_fpr"] == 0.05 and cal["n"] == 60
    assert set(cal["scores"]) == {"nll", "complexity", "complexity_guarded", "likelihood_ratio", "dose"}
    assert cal["command"].startswith("genserve calibrate --model")
    assert sha256_file(tiny_model / "model.safetensors") == weights_sha == meta["weights"]["sha256"]
    printed = json.loads(capsys.readouterr().out)
    assert "quantiles" not in printed["scores"]["nll"]

    test = npz(tmp_path / "test.npz", 50, 1, high=64)
    other = npz(tmp_path / "other.npz", 30, 2)
    report_dir = tmp_path / "report"
    argv = ["eval-ood", "--model", str(tiny_model), "--in", test, "--out", other, "--out", "noise:uniform:25"]
    argv += ["--report-dir", str(report_dir), "--no-progress"]
    argv += ["--cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    report = json.loads((report_dir / "m.json").read_text())
    assert list(report["out"]) == [other, "noise:uniform:25"]
    assert report["default_score"] == "dose" and report["in"]["n"] == 50
    for o in report["out"].values():
        for m in o["scores"].values():
            assert 0 <= m["auroc"] <= 1 and 0 <= m["auprc"] <= 1 and 0 <= m["fpr_at_95_tpr"] <= 1
            assert 0 <= m["flagged_at_threshold"] <= 1
    assert report["out"]["noise:uniform:25"]["n"] == 25
    for entry in report["in"]["scores"].values():
        assert 0 <= entry["observed_fpr_at_threshold"] <= 1
    md = (report_dir / "m.md").read_text()
    assert "| noise:uniform:25 | 25 |" in md and "genserve eval-ood" in md
    for png in ("m-roc.png", "m-hist.png", "m-heatmaps.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_defaults_to_the_conformal_threshold_and_confidence_raises_it(tiny_model: Path, tmp_path: Path):
    """Without --confidence every threshold is the conformal k-th smallest score, k = ceil((n+1)(1-fpr)),
    so its false-positive rate is the target on average; --confidence 0.9 leaves fewer scores above."""
    valid = npz(tmp_path / "valid.npz", 200, 0, high=64)
    argv = ["calibrate", "--model", str(tiny_model), "--data", valid, "--fpr", "0.05", "--no-progress", "--cache", ""]
    assert main(argv) == 0
    cal = read_metadata(tiny_model)["calibration"]
    assert cal["confidence"] is None and cal["method"].startswith("threshold = k-th smallest score")
    nll = cal["scores"]["nll"]
    k = math.ceil((nll["n"] + 1) * (1 - 0.05))
    assert nll["n"] == 200 and nll["above"] == nll["n"] - k == 9
    assert main([*argv, "--confidence", "0.9"]) == 0
    confident = read_metadata(tiny_model)["calibration"]["scores"]["nll"]
    assert confident["confidence"] == 0.9 and confident["above"] < nll["above"]
    assert confident["threshold"] > nll["threshold"]


def test_colour_check_in_calibration_and_eval_ood_of_files(tiny_model: Path, tmp_path: Path):
    """calibrate writes the colour check (options, --no-colour-check); eval-ood flags the colour files
    of a files: set as /score does, whatever their score, and reports the share flagged by the score."""
    from PIL import Image

    valid = npz(tmp_path / "valid.npz", 40, 0, high=64)
    argv = ["calibrate", "--model", str(tiny_model), "--data", valid, "--no-progress", "--cache", ""]
    assert main([*argv, "--no-colour-check"]) == 0
    assert "colour" not in read_metadata(tiny_model)["calibration"]
    assert main([*argv, "--colour-tolerance", "20", "--colour-max-fraction", "0.1"]) == 0
    colour = read_metadata(tiny_model)["calibration"]["colour"]
    assert colour["tolerance"] == 20 and colour["max_fraction"] == 0.1
    files = tmp_path / "files"
    files.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):  # dark noise like the calibration's; the first three with a coloured half
        g = rng.integers(0, 64, size=(8, 8), dtype=np.uint8)
        a = np.stack([g, g, g], axis=-1)
        if i < 3:
            a[:4, :, 2] = np.minimum(a[:4, :, 2].astype(int) + 100, 255).astype(np.uint8)
        Image.fromarray(a).save(files / f"{i}.png")
    data = load_eval_set(f"files:{files}", shape=SHAPE, levels=256, colour_tolerance=20)
    assert data.colour is not None and list(data.colour > 0.1) == [True] * 3 + [False] * 3
    report_dir = tmp_path / "report"
    test = npz(tmp_path / "test.npz", 30, 1, high=64)
    argv = ["eval-ood", "--model", str(tiny_model), "--in", test, "--out", f"files:{files}", "--scores", "dose,nll"]
    assert main([*argv, "--report-dir", str(report_dir), "--no-progress", "--cache", ""]) == 0
    out = json.loads((report_dir / "m.json").read_text())["out"][f"files:{files}"]
    assert out["colour_refused"] == 0.5
    for m in out["scores"].values():
        by_score = m["flagged_by_score"]
        assert m["flagged_at_threshold"] >= 0.5 and m["flagged_at_threshold"] >= by_score
    scorer, meta = load_scorer(tiny_model)
    dose = score_images(scorer, data.images, names=["dose"], show_progress=False)["dose"]
    over = dose > meta["calibration"]["scores"]["dose"]["threshold"]
    assert out["scores"]["dose"]["flagged_at_threshold"] == pytest.approx(float((over | (data.colour > 0.1)).mean()))
    assert out["scores"]["dose"]["flagged_by_score"] == pytest.approx(float(over.mean()))
    # files as the in-distribution set: their false-positive rate is /score's too, colour refusals included
    argv = ["eval-ood", "--model", str(tiny_model), "--in", f"files:{files}", "--out", test, "--scores", "dose"]
    assert main([*argv, "--report-dir", str(report_dir), "--no-progress", "--cache", ""]) == 0
    fpr = json.loads((report_dir / "m.json").read_text())["in"]["scores"]["dose"]["observed_fpr_at_threshold"]
    assert fpr == pytest.approx(float((over | (data.colour > 0.1)).mean())) and fpr >= 0.5


def test_peak_check_in_calibration_checks_only_and_eval_ood(tiny_model: Path, tmp_path: Path):
    """calibrate writes the peak check (the dimmest brightest pixel of its data; --no-peak-check);
    --checks-only rewrites the checks and nothing else, on the calibration's own data only; eval-ood
    counts the images it refuses as flagged, whatever their score, arrays and files alike."""
    rng = np.random.default_rng(0)
    bright = rng.integers(0, 200, size=(40, 8, 8), dtype=np.uint8)
    bright[:, 2, 2] = rng.integers(240, 256, size=40)
    np.savez(tmp_path / "valid.npz", images=bright)
    valid = f"npz:{tmp_path / 'valid.npz'}"
    argv = ["calibrate", "--model", str(tiny_model), "--data", valid, "--no-progress", "--cache", ""]
    assert main([*argv, "--no-peak-check"]) == 0
    before = read_metadata(tiny_model)["calibration"]
    assert "peak" not in before
    assert main([*argv, "--checks-only", "--peak-tolerance", "40"]) == 0
    after = read_metadata(tiny_model)["calibration"]
    assert after["peak"]["min_level"] == int(bright.max(axis=(1, 2)).min()) and after["peak"]["tolerance"] == 40
    assert after["scores"] == before["scores"] and after["dose"] == before["dose"]  # nothing scored again
    other = npz(tmp_path / "other.npz", 40, 4)
    assert main(["calibrate", "--model", str(tiny_model), "--data", other, "--checks-only", "--cache", ""]) == 2
    assert main([*argv, "--checks-only", "--keep", "nll"]) == 2  # it scores nothing: nothing to keep
    assert read_metadata(tiny_model)["calibration"] == after
    assert main(argv) == 0  # a full calibration writes the check with the default tolerance
    peak = read_metadata(tiny_model)["calibration"]["peak"]
    assert peak["tolerance"] == 64 and peak["min_level"] == after["peak"]["min_level"]
    dim = (bright[:10] // 2).astype(np.uint8)  # brightest pixel at most 127: below the floor
    np.savez(tmp_path / "dim.npz", images=np.concatenate([dim, bright[10:20]]))
    report_dir = tmp_path / "report"
    argv = ["eval-ood", "--model", str(tiny_model), "--in", valid, "--out", f"npz:{tmp_path / 'dim.npz'}"]
    assert main([*argv, "--scores", "nll", "--report-dir", str(report_dir), "--no-progress", "--cache", ""]) == 0
    report = json.loads((report_dir / "m.json").read_text())
    out = report["out"][f"npz:{tmp_path / 'dim.npz'}"]
    assert out["peak_refused"] == 0.5 and report["in"]["peak_refused"] == 0.0
    assert out["scores"]["nll"]["flagged_at_threshold"] >= 0.5


def test_extent_check_in_calibration_checks_only_and_eval_ood(tiny_model: Path, tmp_path: Path):
    """calibrate writes the extent check (the least frame its data span; --no-extent-check); --checks-only
    rewrites it with another tolerance; eval-ood counts the small marks it refuses as flagged."""
    full = np.random.default_rng(0).integers(5, 200, size=(40, 8, 8), dtype=np.uint8)  # every pixel above 4
    np.savez(tmp_path / "valid.npz", images=full)
    valid = f"npz:{tmp_path / 'valid.npz'}"
    argv = ["calibrate", "--model", str(tiny_model), "--data", valid, "--no-progress", "--cache", ""]
    assert main([*argv, "--no-extent-check"]) == 0
    assert "extent" not in read_metadata(tiny_model)["calibration"]
    assert main([*argv, "--checks-only", "--extent-tolerance", "3"]) == 0
    extent = read_metadata(tiny_model)["calibration"]["extent"]
    assert (extent["min_extent"], extent["tolerance"], extent["level"]) == (8, 3, 4)
    small = np.zeros((10, 8, 8), np.uint8)
    small[:, 3:5, 3:5] = 255  # a 2x2 mark: extent 2, below 8 - 3
    np.savez(tmp_path / "small.npz", images=np.concatenate([small, full[:10]]))
    report_dir = tmp_path / "report"
    argv = ["eval-ood", "--model", str(tiny_model), "--in", valid, "--out", f"npz:{tmp_path / 'small.npz'}"]
    assert main([*argv, "--scores", "nll", "--report-dir", str(report_dir), "--no-progress", "--cache", ""]) == 0
    report = json.loads((report_dir / "m.json").read_text())
    out = report["out"][f"npz:{tmp_path / 'small.npz'}"]
    assert out["extent_refused"] == 0.5 and report["in"]["extent_refused"] == 0.0
    assert out["scores"]["nll"]["flagged_at_threshold"] >= 0.5


def test_calibrate_refuses_the_test_split(tiny_model: Path):
    assert main(["calibrate", "--model", str(tiny_model), "--data", "fashion-mnist:test"]) == 2
    assert read_metadata(tiny_model)["calibration"] is None


def labelled_npz(path: Path, n: int, seed: int, high: int = 256) -> str:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, high, size=(n, 8, 8), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(n) % 3)
    return f"npz:{path}"


def test_a_conditional_model_calibrates_on_p_x_then_eval_classify(tmp_path: Path, capsys):
    """calibrate scores p(x) = sum_y p(x|y) p(y) (the recorded prior); eval-classify's accuracy and
    refusal rates agree with Bayes' rule and the threshold computed here."""
    torch.manual_seed(0)
    cond = tmp_path / "cond"
    save_checkpoint(
        PixelCNN(PixelCNNConfig(**TINY_PIXELCNN, n_classes=3)),
        cond,
        dataset={**dataset_meta(["a", "b", "c"]), "class_counts": [2, 1, 1]},
    )
    valid = npz(tmp_path / "v.npz", 40, 0, high=64)
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(cond),
                "--data",
                valid,
                "--fpr",
                "0.1",
                "--no-progress",
                "--cache",
                "",
                "--default",
                "complexity_guarded",
            ]
        )
        == 0
    )
    cal = read_metadata(cond)["calibration"]
    assert cal["prior"] == [0.5, 0.25, 0.25] and cal["likelihood"].startswith("p(x) = sum_y")
    scorer, _ = load_scorer(cond)
    model = scorer.model
    x = torch.from_numpy(np.load(tmp_path / "v.npz")["images"])[:, None]
    with torch.no_grad():
        expected = class_posterior(model, x, torch.tensor([0.5, 0.25, 0.25])).log_marginal
    nll = score_images(scorer, x, names=["nll"], show_progress=False)["nll"]
    np.testing.assert_allclose(nll, -expected.double().numpy() / (64 * math.log(2)), rtol=1e-5)

    test = labelled_npz(tmp_path / "t.npz", 30, 1, high=64)
    other = npz(tmp_path / "o.npz", 20, 2)
    report = tmp_path / "r" / "cond.json"
    argv = ["eval-classify", "--model", str(cond), "--in", test, "--out", other, "--report", str(report)]
    assert main([*argv, "--no-progress", "--cache", str(tmp_path / "cache")]) == 0
    r = json.loads(report.read_text())
    t = np.load(tmp_path / "t.npz")
    xt, yt = torch.from_numpy(t["images"])[:, None], t["labels"]
    with torch.no_grad():
        post = class_posterior(model, xt, torch.tensor([0.5, 0.25, 0.25]))
    assert r["in"]["accuracy"] == pytest.approx(float((post.predicted.numpy() == yt).mean()))
    top = post.log_posterior.exp().max(1).values.numpy()
    assert r["in"]["confidence"]["mean_probability"] == pytest.approx(float(top.mean()), rel=1e-5)
    assert r["in"]["confidence"]["share_above_0.99"] == pytest.approx(float((top > 0.99).mean()))
    threshold = cal["scores"]["complexity_guarded"]["threshold"]
    scores = score_images(scorer, xt, names=["complexity_guarded"], show_progress=False)["complexity_guarded"]
    assert r["threshold"] == threshold and r["in"]["rejected"] == pytest.approx(float((scores > threshold).mean()))
    xo = torch.from_numpy(np.load(tmp_path / "o.npz")["images"])[:, None]
    out_scores = score_images(scorer, xo, names=["complexity_guarded"], show_progress=False)["complexity_guarded"]
    assert r["out"][other]["rejected"] == pytest.approx(float((out_scores > threshold).mean()))
    assert sum(r["out"][other]["predicted_counts"]) == 20 and np.array(r["in"]["confusion"]).sum() == 30
    assert "| " + test + " | 30 |" in report.with_suffix(".md").read_text()
    printed = json.loads(capsys.readouterr().out.split("\n}\n", 1)[1])  # after calibrate's JSON
    assert printed["in"]["n"] == 30
    # eval-ood scores p(x) too (no heatmaps: a mixture over classes has no per-pixel terms)
    argv = ["eval-ood", "--model", str(cond), "--in", test, "--out", other, "--report-dir", str(tmp_path / "ood")]
    assert main([*argv, "--no-progress", "--cache", str(tmp_path / "cache")]) == 0
    ood = json.loads((tmp_path / "ood" / "cond.json").read_text())
    assert ood["out"][other]["scores"]["complexity_guarded"]["flagged_at_threshold"] == pytest.approx(
        r["out"][other]["rejected"]
    )
    assert (tmp_path / "ood" / "cond-roc.png").is_file() and not (tmp_path / "ood" / "cond-heatmaps.png").exists()
    # unlabelled test data, an uncalibrated model and an unconditional one are refused
    assert main(["eval-classify", "--model", str(cond), "--in", valid, "--no-progress"]) == 2
    save_checkpoint(model, tmp_path / "uncal", dataset=dataset_meta(["a", "b", "c"]))
    assert main(["eval-classify", "--model", str(tmp_path / "uncal"), "--in", test, "--no-progress"]) == 2
    save_checkpoint(PixelCNN(PixelCNNConfig(**TINY_PIXELCNN)), tmp_path / "plain", dataset=dataset_meta())
    assert main(["eval-classify", "--model", str(tmp_path / "plain"), "--in", test, "--no-progress"]) == 2
