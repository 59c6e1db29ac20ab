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
pass to float rounding and the draws, made by :func:`models.sampling.cached.run_parts`, are the
reference sampler's for the same seed.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import SampleOutput, SamplePart, StepCallback
from models.layers import Conv1x1, RowLSTMLayer, lstm_cell
from models.sampling.cached import LogitsHook, SampledModel, StepGraphs, masked_matrix, next_column, run_parts


class _Config(Protocol):
    in_channels: int
    height: int
    width: int
    hidden: int
    levels: int


class PixelRNN(SampledModel, Protocol):
    """What the sampler reads of a Row LSTM PixelRNN (models/pixelrnn.py): its config, its
    :class:`RowLSTMLayer` s and its 1x1 output head."""

    @property
    def config(self) -> _Config: ...

    @property
    def layers(self) -> nn.ModuleList: ...

    @property
    def out1(self) -> Conv1x1: ...

    @property
    def out2(self) -> Conv1x1: ...


@torch.no_grad()
def sample_parts_cached(
    model: PixelRNN,
    parts: list[SamplePart],
    *,
    on_logits: LogitsHook | None = None,
    cuda_graphs: bool = False,
    between_steps: StepCallback | None = None,
) -> list[SampleOutput | None]:
    """Sample several parts (e.g. requests) as one batch; see :class:`SamplePart`. ``cuda_graphs``
    (a model on a CUDA device only) replays each pixel step as a CUDA graph; ``between_steps``
    runs after every pixel (see :func:`models.sampling.cached.run_parts`)."""
    if cuda_graphs and model.device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, not {model.device}")

    def make(n: int, labels: Tensor | None) -> _RowLSTMStepper:
        return _RowLSTMStepper(model, n, labels, cuda_graphs=cuda_graphs)

    return run_parts(model, parts, make, on_logits=on_logits, between_steps=between_steps)


class _Layer:
    """Matrices of one Row LSTM layer, prepared once per sampling call."""

    def __init__(self, layer: RowLSTMLayer, labels: Tensor | None) -> None:
        self.layer = layer
        self.w_in = masked_matrix(layer.input_conv)  # (in*k_in, 4h)
        w = layer.state_conv.weight  # (4h, h, k)
        self.k_state = w.shape[-1]
        self.w_state = w.reshape(w.shape[0], -1).t().contiguous()  # (h*k, 4h), rows (channel, tap)
        self.bias: Tensor = layer.input_conv.bias  # (4h,), or (n, 4h) with class conditioning
        if layer.cond is not None and labels is not None:
            self.bias = self.bias + layer.cond(labels)  # (n, 4h)

    def row_pre(self, h_prev: Tensor, image_row_above: Tensor) -> Tensor:
        """The state part of the coming row's gates, bias included, (n, W, 4h): from the hidden
        states of the row above (n, W, h) and, in the first layer, the image row above (n, C, W)."""
        n, width, _ = h_prev.shape
        k = self.k_state
        windows = F.pad(h_prev, (0, 0, k // 2, k // 2)).unfold(1, k, 1)  # (n, W, h, k)
        pre = (windows.reshape(n * width, -1) @ self.w_state).view(n, width, -1)
        if self.layer.above_conv is not None:
            above = self.layer.above_conv(image_row_above[:, :, None, :])[:, :, 0]  # (n, 4h, W)
            pre = pre + above.transpose(1, 2)
        return pre + (self.bias[:, None, :] if self.bias.dim() == 2 else self.bias)

    def select(self, idx: Tensor) -> None:
        if self.bias.dim() == 2:
            self.bias = self.bias[idx]


class _RowLSTMStepper:
    """The Row LSTM's cached state for n images (see the module docstring).

    Per layer (stacked along the first dimension, L layers): the state part of the current row's
    gates ``row_pre`` (L, n, W, 4h), the hidden and cell states of the row above and of the current
    row (L, n, W, h), and a window of the layer's input along the current row: ``win0`` (n, C, k)
    for the image, ``winh[l]`` (n, h, k) for the residual stream layer l+1 reads; the last column is
    the current one. Moving to the next pixel shifts the windows left by one column. With
    ``cuda_graphs`` the pixel step reads its column of ``row_pre`` and of the cell states from fixed
    buffers and is replayed as a CUDA graph (one launch instead of one per operation).
    """

    def __init__(self, model: PixelRNN, n: int, labels: Tensor | None, *, cuda_graphs: bool = False) -> None:
        cfg = model.config
        self.model = model
        self.dtype = model.out1.weight.dtype
        self.layers = [_Layer(layer, labels) for layer in model.layers]  # type: ignore[arg-type]
        self.head1, self.head2 = masked_matrix(model.out1), masked_matrix(model.out2)
        n_layers, h, width = len(self.layers), cfg.hidden, cfg.width
        k = {layer.layer.input_conv.k for layer in self.layers}
        assert len(k) == 1, "every layer has the same input kernel"
        k_in = k.pop()
        like = model.out1.weight
        self.image = like.new_zeros(n, cfg.in_channels, cfg.height, cfg.width)  # drawn so far, [-1, 1] units
        self.win0 = like.new_zeros(n, cfg.in_channels, k_in)
        self.winh = like.new_zeros(n_layers - 1, n, h, k_in)
        self.h_prev, self.c_prev = like.new_zeros(n_layers, n, width, h), like.new_zeros(n_layers, n, width, h)
        self.h_cur, self.c_cur = torch.zeros_like(self.h_prev), torch.zeros_like(self.c_prev)
        self.row_pre = like.new_zeros(n_layers, n, width, 4 * h)
        self._start_row(torch.zeros_like(self.image[:, :, 0]))  # row 0: everything above is zero
        self.pixel = (-1, -1)
        self.graphs = StepGraphs() if cuda_graphs else None  # one with the window shift, one without
        if cuda_graphs:
            # The graphs' fixed inputs (the current column of row_pre and c_prev) and outputs.
            self.pre_j = like.new_zeros(n_layers, n, 4 * h)
            self.c_j, self.h_out, self.c_out = (like.new_zeros(n_layers, n, h) for _ in range(3))

    def logits(self, i: int, j: int) -> Tensor:
        shift = False
        if (i, j) != self.pixel:  # the first channel of a new pixel
            self.pixel = (i, j)
            shift = j > 0  # a new row starts from zeroed windows (end_row)
            if self.graphs is not None:
                self.pre_j.copy_(self.row_pre[:, :, j])
                self.c_j.copy_(self.c_prev[:, :, j])
        if self.graphs is None:
            return self._step(
                shift, self.row_pre[:, :, j], self.c_prev[:, :, j], self.h_cur[:, :, j], self.c_cur[:, :, j]
            )
        state = [self.win0, self.winh, self.h_out, self.c_out]
        out = self.graphs.run(shift, lambda: self._step(shift, self.pre_j, self.c_j, self.h_out, self.c_out), state)
        self.h_cur[:, :, j], self.c_cur[:, :, j] = self.h_out, self.c_out
        return out

    def put(self, i: int, j: int, c: int, value: Tensor) -> None:
        value = value.to(self.dtype)
        self.image[:, c, i, j] = value
        self.win0[:, c, -1] = value

    def end_row(self, i: int, threads: int = 1) -> None:
        """Row i is complete (``threads`` unused: a Row LSTM's row step is one small product per layer)."""
        self.h_prev, self.h_cur = self.h_cur, self.h_prev
        self.c_prev, self.c_cur = self.c_cur, self.c_prev
        self._start_row(self.image[:, :, i])
        self.win0.zero_()
        self.winh.zero_()

    def select(self, idx: Tensor) -> None:
        self.image, self.win0, self.winh = self.image[idx], self.win0[idx], self.winh[:, idx]
        self.h_prev, self.c_prev = self.h_prev[:, idx], self.c_prev[:, idx]
        self.h_cur, self.c_cur, self.row_pre = self.h_cur[:, idx], self.c_cur[:, idx], self.row_pre[:, idx]
        for layer in self.layers:
            layer.select(idx)
        if self.graphs is not None:
            self.pre_j, self.c_j = self.pre_j[:, idx], self.c_j[:, idx]
            self.h_out, self.c_out = self.h_out[:, idx], self.c_out[:, idx]
            self.graphs.reset()

    def _start_row(self, image_row_above: Tensor) -> None:
        for li, layer in enumerate(self.layers):
            self.row_pre[li] = layer.row_pre(self.h_prev[li], image_row_above)

    def _step(self, shift: bool, pre_j: Tensor, c_j: Tensor, h_out: Tensor, c_out: Tensor) -> Tensor:
        """Shift the windows to a new pixel if ``shift``, then column j of every layer from the state
        part of its gates ``pre_j`` (L, n, 4h) and the cell states above ``c_j`` (L, n, h); writes the
        new hidden and cell states into ``h_out`` and ``c_out`` (L, n, h) and returns the logits (n, C, L)."""
        if shift:
            next_column(self.win0, self.winh)
        n = self.win0.shape[0]
        stream = self.win0[:, :, -1]
        for li, layer in enumerate(self.layers):
            window = self.win0 if li == 0 else self.winh[li - 1]  # (n, in, k): this layer's input
            gates = pre_j[li] + window.reshape(n, -1) @ layer.w_in
            h, c = lstm_cell(gates, c_j[li], dim=1)
            h_out[li], c_out[li] = h, c
            stream = h if li == 0 else window[:, :, -1] + h
            if li < len(self.winh):
                self.winh[li][:, :, -1] = stream
        m = self.model
        hidden = F.relu(torch.addmm(m.out1.bias, F.relu(stream), self.head1))
        out = torch.addmm(m.out2.bias, hidden, self.head2)  # (n, C*L), grouped by channel
        return out.view(n, m.config.in_channels, m.config.levels)
