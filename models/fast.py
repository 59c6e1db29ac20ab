"""A loaded gated PixelCNN's forward pass as a few large matrix products, for inference.

:class:`FastPixelCNN` takes a :class:`~models.pixelcnn.PixelCNN` whose weights are loaded and
prepares, once, every layer's weights as matrices; its :meth:`~FastPixelCNN.logits` then computes
what :meth:`PixelCNN.logits` computes (the same weights, masks and zero padding; only the float
rounding differs, about 1e-6 relative) with fewer and larger operations, and fewer multiplications:

- Images are kept channels-last, (B, H, W, C): every 1x1 convolution is one matrix product over
  all B*H*W pixels, and the logits come out with the ``levels`` values of a sub-pixel adjacent,
  which is what the softmax reads.
- The vertical stack's (k//2+1) x k convolution and the horizontal stack's 1 x (k//2+1) one (the
  masked k x k and 1 x k kernels of the paper without their masked-out rows and columns, already in
  models/pixelcnn.py) become one matrix product each over an unfolded window (im2col) of the input,
  zero-padded as the convolutions pad: above and on both sides for the vertical stack, on the left
  for the horizontal one. A channel-masked centre tap (mask A, colour groups) is the weight times
  its mask, so no masked weight changes a result.
- Where a block reads 16 channels or more, its vertical convolution is computed by Winograd's
  F(4, k) along the rows instead (:class:`models.winograd.RowWinograd`: 2(k//2+1) products of K = C
  per output column where the unfolded window takes k(k//2+1), 0.4 of the multiplications at k = 5;
  F(2, 7) for k = 7).
- The two gate halves of the horizontal convolution (``h_conv_a``, ``h_conv_b``) are one product
  with 2h outputs, and so are the residual and skip 1x1 convolutions (``h_res``, ``h_skip``).
- ``v_to_h`` applied to the vertical pre-activation shifted one row down is the product of the
  unshifted pre-activation, added one row down (row 0 gets the bias alone, as the zero row the
  shift brings in gives it).

A batch of several images is shared out by images over the caller's torch threads, and each
thread's share goes through the pass a few images at a time (:meth:`FastPixelCNN.pixel_log_prob`,
``CHUNK_BYTES``). ``bench/fast_forward.py`` measures each part against the
masked convolutions; ``bench/fast_check.py`` compares the log-likelihoods over a whole test set.

Weights are copied when the fast model is built: it does not follow later changes to the module's
parameters: ``PixelCNN.prepare_for_inference`` builds it after loading (on CPU), and the model uses
it only in eval mode without gradients, so training never does.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import Conv1x1, GatedBlock
from models.likelihood import to_unit_range
from models.threads import split_batch, torch_threads
from models.winograd import RowWinograd, winograd_pays

# A thread's share of a batch goes through the pass a few images at a time: the images whose logits
# (4 x H x W x C x levels bytes each, 0.8 MB for a 28x28 grey image at 256 levels; the pass's largest
# tensors) fill about this many bytes. On the 2-core machine behind docs/serving.md a batch of 32 (two
# shares of 16) ran 1.34x faster in chunks of 2 than whole, chunks of 1 and 4 in between
# (bench/fast_forward.py --chunks; docs/serving/fast-forward-chunks-session22.txt).
CHUNK_BYTES = 2 << 20


class GatedPixelCNN(Protocol):
    """What :class:`FastPixelCNN` reads of a :class:`~models.pixelcnn.PixelCNN` (no import back)."""

    config: Any
    blocks: nn.ModuleList
    out1: Conv1x1
    out2: Conv1x1


def _matrix(weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """A 1x1 conv weight (out, in, 1, 1), masked, as a matrix (in, out)."""
    w = weight if mask is None else weight * mask
    return w.detach().reshape(w.shape[0], -1).t().contiguous()


def _row_matrices(weight: Tensor, mask: Tensor | None = None) -> list[Tensor]:
    """A conv weight (out, in, kh, kw), masked, as one matrix (kw*in, out) per kernel row, for a
    row of windows unfolded by :func:`unfold_row` ((column, channel) order)."""
    w = (weight if mask is None else weight * mask).detach()
    return [w[:, :, r].permute(0, 2, 1).reshape(w.shape[0], -1).t().contiguous() for r in range(w.shape[2])]


def unfold_row(x: Tensor, kw: int, *, left: int, right: int, top: int = 0) -> Tensor:
    """Each pixel's 1 x kw window of x (H, B, W, C) along its row, zero-padded by ``left`` and
    ``right`` columns and by ``top`` zero rows above: (top+H, B, W, kw*C) in (column, channel) order."""
    width = x.shape[2]
    xp = F.pad(x, (0, 0, left, right, 0, 0, top, 0))
    return torch.cat([xp[:, :, t : t + width] for t in range(kw)], dim=-1)


class _FastBlock:
    """One gated block's weights as matrices; its activations are (H, B, W, C), flattened to (H*B*W, C)
    where a matrix product reads them, so that row i of every image is one contiguous slice."""

    def __init__(self, block: GatedBlock | nn.Module, *, winograd: bool = True) -> None:
        assert isinstance(block, GatedBlock)
        self.first = block.first
        vc = block.v_conv
        self.v_k = vc.k  # (k//2+1) x k window, centred on the column, ending at the current row
        self.v_w = _row_matrices(vc.weight)  # k//2+1 matrices (k*in, 2h), the top row first
        assert vc.bias is not None and block.v_to_h.bias is not None  # nn.Conv2d's default: with a bias
        self.v_b = vc.bias.detach().clone()
        self.vh_w = _matrix(block.v_to_h.weight)  # (2h, 2h)
        self.h_kw = block.h_conv_a.k
        ha, hb = block.h_conv_a, block.h_conv_b
        (wa,), (wb,) = _row_matrices(ha.weight, ha.mask), _row_matrices(hb.weight, hb.mask)
        self.h_w = torch.cat([wa, wb], dim=1)  # (kw*in, 2h): both gate halves
        # The link's bias reaches every row (row 0 through the zero row the shift brings in).
        self.h_b = (torch.cat([ha.bias, hb.bias]) + block.v_to_h.bias).detach()
        res_w, skip_w = _matrix(block.h_res.weight, block.h_res.mask), _matrix(block.h_skip.weight, block.h_skip.mask)
        self.out_w = torch.cat([res_w, skip_w], dim=1)  # (h, 2h)
        self.out_b = torch.cat([block.h_res.bias, block.h_skip.bias]).detach()
        self.cond = None if block.cond is None else block.cond.weight.detach().clone()  # (classes, 4h)
        # The vertical convolution by Winograd's F(4, k) where that saves work (models/winograd.py). Its
        # transforms mix the columns of one row, all of which the vertical stack may read, so a logit
        # still never sees a later pixel, not even through rounding; the horizontal stack's would.
        pays = winograd and winograd_pays(vc.weight.shape[1], self.v_k)
        self.v_wino = RowWinograd(self.v_w, self.v_b, r=self.v_k, left=self.v_k // 2) if pays else None

    def __call__(self, v: Tensor, hx: Tensor, y: Tensor | None, skip: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """v, hx: (H, B, W, in); skip: (H*B*W, h) or None. Returns v_out, h_out (H, B, W, h) and skip."""
        height, b, width, _ = v.shape
        row = b * width  # one image row of every image: the stride of a row in the flat activations
        m = height * row
        p = self.v_k // 2
        # Vertical stack: kernel row r reads the input row i-p+r; rows above the image are zeros.
        if self.v_wino is not None:
            v_pre = self.v_wino(v)
        else:
            win = unfold_row(v, self.v_k, left=p, right=p, top=p).view((height + p) * row, -1)
            v_pre = torch.addmm(self.v_b, win[:m], self.v_w[0])
            for r in range(1, p + 1):
                v_pre.addmm_(win[r * row : r * row + m], self.v_w[r])
        # Horizontal stack: columns j-kw+1..j of its own row, plus v_to_h of the vertical stack's
        # row i-1 (its shift_down), added in place.
        h_pre = torch.addmm(self.h_b, unfold_row(hx, self.h_kw, left=self.h_kw - 1, right=0).view(m, -1), self.h_w)
        h_pre[row:].addmm_(v_pre[: m - row], self.vh_w)
        two_h = v_pre.shape[1]
        if self.cond is not None and y is not None:
            cv, ch = self.cond[y].chunk(2, dim=1)  # (B, 2h) each, the same at every pixel of an image
            v_pre = (v_pre.view(height, b, width, two_h) + cv[None, :, None]).view(m, two_h)
            h_pre = (h_pre.view(height, b, width, two_h) + ch[None, :, None]).view(m, two_h)
        h = two_h // 2
        v_out = torch.tanh(v_pre[:, :h]) * torch.sigmoid(v_pre[:, h:])
        h_gated = torch.tanh(h_pre[:, :h]) * torch.sigmoid(h_pre[:, h:])
        out = torch.addmm(self.out_b, h_gated, self.out_w)  # (M, 2h): residual, skip
        res, s = out[:, :h], out[:, h:]
        h_out = res if self.first else res + hx.view(m, h)
        skip = s.contiguous() if skip is None else skip.add_(s)
        return v_out.view(height, b, width, h), h_out.view(height, b, width, h), skip


class FastPixelCNN:
    """Inference-only logits of a loaded :class:`PixelCNN` (see the module docstring)."""

    def __init__(self, model: GatedPixelCNN, *, winograd: bool = True) -> None:
        cfg = model.config
        self.config = cfg
        with torch.no_grad():
            self.blocks = [_FastBlock(block, winograd=winograd) for block in model.blocks]
            self.w1, self.b1 = _matrix(model.out1.weight, model.out1.mask), model.out1.bias.detach().clone()
            self.w2, self.b2 = _matrix(model.out2.weight, model.out2.mask), model.out2.bias.detach().clone()
        self.dtype = model.out1.weight.dtype
        logit_bytes = 4 * cfg.height * cfg.width * cfg.in_channels * cfg.levels
        self.chunk = max(1, CHUNK_BYTES // logit_bytes)  # images per chunk of a share (see CHUNK_BYTES)

    def _logits(self, x: Tensor, y: Tensor | None) -> Tensor:
        """Logits (H, B, W, C, L) of images x (B, C, H, W) integer levels."""
        cfg = self.config
        b = x.shape[0]
        inp = to_unit_range(x, cfg.levels).to(self.dtype).permute(2, 0, 3, 1).contiguous()  # (H, B, W, C)
        v, hx = inp, inp
        skip: Tensor | None = None
        for block in self.blocks:
            v, hx, skip = block(v, hx, y, skip)
        assert skip is not None
        m = skip.shape[0]
        hidden = F.relu(torch.addmm(self.b1, F.relu(skip + hx.reshape(m, -1)), self.w1))
        out = torch.addmm(self.b2, hidden, self.w2)  # (M, C*L), grouped by channel
        return out.view(cfg.height, b, cfg.width, cfg.in_channels, cfg.levels)

    def logits(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Logits (B, C, L, H, W), as :meth:`PixelCNN.logits` returns them."""
        return self._logits(x, y).permute(1, 3, 4, 0, 2)

    def pixel_log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x_i | x_<i) in nats, (B, C, H, W): a softmax over the adjacent levels of each sub-pixel.

        A batch of at least as many images as the caller has torch threads (two or more) is shared
        out by images over them, each share computed on one thread
        (:func:`models.threads.split_batch`): no thread waits at an operation's barrier for another,
        and the small operations run side by side. Each share (and a one-thread caller's batch) goes
        through the pass :attr:`chunk` images at a time (``CHUNK_BYTES``). A smaller batch (many
        cores, few images) runs whole on all the threads, so that no core sits idle."""
        threads = torch.get_num_threads()
        if x.shape[0] < threads:
            return self._pixel_log_prob(x, y)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)

        def share(rows: slice) -> None:
            for start in range(rows.start, rows.stop, self.chunk):  # CHUNK_BYTES
                part = slice(start, min(start + self.chunk, rows.stop))
                out[part] = self._pixel_log_prob(x[part], None if y is None else y[part])

        if threads < 2:
            share(slice(0, x.shape[0]))
            return out
        with torch_threads(1):
            split_batch(share, x.shape[0], threads)
        return out

    def _pixel_log_prob(self, x: Tensor, y: Tensor | None) -> Tensor:
        logp = F.log_softmax(self._logits(x, y).float(), dim=-1)  # (H, B, W, C, L)
        idx = x.long().permute(2, 0, 3, 1).unsqueeze(-1)  # (H, B, W, C, 1)
        return logp.gather(-1, idx).squeeze(-1).permute(1, 3, 0, 2)
