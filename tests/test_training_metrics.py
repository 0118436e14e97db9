"""training.metrics against hand-computed values and scikit-learn (reference only)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import metrics as M

# A fixed 4-image example with 6 labels (any, epidural, intraparenchymal,
# intraventricular, subarachnoid, subdural); counts worked out by hand below.
TRUE = np.array(
    [
        [1, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
    ]
)
PRED = np.array(
    [
        [1, 1, 0, 0, 0, 0],  # perfect
        [1, 0, 0, 0, 0, 1],  # misses subarachnoid
        [1, 0, 0, 0, 0, 0],  # false 'any'
        [0, 0, 0, 0, 0, 0],  # misses any + intraparenchymal; nothing predicted
    ]
)


def test_classification_metrics_hand_computed() -> None:
    r = M.classification_metrics(TRUE, PRED)
    # 24 cells, wrong: (1,sah) (2,any) (3,any) (3,iph) -> 20/24 right.
    assert r["accuracy"] == pytest.approx(20 / 24)
    assert r["exact_match"] == pytest.approx(1 / 4)
    # Pooled: TP = 2 + 2 + 0 + 0 = 4, FP = 1, FN = 3.
    assert r["precision"]["micro"] == pytest.approx(4 / 5)
    assert r["recall"]["micro"] == pytest.approx(4 / 7)
    assert r["f1"]["micro"] == pytest.approx(8 / 12)
    assert r["jaccard"]["micro"] == pytest.approx(4 / 8)
    # Per label: any TP2 FP1 FN1; epidural TP1; iph FN1; ivh none; sah FN1; sdh TP1.
    f1 = r["f1"]["per_label"]
    assert f1["any"] == pytest.approx(4 / 6)
    assert f1["epidural"] == 1.0 and f1["subdural"] == 1.0
    assert f1["intraparenchymal"] == 0.0 and f1["subarachnoid"] == 0.0
    assert f1["intraventricular"] == 0.0  # no positives, none predicted: 0 (zero_division=0)
    assert r["f1"]["macro"] == pytest.approx((4 / 6 + 1 + 0 + 0 + 0 + 1) / 6)
    assert r["precision"]["per_label"]["any"] == pytest.approx(2 / 3)
    assert r["recall"]["per_label"]["any"] == pytest.approx(2 / 3)
    assert r["jaccard"]["per_label"]["any"] == pytest.approx(2 / 4)
    # Samples: image 0: P=R=F1=J=1; image 1: TP2 FN1 -> P1 R2/3 F1 4/5 J2/3;
    # image 2: TP0 FP1 -> P0, R 0/0 = 1, F1 0, J 0; image 3: TP0 FN2 -> P 0/0 = 1, R0, F1 0, J 0.
    assert r["precision"]["samples"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert r["recall"]["samples"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert r["f1"]["samples"] == pytest.approx((1 + 4 / 5) / 4)
    assert r["jaccard"]["samples"] == pytest.approx((1 + 2 / 3) / 4)
    assert r["support"] == {"any": 3, "epidural": 1, "intraparenchymal": 1,
                            "intraventricular": 0, "subarachnoid": 1, "subdural": 1}  # fmt: skip


def test_samples_average_counts_empty_truth_and_prediction_as_perfect() -> None:
    r = M.classification_metrics(np.zeros((2, 6)), np.zeros((2, 6)))
    assert r["f1"]["samples"] == 1.0 and r["f1"]["macro"] == 0.0 and r["accuracy"] == 1.0


def test_classification_metrics_match_sklearn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    t = rng.random((200, 6)) < 0.3
    p = rng.random((200, 6)) < 0.35
    r = M.classification_metrics(t, p)
    for avg in ("macro", "micro", "samples"):
        kw = {"average": avg, "zero_division": 1 if avg == "samples" else 0}
        assert r["f1"][avg] == pytest.approx(sk.f1_score(t, p, **kw))
        assert r["precision"][avg] == pytest.approx(sk.precision_score(t, p, **kw))
        assert r["recall"][avg] == pytest.approx(sk.recall_score(t, p, **kw))
        assert r["jaccard"][avg] == pytest.approx(sk.jaccard_score(t, p, **kw))
    assert r["accuracy"] == pytest.approx(1 - sk.hamming_loss(t, p))
    assert r["exact_match"] == pytest.approx(sk.accuracy_score(t, p))


def test_roc_auc_hand_computed_with_ties() -> None:
    # Positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4, 0.8>0.1, 0.4=0.4, 0.4>0.1) -> 3.5/4.
    assert M.roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert M.roc_auc([0, 0, 1], [0.1, 0.2, 0.3]) == 1.0
    assert M.roc_auc([1, 1, 0], [0.1, 0.2, 0.3]) == 0.0
    assert math.isnan(M.roc_auc([1, 1], [0.1, 0.2]))


def test_roc_auc_matches_sklearn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n in (5, 50, 1000):
        t = rng.random(n) < 0.3
        t[0], t[1] = True, False
        s = np.round(rng.random(n) + t * 0.3, 1)  # rounding makes many ties
        assert M.roc_auc(t, s) == pytest.approx(sk.roc_auc_score(t, s), abs=1e-12)


def test_weighted_log_loss_hand_computed() -> None:
    t = np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    p = np.full((2, 6), 0.5)
    assert M.weighted_log_loss(t, p) == pytest.approx(math.log(2))
    p2 = np.array([[0.9, 0.1, 0.1, 0.1, 0.1, 0.1], [0.2, 0.5, 0.5, 0.5, 0.5, 0.5]])
    # image 0: (2*-log .9 + 5*-log .9)/7 ; image 1: (2*-log .8 + 5*log 2)/7
    expected = ((7 * -math.log(0.9)) / 7 + (2 * -math.log(0.8) + 5 * math.log(2)) / 7) / 2
    assert M.weighted_log_loss(t, p2) == pytest.approx(expected)
    assert np.isfinite(M.weighted_log_loss(t, np.zeros((2, 6))))  # clipped, not inf


def test_best_f1_threshold() -> None:
    t = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.3, 0.35, 0.8, 0.6, 0.9])
    thr = M.best_f1_threshold(t, s)
    # Best F1 = 1.0 is impossible (0.6 negative above 0.35 positive); predicting
    # >= 0.35 gives TP3 FP1 -> F1 6/7, the best; midpoint between 0.35 and 0.3.
    assert thr == pytest.approx(0.325)
    assert M.best_f1_threshold(np.zeros(4), s[:4]) == 0.5
    thresholds = M.choose_thresholds(np.tile(t[:, None], 6), np.tile(s[:, None], 6))
    assert list(thresholds.values()) == pytest.approx([0.325] * 6)


def test_group_max_gives_study_level_values() -> None:
    keys, values = M.group_max(["b", "a", "b"], np.array([[0.1, 1], [0.5, 0], [0.7, 0]]))
    assert keys == ["a", "b"]
    np.testing.assert_allclose(values, [[0.5, 0], [0.7, 1]])
