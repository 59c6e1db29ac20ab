"""The causal layers the autoregressive models and the PixelVAE's decoder are built from.

Every masked convolution is a :class:`MaskedConv`: a weight, a bias and a fixed 0/1 mask of the
weight's shape (a buffer, not saved: checkpoints hold the plain ``weight`` and ``bias``), applied
as ``conv2d(x, weight * mask)``. The subclasses differ only in the mask they draw and the padding
that lines the kernel up with the output pixel.

Colour order. The hidden channels of a C-channel model are split into C contiguous groups (R, G,
B); :func:`centre_mask` lets output group j read, at the current pixel, input groups i < j (mask A,
the first layer: the current sub-pixel is still unknown) or i <= j (mask B, later layers). For a
grey image (C = 1) mask A shuts the centre tap and mask B opens it.

In the masks drawn below, ``1`` reads the input, ``0`` never does, and ``c`` is the centre tap,
channel-masked by :func:`centre_mask`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---- masks -----------------------------------------------------------------------------------------


# Masks are built on the CPU whatever the default device, then moved to the weight's: under
# ``torch.device("meta")`` (a skeleton model, service/entries.py) their integer arithmetic and
# comparisons would go through torch's Python meta functions, whose first call imports torch._dynamo
# (seconds at every server start) for tensors of a few thousand elements.
CPU = torch.device("cpu")


def channel_groups(n: int, groups: int) -> Tensor:
    """Group of each of n channels when split into ``groups`` contiguous blocks, shape (n,), on the CPU."""
    return torch.arange(n, device=CPU) * groups // n


def group_mask(out_groups: Tensor, in_groups: Tensor, *, include_own: bool) -> Tensor:
    """(out_ch, in_ch) 0/1 mask: output of group j may read input of group i if i < j, or i <= j
    with ``include_own`` (mask B)."""
    go, gi = out_groups.view(-1, 1), in_groups.view(1, -1)
    return ((gi <= go) if include_own else (gi < go)).float()


def centre_mask(out_ch: int, in_ch: int, groups: int, *, include_own: bool) -> Tensor:
    """(out_ch, in_ch) mask for the tap at the current pixel, channels split into ``groups`` blocks.

    Output group j may read input group i only if i < j (mask A: the first layer, which must not
    see the current sub-pixel) or i <= j (mask B: later layers, whose group-j features already
    exclude sub-pixel j of the current pixel).
    """
    return group_mask(channel_groups(out_ch, groups), channel_groups(in_ch, groups), include_own=include_own)


# ---- class conditioning ----------------------------------------------------------------------------


class ClassEmbedding(nn.Embedding):
    """``nn.Embedding``: a class label's learned bias, (n_classes, dim), N(0, 1) at the start, except on
    the meta device, where there are no values to draw (``normal_`` there would go through torch's
    Python meta functions, see CPU above)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


# ---- masked convolutions ---------------------------------------------------------------------------


class MaskedConv(nn.Module):
    """A conv2d with a fixed mask on its weight (out_ch, in_ch, kh, kw): ``conv2d(x, weight * mask)``.

    Initialised like ``nn.Conv2d`` (Kaiming-uniform weight), but with a zero bias.
    """

    def __init__(self, weight_shape: tuple[int, int, int, int], mask: Tensor) -> None:
        super().__init__()
        assert mask.shape == weight_shape, (mask.shape, weight_shape)
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0]))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.mask: Tensor
        self.register_buffer("mask", mask.to(self.weight.device), persistent=False)

    def masked_weight(self) -> Tensor:
        return self.weight * self.mask


class Conv1x1(MaskedConv):
    """Channel-masked 1x1 conv (mask B): output group j reads input groups <= j.

    The 1x1 kernel is the centre tap alone::

        c
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        mask = centre_mask(out_ch, in_ch, groups, include_own=True).view(out_ch, in_ch, 1, 1)
        super().__init__((out_ch, in_ch, 1, 1), mask)
        self.masked = groups > 1  # one group: the mask is all ones, skip the multiply

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.masked_weight() if self.masked else self.weight, self.bias)


class HorizontalConv(MaskedConv):
    """1 x k conv over the current row: columns j-k+1 .. j, the tap at j channel-masked.

    The kernel ends at the current pixel (the input is padded k-1 columns on the left only), so
    it holds no weight that the mask zeroes but the centre's channel mask; k = 3::

        1 1 c
    """

    def __init__(
        self, in_ch: int, out_ch: int, k: int, groups: int, *, include_own: bool, out_groups: Tensor | None = None
    ) -> None:
        """``out_groups``: each output channel's colour group (n,), if not contiguous blocks."""
        mask = torch.ones(out_ch, in_ch, 1, k, device=CPU)
        og = channel_groups(out_ch, groups) if out_groups is None else out_groups
        mask[:, :, 0, k - 1] = group_mask(og, channel_groups(in_ch, groups), include_own=include_own)
        super().__init__((out_ch, in_ch, 1, k), mask)
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (self.k - 1, 0, 0, 0))  # pad left only: output j sees columns <= j
        return F.conv2d(x, self.masked_weight(), self.bias)


class RowConv(HorizontalConv):
    """A :class:`HorizontalConv` whose outputs are ``n_gates`` blocks of ``per_gate`` channels (an
    LSTM's gates): output channel o takes the colour group of o mod per_gate, so the four gates of a
    hidden unit share its group. Same mask shape, k = 3::

        1 1 c
    """

    def __init__(self, in_ch: int, per_gate: int, n_gates: int, k: int, groups: int, *, include_own: bool) -> None:
        out_groups = channel_groups(per_gate, groups).repeat(n_gates)
        super().__init__(in_ch, per_gate * n_gates, k, groups, include_own=include_own, out_groups=out_groups)


class CausalConv2d(MaskedConv):
    """k x k conv (k odd) whose output at (i, j) reads only earlier sub-pixels: the rows above the
    centre in full, the centre row left of the centre, and the centre tap channel-masked (mask A with
    ``include_own=False``, the first layer; mask B otherwise). k = 5::

        1 1 1 1 1
        1 1 1 1 1
        1 1 c 0 0
        0 0 0 0 0
        0 0 0 0 0
    """

    def __init__(self, in_ch: int, out_ch: int, k: int, groups: int, *, include_own: bool = False) -> None:
        if k % 2 == 0:
            raise ValueError("a causal conv's kernel must be odd")
        mask = torch.zeros(out_ch, in_ch, k, k, device=CPU)
        mask[:, :, : k // 2] = 1.0
        mask[:, :, k // 2, : k // 2] = 1.0
        mask[:, :, k // 2, k // 2] = centre_mask(out_ch, in_ch, groups, include_own=include_own)
        super().__init__((out_ch, in_ch, k, k), mask)
        self.k = k

    def forward(self, x: Tensor, *, pad: bool = True) -> Tensor:
        """Same-size output with zero padding, or (``pad=False``) the valid part only (k-1 smaller)."""
        return F.conv2d(x, self.masked_weight(), self.bias, padding=self.k // 2 if pad else 0)


class VerticalConv(nn.Conv2d):
    """(k//2+1) x k conv whose output at row i sees rows i-k//2 .. i (current row included); an
    unmasked kernel, the rows below cut off rather than masked. k = 5::

        1 1 1 1 1
        1 1 1 1 1
        1 1 1 1 1   <- the current row, in full

    The vertical stack may see the whole current row because it only reaches the horizontal stack
    through :func:`shift_down`, which moves it one row down.
    """

    def __init__(self, in_ch: int, out_ch: int, k: int) -> None:
        super().__init__(in_ch, out_ch, (k // 2 + 1, k))
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        p = self.k // 2
        return super().forward(F.pad(x, (p, p, p, 0)))


def shift_down(x: Tensor) -> Tensor:
    """Move features one row down (row 0 becomes zeros): (B, C, H, W) -> (B, C, H, W)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


# ---- gated PixelCNN block --------------------------------------------------------------------------


def gate(x: Tensor) -> Tensor:
    """Gated activation tanh(a) * sigmoid(b) over the two channel halves."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedBlock(nn.Module):
    """One gated layer of both stacks (van den Oord et al. 2016), with a residual and a skip output
    on the horizontal stack: (v, h, labels) -> (v', h', skip), each (B, hidden, H, W).

    ``groups``: the image's channels C (colour order); ``first``: the input layer (mask A, no
    residual); ``n_classes``: a class embedding added to both stacks' pre-activations.
    """

    def __init__(
        self,
        in_ch: int,
        hidden: int,
        k: int,
        groups: int,
        *,
        first: bool,
        dropout: float = 0.0,
        n_classes: int | None = None,
    ) -> None:
        super().__init__()
        h, g = hidden, groups
        self.first = first
        self.v_conv = VerticalConv(in_ch, 2 * h, k)
        self.v_to_h = nn.Conv2d(2 * h, 2 * h, 1)
        # The 2h outputs are two halves (tanh, sigmoid); masks are built per half so that both
        # halves of channel c fall in the same colour group.
        self.h_conv_a = HorizontalConv(in_ch, h, k // 2 + 1, g, include_own=not first)
        self.h_conv_b = HorizontalConv(in_ch, h, k // 2 + 1, g, include_own=not first)
        self.h_res = Conv1x1(h, h, g)
        self.h_skip = Conv1x1(h, h, g)
        self.dropout = nn.Dropout(dropout)
        self.cond = ClassEmbedding(n_classes, 4 * h) if n_classes else None

    def forward(self, v: Tensor, hx: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        v_pre = self.v_conv(v)  # (B, 2h, H, W), rows <= i
        h_pre = torch.cat([self.h_conv_a(hx), self.h_conv_b(hx)], dim=1)
        h_pre = h_pre + self.v_to_h(shift_down(v_pre))  # only rows < i reach the horizontal stack
        if self.cond is not None and y is not None:
            cv, ch = self.cond(y)[:, :, None, None].chunk(2, dim=1)
            v_pre = v_pre + cv
            h_pre = h_pre + ch
        v_out = gate(v_pre)
        h_gated = self.dropout(gate(h_pre))
        skip = self.h_skip(h_gated)
        h_out = self.h_res(h_gated)
        if not self.first:
            h_out = h_out + hx
        return v_out, h_out, skip


# ---- Row LSTM layer --------------------------------------------------------------------------------


def lstm_cell(gates: Tensor, c_prev: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """LSTM update from pre-activations, 4h along ``dim`` = input, forget, output, cell candidate."""
    i, f, o, g = gates.chunk(4, dim=dim)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class RowLSTMLayer(nn.Module):
    """One Row LSTM layer (van den Oord et al. 2016): (B, in_ch, H, W) -> hidden states (B, hidden, H, W).

    At row i the gates add an input-to-state part, a causal :class:`RowConv` of width ``k_in`` along
    row i of the input, and a state-to-state part, a conv of odd width ``k_state`` along row i-1 of
    the hidden state. ``groups``: the image's channels C (colour order).
    """

    def __init__(
        self,
        in_ch: int,
        hidden: int,
        groups: int,
        *,
        k_in: int,
        k_state: int,
        first: bool,
        n_classes: int | None = None,
    ) -> None:
        super().__init__()
        h = hidden
        self.hidden = h
        if k_state % 2 == 0:
            raise ValueError("state_kernel must be odd (centred on the column above)")
        self.input_conv = RowConv(in_ch, h, 4, k_in, groups, include_own=not first)
        # The row above is entirely earlier than the current row: no mask needed.
        self.state_conv = nn.Conv1d(h, 4 * h, k_state, padding=k_state // 2, bias=False)
        # Mask A hides x[i-1, j] from h[i-1, j], so nothing in row i-1's states sees that row's last
        # pixel; the first layer therefore also reads the row above of its input directly.
        self.above_conv = nn.Conv2d(in_ch, 4 * h, (1, k_state), padding=(0, k_state // 2)) if first else None
        self.cond = ClassEmbedding(n_classes, 4 * h) if n_classes else None
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
