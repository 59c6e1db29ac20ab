"""Row convolutions by Winograd's minimal filtering, for the fast PixelCNN pass (:mod:`models.fast`).

A convolution along image rows with a kernel r columns wide computes each output as r
multiply-adds per input channel. Winograd's F(m, r) (Lavin and Gray 2016, "Fast Algorithms for
Convolutional Neural Networks") computes m adjacent outputs from a tile of a = m + r - 1 inputs with
a products instead of m*r:

    y = A^T [(G g) * (B^T d)]        d: a inputs, g: r taps, y: m outputs

so over C input channels and N outputs a tile's work becomes a matrix products (one per point of
the transform) of inner size C instead of m of inner size r*C: for the PixelCNN's 5-wide vertical
kernel with m = 4, 8 products for 4 outputs where direct computation takes 20, 0.4 of the
multiplications.
The transforms B^T and A^T are a few additions per value, done here as one small matrix product
over all tiles each; the weights' transform G is done once, at load.

The matrices are derived exactly (rational arithmetic) from the interpolation points 0, +-1, +-2,
+-1/2 and infinity, the standard well-conditioned choice; in float32 a layer's outputs differ from
direct computation by about 1e-6 relative (tests/models/test_winograd.py; the whole-model check is
``bench/fast_check.py``).
"""

from __future__ import annotations

from fractions import Fraction
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

TILE = 4  # outputs per tile (m)
MIN_CHANNELS = 16  # fewer input channels (the first layer's 1 or 3): the direct products are already tiny
POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2))


def _solve(rows: list[list[Fraction]], rhs: list[Fraction]) -> list[Fraction]:
    """The exact solution of a consistent (possibly over-determined) linear system, by elimination."""
    n = len(rows[0])
    aug = [[*row, b] for row, b in zip(rows, rhs, strict=True)]
    pivots: list[int] = []
    r = 0
    for col in range(n):
        pivot = next((i for i in range(r, len(aug)) if aug[i][col] != 0), None)
        if pivot is None:
            continue
        aug[r], aug[pivot] = aug[pivot], aug[r]
        aug[r] = [v / aug[r][col] for v in aug[r]]
        for i in range(len(aug)):
            if i != r and aug[i][col] != 0:
                f = aug[i][col]
                aug[i] = [a - f * b for a, b in zip(aug[i], aug[r], strict=True)]
        pivots.append(col)
        r += 1
    if any(row[-1] != 0 for row in aug[r:]) or len(pivots) < n:
        raise ArithmeticError("no unique Winograd transform for these points")
    x = [Fraction(0)] * n
    for i, col in enumerate(pivots):
        x[col] = aug[i][-1]
    return x


@cache
def winograd_matrices(m: int, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """A^T (m, a), G (a, r), B^T (a, a) in float64 of F(m, r) for the correlation
    y_k = sum_s g_s d_(k+s), k < m, exact rationals rounded once (a = m + r - 1 <= 8)."""
    a = m + r - 1
    if not 2 <= a <= len(POINTS) + 1:
        raise ValueError(f"F({m}, {r}) needs {a - 1} finite points; this module has {len(POINTS)}")
    pts = POINTS[: a - 1]
    at = [[p**k for p in pts] + [Fraction(int(k == m - 1))] for k in range(m)]
    g = []
    for i, p in enumerate(pts):
        f = Fraction(1)
        for j, q in enumerate(pts):
            if j != i:
                f *= p - q
        g.append([p**s / f for s in range(r)])
    g.append([Fraction(int(s == r - 1)) for s in range(r)])
    # B^T is what makes sum_xi A^T[k, xi] G[xi, s] B^T[xi, u] = [u == k + s] for every k, s, u.
    rows, rhs = [], []
    for k in range(m):
        for s in range(r):
            for u in range(a):
                row = [Fraction(0)] * (a * a)
                for xi in range(a):
                    row[xi * a + u] = at[k][xi] * g[xi][s]
                rows.append(row)
                rhs.append(Fraction(int(u == k + s)))
    bt = _solve(rows, rhs)

    def t(v: list[list[Fraction]]) -> Tensor:
        return torch.tensor([[float(x) for x in row] for row in v], dtype=torch.float64)

    return t(at), t(g), t([bt[i * a : (i + 1) * a] for i in range(a)])


def tile_for(r: int) -> int:
    """Outputs per tile for a kernel r wide: TILE, or fewer where this module's points run out
    (F(2, 7) for a 7-wide kernel); 1 (no saving) beyond."""
    return max(1, min(TILE, len(POINTS) + 2 - r))


def winograd_pays(in_channels: int, r: int) -> bool:
    """Whether a row convolution over ``in_channels``, r columns wide, is computed by :class:`RowWinograd`."""
    return in_channels >= MIN_CHANNELS and r > 1 and tile_for(r) > 1


class RowWinograd:
    """A convolution over (H, B, W, C) activations whose kernel has ``kh`` rows ending at the output's
    row and ``r`` columns starting ``left`` columns left of it, zero-padded (rows above the image and
    columns outside it read zeros), computed by F(m, r) along the rows (m = :func:`tile_for` (r)).

    ``weights``: one (r*C, N) matrix per kernel row, top row first, rows of each in (column, channel)
    order, as :func:`models.fast._row_matrices` makes them; ``r`` the kernel's width. Calling it
    returns the (H*B*W, N) outputs plus ``bias`` (N,), row-major over (H, B, W) like the direct
    path's matrix products.
    """

    def __init__(self, weights: list[Tensor], bias: Tensor, *, r: int, left: int) -> None:
        self.kh, self.r, self.left = len(weights), r, left
        kc, self.n = weights[0].shape
        self.c = kc // r
        self.m = tile_for(r)
        at, g, bt = winograd_matrices(self.m, r)
        dtype = weights[0].dtype
        self.a = at.shape[1]
        self.at, self.bt = at.to(dtype), bt.to(dtype)
        # U[row]: (a, C, N), the transformed taps of every (input, output) channel pair
        self.u = [
            torch.einsum("xs,scn->xcn", g, w.double().view(self.r, self.c, self.n)).to(dtype).contiguous()
            for w in weights
        ]
        self.bias = bias

    def __call__(self, x: Tensor) -> Tensor:
        height, b, width, c = x.shape
        m_out = self.m
        tiles = -(-width // m_out)
        top = self.kh - 1
        right = m_out * tiles + self.r - 1 - self.left - width
        xp = F.pad(x, (0, 0, self.left, right, 0, 0, top, 0))  # (H+top, B, mT+r-1, C)
        windows = xp.unfold(2, self.a, m_out)  # (H+top, B, T, C, a): the a inputs of each tile
        d = windows.permute(4, 0, 1, 2, 3).reshape(self.a, -1)  # one copy: (a, (H+top)*B*T*C)
        v = (self.bt @ d).view(self.a, -1, c)  # (a, (H+top)*B*T, C): the input transform
        row = b * tiles
        m = height * row
        prod = torch.bmm(v[:, :m], self.u[0])  # kernel row 0 reads the row kh-1 above
        for i in range(1, self.kh):
            prod.baddbmm_(v[:, i * row : i * row + m], self.u[i])
        y = (self.at @ prod.view(self.a, -1)).view(m_out, height, b, tiles, self.n)  # the output transform
        out = torch.empty(height, b, tiles, m_out, self.n, dtype=y.dtype, device=y.device)
        torch.add(self.bias, y.permute(1, 2, 3, 0, 4), out=out)
        out = out.view(height, b, tiles * m_out, self.n)
        if tiles * m_out != width:
            out = out[:, :, :width].contiguous()
        return out.view(height * b * width, self.n)
