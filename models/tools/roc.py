"""How well a score separates in-distribution images (negatives) from outliers (positives): the
ROC curve, its area (AUROC), the area under precision-recall (AUPRC) and the false-positive rate at
a true-positive rate. Scores: higher = more anomalous."""

from __future__ import annotations

import numpy as np


def roc_curve(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) over every distinct threshold, flagging score >= threshold, from
    (0, 0) to (1, 1)."""
    s = np.concatenate([scores_in, scores_out]).astype(np.float64)
    y = np.concatenate([np.zeros(len(scores_in)), np.ones(len(scores_out))])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each group of equal scores
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    fpr = np.r_[0.0, fps / max(1, len(scores_in))]
    tpr = np.r_[0.0, tps / max(1, len(scores_out))]
    return fpr, tpr, np.r_[np.inf, s[last]]


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """P(score_out > score_in) + P(tie)/2: the area under the ROC curve (trapezoids)."""
    fpr, tpr, _ = roc_curve(scores_in, scores_out)
    return float(np.trapezoid(tpr, fpr))


def auprc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Average precision, out-of-distribution as the positive class: sum_i (R_i - R_{i-1}) P_i."""
    fpr, tpr, _ = roc_curve(scores_in, scores_out)
    tp = tpr[1:] * len(scores_out)
    fp = fpr[1:] * len(scores_in)
    precision = tp / np.maximum(tp + fp, 1e-12)
    return float(np.sum(np.diff(tpr) * precision))


def fpr_at_tpr(scores_in: np.ndarray, scores_out: np.ndarray, tpr_target: float = 0.95) -> float:
    """The lowest false-positive rate of any threshold that flags at least ``tpr_target`` of the
    out-of-distribution images."""
    fpr, tpr, _ = roc_curve(scores_in, scores_out)
    return float(fpr[np.argmax(tpr >= tpr_target - 1e-12)])


# ---- the evaluation --------------------------------------------------------------------------------
