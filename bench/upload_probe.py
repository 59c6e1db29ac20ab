"""Held-out probes of the outlier gate: kinds of upload the real-upload suite does not hold, made from
installed files and never used to design or calibrate anything. Builds them into ``--out`` (not
committed; deterministic), then prints, per model and kind, the share flagged as /score flags it with
resize=true (the default score over its threshold, or refused by the colour, peak or extent check) and, in
brackets, by the score alone.

Kinds: ``symbolic`` (60 monochrome Adwaita UI glyphs, transparent background), ``glyphs-black`` and
``glyphs-white`` (39 letters, digits and signs in DejaVu Sans Bold, white on black and black on white),
``white-silhouettes`` and ``black-silhouettes`` (the suite's transparent icons, logos and emoji with
every opaque pixel white, or black), ``gray-suite`` (the suite's icons, emoji, logos and photos
converted to gray, alpha kept: the colour check cannot see them).

``--set 2`` (built in session 14, after the colour check): ``system-images`` (every image file of at
least 16x16 pixels installed on this machine outside the suite's sources and this repository, one copy
per content: documentation figures and screenshots, logos, toolkit images, test pictures; what it holds
depends on the machine), ``dark-text`` (30 terminal and dark-mode editor screenshots: licence texts and
Python sources in DejaVu Sans Mono, light gray on near-black), ``edges-white`` and ``edges-black``
(line drawings: the edges of the suite's photos, white on black and black on white), ``tinted-photos``
(the photos with a warm tint below the colour check's tolerance, as old prints), ``dark-photos`` (the
photos in gray, underexposed: gamma 2.2, 60%).

``--set 3`` (session 15): other desktop icon themes and wallpapers, from Debian packages installed for
it (``apt-get install tango-icon-theme oxygen-icon-theme gnome-icon-theme gnome-backgrounds ukui-wallpapers
lomiri-wallpapers-20.04``; the suite's icons are Adwaita's): ``theme-icons-large`` (30 full-colour icons of
32 or 48 px from each theme), ``theme-icons-small`` (16 or 22 px), ``theme-icons-256`` (256 px, oxygen and
gnome), ``gray-theme-icons`` (the large ones in gray, alpha kept: the colour check cannot see them),
``wallpapers`` (every raster image under /usr/share/backgrounds: photos, paintings, abstract art),
``gray-wallpapers`` (the same in gray).

``--set 4`` (session 17): clip-art and game graphics, from Debian packages installed for it (``apt-get install
openclipart-png pingus-data frozen-bubble-data``): ``clipart-objects`` (100 Open Clip Art Library drawings of
objects, animals, people, food, vehicles...), ``clipart-symbols`` (60 signs, shapes, flags, logos),
``clipart-computer`` (40 computer clip-art and icons), ``clipart-clothing`` (every clothing drawing: shirts,
shoes, hats, bags; drawings, not Fashion-MNIST's photographs), ``gray-clipart`` (the objects in gray, alpha
kept), ``sprites`` (80 sprites, tiles, buttons and backgrounds of two games).

``--set 5`` (session 17, drawn by this script): ``banners-light`` and ``banners-dark`` (20 text-only
web banners each, dark text on light and light text on dark), ``signatures-black`` and
``signatures-white`` (20 pen-stroke scribbles each, black on white and white on black), ``scans``
(20 scanned-looking text pages: tilted, noisy, JPEG), ``receipts`` (20 narrow till receipts),
``phones`` (20 phone screenshots of a list, light and dark mode).

``--set 6`` (session 18, drawn after that session's changes, which it was not used to tune): dark mode and
negatives: ``dark-charts`` (20 matplotlib charts in its dark_background style, grays only), ``dark-icons``
(30 Adwaita symbolic glyphs, light on a dark square, 48-96 px), ``negatives`` (the suite's photos in gray,
inverted), ``inverted-codes`` (its QR codes and barcodes, light on dark), ``night-sky`` (20 star fields,
some with a moon), ``pixel-art`` (20 symmetric 8x8 sprites in grays on black, scaled 12x).

``--fit stretch`` sizes every file as /score's ``fit=stretch`` does (the aspect ratio not kept, as
``resize=true`` did before session 18) instead of the default ``pad`` (models/image_convert.py).

    python bench/upload_probe.py --out /tmp/upload-probe --model checkpoints/pixelcnn-fmnist ...
    python bench/upload_probe.py --set 2 --out /tmp/upload-probe-2 --model checkpoints/pixelcnn-fmnist ...
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.image_convert import FITS, decode_file
from models.scoring.colour import colour_check_for
from models.scoring.extent import extent_check_for
from models.scoring.peak import peak_check_for
from models.scoring.scorer import load_scorer
from models.tools.ood_eval import SUFFIXES, load_eval_set, refused_by_checks
from models.tools.score_sets import score_images

SUITE = Path(__file__).resolve().parents[1] / "data" / "upload-suite"
ICONS = Path("/usr/share/icons/Adwaita")
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
MONO = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")
DEJAVU_DIR = FONT.parent
# set 3's sources (Debian packages installed for it: tango-icon-theme, oxygen-icon-theme, gnome-icon-theme,
# gnome-backgrounds, ukui-wallpapers, lomiri-wallpapers-20.04), kept out of set 2's scan so that set 2 stays
# what it was
THEME_ROOTS = (
    "/usr/share/icons/Tango/",
    "/usr/share/icons/oxygen/",
    "/usr/share/icons/gnome/",
    "/usr/share/backgrounds/",
)
# set 4's sources (Debian packages installed for it: openclipart-png, pingus-data, frozen-bubble-data), also
# kept out of set 2's scan
CLIPART = Path("/usr/share/openclipart/png")
SPRITE_ROOTS = (Path("/usr/share/games/pingus"), Path("/usr/share/games/frozen-bubble"))
SYMBOL_CATEGORIES = ("signs_and_symbols", "shapes", "buttons", "logos")
# where installed images are looked for, and what is left out: the suite's sources, copies of this repository
SYSTEM_ROOTS = ("/usr", "/root", "/opt")
SKIP = ("/Adwaita/", "skimage/data", "upload-suite", "/.cache/", "/proc/", "/work/", "/tmp/", *THEME_ROOTS)
SKIP += ("/openclipart/", "/games/")  # set 4's sources
CHARS = "ABCDEFGHJKMNPQRSTUVWXYZ0123456789&?#@%$"


def symbolic(out: Path) -> None:
    glyphs = sorted(ICONS.glob("*/*/*symbolic*.png"))
    for p in random.Random(0).sample(glyphs, min(60, len(glyphs))):
        Image.open(p).save(out / f"{p.parent.parent.name}-{p.name}")


def glyphs(out_black: Path, out_white: Path) -> None:
    font = ImageFont.truetype(str(FONT), 40)
    for i, ch in enumerate(CHARS):
        for bg, fg, out in ((0, 255, out_black), (255, 0, out_white)):
            im = Image.new("L", (48, 48), bg)
            ImageDraw.Draw(im).text((24, 24), ch, fill=fg, font=font, anchor="mm")
            im.save(out / f"{i:02d}.png")


def silhouettes_and_gray(white: Path, black: Path, gray: Path) -> None:
    for kind in ("icons-large", "icons-small", "logos", "emoji", "photos"):
        for p in sorted((SUITE / kind).iterdir()):
            im = Image.open(p)
            im.load()
            if im.mode in ("RGBA", "LA", "PA", "P"):
                rgba = np.asarray(im.convert("RGBA"))
                alpha = rgba[..., 3]
                luma = np.asarray(Image.fromarray(rgba).convert("L"))
                Image.fromarray(np.stack([luma, alpha], axis=-1), "LA").save(gray / f"{kind}-{p.stem}.png")
                if kind != "photos" and (alpha < 250).mean() >= 0.2:  # a shape on a transparent background
                    for value, out in ((255, white), (0, black)):
                        shape = np.zeros((*alpha.shape, 4), np.uint8)
                        shape[..., :3], shape[..., 3] = value, alpha
                        Image.fromarray(shape, "RGBA").save(out / f"{kind}-{p.stem}.png")
            else:
                im.convert("L").save(gray / f"{kind}-{p.stem}.png")


def _new_image(p: Path, seen: set[str], min_side: int = 16) -> bool:
    """Whether p's content is not in ``seen`` (then added) and decodes as /score decodes it, at least
    ``min_side`` pixels on each side."""
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest in seen:
        return False
    seen.add(digest)
    try:
        return min(decode_file(data).size) >= min_side
    except Exception:  # not an image we decode: /score would refuse it with a 422
        return False


def system_images(out: Path) -> None:
    seen: set[str] = set()
    found = sorted(
        Path(d, f)
        for root in SYSTEM_ROOTS
        for d, _, files in os.walk(root)
        for f in files
        if f.lower().endswith(SUFFIXES)
    )
    for p in found:
        if any(s in str(p) for s in SKIP) or not p.is_file() or not _new_image(p, seen):
            continue
        shutil.copyfile(p, out / f"{len(seen):04d}-{p.name}")


def dark_text(out: Path) -> None:
    rng = random.Random(1)
    sources = [p for p in sorted(Path("/usr/share/common-licenses").iterdir()) if p.is_file()]
    sources += sorted(Path(shutil.__file__).parent.joinpath("json").glob("*.py"))
    for i in range(30):
        lines = sources[i % len(sources)].read_text(errors="ignore").splitlines()
        start = rng.randrange(max(1, len(lines) - 40))
        size = rng.choice([12, 14, 16, 20])
        w, h = rng.choice([(640, 400), (800, 450), (400, 300), (1024, 640)])
        im = Image.new("L", (w, h), rng.choice([0, 18, 30, 40]))
        draw, font, fill = ImageDraw.Draw(im), ImageFont.truetype(str(MONO), size), rng.choice([180, 200, 230, 255])
        for j, line in enumerate(lines[start : start + h // (size + 4)]):
            draw.text((8, 4 + j * (size + 4)), line[:200], fill=fill, font=font)
        im.save(out / f"{i:02d}.png")


def photo_variants(white: Path, black: Path, tinted: Path, dark: Path) -> None:
    for p in sorted((SUITE / "photos").iterdir()):
        gray = Image.open(p).convert("L")
        edges = ImageOps.autocontrast(gray.filter(ImageFilter.FIND_EDGES), cutoff=1)
        edges.save(white / f"{p.stem}.png")
        ImageOps.invert(edges).save(black / f"{p.stem}.png")
        a = np.asarray(gray, np.float32)
        warm = np.stack([a, a * 0.95, a * 0.9], axis=-1) + np.array([12.0, 4.0, -8.0])  # chroma <= 24 + rounding
        Image.fromarray(np.clip(warm, 0, 255).astype(np.uint8)).save(tinted / f"{p.stem}.jpg", quality=85)
        Image.fromarray((255 * (a / 255) ** 2.2 * 0.6).astype(np.uint8)).save(dark / f"{p.stem}.jpg", quality=85)


def theme_icons(out: Path, sizes: tuple[int, ...], per_theme: int, *, seed: int, gray: Path | None = None) -> None:
    """``per_theme`` icons of the given pixel sizes from each of set 3's icon themes (one copy per
    content, symbolic glyphs left out); ``gray``: also each converted to gray, alpha kept."""
    seen: set[str] = set()
    for theme in THEME_ROOTS[:3]:
        found = sorted(p for n in sizes for p in Path(theme).rglob(f"{n}x{n}/**/*.png") if "symbolic" not in p.name)
        picked = 0
        for p in random.Random(seed).sample(found, len(found)):
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            name = f"{Path(theme).name}-{p.parent.parent.name}-{p.name}"
            shutil.copyfile(p, out / name)
            if gray is not None:
                rgba = np.asarray(Image.open(p).convert("RGBA"))
                luma = np.asarray(Image.fromarray(rgba).convert("L"))
                Image.fromarray(np.stack([luma, rgba[..., 3]], axis=-1), "LA").save(gray / name)
            picked += 1
            if picked == per_theme:
                break


def wallpapers(out: Path) -> None:
    """The raster desktop backgrounds installed (photos, paintings, abstract art: GNOME's WebP images,
    UKUI's and Lomiri's JPEGs and PNGs; SVGs are not decoded by /score)."""
    for p in sorted(Path(THEME_ROOTS[3]).rglob("*")):
        if p.is_file() and p.suffix.lower() in SUFFIXES:
            shutil.copyfile(p, out / f"{p.parent.name}-{p.name}")


def _words(n: int, rng: random.Random) -> str:
    words = Path("/usr/share/common-licenses/GPL-3").read_text().split()
    return " ".join(rng.sample(words, n))


def banners(light: Path, dark: Path) -> None:
    """Text-only web banners (728x90, 468x60, 320x50, 970x250) in DejaVu fonts: dark text on light
    backgrounds, and light text on dark ones."""
    rng, fonts = random.Random(11), sorted(DEJAVU_DIR.glob("*.ttf"))
    for i in range(40):
        w, h = rng.choice([(728, 90), (468, 60), (320, 50), (970, 250)])
        on_dark = i % 2 == 1
        bg = rng.choice([0, 20, 40]) if on_dark else rng.choice([255, 235, 200])
        im = Image.new("L", (w, h), bg)
        font = ImageFont.truetype(str(rng.choice(fonts)), int(h * 0.5))
        ImageDraw.Draw(im).text((w // 2, h // 2), _words(3, rng)[:30], fill=255 - bg, font=font, anchor="mm")
        im.save((dark if on_dark else light) / f"{i:02d}.png")


def signatures(black: Path, white: Path) -> None:
    """Hand-drawn-looking pen strokes (a wavering line, 400x150): black on white, and white on black."""
    rng = random.Random(12)
    for i in range(40):
        on_black = i % 2 == 1
        im = Image.new("L", (400, 150), 0 if on_black else 255)
        x, pts = 20.0, []
        period = rng.uniform(1.5, 4)
        for t in range(60):
            x += rng.uniform(3, 8)
            pts.append((x, 75 + 40 * math.sin(t / period) + rng.uniform(-10, 10)))
        ImageDraw.Draw(im).line(pts, fill=255 if on_black else 0, width=rng.choice([2, 3, 5]))
        im.save((white if on_black else black) / f"{i:02d}.png")


def paperwork(scans: Path, receipts: Path, phones: Path) -> None:
    """Scanned pages (gray text, tilted, noisy, JPEG), till receipts (narrow, tall) and phone screenshots
    (a list of rows with avatars, light and dark mode, 540x1200)."""
    rng, mono = random.Random(13), ImageFont.truetype(str(MONO), 14)
    for i in range(20):
        page = Image.new("L", (850, 1100), 245)
        draw, font = ImageDraw.Draw(page), ImageFont.truetype(str(FONT if i % 2 else MONO), 18)
        for j in range(40):
            draw.text((60, 60 + j * 24), _words(10, rng)[:80], fill=40, font=font)
        page = page.rotate(rng.uniform(-3, 3), fillcolor=200, expand=True)
        noisy = np.asarray(page, np.float32) + np.random.default_rng(i).normal(0, 8, page.size[::-1])
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(scans / f"{i:02d}.jpg", quality=70)
        receipt = Image.new("L", (300, 900), 250)
        for j in range(45):
            line = f"{_words(2, rng)[:18]:20s}{rng.uniform(1, 99):6.2f}"
            ImageDraw.Draw(receipt).text((10, 10 + j * 19), line, fill=20, font=mono)
        receipt.save(receipts / f"{i:02d}.jpg", quality=80)
        bg, fg = (18, 220) if i % 2 else (250, 30)
        phone = Image.new("L", (540, 1200), bg)
        draw, font = ImageDraw.Draw(phone), ImageFont.truetype(str(FONT), 28)
        draw.rectangle([0, 0, 540, 50], fill=bg + (20 if i % 2 else -20))
        for y in range(80, 1140, 100):
            draw.ellipse([20, y, 80, y + 60], fill=rng.randrange(60, 200))
            draw.text((100, y + 10), _words(3, rng)[:24], fill=fg, font=font)
            draw.line([0, y + 80, 540, y + 80], fill=128)
        phone.save(phones / f"{i:02d}.png")


def _sample_unique(found: list[Path], n: int, seed: int, *, min_side: int = 16) -> list[Path]:
    """Up to ``n`` of ``found`` in a seeded random order, one per content, at least ``min_side`` px."""
    seen: set[str] = set()
    picked: list[Path] = []
    for p in random.Random(seed).sample(sorted(found), len(found)):
        if not _new_image(p, seen, min_side):
            continue
        picked.append(p)
        if len(picked) == n:
            break
    return picked


def _copy_with_gray(files: list[Path], out: Path, gray: Path | None = None) -> None:
    for p in files:
        name = "-".join(p.relative_to(p.parents[1]).parts)
        shutil.copyfile(p, out / name)
        if gray is not None:
            rgba = np.asarray(Image.open(p).convert("RGBA"))
            luma = np.asarray(Image.fromarray(rgba).convert("L"))
            Image.fromarray(np.stack([luma, rgba[..., 3]], axis=-1), "LA").save(gray / f"{Path(name).stem}.png")


def clipart(objects: Path, symbols: Path, computer: Path, clothing: Path, gray: Path) -> None:
    """Open Clip Art Library PNGs (public domain): objects, people, animals, food...; signs, shapes and
    logos; computer clip-art and icon themes; every clothing picture; the objects in gray, alpha kept."""
    every = sorted(CLIPART.rglob("*.png"))
    top = {p: p.relative_to(CLIPART).parts[0] for p in every}
    wear = [p for p in every if "clothing" in p.relative_to(CLIPART).parts]
    sym = [p for p in every if top[p] in SYMBOL_CATEGORIES]
    comp = [p for p in every if top[p] == "computer"]
    rest = [p for p in every if top[p] not in (*SYMBOL_CATEGORIES, "computer") and p not in set(wear)]
    _copy_with_gray(_sample_unique(rest, 100, 6), objects, gray)
    _copy_with_gray(_sample_unique(sym, 60, 7), symbols)
    _copy_with_gray(_sample_unique(comp, 40, 8), computer)
    _copy_with_gray(_sample_unique(wear, len(wear), 9), clothing)


def sprites(out: Path) -> None:
    """Game graphics (pingus-data, frozen-bubble-data; GPL): sprites, tiles, buttons, backgrounds."""
    found = [p for root in SPRITE_ROOTS for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".gif")]
    _copy_with_gray(_sample_unique(found, 80, 10), out)


SETS = {
    "1": ["symbolic", "glyphs-black", "glyphs-white", "white-silhouettes", "black-silhouettes", "gray-suite"],
    "2": ["system-images", "dark-text", "edges-white", "edges-black", "tinted-photos", "dark-photos"],
    "3": [
        "theme-icons-large",
        "theme-icons-small",
        "theme-icons-256",
        "gray-theme-icons",
        "wallpapers",
        "gray-wallpapers",
    ],
    "4": ["clipart-objects", "clipart-symbols", "clipart-computer", "clipart-clothing", "gray-clipart", "sprites"],
    "5": ["banners-light", "banners-dark", "signatures-black", "signatures-white", "scans", "receipts", "phones"],
    "6": ["dark-charts", "dark-icons", "negatives", "inverted-codes", "night-sky", "pixel-art"],
}


def dark_charts(out: Path) -> None:
    """Charts in matplotlib's dark_background style, in grays only (lines, bars, scatter, areas)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(21)
    with plt.style.context("dark_background"):
        for i in range(20):
            fig, ax = plt.subplots(figsize=(rng.uniform(4, 8), rng.uniform(3, 5)), dpi=80)
            x = np.arange(30)
            gray = str(round(float(rng.uniform(0.6, 1.0)), 2))
            kind = i % 4
            if kind == 0:
                for _ in range(rng.integers(1, 4)):
                    ax.plot(x, np.cumsum(rng.normal(size=30)), color=str(round(float(rng.uniform(0.4, 1.0)), 2)))
            elif kind == 1:
                ax.bar(x[:12], rng.uniform(1, 10, 12), color=gray)
            elif kind == 2:
                ax.scatter(rng.normal(size=80), rng.normal(size=80), s=8, color=gray)
            else:
                ax.fill_between(x, np.abs(np.cumsum(rng.normal(size=30))), color=gray, alpha=0.6)
            ax.set_title(f"series {i}", color="0.8")
            fig.savefig(out / f"{i:02d}.png", facecolor=fig.get_facecolor())
            plt.close(fig)


def dark_icons(out: Path) -> None:
    """Adwaita's symbolic glyphs drawn light on a dark square, as a dark-mode toolbar shows them (set 1: on white)."""
    glyphs = sorted(ICONS.glob("*/*/*symbolic*.png"))
    rng = random.Random(22)
    for i, p in enumerate(rng.sample(glyphs, min(30, len(glyphs)))):
        alpha = Image.open(p).convert("RGBA").getchannel("A")
        side = rng.choice([48, 64, 96])
        glyph = alpha.resize((side * 2 // 3, side * 2 // 3), Image.Resampling.LANCZOS)
        im = Image.new("L", (side, side), rng.choice([24, 32, 40, 48]))
        im.paste(Image.new("L", glyph.size, rng.choice([200, 230, 255])), ((side - glyph.width) // 2,) * 2, glyph)
        im.save(out / f"{i:02d}.png")


def negatives(photos: Path, codes: Path) -> None:
    """The suite's photos in gray, inverted (film negatives, X-ray-like), and its codes inverted (light on dark)."""
    for kind, out in (("photos", photos), ("codes", codes)):
        for p in sorted((SUITE / kind).iterdir()):
            ImageOps.invert(Image.open(p).convert("L")).save(out / f"{p.stem}.png")


def night_sky(out: Path) -> None:
    """Star fields: 40-300 stars of 1-5 px on black, a moon in some."""
    rng = random.Random(23)
    for i in range(20):
        im = Image.new("L", (400, 300), 0)
        draw = ImageDraw.Draw(im)
        for _ in range(rng.randint(40, 300)):
            x, y, r = rng.uniform(0, 400), rng.uniform(0, 300), rng.choice([0.5, 1, 1, 1.5, 2.5])
            draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.randint(150, 255))
        if i % 3 == 0:
            x, y, r = rng.uniform(60, 340), rng.uniform(60, 240), rng.uniform(15, 40)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.randint(200, 250))
        im.save(out / f"{i:02d}.png")


def pixel_art(out: Path) -> None:
    """Mirror-symmetric 8x8 sprites in 3-4 grays on black, scaled 12x with nearest-neighbour pixels."""
    rng = np.random.default_rng(24)
    for i in range(20):
        grays = rng.choice([0, 90, 160, 220, 255], size=rng.integers(3, 5), replace=False)
        half = rng.choice(grays, size=(8, 4), p=None)
        sprite = np.concatenate([half, half[:, ::-1]], axis=1).astype(np.uint8)
        Image.fromarray(sprite).resize((96, 96), Image.Resampling.NEAREST).save(out / f"{i:02d}.png")


def build(out: Path, which: str) -> list[Path]:
    dirs = {k: out / k for k in SETS[which]}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            f.unlink()
    if which == "1":
        symbolic(dirs["symbolic"])
        glyphs(dirs["glyphs-black"], dirs["glyphs-white"])
        silhouettes_and_gray(dirs["white-silhouettes"], dirs["black-silhouettes"], dirs["gray-suite"])
    elif which == "2":
        system_images(dirs["system-images"])
        dark_text(dirs["dark-text"])
        photo_variants(dirs["edges-white"], dirs["edges-black"], dirs["tinted-photos"], dirs["dark-photos"])
    elif which == "4":
        clipart(*(dirs[k] for k in SETS["4"][:5]))
        sprites(dirs["sprites"])
    elif which == "6":
        dark_charts(dirs["dark-charts"])
        dark_icons(dirs["dark-icons"])
        negatives(dirs["negatives"], dirs["inverted-codes"])
        night_sky(dirs["night-sky"])
        pixel_art(dirs["pixel-art"])
    elif which == "5":
        banners(dirs["banners-light"], dirs["banners-dark"])
        signatures(dirs["signatures-black"], dirs["signatures-white"])
        paperwork(dirs["scans"], dirs["receipts"], dirs["phones"])
    else:
        theme_icons(dirs["theme-icons-large"], (32, 48), 30, seed=3, gray=dirs["gray-theme-icons"])
        theme_icons(dirs["theme-icons-small"], (16, 22), 30, seed=4)
        theme_icons(dirs["theme-icons-256"], (256,), 20, seed=5)
        wallpapers(dirs["wallpapers"])
        for p in sorted(dirs["wallpapers"].iterdir()):
            Image.open(p).convert("L").save(dirs["gray-wallpapers"] / f"{p.stem}.png")
    return list(dirs.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/upload-probe", help="where the probe files are built")
    p.add_argument("--model", action="append", required=True, help="checkpoint folder (repeatable)")
    p.add_argument("--cache", default="runs/ood-cache", help="statistics cache ('' for none)")
    p.add_argument("--set", default="1", choices=sorted(SETS), help="which probes (module docstring)")
    p.add_argument("--fit", choices=FITS, default="pad", help="how files of another aspect ratio are sized (/score)")
    args = p.parse_args()
    dirs = build(Path(args.out), args.set)
    print("| model | " + " | ".join(f"{d.name} ({len(list(d.iterdir()))})" for d in dirs) + " |")  # noqa: T201
    print("| --- |" + " --- |" * len(dirs))  # noqa: T201
    for folder in args.model:
        scorer, meta = load_scorer(folder)
        check = colour_check_for(meta) if scorer.model.shape[0] == 1 else None
        threshold = meta["calibration"]["scores"][meta["calibration"]["default_score"]]["threshold"]
        cells = []
        for d in dirs:
            data = load_eval_set(
                f"files:{d}",
                shape=scorer.model.shape,
                levels=scorer.model.levels,
                colour_tolerance=None if check is None else check.tolerance,
                fit=args.fit,
            )
            names = [meta["calibration"]["default_score"]]
            s = score_images(scorer, data.images, names=names, cache_dir=args.cache or None, show_progress=False)
            over = s[names[0]] > threshold
            refused, _ = refused_by_checks(
                check, peak_check_for(meta), data, scorer.model.levels, extent_check_for(meta)
            )
            flagged = over if refused is None else over | refused
            cells.append(f"{flagged.mean():.1%} ({over.mean():.1%})")
        print(f"| {Path(folder).name} | " + " | ".join(cells) + " |", flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
