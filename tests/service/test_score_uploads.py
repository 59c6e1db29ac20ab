"""A few files of every kind of the real-upload suite through /score end to end (multipart,
resize=true), against tiny models calibrated with the dose score: every answer carries an
explanation that agrees with its flag."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import update_metadata
from models.scoring.scorer import load_scorer
from models.scoring.scores import DOSE
from models.tools.score_sets import calibrate
from models.tools.upload_suite import KINDS

pytestmark = pytest.mark.anyio

SUITE = Path(__file__).resolve().parents[2] / "data" / "upload-suite"


@pytest.fixture(scope="module")
def dose_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dose")
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 40, size=(40, 1, 8, 8), dtype=np.uint8))
    for name in ("pixelcnn", "vae"):
        shutil.copytree(model_dir / name, root / name)
        scorer, _ = load_scorer(root / name)
        update_metadata(
            root / name, calibration=calibrate(scorer, images, data_spec="test", fpr=0.1, show_progress=False)
        )
    return root


@pytest.mark.parametrize("model", ["pixelcnn", "vae"])
async def test_suite_files_of_every_kind_through_score(make_settings, dose_dir: Path, model: str):
    from tests.service.helpers import running

    files = [p for kind in KINDS for p in sorted((SUITE / kind).iterdir())[:2]]
    refused_for_colour = 0
    async with running(make_settings(model_dir=dose_dir)) as (_, c):
        info = {m["name"]: m for m in (await c.get("/models")).json()["models"]}[model]
        assert info["default_score_type"] == DOSE and DOSE in info["score_types"]
        for f in files:
            r = await c.post(
                "/score",
                data={"model": model, "resize": "true"},
                files=[("files", (f.name, f.read_bytes(), "application/octet-stream"))],
            )
            assert r.status_code == 200, (f, r.text)
            body = r.json()
            assert body["score_type"] == DOSE
            res = body["results"][0]
            e = res["explanation"]
            assert res["resized"] and e is not None and res["threshold"] is not None
            shares = sum(s["contribution"] for s in e["statistics"].values())
            assert shares == pytest.approx(res["score"], rel=1e-6, abs=1e-6)
            assert bool(e["decided_by"]) == res["is_outlier"]
            colour = res["colour"]  # the tiny models are of grayscale images: every file's colour is measured
            assert colour is not None and ("colour" in e["decided_by"]) == colour["crossed"]
            assert res["is_outlier"] == (res["score"] > res["threshold"] or colour["crossed"])
            by_statistics = [n for n in e["decided_by"] if n != "colour"]
            assert bool(by_statistics) == (res["score"] > res["threshold"])
            assert all(e["statistics"][n]["crossed"] for n in by_statistics)
            refused_for_colour += colour["crossed"]
        # another score type: no explanation
        r = await c.post(
            "/score",
            data={"model": model, "resize": "true", "score_type": "nll"},
            files=[("files", (files[0].name, files[0].read_bytes(), "application/octet-stream"))],
        )
        assert r.status_code == 200 and r.json()["results"][0]["explanation"] is None
    assert 0 < refused_for_colour < len(files)  # charts, emoji, logos in colour; codes, documents gray


def test_a_labelled_request_never_gets_the_dose_score() -> None:
    """dose is calibrated on p(x): a labelled request (p(x|y)) falls back to complexity_guarded, or
    is refused if it names dose."""
    from models.checkpoint import build_model
    from models.scoring.scores import GUARDED
    from service.entries import ModelEntry
    from service.errors import BadRequest
    from tests.helpers import TINY_PIXELCNN

    with torch.device("meta"):
        skeleton = build_model("gated_pixelcnn", {**TINY_PIXELCNN, "n_classes": 3})
    meta = {"weights": {"sha256": ""}, "calibration": {"default_score": DOSE, "dose": {"statistics": []}}}
    entry = ModelEntry(name="m", folder=Path("m"), meta=meta, skeleton=skeleton, workers=[])
    assert entry.resolve_score_type(None) == DOSE
    assert entry.resolve_score_type(None, labelled=True) == GUARDED
    assert entry.resolve_score_type("nll", labelled=True) == "nll"
    with pytest.raises(BadRequest, match="judges p\\(x\\)"):
        entry.resolve_score_type(DOSE, labelled=True)
