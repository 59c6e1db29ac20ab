"""Build the real-upload evaluation suite: files a person might send to ``/score`` by mistake, made
offline from what installed packages ship, one folder per kind.

    genserve build-upload-suite --out data/upload-suite

Kinds (``KINDS``): photos, large icons, small icons, logos, documents, screenshots, charts, emoji,
codes (QR codes and barcodes). Sources and licences are written to ``SOURCES.md`` beside them; every
source is a Debian package or a PyPI wheel installed on the build machine (see ``SOURCES``), nothing
is downloaded. Files are kept as a person would send them (PNG, JPEG, GIF; transparency, palettes
and sizes as the source has them); ``genserve eval-ood --suite DIR`` then decodes each one with
:func:`models.image_convert.file_to_levels`, the conversion ``/score`` applies with ``resize=true``.

The choice of files is deterministic (sorted listings, fixed seeds); the renderers (Chromium,
matplotlib, fonts) may differ in detail between versions, which is why the built files are committed.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

KINDS = ("photos", "icons-large", "icons-small", "logos", "documents", "screenshots", "charts", "emoji", "codes")
ICONS = Path("/usr/share/icons/Adwaita")
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")

SOURCES = {
    "photos": "scikit-image `skimage/data` (BSD-3-Clause; per-image notes in skimage/data/README.txt: NASA "
    "public domain (astronaut, hubble, moon, rocket), CC0 (chelsea, coffee, motorcycle), camera, coins, "
    "cell, retina, ihc, microaneurysms with the permissions given there), the LFW faces subset "
    "`lfw_subset.npy` (research use, as shipped in scikit-image), matplotlib `sample_data/grace_hopper.jpg` "
    "(public domain, US Navy). Whole images (at most 400 px, JPEG quality 85) and two crops of each (JPEG, PNG).",
    "icons-large": "adwaita-icon-theme (Debian; LGPL-3 or CC-BY-SA-3.0): 48x48 PNGs (the largest "
    "full-colour size), RGBA, the full-colour ones (a fifth opaque, not dark glyphs), spread over the sorted listing.",
    "icons-small": "adwaita-icon-theme (Debian; LGPL-3 or CC-BY-SA-3.0): 16x16 and 24x24 PNGs, RGBA, chosen "
    "as the large ones.",
    "logos": "Debian `/usr/share/pixmaps` and hicolor app icons (debian-logo: Debian Open Use Logo Licence; "
    "chromium: BSD-3-Clause), matplotlib `logo2.png` (matplotlib licence, PSF-based), scikit-image "
    "`logo.png` (BSD-3-Clause), Python's XPM icon (PSF), saved as PNG at several sizes and backgrounds.",
    "documents": "Text of Debian's `/usr/share/common-licenses` (the licence texts themselves; verbatim "
    "copying permitted) rendered to pages with DejaVu fonts (Bitstream Vera licence), and scikit-image "
    "`page.png`, `text.png` (BSD-3-Clause).",
    "screenshots": "Headless Chromium screenshots of HTML documentation shipped in Debian (`/usr/share/doc`, "
    "libffi manual: MIT; base-passwd: public domain) and of small generated UI pages (forms, tables, "
    "dark mode), this script's own.",
    "charts": "Line, bar, scatter, pie, histogram and heat-map charts drawn with matplotlib from random data "
    "(this script; no third-party content).",
    "emoji": "Noto Color Emoji (fonts-noto-color-emoji, SIL OFL 1.1), rendered with Pillow on transparent, "
    "white and coloured backgrounds.",
    "codes": "QR codes (PyPI `qrcode`, BSD) and EAN-13 / Code 128 barcodes (PyPI `python-barcode`, MIT) of "
    "generated text, plus a few drawn by this script.",
}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _save(im: Image.Image, path: Path, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kwargs)  # type: ignore[arg-type]


def _every(items: list[Path], n: int) -> list[Path]:
    """n items spread evenly over a sorted list."""
    items = sorted(items)
    if len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


# ---- kinds -------------------------------------------------------------------------------------------


def photos(out: Path) -> None:
    import matplotlib
    import skimage

    data = Path(skimage.__file__).parent / "data"
    names = [
        "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "hubble_deep_field.jpg",
        "moon.png", "retina.jpg", "rocket.jpg", "motorcycle_left.png", "cell.png", "ihc.png",
        "brick.png", "grass.png", "gravel.png",
    ]  # fmt: skip
    files = [data / n for n in names] + [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    rng = _rng(1)
    for f in files:
        if not f.is_file():
            logger.warning("missing %s", f)
            continue
        src = Image.open(f)
        src.load()
        im: Image.Image = src.convert("RGB") if src.mode not in ("L", "RGB") else src
        im.thumbnail((400, 400))
        _save(im, out / f"{f.stem}.jpg", quality=85)
        w, h = im.size
        for k in range(2):  # two crops of each, at random places and sizes
            cw, ch = int(w * rng.uniform(0.3, 0.6)), int(h * rng.uniform(0.3, 0.6))
            x0, y0 = int(rng.uniform(0, w - cw)), int(rng.uniform(0, h - ch))
            crop = im.crop((x0, y0, x0 + cw, y0 + ch))
            _save(crop, out / f"{f.stem}-crop{k}.{'png' if k else 'jpg'}", **({} if k else {"quality": 85}))
    faces = np.load(data / "lfw_subset.npy")  # (200, 25, 25) floats in [0, 1]
    for i in range(0, 100, 10):  # ten faces (the first 100 are faces, the rest non-faces)
        _save(Image.fromarray((faces[i] * 255).round().astype(np.uint8)), out / f"lfw-face-{i:03d}.png")


def _visible(path: Path) -> bool:
    """A full-colour icon: a fifth of it opaque, and not a dark glyph (which over black is a blank square)."""
    rgba = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float64)
    opaque = rgba[..., 3] > 128
    return bool(opaque.mean() > 0.2 and rgba[opaque][:, :3].max(1).mean() > 100)


def _icons(out: Path, sizes: tuple[str, ...], n: int) -> None:
    for size in sizes:
        files = [p for p in (ICONS / size).glob("*/*.png") if "symbolic" not in p.name and _visible(p)]
        for f in _every(files, n):
            shutil.copyfile(f, out / f"{size}-{f.parent.name}-{f.name}")


def icons_large(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _icons(out, ("48x48",), 40)  # the 64 and 96 px folders hold symbolic (glyph) icons only


def icons_small(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _icons(out, ("16x16", "24x24"), 20)


def logos(out: Path) -> None:
    import matplotlib
    import skimage

    sources = [
        Path("/usr/share/pixmaps/debian-logo.png"),
        Path("/usr/share/icons/hicolor/256x256/apps/chromium.png"),
        Path("/usr/share/icons/hicolor/128x128/apps/zutty.png"),
        Path(matplotlib.get_data_path()) / "sample_data" / "logo2.png",
        Path(skimage.__file__).parent / "data" / "logo.png",
        Path("/usr/share/pixmaps/python3.11.xpm"),
        Path("/usr/share/pixmaps/openjdk-17.xpm"),
    ]
    for f in sources:
        if not f.is_file():
            logger.warning("missing %s", f)
            continue
        try:
            im = Image.open(f)
            im.load()
        except (OSError, ValueError) as e:  # Pillow reads only some XPM variants
            logger.warning("skipping %s: %s", f, e)
            continue
        rgba = im.convert("RGBA")
        rgba.thumbnail((256, 256))
        _save(rgba, out / f"{f.stem}.png")  # as shipped (transparent background)
        for bg, name in (((255, 255, 255, 255), "white"), ((30, 60, 120, 255), "blue")):
            flat = Image.alpha_composite(Image.new("RGBA", rgba.size, bg), rgba).convert("RGB")
            _save(flat, out / f"{f.stem}-on-{name}.jpg", quality=92)
        gif = rgba.convert("RGB").quantize(64)
        _save(gif, out / f"{f.stem}-palette.gif")


def _font(size: int, name: str = "DejaVuSans.ttf") -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(DEJAVU / name), size)


def documents(out: Path) -> None:
    import skimage

    out.mkdir(parents=True, exist_ok=True)
    texts = sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file())
    styles = [
        ("DejaVuSans.ttf", 14, (255, 255, 255), (0, 0, 0), (800, 1000)),
        ("DejaVuSerif.ttf", 16, (255, 255, 255), (20, 20, 20), (850, 1100)),
        ("DejaVuSansMono.ttf", 12, (250, 248, 240), (40, 40, 40), (700, 900)),
        ("DejaVuSans.ttf", 24, (255, 255, 255), (0, 0, 90), (600, 400)),  # a slide
    ]
    for i, path in enumerate(texts[:16]):
        font_name, size, bg, fg, (w, h) = styles[i % len(styles)]
        text = path.read_text(errors="replace")[:4000]
        im = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(im)
        font = _font(size, font_name)
        y, margin = 40, 50
        chars = max(20, int((w - 2 * margin) / (0.55 * size)))
        for para in text.split("\n\n"):
            for line in textwrap.wrap(" ".join(para.split()), chars) or [""]:
                draw.text((margin, y), line, fill=fg, font=font)
                y += int(size * 1.35)
            y += size // 2
            if y > h - 60:
                break
        _save(im.quantize(16), out / f"page-{path.name}.png", optimize=True)  # antialiased text: 16 shades
    data = Path(skimage.__file__).parent / "data"
    for n in ("page.png", "text.png"):
        shutil.copyfile(data / n, out / f"skimage-{n}")
    for i, words in enumerate(["INVOICE 2024-117", "Meeting notes", "TODO: fix the build", "Total: 42.00 EUR"]):
        im = Image.new("RGB", (400, 120), (255, 255, 255))
        ImageDraw.Draw(im).text((20, 35), words, fill=(0, 0, 0), font=_font(36))
        _save(im, out / f"label-{i}.png")


def _chromium() -> str | None:
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    return None


UI_PAGES = {
    "login": "<h2>Sign in</h2><form><p>Email <input value='user@example.org'></p><p>Password "
    "<input type=password value='secret'></p><button>Sign in</button></form>",
    "table": "<h2>Orders</h2><table border=1 cellpadding=6>"
    + "".join(f"<tr><td>#{i}</td><td>item {i * 7 % 13}</td><td>{i * 3.5:.2f}</td></tr>" for i in range(12))
    + "</table>",
    "dashboard": "<div style='display:flex;gap:12px'>"
    + "".join(
        f"<div style='background:{c};color:white;padding:30px;border-radius:8px'>KPI {i}<br><b>{i * 17}</b></div>"
        for i, c in enumerate(["#2a7", "#c44", "#36c", "#e90"])
    )
    + "</div><p>Updated a minute ago.</p>",
    "dark": "<body style='background:#111;color:#ddd;font-family:sans-serif'><h2>Settings</h2><p>Theme: dark</p>"
    "<p><input type=checkbox checked> Notifications</p><p><button>Save</button></p></body>",
    "dark-code": "<body style='background:#000;color:#eee;font-family:monospace'><pre>"
    "def main():\n    print('hello')\n\nif __name__ == '__main__':\n    main()\n</pre></body>",
    "error": "<h1 style='color:#b00'>404</h1><p>The page you asked for does not exist.</p>",
}


def screenshots(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    chromium = _chromium()
    if chromium is None:
        raise FileNotFoundError("screenshots need Chromium (apt-get install -y chromium)")
    docs = _every(list(Path("/usr/share/doc/libffi8/html").glob("*.html")), 10)
    docs += [Path("/usr/share/doc/base-passwd/users-and-groups.html")]
    with tempfile.TemporaryDirectory() as tmp:
        pages = [(p.stem, p) for p in docs if p.is_file()]
        for name, body in UI_PAGES.items():
            f = Path(tmp) / f"{name}.html"
            f.write_text(f"<html><body style='font-family:sans-serif'>{body}</body></html>")
            pages.append((f"ui-{name}", f))
        sizes = [(1024, 640), (800, 600), (1280, 720), (640, 960)]
        for i, (name, page) in enumerate(pages):
            w, h = sizes[i % len(sizes)]
            target = (out / f"{name}.png").resolve()
            cmd = [
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--hide-scrollbars", f"--window-size={w},{h}", f"--screenshot={target}", page.as_uri(),
            ]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, timeout=120, cwd=tmp)
            im = Image.open(target)
            im.load()
            im.convert("RGB").quantize(256).save(target, optimize=True)  # a screenshot tool's palette PNG


def charts(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rng = _rng(3)
    kinds = ["line", "bar", "scatter", "pie", "hist", "heatmap"]
    styles = ["default", "ggplot", "bmh", "dark_background", "seaborn-v0_8-whitegrid"]
    for i in range(30):
        kind, style = kinds[i % len(kinds)], styles[(i // len(kinds)) % len(styles)]
        with plt.style.context(style):
            fig, ax = plt.subplots(figsize=(rng.uniform(4, 7), rng.uniform(3, 5)))
            n = int(rng.integers(5, 12))
            if kind == "line":
                for _ in range(int(rng.integers(1, 4))):
                    ax.plot(np.cumsum(rng.normal(size=50)))
            elif kind == "bar":
                ax.bar([f"c{j}" for j in range(n)], rng.uniform(1, 10, n))
            elif kind == "scatter":
                ax.scatter(rng.normal(size=200), rng.normal(size=200), s=8, c=rng.uniform(size=200))
            elif kind == "pie":
                ax.pie(rng.uniform(1, 5, 5), labels=[f"part {j}" for j in range(5)])
            elif kind == "hist":
                ax.hist(rng.normal(size=1000), bins=30)
            else:
                ax.imshow(rng.normal(size=(n, n)).cumsum(0), cmap="viridis")
            ax.set_title(f"{kind} chart {i}")
            fig.tight_layout()
            fig.savefig(out / f"{kind}-{i:02d}.png", dpi=80)
            plt.close(fig)


EMOJI = "😀😂🥲😍🤔😎😭😡👍👎👏🙏💪👀🧠❤️🔥⭐🌈☀️🌙⚡❄️🍎🍕🍔🍩☕🐶🐱🦊🐼🐸🚗✈️🚀⚽🎉🎁📱💡📌✅❌⚠️👕👗👟👜🧥👖"


def emoji(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the size of the font's colour bitmaps
    chars = [c for c in EMOJI if ord(c) > 0x2000 and c not in "\ufe0f"]
    backgrounds = [(0, 0, 0, 0), (255, 255, 255, 255), (240, 240, 240, 255), (40, 44, 52, 255)]
    for i, ch in enumerate(chars):
        im = Image.new("RGBA", (136, 128), backgrounds[i % len(backgrounds)])
        ImageDraw.Draw(im).text((0, 0), ch, font=font, embedded_color=True)
        bbox = im.getbbox() if backgrounds[i % len(backgrounds)][3] == 0 else None
        if bbox:
            im = im.crop(bbox)
        size = (72, 72) if i % 3 == 0 else im.size
        _save(im.resize(size, Image.Resampling.LANCZOS), out / f"emoji-{i:02d}-{ord(ch):x}.png")


def codes(out: Path) -> None:
    import barcode
    import qrcode
    from barcode.writer import ImageWriter

    out.mkdir(parents=True, exist_ok=True)
    rng = _rng(4)
    for i in range(16):
        text = f"https://example.org/item/{int(rng.integers(1_000_000))}?ref={'x' * int(rng.integers(1, 40))}"
        qr = qrcode.QRCode(box_size=int(rng.integers(4, 10)), border=int(rng.integers(1, 5)))
        qr.add_data(text)
        img = qr.make_image(fill_color="black", back_color="white").get_image()
        _save(img, out / f"qr-{i:02d}.png")
    for i in range(10):
        digits = "".join(str(d) for d in rng.integers(0, 10, 12))
        cls = barcode.get_barcode_class("ean13" if i % 2 == 0 else "code128")
        buf = io.BytesIO()
        cls(digits if i % 2 == 0 else f"GS-{digits}", writer=ImageWriter()).write(buf)
        im = Image.open(io.BytesIO(buf.getvalue()))
        im.load()
        _save(im, out / f"barcode-{i:02d}.png")
    for i in range(4):  # inverted QR codes: white modules on black, the nearest a code gets to Fashion-MNIST
        qr = qrcode.QRCode(box_size=6, border=2)
        qr.add_data(f"genserve {i}")
        img = qr.make_image(fill_color="white", back_color="black").get_image()
        _save(img, out / f"qr-inverted-{i}.png")


BUILDERS: dict[str, Callable[[Path], None]] = {
    "photos": photos,
    "icons-large": icons_large,
    "icons-small": icons_small,
    "logos": logos,
    "documents": documents,
    "screenshots": screenshots,
    "charts": charts,
    "emoji": emoji,
    "codes": codes,
}


def write_sources(out: Path) -> None:
    lines = [
        "# Real-upload suite: sources and licences",
        "",
        "Built offline by `genserve build-upload-suite --out data/upload-suite` (models/tools/upload_suite.py) from",
        "installed packages; nothing here was downloaded from the web. One folder per kind:",
        "",
    ]
    for kind in KINDS:
        n = len(list((out / kind).glob("*"))) if (out / kind).is_dir() else 0
        lines += [f"- **{kind}** ({n} files): {SOURCES[kind]}"]
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n")


def build(out: str | Path, kinds: list[str] | None = None) -> dict[str, int]:
    """Write every kind (or ``kinds``) under ``out/<kind>/``, replacing what was there; returns counts."""
    out = Path(out)
    counts = {}
    for kind in kinds or list(KINDS):
        folder = out / kind
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        BUILDERS[kind](folder)
        counts[kind] = len(list(folder.glob("*")))
        logger.info("%s: %d files", kind, counts[kind])
    write_sources(out)
    return counts
