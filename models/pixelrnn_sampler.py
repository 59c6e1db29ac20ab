"""Cached, incremental sampling for the Row LSTM PixelRNN.

The reference sampler runs the whole network once per sub-pixel (C*H*W full passes, each one a
28-step recurrence down the image). The Row LSTM needs far less per new sub-pixel:

- A layer's gates at (i, j) are an input part, the masked 1 x k_in conv over columns <= j of row i
  of the layer's input, and a state part, the conv over row i-1 of its own hidden states (and, in
  the first layer, over row i-1 of the image). Everything in the state part is known once row i-1
  is complete, so one *row step* computes it for the whole next row, as the full pass does.
- One *pixel step* then computes column j of every layer: the input part from a cached window of
  k_in columns, the LSTM cell from the cell state at (i-1, j), the residual stream, and the output
  head, as small matrix products.

Same weights, masks and zero padding as :meth:`PixelRNN.logits`, so the logits agree with the full
pass to float rounding and the draws, made by :func:`models.cached_sampling.run_parts`, are the
reference sampler's for the same seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.base import SampleOutput, SamplePart
from models.cached_sampling import LogitsHook, masked_matrix, run_parts
from models.pixelrnn import PixelRNN, RowLSTMLayer, lstm_cell


@torch.no_grad()
def sample_parts_cached(
    model: PixelRNN, parts: list[SamplePart], *, on_logits: LogitsHook | None = None
) -> list[SampleOutput | None]:
    """Sample several parts (e.g. requests) as one batch; see :class:`SamplePart`."""
    return run_parts(model, parts, lambda n, labels: _RowLSTMStepper(model, n, labels), on_logits=on_logits)


class _Layer:
    """Matrices and per-image state of one Row LSTM layer for one generation."""

    def __init__(self, layer: RowLSTMLayer, n: int, width: int, labels: Tensor | None) -> None:
        conv = layer.input_conv
        self.layer = layer
        self.k_in = conv.k
        self.w_in = masked_matrix(conv)  # (in*k_in, 4h)
        w = layer.state_conv.weight  # (4h, h, k)
        self.k_state = w.shape[-1]
        self.w_state = w.reshape(w.shape[0], -1).t().contiguous()  # (h*k, 4h), rows (channel, tap)
        h = layer.hidden
        self.bias: Tensor = conv.bias  # (4h,), or (n, 4h) with class conditioning
        if layer.cond is not None and labels is not None:
            self.bias = self.bias + layer.cond(labels)  # (n, 4h)
        like = conv.weight
        self.h_prev = like.new_zeros(n, width, h)  # hidden states of row i-1
        self.c_prev = like.new_zeros(n, width, h)  # cell states of row i-1
        self.h_cur = like.new_zeros(n, width, h)
        self.c_cur = like.new_zeros(n, width, h)
        self.row_pre = like.new_zeros(n, width, 4 * h)  # the state part of row i's gates, bias included

    def start_row(self, image_row_above: Tensor | None) -> None:
        """Gates' state part for the coming row, from the row above (image row (n, C, W) for layer 0)."""
        n, width, _ = self.h_prev.shape
        k = self.k_state
        windows = F.pad(self.h_prev, (0, 0, k // 2, k // 2)).unfold(1, k, 1)  # (n, W, h, k)
        pre = (windows.reshape(n * width, -1) @ self.w_state).view(n, width, -1)
        if self.layer.above_conv is not None:
            assert image_row_above is not None
            above = self.layer.above_conv(image_row_above[:, :, None, :])[:, :, 0]  # (n, 4h, W)
            pre = pre + above.transpose(1, 2)
        self.row_pre = pre + (self.bias[:, None, :] if self.bias.dim() == 2 else self.bias)

    def pixel(self, window: Tensor, j: int) -> Tensor:
        """Hidden state (n, h) at column j of the current row from the input window (n, in*k_in)."""
        gates = self.row_pre[:, j] + window @ self.w_in
        h, c = lstm_cell(gates, self.c_prev[:, j], dim=1)
        self.h_cur[:, j], self.c_cur[:, j] = h, c
        return h

    def end_row(self) -> None:
        self.h_prev, self.h_cur = self.h_cur, self.h_prev
        self.c_prev, self.c_cur = self.c_cur, self.c_prev

    def select(self, idx: Tensor) -> None:
        self.h_prev, self.c_prev = self.h_prev[idx], self.c_prev[idx]
        self.h_cur, self.c_cur, self.row_pre = self.h_cur[idx], self.c_cur[idx], self.row_pre[idx]
        if self.bias.dim() == 2:
            self.bias = self.bias[idx]


class _RowLSTMStepper:
    """The Row LSTM's cached state for n images (see the module docstring)."""

    def __init__(self, model: PixelRNN, n: int, labels: Tensor | None) -> None:
        cfg = model.config
        self.model = model
        self.dtype = model.out1.weight.dtype
        self.layers = [_Layer(layer, n, cfg.width, labels) for layer in model.layers]  # type: ignore[arg-type]
        self.head1, self.head2 = masked_matrix(model.out1), masked_matrix(model.out2)
        # rows[l]: layer l's input along the current row, left-padded by k_in - 1 for its causal
        # window: rows[0] is the image row, rows[l] (l >= 1) the residual stream after layer l - 1.
        self.pad = max(layer.k_in for layer in self.layers) - 1
        like = model.out1.weight
        self.rows = [like.new_zeros(n, cfg.in_channels, cfg.width + self.pad)]
        self.rows += [like.new_zeros(n, cfg.hidden, cfg.width + self.pad) for _ in self.layers[1:]]
        self.image = like.new_zeros(n, cfg.in_channels, cfg.height, cfg.width)  # drawn so far, [-1, 1] units
        for layer in self.layers:
            layer.start_row(torch.zeros_like(self.image[:, :, 0]))  # row 0: everything above is zero

    def logits(self, i: int, j: int) -> Tensor:
        col = self.pad + j
        stream: Tensor | None = None
        for li, layer in enumerate(self.layers):
            below = self.rows[li]
            window = below[:, :, col - layer.k_in + 1 : col + 1].reshape(below.shape[0], -1)
            h = layer.pixel(window, j)
            stream = h if li == 0 else below[:, :, col] + h
            if li + 1 < len(self.layers):
                self.rows[li + 1][:, :, col] = stream
        assert stream is not None
        m = self.model
        hidden = F.relu(torch.addmm(m.out1.bias, F.relu(stream), self.head1))
        out = torch.addmm(m.out2.bias, hidden, self.head2)  # (n, C*L), grouped by channel
        return out.view(out.shape[0], m.config.in_channels, m.config.levels)

    def put(self, i: int, j: int, c: int, value: Tensor) -> None:
        value = value.to(self.dtype)
        self.image[:, c, i, j] = value
        self.rows[0][:, c, self.pad + j] = value

    def end_row(self, i: int) -> None:
        for layer in self.layers:
            layer.end_row()
            layer.start_row(self.image[:, :, i])
        for row in self.rows:
            row.zero_()

    def select(self, idx: Tensor) -> None:
        self.image = self.image[idx]
        self.rows = [row[idx] for row in self.rows]
        for layer in self.layers:
            layer.select(idx)
