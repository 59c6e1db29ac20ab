"""Gated PixelCNN: van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders".

A vertical stack sees every row above the current one; a horizontal stack sees the pixels to the
left in the current row; together they cover all earlier pixels with no blind spot. Each sub-pixel
gets a ``levels``-way softmax. For colour images the hidden channels are split into C groups and
the centre tap of the horizontal stack is masked so that R comes before G before B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import AutoregressiveModel, SampleOutput, SamplePart, StepCallback
from models.likelihood import to_unit_range


@dataclass
class PixelCNNConfig:
    in_channels: int = 1
    height: int = 28
    width: int = 28
    levels: int = 256  # discrete values per sub-pixel (8-bit images)
    hidden: int = 64
    n_blocks: int = 7
    first_kernel: int = 7  # kernel of the first (mask A) layer
    kernel: int = 5  # kernel of the gated blocks
    out_hidden: int = 256  # width of the 1x1 output head before the logits
    dropout: float = 0.0
    n_classes: int | None = None  # set for class-conditional models


def channel_groups(n: int, groups: int) -> Tensor:
    """Group of each of n channels when split into ``groups`` contiguous blocks, shape (n,)."""
    return torch.arange(n) * groups // n


def centre_mask(out_ch: int, in_ch: int, groups: int, *, include_own: bool) -> Tensor:
    """(out_ch, in_ch) mask for the tap at the current pixel.

    Output group j may read input group i only if i < j (mask A: the first layer, which must not
    see the current sub-pixel) or i <= j (mask B: later layers, whose group-j features already
    exclude sub-pixel j of the current pixel).
    """
    go = channel_groups(out_ch, groups).view(-1, 1)
    gi = channel_groups(in_ch, groups).view(1, -1)
    return ((gi <= go) if include_own else (gi < go)).float()


class HorizontalConv(nn.Module):
    """1 x k conv over the current row: columns j-k+1 .. j, the tap at j channel-masked.

    ``in_groups``/``out_groups`` are the channel groups (C of them) for the colour ordering.
    """

    def __init__(self, in_ch: int, out_ch: int, k: int, groups: int, *, include_own: bool) -> None:
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 1, k))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        mask = torch.ones(out_ch, in_ch, 1, k)
        mask[:, :, 0, k - 1] = centre_mask(out_ch, in_ch, groups, include_own=include_own)
        self.mask: Tensor
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (self.k - 1, 0, 0, 0))  # pad left only: output j sees columns <= j
        return F.conv2d(x, self.weight * self.mask, self.bias)


class Conv1x1(nn.Module):
    """Channel-masked 1x1 conv (mask B): output group j reads input groups <= j."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        mask = centre_mask(out_ch, in_ch, groups, include_own=True).view(out_ch, in_ch, 1, 1)
        self.mask: Tensor
        self.register_buffer("mask", mask, persistent=False)
        self.masked = groups > 1

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight * self.mask if self.masked else self.weight
        return F.conv2d(x, w, self.bias)


class VerticalConv(nn.Conv2d):
    """(k//2+1) x k conv whose output at row i sees rows i-k//2 .. i (current row included).

    The vertical stack may see the whole current row because it only reaches the horizontal stack
    through :func:`shift_down`, which moves it one row down.
    """

    def __init__(self, in_ch: int, out_ch: int, k: int) -> None:
        super().__init__(in_ch, out_ch, (k // 2 + 1, k))
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        p = self.k // 2
        return super().forward(F.pad(x, (p, p, p, 0)))


def shift_down(x: Tensor) -> Tensor:
    """Move features one row down (row 0 becomes zeros): (B, C, H, W) -> (B, C, H, W)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def gate(x: Tensor) -> Tensor:
    """Gated activation tanh(a) * sigmoid(b) over the two channel halves."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedBlock(nn.Module):
    """One gated layer of both stacks, with a residual and a skip output on the horizontal stack."""

    def __init__(self, cfg: PixelCNNConfig, in_ch: int, k: int, *, first: bool) -> None:
        super().__init__()
        h, g = cfg.hidden, cfg.in_channels
        self.first = first
        self.v_conv = VerticalConv(in_ch, 2 * h, k)
        self.v_to_h = nn.Conv2d(2 * h, 2 * h, 1)
        # The 2h outputs are two halves (tanh, sigmoid); masks are built per half so that both
        # halves of channel c fall in the same colour group.
        self.h_conv_a = HorizontalConv(in_ch, h, k // 2 + 1, g, include_own=not first)
        self.h_conv_b = HorizontalConv(in_ch, h, k // 2 + 1, g, include_own=not first)
        self.h_res = Conv1x1(h, h, g)
        self.h_skip = Conv1x1(h, h, g)
        self.dropout = nn.Dropout(cfg.dropout)
        self.cond = nn.Embedding(cfg.n_classes, 4 * h) if cfg.n_classes else None

    def forward(self, v: Tensor, hx: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        v_pre = self.v_conv(v)  # (B, 2h, H, W), rows <= i
        h_pre = torch.cat([self.h_conv_a(hx), self.h_conv_b(hx)], dim=1)
        h_pre = h_pre + self.v_to_h(shift_down(v_pre))  # only rows < i reach the horizontal stack
        if self.cond is not None and y is not None:
            cv, ch = self.cond(y)[:, :, None, None].chunk(2, dim=1)
            v_pre = v_pre + cv
            h_pre = h_pre + ch
        v_out = gate(v_pre)
        h_gated = self.dropout(gate(h_pre))
        skip = self.h_skip(h_gated)
        h_out = self.h_res(h_gated)
        if not self.first:
            h_out = h_out + hx
        return v_out, h_out, skip


class PixelCNN(AutoregressiveModel):
    """Gated PixelCNN over (C, H, W) images with ``levels`` values per sub-pixel."""

    architecture = "gated_pixelcnn"

    def __init__(self, config: PixelCNNConfig) -> None:
        super().__init__()
        self.config = config
        c, h = config.in_channels, config.hidden
        blocks = [GatedBlock(config, c, config.first_kernel, first=True)]
        blocks += [GatedBlock(config, h, config.kernel, first=False) for _ in range(config.n_blocks)]
        self.blocks = nn.ModuleList(blocks)
        self.out1 = Conv1x1(h, config.out_hidden, c)
        self.out2 = Conv1x1(config.out_hidden, c * config.levels, c)
        self.sample_cuda_graphs = False  # set by prepare_for_inference

    def prepare_for_inference(self, *, cuda_graphs: bool = False) -> None:
        """With ``cuda_graphs`` on a CUDA device, the cached sampler replays its pixel step as a CUDA
        graph (models/pixelcnn_sampler.py): the same images, one launch per step."""
        self.sample_cuda_graphs = cuda_graphs and self.device.type == "cuda"

    def logits(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        cfg = self.config
        b = x.shape[0]
        inp = to_unit_range(x, cfg.levels).to(self.out1.weight.dtype)  # (B, C, H, W) in [-1, 1]
        v, hx = inp, inp
        skip = torch.zeros((), device=x.device)
        for block in self.blocks:
            v, hx, s = block(v, hx, y)
            skip = skip + s
        out = self.out2(F.relu(self.out1(F.relu(skip + hx))))  # (B, C*L, H, W), grouped by channel
        return out.view(b, cfg.in_channels, cfg.levels, cfg.height, cfg.width)

    def sample_parts(
        self, parts: list[SamplePart], *, between_steps: StepCallback | None = None
    ) -> list[SampleOutput | None]:
        """All parts as one cached batched generation (see models/pixelcnn_sampler.py)."""
        from models.pixelcnn_sampler import sample_parts_cached

        return sample_parts_cached(self, parts, cuda_graphs=self.sample_cuda_graphs, between_steps=between_steps)
