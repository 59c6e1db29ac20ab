"""/classify (Bayes' rule with refusal) and /encode (a VAE's q(z|x)) against tiny checkpoints:
results checked against the models computed directly, the refusal rule, errors, batching."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, read_metadata, update_metadata
from models.scoring.classify import class_posterior
from models.scoring.scorer import load_scorer
from models.tools.score_sets import calibrate, score_images
from tests.service.helpers import b64, gray_png, png_bytes, post_json, running

pytestmark = pytest.mark.anyio

COUNTS = [1, 2, 1]  # p(y) = (0.25, 0.5, 0.25)


def images(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8))


@pytest.fixture(scope="module")
def classify_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cond: the tiny conditional PixelCNN with class counts, calibrated on p(x); plus pixelcnn and vae."""
    root = tmp_path_factory.mktemp("classify")
    shutil.copytree(model_dir / "pixelcnn-cond", root / "cond")
    shutil.copytree(model_dir / "pixelcnn", root / "pixelcnn")
    shutil.copytree(model_dir / "vae", root / "vae")
    meta = read_metadata(root / "cond")
    update_metadata(root / "cond", dataset={**meta["dataset"], "class_counts": COUNTS})
    scorer, _ = load_scorer(root / "cond")
    # the single-statistic default keeps these checks exact (dose has its own tests in tests/scoring)
    cal = calibrate(
        scorer, images(30, seed=1), data_spec="test", fpr=0.2, default="complexity_guarded", show_progress=False
    )
    update_metadata(root / "cond", calibration=cal)
    return root


@pytest.fixture
async def client(make_settings, classify_dir: Path):
    async with running(make_settings(model_dir=classify_dir)) as (app, client):
        yield app, client


def as_pngs(x: torch.Tensor) -> list[str]:
    return [b64(png_bytes(img[0].numpy())) for img in x]


async def test_classify_matches_bayes_rule_on_the_model(client, classify_dir: Path):
    _, c = client
    x = images(5, seed=7)
    r = await c.post("/classify", json={"model": "cond", "images": as_pngs(x)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == ["a", "b", "c"] and body["prior"] == pytest.approx([0.25, 0.5, 0.25])
    assert body["score_type"] == "complexity_guarded"
    model, _ = load_checkpoint(classify_dir / "cond")
    with torch.no_grad():
        post = class_posterior(model, x.long(), torch.tensor([0.25, 0.5, 0.25]))
    for i, res in enumerate(body["results"]):
        probs = [res["posterior"][k] for k in ("a", "b", "c")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-6)
        assert probs == pytest.approx(post.log_posterior[i].exp().tolist(), abs=1e-4)
        assert res["log_likelihood_nats"] == pytest.approx(float(post.log_marginal[i]), rel=1e-5)
        assert res["bits_per_dim"] == pytest.approx(-res["log_likelihood_nats"] / (64 * math.log(2)), rel=1e-6)
        ll = [res["class_log_likelihood_nats"][k] for k in ("a", "b", "c")]
        assert ll == pytest.approx(post.log_likelihood[i].tolist(), rel=1e-5)
        best = int(post.log_posterior[i].argmax())
        assert res["probability"] == pytest.approx(max(probs))
        assert res["rejected"] is (res["score"] > res["threshold"])
        if res["rejected"]:
            assert res["predicted"] is None and res["predicted_index"] is None
        else:
            assert res["predicted_index"] == best and res["predicted"] == "abc"[best]


async def test_classify_refuses_exactly_the_images_over_the_threshold(make_settings, classify_dir: Path, tmp_path):
    """With the threshold set between the scores of a batch, the images above it are refused (no class)
    and the rest are classified; /score without a label gives the same p(x), score and verdict."""
    shutil.copytree(classify_dir, tmp_path / "m")
    folder = tmp_path / "m" / "cond"
    x = images(6, seed=3)
    scorer, meta = load_scorer(folder)
    scores = score_images(scorer, x, names=["complexity_guarded"], show_progress=False)["complexity_guarded"]
    threshold = float(np.median(scores))
    cal = meta["calibration"]
    cal["scores"]["complexity_guarded"]["threshold"] = threshold
    update_metadata(folder, calibration=cal)
    async with running(make_settings(model_dir=tmp_path / "m")) as (_app, c):
        r = await c.post("/classify", json={"model": "cond", "images": as_pngs(x)})
        s = await c.post("/score", json={"model": "cond", "images": as_pngs(x)})
        metrics = (await c.get("/metrics")).text
    results = r.json()["results"]
    refused = [res["rejected"] for res in results]
    assert refused == [bool(v > threshold) for v in scores] and 0 < sum(refused) < len(refused)
    assert all((res["predicted"] is None) == res["rejected"] for res in results)
    for res, sc in zip(results, s.json()["results"], strict=True):
        assert res["score"] == pytest.approx(sc["score"])
        assert sc["is_outlier"] is res["rejected"] and sc["threshold"] == pytest.approx(threshold)
        assert res["log_likelihood_nats"] == pytest.approx(sc["log_likelihood_nats"], rel=1e-6)
    assert f'genserve_classify_refused_total{{model="cond"}} {float(sum(refused))}' in metrics
    assert 'genserve_images_classified_total{model="cond"} 6.0' in metrics


async def test_labelled_scores_of_a_conditional_model_carry_no_threshold(client):
    _, c = client
    img = as_pngs(images(1))
    r = await c.post("/score", json={"model": "cond", "images": img, "label": "b"})
    res = r.json()["results"][0]
    assert r.status_code == 200 and res["threshold"] is None and res["is_outlier"] is None
    r = await c.post("/score", json={"model": "cond", "images": img})
    assert r.json()["results"][0]["threshold"] is not None


async def test_labelled_and_unlabelled_requests_batched_together_stay_apart(client, classify_dir: Path):
    _, c = client
    x = images(4, seed=11)
    bodies = [{"model": "cond", "images": as_pngs(x[i : i + 1]), **({"label": "c"} if i % 2 else {})} for i in range(4)]
    results: list = [None] * 4

    async def one(i: int) -> None:
        results[i] = await post_json(c, "/score", bodies[i])

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(one, i)
    model, _ = load_checkpoint(classify_dir / "cond")
    with torch.no_grad():
        marginal = class_posterior(model, x.long(), torch.tensor([0.25, 0.5, 0.25])).log_marginal
        given_c = model.log_prob(x.long(), torch.full((4,), 2))
    for i, r in enumerate(results):
        expected = given_c[i] if i % 2 else marginal[i]
        assert r.json()["results"][0]["log_likelihood_nats"] == pytest.approx(float(expected), rel=1e-5)


async def test_classify_errors(client):
    _, c = client
    img = [b64(gray_png(0))]
    r = await c.post("/classify", json={"model": "pixelcnn", "images": img})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("model 'pixelcnn' is not class-conditional, so it has no p(x|y)")
    assert "['cond']" in r.json()["detail"]
    r = await c.post("/classify", json={"model": "nope", "images": img})
    assert r.status_code == 404
    r = await c.post("/classify", json={"model": "cond", "images": [b64(gray_png(0, size=(9, 8)))]})
    assert r.status_code == 422 and "8" in r.json()["detail"]
    r = await c.post("/classify", json={"model": "cond", "images": img, "label": "a"})
    assert r.status_code == 422  # extra fields are refused, not ignored
    r = await c.post("/classify", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415


async def test_classify_multipart_and_resize(client):
    _, c = client
    files = [("files", ("a.png", gray_png(1, size=(16, 16)), "image/png"))]
    r = await c.post("/classify", data={"model": "cond"}, files=files)
    assert r.status_code == 422 and "resize" in r.json()["detail"]
    r = await c.post("/classify?resize=true", data={"model": "cond"}, files=files)
    assert r.status_code == 200 and r.json()["results"][0]["resized"] is True


async def test_classify_of_an_uncalibrated_model_gives_classes_and_no_verdict(make_settings, model_dir: Path):
    async with running(make_settings(model_dir=model_dir)) as (_app, c):
        r = await c.post("/classify", json={"model": "pixelcnn-cond", "images": [b64(gray_png(0))]})
    res = r.json()["results"][0]
    assert r.status_code == 200 and res["rejected"] is None and res["threshold"] is None
    assert res["predicted"] in ("a", "b", "c") and r.json()["prior"] == pytest.approx([1 / 3] * 3)


async def test_encode_matches_the_encoder(client, classify_dir: Path):
    _, c = client
    x = images(3, seed=5)
    r = await c.post("/encode", json={"model": "vae", "images": as_pngs(x)})
    assert r.status_code == 200, r.text
    body = r.json()
    model, _ = load_checkpoint(classify_dir / "vae")
    with torch.no_grad():
        mean, std = model.encode(x)
    assert body["latent_dim"] == 4 and len(body["results"]) == 3
    for i, res in enumerate(body["results"]):
        assert res["mean"] == pytest.approx(mean[i].tolist(), abs=1e-5)
        assert res["std"] == pytest.approx(std[i].tolist(), rel=1e-5) and min(res["std"]) > 0
    files = [("files", (f"{i}.png", png_bytes(x[i, 0].numpy()), "image/png")) for i in range(3)]
    m = await c.post("/encode", data={"model": "vae"}, files=files)
    assert m.status_code == 200 and m.json()["results"][2]["mean"] == pytest.approx(body["results"][2]["mean"])
    assert 'genserve_images_encoded_total{model="vae"} 6.0' in (await c.get("/metrics")).text


async def test_encode_errors(client):
    _, c = client
    img = [b64(gray_png(0))]
    r = await c.post("/encode", json={"model": "cond", "images": img})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "model 'cond' is autoregressive, with no encoder; /encode needs a VAE (`kind: vae` in GET /models: ['vae'])"
    )
    r = await c.post("/encode", json={"model": "vae", "images": []})
    assert r.status_code == 422
    r = await c.post("/encode", json={"model": "vae", "images": ["not base64!"]})
    assert r.status_code == 422 and "image 0" in r.json()["detail"]


async def test_image_limit_applies_to_classify_and_encode(make_settings, classify_dir: Path):
    async with running(make_settings(model_dir=classify_dir, max_images=2)) as (_app, c):
        img = [b64(gray_png(i)) for i in range(3)]
        for path, model in (("/classify", "cond"), ("/encode", "vae")):
            r = await c.post(path, json={"model": model, "images": img})
            assert r.status_code == 422 and "GENSERVE_MAX_IMAGES" in r.json()["detail"]


async def test_openapi_documents_both_routes(client):
    _, c = client
    spec = (await c.get("/openapi.json")).json()
    for path in ("/classify", "/encode"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]
        assert set(body) == {"application/json", "multipart/form-data"}
