"""An autoregressive model's exact per-sub-pixel log-likelihood through ``torch.compile``.

What it pays, measured on one H200 for the gated PixelCNN (docs/gpu.md, ``bench/compile_check.py``):
1.8x at one image and 2.5x at 256 over eager, within 4e-5 nats per dimension. A compiled graph is
built per input shape; :class:`CompiledLogProb` pads every batch up to a power of two (zeros, which
every model accepts; the padded rows are dropped), so a server that batches up to ``max_batch``
images compiles at most ``log2(max_batch) + 1`` graphs (per labelled and unlabelled call), all of
them at warm-up (``DensityModel.warmup_batch_sizes``).

It is built by ``AutoregressiveModel.prepare_for_inference(compile=True)`` and used only for
eval-mode passes without gradients: training never runs through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Graphs kept per compiled function before torch gives up and runs eager: the padded sizes of a
# batch of up to 1,024 images, with and without labels, fit in it.
RECOMPILE_LIMIT = 32


def padded_size(n: int) -> int:
    """The batch size a batch of n >= 1 images is padded to: the next power of two."""
    return 1 << (n - 1).bit_length()


def padded_sizes(max_batch: int) -> list[int]:
    """Every size a batch of 1 .. max_batch images is padded to, smallest first."""
    return sorted({padded_size(n) for n in range(1, max(1, max_batch) + 1)})


class CompiledLogProb:
    """``fn(x, y)`` -> (B, C, H, W) nats, compiled once per padded batch size (see the module docstring).

    ``fn`` is the model's eager per-sub-pixel log-likelihood; ``sizes_run`` records the padded batch
    sizes it has been called with (each one compiled a graph on its first call).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor | None], Tensor]) -> None:
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
        self.compiled = torch.compile(fn, dynamic=False)
        self.sizes_run: set[int] = set()

    def __call__(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        if b == 0:
            return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        size = padded_size(b)
        if size != b:
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, size - b))  # zero images: levels every model accepts
            y = None if y is None else F.pad(y, (0, size - b))  # class 0
        self.sizes_run.add(size)
        return self.compiled(x, y)[:b]
