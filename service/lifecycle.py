"""Model versions: load, reload and unload a served model while it serves (docs/lifecycle.md).

Layout: a model's folder ``<GENSERVE_MODEL_DIR>/<name>/`` holds one version, ``model.safetensors`` +
``model.json`` (and ``background/``); a new version replaces those files in place (``genserve
train``/``calibrate`` write each file atomically). The version serving is named by its weights'
sha256; ``version`` counts its loads in this process.

A reload builds a new :class:`~service.entries.ModelEntry` from the folder beside the serving one
(the startup checks: metadata, calibration fits the weights, default score calibrated), starts its
workers, which verify the weights' sha256 and warm up, and checks every worker loaded the weights
the metadata names. Only then the registry's entry is swapped (one dict assignment on the event
loop, so a request gets either the old version or the new one, never a half-loaded one); requests
holding the old entry finish on its workers (service/leases.py), which close once none is left.
A version failing any check is refused: its workers close, the old version keeps serving, and the
error shows in /models (``last_reload_error``), the log and ``genserve_model_reloads_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import NoReturn

from models.checkpoint import META, WEIGHTS, CheckpointError, read_metadata
from models.scoring.scorer import BACKGROUND, COMPANION
from service.batching import State
from service.drift_monitor import DriftMonitors
from service.entries import ModelEntry, RegistryError
from service.errors import ServiceError, UnknownModel
from service.leases import drained
from service.lifecycle_schemas import AdminResult
from service.registry import WORKER_STOP_TIMEOUT_S, ModelRegistry

logger = logging.getLogger("genserve.lifecycle")


class Refused(ServiceError):
    """A version failed a check; the serving one (if any) keeps serving."""

    status_code = 409


class Lifecycle:
    """Loads, reloads and unloads the registry's models, one change per model at a time."""

    def __init__(self, registry: ModelRegistry, drift: DriftMonitors) -> None:
        self.registry = registry
        self.drift = drift
        self.metrics = registry.metrics
        self._locks: dict[str, asyncio.Lock] = {}
        self._draining: dict[asyncio.Task[None], ModelEntry] = {}  # retired versions still draining

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    @property
    def drain_timeout_s(self) -> float:
        return self.registry.settings.request_timeout_s + WORKER_STOP_TIMEOUT_S

    # ---- the three actions --------------------------------------------------------------------

    async def load(self, name: str) -> AdminResult:
        """Serve a model folder that is not served yet (a reload if it is)."""
        async with self._lock(name):
            if name in self.registry.entries:
                return await self._reload(name, force=False)
            start = time.perf_counter()
            new = await self._prepare(name, version=1, action="load")
            self.registry.entries[name] = new
            self._announce(new, None, action="load")
            return self._result(new, None, action="load", result="loaded", start=start)

    async def reload(self, name: str, *, force: bool = False) -> AdminResult:
        """Swap in the folder's version; ``unchanged`` if its metadata is the serving one's (unless ``force``)."""
        async with self._lock(name):
            return await self._reload(name, force=force)

    async def _reload(self, name: str, *, force: bool) -> AdminResult:
        start = time.perf_counter()
        old = self._serving(name)
        if not force and self._unchanged(old):
            return self._result(old, old, action="reload", result="unchanged", start=start)
        new = await self._prepare(name, version=old.version + 1, action="reload")
        self.registry.entries[name] = new  # the swap: later requests get the new version
        self._announce(new, old, action="reload")
        self._retire(old)
        return self._result(new, old, action="reload", result="reloaded", start=start)

    async def unload(self, name: str, *, wait: bool = True) -> AdminResult:
        """Stop serving ``name``: new requests get 404, requests in flight finish, then its workers close."""
        async with self._lock(name):
            start = time.perf_counter()
            old = self._serving(name)
            del self.registry.entries[name]
            self.registry.describe(old, value=0)
            self.drift.reset(name)
            self.metrics.model_reloads.labels(model=name, action="unload", result="ok").inc()
            logger.info("model '%s' unloaded (sha256 %s); draining %d request(s)", name, old.sha256[:12], old.holders)
            if wait:
                await self._drain(old)
            else:
                self._retire(old)
            return self._result(None, old, action="unload", result="unloaded", start=start)

    # ---- steps --------------------------------------------------------------------------------

    def _serving(self, name: str) -> ModelEntry:
        if name not in self.registry.entries:
            raise UnknownModel(f"model '{name}' is not served; served: {sorted(self.registry.entries)}")
        return self.registry.entries[name]

    def _unchanged(self, entry: ModelEntry) -> bool:
        """True if the folder's metadata (weights' sha256, calibration, background, companion) is the
        serving one's."""
        try:
            meta = read_metadata(entry.folder)
            bg, comp = entry.folder / BACKGROUND, entry.folder / COMPANION
            bg_meta = read_metadata(bg) if (bg / META).is_file() else None
            comp_meta = read_metadata(comp) if (comp / META).is_file() else None
        except CheckpointError:
            return False
        return meta == entry.meta and bg_meta == entry.background_meta and comp_meta == entry.companion_meta

    async def _prepare(self, name: str, *, version: int, action: str) -> ModelEntry:
        """A new entry for the folder's version, loaded, checked and warmed up; :class:`Refused` if it fails."""
        folder = self.registry.settings.model_dir / name
        try:
            if not (folder / META).is_file():
                raise RegistryError(f"{folder}: no {META} (a model folder holds {META} and {WEIGHTS})")
            # Off the event loop: reading metadata and building the skeleton would stall requests.
            new = await asyncio.to_thread(self.registry.build_entry, folder)
        except RegistryError as e:
            self._refuse(name, action, str(e))
        new.version = version
        for worker in new.workers:
            worker.start()
        await asyncio.gather(*(w.loaded.wait() for w in new.workers))
        failed = [f"{w.device}: {w.error}" for w in new.workers if w.state is not State.READY]
        loaded = {w.weights_sha256 for w in new.workers if w.weights_sha256}
        if not failed and loaded != {new.sha256}:
            failed = [f"the weights loaded ({sorted(loaded)}) are not the ones {META} names: the files changed "
                      "during the load; offer the version again"]  # fmt: skip
        if failed:
            await self._close(new)
            self._refuse(name, action, "; ".join(failed))
        return new

    def _refuse(self, name: str, action: str, why: str) -> NoReturn:
        """Record a refused version (on the serving entry, the log and a metric) and raise :class:`Refused`."""
        logger.error("model '%s': %s refused, the serving version stays: %s", name, action, why)
        self.metrics.model_reloads.labels(model=name, action=action, result="refused").inc()
        self.metrics.model_reload_failed.labels(model=name).set(1)
        serving = self.registry.entries.get(name)
        if serving is not None:
            serving.last_reload_error = why
        raise Refused(f"model '{name}': the new version was refused ({why}); the serving version stays")

    def _announce(self, new: ModelEntry, old: ModelEntry | None, *, action: str) -> None:
        if old is not None:
            self.registry.describe(old, value=0)
        self.registry.describe(new)
        self.drift.reset(new.name)  # the new version has its own calibration
        self.metrics.model_reloads.labels(model=new.name, action=action, result="ok").inc()
        self.metrics.model_reload_failed.labels(model=new.name).set(0)
        self.metrics.model_loaded_at.labels(model=new.name).set(new.loaded_at)
        was = f" (was {old.sha256[:12]}, version {old.version})" if old else ""
        logger.info("model '%s' version %d serving, sha256 %s%s", new.name, new.version, new.sha256[:12], was)

    def _retire(self, old: ModelEntry) -> None:
        """Drain and close ``old`` in the background (the caller does not wait for the last stream)."""
        task = asyncio.create_task(self._drain(old), name=f"genserve-drain-{old.name}-{old.version}")
        self._draining[task] = old
        task.add_done_callback(self._draining.pop)

    async def _drain(self, old: ModelEntry) -> None:
        if not await drained(old, self.drain_timeout_s):
            logger.warning("model '%s' version %d: %d request(s) still running after %.0f s; closing it",
                           old.name, old.version, old.holders, self.drain_timeout_s)  # fmt: skip
        await self._close(old)

    async def _close(self, entry: ModelEntry) -> None:
        for worker in entry.workers:
            worker.close()
        for worker in entry.workers:
            await asyncio.to_thread(worker.join, WORKER_STOP_TIMEOUT_S)

    def _result(
        self, new: ModelEntry | None, old: ModelEntry | None, *, action: str, result: str, start: float
    ) -> AdminResult:
        named = new or old
        assert named is not None
        return AdminResult.model_validate({
            "model": named.name, "action": action, "result": result,
            "version": new.version if new else None, "sha256": new.sha256 if new else None,
            "previous_sha256": old.sha256 if old and old is not new else None,
            "seconds": round(time.perf_counter() - start, 3),
        })  # fmt: skip

    async def close(self) -> None:
        """At shutdown: stop waiting for the versions still draining and close their workers."""
        retired = dict(self._draining)
        for task in retired:
            task.cancel()
        await asyncio.gather(*retired, return_exceptions=True)
        for entry in retired.values():
            for worker in entry.workers:
                worker.close()


def fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What a change to a model folder's files changes: (name, size, mtime_ns) of its checkpoint files."""
    files = [folder / META, folder / WEIGHTS, folder / "background" / META, folder / "background" / WEIGHTS]
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(out)
