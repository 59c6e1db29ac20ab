"""Image datasets as uint8 tensors (N, C, H, W), found by name.

Dataset specs (strings, as the CLI takes them):
- ``fashion-mnist[:SPLIT]``, ``mnist[:SPLIT]``: SPLIT is ``train`` (the training files minus the
  validation split), ``valid`` (the held-out validation split of the training files), ``train-full``
  (all training files), ``test``. A folder holding only unsplit ``images-idx3-ubyte[.gz]`` files (such
  as a 5,000-image MNIST subset) serves every split; the log says so.
- ``npz:PATH``: uint8 ``images`` (N, H, W) or (N, C, H, W), optional integer ``labels``.
- ``folder:PATH``: image files (PNG, JPEG, ...) in a folder, sorted by name.

Named datasets are searched for in every folder of ``$GENSERVE_DATA_DIR`` (an os.pathsep list), in
a subfolder named like the dataset (``mnist``, or ``mnist-*`` such as ``mnist-5k``), then under
``share/datasets/NAME`` of the system prefixes (where Debian's ``dataset-fashion-mnist`` installs),
then the user cache ``~/.cache/genserve/datasets/NAME``; then downloaded there where the network
allows. A dataset that is nowhere raises :class:`DatasetNotFound` listing every place tried.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import sys
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
NAMED = {
    "fashion-mnist": {
        "classes": FASHION_CLASSES,
        "urls": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    },
    "mnist": {
        "classes": [str(d) for d in range(10)],
        "urls": ["https://ossci-datasets.s3.amazonaws.com/mnist/"],
    },
}
SPLIT_PREFIX = {"train": "train-", "test": "t10k-"}
VALID_SIZE = 5000  # images held out of the training files for validation and calibration
SPLIT_SEED = 20240611  # fixes which training images are held out


class DatasetNotFound(FileNotFoundError):
    """A named dataset was found nowhere; the message lists every place tried."""


@dataclass
class ImageDataset:
    """uint8 images (N, C, H, W), optional int64 labels (N,), class names, the spec it came from and,
    for image files, each file's colour fraction (N,) (models/image_convert.py ``colour_fraction``)."""

    images: Tensor
    labels: Tensor | None
    classes: list[str] | None
    spec: str
    colour: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (raw or .gz) into a numpy array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # e.g. an interrupted download
        raise ValueError(f"{path}: corrupt gzip file ({e}); delete it and fetch it again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions need {4 + 4 * ndim} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: IDX header says {dims} ({expected} bytes) but body has {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def search_dirs(name: str) -> list[Path]:
    """Folders where the named dataset may live, in the order they are tried."""
    dirs: list[Path] = []
    for root in filter(None, os.environ.get("GENSERVE_DATA_DIR", "").split(os.pathsep)):
        base = Path(root).expanduser()
        dirs.append(base / name)
        if base.is_dir():
            dirs += sorted(p for p in base.glob(f"{name}-*") if p.is_dir())
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, "/usr", "/usr/local"]):
        dirs.append(Path(prefix) / "share" / "datasets" / name)
    dirs.append(cache_dir() / name)
    return dirs


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "genserve" / "datasets"


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _split_files(folder: Path, split: str) -> tuple[Path, Path | None] | None:
    """(images, labels) IDX files for a split in one folder, falling back to unsplit files."""
    for prefix in (SPLIT_PREFIX[split], ""):
        images = _find_file(folder, f"{prefix}images-idx3-ubyte")
        if images is not None:
            if not prefix:
                logger.warning("%s has no %s files; using its unsplit images-idx3-ubyte", folder, split)
            return images, _find_file(folder, f"{prefix}labels-idx1-ubyte")
    return None


def _download(name: str, split: str, dest: Path) -> tuple[Path, Path] | str:
    """Fetch a split into dest; returns the files, or why it failed."""
    prefix = SPLIT_PREFIX[split]
    errors = []
    for url in NAMED[name]["urls"]:
        try:
            dest.mkdir(parents=True, exist_ok=True)
            paths = []
            for stem in (f"{prefix}images-idx3-ubyte.gz", f"{prefix}labels-idx1-ubyte.gz"):
                target = dest / stem
                if not target.exists():
                    tmp = target.with_suffix(".part")
                    with urllib.request.urlopen(url + stem, timeout=20) as r, open(tmp, "wb") as f:
                        f.write(r.read())
                    tmp.rename(target)
                paths.append(target)
            return paths[0], paths[1]
        except OSError as e:
            errors.append(f"{url}: {e}")
    return "; ".join(errors)


def locate(name: str, split: str, *, download: bool = True) -> tuple[Path, Path | None]:
    """IDX (images, labels) files of a named dataset's ``train`` or ``test`` files."""
    tried = []
    for folder in search_dirs(name):
        found = _split_files(folder, split) if folder.is_dir() else None
        if found:
            return found
        tried.append(str(folder))
    why = "downloads disabled"
    if download and os.environ.get("GENSERVE_NO_DOWNLOAD", "") not in ("1", "true"):
        got = _download(name, split, cache_dir() / name)
        if not isinstance(got, str):
            return got
        why = got
    raise DatasetNotFound(
        f"dataset '{name}' ({split} files) not found. Looked in: {', '.join(tried)}; download: {why}. "
        f"Install it (Debian: apt-get install dataset-{name}) or put its IDX files in "
        f"$GENSERVE_DATA_DIR/{name}/."
    )


def validation_indices(n: int) -> tuple[Tensor, Tensor]:
    """Deterministic (train, valid) index split of n training images; valid has VALID_SIZE (or n//10)."""
    n_valid = VALID_SIZE if n > 4 * VALID_SIZE else max(1, n // 10)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[n_valid:].sort().values, perm[:n_valid].sort().values


def _as_nchw(images: np.ndarray, source: str) -> Tensor:
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"{source}: images must be N x H x W or N x C x H x W, got shape {images.shape}")
    return torch.from_numpy(np.array(images, copy=True))


def load_named(name: str, split: str = "train") -> ImageDataset:
    """A named dataset's split: train, valid, train-full or test."""
    if split not in ("train", "valid", "train-full", "test"):
        raise ValueError(f"unknown split '{split}': use train, valid, train-full or test")
    files_split = "test" if split == "test" else "train"
    img_path, lbl_path = locate(name, files_split)
    images = _as_nchw(read_idx(img_path), str(img_path))
    labels = torch.from_numpy(read_idx(lbl_path).astype(np.int64, copy=True)) if lbl_path else None
    if split in ("train", "valid"):
        train_idx, valid_idx = validation_indices(len(images))
        idx = train_idx if split == "train" else valid_idx
        images = images[idx]
        labels = labels[idx] if labels is not None else None
    return ImageDataset(images, labels, list(NAMED[name]["classes"]), f"{name}:{split}")


def load_npz(path: str) -> ImageDataset:
    with np.load(path, allow_pickle=False) as f:
        if "images" not in f:
            raise ValueError(f"{path}: npz needs an 'images' array (uint8, N x H x W or N x C x H x W)")
        images = _as_nchw(f["images"], path)
        labels = torch.from_numpy(f["labels"].astype(np.int64)) if "labels" in f else None
    return ImageDataset(images, labels, None, f"npz:{path}")


def load_folder(path: str) -> ImageDataset:
    from PIL import Image

    files = sorted(
        p for p in Path(path).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
    )
    if not files:
        raise ValueError(f"{path}: no image files (png, jpg, bmp, gif, webp) found")
    arrays = []
    for p in files:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L") if im.mode in ("L", "1", "P", "I;16") else im.convert("RGB"))
        arrays.append(a.transpose(2, 0, 1) if a.ndim == 3 else a[None])
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{path}: images differ in shape {sorted(shapes)}; resize them to one shape")
    return ImageDataset(torch.from_numpy(np.stack(arrays)), None, None, f"folder:{path}")


def load_dataset(spec: str) -> ImageDataset:
    """Load a dataset from a spec string (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "npz":
        return load_npz(rest)
    if kind == "folder":
        return load_folder(rest)
    if kind in NAMED:
        return load_named(kind, rest or "train")
    raise ValueError(f"unknown dataset '{spec}': use fashion-mnist[:split], mnist[:split], npz:PATH or folder:PATH")
