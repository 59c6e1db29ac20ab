"""``genserve serve --watch``: poll the model folders and reload a model whose files changed.

Every GENSERVE_WATCH_INTERVAL_S the watcher compares each served model folder's checkpoint files
(size and modification time, :func:`service.lifecycle.fingerprint`) with what it saw last; a
changed folder is reloaded (service/lifecycle.py: a version whose files are still being written
fails the sha256 check and is retried at the next change). With GENSERVE_MODELS unset, a new
model folder is loaded too. A removed folder is only logged: the model keeps serving until an
admin unloads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from models.checkpoint import META
from service.errors import ServiceError
from service.lifecycle import Lifecycle, fingerprint

logger = logging.getLogger("genserve.watch")


class Watcher:
    """Polls the model folders; :meth:`poll` is one pass (tests call it directly)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.registry = lifecycle.registry
        self.seen = {name: fingerprint(e.folder) for name, e in self.registry.entries.items()}

    def _candidates(self) -> list[str]:
        root = self.registry.settings.model_dir
        names = set(self.registry.entries)
        if self.registry.settings.model_names is None and root.is_dir():
            names |= {p.name for p in root.iterdir() if (p / META).is_file()}
        return sorted(names)

    async def poll(self) -> list[str]:
        """Reload (or load) every model whose files changed since the last poll; returns their names."""
        changed = []
        root = self.registry.settings.model_dir
        for name in self._candidates():
            now = fingerprint(root / name)
            if not now:
                if self.seen.get(name):
                    logger.warning("model folder %s is gone; model '%s' keeps serving", root / name, name)
                self.seen[name] = now
                continue
            if self.seen.get(name) == now:
                continue
            self.seen[name] = now
            changed.append(name)
            try:
                await self.lifecycle.load(name)  # a reload when served
            except ServiceError as e:
                logger.warning("watch: %s", e.detail)
        return changed

    async def run(self, interval_s: float) -> None:
        logger.info("watching %s every %g s for new model versions", self.registry.settings.model_dir, interval_s)
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll()
            except Exception:
                logger.exception("watch: polling the model folders failed")


@contextlib.asynccontextmanager
async def watching(lifecycle: Lifecycle, interval_s: float) -> AsyncIterator[None]:
    """Run a :class:`Watcher` in the background while the body runs (not at all for ``interval_s`` 0)."""
    if not interval_s:
        yield
        return
    task = asyncio.create_task(Watcher(lifecycle).run(interval_s), name="genserve-watch")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
