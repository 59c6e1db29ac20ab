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

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from models.base import RowCallback, SampleOutput, SamplePart, draw_categorical
from models.likelihood import to_unit_range
from models.pixelcnn import Conv1x1, GatedBlock, HorizontalConv, PixelCNN


def _dense(conv: HorizontalConv | Conv1x1) -> Tensor:
    """A masked conv's weight as a matrix (in_ch * k, out_ch) for one output position."""
    w = conv.weight * conv.mask if not isinstance(conv, Conv1x1) or conv.masked else conv.weight
    return w.reshape(w.shape[0], -1).t().contiguous()


class _Layer:
    """Matrices of one gated block, prepared once per sampling call."""

    def __init__(self, block: GatedBlock, y: Tensor | None) -> None:
        self.block = block
        self.first = block.first
        self.kw = block.h_conv_a.k
        # Both gate halves in one product: (in_ch * kw, 2h), then res and skip in another: (h, 2h).
        self.h_w = torch.cat([_dense(block.h_conv_a), _dense(block.h_conv_b)], dim=1)
        self.h_b = torch.cat([block.h_conv_a.bias, block.h_conv_b.bias])
        self.out_w = torch.cat([_dense(block.h_res), _dense(block.h_skip)], dim=1)
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
    on_logits: Callable[[int, int, int, Tensor], None] | None = None,
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
    on_logits: Callable[[int, int, int, Tensor], None] | None = None,
) -> list[SampleOutput | None]:
    """Sample several parts (e.g. requests) as one batch; see :class:`SamplePart`.

    Each part's rows draw their uniforms from the part's own generator in the reference order, so
    its images do not depend on the rest of the batch. A cancelled part leaves the batch after the
    row in progress, and the remaining parts go on with smaller tensors.
    """
    for part in parts:
        if part.temperature <= 0:
            raise ValueError("temperature must be positive")
        model.check_labels(part.n, part.labels)
    if model.training and model.config.dropout > 0:
        raise RuntimeError("call model.eval() before sampling (dropout would change the draws)")
    cfg = model.config
    ch, height, width, levels = cfg.in_channels, cfg.height, cfg.width, cfg.levels
    hid = cfg.hidden
    dev = model.device
    dtype = model.out1.weight.dtype
    active = list(range(len(parts)))  # parts still in the batch, in row order
    n = sum(p.n for p in parts)
    labels = torch.cat([p.labels.to(dev) for p in parts]) if model.n_classes is not None else None  # type: ignore[union-attr]
    layers = [_Layer(cast(GatedBlock, b), labels) for b in model.blocks]
    head1, head2 = _dense(model.out1), _dense(model.out2)
    temps = torch.cat([torch.full((p.n, 1), float(p.temperature), device=dev) for p in parts])

    x = torch.zeros(n, ch, height, width, dtype=torch.long, device=dev)  # the images being drawn
    xin = torch.zeros(n, ch, height, width, dtype=dtype, device=dev)  # the same in [-1, 1] units
    # Horizontal activations of the current row, per layer, left-padded for the causal window:
    # hrow[0] is the image row (network input); hrow[l + 1] is layer l's output.
    pad = max(layer.kw for layer in layers) - 1
    hrow = [torch.zeros(n, ch, width + pad, dtype=dtype, device=dev)]
    hrow += [torch.zeros(n, hid, width + pad, dtype=dtype, device=dev) for _ in layers]
    # Vertical outputs of every row so far (the next row step reads the last k//2+1 rows), per layer.
    vouts = [torch.zeros(n, hid, height, width, dtype=dtype, device=dev) for _ in layers]
    # links[l]: v_to_h of layer l's vertical pre-activation one row up, (n, 2h, W): row 0 sees zeros.
    links = [
        layer.block.v_to_h(torch.zeros(n, 2 * hid, 1, width, dtype=dtype, device=dev))[:, :, 0] for layer in layers
    ]
    logp = torch.zeros(n, device=dev)
    results: list[SampleOutput | None] = [None] * len(parts)

    for i in range(height):
        for j in range(width):
            for c in range(ch):
                logits = _pixel_step(model, layers, hrow, links, head1, head2, j, pad)  # (n, C, L)
                if on_logits is not None:
                    on_logits(i, j, c, logits[:, c])
                u = torch.cat(
                    [torch.rand((parts[k].n, levels), generator=parts[k].generator, device=dev) for k in active]
                )
                v, lp = draw_categorical(logits[:, c], temps, None, u=u)
                x[:, c, i, j] = v
                val = to_unit_range(v, levels).to(dtype)
                xin[:, c, i, j] = val
                hrow[0][:, c, pad + j] = val
                logp += lp
        _row_step(layers, xin, vouts, links, i)
        for h in hrow:
            h.zero_()
        # Report progress and let cancelled parts leave the batch.
        keep, start, still = [], 0, []
        for k in active:
            rows = slice(start, start + parts[k].n)
            start += parts[k].n
            part = parts[k]
            if part.cancelled is not None and part.cancelled():
                continue
            if part.on_row is not None:
                part.on_row(i + 1, x[rows])
            keep.append(torch.arange(rows.start, rows.stop, device=dev))
            still.append(k)
        if len(still) < len(active):
            if not still:
                return results
            idx = torch.cat(keep)
            x, xin, logp, temps = x[idx], xin[idx], logp[idx], temps[idx]
            hrow = [h[idx] for h in hrow]
            vouts = [v[idx] for v in vouts]
            links = [lk[idx] for lk in links]
            for layer in layers:
                layer.select(idx)
            active = still
    start = 0
    for k in active:
        rows = slice(start, start + parts[k].n)
        start += parts[k].n
        results[k] = SampleOutput(images=x[rows].to(torch.uint8), log_prob=logp[rows])
    return results


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
