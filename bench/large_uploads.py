"""Full-size uploads through /score: phone photos and high-resolution screenshots, as people send them.

Builds files at the sizes devices produce (JPEG photos of 12 and 48 megapixels, PNG screenshots of
a 4K and a 5K display), from the real-upload suite's pictures (a photo stretched to the size and
given sensor-like noise; a rendered page tiled), and sends each to the app in this process as a
multipart upload with ``resize=true``, under ``GENSERVE_MAX_IMAGE_PIXELS`` values given with
``--limit``. Prints the status, the verdict and the wall time of each request (the decoding and
conversion dominate it: the model sees 28x28).

    python bench/large_uploads.py --model pixelcnn-fmnist --limit 4000000 --limit 16000000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUITE = ROOT / "data" / "upload-suite"


def photo(size: tuple[int, int], seed: int) -> bytes:
    """A JPEG photo of ``size`` (w, h): a suite photo stretched, with per-pixel noise as sensors give."""
    base = Image.open(SUITE / "photos" / "astronaut.jpg").convert("RGB").resize(size, Image.Resampling.BILINEAR)
    noise = np.random.default_rng(seed).normal(0, 4, (size[1], size[0], 1))
    pixels = np.clip(np.asarray(base, np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def screenshot(size: tuple[int, int]) -> bytes:
    """A PNG screenshot of ``size``: the suite's rendered pages tiled over a light desktop."""
    canvas = Image.new("RGB", size, (236, 236, 236))
    pages = sorted((SUITE / "screenshots").iterdir())
    x = y = 0
    for i in range(10_000):
        page = Image.open(pages[i % len(pages)]).convert("RGB")
        canvas.paste(page, (x, y))
        x += page.width
        if x >= size[0]:
            x, y = 0, y + page.height
        if y >= size[1]:
            break
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


async def send(limit: int, model: str, files: dict[str, bytes]) -> list[str]:
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model_dir=ROOT / "checkpoints", models=model, max_image_pixels=limit))
    rows = []
    async with app.router.lifespan_context(app):
        await app.state.registry.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:
            for name, data in files.items():
                t = time.perf_counter()
                r = await client.post(
                    "/score?resize=true", data={"model": model}, files=[("files", (name, data, "image/*"))]
                )
                ms = 1000 * (time.perf_counter() - t)
                if r.status_code == 200:
                    res = r.json()["results"][0]
                    verdict = f"is_outlier {res['is_outlier']}, decided_by {res['explanation']['decided_by']}"
                else:
                    verdict = r.json()["detail"][:90]
                mb = len(data) / 1e6
                rows.append(f"| {limit:,} | {name} | {mb:.1f} MB | {r.status_code} | {verdict} | {ms:.0f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="pixelcnn-fmnist")
    p.add_argument("--limit", type=int, action="append", help="GENSERVE_MAX_IMAGE_PIXELS (repeatable)")
    args = p.parse_args()
    files = {
        "photo 4032x3024 (12 MP).jpg": photo((4032, 3024), 0),
        "photo 8064x6048 (48 MP).jpg": photo((8064, 6048), 1),
        "screenshot 3840x2160 (4K).png": screenshot((3840, 2160)),
        "screenshot 5120x2880 (5K).png": screenshot((5120, 2880)),
    }
    print("| limit | file | size | status | answer | ms |")  # noqa: T201 - the benchmark's output
    print("| --- | --- | --- | --- | --- | --- |")  # noqa: T201
    for limit in args.limit or [16_000_000]:
        for row in asyncio.run(send(limit, args.model, files)):
            print(row, flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
