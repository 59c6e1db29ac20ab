"""The OpenAPI document says what the server answers, as configured (service/openapi.py), and a
property-based run of schemathesis against a real server finds no answer it does not describe."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.schemas import ErrorResponse
from tests.service.helpers import b64, gray_png, running
from tests.service.test_e2e import ServerLog, start_server, stop_server

METHODS = ("get", "post")
KEY = "fuzz-key"


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def json_ref(response: dict[str, Any]) -> str:
    return str(response["content"]["application/json"]["schema"]["$ref"])


@pytest.mark.anyio
async def test_without_keys_the_document_asks_for_none_and_states_every_error(make_settings):
    async with running(make_settings(max_samples=7, max_images=5), wait=False) as (_, client):
        doc = (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in doc["components"]
    assert not {"HTTPValidationError", "ValidationError"} & set(doc["components"]["schemas"])
    for path, method, op in operations(doc):
        responses = op["responses"]
        assert "security" not in op and "401" not in responses, path
        assert json_ref(responses["500"]) == "#/components/schemas/ErrorResponse"
        if method == "post":
            assert {"400", "408", "413", "422", "503"} <= set(responses), path
        for status, response in responses.items():
            if status != "200" and "application/json" in response.get("content", {}):
                assert json_ref(response) == "#/components/schemas/ErrorResponse", (path, status)
    sample = doc["components"]["schemas"]["SampleRequest"]["properties"]
    assert sample["n"]["maximum"] == 7
    score = doc["paths"]["/score"]["post"]["requestBody"]["content"]
    assert score["application/json"]["schema"]["properties"]["images"]["maxItems"] == 5
    assert score["multipart/form-data"]["schema"]["properties"]["files"]["maxItems"] == 5


@pytest.mark.anyio
async def test_the_document_lists_the_served_models(make_settings):
    async with running(make_settings(models="vae,pixelcnn"), wait=False) as (_, client):
        doc = (await client.get("/openapi.json")).json()
    served = ["pixelcnn", "vae"]
    assert doc["components"]["schemas"]["SampleRequest"]["properties"]["model"]["enum"] == served
    for route in ("/score", "/classify", "/encode"):
        for media in doc["paths"][route]["post"]["requestBody"]["content"].values():
            assert media["schema"]["properties"]["model"]["enum"] == served, route
    (name,) = doc["paths"]["/models/{name}"]["get"]["parameters"]
    assert name["schema"]["enum"] == served


@pytest.mark.anyio
@pytest.mark.parametrize("metrics_public", [False, True])
async def test_with_keys_the_protected_routes_say_so(make_settings, metrics_public):
    async with running(make_settings(api_keys=KEY, metrics_public=metrics_public), wait=False) as (_, client):
        r = await client.get("/openapi.json")
    doc = r.json()
    assert set(doc["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    open_paths = {"/healthz", "/readyz"} | ({"/metrics"} if metrics_public else set())
    for path, _, op in operations(doc):
        protected = path not in open_paths
        assert ("security" in op) is protected and ("401" in op["responses"]) is protected, path


@pytest.mark.anyio
async def test_with_keys_every_documented_operation_refuses_a_request_without_one(make_settings):
    """What the document says is what the server does: the key check is added to the routers only
    when keys are configured (service/app.py), so every protected operation is called here."""
    async with running(make_settings(api_keys=KEY), wait=False) as (_, client):
        doc = (await client.get("/openapi.json", headers={"X-API-Key": KEY})).json()
        called = 0
        for path, method, op in operations(doc):
            if "security" not in op or path.startswith("/admin"):
                continue  # the admin routes check admin keys (tests/service/test_lifecycle.py)
            url = path.replace("{name}", "pixelcnn").replace("{job_id}", "x")
            r = await client.request(method.upper(), url)
            assert r.status_code == 401, (method, path, r.status_code)
            called += 1
    assert called >= 8


@pytest.mark.anyio
async def test_error_bodies_fit_the_documented_schema(make_settings):
    async with running(make_settings()) as (_, client):
        answers = [
            await client.post("/sample", json={"model": "pixelcnn", "n": 0}),  # field errors
            await client.post("/sample", json={"model": "nope"}),  # a sentence
            await client.post("/score", content=b"{", headers={"content-type": "application/json"}),
            await client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png(size=(9, 9)))]}),
        ]
    assert [r.status_code for r in answers] == [422, 404, 422, 422]
    parsed = [ErrorResponse.model_validate(r.json()) for r in answers]
    assert isinstance(parsed[0].detail, list) and parsed[0].detail[0].loc == ["body", "n"]
    assert [type(p.detail) for p in parsed] == [list, str, list, str]  # field errors or one sentence


# ---- schemathesis against the real server ----------------------------------------------------------

SCHEMATHESIS_CONFIG = f"""
[auth.openapi.APIKeyHeader]
api_key = "{KEY}"

[auth.openapi.HTTPBearer]
bearer = "{KEY}"
"""


@pytest.fixture
def fuzz_server(model_dir: Path) -> Iterator[tuple[str, ServerLog]]:
    """The tiny unconditional, conditional and VAE models behind an API key, small request limits."""
    proc, url, log = start_server(
        model_dir,
        models=("pixelcnn", "pixelcnn-cond", "vae"),
        GENSERVE_API_KEYS=KEY,
        GENSERVE_MAX_SAMPLES="4",
        GENSERVE_MAX_IMAGES="4",
    )
    try:
        yield url, log
    finally:
        stop_server(proc, log)


@pytest.mark.slow
def test_schemathesis_finds_no_undocumented_answer_and_no_server_error(fuzz_server, tmp_path: Path) -> None:
    """`st run` with every check but one, in all its phases (examples, the coverage phase's boundary
    values, fuzzing, stateful), seeded: the same requests on every run. The one check left out:
    a schema cannot say which labels a model has or which bytes decode as an image, so a request
    the schema admits may still get its 404 or 422."""
    url, log = fuzz_server
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    cmd = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(config),
        "run", f"{url}/openapi.json",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--seed", "1", "--max-examples", "100", "--workers", "1", "--request-timeout", "30",
        "--generation-database", "none", "--no-color",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert server_errors(log) == []


def server_errors(log: ServerLog) -> list[str]:
    """Lines of a JSON-logging server that report an error: level ERROR or worse (an unexpected
    exception, "Task was destroyed but it is pending!"), or a request answered 5xx."""
    bad = []
    for line in log.lines:
        try:
            record = json.loads(line)
        except ValueError:
            bad += [line] if "Traceback" in line else []
            continue
        if record.get("level") in ("ERROR", "CRITICAL") or int(record.get("status") or 0) >= 500:
            bad.append(line)
    return bad
