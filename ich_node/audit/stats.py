"""The audit's statistics: proportions with Wilson intervals, ROC AUC with DeLong's
interval, calibration, operating points, population stability.

Libraries where they have the method: SciPy for the Wilson score interval
(:meth:`scipy.stats.binomtest` ``.proportion_ci(method="wilson")``, Wilson 1927,
without continuity correction; method 3 of Newcombe 1998) and the midranks of
DeLong's method (:func:`scipy.stats.rankdata`); scikit-learn for the ROC curve,
the AUC and the Brier score (:func:`sklearn.metrics.roc_curve`,
:func:`~sklearn.metrics.roc_auc_score`, :func:`~sklearn.metrics.brier_score_loss`).
DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988) in the fast midrank
form of Sun & Xu (2014) is written here (neither library has it); the
bootstrap of the operating point too (percentile intervals, resampling
positives and negatives apart, a fixed seed).

Every function takes plain arrays: ``y`` (N,) of 0/1 truth and ``score`` (N,)
float probabilities in [0, 1]. A proportion whose denominator is 0 has no
value and no interval (``None``), never a made-up 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
from scipy import stats as sps

#: Two-sided confidence level of every interval.
CONFIDENCE: Final = 0.95
#: z for :data:`CONFIDENCE` (normal quantile), for DeLong's interval.
Z: Final = float(sps.norm.ppf(0.5 + CONFIDENCE / 2))
#: Resamples of the operating-point bootstrap.
BOOTSTRAP_RESAMPLES: Final = 1000
#: Population stability index above which a month's scores have shifted (flagged),
#: and above which they are worth watching (the usual credit-scoring rule of thumb).
PSI_SHIFT: Final = 0.25
PSI_WATCH: Final = 0.10
#: Floor of a bin's share in the PSI, so that an empty bin gives a finite term.
PSI_EPSILON: Final = 1e-4


@dataclass(frozen=True, slots=True)
class Proportion:
    """``k`` of ``n``, its value and its Wilson 95% interval (``None`` when ``n`` is 0)."""

    k: int
    n: int
    value: float | None
    low: float | None
    high: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> Proportion:
    """``k / n`` with the Wilson score interval (SciPy's ``binomtest``).

    Raises
    ------
    ValueError
        When ``k`` is not in ``[0, n]``.
    """
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k!r}, n={n!r}")
    if n == 0:
        return Proportion(0, 0, None, None, None)
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Proportion(k, n, k / n, float(ci.low), float(ci.high))


@dataclass(frozen=True, slots=True)
class Confusion:
    """Counts of a binary decision against the truth."""

    tp: int
    fp: int
    tn: int
    fn: int

    @classmethod
    def of(cls, y: np.ndarray, positive: np.ndarray) -> Confusion:
        """``y`` (N,) truth 0/1 and ``positive`` (N,) bool decisions."""
        y = np.asarray(y).astype(bool)
        positive = np.asarray(positive).astype(bool)
        if y.shape != positive.shape:
            raise ValueError(f"y {y.shape} and positive {positive.shape} differ in shape")
        return cls(
            int(np.sum(y & positive)),
            int(np.sum(~y & positive)),
            int(np.sum(~y & ~positive)),
            int(np.sum(y & ~positive)),
        )

    def metrics(self) -> dict[str, Proportion]:
        """Prevalence, sensitivity, specificity, PPV and NPV, each with its Wilson interval."""
        n = self.tp + self.fp + self.tn + self.fn
        return {
            "prevalence": wilson(self.tp + self.fn, n),
            "sensitivity": wilson(self.tp, self.tp + self.fn),
            "specificity": wilson(self.tn, self.tn + self.fp),
            "ppv": wilson(self.tp, self.tp + self.fp),
            "npv": wilson(self.tn, self.tn + self.fn),
        }


@dataclass(frozen=True, slots=True)
class Auc:
    """ROC AUC with DeLong's variance and its 95% interval (normal, clipped to [0, 1]).

    ``value`` is ``None`` when one class is missing; ``low``/``high`` are ``None``
    when a class has fewer than two cases (no variance). A variance of 0 (the
    classes separated completely) gives an interval of no width: ``degenerate``.
    """

    value: float | None
    low: float | None
    high: float | None
    variance: float | None
    n_positive: int
    n_negative: int
    method: str = "DeLong (Sun & Xu 2014 midranks), normal interval clipped to [0, 1]"

    @property
    def degenerate(self) -> bool:
        return self.variance == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "degenerate": self.degenerate}


def _split(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    if y.shape != score.shape or y.ndim != 1:
        raise ValueError(f"y {y.shape} and score {score.shape} must be equal 1-d shapes")
    if not np.all(np.isfinite(score)):
        raise ValueError("score holds a value that is not finite")
    return score[y], score[~y]


def delong_auc(y: np.ndarray, score: np.ndarray) -> Auc:
    """ROC AUC of ``score`` for ``y`` with DeLong's variance.

    The AUC is scikit-learn's (:func:`sklearn.metrics.roc_auc_score`); the variance
    is DeLong's structural-components estimate, ``S10 / m + S01 / n``, computed from
    midranks (Sun & Xu 2014). Ties count one half.
    """
    from sklearn.metrics import roc_auc_score

    pos, neg = _split(y, score)
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return Auc(None, None, None, None, m, n)
    auc = float(roc_auc_score(np.r_[np.ones(m), np.zeros(n)], np.r_[pos, neg]))
    if m < 2 or n < 2:
        return Auc(auc, None, None, None, m, n)
    tx = sps.rankdata(pos)  # midranks within the positives
    ty = sps.rankdata(neg)
    tz = sps.rankdata(np.r_[pos, neg])  # midranks in both together
    v10 = (tz[:m] - tx) / n  # per positive: share of negatives below it (ties 1/2)
    v01 = 1.0 - (tz[m:] - ty) / m  # per negative: share of positives above it
    variance = float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    half = Z * math.sqrt(max(variance, 0.0))
    return Auc(auc, max(0.0, auc - half), min(1.0, auc + half), variance, m, n)


@dataclass(frozen=True, slots=True)
class CalibrationBin:
    """One bin of predicted probability: ``[low, high)`` (the last bin includes 1)."""

    low: float
    high: float
    n: int
    mean_predicted: float | None
    observed: Proportion

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "observed": self.observed.to_dict()}


def calibration_table(y: np.ndarray, score: np.ndarray, bins: int = 10) -> list[CalibrationBin]:
    """Observed rate of ``y`` against the mean ``score`` in ``bins`` equal-width bins.

    Empty bins are kept (``n`` 0), so tables of two audits line up bin for bin.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        table.append(
            CalibrationBin(
                float(edges[b]),
                float(edges[b + 1]),
                n,
                float(score[mask].mean()) if n else None,
                wilson(int(y[mask].sum()), n),
            )
        )
    return table


def brier(y: np.ndarray, score: np.ndarray) -> float | None:
    """Brier score (mean squared error of the probability; scikit-learn), ``None`` if empty."""
    from sklearn.metrics import brier_score_loss

    y = np.asarray(y).astype(int)
    if y.size == 0:
        return None
    return float(brier_score_loss(y, np.asarray(score, dtype=np.float64), pos_label=1))


def _threshold_for(pos_desc: np.ndarray, target: float) -> float:
    """The highest threshold ``t`` with ``mean(pos >= t) >= target``: the k-th highest
    positive score, k = ceil(target * m). ``pos_desc``: the positives' scores, sorted
    in descending order."""
    k = max(1, math.ceil(target * len(pos_desc) - 1e-12))
    return float(pos_desc[k - 1])


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """The threshold that reaches ``target`` sensitivity, and what it gives.

    ``threshold``: the highest score threshold (a series is positive when its
    probability is at least it) whose sensitivity is at least ``target``, read off
    scikit-learn's ROC curve; ``sensitivity`` and ``specificity`` at it with Wilson
    intervals (given the threshold); ``threshold_interval`` and
    ``specificity_interval``: percentile intervals of the bootstrap (``resamples``
    resamples of positives and of negatives, seed 0), which also count the
    uncertainty of choosing the threshold on these data.
    """

    target: float
    threshold: float | None
    sensitivity: Proportion
    specificity: Proportion
    threshold_interval: tuple[float, float] | None
    specificity_interval: tuple[float, float] | None
    resamples: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_sensitivity": self.target,
            "threshold": self.threshold,
            "sensitivity": self.sensitivity.to_dict(),
            "specificity": self.specificity.to_dict(),
            "threshold_interval": None
            if self.threshold_interval is None
            else list(self.threshold_interval),
            "specificity_interval": None
            if self.specificity_interval is None
            else list(self.specificity_interval),
            "bootstrap_resamples": self.resamples,
            "method": "threshold from the ROC curve (scikit-learn); Wilson intervals at it; "
            "percentile bootstrap (positives and negatives resampled apart, seed 0) "
            "for the threshold and the specificity",
        }


def operating_point(
    y: np.ndarray, score: np.ndarray, target: float, resamples: int = BOOTSTRAP_RESAMPLES
) -> OperatingPoint:
    """The operating point for a target sensitivity (see :class:`OperatingPoint`).

    Raises
    ------
    ValueError
        When ``target`` is not in (0, 1].
    """
    from sklearn.metrics import roc_curve

    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target!r}")
    pos, neg = _split(y, score)
    none = OperatingPoint(target, None, wilson(0, 0), wilson(0, 0), None, None, 0)
    if len(pos) == 0 or len(neg) == 0:
        return none
    truth = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    _, tpr, thresholds = roc_curve(truth, np.r_[pos, neg], drop_intermediate=False)
    i = int(np.argmax(tpr >= target - 1e-12))  # the first (highest) threshold reaching it
    threshold = float(thresholds[i])
    sens = wilson(int(np.sum(pos >= threshold)), len(pos))
    spec = wilson(int(np.sum(neg < threshold)), len(neg))
    rng = np.random.default_rng(0)
    picked = np.empty(resamples)
    specs = np.empty(resamples)
    for r in range(resamples):
        p = np.sort(rng.choice(pos, len(pos)))[::-1]
        q = rng.choice(neg, len(neg))
        picked[r] = _threshold_for(p, target)
        specs[r] = np.mean(q < picked[r])
    lo, hi = (1 - CONFIDENCE) / 2 * 100, (1 + CONFIDENCE) / 2 * 100
    return OperatingPoint(
        target,
        threshold,
        sens,
        spec,
        (float(np.percentile(picked, lo)), float(np.percentile(picked, hi))),
        (float(np.percentile(specs, lo)), float(np.percentile(specs, hi))),
        resamples,
    )


@dataclass(frozen=True, slots=True)
class Stability:
    """Population stability index of a month's scores against a reference month."""

    psi: float
    edges: tuple[float, ...]  # inner bin edges (deciles of the reference)
    expected: tuple[float, ...]  # the reference's share per bin
    actual: tuple[float, ...]  # this month's share per bin

    @property
    def flag(self) -> str:
        """``shift`` above :data:`PSI_SHIFT`, ``watch`` above :data:`PSI_WATCH`, else ``stable``."""
        if self.psi > PSI_SHIFT:
            return "shift"
        return "watch" if self.psi > PSI_WATCH else "stable"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flag": self.flag}


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> Stability | None:
    """PSI = sum over bins of (a - e) ln(a / e), bins at the reference's quantiles.

    ``e`` and ``a`` are the reference's and the current scores' shares per bin
    (floored at :data:`PSI_EPSILON`). Bin edges are the reference's deciles (only
    distinct ones), so each bin holds about a tenth of the reference. ``None``
    when either sample is empty.
    """
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    if reference.size == 0 or current.size == 0:
        return None
    inner = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    # bin i holds scores in [inner[i-1], inner[i]): right-open, as np.digitize
    e = np.bincount(np.digitize(reference, inner), minlength=len(inner) + 1) / reference.size
    a = np.bincount(np.digitize(current, inner), minlength=len(inner) + 1) / current.size
    e_f, a_f = np.maximum(e, PSI_EPSILON), np.maximum(a, PSI_EPSILON)
    value = float(np.sum((a_f - e_f) * np.log(a_f / e_f)))
    return Stability(value, tuple(map(float, inner)), tuple(map(float, e)), tuple(map(float, a)))


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float | None:
    """Two-sided Fisher exact test of two proportions (SciPy); ``None`` if either n is 0."""
    if n1 == 0 or n2 == 0:
        return None
    return float(sps.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue)
