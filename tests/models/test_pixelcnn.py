"""Gated PixelCNN: exact normalisation, causality with no blind spot, conditioning, sampling."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from models.pixelcnn import PixelCNN, PixelCNNConfig


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not stall when other jobs share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed: int = 0, **overrides: Any) -> PixelCNN:
    """A tiny PixelCNN in eval mode with random weights (biases too, so nothing is trivially zero)."""
    cfg: dict[str, Any] = {
        "in_channels": 1, "height": 2, "width": 2, "levels": 3, "hidden": 6, "n_blocks": 1,
        "first_kernel": 3, "kernel": 3, "out_hidden": 12,
    }  # fmt: skip
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = PixelCNN(PixelCNNConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
            elif name.endswith("weight") and "cond" not in name:
                p.mul_(2.0)  # sharper distributions than the default init
    return model.eval()


def all_images(c: int, h: int, w: int, levels: int) -> torch.Tensor:
    """Every possible (c, h, w) image with ``levels`` values, (levels**(c*h*w), c, h, w) uint8."""
    values = list(itertools.product(range(levels), repeat=c * h * w))
    return torch.tensor(values, dtype=torch.uint8).view(-1, c, h, w)


def order(c: int, i: int, j: int, shape: tuple[int, int, int]) -> int:
    """Position of sub-pixel (c, i, j) in the autoregressive order: raster, then channel."""
    n_c, _, w = shape
    return (i * w + j) * n_c + c


def dependence(model: PixelCNN, n_trials: int = 3) -> torch.Tensor:
    """dep[o, i]: does any logit of output sub-pixel o have a nonzero gradient w.r.t. input sub-pixel i.

    ``logits`` maps its input to [-1, 1] with ``x.float() * a - 1``, which is differentiable for a
    float input, so the real forward pass is differentiated. Both indices are in autoregressive order.
    """
    shape = model.shape
    n = model.dims
    dep = torch.zeros(n, n, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for _ in range(n_trials):
        u = torch.rand(1, *shape, generator=g) * (model.levels - 1)
        jac = torch.autograd.functional.jacobian(lambda t: model.logits(t), u)  # (1, C, L, H, W, 1, C, H, W)
        nz = (jac[0] != 0).any(dim=1)[..., 0, :, :, :]  # (C, H, W, C, H, W)
        for (co, io, jo), (ci, ii, ji) in itertools.product(itertools.product(*map(range, shape)), repeat=2):
            if nz[co, io, jo, ci, ii, ji]:
                dep[order(co, io, jo, shape), order(ci, ii, ji, shape)] = True
    return dep


# -- normalisation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("c", "h", "w", "levels"),
    [(1, 2, 2, 3), (2, 1, 2, 3), (3, 1, 1, 4)],
    ids=["grey-2x2", "2ch-1x2", "rgb-1x1"],
)
def test_probabilities_of_all_images_sum_to_one(c: int, h: int, w: int, levels: int) -> None:
    model = tiny(in_channels=c, height=h, width=w, levels=levels)
    x = all_images(c, h, w, levels)
    with torch.no_grad():
        total = model.log_prob(x).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-4)


def test_conditional_probabilities_sum_to_one_for_every_class() -> None:
    model = tiny(n_classes=3)
    x = all_images(1, 2, 2, 3)
    with torch.no_grad():
        for label in range(3):
            y = torch.full((len(x),), label, dtype=torch.long)
            assert model.log_prob(x, y).double().exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_pixel_log_probs_sum_to_log_prob_and_training_loss_is_nats_per_dim() -> None:
    model = tiny(height=3, width=3, levels=5)
    x = torch.randint(0, 5, (4, 1, 3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        per_pixel = model.pixel_log_prob(x)
        assert per_pixel.shape == (4, 1, 3, 3) and (per_pixel <= 0).all()
        lp = model.log_prob(x)
        torch.testing.assert_close(lp, per_pixel.flatten(1).sum(1))
        step = model.training_step(x)
    torch.testing.assert_close(step.nll, -lp)
    torch.testing.assert_close(step.loss, -lp.mean() / 9)


# -- causality -----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_each_sub_pixel_sees_exactly_the_earlier_ones(channels: int) -> None:
    # Kernel 3 reaches one row up and one column either side per layer: three blocks cover 4x4.
    model = tiny(in_channels=channels, height=4, width=4, levels=4, hidden=6, n_blocks=2)
    dep = dependence(model)
    n = model.dims
    later_or_self = torch.ones(n, n, dtype=torch.bool).triu()
    assert not (dep & later_or_self).any(), "a logit depends on its own or a later sub-pixel"
    earlier = ~later_or_self
    missing = [(o, i) for o, i in zip(*torch.nonzero(earlier & ~dep, as_tuple=True), strict=True)]
    assert not missing, f"blind spot: (output, input) pairs in AR order with no influence: {missing[:10]}"


def test_changing_a_later_sub_pixel_never_changes_earlier_logits() -> None:
    # The same property through the integer path that log_prob and sampling use.
    model = tiny(in_channels=3, height=3, width=3, levels=4, n_blocks=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4, (1, 3, 3, 3), generator=g, dtype=torch.uint8)
    positions = list(itertools.product(range(3), range(3), range(3)))
    with torch.no_grad():
        base = model.logits(x)
        for c, i, j in positions:
            x2 = x.clone()
            x2[0, c, i, j] = (x2[0, c, i, j] + 1) % 4
            changed = (model.logits(x2) != base).any(dim=2)[0]  # (C, H, W)
            here = order(c, i, j, model.shape)
            for c2, i2, j2 in positions:
                if order(c2, i2, j2, model.shape) <= here:
                    assert not changed[c2, i2, j2], f"sub-pixel {(c2, i2, j2)} sees {(c, i, j)}"
            if here < model.dims - 1:
                assert changed.any(), f"changing {(c, i, j)} changed no later logit"


# -- conditioning and input checks ---------------------------------------------------------------


def test_class_label_changes_the_logits() -> None:
    model = tiny(n_classes=4, height=3, width=3)
    x = torch.randint(0, 3, (2, 1, 3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        a = model.log_prob(x, torch.tensor([0, 0]))
        b = model.log_prob(x, torch.tensor([1, 3]))
        a2 = model.log_prob(x, torch.tensor([0, 0]))
    assert torch.equal(a, a2)
    assert (a - b).abs().min() > 1e-4


def test_labels_must_match_the_model() -> None:
    x = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    conditional = tiny(n_classes=3)
    with pytest.raises(ValueError, match="class-conditional; pass labels"):
        conditional.log_prob(x)
    with pytest.raises(ValueError, match="not class-conditional"):
        tiny().log_prob(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 2\]"):
        conditional.log_prob(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        conditional.log_prob(x, torch.tensor([0, 1, 2]))


def test_sampling_checks_labels_too() -> None:
    with pytest.raises(ValueError, match="class-conditional; pass labels"):
        tiny(n_classes=3).sample(2)
    with pytest.raises(ValueError, match="not class-conditional"):
        tiny().sample(2, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        tiny(n_classes=3).sample(2, y=torch.tensor([1]))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(2, 1, 3, 2, dtype=torch.uint8), "shape"),
        (torch.zeros(2, 2, 2, 2, dtype=torch.uint8), "shape"),
        (torch.zeros(1, 2, 2, dtype=torch.uint8), "shape"),
        (torch.zeros(2, 1, 2, 2), "integer"),
        (torch.full((2, 1, 2, 2), 3, dtype=torch.uint8), r"\[0, 2\]"),
        (torch.full((2, 1, 2, 2), -1, dtype=torch.long), r"\[0, 2\]"),
    ],
    ids=["wrong-height", "wrong-channels", "no-batch", "float", "above-levels", "negative"],
)
def test_bad_images_raise_value_error(x: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny().log_prob(x)


# -- sampling ------------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_well_formed() -> None:
    model = tiny(in_channels=3, height=3, width=2, levels=5)
    a = model.sample(6, generator=torch.Generator().manual_seed(42))
    b = model.sample(6, generator=torch.Generator().manual_seed(42))
    c = model.sample(6, generator=torch.Generator().manual_seed(43))
    assert a.images.shape == (6, 3, 3, 2) and a.images.dtype == torch.uint8
    assert int(a.images.max()) < 5
    assert torch.equal(a.images, b.images)
    assert a.log_prob is not None and b.log_prob is not None and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.images, c.images)


def test_sample_log_prob_is_the_model_log_prob_of_the_samples() -> None:
    model = tiny(in_channels=2, height=2, width=3, levels=4)
    out = model.sample(8, generator=torch.Generator().manual_seed(0))
    assert out.log_prob is not None and out.log_prob.shape == (8,)
    with torch.no_grad():
        torch.testing.assert_close(out.log_prob, model.log_prob(out.images), rtol=0, atol=1e-4)
    # At another temperature the draws change but the reported value is still the model's log p.
    hot = model.sample(8, generator=torch.Generator().manual_seed(0), temperature=2.0)
    assert hot.log_prob is not None
    with torch.no_grad():
        torch.testing.assert_close(hot.log_prob, model.log_prob(hot.images), rtol=0, atol=1e-4)


def test_sample_frequencies_match_the_model_probabilities() -> None:
    model = tiny(height=1, width=2, levels=3)
    n = 6000
    out = model.sample(n, generator=torch.Generator().manual_seed(0))
    codes = (out.images.view(n, 2).long() * torch.tensor([3, 1])).sum(1)
    freq = torch.bincount(codes, minlength=9).double() / n
    with torch.no_grad():
        probs = model.log_prob(all_images(1, 1, 2, 3)).double().exp()
    assert (freq - probs).abs().max() < 0.025, (freq, probs)


def test_conditional_sampling_uses_the_labels() -> None:
    model = tiny(n_classes=2, height=2, width=2)
    y = torch.tensor([0, 1, 1])
    out = model.sample(3, generator=torch.Generator().manual_seed(0), y=y)
    assert out.log_prob is not None
    with torch.no_grad():
        torch.testing.assert_close(out.log_prob, model.log_prob(out.images, y), rtol=0, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, -1.0, 1e-4, 1e4, 1e39, float("nan")])
def test_temperature_out_of_range_raises(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        tiny().sample(1, temperature=temperature)
