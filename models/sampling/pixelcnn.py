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
from models.sampling.cached import LogitsHook, SampledModel, StepGraphs, masked_matrix, next_column, run_parts


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
    """Matrices of one gated block, prepared once per sampling call."""

    def __init__(self, block: GatedBlock, y: Tensor | None) -> None:
        self.block = block
        self.first = block.first
        self.kw = block.h_conv_a.k
        # Both gate halves in one product: (in_ch * kw, 2h), then res and skip in another: (h, 2h).
        self.h_w = torch.cat([masked_matrix(block.h_conv_a), masked_matrix(block.h_conv_b)], dim=1)
        self.h_b = torch.cat([block.h_conv_a.bias, block.h_conv_b.bias])
        self.out_w = torch.cat([masked_matrix(block.h_res), masked_matrix(block.h_skip)], dim=1)
        self.out_b = torch.cat([block.h_res.bias, block.h_skip.bias])
        self.cond_v: Tensor | None = None
        self.cond_h: Tensor | None = None
        if block.cond is not None and y is not None:
            cv, ch = block.cond(y).chunk(2, dim=1)  # (n, 2h) each
            self.cond_v, self.cond_h = cv[:, :, None], ch

    def select(self, idx: Tensor) -> None:
        """Keep only the batch rows ``idx`` of the per-image conditioning."""
        if self.cond_v is not None and self.cond_h is not None:
            self.cond_v, self.cond_h = self.cond_v[idx], self.cond_h[idx]


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

    The horizontal stack's state is a window of kernel-width columns per layer, in buffers that
    keep their addresses for the whole generation: ``win0`` (n, C, kw0) holds the image columns
    the first layer reads (the last one is the pixel being drawn), ``winh[l]`` (n, hidden, kw)
    the columns of layer l's output that layer l+1 reads. A pixel step writes the current column
    of every window and returns the logits; moving to the next pixel shifts every window left by
    one column. With ``cuda_graphs`` (CUDA only) both are captured once as CUDA graphs and
    replayed at every step, so a step costs one launch instead of one per operation.
    """

    def __init__(self, model: PixelCNN, n: int, labels: Tensor | None, *, cuda_graphs: bool = False) -> None:
        cfg = model.config
        ch, height, width, hid = cfg.in_channels, cfg.height, cfg.width, cfg.hidden
        dev = model.device
        dtype = model.out1.weight.dtype
        self.model = model
        self.dtype = dtype
        self.layers = [_Layer(cast(GatedBlock, b), labels) for b in model.blocks]
        self.head1, self.head2 = masked_matrix(model.out1), masked_matrix(model.out2)
        self.xin = torch.zeros(n, ch, height, width, dtype=dtype, device=dev)  # the images in [-1, 1] units
        # Vertical outputs of every row so far (the next row step reads the last k//2+1 rows), per layer.
        self.vouts = [torch.zeros(n, hid, height, width, dtype=dtype, device=dev) for _ in self.layers]
        kws = {layer.kw for layer in self.layers[1:]}
        assert len(kws) <= 1, "every block after the first has the same kernel"
        kw = kws.pop() if kws else 1
        self.win0 = torch.zeros(n, ch, self.layers[0].kw, dtype=dtype, device=dev)
        self.winh = torch.zeros(len(self.layers) - 1, n, hid, kw, dtype=dtype, device=dev)
        # links[l]: v_to_h of layer l's vertical pre-activation one row up, (n, 2h, W): row 0 sees zeros.
        zeros = torch.zeros(n, 2 * hid, 1, width, dtype=dtype, device=dev)
        self.links = torch.stack([layer.block.v_to_h(zeros)[:, :, 0] for layer in self.layers])  # (layers, n, 2h, W)
        self.link_j = self.links[..., 0].clone()  # (layers, n, 2h): the current column's links
        self.pixel = (-1, -1)
        self.graphs = StepGraphs() if cuda_graphs else None  # one with the window shift, one without

    def logits(self, i: int, j: int) -> Tensor:
        shift = False
        if (i, j) != self.pixel:  # the first channel of a new pixel
            self.pixel = (i, j)
            self.link_j.copy_(self.links[..., j])
            shift = j > 0  # a new row starts from zeroed windows (end_row)
        if self.graphs is None:
            return self._step(shift)
        return self.graphs.run(shift, lambda: self._step(shift), [self.win0, self.winh])

    def put(self, i: int, j: int, c: int, value: Tensor) -> None:
        value = value.to(self.dtype)
        self.xin[:, c, i, j] = value
        self.win0[:, c, -1] = value

    def end_row(self, i: int) -> None:
        _row_step(self.layers, self.xin, self.vouts, self.links, i)
        self.win0.zero_()
        self.winh.zero_()

    def select(self, idx: Tensor) -> None:
        self.xin, self.win0, self.winh = self.xin[idx], self.win0[idx], self.winh[:, idx]
        self.vouts = [v[idx] for v in self.vouts]
        self.links, self.link_j = self.links[:, idx], self.link_j[:, idx]
        for layer in self.layers:
            layer.select(idx)
        if self.graphs is not None:
            self.graphs.reset()

    def _step(self, shift: bool) -> Tensor:
        """Shift the windows to a new pixel if ``shift``, then one pixel step: logits (n, C, L)."""
        if shift:
            next_column(self.win0, self.winh)
        return _pixel_step(self.model, self.layers, self.win0, self.winh, self.link_j, self.head1, self.head2)


def _pixel_step(
    model: PixelCNN,
    layers: list[_Layer],
    win0: Tensor,
    winh: Tensor,
    link_j: Tensor,
    head1: Tensor,
    head2: Tensor,
) -> Tensor:
    """The current column of every horizontal layer; writes it into the windows (``winh[l][..., -1]``
    for layer l's output) and returns the logits (n, C, L)."""
    n = win0.shape[0]
    skip: Tensor | None = None
    h_out = win0[:, :, -1]
    for li, layer in enumerate(layers):
        window = win0 if li == 0 else winh[li - 1]  # (n, in, kw): this layer's input, causal window
        pre = torch.addmm(layer.h_b, window.reshape(n, -1), layer.h_w) + link_j[li]
        if layer.cond_h is not None:
            pre = pre + layer.cond_h
        a, b = pre.chunk(2, dim=1)
        gated = torch.tanh(a) * torch.sigmoid(b)
        res, s = torch.addmm(layer.out_b, gated, layer.out_w).chunk(2, dim=1)
        h_out = res if layer.first else res + window[:, :, -1]
        if li < len(winh):
            winh[li][:, :, -1] = h_out
        skip = s if skip is None else skip + s
    assert skip is not None
    hidden = F.relu(torch.addmm(model.out1.bias, F.relu(skip + h_out), head1))
    out = torch.addmm(model.out2.bias, hidden, head2)  # (n, C*L), grouped by channel
    return out.view(n, model.config.in_channels, model.config.levels)


def _row_step(layers: list[_Layer], xin: Tensor, vouts: list[Tensor], links: Tensor, i: int) -> None:
    """Row i is complete: compute every layer's vertical output for row i and the links for row i+1."""
    below = xin
    for li, layer in enumerate(layers):
        conv = layer.block.v_conv
        p = conv.k // 2
        lo = max(0, i - p)
        strip = below[:, :, lo : i + 1]  # rows i-p..i that exist
        strip = F.pad(strip, (p, p, p - (i - lo), 0))  # zero rows above the image, as the full pass
        v_pre = F.conv2d(strip, conv.weight, conv.bias)  # (n, 2h, 1, W)
        links[li] = layer.block.v_to_h(v_pre)[:, :, 0]
        if layer.cond_v is not None:
            v_pre = v_pre + layer.cond_v[:, :, :, None]
        a, b = v_pre.chunk(2, dim=1)
        vouts[li][:, :, i] = (torch.tanh(a) * torch.sigmoid(b))[:, :, 0]
        below = vouts[li]
