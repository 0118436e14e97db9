"""Multi-label metrics in numpy: ROC AUC, RSNA weighted log loss, F1 and friends.

Conventions (also in ``docs/training.md``):

* ``y_true`` is (N, L) 0/1, ``y_prob`` (N, L) probabilities, ``y_pred`` (N, L) 0/1,
  labels in :data:`ich_node.labels.LABELS` order.
* **macro**: the metric per label, then the unweighted mean over labels.
* **micro**: TP, FP, FN, TN pooled over all (sample, label) cells, then the metric.
* **samples**: the metric per sample (over its labels), then the mean over samples.
  Here a ratio with a zero denominator is 1 (scikit-learn's ``zero_division=1``):
  an image with no true and no predicted positive scores 1 on all four metrics
  (nothing to find, nothing wrongly found); one with a false positive only has
  precision 0, recall 1, F1 and Jaccard 0.
* In the macro and micro forms a ratio with a zero denominator is 0
  (scikit-learn's ``zero_division=0``): a label without positives and without
  predictions scores 0 in the macro mean.
* **accuracy** (headline) is label-wise: the fraction of correct (sample, label)
  cells, i.e. 1 - Hamming loss; ``exact_match`` is the fraction of samples with
  all labels right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ich_node.labels import LABELS, RSNA_WEIGHTS

_EPS = 1e-15


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve of one label (Mann-Whitney U, ties count half).

    Parameters
    ----------
    y_true : numpy.ndarray
        (N,) 0/1.
    y_score : numpy.ndarray
        (N,) scores; higher means more likely positive.

    Returns
    -------
    float
        In [0, 1]; NaN when only one class is present.
    """
    t = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if t.shape != s.shape:
        raise ValueError(f"y_true and y_score differ in shape: {t.shape} vs {s.shape}")
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Average ranks (1-based) over groups of tied scores.
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.size]))
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def weighted_log_loss(
    y_true: np.ndarray, y_prob: np.ndarray, weights: Mapping[str, float] = RSNA_WEIGHTS
) -> float:
    """RSNA 2019 metric: per image the weighted mean of the six binary log losses.

    ``mean_i [ sum_l w_l * BCE(y_il, p_il) / sum_l w_l ]`` with ``any`` weighted 2,
    subtypes 1, probabilities clipped to [1e-15, 1 - 1e-15].
    """
    t = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(y_prob, dtype=np.float64), _EPS, 1 - _EPS)
    w = np.array([weights[name] for name in LABELS], dtype=np.float64)
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    return float(((bce * w).sum(axis=1) / w.sum()).mean())


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(num.shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, object]:
    """Accuracy, precision, recall, F1 and Jaccard: macro, micro, samples, per label.

    Parameters
    ----------
    y_true, y_pred : numpy.ndarray
        (N, L) 0/1.

    Returns
    -------
    dict
        ``accuracy`` (label-wise), ``exact_match``, and for each of
        ``precision, recall, f1, jaccard`` a dict with ``macro``, ``micro``,
        ``samples`` and ``per_label`` (dict label -> value), plus
        ``support`` (positives per label).
    """
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    if t.shape != p.shape or t.ndim != 2:
        raise ValueError(f"y_true and y_pred must both be (N, L), got {t.shape} and {p.shape}")
    names = LABELS if t.shape[1] == len(LABELS) else tuple(str(j) for j in range(t.shape[1]))
    tp, fp, fn = (t & p), (~t & p), (t & ~p)
    out: dict[str, object] = {
        "n": int(t.shape[0]),
        "accuracy": float((t == p).mean()) if t.size else float("nan"),
        "exact_match": float((t == p).all(axis=1).mean()) if t.size else float("nan"),
        "support": dict(zip(names, t.sum(axis=0).astype(int).tolist(), strict=True)),
    }

    def forms(axis_tp: np.ndarray, axis_fp: np.ndarray, axis_fn: np.ndarray, empty: float):
        precision = _ratio(axis_tp, axis_tp + axis_fp, empty)
        recall = _ratio(axis_tp, axis_tp + axis_fn, empty)
        f1 = _ratio(2 * axis_tp, 2 * axis_tp + axis_fp + axis_fn, empty)
        jaccard = _ratio(axis_tp, axis_tp + axis_fp + axis_fn, empty)
        return {"precision": precision, "recall": recall, "f1": f1, "jaccard": jaccard}

    per_label = forms(tp.sum(0), fp.sum(0), fn.sum(0), 0.0)
    micro = forms(np.array(tp.sum()), np.array(fp.sum()), np.array(fn.sum()), 0.0)
    per_sample = forms(tp.sum(1), fp.sum(1), fn.sum(1), 1.0)
    for name in ("precision", "recall", "f1", "jaccard"):
        out[name] = {
            "macro": float(per_label[name].mean()),
            "micro": float(micro[name]),
            "samples": float(per_sample[name].mean()) if t.shape[0] else float("nan"),
            "per_label": dict(zip(names, per_label[name].tolist(), strict=True)),
        }
    return out


def best_f1_threshold(y_true: np.ndarray, y_prob: np.ndarray, fallback: float = 0.5) -> float:
    """The threshold that maximises F1 of one label on validation data.

    Candidates are the midpoints between consecutive distinct predicted
    probabilities (a prediction is positive when ``p >= threshold``). On ties the
    highest threshold wins (fewer false alarms). ``fallback`` when the label has
    no positive, or no negative, in ``y_true``.
    """
    t = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_prob, dtype=np.float64).ravel()
    if t.all() or not t.any():
        return fallback
    values = np.unique(s)[::-1]  # descending
    lower = np.concatenate((values[1:], [max(values[-1] - 1e-6, 0.0)]))
    candidates = (values + lower) / 2.0
    best, best_f1 = fallback, -1.0
    n_pos = t.sum()
    for c in candidates:
        pred = s >= c
        tp = np.sum(pred & t)
        f1 = 2 * tp / (pred.sum() + n_pos)
        if f1 > best_f1 + 1e-12:
            best, best_f1 = float(c), float(f1)
    return best


def choose_thresholds(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """Per-label :func:`best_f1_threshold` on (N, 6) arrays, keyed by label."""
    return {name: best_f1_threshold(y_true[:, j], y_prob[:, j]) for j, name in enumerate(LABELS)}


def apply_thresholds(y_prob: np.ndarray, thresholds: Mapping[str, float]) -> np.ndarray:
    """(N, 6) probabilities -> (N, 6) uint8 decisions, ``p >= threshold``."""
    t = np.array([thresholds[name] for name in LABELS], dtype=np.float64)
    return (np.asarray(y_prob) >= t).astype(np.uint8)


def group_max(keys: Sequence[str], values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Per group the max over its rows: study-level labels or probabilities.

    Returns the sorted group keys and (G, L) maxima.
    """
    groups = sorted(set(keys))
    where = {k: i for i, k in enumerate(groups)}
    arr = np.asarray(values, dtype=np.float64)
    out = np.full((len(groups), arr.shape[1]), -np.inf)
    np.maximum.at(out, np.array([where[k] for k in keys], dtype=np.int64), arr)
    return groups, out


def full_report(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: Mapping[str, float]
) -> dict[str, object]:
    """Everything for one level (images or studies): AUC, log loss, thresholded metrics."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    auc = {name: roc_auc(t[:, j], p[:, j]) for j, name in enumerate(LABELS)}
    finite = [v for v in auc.values() if np.isfinite(v)]
    report: dict[str, object] = {
        "roc_auc": auc,
        "roc_auc_macro": float(np.mean(finite)) if finite else float("nan"),
        "weighted_log_loss": weighted_log_loss(t, p),
    }
    report.update(classification_metrics(t, apply_thresholds(p, thresholds)))
    return report
