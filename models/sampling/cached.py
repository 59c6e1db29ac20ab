"""The driver shared by the cached (incremental) autoregressive samplers.

A cached sampler keeps each layer's state and computes only what a new sub-pixel changes; what it
keeps is the model's business (a :class:`Stepper`). This module owns the rest, once: the raster and
channel order, the draws (Gumbel-max from each part's own generator, in the reference order of
:meth:`models.base.AutoregressiveModel.sample_naive`, so a seed gives the same images alone or batched), the
exact log-probability of what was drawn, progress reports, and cancelled parts leaving the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Protocol

import torch
from torch import Tensor

from models.base import (
    SampleOutput,
    SamplePart,
    StepCallback,
    check_temperature,
    draw_categorical,
)
from models.likelihood import to_unit_range
from models.threads import torch_threads

logger = logging.getLogger(__name__)

LogitsHook = Callable[[int, int, int, Tensor], None]
"""``on_logits(i, j, c, logits)`` sees the (n, L) logits of every step (tests compare them with the
full forward pass)."""


class SampledModel(Protocol):
    """What :func:`run_parts` reads of an autoregressive model (models/base.py)."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def levels(self) -> int: ...

    @property
    def n_classes(self) -> int | None: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def training(self) -> bool: ...

    def check_labels(self, n: int, y: Tensor | None) -> None: ...


class MaskedConv(Protocol):
    """A conv whose effective weight is ``weight * mask``, weight (out_ch, in_ch, kh, kw)."""

    @property
    def weight(self) -> Tensor: ...

    @property
    def mask(self) -> Tensor: ...


def masked_matrix(conv: MaskedConv) -> Tensor:
    """A masked conv's weight as a matrix (in_ch*kh*kw, out_ch) for one output position.

    A window of the input flattened in (channel, row, column) order times this matrix is the conv's
    output at that position (without the bias).
    """
    w = conv.weight * conv.mask
    return w.reshape(w.shape[0], -1).t().contiguous()


def column_matrix(conv: MaskedConv) -> Tensor:
    """A 1 x k masked conv's weight as a matrix (k*in_ch, out_ch), rows in (column, channel) order:
    a channels-last window (n, k, in_ch) flattened times this matrix is the conv's output."""
    w = (conv.weight * conv.mask)[:, :, 0]  # (out, in, k)
    return w.permute(2, 1, 0).reshape(-1, w.shape[0]).contiguous()


def shift_columns(*buffers: Tensor) -> None:
    """Move channels-last column buffers (layers, n, k, channels) on by one pixel, in place: every
    column one to the left, the last (the new pixel's) zero. The tensors keep their addresses."""
    for cols in buffers:
        cols[:, :, :-1] = cols[:, :, 1:].clone()
        cols[:, :, -1] = 0


def capture_cuda_graph(step: Callable[[], Tensor], state: list[Tensor]) -> tuple[Callable[[], None], Tensor]:
    """Record ``step`` (CUDA work on buffers that keep their addresses) as a CUDA graph.

    Returns ``(replay, out)``: each ``replay()`` runs the recorded kernels again and leaves the
    result in ``out`` (valid until the next replay). ``step`` runs twice on a side stream first
    (cuBLAS handles, workspaces); the tensors in ``state``, which it may change, are restored
    afterwards. The capture only restricts this thread, so other workers on the device go on.
    """
    device = state[0].device
    saved = [t.clone() for t in state]
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = step()
    finally:
        for t, s in zip(state, saved, strict=True):
            t.copy_(s)
    return graph.replay, out


class StepGraphs:
    """A stepper's pixel step as CUDA graphs, one per variant (``key``), each captured on first use.

    If a capture fails (an operation this torch build cannot capture, say), the stepper runs the
    step eagerly from then on, with a warning: the images are the same either way, only slower.
    """

    def __init__(self) -> None:
        self.graphs: dict[Hashable, tuple[Callable[[], None], Tensor]] = {}
        self.failed = False

    def run(self, key: Hashable, step: Callable[[], Tensor], state: list[Tensor]) -> Tensor:
        """``step()``'s result, by replaying its graph; ``state``: the tensors ``step`` changes."""
        if self.failed:
            return step()
        if key not in self.graphs:
            try:
                self.graphs[key] = capture_cuda_graph(step, state)
            except RuntimeError:
                logger.warning("CUDA graph capture failed; sampling without graphs", exc_info=True)
                self.failed = True
                return step()
        replay, out = self.graphs[key]
        replay()
        return out

    def reset(self) -> None:
        """The buffers moved (the batch shrank): capture again on next use."""
        self.graphs = {}


class Stepper(Protocol):
    """A model's cached state for one batched generation of n images."""

    def logits(self, i: int, j: int) -> Tensor:
        """Logits (n, C, L) at pixel (i, j) given every sub-pixel put so far."""
        ...

    def put(self, i: int, j: int, c: int, value: Tensor) -> None:
        """Sub-pixel (c, i, j) was drawn: ``value`` (n,) in the network's input units ([-1, 1])."""
        ...

    def end_row(self, i: int, threads: int) -> None:
        """Row i is complete: update whatever the next row reads (on up to ``threads`` threads:
        :func:`models.threads.split_batch`)."""
        ...

    def select(self, idx: Tensor) -> None:
        """Keep only the batch rows ``idx`` (cancelled parts left)."""
        ...


# Threads a CPU generation runs on (None: the caller's torch.get_num_threads()). Its steps are tiny
# matrix products ((n, a few hundred) by (a few hundred, 2h) for a PixelCNN pixel), which a second
# OpenMP thread cannot speed up but can stall: each op waits at a barrier for a helper that, on a
# machine busy with other work, may have lost its core (docs/sampling.md, "Threads").
CPU_THREADS: int | None = 1

# Threads a CPU generation's row steps split its images over (None: the caller's torch count). A
# row step is a few large products over a whole image row (the PixelCNN's vertical stack: about 250
# MFLOP per layer for 16 images), which more cores do speed up; each thread takes a contiguous share
# of the images through the whole row step, one hand-off per row rather than OpenMP's barrier per
# operation, which a busy machine turns into a wait for a core at every one (docs/sampling.md).
ROW_THREADS: int | None = None


def _report_row(
    parts: list[SamplePart], active: list[int], rows_done: int, x: Tensor, dev: torch.device
) -> tuple[Tensor, list[int]]:
    """After a row: report progress to the parts still in the batch and let the cancelled ones
    leave. Returns the batch rows to keep and the parts that stay, in row order."""
    keep, start, still = [], 0, []
    for k in active:
        part = parts[k]
        rows = slice(start, start + part.n)
        start += part.n
        if part.cancelled is not None and part.cancelled():
            continue
        if part.on_row is not None:
            part.on_row(rows_done, x[rows])
        keep.append(torch.arange(rows.start, rows.stop, device=dev))
        still.append(k)
    return (torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long, device=dev)), still


@torch.no_grad()
def run_parts(
    model: SampledModel,
    parts: list[SamplePart],
    make_stepper: Callable[[int, Tensor | None], Stepper],
    *,
    on_logits: LogitsHook | None = None,
    between_steps: StepCallback | None = None,
) -> list[SampleOutput | None]:
    """Sample every part as one batch; a cancelled part's result is None.

    ``make_stepper(n, labels)`` builds the model's cached state for n images (labels (n,) or None).
    A cancelled part leaves the batch after the row in progress; the rest go on with smaller tensors.
    ``between_steps()`` runs after every pixel (all its sub-pixels drawn): a caller that shares
    the thread can run other work there without changing the images. On CPU the generation runs
    on :data:`CPU_THREADS` threads, ``between_steps`` included (a caller that runs other work
    there restores its own count for it, if it needs it: :func:`torch_threads`), but the row steps
    split over :data:`ROW_THREADS` threads (by default the caller's count).
    """
    cpu = model.device.type == "cpu"
    row_threads = (ROW_THREADS or torch.get_num_threads()) if cpu else 1
    with torch_threads(CPU_THREADS if cpu else None):
        return _run_parts(
            model, parts, make_stepper, on_logits=on_logits, between_steps=between_steps, row_threads=row_threads
        )


def _run_parts(
    model: SampledModel,
    parts: list[SamplePart],
    make_stepper: Callable[[int, Tensor | None], Stepper],
    *,
    on_logits: LogitsHook | None,
    between_steps: StepCallback | None,
    row_threads: int,
) -> list[SampleOutput | None]:
    for part in parts:
        check_temperature(part.temperature)
        model.check_labels(part.n, part.labels)
    ch, height, width = model.shape
    levels = model.levels
    dev = model.device
    n = sum(p.n for p in parts)
    labels = torch.cat([p.labels.to(dev) for p in parts]) if model.n_classes is not None else None  # type: ignore[union-attr]
    stepper = make_stepper(n, labels)
    temps = torch.cat([torch.full((p.n, 1), float(p.temperature), device=dev) for p in parts])
    active = list(range(len(parts)))  # parts still in the batch, in row order
    x = torch.zeros(n, ch, height, width, dtype=torch.long, device=dev)
    logp = torch.zeros(n, device=dev)
    results: list[SampleOutput | None] = [None] * len(parts)

    for i in range(height):
        for j in range(width):
            for c in range(ch):
                logits = stepper.logits(i, j)[:, c]  # (n, L)
                if on_logits is not None:
                    on_logits(i, j, c, logits)
                u = torch.cat(
                    [torch.rand((parts[k].n, levels), generator=parts[k].generator, device=dev) for k in active]
                )
                v, lp = draw_categorical(logits, temps, None, u=u)
                x[:, c, i, j] = v
                stepper.put(i, j, c, to_unit_range(v, levels))
                logp += lp
            if between_steps is not None:
                between_steps()
        stepper.end_row(i, row_threads)
        keep, still = _report_row(parts, active, i + 1, x, dev)
        if len(still) < len(active):
            if not still:
                return results
            x, logp, temps = x[keep], logp[keep], temps[keep]
            stepper.select(keep)
            active = still
    start = 0
    for k in active:
        rows = slice(start, start + parts[k].n)
        start += parts[k].n
        results[k] = SampleOutput(images=x[rows].to(torch.uint8), log_prob=logp[rows])
    return results
