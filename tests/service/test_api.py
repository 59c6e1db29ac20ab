"""Every route and its error paths, against tiny checkpoints in-process (status and detail)."""

from __future__ import annotations

import asyncio
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import load_checkpoint, update_metadata
from tests.service.helpers import Gate, b64, decode_png, gray_png, png_bytes, running, worker_of

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(make_settings):
    async with running(make_settings()) as (_, client):
        yield client


# ---- /models --------------------------------------------------------------------------------------


async def test_models_list_describes_every_checkpoint(client):
    r = await client.get("/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert sorted(models) == ["pixelcnn", "pixelcnn-cond", "vae"]
    pcnn = models["pixelcnn"]
    assert pcnn["kind"] == "autoregressive" and pcnn["architecture"] == "gated_pixelcnn"
    assert pcnn["shape"] == [1, 8, 8] and pcnn["levels"] == 256 and pcnn["dataset"] == "test"
    assert pcnn["metrics"] == {"test_bits_per_dim": 7.9} and pcnn["calibration"] is None
    assert pcnn["exact_likelihood"] is True and pcnn["conditional"] is False and pcnn["classes"] is None
    assert pcnn["devices"] == ["cpu"] and len(pcnn["sha256"]) == 64
    assert models["pixelcnn-cond"]["conditional"] is True and models["pixelcnn-cond"]["classes"] == ["a", "b", "c"]
    assert models["vae"]["kind"] == "vae" and models["vae"]["exact_likelihood"] is False


async def test_model_by_name(client):
    r = await client.get("/models/vae")
    assert r.status_code == 200 and r.json()["name"] == "vae"


async def test_unknown_model_is_404_listing_names(client):
    r = await client.get("/models/nope")
    assert r.status_code == 404
    assert r.json()["detail"] == "unknown model 'nope'; available: ['pixelcnn', 'pixelcnn-cond', 'vae']"
    for path, body in [("/sample", {"model": "nope"}), ("/score", {"model": "nope", "images": [b64(gray_png())]})]:
        r = await client.post(path, json=body)
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["detail"]


# ---- /sample --------------------------------------------------------------------------------------


async def test_sample_json_with_likelihoods(client):
    r = await client.post("/sample", json={"model": "pixelcnn", "n": 3, "seed": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "pixelcnn" and body["seed"] == 7 and body["label"] is None
    assert len(body["images"]) == 3 and len(body["bits_per_dim"]) == 3
    for text, nats, bpd in zip(body["images"], body["log_likelihood_nats"], body["bits_per_dim"], strict=True):
        im = decode_png(text)
        assert im.size == (8, 8) and im.mode == "L"
        assert nats < 0 and bpd == pytest.approx(-nats / (64 * math.log(2)))


async def test_sample_same_seed_same_images_and_random_seed_returned(client):
    a = (await client.post("/sample", json={"model": "pixelcnn", "n": 2, "seed": 123})).json()
    b = (await client.post("/sample", json={"model": "pixelcnn", "n": 2, "seed": 123})).json()
    c = (await client.post("/sample", json={"model": "pixelcnn", "n": 2, "seed": 124})).json()
    assert a["images"] == b["images"] and a["images"] != c["images"]
    d = (await client.post("/sample", json={"model": "pixelcnn", "n": 2})).json()
    again = (await client.post("/sample", json={"model": "pixelcnn", "n": 2, "seed": d["seed"]})).json()
    assert again["images"] == d["images"]


async def test_sample_vae_has_no_exact_likelihood_and_takes_temperature(client):
    r = await client.post("/sample", json={"model": "vae", "n": 2, "seed": 1, "temperature": 0.5})
    assert r.status_code == 200
    assert r.json()["bits_per_dim"] is None and r.json()["log_likelihood_nats"] is None
    hot = await client.post("/sample", json={"model": "vae", "n": 2, "seed": 1, "temperature": 2.0})
    assert hot.json()["images"] != r.json()["images"]


async def test_sample_png_grid(client):
    r = await client.post("/sample", json={"model": "pixelcnn", "n": 4, "seed": 3}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "3"
    im = Image.open(io.BytesIO(r.content))
    assert im.size == (2 + 2 * 10, 2 + 2 * 10)  # 2 x 2 tiles of 8 px with 2 px padding


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("image/*", "image/png"),
        ("*/*", "application/json"),
        ("", "application/json"),
        ("image/png;q=0.5, application/json", "application/json"),
        ("application/json;q=0.2, image/*;q=0.9", "image/png"),
        ("image/png;q=0", "application/json"),
    ],
)
async def test_sample_negotiates_png_or_json(client, accept, content_type):
    r = await client.post("/sample", json={"model": "vae", "n": 1, "seed": 1}, headers={"Accept": accept})
    assert r.status_code == 200 and r.headers["content-type"] == content_type


async def test_sample_label_by_name_and_index(client):
    by_name = await client.post("/sample", json={"model": "pixelcnn-cond", "n": 2, "seed": 5, "label": "b"})
    by_index = await client.post("/sample", json={"model": "pixelcnn-cond", "n": 2, "seed": 5, "label": 1})
    assert by_name.status_code == by_index.status_code == 200
    assert by_name.json()["label"] == 1 and by_name.json()["images"] == by_index.json()["images"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"model": "pixelcnn", "label": 0}, "model 'pixelcnn' is not class-conditional; remove 'label'"),
        (
            {"model": "pixelcnn-cond"},
            "model 'pixelcnn-cond' is class-conditional; send 'label': one of ['a', 'b', 'c'] or an index 0..2",
        ),
        ({"model": "pixelcnn-cond", "label": "z"}, "label 'z' is not a class of model 'pixelcnn-cond'"),
        ({"model": "pixelcnn-cond", "label": 3}, "label 3 is out of range for model 'pixelcnn-cond'"),
        ({"model": "pixelcnn", "n": 65}, "n=65 is over the limit of 64 samples per request (GENSERVE_MAX_SAMPLES)"),
    ],
)
async def test_sample_bad_requests_are_422(client, body, detail):
    r = await client.post("/sample", json=body)
    assert r.status_code == 422
    assert r.json()["detail"].startswith(detail)
    assert " at 0x" not in r.json()["detail"], "the same bad file gets the same answer (no object address)"


@pytest.mark.parametrize(
    ("raw", "field", "kind"),
    [
        (b'{"model": "vae", "n": 1e400}', "n", "int_type"),  # parses as infinity, a float
        (b'{"model": "vae", "temperature": NaN}', "temperature", "finite_number"),
        (b'{"model": "vae", "temperature": Infinity}', "temperature", "finite_number"),
        (b'{"model": "vae", "temperature": 1e400}', "temperature", "finite_number"),
    ],
)
async def test_non_finite_numbers_are_422_naming_the_field(client, raw, field, kind):
    r = await client.post("/sample", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()["detail"][0]
    assert err["loc"] == ["body", field] and err["type"] == kind
    assert err["input"] in ("inf", "nan")


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/sample", {"model": "vae", "seed": False}, "seed"),  # was taken as seed 0 (schemathesis)
        ("/sample", {"model": "vae", "n": True}, "n"),
        ("/sample", {"model": "vae", "n": "2"}, "n"),
        ("/sample", {"model": "vae", "n": 2.0}, "n"),
        ("/sample", {"model": "vae", "temperature": "0.5"}, "temperature"),
        ("/sample/stream", {"model": "vae", "seed": True}, "seed"),
        ("/score", {"model": "vae", "images": [], "heatmap": 1}, "heatmap"),
        ("/score", {"model": "vae", "images": [], "resize": "true"}, "resize"),
        ("/encode", {"model": "vae", "images": [], "resize": 0}, "resize"),
    ],
)
async def test_json_values_of_the_wrong_type_are_422_not_coerced(client, route, body, field):
    # JSON says what type a value is: a bool is no integer, "2" no number, 1 no bool.
    r = await client.post(route, json=body)
    assert r.status_code == 422, r.text
    assert ["body", field] in [e["loc"] for e in r.json()["detail"]]


@pytest.mark.parametrize("route", ["/sample", "/sample/stream"])
@pytest.mark.parametrize("model", ["pixelcnn", "vae"])
@pytest.mark.parametrize(("temperature", "kind"), [(1e-4, "greater_than_equal"), (5.98e307, "less_than_equal")])
async def test_temperature_outside_its_range_is_422_naming_the_range(client, route, model, temperature, kind):
    # 5.98e307 once overflowed float32 inside the sampler and answered 500 (found by schemathesis).
    r = await client.post(route, json={"model": model, "temperature": temperature})
    assert r.status_code == 422, r.text
    err = r.json()["detail"][0]
    assert err["loc"] == ["body", "temperature"] and err["type"] == kind


@pytest.mark.parametrize("temperature", [1e-3, 1e3])
async def test_temperature_range_ends_are_served(client, temperature):
    for model in ("pixelcnn", "vae"):
        r = await client.post("/sample", json={"model": model, "n": 2, "seed": 1, "temperature": temperature})
        assert r.status_code == 200, r.text


async def test_sample_validation_errors_keep_fastapi_format(client):
    r = await client.post("/sample", json={"model": "pixelcnn", "n": 0, "temperature": -1, "bogus": 1})
    assert r.status_code == 422
    locs = {tuple(e["loc"]) for e in r.json()["detail"]}
    assert {("body", "n"), ("body", "temperature"), ("body", "bogus")} <= locs


# ---- /score ---------------------------------------------------------------------------------------


async def test_score_json_matches_model_log_prob(client, model_dir):
    data = [gray_png(0), gray_png(1)]
    body = {"model": "pixelcnn", "images": [b64(d) for d in data], "score_type": "nll"}
    r = await client.post("/score", json=body)
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "pixelcnn" and body["score_type"] == "nll"
    model, _ = load_checkpoint(model_dir / "pixelcnn")
    x = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(d)))[None] for d in data]))
    expected = model.log_prob(x).tolist()
    for i, res in enumerate(body["results"]):
        assert res["index"] == i and res["resized"] is False and res["heatmap"] is None
        assert res["log_likelihood_nats"] == pytest.approx(expected[i], rel=1e-5)
        assert res["bits_per_dim"] == pytest.approx(-expected[i] / (64 * math.log(2)), rel=1e-5)
        assert res["score"] == pytest.approx(res["bits_per_dim"])
        assert res["threshold"] is None and res["is_outlier"] is None and res["percentile"] is None


async def test_score_multipart_upload(client):
    files = [("files", ("a.png", gray_png(0), "image/png")), ("files", ("b.jpg", _jpeg(), "image/jpeg"))]
    r = await client.post("/score", data={"model": "pixelcnn"}, files=files)
    assert r.status_code == 200
    assert [res["index"] for res in r.json()["results"]] == [0, 1]
    same = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png(0))]})
    assert r.json()["results"][0]["log_likelihood_nats"] == same.json()["results"][0]["log_likelihood_nats"]


async def test_score_multipart_label_heatmap_and_resize_query(client):
    files = [("files", ("big.png", png_bytes(np.zeros((16, 16, 3), np.uint8)), "image/png"))]
    r = await client.post(
        "/score?resize=true", data={"model": "pixelcnn-cond", "label": "c", "heatmap": "true"}, files=files
    )
    assert r.status_code == 200
    res = r.json()["results"][0]
    assert res["resized"] is True and decode_png(res["heatmap"]).size == (8, 8)


@pytest.mark.parametrize(("text", "resized"), [("true", True), ("1", True), ("false", False), ("0", False)])
async def test_multipart_booleans_are_the_documented_spellings(client, text, resized):
    files = [("files", ("big.png", png_bytes(np.zeros((16, 16), np.uint8)), "image/png"))]
    r = await client.post("/score", data={"model": "pixelcnn", "resize": text}, files=files)
    if resized:
        assert r.status_code == 200 and r.json()["results"][0]["resized"] is True
    else:
        assert r.status_code == 422 and "resize" in r.json()["detail"]  # 16x16 for an 8x8 model


@pytest.mark.parametrize("text", ["yes", "on", "TRUE", ""])
async def test_multipart_booleans_in_other_spellings_are_422(client, text):
    # The OpenAPI document lists true, false, 1 and 0; the server takes those and nothing else.
    files = [("files", ("a.png", gray_png(), "image/png"))]
    r = await client.post("/encode", data={"model": "vae", "resize": text}, files=files)
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "resize"] and "['true', 'false', '1', '0']" in err["msg"]


async def test_score_multipart_errors(client):
    r = await client.post("/score", data={"model": "pixelcnn"}, files=[("other", ("a.png", gray_png(), "image/png"))])
    assert r.status_code == 422 and "form field 'files'" in r.json()["detail"]
    r = await client.post("/score", data={"images": "x"}, files=[("files", ("a.png", gray_png(), "image/png"))])
    assert r.status_code == 422 and {tuple(e["loc"]) for e in r.json()["detail"]} >= {("body", "model")}
    files = [("files", ("a.png", gray_png(), "image/png"))]
    r = await client.post("/score", data={"model": ["pixelcnn", "vae"]}, files=files)
    assert r.status_code == 422
    assert r.json()["detail"] == "form field(s) ['model'] sent more than once; send each option once"


@pytest.mark.parametrize("label", ["³", "٣", "1.0", "-1", ""])
async def test_multipart_label_that_is_no_class_or_ascii_index_is_422(client, label):
    # A form label is text: "2" is an index, but "³" (str.isdigit, int() fails) once answered 500 (schemathesis).
    files = [("files", ("a.png", gray_png(), "image/png"))]
    r = await client.post("/score", data={"model": "pixelcnn-cond", "label": label}, files=files)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == (
        f"label '{label}' is not a class of model 'pixelcnn-cond'; send one of ['a', 'b', 'c'] or an index 0..2"
    )
    r = await client.post("/score", data={"model": "pixelcnn-cond", "label": " 2 "}, files=files)
    assert r.status_code == 200


async def test_score_label_for_conditional_model(client):
    img = [b64(gray_png(0))]
    a = await client.post("/score", json={"model": "pixelcnn-cond", "images": img, "label": "a"})
    c = await client.post("/score", json={"model": "pixelcnn-cond", "images": img, "label": 2})
    assert a.status_code == c.status_code == 200
    assert a.json()["results"][0]["log_likelihood_nats"] != c.json()["results"][0]["log_likelihood_nats"]
    # without a label: p(x) = sum_y p(x|y) p(y), here with a uniform prior (no class counts recorded)
    r = await client.post("/score", json={"model": "pixelcnn-cond", "images": img})
    assert r.status_code == 200
    lls = [a.json()["results"][0]["log_likelihood_nats"], None, c.json()["results"][0]["log_likelihood_nats"]]
    b = await client.post("/score", json={"model": "pixelcnn-cond", "images": img, "label": "b"})
    lls[1] = b.json()["results"][0]["log_likelihood_nats"]
    expected = math.log(sum(math.exp(v) for v in lls) / 3)
    assert r.json()["results"][0]["log_likelihood_nats"] == pytest.approx(expected, rel=1e-5)
    r = await client.post("/score", json={"model": "pixelcnn-cond", "images": img, "heatmap": True})
    assert r.status_code == 422 and "send 'label' for a heatmap of p(x|y)" in r.json()["detail"]
    r = await client.post("/score", json={"model": "vae", "images": img, "label": "a"})
    assert r.status_code == 422 and r.json()["detail"] == "model 'vae' is not class-conditional; remove 'label'"


async def test_score_heatmap_shape_and_scale(client):
    r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png(0))], "heatmap": True})
    res = r.json()["results"][0]
    im = decode_png(res["heatmap"])
    assert im.size == (8, 8) and im.mode == "L"
    assert res["heatmap_scale_nats"] == pytest.approx(math.log(256))
    # The map is the per-pixel NLL: its mean, scaled back, is close to the image's NLL per pixel.
    mean_nats = np.asarray(im, dtype=np.float64).mean() / 255 * res["heatmap_scale_nats"]
    assert mean_nats == pytest.approx(-res["log_likelihood_nats"] / 64, abs=0.05)


async def test_score_heatmap_needs_autoregressive_model(client):
    r = await client.post("/score", json={"model": "vae", "images": [b64(gray_png())], "heatmap": True})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "heatmaps need per-pixel likelihoods, which only autoregressive models give; model 'vae' is a vae"
    )


async def test_score_vae(client):
    r = await client.post("/score", json={"model": "vae", "images": [b64(gray_png(0)), b64(gray_png(1))]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert all(res["log_likelihood_nats"] < 0 for res in r.json()["results"])


async def test_score_wrong_shape_and_mode_are_422(client):
    rgb = png_bytes(np.zeros((32, 32, 3), np.uint8))
    r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png(0)), b64(rgb)]})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "image 1 is 32x32 RGB; model 'pixelcnn' takes 1x8x8 grayscale (send resize=true to convert)"
    )
    rgb8 = png_bytes(np.zeros((8, 8, 3), np.uint8))
    r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(rgb8)]})
    assert r.status_code == 422 and r.json()["detail"].startswith("image 0 is 8x8 RGB;")


async def test_score_resize_converts_and_flags(client):
    rgb = png_bytes(np.full((32, 32, 3), 200, np.uint8))
    r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(rgb), b64(gray_png())], "resize": True})
    assert r.status_code == 200
    assert [res["resized"] for res in r.json()["results"]] == [True, False]


@pytest.mark.parametrize(
    ("image", "detail"),
    [
        ("not base64!!", "image 1 is not valid base64"),
        (b64(b"these bytes are no image"), "image 1 could not be decoded as an image"),
        ("", "image 1 is empty"),
        (b64(gray_png()[:60]), "image 1 is truncated or corrupt"),
    ],
)
async def test_score_bad_image_data_is_422_naming_the_index(client, image, detail):
    r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png()), image]})
    assert r.status_code == 422
    assert r.json()["detail"].startswith(detail)


async def test_score_decompression_bomb_is_413(make_settings):
    async with running(make_settings(max_image_pixels=1000)) as (_, client):
        huge = png_bytes(np.zeros((100, 100), np.uint8))  # 10,000 pixels > 2 x limit: Pillow's own error
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(huge)], "resize": True})
        assert (
            r.status_code == 413
            and r.json()["detail"] == "image 0 has too many pixels; the limit is 1000 (width x height)"
        )
        big = png_bytes(np.zeros((40, 40), np.uint8))  # 1,600 pixels: between 1x and 2x the limit
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(big)], "resize": True})
        assert r.status_code == 413
        big_jpeg = png_bytes(np.zeros((200, 200), np.uint8), "JPEG")  # JPEGs skip Pillow's check: ours refuses
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(big_jpeg)]})
        assert r.status_code == 413 and r.json()["detail"].startswith(
            "image 0 is 200x200 = 40000 pixels; the limit is 1000 (GENSERVE_MAX_IMAGE_PIXELS; JPEG photos up to 64"
        )


async def test_a_photo_over_the_pixel_limit_is_decoded_at_a_reduced_scale(make_settings):
    """A JPEG over the limit (a phone photo) with resize=true is decoded by libjpeg at 1/2, 1/4 or 1/8 of
    its size, whichever fits, and scored as the offline tools convert it; the same picture as a PNG, or
    the JPEG without resize, is refused."""
    from models.image_convert import file_to_levels

    rng = np.random.default_rng(5)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (25, 25, 3), dtype=np.uint8), 4, 0), 4, 1)  # 100x100
    jpeg = png_bytes(pixels, "JPEG")  # 10,000 pixels: 1/4 of the size (625) is the largest that fits 1,000
    async with running(make_settings(max_image_pixels=1000)) as (_, client):
        body = {"model": "pixelcnn", "images": [b64(jpeg)], "resize": True, "score_type": "nll", "input_image": True}
        r = await client.post("/score", json=body)
        assert r.status_code == 200, r.text
        seen = np.asarray(decode_png(r.json()["results"][0]["input_image"]))
        assert (seen == file_to_levels(jpeg, (1, 8, 8), 256, max_pixels=1000)[0]).all()
        assert not (seen == file_to_levels(jpeg, (1, 8, 8), 256, max_pixels=10**6)[0]).all()  # not the full decode
        r = await client.post("/score", json={**body, "images": [b64(png_bytes(pixels))]})
        assert r.status_code == 413
        r = await client.post("/score", json={**body, "resize": False})
        assert r.status_code == 413


async def test_score_too_many_images_is_422(make_settings):
    async with running(make_settings(max_images=2)) as (_, client):
        r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())] * 3})
        assert r.status_code == 422
        assert r.json()["detail"].startswith("3 images is over the limit of 2 per request (GENSERVE_MAX_IMAGES)")


async def test_score_unknown_score_type_is_422(client):
    r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())], "score_type": "magic"})
    assert r.status_code == 422
    assert (
        r.json()["detail"]
        == "unknown score_type 'magic'; model 'pixelcnn' offers ['complexity', 'complexity_guarded', 'nll']"
    )


async def test_score_empty_list_and_wrong_content_type(client):
    r = await client.post("/score", json={"model": "pixelcnn", "images": []})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "images"]
    r = await client.post("/score", content=b"model=pixelcnn", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert r.json()["detail"] == (
        "content type 'text/plain' is not accepted; send application/json or multipart/form-data"
    )
    r = await client.post("/score", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


async def test_undecodable_json_body_is_422_not_500(client):
    for route in ("/score", "/classify", "/encode", "/sample"):
        r = await client.post(route, content=b"\xff\xfe{garbage", headers={"content-type": "application/json"})
        assert r.status_code == 422, (route, r.text)
        err = r.json()["detail"][0]
        assert err["type"] == "json_invalid" and err["loc"][0] == "body"


async def test_a_huge_rejected_input_is_not_echoed_back_whole(client):
    big = b64(gray_png(0, size=(200, 200)))  # about 50 kB of base64 sent where a list belongs
    r = await client.post("/score", json={"model": "pixelcnn", "images": big})
    assert r.status_code == 422
    err = r.json()["detail"][0]
    assert err["loc"] == ["body", "images"] and err["type"] == "list_type"
    assert err["input"].startswith(big[:200]) and err["input"].endswith(f"... ({len(big)} characters)")
    assert len(r.content) < 1000
    r = await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())], "resize": "maybe"})
    assert r.json()["detail"][0]["input"] == "maybe"  # short inputs come back as sent


async def test_score_with_calibration(make_settings, model_dir: Path, tmp_path: Path):
    shutil.copytree(model_dir / "pixelcnn", tmp_path / "calibrated")
    quantiles = [7.0 + 0.01 * i for i in range(101)]  # q_0 = 7.0 ... q_100 = 8.0
    update_metadata(
        tmp_path / "calibrated",
        calibration={"default_score": "nll", "scores": {"nll": {"threshold": 7.5, "quantiles": quantiles}}},
    )
    async with running(make_settings(model_dir=tmp_path)) as (app, client):
        r = await client.post("/score", json={"model": "calibrated", "images": [b64(gray_png(0))]})
        res = r.json()["results"][0]
        assert res["threshold"] == 7.5
        assert res["is_outlier"] is (res["score"] > 7.5)
        expected = min(100.0, max(0.0, (res["score"] - 7.0) * 100))
        assert res["percentile"] == pytest.approx(expected, abs=1e-6)
        flagged = app.state.metrics.sample_value(
            "genserve_outliers_flagged_total", {"model": "calibrated", "score_type": "nll"}
        )
        assert flagged == (1.0 if res["is_outlier"] else 0.0)
        info = (await client.get("/models/calibrated")).json()
        assert info["calibration"]["scores"]["nll"]["threshold"] == 7.5


# ---- limits and errors ------------------------------------------------------------------------------


async def test_body_too_large_by_content_length_is_413(make_settings):
    async with running(make_settings(max_upload_bytes=1000)) as (_, client):
        r = await client.post("/score", json={"model": "pixelcnn", "images": ["A" * 2000]})
        assert r.status_code == 413
        assert r.json()["detail"].startswith("request body is larger than 1000 bytes (GENSERVE_MAX_UPLOAD_BYTES)")


async def test_body_too_large_while_streaming_is_413(make_settings):
    async def chunks():
        for _ in range(10):
            yield b"x" * 200

    async with running(make_settings(max_upload_bytes=1000)) as (_, client):
        r = await client.post("/score", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "larger than 1000 bytes" in r.json()["detail"]
        r = await client.post("/sample", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


async def test_unexpected_error_is_generic_500_with_request_id(make_settings):
    async with running(make_settings(models="pixelcnn")) as (app, client):
        model = worker_of(app, "pixelcnn").model

        def broken(x, y=None):
            raise RuntimeError("secret internals")

        model.log_prob = broken
        r = await client.post(
            "/score", json={"model": "pixelcnn", "images": [b64(gray_png())]}, headers={"X-Request-ID": "req-42"}
        )
        assert r.status_code == 500
        assert r.json() == {"detail": "internal error", "request_id": "req-42"}
        assert r.headers["x-request-id"] == "req-42"


async def test_every_response_has_a_request_id(client):
    for r in [await client.get("/healthz"), await client.get("/nowhere"), await client.post("/sample", json={})]:
        assert len(r.headers["x-request-id"]) == 32
    assert (await client.get("/nowhere")).json() == {"detail": "Not Found"}


async def test_openapi_documents_every_route(client):
    spec = (await client.get("/openapi.json")).json()
    assert {"/models", "/models/{name}", "/sample", "/score", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    score_body = spec["paths"]["/score"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(score_body)


async def test_metrics_endpoint(client):
    await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())]})
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'genserve_requests_total{model="pixelcnn",route="/score",status="200"} 1.0' in text
    for name in [
        "genserve_request_seconds_bucket",
        "genserve_queue_wait_seconds_bucket",
        "genserve_batch_images_bucket",
        "genserve_inference_seconds_bucket",
        "genserve_queue_images",
        "genserve_in_flight_requests",
        "genserve_model_info",
    ]:
        assert name in text, name


async def test_instrumented_gate_counts_calls(make_settings):
    async with running(make_settings(models="pixelcnn")) as (app, client):
        gate = Gate(worker_of(app, "pixelcnn").model)
        await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png())] * 3})
        assert gate.calls == [3]


def _jpeg() -> bytes:
    return png_bytes(np.full((8, 8), 128, np.uint8), fmt="JPEG")


async def test_decodes_for_the_pool_wait_for_one_of_max_concurrent_decodes(make_settings, monkeypatch):
    import threading
    import time

    from service import uploads

    active, most, lock = 0, 0, threading.Lock()
    decode_all = uploads.decode_all

    def counted(*args, **kwargs):
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.05)
        try:
            return decode_all(*args, **kwargs)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(uploads, "decode_all", counted)
    body = {"model": "pixelcnn", "images": [b64(gray_png(size=(16, 16)))], "resize": True, "score_type": "nll"}
    async with running(make_settings(max_concurrent_decodes=2)) as (_, client):
        answers = await asyncio.gather(*[client.post("/score", json=body) for _ in range(6)])
    assert [r.status_code for r in answers] == [200] * 6
    assert most == 2  # six converted uploads at once, two decoded at a time
