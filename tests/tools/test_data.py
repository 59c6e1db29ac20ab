"""Datasets: IDX, npz and image-folder loaders, the validation split, and named-dataset lookup."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from models.tools import data
from models.tools.data import (
    DatasetNotFound,
    load_dataset,
    load_folder,
    load_named,
    load_npz,
    read_idx,
    search_dirs,
    validation_indices,
)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as IDX: two zero bytes, a type code, the number of dims, big-endian sizes."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    dtype = np.dtype(array.dtype).newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, codes[np.dtype(dtype)], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def fake_images(n: int, h: int = 3, w: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated dataset search path: $GENSERVE_DATA_DIR, an empty cache and no downloads."""
    root = tmp_path / "datasets"
    root.mkdir()
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(root))
    monkeypatch.setenv("GENSERVE_NO_DOWNLOAD", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return root


def system_has(name: str) -> bool:
    return any(d.is_dir() for d in search_dirs(name) if "share" in d.parts and "datasets" in d.parts)


# -- IDX -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_parses_images_and_labels(tmp_path: Path, suffix: str) -> None:
    imgs = fake_images(5)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    got_imgs = read_idx(write_idx(tmp_path / f"images-idx3-ubyte{suffix}", imgs))
    got_labels = read_idx(write_idx(tmp_path / f"labels-idx1-ubyte{suffix}", labels))
    assert got_imgs.dtype == np.uint8 and got_imgs.shape == (5, 3, 4)
    np.testing.assert_array_equal(got_imgs, imgs)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_honours_big_endian_types(tmp_path: Path) -> None:
    values = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    got = read_idx(write_idx(tmp_path / "ints-idx2", values))
    np.testing.assert_array_equal(got, values)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x02ab", "bad magic"),
        (b"\x00", "bad magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01a", "unknown IDX data type"),
        (idx_bytes(fake_images(2))[:-3], "body has"),
        (idx_bytes(fake_images(2)) + b"x", "body has"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "header"),
    ],
    ids=["magic", "too-short", "type", "truncated-body", "trailing-bytes", "truncated-header"],
)
def test_read_idx_rejects_malformed_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_reports_a_truncated_gzip_as_value_error(tmp_path: Path) -> None:
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(fake_images(50)))[:-40])  # an interrupted download
    with pytest.raises(ValueError, match=str(path)):
        read_idx(path)


# -- npz and image folders -----------------------------------------------------------------------


def test_npz_with_n_h_w_images_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=fake_images(6), labels=np.arange(6, dtype=np.int32))
    ds = load_dataset(f"npz:{path}")
    assert ds.images.shape == (6, 1, 3, 4) and ds.images.dtype == torch.uint8
    assert ds.shape == (1, 3, 4) and len(ds) == 6
    assert ds.labels is not None and ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == list(range(6))
    assert ds.spec == f"npz:{path}"
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), fake_images(6))


def test_npz_with_n_c_h_w_images_and_no_labels(tmp_path: Path) -> None:
    path = tmp_path / "rgb.npz"
    imgs = np.random.default_rng(1).integers(0, 256, size=(4, 3, 2, 5), dtype=np.uint8)
    np.savez(path, images=imgs)
    ds = load_npz(str(path))
    assert ds.shape == (3, 2, 5) and ds.labels is None
    np.testing.assert_array_equal(ds.images.numpy(), imgs)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": fake_images(3).astype(np.float32)}, "uint8"),
        ({"images": fake_images(3).astype(np.int64)}, "uint8"),
        ({"images": np.zeros((3, 4), dtype=np.uint8)}, "N x H x W"),
        ({"pixels": fake_images(3)}, "'images'"),
    ],
    ids=["float", "int64", "2d", "no-images"],
)
def test_npz_rejects_bad_contents(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        load_npz(str(path))


def test_folder_of_pngs_loads_sorted_grey_and_rgb(tmp_path: Path) -> None:
    from PIL import Image

    grey = tmp_path / "grey"
    grey.mkdir()
    imgs = fake_images(3, h=5, w=6)
    for i in (2, 0, 1):
        Image.fromarray(imgs[i]).save(grey / f"img{i}.png")
    (grey / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{grey}")
    assert ds.shape == (1, 5, 6) and ds.labels is None
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), imgs)  # sorted by name

    rgb = tmp_path / "rgb"
    rgb.mkdir()
    pixels = np.random.default_rng(2).integers(0, 256, size=(2, 4, 3, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(rgb / f"{i}.png")
    ds = load_folder(str(rgb))
    assert ds.shape == (3, 4, 3)
    np.testing.assert_array_equal(ds.images.numpy(), pixels.transpose(0, 3, 1, 2))


def test_folder_errors(tmp_path: Path) -> None:
    from PIL import Image

    with pytest.raises(ValueError, match="no image files"):
        load_folder(str(tmp_path))
    Image.fromarray(fake_images(1)[0]).save(tmp_path / "a.png")
    Image.fromarray(fake_images(1, h=4)[0]).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="differ in shape"):
        load_folder(str(tmp_path))


def test_unknown_spec_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar-10'"):
        load_dataset("cifar-10")


# -- validation split ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 57, 20001, 60000])
def test_validation_split_is_deterministic_disjoint_and_covering(n: int) -> None:
    train, valid = validation_indices(n)
    again_train, again_valid = validation_indices(n)
    assert torch.equal(train, again_train) and torch.equal(valid, again_valid)
    assert len(valid) == (5000 if n > 20000 else max(1, n // 10))
    both = torch.cat([train, valid])
    assert torch.equal(both.sort().values, torch.arange(n))  # disjoint and covering
    assert torch.equal(train, train.sort().values) and torch.equal(valid, valid.sort().values)


def test_validation_split_is_not_just_the_tail() -> None:
    _, valid = validation_indices(1000)
    assert valid.max() - valid.min() > 500  # shuffled, spread over the whole file


# -- named datasets ------------------------------------------------------------------------------


def make_named(folder: Path, prefix: str, n: int, *, seed: int = 0, gz: bool = True) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    imgs = fake_images(n, h=4, w=4, seed=seed)
    write_idx(folder / f"{prefix}images-idx3-ubyte{ext}", imgs)
    write_idx(folder / f"{prefix}labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
    return imgs


def test_named_dataset_splits_from_data_dir(data_env: Path) -> None:
    train_imgs = make_named(data_env / "fashion-mnist", "train-", 40)
    test_imgs = make_named(data_env / "fashion-mnist", "t10k-", 7, seed=1, gz=False)
    full = load_dataset("fashion-mnist:train-full")
    train, valid = load_named("fashion-mnist", "train"), load_named("fashion-mnist", "valid")
    test = load_dataset("fashion-mnist:test")
    np.testing.assert_array_equal(full.images[:, 0].numpy(), train_imgs)
    np.testing.assert_array_equal(test.images[:, 0].numpy(), test_imgs)
    assert len(train) == 36 and len(valid) == 4 and full.classes is not None and len(full.classes) == 10
    tr_idx, va_idx = validation_indices(40)
    assert torch.equal(train.images, full.images[tr_idx]) and torch.equal(valid.images, full.images[va_idx])
    assert valid.labels is not None and torch.equal(valid.labels, va_idx % 10)
    assert train.spec == "fashion-mnist:train" and load_dataset("fashion-mnist").spec == "fashion-mnist:train"


def test_unsplit_subset_folder_serves_every_split(data_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    imgs = make_named(data_env / "mnist-5k", "", 30)
    with caplog.at_level("WARNING", logger="models.tools.data"):
        test = load_named("mnist", "test")
        full = load_named("mnist", "train-full")
    np.testing.assert_array_equal(test.images[:, 0].numpy(), imgs)
    assert torch.equal(full.images, test.images)
    assert full.labels is not None and full.labels.tolist() == [i % 10 for i in range(30)]
    assert "unsplit" in caplog.text
    assert len(load_named("mnist", "valid")) == 3


def test_exact_name_folder_wins_over_suffixed_ones(data_env: Path) -> None:
    exact = make_named(data_env / "mnist", "train-", 12, seed=3)
    make_named(data_env / "mnist-5k", "", 30)
    np.testing.assert_array_equal(load_named("mnist", "train-full").images[:, 0].numpy(), exact)


def test_several_data_dirs_are_searched_in_order(
    tmp_path: Path, data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty, second = tmp_path / "empty", tmp_path / "second"
    empty.mkdir()
    imgs = make_named(second / "mnist", "train-", 11)
    monkeypatch.setenv("GENSERVE_DATA_DIR", f"{empty}{os.pathsep}{second}")
    np.testing.assert_array_equal(load_named("mnist", "train-full").images[:, 0].numpy(), imgs)


def test_missing_dataset_lists_every_place_tried(data_env: Path, tmp_path: Path) -> None:
    if system_has("mnist"):
        pytest.skip("this machine has MNIST installed system-wide")
    (data_env / "mnist-empty").mkdir()
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("mnist:test")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "'mnist' (test files) not found" in msg and "downloads disabled" in msg
    for place in (data_env / "mnist", data_env / "mnist-empty", tmp_path / "cache" / "genserve" / "datasets" / "mnist"):
        assert str(place) in msg
    assert "share/datasets/mnist" in msg


def test_unknown_split_is_rejected(data_env: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_named("mnist", "validation")


def test_no_download_is_attempted_when_disabled(data_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if system_has("mnist"):
        pytest.skip("this machine has MNIST installed system-wide")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    with pytest.raises(DatasetNotFound):
        load_named("mnist", "train")
