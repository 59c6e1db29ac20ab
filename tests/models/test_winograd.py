"""Winograd row convolutions (models/winograd.py) and the fast PixelCNN pass that uses them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from models.fast import FastPixelCNN, _row_matrices, unfold_row
from models.threads import torch_threads
from models.winograd import MIN_CHANNELS, RowWinograd, tile_for, winograd_matrices, winograd_pays
from tests.models.test_fast import random_model


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.mark.parametrize(("m", "r"), [(4, 5), (4, 3), (2, 3), (4, 1), (2, 5), (2, 7)])
def test_the_transforms_compute_the_correlation_exactly(m: int, r: int) -> None:
    at, g, bt = winograd_matrices(m, r)
    a = m + r - 1
    assert at.shape == (m, a) and g.shape == (a, r) and bt.shape == (a, a)
    gen = torch.Generator().manual_seed(0)
    taps = torch.randn(50, r, generator=gen, dtype=torch.float64)
    inputs = torch.randn(50, a, generator=gen, dtype=torch.float64)
    got = ((taps @ g.T) * (inputs @ bt.T)) @ at.T  # (50, m)
    want = torch.stack([(taps * inputs[:, k : k + r]).sum(1) for k in range(m)], dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # F(4, 5) takes 8 products for 4 outputs where direct computation takes 20
    assert a < m * r or r == 1


def test_too_many_points_are_refused() -> None:
    with pytest.raises(ValueError, match="finite points"):
        winograd_matrices(6, 5)
    assert (tile_for(3), tile_for(5), tile_for(7), tile_for(9)) == (4, 4, 2, 1)
    assert winograd_pays(MIN_CHANNELS, 7) and winograd_pays(MIN_CHANNELS, 3)
    assert not winograd_pays(MIN_CHANNELS, 9) and not winograd_pays(MIN_CHANNELS - 1, 5)


def direct(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor, r: int, left: int) -> torch.Tensor:
    """The fast pass's unfolded-window products: kernel row i reads the input row kh-1-i above."""
    height, b, width, _ = x.shape
    kh, row = len(weights), b * width
    win = unfold_row(x, r, left=left, right=r - 1 - left, top=kh - 1).reshape((height + kh - 1) * row, -1)
    out = bias + win[: height * row] @ weights[0]
    for i in range(1, kh):
        out = out + win[i * row : i * row + height * row] @ weights[i]
    return out


@pytest.mark.parametrize("width", [1, 3, 4, 7, 8, 28])
@pytest.mark.parametrize(("kh", "r", "left"), [(3, 5, 2), (2, 3, 1), (1, 3, 2), (4, 7, 3)])
def test_row_winograd_equals_the_direct_products(width: int, kh: int, r: int, left: int) -> None:
    gen = torch.Generator().manual_seed(width * 10 + r)
    c, n, height, b = 16, 24, 5, 2
    x = torch.randn(height, b, width, c, generator=gen)
    weights = [torch.randn(r * c, n, generator=gen) / (r * c) ** 0.5 for _ in range(kh)]
    bias = torch.randn(n, generator=gen)
    got = RowWinograd(weights, bias, r=r, left=left)(x)
    want = direct(x, weights, bias, r, left)
    assert got.shape == (height * b * width, n) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_row_matrices_of_a_conv_weight_give_what_conv2d_gives() -> None:
    """RowWinograd reads the fast pass's weight matrices: their layout against torch's convolution."""
    gen = torch.Generator().manual_seed(3)
    w, bias = torch.randn(20, 16, 3, 5, generator=gen) / 10, torch.randn(20, generator=gen)
    x = torch.randn(2, 16, 6, 9, generator=gen)  # (B, C, H, W)
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2, 2, 2, 0)), w, bias)  # rows above, both sides
    got = RowWinograd(_row_matrices(w), bias, r=5, left=2)(x.permute(2, 0, 3, 1).contiguous())
    torch.testing.assert_close(got.view(6, 2, 9, 20).permute(1, 3, 0, 2), want, rtol=0, atol=2e-5)


WIDE = [  # hidden >= MIN_CHANNELS: every block after the first takes the Winograd path
    {"hidden": MIN_CHANNELS},
    {"hidden": 24, "width": 9, "kernel": 5, "in_channels": 3},
    {"hidden": 16, "width": 4, "height": 3, "kernel": 5, "n_classes": 3},
    {"hidden": 16, "width": 1, "height": 2},
    {"hidden": 16, "width": 5, "kernel": 7},  # F(2, 7)
]


@pytest.mark.parametrize("overrides", WIDE)
def test_fast_pass_with_winograd_equals_the_masked_convolutions(overrides: dict[str, Any]) -> None:
    model = random_model(**overrides)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.levels, (3, cfg.in_channels, cfg.height, cfg.width), generator=gen)
    y = torch.randint(0, cfg.n_classes, (3,), generator=gen) if cfg.n_classes else None
    fast = FastPixelCNN(model)
    assert all(b.v_wino is not None for b in fast.blocks[1:]) and fast.blocks[0].v_wino is None
    assert all(b.v_wino is None for b in FastPixelCNN(model, winograd=False).blocks)
    with torch.no_grad():
        torch.testing.assert_close(fast.logits(x, y), model.logits(x, y), rtol=0, atol=2e-5)
        torch.testing.assert_close(fast.pixel_log_prob(x, y), model.pixel_log_prob(x, y), rtol=0, atol=2e-5)


def test_winograd_pass_never_lets_a_later_pixel_change_an_earlier_logit() -> None:
    """Exactly, not within rounding: the transforms only mix columns the vertical stack may read."""
    model = random_model(hidden=16, height=4, width=6, kernel=5)
    fast = FastPixelCNN(model)
    x = torch.randint(0, 16, (1, 1, 4, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = fast.logits(x)
        for pos in range(24):
            i, j = divmod(pos, 6)
            x2 = x.clone()
            x2[0, 0, i, j] = (x2[0, 0, i, j] + 7) % 16
            changed = (fast.logits(x2) - base).abs().amax(dim=2)[0, 0].flatten()  # (H*W,)
            assert torch.all(changed[: pos + 1] == 0), f"a logit at or before {(i, j)} moved"
            assert pos == 23 or changed.max() > 0


@pytest.mark.parametrize("n_classes", [None, 3])
def test_a_batch_shared_over_threads_gives_each_image_its_own_result(n_classes: int | None) -> None:
    model = random_model(hidden=16, n_classes=n_classes)
    fast = FastPixelCNN(model)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 16, (5, 1, 5, 7), generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen) if n_classes else None
    with torch.no_grad():
        alone = torch.cat([fast.pixel_log_prob(x[i : i + 1], None if y is None else y[i : i + 1]) for i in range(5)])
        with torch_threads(3):
            shared = fast.pixel_log_prob(x, y)
            assert torch.get_num_threads() == 3  # the caller's count is given back
    torch.testing.assert_close(shared, alone, rtol=0, atol=1e-6)


def test_a_batch_smaller_than_the_thread_count_runs_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """On many cores and few images, all the threads work on the whole batch rather than one per image."""
    import models.fast

    shared: list[int] = []
    real = models.fast.split_batch
    monkeypatch.setattr(models.fast, "split_batch", lambda fn, n, k: (shared.append(n), real(fn, n, k)))
    fast = FastPixelCNN(random_model(hidden=16))
    x = torch.randint(0, 16, (3, 1, 5, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with torch_threads(4):
            whole = fast.pixel_log_prob(x)
        assert shared == []
        with torch_threads(3):
            split = fast.pixel_log_prob(x)
        assert shared == [3]
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
