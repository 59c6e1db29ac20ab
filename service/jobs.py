"""The work a request asks of a worker, one class per operation (score, encode, sample).

Each task says what it carries (typed fields), how many images it counts for in the queue
(``size``), which tasks may share one pass (``batch_key``), how large a shared pass may grow
(``batch_cap``), and how a batch of tasks runs on the worker's model (``run``: one result per task,
in order). The worker (service/batching.py) forms the batches and settles the results; it never
looks inside a task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from models.base import RowCallback, SamplePart, StepCallback
from models.scoring.scorer import Scorer
from models.vae import VAE
from service import scoring

R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class PassLimits:
    """How large a worker's passes may grow."""

    max_batch_size: int  # images per forward pass of scoring and encoding
    max_sample_batch: int  # images per batched generation


@dataclass(frozen=True, kw_only=True)
class Runtime(PassLimits):
    """What a task runs on: the worker's scorer (its model and background), device and limits."""

    scorer: Scorer
    device: str
    between_steps: StepCallback | None = None  # between a generation's pixels (service/compute.py)


class Task(ABC, Generic[R]):
    """One request's work. ``cancelled`` (per task, given to :meth:`run`) turns True once the
    request's caller has gone."""

    op: ClassVar[str]  # the metrics' ``op`` label
    # A failed batch of several tasks runs each again alone, so only a culprit fails; a generation
    # has no input of its own to blame (and its streams have already reported rows): all fail.
    isolate_failures: ClassVar[bool] = True

    @property
    @abstractmethod
    def size(self) -> int:
        """Images queued for this task (what the queue limit counts)."""

    def batch_key(self) -> Hashable:
        """Tasks with equal keys may share a pass."""
        return (self.op,)

    def batch_cap(self, limits: PassLimits) -> int:
        """The most images a shared pass of such tasks may hold."""
        return limits.max_batch_size

    @classmethod
    @abstractmethod
    def run(cls, runtime: Runtime, tasks: list[Any], cancelled: list[Callable[[], bool]]) -> list[R]:
        """One pass over ``tasks`` (all of this class, equal keys): one result per task, in order."""


@dataclass(eq=False)
class ScoreTask(Task[dict[str, Tensor]]):
    """Score images x (B, C, H, W) levels (y: labels of a class-conditional model, or None)."""

    x: Tensor
    y: Tensor | None
    score_type: str
    heatmap: bool
    op: ClassVar[str] = "score"

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def batch_key(self) -> Hashable:
        return (self.op, self.score_type, self.heatmap, self.y is None)  # labelled and unlabelled never share

    @classmethod
    def run(
        cls, runtime: Runtime, tasks: list[ScoreTask], cancelled: list[Callable[[], bool]]
    ) -> list[dict[str, Tensor]]:
        """:func:`service.scoring.compute` over every task's images in chunks of max_batch_size;
        each task gets its rows back, on the CPU."""
        first = tasks[0]
        x = torch.cat([t.x for t in tasks]).to(runtime.device)
        y = None if first.y is None else torch.cat([t.y for t in tasks if t.y is not None]).to(runtime.device)
        total, step = x.shape[0], runtime.max_batch_size
        parts = []
        with torch.inference_mode():
            for s in range(0, total, step):
                yc = None if y is None else y[s : s + step]
                out = scoring.compute(
                    runtime.scorer, x[s : s + step], yc, score_type=first.score_type, heatmap=first.heatmap
                )
                parts.append({k: v.cpu() for k, v in out.items()})
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        for k, v in merged.items():
            assert v.shape[0] == total, f"{k}: {v.shape[0]} outputs for {total} images"
        return _split_rows(merged, [t.size for t in tasks])


@dataclass(eq=False)
class EncodeTask(Task[dict[str, Tensor]]):
    """A VAE's q(z|x) for images x (B, C, H, W) levels: ``mean`` and ``std``, each (B, latent_dim)."""

    x: Tensor
    op: ClassVar[str] = "encode"

    @property
    def size(self) -> int:
        return self.x.shape[0]

    @classmethod
    def run(
        cls, runtime: Runtime, tasks: list[EncodeTask], cancelled: list[Callable[[], bool]]
    ) -> list[dict[str, Tensor]]:
        model = runtime.scorer.model
        assert isinstance(model, VAE)
        x = torch.cat([t.x for t in tasks]).to(runtime.device)
        means, stds = [], []
        with torch.inference_mode():
            for s in range(0, x.shape[0], runtime.max_batch_size):
                m, sd = model.encode(x[s : s + runtime.max_batch_size])
                means.append(m.float().cpu())
                stds.append(sd.float().cpu())
        merged = {"mean": torch.cat(means), "std": torch.cat(stds)}
        assert merged["mean"].shape[0] == x.shape[0], f"{merged['mean'].shape[0]} codes for {x.shape[0]} images"
        return _split_rows(merged, [t.size for t in tasks])


@dataclass
class SampleResult:
    images: Tensor  # (n, C, H, W) integer levels, CPU
    log_prob: Tensor | None  # (n,) nats, CPU


@dataclass(eq=False)
class SampleTask(Task["SampleResult | None"]):
    """Draw n images with a seed, a temperature and a class label (or None); ``on_row(rows_done,
    images)`` reports progress from the worker's thread."""

    n: int
    seed: int
    temperature: float
    label: int | None
    on_row: RowCallback | None = None
    op: ClassVar[str] = "sample"
    isolate_failures: ClassVar[bool] = False

    @property
    def size(self) -> int:
        return self.n

    def batch_cap(self, limits: PassLimits) -> int:
        return limits.max_sample_batch

    @classmethod
    def run(
        cls, runtime: Runtime, tasks: list[SampleTask], cancelled: list[Callable[[], bool]]
    ) -> list[SampleResult | None]:
        """One batched generation for every task; each keeps its own seed, so its images are the
        ones it would get alone. A task cancelled on the way gets None (nobody waits for it)."""
        dev = runtime.device
        parts = [
            SamplePart(
                n=t.n,
                generator=torch.Generator(device=dev).manual_seed(t.seed),
                temperature=t.temperature,
                labels=None if t.label is None else torch.full((t.n,), t.label, dtype=torch.long, device=dev),
                cancelled=gone,
                on_row=t.on_row,
            )
            for t, gone in zip(tasks, cancelled, strict=True)
        ]
        with torch.inference_mode():
            outs = runtime.scorer.model.sample_parts(parts, between_steps=runtime.between_steps)
        results: list[SampleResult | None] = []
        for task, out in zip(tasks, outs, strict=True):
            if out is None:
                results.append(None)
                continue
            assert out.images.shape[0] == task.n, f"{out.images.shape[0]} samples for n={task.n}"
            log_prob = None if out.log_prob is None else out.log_prob.float().cpu()
            results.append(SampleResult(images=out.images.cpu(), log_prob=log_prob))
        return results


def _split_rows(merged: dict[str, Tensor], sizes: list[int]) -> list[dict[str, Tensor]]:
    """Per-task slices of batched outputs (each (sum(sizes), ...)), in task order."""
    return [
        dict(zip(merged, rows, strict=True)) for rows in zip(*(v.split(sizes) for v in merged.values()), strict=True)
    ]
