"""Cached, incremental sampling for the gated PixelCNN.

After Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive Models": instead
of running the whole network once per sub-pixel (C*H*W full passes), keep every layer's activations
and compute only what a new sub-pixel changes.

- Vertical stack: its output at row i depends on rows <= i only and reaches the horizontal stack
  one row down. So once row i is complete, one *row step* computes every layer's vertical output
  for row i, and the links (``v_to_h``) that row i+1 will need.
- Horizontal stack: its output at (i, j) depends on columns <= j of row i of the layer below and on
  the link from row i-1. So each *pixel step* computes one column of every layer, from a cached
  window of kernel-width columns, as small matrix products.

Every quantity is the one the full network computes (same weights, masks and zero padding), so the
logits agree with :meth:`models.pixelcnn.PixelCNN.logits` to float rounding, and the draws consume the generator
exactly like the reference sampler (:meth:`models.base.AutoregressiveModel.sample_naive`): the same seed gives
the same images.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import RowCallback, SampleOutput, SamplePart, StepCallback
from models.layers import Conv1x1, GatedBlock
from models.sampling.cached import (
    LogitsHook,
    SampledModel,
    StepGraphs,
    column_matrix,
    masked_matrix,
    run_parts,
    shift_columns,
)
from models.threads import split_batch


class _Config(Protocol):
    in_channels: int
    height: int
    width: int
    levels: int
    hidden: int
    dropout: float


class PixelCNN(SampledModel, Protocol):
    """What the sampler reads of a gated PixelCNN (models/pixelcnn.py): its config, its
    :class:`GatedBlock` s and its 1x1 output head."""

    @property
    def config(self) -> _Config: ...

    @property
    def blocks(self) -> nn.ModuleList: ...

    @property
    def out1(self) -> Conv1x1: ...

    @property
    def out2(self) -> Conv1x1: ...


class _Layer:
    """Matrices of one gated block, prepared once per sampling call.

    One ``tanh`` serves both gate halves: sigmoid(b) = (1 + tanh(b/2)) / 2, so the sigmoid half's
    columns of the gate matrix and biases are halved and the 1/2 moves into the res and skip
    matrices, which then read ``t_a * (1 + t_b)`` (halving is exact in binary floating point).
    Those two matrices carry their bias as a last row, against a constant 1 after the gated values.
    """

    def __init__(self, block: GatedBlock, y: Tensor | None) -> None:
        self.block = block
        self.first = block.first
        self.kw = block.h_conv_a.k
        h = block.h_res.weight.shape[0]
        self.hidden = h
        w = block.h_res.weight
        self.half = torch.cat([torch.ones(h), torch.full((h,), 0.5)]).to(w.device, w.dtype)  # (2h,)
        self.h_w = torch.cat([column_matrix(block.h_conv_a), column_matrix(block.h_conv_b)], dim=1) * self.half
        self.res_w = torch.cat([0.5 * masked_matrix(block.h_res), block.h_res.bias[None]])  # (h+1, h)
        self.skip_w = torch.cat([0.5 * masked_matrix(block.h_skip), block.h_skip.bias[None]])  # (h+1, h)
        v_to_h = block.v_to_h.weight[:, :, 0, 0]  # (2h, 2h)
        self.link_w = (v_to_h * self.half[:, None]).t().contiguous()  # (2h, 2h), sigmoid half halved
        # What the horizontal pre-activation adds to the link at every pixel: both convs' biases,
        # the link's own, and the class embedding's share; (1 or n, 1, 2h).
        assert block.v_to_h.bias is not None
        bias = torch.cat([block.h_conv_a.bias, block.h_conv_b.bias]) + block.v_to_h.bias
        self.row_bias = (bias * self.half)[None, None]
        self.cond_v: Tensor | None = None
        if block.cond is not None and y is not None:
            cv, ch = block.cond(y).chunk(2, dim=1)  # (n, 2h) each
            self.cond_v = cv[:, :, None]
            self.row_bias = self.row_bias + (ch * self.half)[:, None]

    def select(self, idx: Tensor) -> None:
        """Keep only the batch rows ``idx`` of the per-image conditioning."""
        if self.cond_v is not None:
            self.cond_v, self.row_bias = self.cond_v[idx], self.row_bias[idx]


@torch.no_grad()
def sample_cached(
    model: PixelCNN,
    n: int,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    y: Tensor | None = None,
    on_row: RowCallback | None = None,
    on_logits: LogitsHook | None = None,
    cuda_graphs: bool = False,
) -> SampleOutput:
    """Draw n images (n, C, H, W) uint8 with their exact log-probability in nats (n,).

    Same contract and the same draws as the reference sampler, in O(1) network evaluations per
    sub-pixel instead of a full forward pass. ``on_logits(i, j, c, logits)`` sees the (n, L) logits
    of every step (tests compare them with the full forward pass).
    """
    part = SamplePart(n=n, generator=generator, temperature=temperature, labels=y, on_row=on_row)
    out = sample_parts_cached(model, [part], on_logits=on_logits, cuda_graphs=cuda_graphs)[0]
    assert out is not None  # a part without ``cancelled`` is never dropped
    return out


@torch.no_grad()
def sample_parts_cached(
    model: PixelCNN,
    parts: list[SamplePart],
    *,
    on_logits: LogitsHook | None = None,
    cuda_graphs: bool = False,
    between_steps: StepCallback | None = None,
) -> list[SampleOutput | None]:
    """Sample several parts (e.g. requests) as one batch; see :class:`SamplePart`.

    Each part's rows draw their uniforms from the part's own generator in the reference order, so
    its images do not depend on the rest of the batch. A cancelled part leaves the batch after the
    row in progress, and the remaining parts go on with smaller tensors. ``cuda_graphs`` (a model
    on a CUDA device only) replays each pixel step as a CUDA graph. ``between_steps`` runs after
    every pixel (see :func:`models.sampling.cached.run_parts`).
    """
    if model.training and model.config.dropout > 0:
        raise RuntimeError("call model.eval() before sampling (dropout would change the draws)")
    if cuda_graphs and model.device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, not {model.device}")

    def make(n: int, labels: Tensor | None) -> _PixelCNNStepper:
        return _PixelCNNStepper(model, n, labels, cuda_graphs=cuda_graphs)

    return run_parts(model, parts, make, on_logits=on_logits, between_steps=between_steps)


class _PixelCNNStepper:
    """The gated PixelCNN's cached activations for n images (see the module docstring).

    The horizontal stack's state is channels-last: ``xcols`` (n, P0, C) holds the image columns
    the first layer reads, ``hcols[l]`` (n, P, hidden) the columns of layer l's output that layer
    l+1 reads, each behind kernel-width - 1 zero columns of padding. A layer's window is a slice
    of kernel-width columns, flattened without a copy into one matrix product.

    On CPU the buffers hold the whole row (P = W + kw - 1) and the window for column j starts at
    column j: nothing moves between pixels, and a new row overwrites each column before it is
    read (the image's own not-yet-drawn sub-pixels meet zero weights). With ``cuda_graphs`` (CUDA
    only) the buffers are one window wide and keep their addresses for the whole generation: a
    new pixel shifts every window left by a column, and the step is captured once as a CUDA graph
    and replayed, a launch per step instead of one per operation.
    """

    def __init__(self, model: PixelCNN, n: int, labels: Tensor | None, *, cuda_graphs: bool = False) -> None:
        cfg = model.config
        ch, height, width, hid = cfg.in_channels, cfg.height, cfg.width, cfg.hidden
        dev, dtype = model.device, model.out1.weight.dtype
        self.model, self.dtype = model, dtype
        self.layers = [_Layer(cast(GatedBlock, b), labels) for b in model.blocks]
        kws = {layer.kw for layer in self.layers[1:]}
        assert len(kws) <= 1, "every block after the first has the same kernel"
        self.kw0, self.kw = self.layers[0].kw, (kws.pop() if kws else 1)
        self.graphs = StepGraphs() if cuda_graphs else None  # one with the window shift, one without
        span = 1 if cuda_graphs else width
        self.xcols = torch.zeros(n, span + self.kw0 - 1, ch, dtype=dtype, device=dev)
        self.hcols = torch.zeros(len(self.layers) - 1, n, span + self.kw - 1, hid, dtype=dtype, device=dev)
        self.h_last = torch.zeros(n, hid, dtype=dtype, device=dev)  # the last layer's output column
        # Each layer's gated values and a constant 1 (the res and skip biases' row), (n, layers, h+1).
        self.gated = torch.ones(n, len(self.layers), hid + 1, dtype=dtype, device=dev)
        self.skip_w = torch.cat([layer.skip_w for layer in self.layers])  # (layers*(h+1), h)
        self.head1, self.head2 = masked_matrix(model.out1), masked_matrix(model.out2)
        self.xin = torch.zeros(n, ch, height, width, dtype=dtype, device=dev)  # the images in [-1, 1] units
        # Vertical outputs of every row so far (the next row step reads the last k//2+1 rows), per layer;
        # each row is written before any row step reads it.
        self.vouts = [torch.empty(n, hid, height, width, dtype=dtype, device=dev) for _ in self.layers]
        # links[l]: what layer l's horizontal pre-activation adds at each column of the current row
        # (the row above's vertical stack through v_to_h, and every bias), (layers, n, W, 2h).
        self.links = torch.stack([layer.row_bias.expand(n, width, -1) for layer in self.layers]).contiguous()
        self.link_j = self.links[:, :, 0].clone()  # (layers, n, 2h): the current column's, for graphs
        self.pixel = (-1, -1)
        self._buffers_moved()

    def logits(self, i: int, j: int) -> Tensor:
        shift = False
        if (i, j) != self.pixel:  # the first channel of a new pixel
            self.pixel = (i, j)
            if self.graphs is not None:
                self.link_j.copy_(self.links[:, :, j])
                shift = j > 0  # a new row starts from zeroed windows (end_row)
        if self.graphs is None:
            return self._pixel_step(j)
        return self.graphs.run(shift, lambda: self._shift_step(shift), [self.xcols, self.hcols])

    def put(self, i: int, j: int, c: int, value: Tensor) -> None:
        value = value.to(self.dtype)
        self.xin[:, c, i, j] = value
        self.xcols[:, -1 if self.graphs is not None else j + self.kw0 - 1, c] = value

    def end_row(self, i: int, threads: int = 1) -> None:
        split_batch(lambda rows: self._row_step(i, rows), self.xin.shape[0], threads)
        if self.graphs is not None:
            self.xcols.zero_()
            self.hcols.zero_()

    def select(self, idx: Tensor) -> None:
        self.xin, self.xcols, self.hcols = self.xin[idx], self.xcols[idx], self.hcols[:, idx]
        self.h_last, self.gated = self.h_last[idx], self.gated[idx]
        self.vouts = [v[idx] for v in self.vouts]
        self.links, self.link_j = self.links[:, idx], self.link_j[:, idx]
        for layer in self.layers:
            layer.select(idx)
        self._buffers_moved()
        if self.graphs is not None:
            self.graphs.reset()

    def _buffers_moved(self) -> None:
        """(Re)make the views the pixel step reads and writes, for the buffers as they are now."""
        n, h = self.h_last.shape
        self.pre = torch.zeros(n, 2 * h, dtype=self.dtype, device=self.h_last.device)
        self.pre_a, self.pre_b = self.pre[:, :h], self.pre[:, h:]
        self.gated_views = [(self.gated[:, li], self.gated[:, li, :h]) for li in range(len(self.layers))]
        self.gated_flat = self.gated.view(n, -1)
        self.plans: dict[int, list[tuple[Tensor, Tensor, Tensor, Tensor | None]]] = {}

    def _plan(self, o: int, link: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
        """Per layer, for windows starting at column ``o`` and the links ``link`` (layers, n, 2h):
        its input window (n, kw * channels), a view of the buffer; its links (n, 2h); the column it
        writes its output to (n, hidden); and its input column for the residual (None: none)."""
        n, last = self.h_last.shape[0], len(self.layers) - 1
        plan: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []
        x_col: Tensor | None = None
        for li, layer in enumerate(self.layers):
            if li == 0:
                window = self.xcols[:, o : o + self.kw0].view(n, -1)  # a view, never a copy
            else:
                window = self.hcols[li - 1, :, o : o + self.kw].view(n, -1)
            out = self.h_last if li == last else self.hcols[li, :, o + self.kw - 1]
            plan.append((window, link[li], out, None if layer.first else x_col))
            x_col = out
        return plan

    def _shift_step(self, shift: bool) -> Tensor:
        """The CUDA-graph step: shift the one-window buffers to a new pixel if ``shift``, then step."""
        if shift:
            shift_columns(self.xcols[None], self.hcols)
        return self._pixel_step(0)

    def _pixel_step(self, o: int) -> Tensor:
        """The current column of every horizontal layer, the windows starting at column ``o``;
        writes each layer's output column into ``hcols`` and returns the logits (n, C, L)."""
        plan = self.plans.get(o)
        if plan is None:
            plan = self.plans[o] = self._plan(o, self.link_j if self.graphs is not None else self.links[:, :, o])
        for layer, (window, link, out, x_col), (g, g_h) in zip(self.layers, plan, self.gated_views, strict=True):
            torch.addmm(link, window, layer.h_w, out=self.pre).tanh_()
            torch.addcmul(self.pre_a, self.pre_a, self.pre_b, out=g_h)  # t_a * (1 + t_b)
            if x_col is None:
                torch.mm(g, layer.res_w, out=out)
            else:
                torch.addmm(x_col, g, layer.res_w, out=out)
        n = self.h_last.shape[0]
        skip = torch.addmm(self.h_last, self.gated_flat, self.skip_w).relu_()  # relu(skip + h)
        hidden = torch.addmm(self.model.out1.bias, skip, self.head1).relu_()
        logits = torch.addmm(self.model.out2.bias, hidden, self.head2)  # (n, C*L), grouped by channel
        return logits.view(n, self.model.config.in_channels, self.model.config.levels)

    def _row_step(self, i: int, rows: slice) -> None:
        """Row i is complete: every layer's vertical output for row i and the links for row i+1,
        for the images ``rows`` (:func:`models.threads.split_batch` shares them out)."""
        below = self.xin[rows]
        for li, layer in enumerate(self.layers):
            conv = layer.block.v_conv
            p = conv.k // 2
            lo = max(0, i - p)
            strip = F.pad(below[:, :, lo : i + 1], (p, p, p - (i - lo), 0))  # zero rows above the image
            v_pre = F.conv2d(strip, conv.weight, conv.bias)[:, :, 0]  # (n, 2h, W)
            bias = layer.row_bias if layer.row_bias.shape[0] == 1 else layer.row_bias[rows]
            torch.add(v_pre.transpose(1, 2) @ layer.link_w, bias, out=self.links[li, rows])  # (n, W, 2h)
            if layer.cond_v is not None:
                v_pre = v_pre + layer.cond_v[rows]
            a, b = v_pre.chunk(2, dim=1)
            self.vouts[li][rows, :, i] = torch.tanh(a) * torch.sigmoid(b)
            below = self.vouts[li][rows]
