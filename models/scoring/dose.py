"""The combined outlier score ``dose``: several summary statistics of one model pass, judged by their
joint in-distribution density, in the spirit of DoSE (Morningstar et al. 2021, "Density of States
Estimation for Out-of-Distribution Detection").

One statistic cannot hold on real uploads: the complexity correction lets textured photos through,
raw likelihood lets simple images through, neither sees clothes sent upside down. The statistics of
:mod:`models.scoring.statistics` each catch some of them, and real uploads are often unusual in two or three
of them at once while extreme in none. So the statistics are combined through their joint density,
fitted on held-out in-distribution images:

1. Per statistic j, the tail probabilities of a value v under a Gaussian kernel density of the
   in-distribution sample (every value a centre, Silverman's bandwidth): close to the empirical
   tail where the sample is dense, and still decreasing beyond it, so images far outside it are
   still ranked.
2. Its normal score z_j = Phi^-1(P(V_j <= v)) (from the smaller tail, |z| at most 37); for a
   one-sided statistic (``tail`` ``upper``) the harmless side is set to 0.
3. The joint density of the normal scores, in the metric P = Sigma^-1 of their in-distribution
   covariance (a garment with a high NLL also has a high complexity; a photo has both high together
   with a bright border and no black background), two ways:

   - ``neighbours`` k > 0 (what ``genserve calibrate`` fits by default): dose(x) = the mean of
     (z - r)^T P (z - r) over the k in-distribution images r nearest to z, a nearest-neighbour
     density estimate. The in-distribution normal scores are not one ellipsoid (garments of
     different classes sit in different corners, one-sided statistics pile up at 0), and an image
     between the corners is unusual however close it is to the overall mean.
   - ``neighbours`` 0: dose(x) = (z - mu)^T P (z - mu), the squared Mahalanobis distance from
     their mean mu (a Gaussian copula; the k = M limit up to a constant).

Either score is a sum of per-statistic shares d_j (P d)_j (d = z - r, averaged over the neighbours;
or d = z - mu), so /score can say which statistics pushed an image over the threshold
(:func:`explain`). The threshold is calibrated on the combination, not per statistic, so the
false-positive rate is the target however many statistics there are, from scores of images that did
not judge themselves (:func:`fit_dose`): each calibration image against the other images
(leave-one-out, for neighbours), or by a fit on another half or fold (Mahalanobis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.scoring.statistics import BOTH, LOWER, STATISTICS, UPPER

DEFAULT_NEIGHBOURS = 5  # genserve calibrate's k: docs/ood.md "Session 12" compares k = 1 to 20
TINY_TAIL = 1e-280  # a kernel tail below this is recomputed in log space (float64 ends near 1e-308)
NEIGHBOUR_CHUNK = 1024  # images per distance matrix (1024 x M float32/64) in nearest-neighbour scores
LN10 = math.log(10.0)


def silverman_bandwidth(values: np.ndarray) -> float:
    """0.9 min(std, IQR / 1.34) n^(-1/5), with a floor for (nearly) constant statistics."""
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std())
    iqr = float(np.subtract(*np.percentile(v, [75, 25])))
    spread = min(std, iqr / 1.34) if iqr > 0 else std
    scale = max(abs(float(np.median(v))), 1.0)
    return max(0.9 * spread * len(v) ** -0.2, 1e-6 * scale)


def ln_tails(values: np.ndarray, *, centres: np.ndarray, bandwidth: float) -> tuple[np.ndarray, np.ndarray]:
    """(ln P(V >= v), ln P(V <= v)) of each value (N,) under the kernel density of ``centres`` (M,),
    each (N,): the means of Phi((c - v) / h) and Phi((v - c) / h) over the centres in float64, with
    Phi(t) = erfc(-t / sqrt 2) / 2 (accurate to the last digits down to 1e-308, where torch's ``ndtr``
    loses its digits below Phi(-6) and is 0 below Phi(-8.3)), each tail from its own Phi, so a
    tiny tail keeps its relative precision; for values so far out that a mean falls below 1e-280,
    the log-sum-exp of log Phi instead."""
    v = torch.as_tensor(np.asarray(values, dtype=np.float64))[:, None]  # (N, 1)
    c = torch.as_tensor(np.asarray(centres, dtype=np.float64))[None, :]  # (1, M)
    s = (v - c) / (bandwidth * math.sqrt(2.0))  # (N, M); Phi((c - v) / h) = erfc(s) / 2
    up, lo = 0.5 * torch.special.erfc(s).mean(1), 0.5 * torch.special.erfc(-s).mean(1)
    ln_up, ln_lo = up.log(), lo.log()
    far = (up < TINY_TAIL) | (lo < TINY_TAIL)
    if bool(far.any()):  # about twice the cost per value, only for the far outliers
        t = -s[far] * math.sqrt(2.0)
        log_m = math.log(c.shape[1])
        ln_up[far] = torch.logsumexp(torch.special.log_ndtr(t), dim=1) - log_m
        ln_lo[far] = torch.logsumexp(torch.special.log_ndtr(-t), dim=1) - log_m
    return ln_up.numpy(), ln_lo.numpy()


def _log10_from(up: np.ndarray, lo: np.ndarray, tail: str) -> np.ndarray:
    """log10 of the ``tail`` probability from both natural-log tails (:func:`ln_tails`)."""
    if tail == UPPER:
        ln_p = up
    elif tail == LOWER:
        ln_p = lo
    elif tail == BOTH:
        ln_p = np.minimum(math.log(2.0) + np.minimum(up, lo), 0.0)
    else:
        raise ValueError(f"unknown tail '{tail}'")
    return ln_p / LN10


def _z_from(up: np.ndarray, lo: np.ndarray, tail: str) -> np.ndarray:
    """Normal scores from both natural-log tails (:func:`normal_scores`)."""
    up_t = torch.as_tensor(np.maximum(up, -700.0))
    lo_t = torch.as_tensor(np.maximum(lo, -700.0))
    z = torch.where(up_t < lo_t, -torch.special.ndtri(up_t.exp()), torch.special.ndtri(lo_t.exp())).numpy()
    if tail == UPPER:
        z = np.maximum(z, 0.0)
    elif tail == LOWER:
        z = np.minimum(z, 0.0)
    return z


def log10_tail(values: np.ndarray, *, centres: np.ndarray, bandwidth: float, tail: str) -> np.ndarray:
    """log10 of the tail probability of each value (N,) under the kernel density of ``centres`` (M,):
    P(V >= v) for ``upper``, P(V <= v) for ``lower``, 2 min of the two (at most 1) for ``both``.
    Values in (-inf, 0]."""
    if tail not in (UPPER, LOWER, BOTH):
        raise ValueError(f"unknown tail '{tail}'")
    return _log10_from(*ln_tails(values, centres=centres, bandwidth=bandwidth), tail)


def normal_scores(values: np.ndarray, *, centres: np.ndarray, bandwidth: float, tail: str) -> np.ndarray:
    """Each value's normal score z = Phi^-1(P(V <= v)) (N,), from the tails of :func:`log10_tail`,
    computed from the smaller tail so that far outliers keep their distance (|z| at most 37); for a
    one-sided statistic the harmless side is set to 0 (an ``upper`` statistic's z is max(z, 0))."""
    return _z_from(*ln_tails(values, centres=centres, bandwidth=bandwidth), tail)


@dataclass
class DoseFit:
    """The fitted joint density: per statistic its tail, its sorted in-distribution sample (M,) (the
    kernel centres) and the kernel bandwidth; the mean (S,) and precision (S, S)
    of the statistics' normal scores; with ``neighbours`` k > 0 the in-distribution normal scores
    themselves (``reference``, (M, S)), whose k nearest judge an image."""

    statistics: list[str]
    tails: list[str]
    centres: np.ndarray  # (S, M), each row sorted
    bandwidths: np.ndarray  # (S,)
    mean: np.ndarray  # (S,)
    precision: np.ndarray  # (S, S)
    neighbours: int = 0  # 0: Mahalanobis distance from the mean
    reference: np.ndarray | None = None  # (M, S) in-distribution normal scores, for neighbours > 0

    def __post_init__(self) -> None:
        if self.neighbours < 0:
            raise ValueError(f"neighbours must be 0 (Mahalanobis) or positive, got {self.neighbours}")
        if self.neighbours and (self.reference is None or len(self.reference) < self.neighbours + 1):
            raise ValueError(f"{self.neighbours} neighbours need a reference of more than {self.neighbours} images")
        # P = L L^T: distances in the metric P are Euclidean distances of z L
        self._whiten = np.linalg.cholesky(self.precision)
        self._reference_w = None if self.reference is None else torch.as_tensor(self.reference @ self._whiten)

    @classmethod
    def fit(
        cls,
        stats: dict[str, np.ndarray],
        names: list[str],
        *,
        tails: dict[str, str] | None = None,
        neighbours: int = 0,
    ) -> DoseFit:
        """Fit on in-distribution values ``stats[name]`` (N,) for each of ``names``; ``neighbours`` > 0
        keeps their normal scores as the reference of a nearest-neighbour density."""
        tails = tails or {n: STATISTICS[n].tail for n in names}
        centres, bws = [], []
        for n in names:
            v = np.asarray(stats[n], dtype=np.float64)
            if not np.isfinite(v).all():
                raise ValueError(f"statistic '{n}' has {int((~np.isfinite(v)).sum())} non-finite values")
            centres.append(np.sort(v))
            bws.append(silverman_bandwidth(v))
        s = len(names)
        fit = cls(list(names), [tails[n] for n in names], np.stack(centres), np.asarray(bws), np.zeros(s), np.eye(s))
        z = fit.normal_scores(stats)
        cov = np.atleast_2d(np.cov(z.T)) + 1e-6 * np.eye(s)  # a ridge for (nearly) constant statistics
        precision = np.linalg.inv(cov)
        precision = (precision + precision.T) / 2
        reference = z if neighbours else None
        return cls(fit.statistics, fit.tails, fit.centres, fit.bandwidths, z.mean(0), precision, neighbours, reference)

    def log10_p(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        """(N, S) log10 tail probabilities of each image's statistics (each on its own tail side)."""
        cols = [
            log10_tail(np.asarray(stats[n]), centres=self.centres[j], bandwidth=float(self.bandwidths[j]), tail=t)
            for j, (n, t) in enumerate(zip(self.statistics, self.tails, strict=True))
        ]
        return np.stack(cols, axis=1)

    def normal_scores(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        """(N, S) normal scores of each image's statistics (:func:`normal_scores`)."""
        cols = [
            normal_scores(np.asarray(stats[n]), centres=self.centres[j], bandwidth=float(self.bandwidths[j]), tail=t)
            for j, (n, t) in enumerate(zip(self.statistics, self.tails, strict=True))
        ]
        return np.stack(cols, axis=1)

    def contributions(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        """(N, S) each statistic's share of the score: d_j (P d)_j with d = z - mean; rows sum to the score."""
        return self.share(self.normal_scores(stats))

    def share(self, z: np.ndarray, *, leave_out: np.ndarray | None = None) -> np.ndarray:
        """(N, S) the shares d_j (P d)_j of normal scores z (N, S): d = z - mean, or with neighbours
        the mean of the shares over the k nearest reference rows r (d = z - r). ``leave_out`` (N,):
        the reference row that is each image itself, never its own neighbour (-1: none)."""
        if not self.neighbours:
            d = z - self.mean
            return d * (d @ self.precision)
        assert self.reference is not None and self._reference_w is not None
        k, out = self.neighbours, np.empty_like(z, dtype=np.float64)
        for s in range(0, len(z), NEIGHBOUR_CHUNK):
            zs = z[s : s + NEIGHBOUR_CHUNK]
            dist = torch.cdist(torch.as_tensor(zs @ self._whiten), self._reference_w)  # (n, M)
            if leave_out is not None:
                rows = torch.arange(len(zs))
                own = torch.as_tensor(leave_out[s : s + NEIGHBOUR_CHUNK])
                dist[rows[own >= 0], own[own >= 0]] = math.inf
            idx = dist.topk(k, dim=1, largest=False).indices.numpy()  # (n, k)
            d = zs[:, None, :] - self.reference[idx]  # (n, k, S)
            out[s : s + NEIGHBOUR_CHUNK] = (d * (d @ self.precision)).mean(axis=1)
        return out

    def leave_one_out_scores(self) -> np.ndarray:
        """(M,) each reference image's score against the other M - 1 (neighbours only): how fresh
        in-distribution images score, since no image is its own neighbour."""
        if self.reference is None or not self.neighbours:
            raise ValueError("leave-one-out scores need a nearest-neighbour fit")
        return self.share(self.reference, leave_out=np.arange(len(self.reference))).sum(axis=1)

    def explain_arrays(self, stats: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(log10 tail probabilities (N, S), contributions (N, S)) from one kernel pass per statistic."""
        logp, zs = [], []
        for j, (n, t) in enumerate(zip(self.statistics, self.tails, strict=True)):
            up, lo = ln_tails(np.asarray(stats[n]), centres=self.centres[j], bandwidth=float(self.bandwidths[j]))
            logp.append(_log10_from(up, lo, t))
            zs.append(_z_from(up, lo, t))
        return np.stack(logp, axis=1), self.share(np.stack(zs, axis=1))

    def score(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        """dose (N,): the mean of (z - r)^T P (z - r) over the k nearest reference rows r, or with
        neighbours 0 (z - mean)^T P (z - mean), the squared Mahalanobis distance of the normal scores."""
        return self.contributions(stats).sum(axis=1)

    def to_json(self) -> dict[str, Any]:
        combination = (
            f"mean squared distance, in the metric of the inverse covariance, to the {self.neighbours} nearest "
            "in-distribution images' normal scores (a nearest-neighbour density)"
            if self.neighbours
            else "squared Mahalanobis distance of the statistics' normal scores (Gaussian copula)"
        )
        out: dict[str, Any] = {
            "statistics": [
                {
                    "name": n,
                    "tail": t,
                    "bandwidth": float(self.bandwidths[j]),
                    "sample": [float(f"{c:.7g}") for c in self.centres[j]],
                    "description": STATISTICS[n].description if n in STATISTICS else "",
                }
                for j, (n, t) in enumerate(zip(self.statistics, self.tails, strict=True))
            ],
            "mean": [float(m) for m in self.mean],
            "precision": [[float(p) for p in row] for row in self.precision],
            "combination": combination,
        }
        if self.neighbours:
            assert self.reference is not None
            out["neighbours"] = self.neighbours
            out["reference"] = [[float(f"{v:.6g}") for v in row] for row in self.reference]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DoseFit:
        st = d["statistics"]
        return cls(
            [s["name"] for s in st],
            [s["tail"] for s in st],
            np.asarray([s["sample"] for s in st], dtype=np.float64),
            np.asarray([s["bandwidth"] for s in st], dtype=np.float64),
            np.asarray(d["mean"], dtype=np.float64),
            np.asarray(d["precision"], dtype=np.float64),
            int(d.get("neighbours") or 0),
            np.asarray(d["reference"], dtype=np.float64) if d.get("reference") else None,
        )


def split_halves(n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two random halves of n items: (fit, calibrate)."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


def fit_dose(
    stats: dict[str, np.ndarray],
    names: list[str],
    *,
    seed: int = 0,
    tails: dict[str, str] | None = None,
    folds: int = 0,
    neighbours: int = 0,
) -> tuple[DoseFit, np.ndarray, np.ndarray]:
    """The dose fit and the scores that calibrate its threshold, none of them from a fit that saw
    its own image: returns (fit, threshold scores, their images' indices).

    ``neighbours`` k > 0 (nearest-neighbour density): the fit is on all images and each image is
    scored against the other n - 1 (leave-one-out: never its own neighbour; its own value is still
    one of the n in each statistic's marginal kernel density). ``neighbours`` 0 (Mahalanobis):
    ``folds`` 0, the densities are fitted on one random half of the in-distribution ``stats`` and
    score the other half; ``folds`` k >= 2 (cross-fitting), each of k random folds is scored by a
    fit on the other k - 1, so every image gets an out-of-fold score, and the returned fit is the
    one on all images (fitted on more images than any fold's, it scores fresh in-distribution
    images at most as high, in expectation, as the folds scored theirs). The threshold is then a
    quantile of those scores (:func:`models.scoring.calibration.calibrate_scores`)."""
    n = len(next(iter(stats.values())))
    if n < 4:
        raise ValueError(f"dose needs at least 4 calibration images, got {n}")
    arrays = {k: np.asarray(v) for k, v in stats.items()}
    if neighbours:
        if folds:
            raise ValueError("a nearest-neighbour fit is calibrated leave-one-out; folds apply to neighbours=0")
        if not 1 <= neighbours <= (n - 1) // 2:
            raise ValueError(
                f"neighbours must be between 1 and (n - 1) / 2 = {(n - 1) // 2} for {n} images, got {neighbours}"
            )
        fit = DoseFit.fit(arrays, names, tails=tails, neighbours=neighbours)
        return fit, fit.leave_one_out_scores(), np.arange(n)
    if folds == 0:
        fit_idx, cal_idx = split_halves(n, seed=seed)
        fit = DoseFit.fit({k: v[fit_idx] for k, v in arrays.items()}, names, tails=tails)
        return fit, fit.score({k: v[cal_idx] for k, v in arrays.items()}), cal_idx
    if not 2 <= folds <= n // 2:
        raise ValueError(f"folds must be 0 or between 2 and half the {n} images, got {folds}")
    perm = np.random.default_rng(seed).permutation(n)
    scores = np.empty(n)
    for f in range(folds):
        held = perm[f::folds]
        rest = np.setdiff1d(perm, held)
        part = DoseFit.fit({k: v[rest] for k, v in arrays.items()}, names, tails=tails)
        scores[held] = part.score({k: v[held] for k, v in arrays.items()})
    return DoseFit.fit(arrays, names, tails=tails), scores, np.arange(n)


def explain(
    values: dict[str, float], log10_p: np.ndarray, contributions: np.ndarray, fit: DoseFit, threshold: float | None
) -> dict[str, Any]:
    """The ``explanation`` of one image's dose score: per statistic its value, its tail probability
    under the in-distribution data and its contribution to the score (contributions sum to the
    score); ``decided_by``: when the image is refused, the fewest statistics, largest contribution
    first, whose contributions alone exceed the threshold (their ``crossed`` is true);
    ``most_extreme``: the statistic with the smallest tail probability."""
    order = np.argsort(-contributions)
    decided: list[str] = []
    if threshold is not None and float(contributions.sum()) > threshold:
        total = 0.0
        for j in order:
            decided.append(fit.statistics[j])
            total += float(contributions[j])
            if total > threshold:
                break
    per = {}
    for j, n in enumerate(fit.statistics):
        per[n] = {
            "value": float(values[n]),
            "tail": fit.tails[j],
            "p_value": float(10.0 ** float(log10_p[j])),
            "contribution": float(contributions[j]),
            "crossed": n in decided,
        }
    return {"statistics": per, "decided_by": decided, "most_extreme": fit.statistics[int(np.argmin(log10_p))]}
