"""The peer for bench/peer_bench.py: one shipped checkpoint's /score "nll" served by LitServe.

What a user would write to serve the same ``nn.Module`` with LitServe (the optional ``bench``
extra: ``pip install -e ".[bench]"``): the checkpoint loaded by the same loader and prepared as a
genserve worker prepares it (``load_scorer`` + ``prepare_for_inference``), each request one
base64 PNG decoded to (1, C, H, W) uint8, batches of up to 32 requests (``batch_timeout=0``),
and per image the same computation as genserve's ``score_type: "nll"`` (``Scorer.compute``: the
exact log-likelihood of an autoregressive model, the calibrated IWAE of a VAE). It takes the same
JSON body as genserve's /score (``images``: one base64 PNG, optional ``label``; other fields are
ignored), on ``POST /predict``:

    python bench/peer_litserve.py --model-dir checkpoints --model pixelcnn-fmnist --port 8031
    LITSERVE_WORKERS_PER_DEVICE=2 python bench/peer_bench.py ...   # LitServe with two workers

and answers ``{"log_likelihood_nats": float, "bits_per_dim": float}``.
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.scoring.scorer import Scorer, load_scorer  # noqa: E402

try:
    import litserve as ls

    _Base: Any = ls.LitAPI
except ImportError:  # the optional ``bench`` extra; the class still builds, for tests of its steps
    ls = None
    _Base = object


def decode_png(text: str, shape: tuple[int, int, int]) -> Tensor:
    """A base64 PNG as uint8 (1, C, H, W); ValueError unless it is the model's size and mode."""
    c, h, w = shape
    im = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    arr = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
    if arr.shape[:2] != (h, w):
        raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]}; the model takes {w}x{h}")
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.array(arr))[None]  # a writable copy


class ScoreAPI(_Base):  # type: ignore[misc]
    """decode → batch → predict → unbatch → encode, LitServe's steps, around one checkpoint's scorer."""

    def __init__(self, folder: Path, *, max_batch_size: int = 32, batch_timeout: float = 0.0) -> None:
        if ls is not None:
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.folder = folder
        self.scorer: Scorer | None = None

    def setup(self, device: str) -> None:
        scorer, _ = load_scorer(self.folder, "cpu" if device in ("cpu", "auto") else device)
        scorer.model.prepare_for_inference()
        self.scorer = scorer
        self.device = scorer.model.device

    # No annotations on decode_request's ``request`` and encode_response's result: LitServe reads
    # them as the endpoint's types, and without them the body is plain JSON, as genserve takes it.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        assert self.scorer is not None
        label = request.get("label")
        return decode_png(request["images"][0], self.scorer.model.shape), None if label is None else int(label)

    def batch(self, inputs: list[tuple[Tensor, int | None]]) -> tuple[Tensor, Tensor | None]:
        x = torch.cat([xi for xi, _ in inputs])
        labels = [yi for _, yi in inputs]
        y = None if labels[0] is None else torch.tensor(labels, dtype=torch.long)
        return x, y

    @torch.inference_mode()
    def predict(self, xy: tuple[Tensor, Tensor | None]) -> Tensor:
        assert self.scorer is not None
        x, y = xy
        out = self.scorer.compute(x.to(self.device), None if y is None else y.to(self.device), ["nll"])
        return out.log_prob["nll"].float().cpu()

    def unbatch(self, output: Tensor) -> list[float]:
        return [float(v) for v in output]

    def encode_response(self, output: float):  # type: ignore[no-untyped-def]
        assert self.scorer is not None
        return {"log_likelihood_nats": output, "bits_per_dim": -output / (self.scorer.model.dims * math.log(2))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="checkpoints")
    p.add_argument("--model", required=True, help="checkpoint folder name under --model-dir")
    p.add_argument("--port", type=int, default=8031)
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.0, help="seconds a batch waits for more requests")
    p.add_argument(
        "--workers-per-device",
        type=int,
        default=int(os.environ.get("LITSERVE_WORKERS_PER_DEVICE", "1")),
        help="LitServe's worker processes per device (default: $LITSERVE_WORKERS_PER_DEVICE, else 1; "
        "bench/peer_bench.py passes its environment on)",
    )
    args = p.parse_args()
    if ls is None:
        raise SystemExit('LitServe is not installed: pip install -e ".[bench]"')
    api = ScoreAPI(
        Path(args.model_dir) / args.model, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout
    )
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    devices = [int(args.device.partition(":")[2] or 0)] if accelerator == "cuda" else "auto"
    server = ls.LitServer(
        api, accelerator=accelerator, devices=devices, workers_per_device=args.workers_per_device, timeout=60
    )
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
