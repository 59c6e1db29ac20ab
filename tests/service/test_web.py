"""The web page at / (service/web/): its files, the API it relies on, and the page itself driven in
Debian's Chromium by Playwright against a real server (`genserve serve` on a free loopback port).

The browser tests are skipped, saying why, where Chromium (``apt-get install chromium``) or the
``playwright`` package is missing; Playwright's own browser downloads are never used. With
GENSERVE_UI_SCREENSHOTS=1, ``test_screenshots_of_every_tab`` serves the shipped checkpoints and
writes docs/ui/*.png (desktop and phone width); otherwise it is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from models.checkpoint import save_checkpoint, update_metadata
from models.image_convert import letterbox
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.scoring.scorer import load_scorer
from models.tools.score_sets import calibrate
from service.web.router import STATIC_DIR
from tests.helpers import TINY_PIXELCNN, dataset_meta
from tests.service.helpers import b64, decode_png, gray_png, png_bytes, running
from tests.service.test_e2e import start_server, stop_server
from tests.service.test_outliers import calibration_images

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("GENSERVE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGE_WEIGHT_LIMIT = 150_000  # bytes of HTML, CSS and JavaScript, uncompressed (issue #19)
FIRST_RENDER_LIMIT_MS = 1000.0
SHOTS = os.environ.get("GENSERVE_UI_SCREENSHOTS") == "1"
TABS = ("models", "score", "sample", "classify")
WIDTHS = {"desktop": 1280, "phone": 390}


def page_files() -> list[Path]:
    return sorted(p for p in STATIC_DIR.rglob("*") if p.suffix in (".html", ".css", ".js"))


# ---- the files and the API the page uses (no browser) ------------------------------------------------


def test_the_page_weighs_under_150_kb():
    sizes = {str(p.relative_to(STATIC_DIR)): p.stat().st_size for p in page_files()}
    assert "index.html" in sizes and any(name.endswith(".js") for name in sizes)
    assert sum(sizes.values()) < PAGE_WEIGHT_LIMIT, sizes


def test_the_page_fetches_nothing_from_elsewhere_and_names_no_absolute_path():
    """Relative URLs only (the page must work under a proxy's prefix), and no other host."""
    for path in page_files():
        text = path.read_text()
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (path.name, urls)
        assert not re.search(r"""(?:src|href)=["']/""", text), path.name
        assert not re.search(r"""(?:fetch|call|getJSON|postJSON|postForm)\(\s*["'`]/""", text), path.name


def test_pip_install_ships_the_page_files():
    """Every page file matches a package-data pattern of service.web in pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service.web"]
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            rel = path.relative_to(STATIC_DIR.parent)
            assert any(rel.match(p) for p in patterns), f"{rel} is not in package-data {patterns}"


@pytest.mark.anyio
async def test_the_page_is_served_without_a_key_with_a_policy_that_forbids_other_hosts(make_settings):
    async with running(make_settings(models="pixelcnn", api_keys="k1")) as (_, client):
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="static/js/main.js">' in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self'" in csp
        script = await client.get("/static/js/main.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert (await client.get("/models")).status_code == 401  # the API still wants its key
        assert "/" not in (await client.get("/openapi.json")).json()["paths"]


@pytest.mark.anyio
async def test_score_returns_the_image_as_the_model_saw_it(make_settings):
    """input_image=true: the PNG of the array scored, after resize=true's conversion (RGB 12x20 to
    grayscale 8x8 here: padded by default, stretched with fit=stretch); absent unless asked for; the
    same from JSON and multipart requests."""
    rng = np.random.default_rng(1)
    rgb = png_bytes(rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8))
    gray = Image.open(io.BytesIO(rgb)).convert("L")
    stretched = np.asarray(gray.resize((8, 8), Image.Resampling.LANCZOS))
    padded = np.asarray(letterbox(gray, (8, 8)))
    assert not np.array_equal(padded, stretched)
    async with running(make_settings(models="pixelcnn")) as (_, client):
        body = {"model": "pixelcnn", "images": [b64(rgb), b64(gray_png(2))], "resize": True, "input_image": True}
        results = (await client.post("/score", json=body)).json()["results"]
        seen = decode_png(results[0]["input_image"])
        assert seen.mode == "L" and seen.size == (8, 8) and results[0]["resized"] is True
        np.testing.assert_array_equal(np.asarray(seen), padded)
        for request in ({"json": {**body, "fit": "stretch"}}, {"params": {"fit": "stretch"}, "json": body}):
            first = (await client.post("/score", **request)).json()["results"][0]  # type: ignore[arg-type]
            np.testing.assert_array_equal(np.asarray(decode_png(first["input_image"])), stretched)
        bad = await client.post("/score", json={**body, "fit": "crop"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "fit"]
        stretched_form = await client.post(
            "/score?resize=true",
            data={"model": "pixelcnn", "input_image": "true", "fit": "stretch"},
            files=[("files", ("a.png", rgb, "image/png"))],
        )
        seen_form = decode_png(stretched_form.json()["results"][0]["input_image"])
        np.testing.assert_array_equal(np.asarray(seen_form), stretched)
        np.testing.assert_array_equal(
            np.asarray(decode_png(results[1]["input_image"])), np.asarray(decode_png(b64(gray_png(2))))
        )
        form = await client.post(
            "/score?resize=true",
            data={"model": "pixelcnn", "input_image": "true"},
            files=[("files", ("a.png", rgb, "image/png"))],
        )
        assert form.json()["results"][0]["input_image"] == results[0]["input_image"]
        plain = (await client.post("/score", json={**body, "input_image": False})).json()["results"][0]
        assert plain["input_image"] is None
        doc = (await client.get("/openapi.json")).json()
        assert "input_image" in doc["components"]["schemas"]["ScoreResult"]["properties"]
        content = doc["paths"]["/score"]["post"]["requestBody"]["content"]
        assert content["application/json"]["schema"]["properties"]["input_image"]["default"] is False
        assert "input_image" in content["multipart/form-data"]["schema"]["properties"]


# ---- test images ------------------------------------------------------------------------------


def fashion_png() -> bytes:
    """A Fashion-MNIST test image (Debian's dataset-fashion-mnist), or 8-bit noise where it is missing."""
    from models.tools.data import DatasetNotFound, load_named

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GENSERVE_NO_DOWNLOAD", "1")
            images = load_named("fashion-mnist", "test").images
    except (DatasetNotFound, OSError):
        return gray_png(7, (28, 28))
    return png_bytes(images[0, 0].numpy())


def photo_jpeg() -> bytes:
    """A photograph: matplotlib's grace_hopper.jpg where matplotlib is installed, else a smooth
    synthetic scene with noise, JPEG-compressed."""
    with contextlib.suppress(ImportError, OSError):
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return f.read()
    y, x = np.mgrid[0:240, 0:320]
    rng = np.random.default_rng(3)
    scene = np.stack([120 + 80 * np.sin(x / 40.0), 100 + 60 * np.cos(y / 30.0), 90 + 0 * x], axis=-1)
    scene += rng.normal(0, 12, scene.shape)
    return png_bytes(np.clip(scene, 0, 255).astype(np.uint8), fmt="JPEG")


# ---- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web_models(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models, calibrated at 10% FPR on dark noise (pixelcnn with itself as background), and
    `slow`: a tiny 64x64 PixelCNN whose 64 samples take long enough to be cancelled mid-way."""
    root = tmp_path_factory.mktemp("web-models")
    for name in ("pixelcnn", "pixelcnn-cond", "vae"):
        shutil.copytree(model_dir / name, root / name)
    shutil.copytree(model_dir / "pixelcnn", root / "pixelcnn" / "background")
    for name in ("pixelcnn", "pixelcnn-cond", "vae"):
        scorer, _ = load_scorer(root / name)
        cal = calibrate(scorer, calibration_images(), data_spec="test", fpr=0.1, show_progress=False)
        update_metadata(root / name, calibration=cal)
    big = {**TINY_PIXELCNN, "height": 64, "width": 64}
    meta = {**dataset_meta(), "shape": [1, 64, 64]}
    save_checkpoint(PixelCNN(PixelCNNConfig(**big)), root / "slow", dataset=meta)
    return root


SERVED = ("pixelcnn", "pixelcnn-cond", "vae", "slow")


@pytest.fixture(scope="module")
def server(web_models: Path, browser: Any) -> Iterator[str]:
    proc, url, log = start_server(web_models, models=SERVED, GENSERVE_TORCH_THREADS="1")
    try:
        yield url
    finally:
        stop_server(proc, log)


class PrefixProxy:
    """A reverse proxy serving the app under /genserve/, as nginx's ``location /genserve/ {
    proxy_pass http://upstream/; }``: the prefix is stripped, one request per connection (it asks
    the app for ``Connection: close``), bytes piped both ways as they come (streams included), and
    a client that hangs up hangs up upstream too. Paths outside the prefix get 404; ``paths``
    records every path asked for."""

    def __init__(self, upstream: str, prefix: str = "/genserve") -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.prefix = prefix.encode()
        self.paths: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def __enter__(self) -> PrefixProxy:
        self.thread.start()
        assert self.ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.thread.join(10)

    async def _stop(self) -> None:
        """Close every connection still open (a browser keeps spare ones), then stop the loop."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.loop.call_soon(self.loop.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix.decode()}/"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers = [writer]
        try:
            await self._forward(reader, writer, writers)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for w in writers:
                w.close()
                with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                    await w.wait_closed()

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, writers: list[asyncio.StreamWriter]
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head[:-4].split(b"\r\n")
        method, target, version = request_line.split(b" ", 2)
        self.paths.append(target.decode())
        if not target.startswith(self.prefix + b"/"):
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return
        headers = [x for x in lines if not x.lower().startswith((b"connection:", b"keep-alive:"))]
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        writers.append(up_writer)
        new_head = b" ".join([method, target[len(self.prefix) :], version])
        up_writer.write(b"\r\n".join([new_head, *headers, b"Connection: close"]) + b"\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()

        tasks = [asyncio.ensure_future(pipe(reader, up_writer)), asyncio.ensure_future(pipe(up_reader, writer))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)  # the answer ended, or the client left
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture(scope="module")
def proxy(server: str) -> Iterator[PrefixProxy]:
    with PrefixProxy(server) as p:
        yield p


# ---- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab at desktop width; JavaScript errors fail the test."""
    context = browser.new_context(viewport={"width": WIDTHS["desktop"], "height": 900}, accept_downloads=True)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.set_default_timeout(30_000)
    try:
        yield p
    finally:
        context.close()
    assert not errors, errors


def open_tab(page: Any, url: str, tab: str) -> None:
    page.goto(f"{url}#{tab}")
    page.wait_for_function("() => document.querySelector('#score-model').options.length > 0")


def upload(page: Any, selector: str, *files: tuple[str, str, bytes]) -> None:
    page.set_input_files(selector, [{"name": n, "mimeType": t, "buffer": data} for n, t, data in files])


def api_score(url: str, name: str, data: bytes, **fields: str) -> httpx.Response:
    form = {"model": "pixelcnn", "heatmap": "true", **fields}
    return httpx.post(f"{url}score?resize=true", data=form, files=[("files", (name, data))], timeout=30)


def metric(url: str, name: str) -> float:
    """A metric's value summed over its labels (a family's samples as /metrics prints them)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = [
        float(line.split()[-1]) for line in text.splitlines() if line.startswith(name) and not line.startswith("#")
    ]
    return sum(values)


# ---- the page in the browser -------------------------------------------------------------------------


def test_score_tab_shows_a_png_and_a_jpeg_as_the_model_saw_them_behind_a_path_prefix(page, proxy):
    """Through a proxy at /genserve/: the converted image, bits/dim, the badge and percentile the API
    gives, the percentile drawn on the calibration histogram with its threshold, and the heatmap as
    an overlay that the checkbox hides and shows. Every request the page makes stays under the prefix."""
    files = [("fashion.png", "image/png", fashion_png()), ("hopper.jpg", "image/jpeg", photo_jpeg())]
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    open_tab(page, proxy.url, "score")
    default = httpx.get(f"{proxy.url}models/pixelcnn").json()["default_score_type"]
    assert page.get_by_label("Score type").input_value() == default
    upload(page, "#score-files", *files)
    page.wait_for_function("() => document.querySelectorAll('#score-results li[data-outlier]').length === 2")
    items = page.locator("#score-results li")
    for i, (name, _, data) in enumerate(files):
        item = items.nth(i)
        want = api_score(proxy.url, name, data, input_image="true").json()["results"][0]
        assert item.locator("h3").inner_text() == name
        badge = item.locator(".badge").inner_text()
        assert badge == ("outlier" if want["is_outlier"] else "in distribution")
        assert f"{want['percentile']:.1f}" in item.inner_text()
        assert f"{want['bits_per_dim']:.3f}" in item.inner_text()
        colour = want["colour"]  # the photograph is in colour: refused for it, and the page says so
        assert colour is not None and colour["crossed"] == (name == "hopper.jpg")
        assert f"{100 * colour['fraction']:.1f}% of pixels in colour" in item.inner_text()
        assert ("trained on grayscale" in item.inner_text()) == colour["crossed"]
        peak = want["peak"]  # the calibration's peak check: the brightest pixel, in words
        assert peak is not None and f"{peak['level']} of 255" in item.inner_text()
        assert ("refused, every training image reaches" in item.inner_text()) == peak["crossed"]
        extent = want["extent"]  # the calibration's extent check: how much of the frame the object spans
        assert extent is not None and f"{extent['pixels']} pixels" in item.inner_text()
        assert ("refused, every training image spans" in item.inner_text()) == extent["crossed"]
        src = item.locator(".view img").get_attribute("src")
        assert src == f"data:image/png;base64,{want['input_image']}"  # the 8x8 array the model scored
        hist = item.locator("svg.hist")
        assert hist.locator("rect.bar").count() > 10 and hist.locator("line.thr").count() == 1
        assert f"percentile {want['percentile']:.1f}" in hist.get_attribute("aria-label")
        assert item.locator("canvas.heat").is_visible()
    page.get_by_label("Heatmap overlay").uncheck()
    assert not items.nth(0).locator("canvas.heat").is_visible()
    page.get_by_label("Heatmap overlay").check()
    assert items.nth(0).locator("canvas.heat").is_visible()
    # another score type scores the same files again
    page.get_by_label("Score type").select_option("nll")
    page.wait_for_function("() => document.querySelectorAll('#score-results li[data-outlier]').length === 2")
    want = api_score(proxy.url, *files[0][::2], score_type="nll").json()["results"][0]
    assert f"{want['score']:.3f}" in items.nth(0).inner_text()
    # stretched instead of padded: the photograph (not square) is scored again as the API stretches it
    padded = items.nth(1).locator(".view img").get_attribute("src")
    page.get_by_label("Fit").select_option("stretch")
    page.wait_for_function(
        "src => document.querySelectorAll('#score-results li[data-outlier]').length === 2 && "
        "document.querySelectorAll('#score-results li')[1].querySelector('.view img').src !== src",
        arg=padded,
    )
    stretched = api_score(proxy.url, *files[1][::2], score_type="nll", input_image="true", fit="stretch")
    want_src = f"data:image/png;base64,{stretched.json()['results'][0]['input_image']}"
    assert items.nth(1).locator(".view img").get_attribute("src") == want_src != padded
    asked = [p for p in proxy.paths if p.startswith("/genserve/")]
    assert "/genserve/" in asked and "/genserve/static/js/score.js" in asked and "/genserve/score?resize=true" in asked
    assert set(proxy.paths) == set(asked), sorted(set(proxy.paths) - set(asked))
    elsewhere = [u for u in urls if not u.startswith((proxy.url, "data:", "blob:"))]
    assert not elsewhere  # the page asks this server for everything, and under the prefix


def test_drop_and_paste_score_files_and_an_explanation_is_shown_whatever_its_keys(page, server):
    """A file dropped on the zone and one pasted are scored; an ``explanation`` in /score's answer
    (added here to the API's real answer, as a later API version may give it) is shown key by key."""
    explanation = {"summary": "likelier than 70% of calibration images", "top_pixels": [[3, 4], [5, 6]]}

    def add_explanation(route: Any) -> None:
        answer = route.fetch()
        body = answer.json()
        for r in body["results"]:
            r["explanation"] = explanation
        route.fulfill(response=answer, json=body)

    page.route("**/score?*", add_explanation)
    open_tab(page, f"{server}/", "score")
    png = list(gray_png(3))
    page.evaluate(
        """([bytes]) => {
             const drop = new DataTransfer();
             drop.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'}));
             document.querySelector('#score-drop').dispatchEvent(new DragEvent('drop', {dataTransfer: drop}));
             const paste = new DataTransfer();
             paste.items.add(new File([new Uint8Array(bytes)], 'pasted.png', {type: 'image/png'}));
             document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: paste}));
           }""",
        [png],
    )
    page.wait_for_function("() => document.querySelectorAll('#score-results li[data-outlier]').length === 2")
    assert page.locator("#score-results h3").all_inner_texts() == ["dropped.png", "pasted.png"]
    shown = page.locator("#score-results li").first.locator(".explanation")
    assert "likelier than 70% of calibration images" in shown.inner_text()
    assert "[[3,4],[5,6]]" in shown.inner_text()


def test_real_answers_fit_a_phone_and_the_dose_explanation_lists_every_statistic(browser, server):
    """The API's own answers (a colour photograph refused for its colour, noise refused by its
    statistics, each with the dose explanation of every statistic) stay within a phone's width; the
    explanation says what refused the image and marks the statistics that crossed."""
    context = browser.new_context(viewport={"width": WIDTHS["phone"], "height": 800})
    try:
        page = context.new_page()
        open_tab(page, f"{server}/", "score")
        files = [("hopper.jpg", "image/jpeg", photo_jpeg()), ("noise.png", "image/png", gray_png(5))]
        upload(page, "#score-files", *files)
        page.wait_for_function("() => document.querySelectorAll('#score-results li[data-outlier]').length === 2")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= WIDTHS["phone"], f"the results are {width} px wide"
        for i, (name, _, data) in enumerate(files):
            want = api_score(f"{server}/", name, data).json()["results"][0]
            e = want["explanation"]
            item = page.locator("#score-results li").nth(i)
            assert item.locator("table.stats tbody tr").count() == len(e["statistics"])
            crossed = sorted(n for n, st in e["statistics"].items() if st["crossed"])
            shown = sorted(t.split("\t")[0] for t in item.locator("table.stats tr.crossed").all_inner_texts())
            assert shown == crossed
            decided = item.locator(".explanation .decided").inner_text()
            assert want["is_outlier"] and decided.startswith(f"refused by {', '.join(e['decided_by'])}")
        assert (
            page.locator("#score-results li")
            .nth(0)
            .locator(".explanation .decided")
            .inner_text()
            .startswith("refused by colour")
        )
    finally:
        context.close()


def test_a_text_file_is_refused_with_the_apis_own_message(page, server):
    text = b"not an image, just some notes\n"
    detail = api_score(f"{server}/", "notes.txt", text).json()["detail"]
    assert "could not be decoded" in detail
    open_tab(page, f"{server}/", "score")
    upload(page, "#score-files", ("notes.txt", "text/plain", text), ("ok.png", "image/png", gray_png(1)))
    refused = page.locator("#score-results li.refused")
    refused.wait_for()
    assert refused.locator(".error").inner_text() == f"Refused (422): {detail}"
    page.locator("#score-results li[data-outlier]").wait_for()  # the other file is scored all the same


def test_sample_tab_streams_16_images_to_the_end_and_downloads_the_apis_grid(page, server):
    open_tab(page, f"{server}/", "sample")
    panel = page.locator("#panel-sample")
    panel.get_by_label("Model").select_option("pixelcnn")
    panel.get_by_label("Images").fill("16")
    panel.get_by_label("Seed").fill("5")
    panel.get_by_role("button", name="Draw").click()
    page.wait_for_function("() => document.querySelector('#sample-status').textContent.startsWith('done')")
    assert page.locator("#sample-progress").evaluate("p => [p.value, p.max]") == [8, 8]  # 8 rows of 8x8 images
    assert page.locator("#sample-grid img").count() == 16
    assert page.locator("#sample-seed-out").inner_text() == "5"
    curl = page.locator("#sample-curl").inner_text()
    assert f"{server}/sample" in curl and '"seed":5' in curl and '"n":16' in curl
    body = {"model": "pixelcnn", "n": 16, "seed": 5}
    api = httpx.post(f"{server}/sample", json=body, timeout=30).json()
    shown = page.locator("#sample-grid img").evaluate_all("imgs => imgs.map(i => i.src)")
    assert shown == [f"data:image/png;base64,{s}" for s in api["images"]]
    with page.expect_download() as info:
        page.get_by_role("link", name="Download grid (PNG)").click()
    assert info.value.suggested_filename == "pixelcnn-seed5.png"
    grid = httpx.post(f"{server}/sample", json=body, headers={"Accept": "image/png"}, timeout=30).content
    want = np.asarray(Image.open(io.BytesIO(grid)).convert("L"))
    got = np.asarray(Image.open(info.value.path()).convert("L"))
    np.testing.assert_array_equal(got, want)  # the page's grid is POST /sample's Accept: image/png grid


def test_cancel_stops_the_stream_and_the_server_frees_it(page, server):
    """64 images of 64 rows: Cancel once the first rows and partial images show; the fetch is aborted, and
    the server's requests in flight (the /metrics poll itself is one) and queued images return to their idle values."""
    open_tab(page, f"{server}/", "sample")
    panel = page.locator("#panel-sample")
    panel.get_by_label("Model").select_option("slow")
    panel.get_by_label("Images").fill("64")
    sampled_before = metric(server, 'genserve_images_sampled_total{model="slow"}')
    panel.get_by_role("button", name="Draw").click()
    page.wait_for_function("() => document.querySelector('#sample-progress').value >= 1")
    page.wait_for_function("() => document.querySelectorAll('#sample-grid img').length === 64")  # partial images
    assert metric(server, "genserve_in_flight_requests") == 2  # the stream, and this poll
    panel.get_by_role("button", name="Cancel").click()
    page.wait_for_function("() => document.querySelector('#sample-status').textContent.startsWith('cancelled')")
    deadline = time.monotonic() + 20
    while metric(server, "genserve_in_flight_requests") != 1 or metric(server, "genserve_queue_images") != 0:
        assert time.monotonic() < deadline, "the cancelled stream is still in flight on the server"
        time.sleep(0.05)
    assert page.locator("#sample-progress").evaluate("p => p.value < p.max")
    assert metric(server, 'genserve_images_sampled_total{model="slow"}') == sampled_before
    assert panel.get_by_role("button", name="Draw").is_enabled()


def test_a_conditional_model_samples_the_chosen_label(page, server):
    open_tab(page, f"{server}/", "sample")
    panel = page.locator("#panel-sample")
    panel.get_by_label("Model").select_option("pixelcnn-cond")
    assert panel.get_by_label("Label").is_visible()
    panel.get_by_label("Label").select_option("b")
    panel.get_by_label("Images").fill("4")
    panel.get_by_label("Seed").fill("9")
    panel.get_by_role("button", name="Draw").click()
    page.wait_for_function("() => document.querySelector('#sample-status').textContent.startsWith('done')")
    assert '"label":"b"' in page.locator("#sample-curl").inner_text()
    api = httpx.post(f"{server}/sample", json={"model": "pixelcnn-cond", "n": 4, "seed": 9, "label": "b"}).json()
    assert api["label"] == 1
    shown = page.locator("#sample-grid img").evaluate_all("imgs => imgs.map(i => i.src)")
    assert shown == [f"data:image/png;base64,{s}" for s in api["images"]]
    panel.get_by_label("Model").select_option("pixelcnn")
    assert not panel.get_by_label("Label").is_visible()


def test_classify_tab_draws_posterior_bars_and_the_refused_badge(page, server):
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 90  # dark red: in colour, so refused whatever its score
    dark = png_bytes(np.full((8, 8), 3, np.uint8))
    images = [("dark.png", dark), ("noise.png", gray_png(4)), ("red.png", png_bytes(red))]
    open_tab(page, f"{server}/", "classify")
    assert page.locator("#classify-model option").all_inner_texts() == ["pixelcnn-cond"]
    upload(page, "#classify-files", *[(n, "image/png", d) for n, d in images])
    page.wait_for_function("() => document.querySelectorAll('#classify-results li[data-rejected]').length === 3")
    for i, (name, data) in enumerate(images):
        form = {"model": "pixelcnn-cond", "resize": "true"}
        want = httpx.post(f"{server}/classify", data=form, files=[("files", (name, data))]).json()
        r = want["results"][0]
        item = page.locator("#classify-results li").nth(i)
        rows = item.locator(".bars [role=listitem]").all_inner_texts()
        assert rows == ["a", "b", "c"]
        shares = [float(t.rstrip("%")) for t in item.locator(".bars .num").all_inner_texts()]
        assert shares == pytest.approx([100 * r["posterior"][c] for c in "abc"], abs=0.051)
        badge = item.locator(".badge").inner_text()
        assert badge.startswith("refused") if r["rejected"] else badge.startswith(r["predicted"])
        assert ("trained on grayscale" in item.inner_text()) == (name == "red.png") == r["colour"]["crossed"]
    assert "refused" in page.locator("#classify-results").inner_text()  # noise is refused at 10% FPR


def test_a_key_protected_server_explains_its_401_and_takes_the_key_for_this_tab_only(browser, web_models):
    proc, url, log = start_server(web_models, models=("pixelcnn",), GENSERVE_API_KEYS="s3cret")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{url}/")
        banner = page.get_by_role("alert")
        banner.wait_for()
        detail = httpx.get(f"{url}/models").json()["detail"]
        assert "needs an API key" in banner.inner_text() and detail in banner.inner_text()
        assert page.evaluate("document.activeElement.id") == "api-key"
        page.get_by_label("API key").fill("wrong")
        page.get_by_label("API key").press("Enter")
        page.wait_for_function("() => document.querySelector('#banner').textContent.includes('was refused')")
        page.get_by_label("API key").fill("s3cret")
        page.get_by_label("API key").press("Enter")
        page.locator("#model-cards .card .samples img").wait_for()  # /models and /sample with the key
        assert page.get_by_role("alert").is_hidden()
        assert page.evaluate("[sessionStorage.getItem('genserve.apiKey'), localStorage.length]") == ["s3cret", 0]
        page.reload()  # the same tab keeps it
        page.locator("#model-cards .card").wait_for()
        assert page.get_by_label("API key").input_value() == "s3cret"
        other = context.new_page()  # another tab does not
        other.goto(f"{url}/")
        other.get_by_role("alert").wait_for()
        assert other.get_by_label("API key").input_value() == ""
    finally:
        context.close()
        stop_server(proc, log)


def test_first_render_is_under_a_second_and_the_tabs_work_from_the_keyboard(page, server):
    page.goto(f"{server}/")
    page.locator("#model-cards .card").first.wait_for()
    timing = page.evaluate(
        """() => ({
            fcp: performance.getEntriesByName('first-contentful-paint')[0].startTime,
            models: performance.getEntriesByName('genserve-models')[0].startTime,
        })"""
    )
    record = {"first_contentful_paint_ms": round(timing["fcp"], 1), "models_listed_ms": round(timing["models"], 1)}
    print("first render on loopback:", json.dumps(record))  # noqa: T201 - the figure docs/ui.md records
    # The target is the first render; the model list (a /models round trip on a machine other jobs may
    # share) is reported beside it.
    assert timing["fcp"] < FIRST_RENDER_LIMIT_MS, record
    page.get_by_role("tab", name="Models").focus()
    for name in ("Score", "Sample", "Classify", "Models"):
        page.keyboard.press("ArrowRight")
        assert page.get_by_role("tab", name=name).get_attribute("aria-selected") == "true"
        assert page.evaluate("document.activeElement.textContent") == name
        assert page.locator(f"#panel-{name.lower()}").is_visible()
    page.keyboard.press("End")
    assert page.get_by_role("tab", name="Classify").get_attribute("aria-selected") == "true"
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, button, textarea')]
             .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
             .map(e => e.id || e.outerHTML)"""
    )
    assert unlabelled == []


def test_every_tab_fits_a_phone(browser, server):
    context = browser.new_context(viewport={"width": WIDTHS["phone"], "height": 800}, device_scale_factor=2)
    try:
        page = context.new_page()
        for tab in TABS:
            page.goto(f"{server}/#{tab}")
            page.wait_for_function("() => document.querySelector('#score-model').options.length > 0")
            assert page.locator(f"#panel-{tab}").is_visible()
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= WIDTHS["phone"], f"tab {tab} is {width} px wide"
    finally:
        context.close()


# ---- screenshots with the shipped models (GENSERVE_UI_SCREENSHOTS=1) -------------------------------


@pytest.mark.skipif(not SHOTS, reason="set GENSERVE_UI_SCREENSHOTS=1 to write docs/ui/*.png from the shipped models")
def test_screenshots_of_every_tab(browser, tmp_path):
    """docs/ui/{tab}-{desktop,phone}.png from the shipped checkpoints: a Fashion-MNIST test image is in
    distribution, the colour photograph refused for its colour and uniform noise an outlier; 16
    samples; the same images classified."""
    ckpt = ROOT / "checkpoints"
    models = tuple(sorted(p.name for p in ckpt.iterdir() if (p / "model.json").is_file()))
    proc, url, log = start_server(ckpt, models=models, GENSERVE_TORCH_THREADS="1")
    out = ROOT / "docs" / "ui"
    out.mkdir(parents=True, exist_ok=True)
    shirt, photo, noise = fashion_png(), photo_jpeg(), gray_png(5, (28, 28))
    uploads = [
        ("fashion.png", "image/png", shirt),
        ("hopper.jpg", "image/jpeg", photo),
        ("noise.png", "image/png", noise),
    ]
    try:
        for device, width in WIDTHS.items():
            context = browser.new_context(viewport={"width": width, "height": 900})
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(f"{url}/#models")
            page.wait_for_function(
                f"() => document.querySelectorAll('#model-cards .samples img').length >= {len(models)}"
            )
            shot(page, out / f"models-{device}.png")
            page.goto(f"{url}/#score")
            page.wait_for_function("() => document.querySelector('#score-model').options.length > 0")
            upload(page, "#score-files", *uploads)
            page.wait_for_function("() => document.querySelectorAll('#score-results li[data-outlier]').length === 3")
            assert page.locator("#score-results li").nth(0).get_attribute("data-outlier") == "false"
            assert page.locator("#score-results li").nth(1).get_attribute("data-outlier") == "true"
            assert "trained on grayscale" in page.locator("#score-results li").nth(1).inner_text()
            assert page.locator("#score-results li").nth(2).get_attribute("data-outlier") == "true"
            shot(page, out / f"score-{device}.png")
            page.goto(f"{url}/#sample")
            page.wait_for_function("() => document.querySelector('#sample-model').options.length > 0")
            page.locator("#sample-seed").fill("1")
            page.locator("#sample-go").click()
            page.wait_for_function("() => document.querySelector('#sample-status').textContent.startsWith('done')")
            shot(page, out / f"sample-{device}.png")
            page.goto(f"{url}/#classify")
            page.wait_for_function("() => document.querySelector('#classify-model').options.length > 0")
            upload(page, "#classify-files", *uploads)
            page.wait_for_function(
                "() => document.querySelectorAll('#classify-results li[data-rejected]').length === 3"
            )
            assert page.locator("#classify-results li").nth(0).get_attribute("data-rejected") == "false"
            assert page.locator("#classify-results li").nth(2).get_attribute("data-rejected") == "true"
            shot(page, out / f"classify-{device}.png")
            context.close()
    finally:
        stop_server(proc, log)


def shot(page: Any, path: Path) -> None:
    """A full-page screenshot, reduced to a 64-colour palette PNG to keep docs/ small."""
    raw = page.screenshot(full_page=True)
    Image.open(io.BytesIO(raw)).convert("RGB").quantize(colors=64).save(path, optimize=True)
