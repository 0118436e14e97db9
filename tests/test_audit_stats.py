"""The audit's statistics against published worked examples and independent numpy
recomputations (written out here from the definitions, not calling the module)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ich_node.audit import stats


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe RG (1998) Two-sided confidence intervals for the single proportion:
        # comparison of seven methods. Stat Med 17:857-872, Table I, method 3 (Wilson
        # score interval without continuity correction).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (29, 29, 0.8830, 1.0000),
    ],
)
def test_wilson_interval_matches_newcombe_1998(k: int, n: int, low: float, high: float) -> None:
    p = stats.wilson(k, n)
    assert p.value == pytest.approx(k / n)
    assert p.low == pytest.approx(low, abs=5e-5)
    assert p.high == pytest.approx(high, abs=5e-5)


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927): (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    z = 1.959963984540054
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_wilson_interval_equals_its_closed_form() -> None:
    for k, n in [(0, 1), (1, 1), (3, 7), (50, 100), (999, 1000)]:
        low, high = _wilson_by_hand(k, n)
        p = stats.wilson(k, n)
        assert (p.low, p.high) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))


def test_no_cases_no_value() -> None:
    p = stats.wilson(0, 0)
    assert p.value is None and p.low is None and p.high is None
    with pytest.raises(ValueError):
        stats.wilson(3, 2)


def test_confusion_metrics_against_numpy() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(200) < 0.3
    decided = rng.random(200) < 0.35
    c = stats.Confusion.of(y, decided)
    tp = int(np.count_nonzero(np.logical_and(y, decided)))
    fn = int(np.count_nonzero(np.logical_and(y, np.logical_not(decided))))
    fp = int(np.count_nonzero(np.logical_and(np.logical_not(y), decided)))
    tn = 200 - tp - fn - fp
    assert (c.tp, c.fp, c.tn, c.fn) == (tp, fp, tn, fn)
    m = c.metrics()
    for name, (num, den) in {
        "prevalence": (tp + fn, 200), "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp), "ppv": (tp, tp + fp), "npv": (tn, tn + fn),
    }.items():  # fmt: skip
        assert (m[name].k, m[name].n) == (num, den)
        assert m[name].value == pytest.approx(num / den)
        assert (m[name].low, m[name].high) == pytest.approx(_wilson_by_hand(num, den))


def _delong_by_hand(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """AUC and DeLong's variance from the m x n kernel psi(x, y) (DeLong et al. 1988)."""
    psi = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    v10 = psi.mean(axis=1)  # structural components of the positives
    v01 = psi.mean(axis=0)  # and of the negatives
    m, n = len(pos), len(neg)
    s10 = ((v10 - auc) ** 2).sum() / (m - 1)
    s01 = ((v01 - auc) ** 2).sum() / (n - 1)
    return float(auc), float(s10 / m + s01 / n)


def test_delong_against_the_structural_components() -> None:
    rng = np.random.default_rng(11)
    for m, n, ties in ((30, 70, False), (12, 9, True), (200, 400, False)):
        pos = rng.normal(1.0, 1.0, m)
        neg = rng.normal(0.0, 1.0, n)
        if ties:  # scores on a coarse grid: many ties within and across classes
            pos, neg = np.round(pos), np.round(neg)
        y = np.r_[np.ones(m), np.zeros(n)]
        score = np.r_[pos, neg]
        auc, variance = _delong_by_hand(pos, neg)
        got = stats.delong_auc(y, score)
        assert got.value == pytest.approx(auc, abs=1e-12)
        assert got.variance == pytest.approx(variance, rel=1e-9)
        half = 1.959963984540054 * math.sqrt(variance)
        assert got.low == pytest.approx(max(0.0, auc - half))
        assert got.high == pytest.approx(min(1.0, auc + half))


def test_delong_edge_cases() -> None:
    assert stats.delong_auc(np.array([1, 1]), np.array([0.2, 0.3])).value is None
    one = stats.delong_auc(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2]))
    assert one.value == 1.0 and one.low is None  # one positive: no variance
    separated = stats.delong_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.1, 0.2]))
    assert separated.value == 1.0 and separated.degenerate and separated.low == 1.0


def test_calibration_table_against_numpy() -> None:
    rng = np.random.default_rng(5)
    score = rng.random(500)
    y = rng.random(500) < score
    table = stats.calibration_table(y, score)
    assert len(table) == 10
    for b, row in enumerate(table):
        inside = (score >= b / 10) & ((score < (b + 1) / 10) if b < 9 else (score <= 1.0))
        assert row.n == int(inside.sum())
        assert row.mean_predicted == pytest.approx(score[inside].mean())
        assert row.observed.k == int(y[inside].sum())
    assert sum(row.n for row in table) == 500
    assert stats.brier(y, score) == pytest.approx(float(np.mean((score - y) ** 2)))


def test_operating_point_against_numpy() -> None:
    rng = np.random.default_rng(8)
    pos = rng.beta(5, 2, 60)
    neg = rng.beta(2, 5, 140)
    y = np.r_[np.ones(60), np.zeros(140)]
    score = np.r_[pos, neg]
    op = stats.operating_point(y, score, 0.95, resamples=200)
    # the highest threshold t with mean(pos >= t) >= 0.95: the 57th highest positive
    expected = np.sort(pos)[::-1][math.ceil(0.95 * 60) - 1]
    assert op.threshold == expected
    assert op.sensitivity.k == int(np.sum(pos >= expected)) == 57
    assert op.specificity.k == int(np.sum(neg < expected))
    assert op.specificity.value == pytest.approx(np.mean(neg < expected))
    assert op.threshold_interval is not None and op.specificity_interval is not None
    assert op.threshold_interval[0] <= expected <= op.threshold_interval[1]
    assert op.specificity_interval[0] <= op.specificity.value <= op.specificity_interval[1]
    again = stats.operating_point(y, score, 0.95, resamples=200)
    assert again == op  # seeded: the same data give the same report
    with pytest.raises(ValueError):
        stats.operating_point(y, score, 0.0)


def _psi_by_hand(ref: np.ndarray, cur: np.ndarray) -> float:
    edges = np.unique(np.quantile(ref, [i / 10 for i in range(1, 10)]))
    total = 0.0
    bounds = [-np.inf, *edges, np.inf]
    for lo, hi in itertools.pairwise(bounds):
        e = max(np.mean((ref >= lo) & (ref < hi)), 1e-4)
        a = max(np.mean((cur >= lo) & (cur < hi)), 1e-4)
        total += (a - e) * math.log(a / e)
    return total


def test_psi_against_its_definition_and_the_flags() -> None:
    rng = np.random.default_rng(2)
    ref = rng.beta(2, 8, 400)
    same = rng.beta(2, 8, 400)
    moved = rng.beta(8, 2, 400)
    for cur in (same, moved):
        got = stats.psi(ref, cur)
        assert got is not None
        assert got.psi == pytest.approx(_psi_by_hand(ref, cur), rel=1e-9)
    stable, shifted = stats.psi(ref, same), stats.psi(ref, moved)
    assert stable is not None and stable.flag == "stable"
    assert shifted is not None and shifted.flag == "shift" and shifted.psi > 1.0
    assert stats.psi(ref, np.array([])) is None
