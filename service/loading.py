"""How a worker's model is loaded and made ready to answer, wherever it runs: on a thread of the
HTTP process (service/batching.py) or in a model process of its own (service/model_process.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from models.scoring.scorer import Scorer, load_scorer
from service.allocator import keep_freed_memory
from service.warmup import measure_pass_size, warm_up

logger = logging.getLogger("genserve.worker")


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    max_batch_wait_s: float
    max_queue: int
    max_concurrent_samples: int
    max_sample_batch: int = 64
    warmup: bool = True
    cuda_graphs: bool = True  # sampling steps as CUDA graphs on a CUDA worker (DensityModel.prepare_for_inference)
    compile: bool = False  # the exact likelihood through torch.compile on a CUDA worker (same)
    batch_sweep: bool = False  # cap score passes at the best size timed at warm-up (service/warmup.py)
    regather: float = 0.0  # a batch waits up to this fraction of the last pass for its clients to return
    torch_threads: int | None = None  # CPU threads of each thread that runs the model (None: torch's default)
    model_process: bool = False  # run each worker's model in a process of its own (service/model_process.py)
    keep_freed_memory: bool = True  # fixed malloc thresholds in the process that runs the model (service/allocator.py)


@dataclass(frozen=True)
class Loaded:
    """A model ready to answer: its scorer, the images per score pass, the CPU threads it runs on."""

    scorer: Scorer
    pass_size: int
    threads: int


def load_for_serving(folder: Path, device: str, limits: BatchLimits, *, name: str = "") -> Loaded:
    """Load the scorer of ``folder`` (the model, its background and companion) on ``device``, lay it
    out for inference, warm it up and (``batch_sweep``) time its best pass size. Runs on the thread
    (or in the process) that will run the model's passes: torch's thread settings are per thread."""
    if limits.torch_threads:
        # Per thread: convolutions take their thread count from the calling thread's OpenMP
        # setting, which torch otherwise copies in only at the thread's first parallel op.
        torch.set_num_threads(limits.torch_threads)
    threads = torch.get_num_threads()  # what other work runs on between a generation's pixels
    if limits.keep_freed_memory:
        keep_freed_memory()
    scorer, _ = load_scorer(folder, device)
    on_cuda = torch.device(device).type == "cuda"
    scorer.model.prepare_for_inference(cuda_graphs=limits.cuda_graphs, compile=limits.compile and on_cuda)
    if scorer.companion is not None:  # its statistics pass (dose): the same inference layout
        scorer.companion.model.prepare_for_inference()
    pass_size = limits.max_batch_size
    if limits.warmup:
        warm_up(scorer, device, limits.max_batch_size)
        if limits.batch_sweep and limits.max_batch_size > 1:
            pass_size, seconds = measure_pass_size(scorer, device, limits.max_batch_size)
            per_image = ", ".join(f"{n}: {1000 * min(s) / n:.2f}" for n, s in seconds.items())
            logger.info("model '%s' on %s: passes of up to %d images (best ms per image by pass size: %s)",
                        name, device, pass_size, per_image)  # fmt: skip
    return Loaded(scorer=scorer, pass_size=pass_size, threads=threads)
