"""Gated PixelCNN: van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders".

A vertical stack sees every row above the current one; a horizontal stack sees the pixels to the
left in the current row; together they cover all earlier pixels with no blind spot. Each sub-pixel
gets a ``levels``-way softmax. For colour images the hidden channels are split into C groups and
the centre tap of the horizontal stack is masked so that R comes before G before B (the layers and
their masks: models/layers.py). Sampling runs incrementally (models/sampling/pixelcnn.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import AutoregressiveModel
from models.fast import FastPixelCNN
from models.layers import Conv1x1, GatedBlock
from models.likelihood import to_unit_range
from models.sampling.pixelcnn import sample_parts_cached


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


class PixelCNN(AutoregressiveModel):
    """Gated PixelCNN over (C, H, W) images with ``levels`` values per sub-pixel."""

    architecture = "gated_pixelcnn"
    cached_sampler = sample_parts_cached

    def __init__(self, config: PixelCNNConfig) -> None:
        super().__init__()
        self.config = config
        c, h = config.in_channels, config.hidden

        def block(in_ch: int, k: int, first: bool) -> GatedBlock:
            return GatedBlock(in_ch, h, k, c, first=first, dropout=config.dropout, n_classes=config.n_classes)

        blocks = [block(c, config.first_kernel, True)]  # built in order: a seed gives the same weights
        blocks += [block(h, config.kernel, False) for _ in range(config.n_blocks)]
        self.blocks = nn.ModuleList(blocks)
        self.out1 = Conv1x1(h, config.out_hidden, c)
        self.out2 = Conv1x1(config.out_hidden, c * config.levels, c)
        self.fast: FastPixelCNN | None = None  # set by prepare_for_inference

    def prepare_for_inference(self, *, cuda_graphs: bool = False, compile: bool = False) -> None:
        """Also, on CPU and unless ``compile`` is asked for: the weights as matrices for
        :class:`models.fast.FastPixelCNN`, which computes the logits of eval-mode passes without
        gradients as a few large matrix products (the same values up to float rounding). Call again
        after changing the weights."""
        super().prepare_for_inference(cuda_graphs=cuda_graphs, compile=compile)
        self.fast = FastPixelCNN(self) if self.device.type == "cpu" and not compile else None

    def _fast(self) -> FastPixelCNN | None:
        return self.fast if self.fast is not None and not self.training and not torch.is_grad_enabled() else None

    def pixel_log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        fast = self._fast()
        if fast is None:
            return super().pixel_log_prob(x, y)
        self.check_input(x, y)
        return fast.pixel_log_prob(x, y)

    def logits(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        fast = self._fast()
        if fast is not None:
            return fast.logits(x, y)
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
