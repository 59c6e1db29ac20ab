"""Service configuration from ``GENSERVE_*`` environment variables (or keyword arguments in tests).

Comma lists (``GENSERVE_MODELS``, ``GENSERVE_DEVICES``, ``GENSERVE_API_KEYS``) are plain strings
parsed by validators, so ``GENSERVE_DEVICES=cuda:0,cuda:1`` works without JSON quoting. A bad value
refuses to start with a message that says how to fix it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.image_convert import DEFAULT_MAX_PIXELS

DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def split_list(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [item.strip() for item in value.split(",") if item.strip()]


def resolve_devices(spec: str) -> list[str]:
    """Devices from a GENSERVE_DEVICES string: "auto", "cpu", "cuda", "cuda:0,cuda:1", "cpu,cpu".

    "auto" means every CUDA GPU torch sees, else one CPU worker. Raises ValueError with the fix.
    """
    items = split_list(spec.lower())
    if not items:
        raise ValueError("GENSERVE_DEVICES is empty; use cpu, auto, or a list like cuda:0,cuda:1")
    if items == ["auto"]:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    out = []
    for item in items:
        if not DEVICE_RE.match(item):
            raise ValueError(f"GENSERVE_DEVICES: unknown device '{item}'; use cpu, cuda, cuda:N, or auto")
        if item.startswith("cuda"):
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(item.partition(":")[2] or 0)
            if n == 0:
                raise ValueError(f"GENSERVE_DEVICES: '{item}' but torch sees no CUDA GPU; use cpu or auto")
            if index >= n:
                raise ValueError(f"GENSERVE_DEVICES: '{item}' but torch sees {n} GPU(s) (cuda:0..cuda:{n - 1})")
            item = f"cuda:{index}"
        out.append(item)
    return out


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: a container's cpuset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Everything the service reads from its environment; see the README for each variable."""

    model_config = SettingsConfigDict(env_prefix="GENSERVE_", extra="ignore", protected_namespaces=())

    model_dir: Path = Field(default=Path("checkpoints"), description="folder of checkpoints, one subfolder per model")
    models: str = Field(default="", description="comma list of model names (subfolders) to serve; empty = all")
    devices: str = Field(
        default="cpu", description='"cpu", "auto", or a comma list such as "cuda:0,cuda:1" or "cpu,cpu"'
    )
    max_batch_size: int = Field(default=32, ge=1, description="images per forward pass, at most")
    batch_sweep: bool = Field(
        default=False,
        description="at warm-up, time each model's pass at 1, 2, 4, ... max_batch_size images and cap its score "
        "passes at a smaller size where that was more than 10% faster per image in every round (service/warmup.py); "
        "for a machine that is idle while the server starts: under other load the timings mislead",
    )
    batch_regather: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="a score batch smaller than the last one waits up to this fraction of the last pass's time for "
        "the clients that pass answered to send their next requests (0: never; docs/serving.md)",
    )
    max_batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="the longest a batch waits for more requests, and only while requests for its model are "
        "inside the app on their way to a queue (a lone request never waits); 0 (the default, best on CPU): "
        "batch what queued while the model was busy (docs/serving.md)",
    )
    max_queue: int = Field(default=256, ge=1, description="images waiting or running per worker before 503")
    request_timeout_s: float = Field(default=60.0, gt=0, description="a request waiting longer gets 504")
    shutdown_timeout_s: int = Field(
        default=30,
        ge=0,
        description="on SIGTERM or SIGINT: seconds that requests in flight get to finish (new connections are "
        "refused at once); those still running then are cancelled and the process exits",
    )
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="request body limit (413 above)")
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a request body must arrive within this many seconds of the request's headers, else 408; "
        "bounds how long a slow client holds a place among max_concurrent_requests",
    )
    max_concurrent_requests: int = Field(
        default=256,
        ge=1,
        description="POST requests in flight before more are refused at once (503); with max_upload_bytes it "
        "bounds the memory uploads can take",
    )
    max_images: int = Field(default=64, ge=1, description="images per /score request")
    max_samples: int = Field(default=64, ge=1, description="n per /sample request")
    max_concurrent_samples: int = Field(
        default=8, ge=1, description="sample requests admitted per worker at once (queued or generating)"
    )
    max_sample_batch: int = Field(
        default=64, ge=1, description="images generated together in one batched sampling pass (several requests)"
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        ge=1,
        description="width x height decoded at most: larger uploads are refused (413), except JPEGs with "
        "resize=true, decoded at 1/2, 1/4 or 1/8 of their size (photos up to 64 times the limit)",
    )
    max_concurrent_decodes: int = Field(
        default=4,
        ge=1,
        description="uploads decoded at once in the thread pool (those converted with resize=true, or over 64 KiB); "
        "with max_image_pixels it bounds decoding memory (a 16-megapixel RGBA image takes about 220 MB "
        "while converted); more wait their turn",
    )
    api_keys: str = Field(default="", description="comma list of accepted API keys; empty = no auth")
    metrics_public: bool = Field(default=False, description="serve /metrics without an API key")
    cors_origins: str = Field(
        default="",
        description='comma list of web origins (such as "https://app.example.com") whose pages may call the '
        'API from a browser; "*" for any; empty = none (no CORS headers)',
    )
    json_logs: bool = Field(default=False, description="log one JSON object per line")
    torch_threads: int | None = Field(default=None, ge=1, description="torch.set_num_threads for CPU inference")
    warmup: bool = Field(default=True, description="run one forward pass per worker before reporting ready")
    gil_switch_ms: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="the interpreter's switch interval (sys.setswitchinterval), in ms; unset keeps Python's 5 ms. "
        "A thread that wants the interpreter lock waits up to this long for the thread holding it, so the "
        "event loop and a thread worker's model glue hand it back and forth sooner (docs/serving.md)",
    )
    http_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="HTTP processes of `genserve serve`, sharing its port (service/http_processes.py); above 1 each "
        "model runs once per device in a model server that every HTTP process sends its batches to, merged into "
        "shared passes (service/model_server.py), so parsing, decoding and answering spread over the host's cores. "
        "Not with GENSERVE_ADMIN_KEYS or --watch (a reload would reach one process)",
    )
    keep_freed_memory: bool = Field(
        default=True,
        description="on glibc, fixed malloc thresholds (mmap 64 MiB, trim 256 MiB; service/allocator.py) in every "
        "process that runs a model, so memory a pass frees stays for the next pass instead of going back to the "
        "kernel and being faulted in again; a process then holds the peak of its passes. false: glibc's defaults",
    )
    workers_per_device: str = Field(
        default="auto",
        description="workers each model gets on every device of GENSERVE_DEVICES (N, or auto): requests go to the "
        "least loaded, the first of equals; the passes running at once share the CPU's cores (service/cores.py). "
        "auto: 2 where one model is served on a CPU of two or more cores by one HTTP process (under load two "
        "passes overlap, each on its share of the cores; a lone request still gets every core), else 1",
    )
    model_process: str = Field(
        default="auto",
        description="run a worker's model in a process of its own, fed through a pipe (service/model_process.py): "
        "\"auto\" for models whose passes step through a Python loop (the PixelRNN's rows) and for a model's "
        'second and later workers on a CPU (each its own OpenMP pool and interpreter lock), "true" for every '
        'model, "false" for none, or a comma list of model names. The model\'s Python no longer shares the HTTP '
        "process's interpreter lock with the event loop (worth it for models whose passes run much Python; a "
        "short pass pays more for the pipe than it gains), and a crash of the "
        "model fails only its pass (the next one restarts it); each model process has its own torch threads "
        "(GENSERVE_CPU_COMPUTE does not apply to it)",
    )
    cpu_compute: Literal["auto", "shared", "per_model"] = Field(
        default="auto",
        description="shared: every model's CPU worker with the same index runs its torch work on one thread, "
        "so torch keeps one OpenMP pool per slot (service/compute.py); per_model: one thread per model, so "
        "models run at once, worth it only where GENSERVE_TORCH_THREADS times the models fits the cores; "
        "auto: shared when several models are served, else per_model",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="on CUDA workers, the PixelCNN and PixelRNN samplers replay each pixel step as a CUDA graph "
        "(same images, 3.7x to 5.1x faster on an H200; docs/sampling.md); ignored on CPU",
    )
    compile: bool = Field(
        default=False,
        description="on CUDA workers, the PixelCNN's and PixelRNN's exact likelihood through torch.compile, "
        "batches padded to powers of two, every size compiled at warm-up (1.8x to 2.5x on an H200 for the "
        "PixelCNN; startup takes longer; docs/gpu.md); ignored on CPU",
    )
    drift_window: int = Field(
        default=1000, ge=1, description="drift monitor: the last this many /score uploads per model (docs/drift.md)"
    )
    drift_max_age_s: float = Field(
        default=3600.0, gt=0, description="drift monitor: uploads older than this leave the window"
    )
    drift_min_uploads: int = Field(
        default=100, ge=1, description="drift monitor: no test runs on a window holding fewer uploads"
    )
    drift_alpha: float = Field(
        default=0.001, gt=0, lt=1, description="drift monitor: a test whose p-value is below this reports drift"
    )
    drift_fpr_margin: float | None = Field(
        default=None,
        ge=1.0,
        description="drift monitor: an override of the binomial test's null rate, as the calibrated false-positive "
        "rate times this (1 = exactly the calibrated rate); unset: the upper 1 - GENSERVE_DRIFT_ALPHA confidence "
        "bound on the threshold's rate given the calibration scores it was picked from (docs/drift.md)",
    )
    admin_keys: str = Field(
        default="",
        description="comma list of admin keys for /admin (load, reload, unload models; docs/lifecycle.md), separate "
        "from GENSERVE_API_KEYS; empty = the admin API refuses every request",
    )
    watch_interval_s: float = Field(
        default=0.0,
        ge=0,
        description="poll the model folders this often and reload a model whose files changed (`genserve serve "
        "--watch`); 0 = off",
    )

    @model_validator(mode="after")
    def _check_http_processes(self) -> Settings:
        if self.http_processes > 1 and (self.admin_keys.strip() or self.watch_interval_s):
            which = "GENSERVE_ADMIN_KEYS" if self.admin_keys.strip() else "GENSERVE_WATCH_INTERVAL_S (--watch)"
            raise ValueError(
                f"GENSERVE_HTTP_PROCESSES={self.http_processes} cannot be used with {which}: a model load or reload "
                "would reach one HTTP process of several; serve with one HTTP process, or restart the service to "
                "change models"
            )
        return self

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, v: str) -> str:
        resolve_devices(v)  # raises with the fix
        return v

    @field_validator("workers_per_device")
    @classmethod
    def _check_workers_per_device(cls, v: str) -> str:
        v = v.strip().lower()
        if v != "auto" and not (v.isdigit() and 1 <= int(v) <= 64):
            raise ValueError(f'GENSERVE_WORKERS_PER_DEVICE is "auto" or a whole number from 1 to 64, not {v!r}')
        return v

    @field_validator("model_process", mode="before")
    @classmethod
    def _check_model_process(cls, v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if not isinstance(v, str):
            raise ValueError('GENSERVE_MODEL_PROCESS is "true", "false", or a comma list of model names')
        return v.strip()

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, v: str) -> str:
        for origin in split_list(v):
            scheme, sep, host = origin.partition("://")
            if origin != "*" and not (sep and scheme in ("http", "https") and host and "/" not in host):
                raise ValueError(
                    f"GENSERVE_CORS_ORIGINS entry {origin!r} is not an origin; write scheme://host[:port] with no "
                    'path or trailing slash, as browsers send it (e.g. "https://app.example.com"), or "*"'
                )
        return v

    @field_validator("model_dir")
    @classmethod
    def _check_model_dir(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(
                f"GENSERVE_MODEL_DIR={v} is not a folder; point it at a folder holding one "
                "subfolder per model (each with model.json and model.safetensors)"
            )
        return v

    @property
    def model_names(self) -> list[str] | None:
        """The models asked for, or None for every checkpoint in model_dir."""
        return split_list(self.models) or None

    def model_process_for(self, name: str, *, steps_in_python: bool = False, cpu_replica: bool = False) -> bool:
        """Whether a worker of model ``name`` runs its model in a process of its own (``auto``: where
        its passes step through a Python loop, ``steps_in_python``, and for a CPU worker after the
        model's first on a CPU, ``cpu_replica``: threads of one process would keep an OpenMP pool each,
        whose helpers then sleep between operations, and share one interpreter lock; the first keeps
        the HTTP process's thread, which a lone client's requests reach without a pipe)."""
        v = self.model_process.lower()
        if v == "auto":
            return steps_in_python or cpu_replica
        if v in ("true", "1", "yes", "on"):
            return True
        if v in ("false", "0", "no", "off", ""):
            return False
        return name in split_list(self.model_process)

    @property
    def model_process_names(self) -> list[str]:
        """The models GENSERVE_MODEL_PROCESS names one by one (empty for true and false)."""
        v = self.model_process.lower()
        named = v not in ("auto", "true", "1", "yes", "on", "false", "0", "no", "off", "")
        return split_list(self.model_process) if named else []

    @property
    def device_list(self) -> list[str]:
        return resolve_devices(self.devices)

    def worker_devices(self, models: int) -> list[str]:
        """The device of each of a model's workers when ``models`` models are served: every device of
        GENSERVE_DEVICES, GENSERVE_WORKERS_PER_DEVICE times in a row."""
        devices = self.device_list
        if self.workers_per_device != "auto":
            per = int(self.workers_per_device)
        else:
            lone_cpu = devices == ["cpu"] and models == 1 and self.http_processes == 1
            per = 2 if lone_cpu and usable_cores() >= 2 else 1
        return [d for d in devices for _ in range(per)]

    @property
    def api_key_list(self) -> list[str]:
        return split_list(self.api_keys)

    @property
    def admin_key_list(self) -> list[str]:
        return split_list(self.admin_keys)

    @property
    def cors_origin_list(self) -> list[str]:
        return split_list(self.cors_origins)
