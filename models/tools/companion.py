"""``genserve calibrate --companion SOURCE``: put a copy of a checkpoint into a model folder's
``companion/``, whose statistics the model's dose score may then combine
(models/scoring/statistics.py).

The copy is the source's weights file and its model.json without its own calibration (the companion
is judged by the model's calibration, which records the companion's sha256). It is written into a
temporary folder beside ``companion/`` and renamed into place, so a failed copy (a full disk, an
unreadable source) leaves the model folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from models.checkpoint import META, WEIGHTS, load_checkpoint, sha256_file
from models.files import atomic_write, atomic_write_bytes
from models.scoring.scorer import COMPANION


def install_companion(source: str | Path, folder: str | Path) -> dict[str, Any]:
    """Copy the checkpoint in ``source`` into ``folder/companion/`` (replacing one that is there) and
    return its metadata. ValueError unless the source loads (its weights match their sha256), is
    unconditional and takes the model's images."""
    source, folder = Path(source), Path(folder)
    if source.resolve() == folder.resolve():
        raise ValueError("a model cannot be its own companion")
    companion, meta = load_checkpoint(source)  # checks the weights against the recorded sha256
    model, _ = load_checkpoint(folder)
    if companion.shape != model.shape or companion.levels != model.levels or companion.n_classes is not None:
        raise ValueError(
            f"{source}: a companion must be unconditional and take {model.shape} images with {model.levels} levels "
            f"(it takes {companion.shape} with {companion.levels})"
        )
    meta = {k: v for k, v in meta.items() if k != "calibration"}
    meta["companion_of"] = {"source": str(source), "model": folder.name}
    target = folder / COMPANION
    tmp = folder / f".{COMPANION}.{os.getpid()}.tmp"
    old = folder / f".{COMPANION}.{os.getpid()}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        atomic_write(tmp / WEIGHTS, lambda p: shutil.copyfile(source / WEIGHTS, p))
        atomic_write_bytes(tmp / META, (json.dumps(meta, indent=2) + "\n").encode())
        if sha256_file(tmp / WEIGHTS) != meta["weights"]["sha256"]:
            raise ValueError(f"{source / WEIGHTS} changed while it was copied; try again")
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            old.rename(target)  # put the previous companion back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return meta
