"""The statistics that tell a drawing from a garment (models/scoring/statistics.py): ``dark_nll`` and
``transpose``, on constructed images under a toy model whose expectations are known."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from models.base import AutoregressiveModel
from models.scoring.scorer import Scorer
from models.scoring.statistics import STATISTICS, dark_nll, model_statistics, statistic_names

SIZE = 8
BRIGHT = 200


@dataclass
class ToyConfig:
    in_channels: int = 1
    height: int = SIZE
    width: int = SIZE
    levels: int = 256


class VerticalRuns(AutoregressiveModel):
    """p(x_ij | x_<ij): a discretised Gaussian (scale 8 levels) around the pixel above, black above the
    first row. A model of 'garments' that knows one thing: they run from top to bottom, and black
    continues black."""

    architecture = "toy_vertical_runs"

    def __init__(self) -> None:
        super().__init__()
        self.config = ToyConfig()
        self.scale = nn.Parameter(torch.tensor(8.0), requires_grad=False)

    def logits(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        above = nn.functional.pad(x.float(), (0, 0, 1, 0))[:, :, :-1, :]  # (B, C, H, W): the row above
        k = torch.arange(self.levels, dtype=torch.float32).view(1, 1, -1, 1, 1)
        return -((k - above[:, :, None]) ** 2) / (2 * self.scale**2)  # (B, C, levels, H, W)


def image(draw: str) -> Tensor:
    """(1, 1, 8, 8) uint8: ``bar`` a vertical bar from top to bottom (garment-like), ``ring`` a square
    outline with a black hole (icon-like), ``disc`` a plus-shaped blob that is its own transpose."""
    x = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.uint8)
    if draw == "bar":
        x[..., :, 3:5] = BRIGHT
    elif draw == "ring":
        x[..., 1:7, 1:7] = BRIGHT
        x[..., 3:5, 3:5] = 0
    elif draw == "disc":
        x[..., 2:6, 3:5] = BRIGHT
        x[..., 3:5, 2:6] = BRIGHT
    else:
        raise ValueError(draw)
    return x


@pytest.fixture
def scorer() -> Scorer:
    return Scorer(VerticalRuns().eval(), weights_sha256="0" * 64, with_transpose=True)


def test_the_statistics_pass_adds_dark_nll_and_transpose_for_autoregressive_models(scorer):
    names = statistic_names(scorer)
    assert names[-3:] == ["pixel_top", "dark_nll", "transpose"]
    assert STATISTICS["transpose"].tail == "upper" and STATISTICS["dark_nll"].tail == "both"
    stats = model_statistics(scorer, torch.cat([image("bar"), image("ring")]))
    assert set(stats) == set(names)


def test_dark_nll_is_high_where_black_comes_where_the_model_expected_the_object_to_go_on(scorer):
    stats = model_statistics(scorer, torch.cat([image("bar"), image("ring")]))
    bar, ring = stats["dark_nll"].tolist()
    # the bar's black pixels all sit under black; the ring's hole sits under its bright top edge
    assert ring > 5 * bar
    # by hand: the mean per-pixel NLL over the dark pixels only
    x = image("ring")
    pixel_nll = -scorer.model.pixel_log_prob(x).detach()
    dark = x <= 5
    assert ring == pytest.approx(float(pixel_nll[dark].mean()), rel=1e-5)
    assert dark_nll(pixel_nll, torch.full_like(x, BRIGHT), 256).item() == 0.0  # no dark pixel: 0


def test_transpose_is_negative_for_an_upright_object_and_zero_for_one_that_has_no_up_and_down(scorer):
    stats = model_statistics(scorer, torch.cat([image("bar"), image("disc")]))
    bar, disc = stats["transpose"].tolist()
    assert bar < -0.5  # bits/dim: the bar turned on its side breaks every vertical run
    assert disc == pytest.approx(0.0, abs=1e-6)  # the plus is its own transpose
    # and an image sent on its side is the mirror case: the same difference, positive
    side = model_statistics(scorer, image("bar").transpose(2, 3).contiguous())["transpose"].item()
    assert side == pytest.approx(-bar, rel=1e-5)


def test_the_transpose_pass_is_left_out_once_the_calibrated_combination_does_without_it(scorer, monkeypatch):
    seen: list[int] = []
    log_prob = scorer.model.log_prob

    def counting(x: Tensor, y: Tensor | None = None) -> Tensor:
        seen.append(x.shape[0])
        return log_prob(x, y)

    monkeypatch.setattr(scorer.model, "log_prob", counting)
    x = torch.cat([image("bar"), image("ring")])
    assert "transpose" in model_statistics(scorer, x) and seen == [4]  # upside down and on their side
    seen.clear()
    scorer.with_transpose = False  # opt-in: an uncalibrated scorer that does not ask leaves it out
    assert "transpose" not in model_statistics(scorer, x) and seen == [2]
    scorer.with_transpose = True
    scorer.dose = SimpleNamespace(statistics=["nll", "flip", "dark_nll"])  # a combination without transpose
    seen.clear()
    stats = model_statistics(scorer, x)
    assert "transpose" not in stats and "dark_nll" in stats and seen == [2]  # upside down only


def test_the_flip_pass_is_left_out_once_the_calibrated_combination_does_without_it(scorer, monkeypatch):
    seen: list[int] = []
    log_prob = scorer.model.log_prob

    def counting(x: Tensor, y: Tensor | None = None) -> Tensor:
        seen.append(x.shape[0])
        return log_prob(x, y)

    x = torch.cat([image("bar"), image("ring")])
    full = model_statistics(scorer, x)  # before a calibration: image, upside down, on its side
    monkeypatch.setattr(scorer.model, "log_prob", counting)
    scorer.dose = SimpleNamespace(statistics=["nll", "transpose", "dark_nll"])  # no flip: the companion's, say
    stats = model_statistics(scorer, x)
    assert "flip" not in stats and seen == [2]  # on their side only
    for name in ("nll", "complexity", "transpose", "dark_nll", "pixel_top"):  # the same values without the flips
        assert torch.allclose(stats[name], full[name], rtol=1e-6, atol=1e-9), name
    scorer.dose = SimpleNamespace(statistics=["nll", "dark_nll"])
    seen.clear()
    assert set(model_statistics(scorer, x)) == {"nll", "complexity", "border", "background", "pixel_top", "dark_nll"}
    assert seen == []  # neither flips nor transposes: the one pixel pass only
