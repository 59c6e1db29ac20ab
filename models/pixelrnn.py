"""PixelRNN, Row LSTM: van den Oord et al. 2016, "Pixel Recurrent Neural Networks".

An LSTM runs down the image one row at a time. At row i its gates add an input-to-state part, a
causal convolution along row i of the layer input (columns <= j, the current sub-pixel's own value
masked away), and a state-to-state part, a convolution along row i-1 of the hidden state. Each
sub-pixel gets a ``levels``-way softmax, colour channels one at a time (R, then G, then B) through
the same channel-group masks as the gated PixelCNN.

One deliberate change from the paper's k=3 kernels: both kernels span the full width by default
(``state_kernel = 2*width - 1``, the input kernel all columns to the left), so each hidden state
depends on every state of the row above and every earlier pixel of its own row. The paper's Row
LSTM sees a triangle above each pixel and leaves a blind spot; this one has none.

The layers: models/layers.py. Sampling runs incrementally (models/sampling/pixelrnn.py): the same
draws as the reference loop of one full pass per sub-pixel, at a small fraction of its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from models.base import AutoregressiveModel
from models.layers import Conv1x1, RowLSTMLayer
from models.likelihood import to_unit_range
from models.sampling.pixelrnn import sample_parts_cached


@dataclass
class PixelRNNConfig:
    in_channels: int = 1
    height: int = 28
    width: int = 28
    levels: int = 256  # discrete values per sub-pixel (8-bit images)
    hidden: int = 64
    n_layers: int = 4
    input_kernel: int | None = None  # columns j-k+1..j seen along the row; None = the full width
    state_kernel: int | None = None  # odd width of the conv over the row above; None = 2*width-1
    out_hidden: int = 256
    n_classes: int | None = None  # set for class-conditional models


class PixelRNN(AutoregressiveModel):
    """Row LSTM PixelRNN over (C, H, W) images with ``levels`` values per sub-pixel."""

    architecture = "row_lstm"
    cached_sampler = sample_parts_cached
    steps_in_python = True  # the Row LSTM steps through the rows in Python, H steps per pass

    def __init__(self, config: PixelRNNConfig) -> None:
        super().__init__()
        self.config = config
        c, h = config.in_channels, config.hidden
        k_in = config.input_kernel or config.width
        k_state = config.state_kernel or 2 * config.width - 1
        self.layers = nn.ModuleList(
            [
                RowLSTMLayer(
                    c if n == 0 else h, h, c, k_in=k_in, k_state=k_state, first=n == 0, n_classes=config.n_classes
                )
                for n in range(config.n_layers)
            ]
        )
        self.out1 = Conv1x1(h, config.out_hidden, c)
        self.out2 = Conv1x1(config.out_hidden, c * config.levels, c)

    def logits(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        cfg = self.config
        hx = to_unit_range(x, cfg.levels).to(self.out1.weight.dtype)  # (B, C, H, W)
        for n, layer in enumerate(self.layers):
            out = layer(hx, y)
            hx = out if n == 0 else hx + out  # residual between layers of equal width
        logits = self.out2(F.relu(self.out1(F.relu(hx))))  # (B, C*L, H, W)
        return logits.view(x.shape[0], cfg.in_channels, cfg.levels, cfg.height, cfg.width)
