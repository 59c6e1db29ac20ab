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

Sampling runs incrementally (models/pixelrnn_sampler.py): the same draws as the reference loop of
one full pass per sub-pixel, at a small fraction of its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import AutoregressiveModel, SampleOutput, SamplePart, StepCallback
from models.likelihood import to_unit_range
from models.pixelcnn import Conv1x1, channel_groups, shift_down


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


class RowConv(nn.Module):
    """Causal 1 x k conv along each row: columns j-k+1 .. j, the tap at j channel-masked.

    Output channel o belongs to colour group g(o mod per_gate) so the four LSTM gates of a hidden
    unit share its group; mask A (first layer) hides the current sub-pixel, mask B shows it.
    """

    def __init__(self, in_ch: int, per_gate: int, n_gates: int, k: int, groups: int, *, include_own: bool) -> None:
        super().__init__()
        out_ch = per_gate * n_gates
        self.k = k
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 1, k))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        go = channel_groups(per_gate, groups).repeat(n_gates).view(-1, 1)
        gi = channel_groups(in_ch, groups).view(1, -1)
        mask = torch.ones(out_ch, in_ch, 1, k)
        mask[:, :, 0, k - 1] = ((gi <= go) if include_own else (gi < go)).float()
        self.mask: Tensor
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (self.k - 1, 0, 0, 0)), self.weight * self.mask, self.bias)


class RowLSTMLayer(nn.Module):
    """One Row LSTM layer: (B, in_ch, H, W) -> hidden states (B, hidden, H, W)."""

    def __init__(self, cfg: PixelRNNConfig, in_ch: int, *, first: bool) -> None:
        super().__init__()
        h = cfg.hidden
        self.hidden = h
        k_in = cfg.input_kernel or cfg.width
        k_state = cfg.state_kernel or 2 * cfg.width - 1
        if k_state % 2 == 0:
            raise ValueError("state_kernel must be odd (centred on the column above)")
        self.input_conv = RowConv(in_ch, h, 4, k_in, cfg.in_channels, include_own=not first)
        # The row above is entirely earlier than the current row: no mask needed.
        self.state_conv = nn.Conv1d(h, 4 * h, k_state, padding=k_state // 2, bias=False)
        # Mask A hides x[i-1, j] from h[i-1, j], so nothing in row i-1's states sees that row's last
        # pixel; the first layer therefore also reads the row above of its input directly.
        self.above_conv = nn.Conv2d(in_ch, 4 * h, (1, k_state), padding=(0, k_state // 2)) if first else None
        self.cond = nn.Embedding(cfg.n_classes, 4 * h) if cfg.n_classes else None
        with torch.no_grad():  # forget gates start mostly open (gate order: input, forget, output, cell)
            self.input_conv.bias[h : 2 * h].fill_(1.0)

    def forward(self, x: Tensor, y: Tensor | None) -> Tensor:
        b, _, height, width = x.shape
        pre = self.input_conv(x)  # (B, 4h, H, W), all rows at once
        if self.above_conv is not None:
            pre = pre + self.above_conv(shift_down(x))  # row i reads input row i-1 (zeros for row 0)
        if self.cond is not None and y is not None:
            pre = pre + self.cond(y)[:, :, None, None]
        # The recurrence runs in (B, W, channels) layout: the row-above convolution is then one matrix
        # product of the (B*W, hidden*k) windows with the conv weight, and the per-row slices of
        # ``pre`` come from one unbind (one gradient buffer, not one full-size buffer per row).
        w = self.state_conv.weight  # (4h, h, k)
        k = w.shape[-1]
        w_mat = w.reshape(w.shape[0], -1).t()  # (h*k, 4h), rows ordered (channel, tap) like the windows
        pre_rows = pre.permute(2, 0, 3, 1).unbind(0)  # H x (B, W, 4h)
        h_prev = x.new_zeros(b, width, self.hidden)
        c_prev = x.new_zeros(b, width, self.hidden)
        rows = []
        for i in range(height):
            windows = F.pad(h_prev, (0, 0, k // 2, k // 2)).unfold(1, k, 1)  # (B, W, h, k)
            gates = pre_rows[i] + (windows.reshape(b * width, -1) @ w_mat).view(b, width, -1)  # (B, W, 4h)
            h_prev, c_prev = lstm_cell(gates, c_prev, dim=2)
            rows.append(h_prev)
        return torch.stack(rows, dim=1).permute(0, 3, 1, 2)  # (B, h, H, W)


def lstm_cell(gates: Tensor, c_prev: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """LSTM update from pre-activations, 4h along ``dim`` = input, forget, output, cell candidate."""
    i, f, o, g = gates.chunk(4, dim=dim)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class PixelRNN(AutoregressiveModel):
    """Row LSTM PixelRNN over (C, H, W) images with ``levels`` values per sub-pixel."""

    architecture = "row_lstm"

    def __init__(self, config: PixelRNNConfig) -> None:
        super().__init__()
        self.config = config
        c, h = config.in_channels, config.hidden
        self.layers = nn.ModuleList(
            [RowLSTMLayer(config, c if n == 0 else h, first=n == 0) for n in range(config.n_layers)]
        )
        self.out1 = Conv1x1(h, config.out_hidden, c)
        self.out2 = Conv1x1(config.out_hidden, c * config.levels, c)
        self.sample_cuda_graphs = False  # set by prepare_for_inference

    def prepare_for_inference(self, *, cuda_graphs: bool = False) -> None:
        """With ``cuda_graphs`` on a CUDA device, the cached sampler replays its pixel step as a CUDA
        graph (models/pixelrnn_sampler.py): the same images, one launch per step."""
        self.sample_cuda_graphs = cuda_graphs and self.device.type == "cuda"

    def logits(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        cfg = self.config
        hx = to_unit_range(x, cfg.levels).to(self.out1.weight.dtype)  # (B, C, H, W)
        for n, layer in enumerate(self.layers):
            out = layer(hx, y)
            hx = out if n == 0 else hx + out  # residual between layers of equal width
        logits = self.out2(F.relu(self.out1(F.relu(hx))))  # (B, C*L, H, W)
        return logits.view(x.shape[0], cfg.in_channels, cfg.levels, cfg.height, cfg.width)

    def sample_parts(
        self, parts: list[SamplePart], *, between_steps: StepCallback | None = None
    ) -> list[SampleOutput | None]:
        """All parts as one cached batched generation (see models/pixelrnn_sampler.py)."""
        from models.pixelrnn_sampler import sample_parts_cached

        return sample_parts_cached(self, parts, cuda_graphs=self.sample_cuda_graphs, between_steps=between_steps)
