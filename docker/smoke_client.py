"""Smoke test of a running genserve container, with the standard library only (docker/smoke_test.sh runs it).

    python3 docker/smoke_client.py http://127.0.0.1:18000 [--ready-timeout 300]

Waits for /readyz, then checks /healthz, /models, POST /sample (vae-fmnist, n=2), POST /score (a
28x28 grayscale PNG made here, JSON and multipart), POST /classify, POST /encode and /metrics:
status codes and JSON fields.
Exits 1 with the failing check's message.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import struct
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from typing import Any

logger = logging.getLogger("smoke")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SmokeError(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeError(message)


def gray_png(width: int, height: int) -> bytes:
    """An 8-bit grayscale PNG (a diagonal gradient), encoded by hand: no Pillow on the host needed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes((x + y) * 255 // (width + height - 2) for x in range(width)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def request(
    base: str, path: str, *, body: bytes | None = None, content_type: str | None = None, timeout: float = 60
) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of one request; HTTP errors are answers too, not exceptions."""
    req = urllib.request.Request(base + path, data=body, method="POST" if body is not None else "GET")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def get_json(base: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    status, raw, _ = request(base, path, **kwargs)
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


def wait_ready(base: str, timeout_s: float) -> float:
    """Seconds until /readyz answered 200; polls once a second (the container is another process)."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout_s:
        try:
            status, body = get_json(base, "/readyz", timeout=5)
            if status == 200:
                return time.monotonic() - start
            last = f"{status} {body}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = str(e)
        time.sleep(1)
    raise SmokeError(f"/readyz not 200 within {timeout_s:.0f} s; last answer: {last}")


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    for name, filename, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join([*parts, f"--{boundary}--\r\n".encode()]), f"multipart/form-data; boundary={boundary}"


def check_score(body: Any, model: str) -> float:
    check(isinstance(body, dict) and body.get("model") == model, f"/score answered {body}")
    results = body["results"]
    check(len(results) == 1, f"/score: {len(results)} results for 1 image")
    r = results[0]
    for key in ("log_likelihood_nats", "bits_per_dim", "score"):
        check(isinstance(r.get(key), float) and math.isfinite(r[key]), f"/score: {key}={r.get(key)!r}")
    check(r["log_likelihood_nats"] < 0 and r["bits_per_dim"] > 0, f"/score: impossible likelihood {r}")
    return float(r["bits_per_dim"])


def run(base: str, ready_timeout_s: float) -> None:
    ready_s = wait_ready(base, ready_timeout_s)
    logger.info("ready after %.1f s", ready_s)

    status, body = get_json(base, "/readyz")
    check(status == 200 and body.get("status") == "ready", f"/readyz: {status} {body}")
    check("vae-fmnist" in body["models"], f"/readyz lists {body['models']}, not vae-fmnist")
    status, body = get_json(base, "/healthz")
    check(status == 200 and body == {"status": "ok"}, f"/healthz: {status} {body}")
    status, body = get_json(base, "/models")
    check(status == 200 and {m["name"] for m in body["models"]} >= {"vae-fmnist"}, f"/models: {status} {body}")

    t = time.monotonic()
    payload = json.dumps({"model": "vae-fmnist", "n": 2, "seed": 1}).encode()
    status, body = get_json(base, "/sample", body=payload, content_type="application/json")
    check(status == 200, f"/sample: {status} {body}")
    check(body["model"] == "vae-fmnist" and body["seed"] == 1, f"/sample answered {body}")
    check(len(body["images"]) == 2, f"/sample: {len(body['images'])} images for n=2")
    for b64 in body["images"]:
        png = base64.b64decode(b64)
        check(png.startswith(PNG_SIGNATURE), "/sample: an image is not a PNG")
        width, height = struct.unpack(">II", png[16:24])
        check((width, height) == (28, 28), f"/sample: a {width}x{height} image, not 28x28")
    logger.info("/sample vae-fmnist n=2: 200 in %.2f s", time.monotonic() - t)

    png = gray_png(28, 28)
    t = time.monotonic()
    payload = json.dumps({"model": "vae-fmnist", "images": [base64.b64encode(png).decode()]}).encode()
    status, body = get_json(base, "/score", body=payload, content_type="application/json")
    check(status == 200, f"/score (JSON): {status} {body}")
    bpd = check_score(body, "vae-fmnist")
    logger.info("/score vae-fmnist (JSON): 200 in %.2f s, %.3f bits/dim", time.monotonic() - t, bpd)

    t = time.monotonic()
    data, content_type = multipart({"model": "pixelcnn-fmnist"}, [("files", "gradient.png", png)])
    status, body = get_json(base, "/score", body=data, content_type=content_type)
    check(status == 200, f"/score (multipart): {status} {body}")
    bpd = check_score(body, "pixelcnn-fmnist")
    logger.info("/score pixelcnn-fmnist (multipart): 200 in %.2f s, %.3f bits/dim", time.monotonic() - t, bpd)

    t = time.monotonic()
    data, content_type = multipart({"model": "pixelcnn-fmnist-cond"}, [("files", "gradient.png", png)])
    status, body = get_json(base, "/classify", body=data, content_type=content_type)
    check(status == 200, f"/classify (multipart): {status} {body}")
    r = body["results"][0]
    check(abs(sum(r["posterior"].values()) - 1.0) < 1e-6, f"/classify: posterior does not sum to 1: {r}")
    check(isinstance(r["rejected"], bool), f"/classify: the shipped model is calibrated, rejected={r['rejected']!r}")
    logger.info("/classify pixelcnn-fmnist-cond: 200 in %.2f s, rejected=%s", time.monotonic() - t, r["rejected"])

    status, body = get_json(base, "/encode", body=payload, content_type="application/json")
    check(status == 200, f"/encode (JSON): {status} {body}")
    codes = body["results"][0]
    check(len(codes["mean"]) == len(codes["std"]) == body["latent_dim"] > 0, f"/encode answered {body}")
    check(min(codes["std"]) > 0, "/encode: a standard deviation is not positive")

    status, body = get_json(
        base, "/score", body=b'{"model": "no-such-model", "images": ["AA=="]}', content_type="application/json"
    )
    check(status == 404, f"/score with an unknown model: {status} {body}, not 404")

    status, raw, _ = request(base, "/metrics")
    text = raw.decode()
    check(status == 200, f"/metrics: {status}")
    for name in ("genserve_requests_total", "genserve_queue_images", "genserve_images_sampled_total"):
        check(name in text, f"/metrics lacks {name}")
    logger.info("/healthz, /models, /metrics, 404 for an unknown model: ok")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="smoke: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("--ready-timeout", type=float, default=300)
    args = parser.parse_args()
    try:
        run(args.base_url.rstrip("/"), args.ready_timeout)
    except (SmokeError, KeyError, TypeError, urllib.error.URLError) as e:
        logger.error("FAILED: %s", e)
        return 1
    logger.info("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
