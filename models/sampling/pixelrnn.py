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
from models.layers import Conv1x1, RowLSTMLayer
from models.sampling.cached import (
    LogitsHook,
    SampledModel,
    StepGraphs,
    column_matrix,
    masked_matrix,
    run_parts,
    shift_columns,
)


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
        self.w_in = column_matrix(layer.input_conv)  # (k_in*in, 4h), rows in (column, channel) order
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
    row (L, n, W, h), and the layer's input along the current row, channels-last behind k_in - 1
    zero columns: ``xcols`` (n, P, C) for the image, ``hcols[l]`` (n, P, h) for the residual
    stream layer l+1 reads. A layer's window is a slice of k_in columns, flattened without a copy
    into one matrix product. On CPU the buffers hold the whole row (P = W + k_in - 1), the window
    for column j starts at column j and nothing moves between pixels (a new row overwrites each
    column before it is read; the image's not-yet-drawn sub-pixels meet zero weights). With
    ``cuda_graphs`` they are one window wide and shift left by a column at each new pixel, the
    pixel step reads its column of ``row_pre`` and of the cell states from fixed buffers, and it
    is replayed as a CUDA graph (one launch instead of one per operation).
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
        self.k_in = k.pop()
        like = model.out1.weight
        span = 1 if cuda_graphs else width
        self.image = like.new_zeros(n, cfg.in_channels, cfg.height, cfg.width)  # drawn so far, [-1, 1] units
        self.xcols = like.new_zeros(n, span + self.k_in - 1, cfg.in_channels)
        self.hcols = like.new_zeros(n_layers - 1, n, span + self.k_in - 1, h)
        self.stream = like.new_zeros(n, h)  # the last layer's output column
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
        self._buffers_moved()

    def logits(self, i: int, j: int) -> Tensor:
        shift = False
        if (i, j) != self.pixel:  # the first channel of a new pixel
            self.pixel = (i, j)
            shift = j > 0  # a new row starts from zeroed windows (end_row)
            if self.graphs is not None:
                self.pre_j.copy_(self.row_pre[:, :, j])
                self.c_j.copy_(self.c_prev[:, :, j])
        if self.graphs is None:
            return self._step(j)
        state = [self.xcols, self.hcols, self.h_out, self.c_out]
        out = self.graphs.run(shift, lambda: self._shift_step(shift), state)
        self.h_cur[:, :, j], self.c_cur[:, :, j] = self.h_out, self.c_out
        return out

    def put(self, i: int, j: int, c: int, value: Tensor) -> None:
        value = value.to(self.dtype)
        self.image[:, c, i, j] = value
        self.xcols[:, -1 if self.graphs is not None else j + self.k_in - 1, c] = value

    def end_row(self, i: int, threads: int = 1) -> None:
        """Row i is complete (``threads`` unused: a Row LSTM's row step is one small product per layer)."""
        self.h_prev.copy_(self.h_cur)  # copied, not swapped: the pixel step's views stay valid
        self.c_prev.copy_(self.c_cur)
        self._start_row(self.image[:, :, i])
        if self.graphs is not None:
            self.xcols.zero_()
            self.hcols.zero_()

    def select(self, idx: Tensor) -> None:
        self.image, self.xcols, self.hcols = self.image[idx], self.xcols[idx], self.hcols[:, idx]
        self.h_prev, self.c_prev, self.stream = self.h_prev[:, idx], self.c_prev[:, idx], self.stream[idx]
        self.h_cur, self.c_cur, self.row_pre = self.h_cur[:, idx], self.c_cur[:, idx], self.row_pre[:, idx]
        for layer in self.layers:
            layer.select(idx)
        if self.graphs is not None:
            self.pre_j, self.c_j = self.pre_j[:, idx], self.c_j[:, idx]
            self.h_out, self.c_out = self.h_out[:, idx], self.c_out[:, idx]
            self.graphs.reset()
        self._buffers_moved()

    def _buffers_moved(self) -> None:
        """(Re)make the buffers and views the pixel step works in, for the batch as it is now."""
        n, h = self.stream.shape
        self.gates = self.stream.new_zeros(n, 4 * h)
        self.tanh_c = self.stream.new_zeros(n, h)
        self.sig, self.g = self.gates[:, : 3 * h], self.gates[:, 3 * h :]
        self.i_gate, self.f_gate, self.o_gate = (self.gates[:, k * h : (k + 1) * h] for k in range(3))
        self.plans: dict[int, list[tuple[Tensor, ...]]] = {}

    def _plan(self, o: int, j: int) -> list[tuple[Tensor, ...]]:
        """Per layer, for windows starting at column ``o`` and pixel column ``j``: its input window
        (n, k_in * channels), a view of the buffer; the state part of its gates (n, 4h), the cell
        state above (n, h), where its hidden and cell states go (n, h) each, and its output column
        (n, h), the residual stream."""
        n, last = self.stream.shape[0], len(self.layers) - 1
        graphs = self.graphs is not None
        plan: list[tuple[Tensor, ...]] = []
        for li in range(len(self.layers)):
            if li == 0:
                window = self.xcols[:, o : o + self.k_in].view(n, -1)  # a view, never a copy
            else:
                window = self.hcols[li - 1, :, o : o + self.k_in].view(n, -1)
            pre, c_above = (self.pre_j[li], self.c_j[li]) if graphs else (self.row_pre[li, :, j], self.c_prev[li, :, j])
            h_to, c_to = (self.h_out[li], self.c_out[li]) if graphs else (self.h_cur[li, :, j], self.c_cur[li, :, j])
            out = self.stream if li == last else self.hcols[li, :, o + self.k_in - 1]
            plan.append((window, pre, c_above, h_to, c_to, out))
        return plan

    def _start_row(self, image_row_above: Tensor) -> None:
        for li, layer in enumerate(self.layers):
            self.row_pre[li] = layer.row_pre(self.h_prev[li], image_row_above)

    def _shift_step(self, shift: bool) -> Tensor:
        """The CUDA-graph step: shift the one-window buffers to a new pixel if ``shift``, then step."""
        if shift:
            shift_columns(self.xcols[None], self.hcols)
        return self._step(0)

    def _step(self, j: int) -> Tensor:
        """Column j of every layer (windows at column 0 with CUDA graphs): the LSTM cell from the
        state part of its gates and the cell state above; writes the new hidden and cell states and
        the layer's output column, and returns the logits (n, C, L)."""
        o = 0 if self.graphs is not None else j
        plan = self.plans.get(o)
        if plan is None:
            plan = self.plans[o] = self._plan(o, j)
        x_col: Tensor | None = None  # the layer's input column, for the residual (none in the first)
        for layer, (window, pre, c_above, h_to, c_to, out) in zip(self.layers, plan, strict=True):
            torch.addmm(pre, window, layer.w_in, out=self.gates)  # gates i, f, o, g
            self.sig.sigmoid_()
            self.g.tanh_()
            torch.mul(self.f_gate, c_above, out=c_to)
            c_to.addcmul_(self.i_gate, self.g)  # c = f c_above + i g
            torch.tanh(c_to, out=self.tanh_c)
            torch.mul(self.o_gate, self.tanh_c, out=h_to)  # h = o tanh(c)
            if x_col is None:
                out.copy_(h_to)
            else:
                torch.add(x_col, h_to, out=out)
            x_col = out
        m = self.model
        hidden = torch.addmm(m.out1.bias, self.stream.relu(), self.head1).relu_()
        logits = torch.addmm(m.out2.bias, hidden, self.head2)  # (n, C*L), grouped by channel
        return logits.view(self.stream.shape[0], m.config.in_channels, m.config.levels)
