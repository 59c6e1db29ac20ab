"""The one interface every genserve model implements.

All likelihoods are log-probabilities in nats of the discrete image: ``x`` holds integer
sub-pixels in [0, levels-1] (uint8 for 8-bit images), shape (B, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from models.compiled import CompiledLogProb, padded_sizes
from models.likelihood import categorical_log_prob

# Sampling temperatures outside this range are refused. For the shipped autoregressive models every
# draw is already the most likely value at 1e-3 and nearly a uniform one at 1e3 (their samples' bits/dim
# barely change past either end); far beyond it float32 overflows (logits / T, or z * T for a VAE).
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e3


def check_temperature(temperature: float) -> None:
    """Raise ValueError unless MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE."""
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:  # also false for NaN
        raise ValueError(f"temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature!r}")


@dataclass
class SampleOutput:
    """Sampled images (B, C, H, W) as uint8, and their log-probability in nats (B,) where exact."""

    images: Tensor
    log_prob: Tensor | None


RowCallback = Callable[[int, Tensor], None]
"""Called during sampling as ``on_row(rows_done, images)`` with the partial (n, C, H, W) images;
raising from it stops the sampler (the exception propagates), which is how a caller cancels."""

StepCallback = Callable[[], None]
"""Called between two steps of a generation (``between_steps`` of ``sample_parts``): the caller may
run other work there; the images do not change."""


@dataclass
class SamplePart:
    """One caller's share of a batched generation (several requests sampled as one batch).

    Its images depend only on its own fields, never on the other parts of the batch: the uniform
    draws come from its own ``generator`` in the reference order, so a seed gives the same images
    alone or batched. ``cancelled`` is polled after every row; when it returns True the part's rows
    leave the batch and its result is None. ``on_row(rows_done, images)`` reports its progress.
    """

    n: int
    generator: torch.Generator | None = None
    temperature: float = 1.0
    labels: Tensor | None = None  # (n,) class indices for conditional models
    cancelled: Callable[[], bool] | None = None
    on_row: RowCallback | None = None


CachedSampler = Callable[..., "list[SampleOutput | None]"]
"""``sampler(model, parts, *, cuda_graphs, between_steps)``: an autoregressive model's batched sampler."""


class SamplingCancelled(Exception):
    """Raised inside a sampler when every part of its batch was cancelled."""


@dataclass
class TrainStep:
    """What one training step reports: the scalar loss to minimise and per-image NLL (nats, (B,))."""

    loss: Tensor
    nll: Tensor


class DensityModel(nn.Module):
    """Base class: a model of p(x) (or p(x|y)) over images with ``levels`` values per sub-pixel."""

    kind: ClassVar[str]  # "autoregressive" or "vae"
    architecture: ClassVar[str]  # registry key, e.g. "gated_pixelcnn"
    exact: ClassVar[bool]  # True where log_prob is exact, False where it is an estimate or bound
    # True where a forward pass is a Python loop of many small steps (a recurrence over rows): its
    # interpreter time then matters, and a server gives it a process of its own (GENSERVE_MODEL_PROCESS=auto)
    steps_in_python: ClassVar[bool] = False
    config: Any

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this model takes."""
        c = self.config
        return (c.in_channels, c.height, c.width)

    @property
    def levels(self) -> int:
        return int(self.config.levels)

    @property
    def n_classes(self) -> int | None:
        return getattr(self.config, "n_classes", None)

    @property
    def dims(self) -> int:
        c, h, w = self.shape
        return c * h * w

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare_for_inference(self, *, cuda_graphs: bool = False, compile: bool = False) -> None:
        """Change only how the model runs, where that is faster on its current device: memory layout,
        with ``cuda_graphs`` on a CUDA device, sampling steps replayed as CUDA graphs, and with
        ``compile``, the exact likelihood through ``torch.compile`` (models that have them; elsewhere
        both are ignored).

        Values stay equal up to float rounding. Call after moving the model; this default does nothing.
        """

    def warmup_batch_sizes(self, max_batch: int) -> list[int]:
        """The batch sizes a server should run once before it answers, so that no request pays for a
        lazy initialisation: one image, unless :meth:`prepare_for_inference` compiled one graph per
        batch size (then each size a batch of at most ``max_batch`` images is padded to)."""
        return [1]

    def check_input(self, x: Tensor, y: Tensor | None = None) -> None:
        """Raise ValueError unless x is (B, C, H, W) integers in range and y fits the model."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        if x.is_floating_point():
            raise ValueError("images must hold integer levels (e.g. uint8), not floats")
        # uint8 cannot leave [0, 255], so 8-bit models skip the (synchronising) range check.
        if x.numel() and not (x.dtype == torch.uint8 and self.levels >= 256):
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.levels:
                raise ValueError(f"image values must lie in [0, {self.levels - 1}] for this model, got [{lo}, {hi}]")
        self.check_labels(x.shape[0], y)

    def check_labels(self, n: int, y: Tensor | None) -> None:
        """Raise ValueError unless y is None for an unconditional model, or n class indices otherwise."""
        if self.n_classes is None:
            if y is not None:
                raise ValueError("this model is not class-conditional; do not pass labels")
            return
        if y is None:
            raise ValueError("this model is class-conditional; pass labels")
        if y.is_floating_point() or tuple(y.shape) != (n,):
            raise ValueError(f"labels must be {n} integer class indices, shape ({n},); got {y.dtype} {tuple(y.shape)}")
        if n and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise ValueError(f"labels must lie in [0, {self.n_classes - 1}], got [{int(y.min())}, {int(y.max())}]")

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The training objective (loss, per-image nll), so DistributedDataParallel can wrap it."""
        step = self.training_step(x, y)
        return step.loss, step.nll

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x) (or log p(x|y)) in nats, shape (B,)."""
        raise NotImplementedError

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        y: Tensor | None = None,
        on_row: RowCallback | None = None,
    ) -> SampleOutput:
        """Draw n images (n, C, H, W) uint8; ``on_row`` reports progress (see RowCallback).

        This default runs one part through :meth:`sample_parts`, a model's fastest sampler; a model
        implements one of the two (a VAE :meth:`sample`, an autoregressive model its samplers).
        """
        out = self.sample_parts([SamplePart(n, generator, temperature, y, on_row=on_row)])[0]
        assert out is not None  # a part without ``cancelled`` is never dropped
        return out

    def sample_parts(
        self, parts: list[SamplePart], *, between_steps: StepCallback | None = None
    ) -> list[SampleOutput | None]:
        """Sample several callers' parts; this default runs them one after another.

        Models with a batched sampler override it to run all parts as one batch. ``between_steps``
        is called between the steps of the generation (after every pixel of a batched
        autoregressive generation; after every row here), for the caller to run other work.
        """
        return self._parts_one_by_one(parts, self.sample, between_steps)

    @staticmethod
    def _parts_one_by_one(
        parts: list[SamplePart], sample: Callable[..., SampleOutput], between_steps: StepCallback | None = None
    ) -> list[SampleOutput | None]:
        """Each part through ``sample`` (the signature of :meth:`sample`); a cancelled part gives None."""
        results: list[SampleOutput | None] = []
        for part in parts:

            def report(rows: int, images: Tensor, part: SamplePart = part) -> None:
                if between_steps is not None:
                    between_steps()
                if part.cancelled is not None and part.cancelled():
                    raise SamplingCancelled
                if part.on_row is not None:
                    part.on_row(rows, images)

            try:
                results.append(
                    sample(part.n, generator=part.generator, temperature=part.temperature, y=part.labels, on_row=report)
                )
            except SamplingCancelled:
                results.append(None)
        return results

    def training_step(self, x: Tensor, y: Tensor | None = None) -> TrainStep:
        """Loss for one batch; ``nll`` is the per-image quantity reported as training bits/dim."""
        raise NotImplementedError


class AutoregressiveModel(DensityModel):
    """p(x) = prod_i p(x_i | x_<i) over sub-pixels in raster order, channels R before G before B.

    Subclasses implement :meth:`logits`; likelihoods, per-pixel maps and the naive sampling loop
    are written here once.
    """

    kind: ClassVar[str] = "autoregressive"
    exact: ClassVar[bool] = True
    # The model's cached (incremental) sampler, models/sampling/: all parts as one batched generation
    # in O(1) layer evaluations per sub-pixel. None: the reference sampler, part by part.
    cached_sampler: ClassVar[CachedSampler | None] = None
    sample_cuda_graphs: bool = False  # set by prepare_for_inference
    compiled_log_prob: CompiledLogProb | None = None  # set by prepare_for_inference(compile=True)

    def prepare_for_inference(self, *, cuda_graphs: bool = False, compile: bool = False) -> None:
        """With ``cuda_graphs`` on a CUDA device, the cached sampler replays its pixel step as a CUDA
        graph (models/sampling/cached.py): the same images, one launch per step. With ``compile``,
        :meth:`pixel_log_prob` of eval-mode passes without gradients runs through ``torch.compile``
        (:class:`CompiledLogProb`: batches padded to a power of two, one graph each)."""
        self.sample_cuda_graphs = cuda_graphs and self.device.type == "cuda" and self.cached_sampler is not None
        self.compiled_log_prob = CompiledLogProb(self._pixel_log_prob) if compile else None

    def warmup_batch_sizes(self, max_batch: int) -> list[int]:
        if self.compiled_log_prob is None:
            return [1]
        return padded_sizes(max_batch)

    def logits(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Unnormalised logits (B, C, levels, H, W); position i may depend only on x_<i."""
        raise NotImplementedError

    def pixel_log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x_i | x_<i) for every sub-pixel, in nats, shape (B, C, H, W)."""
        self.check_input(x, y)
        compiled = self.compiled_log_prob
        if compiled is not None and not self.training and not torch.is_grad_enabled():
            return compiled(x, y)
        return self._pixel_log_prob(x, y)

    def _pixel_log_prob(self, x: Tensor, y: Tensor | None) -> Tensor:
        return categorical_log_prob(self.logits(x, y), x)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.pixel_log_prob(x, y).flatten(1).sum(1)

    def training_step(self, x: Tensor, y: Tensor | None = None) -> TrainStep:
        nll = -self.log_prob(x, y)
        return TrainStep(loss=nll.mean() / self.dims, nll=nll.detach())

    def sample_parts(
        self, parts: list[SamplePart], *, between_steps: StepCallback | None = None
    ) -> list[SampleOutput | None]:
        """All parts as one batch through the model's cached sampler; without one, each part with the
        reference sampler. Every sampler draws what :meth:`sample_naive`, the reference, draws for
        the same generator."""
        sampler = type(self).cached_sampler
        if sampler is None:
            return self._parts_one_by_one(parts, self.sample_naive, between_steps)
        return sampler(self, parts, cuda_graphs=self.sample_cuda_graphs, between_steps=between_steps)

    @torch.no_grad()
    def sample_naive(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        y: Tensor | None = None,
        on_row: RowCallback | None = None,
    ) -> SampleOutput:
        """Reference sampler: one full forward pass per sub-pixel (C*H*W passes).

        Draws use the Gumbel-max trick with one ``torch.rand(n, levels)`` per sub-pixel, in raster
        then channel order, so any sampler that consumes the generator the same way draws the same
        images. ``log_prob`` is the untempered model's exact log p(sample) in nats.
        """
        check_temperature(temperature)
        self.check_labels(n, y)
        c_, h_, w_ = self.shape
        dev = self.device
        x = torch.zeros(n, c_, h_, w_, dtype=torch.long, device=dev)
        logp = torch.zeros(n, device=dev)
        for i in range(h_):
            for j in range(w_):
                for c in range(c_):
                    step_logits = self.logits(x, y)[:, c, :, i, j]  # (n, L)
                    v, lp = draw_categorical(step_logits, temperature, generator)
                    x[:, c, i, j] = v
                    logp += lp
            if on_row is not None:
                on_row(i + 1, x)
        return SampleOutput(images=x.to(torch.uint8), log_prob=logp)


def draw_categorical(
    logits: Tensor, temperature: float | Tensor, generator: torch.Generator | None, *, u: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One draw per row of ``logits`` (n, L) at ``temperature`` (a float or (n, 1)) by Gumbel-max.

    ``u`` (n, L) are the uniform draws; without it they come from ``torch.rand(n, L, generator)``.
    Returns the drawn values (n,) and their log-probability in nats under the *untempered*
    softmax (n,), the model's own likelihood of what was drawn.
    """
    if u is None:
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    logits = logits.float()
    v = (logits / temperature + gumbel).argmax(dim=1)
    lp = torch.log_softmax(logits, dim=1).gather(1, v.unsqueeze(1)).squeeze(1)
    return v, lp
