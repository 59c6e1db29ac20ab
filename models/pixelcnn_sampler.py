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
logits agree with :meth:`PixelCNN.logits` to float rounding, and the draws consume the generator
exactly like the reference sampler (:meth:`AutoregressiveModel.sample_naive`): the same seed gives
the same images.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from models.base import RowCallback, SampleOutput, SamplePart
from models.cached_sampling import LogitsHook, masked_matrix, run_parts
from models.pixelcnn import GatedBlock, PixelCNN


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
) -> SampleOutput:
    """Draw n images (n, C, H, W) uint8 with their exact log-probability in nats (n,).

    Same contract and the same draws as the reference sampler, in O(1) network evaluations per
    sub-pixel instead of a full forward pass. ``on_logits(i, j, c, logits)`` sees the (n, L) logits
    of every step (tests compare them with the full forward pass).
    """
    part = SamplePart(n=n, generator=generator, temperature=temperature, labels=y, on_row=on_row)
    out = sample_parts_cached(model, [part], on_logits=on_logits)[0]
    assert out is not None  # a part without ``cancelled`` is never dropped
    return out


@torch.no_grad()
def sample_parts_cached(
    model: PixelCNN,
    parts: list[SamplePart],
    *,
    on_logits: LogitsHook | None = None,
) -> list[SampleOutput | None]:
    """Sample several parts (e.g. requests) as one batch; see :class:`SamplePart`.

    Each part's rows draw their uniforms from the part's own generator in the reference order, so
    its images do not depend on the rest of the batch. A cancelled part leaves the batch after the
    row in progress, and the remaining parts go on with smaller tensors.
    """
    if model.training and model.config.dropout > 0:
        raise RuntimeError("call model.eval() before sampling (dropout would change the draws)")
    return run_parts(model, parts, lambda n, labels: _PixelCNNStepper(model, n, labels), on_logits=on_logits)


class _PixelCNNStepper:
    """The gated PixelCNN's cached activations for n images (see the module docstring)."""

    def __init__(self, model: PixelCNN, n: int, labels: Tensor | None) -> None:
        cfg = model.config
        ch, height, width, hid = cfg.in_channels, cfg.height, cfg.width, cfg.hidden
        dev = model.device
        dtype = model.out1.weight.dtype
        self.model = model
        self.dtype = dtype
        self.layers = [_Layer(cast(GatedBlock, b), labels) for b in model.blocks]
        self.head1, self.head2 = masked_matrix(model.out1), masked_matrix(model.out2)
        self.xin = torch.zeros(n, ch, height, width, dtype=dtype, device=dev)  # the images in [-1, 1] units
        # Horizontal activations of the current row, per layer, left-padded for the causal window:
        # hrow[0] is the image row (network input); hrow[l + 1] is layer l's output.
        self.pad = max(layer.kw for layer in self.layers) - 1
        self.hrow = [torch.zeros(n, ch, width + self.pad, dtype=dtype, device=dev)]
        self.hrow += [torch.zeros(n, hid, width + self.pad, dtype=dtype, device=dev) for _ in self.layers]
        # Vertical outputs of every row so far (the next row step reads the last k//2+1 rows), per layer.
        self.vouts = [torch.zeros(n, hid, height, width, dtype=dtype, device=dev) for _ in self.layers]
        # links[l]: v_to_h of layer l's vertical pre-activation one row up, (n, 2h, W): row 0 sees zeros.
        zeros = torch.zeros(n, 2 * hid, 1, width, dtype=dtype, device=dev)
        self.links = [layer.block.v_to_h(zeros)[:, :, 0] for layer in self.layers]

    def logits(self, i: int, j: int) -> Tensor:
        return _pixel_step(self.model, self.layers, self.hrow, self.links, self.head1, self.head2, j, self.pad)

    def put(self, i: int, j: int, c: int, value: Tensor) -> None:
        value = value.to(self.dtype)
        self.xin[:, c, i, j] = value
        self.hrow[0][:, c, self.pad + j] = value

    def end_row(self, i: int) -> None:
        _row_step(self.layers, self.xin, self.vouts, self.links, i)
        for h in self.hrow:
            h.zero_()

    def select(self, idx: Tensor) -> None:
        self.xin = self.xin[idx]
        self.hrow = [h[idx] for h in self.hrow]
        self.vouts = [v[idx] for v in self.vouts]
        self.links = [lk[idx] for lk in self.links]
        for layer in self.layers:
            layer.select(idx)


def _pixel_step(
    model: PixelCNN,
    layers: list[_Layer],
    hrow: list[Tensor],
    links: list[Tensor],
    head1: Tensor,
    head2: Tensor,
    j: int,
    pad: int,
) -> Tensor:
    """Column j of every horizontal layer of the current row; returns logits (n, C, L)."""
    skip: Tensor | None = None
    col = pad + j
    h_out = hrow[0][:, :, col]
    for li, layer in enumerate(layers):
        below = hrow[li]
        window = below[:, :, col - layer.kw + 1 : col + 1].reshape(below.shape[0], -1)  # (n, in*kw)
        pre = torch.addmm(layer.h_b, window, layer.h_w) + links[li][:, :, j]
        if layer.cond_h is not None:
            pre = pre + layer.cond_h
        a, b = pre.chunk(2, dim=1)
        gated = torch.tanh(a) * torch.sigmoid(b)
        res, s = torch.addmm(layer.out_b, gated, layer.out_w).chunk(2, dim=1)
        h_out = res if layer.first else res + below[:, :, col]
        hrow[li + 1][:, :, col] = h_out
        skip = s if skip is None else skip + s
    assert skip is not None
    hidden = F.relu(torch.addmm(model.out1.bias, F.relu(skip + h_out), head1))
    out = torch.addmm(model.out2.bias, hidden, head2)  # (n, C*L), grouped by channel
    return out.view(out.shape[0], model.config.in_channels, model.config.levels)


def _row_step(layers: list[_Layer], xin: Tensor, vouts: list[Tensor], links: list[Tensor], i: int) -> None:
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
