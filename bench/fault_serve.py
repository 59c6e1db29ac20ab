"""``genserve serve`` with one fault injected, for ``bench/reliability_faults.py crash`` only; never
used to serve anything else, and nothing in service/ knows of it.

No valid upload makes a shipped model raise, so this launcher makes one: it wraps
``PixelCNN.pixel_log_prob`` (behind every score) so that a forward pass over a batch holding the
*poison image* (every pixel equal to :data:`POISON`) raises ``RuntimeError``, then runs ``genserve
serve`` with the given arguments in this process. Everything else (HTTP, batching, the retry of a
failed batch one request at a time, the error answer) is the real server's.

    python bench/fault_serve.py serve --port 8000 --model-dir STORE
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from models.pixelcnn import PixelCNN

POISON = 77  # the level of every pixel of the image that crashes the model


def inject() -> None:
    original = PixelCNN.pixel_log_prob

    def pixel_log_prob(self: PixelCNN, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if bool((x == POISON).flatten(1).all(1).any()):
            raise RuntimeError("injected fault: the poison image crashed the model (bench/fault_serve.py)")
        return original(self, x, y)

    PixelCNN.pixel_log_prob = pixel_log_prob  # type: ignore[method-assign]


if __name__ == "__main__":
    inject()
    from service.cli import main

    sys.exit(main(sys.argv[1:]))  # "serve ..."
