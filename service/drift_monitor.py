"""The drift monitor of every served model: /score feeds it, GET /models/{name}/drift and the
``genserve_drift_*`` gauges read it (statistics in service/drift.py).

Only uploads scored with the model's calibrated default score type, without a label, enter a
model's window: those are the scores its calibration describes. A model without a calibration
has no window. A reload (service/lifecycle.py) starts the model's window afresh: the new version
has its own calibration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from models.scoring.calibration import DEFAULT_FPR, calibration_for, threshold_sample_size
from service.drift import DriftStats, DriftWindow, fpr_upper_bound
from service.entries import ModelEntry
from service.metrics import Metrics
from service.settings import Settings


def null_rate(meta: dict[str, Any], score_type: str, settings: Settings) -> float:
    """The binomial test's null flag rate: the calibrated rate times ``drift_fpr_margin`` where that
    is set; else the upper 1 - ``drift_alpha`` confidence bound on the rate of a threshold picked
    from the calibration's scores (:func:`fpr_upper_bound`), which depends on the calibration alone;
    the calibrated rate itself where the number of scores is unknown."""
    fpr = float((meta.get("calibration") or {}).get("target_fpr") or DEFAULT_FPR)
    if settings.drift_fpr_margin is not None:
        return min(0.5, fpr * settings.drift_fpr_margin)
    n = threshold_sample_size(meta, score_type)
    if n is None:
        return fpr
    above = (((meta.get("calibration") or {}).get("scores") or {}).get(score_type) or {}).get("above")
    bound = fpr_upper_bound(n, fpr, confidence=1.0 - settings.drift_alpha, above=None if above is None else int(above))
    return min(0.5, bound)


class DriftMonitors:
    """One :class:`DriftWindow` per calibrated model, created on its first upload."""

    def __init__(self, settings: Settings, metrics: Metrics, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self._windows: dict[str, DriftWindow | None] = {}
        self._score_types: dict[str, str] = {}
        self._versions: dict[str, int] = {}  # the version each window's calibration is of

    def window(self, entry: ModelEntry) -> DriftWindow | None:
        """The model's window (None if it has no calibrated default score); a newer version starts a new one."""
        if entry.name not in self._windows or entry.version > self._versions[entry.name]:
            self._windows[entry.name] = self._new_window(entry)
            self._score_types[entry.name] = entry.default_score_type
            self._versions[entry.name] = entry.version
        return self._windows[entry.name]

    def _new_window(self, entry: ModelEntry) -> DriftWindow | None:
        calibration = calibration_for(entry.meta, entry.default_score_type)
        if calibration.threshold is None or calibration.quantiles is None:
            return None
        kwargs: dict[str, Any] = {} if self.clock is None else {"clock": self.clock}
        return DriftWindow(
            size=self.settings.drift_window,
            max_age_s=self.settings.drift_max_age_s,
            fpr=null_rate(entry.meta, entry.default_score_type, self.settings),
            quantiles=calibration.quantiles,
            reference_n=threshold_sample_size(entry.meta, entry.default_score_type),  # the scores behind the quantiles
            alpha=self.settings.drift_alpha,
            min_uploads=self.settings.drift_min_uploads,
            **kwargs,
        )

    def observe(self, entry: ModelEntry, score_type: str, scores: Iterable[tuple[float, bool | None]]) -> None:
        """Add one request's (score, is_outlier) pairs, if they are of the model's calibrated default score."""
        window = self.window(entry)
        if window is None or score_type != self._score_types[entry.name] or entry.version < self._versions[entry.name]:
            return  # not the calibrated score, or answered by a version already replaced
        for score, flagged in scores:
            if flagged is not None:
                window.add(score, flagged)
        self.export(entry.name, window.stats())

    def stats(self, entry: ModelEntry) -> DriftStats | None:
        window = self.window(entry)
        if window is None:
            return None
        stats = window.stats()
        self.export(entry.name, stats)  # uploads may have aged out since the last one
        return stats

    def reset(self, name: str) -> None:
        """Forget a model's window (a new version was loaded, or the model was unloaded)."""
        self._windows.pop(name, None)
        self._score_types.pop(name, None)
        self._versions.pop(name, None)
        for gauge in self._gauges():
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    def _gauges(self) -> list[Any]:
        m = self.metrics
        return [m.drift_uploads, m.drift_flagged_fraction, m.drift_binomial_p, m.drift_ks_statistic, m.drift_ks_p,
                m.drift]  # fmt: skip

    def export(self, name: str, s: DriftStats) -> None:
        m = self.metrics
        m.drift_uploads.labels(model=name).set(s.uploads)
        m.drift_flagged_fraction.labels(model=name).set(s.flagged_fraction or 0.0)
        m.drift_binomial_p.labels(model=name).set(1.0 if s.binomial_p_value is None else s.binomial_p_value)
        m.drift_ks_statistic.labels(model=name).set(s.ks_statistic or 0.0)
        m.drift_ks_p.labels(model=name).set(1.0 if s.ks_p_value is None else s.ks_p_value)
        m.drift.labels(model=name).set(1.0 if s.drift else 0.0)
