"""SR building blocks: the plain-text summary and the codes."""

from __future__ import annotations

import numpy as np

from ich_node.labels import LABELS
from ich_node.model.bundle import ModelCard
from ich_node.results.findings import ModelInfo, summarise
from ich_node.results.sr import FINDING_CODES, slices_phrase, summary_text


def _findings(p: np.ndarray, demo: bool = False):
    info = ModelInfo(name="m", version="1.2", arch="resnet18", sha256="x", demo=demo)
    n = len(p)
    return summarise(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_instance_uids=tuple(f"1.2.3.4.{i}" for i in range(n)),
        positions_mm=tuple(float(i) for i in range(n)),
        probabilities=p,
        thresholds=dict.fromkeys(LABELS, 0.5),
        model=info,
    )


def test_summary_names_subtype_probability_and_slices() -> None:
    p = np.zeros((20, 6))
    p[11:16, 0] = 0.95
    p[11:16, 5] = 0.93
    p[18, 0] = p[18, 5] = 0.9
    card = ModelCard(name="m", version="1.2", arch="resnet18", input_size=64)
    text = summary_text(_findings(p), card)
    assert text.startswith("AI triage result, not a diagnosis. Model m 1.2.")
    assert "subdural (p=0.93) on slices 12-16 and 19" in text
    assert "DEMO" not in text


def test_summary_says_slice_or_slices_and_lists_them_in_words() -> None:
    """One slice is 'slice 12'; a list ends with 'and'; counts agree with their nouns."""
    card = ModelCard(name="m", version="1.2", arch="resnet18", input_size=64)
    cases = {
        (11,): "on slice 12 (slices",
        (11, 12): "on slices 12-13 (slices",
        (2, 4, 5, 6, 8): "on slices 3, 5-7 and 9 (slices",
        (0, 19): "on slices 1 and 20 (slices",
    }
    for rows, expected in cases.items():
        p = np.zeros((20, 6))
        p[list(rows), 0] = 0.9
        text = summary_text(_findings(p), card)
        assert f"hemorrhage (type unspecified) (p=0.90) {expected}" in text, text
        assert "(s)" not in text
    assert slices_phrase([4]) == "slice 5"
    assert slices_phrase([0, 1, 2, 6]) == "slices 1-3 and 7"


def test_summary_of_a_negative_demo_series() -> None:
    p = np.full((5, 6), 0.1)
    card = ModelCard(name="m", version="1.2", arch="resnet18", input_size=64, demo=True)
    text = summary_text(_findings(p, demo=True), card)
    assert "No hemorrhage detected (highest p=0.10, threshold 0.50)." in text
    assert "DEMO" in text


def test_every_label_has_a_code() -> None:
    assert set(FINDING_CODES) == set(LABELS)
    assert FINDING_CODES["any"].value == "1386000"
    assert all(c.scheme_designator in ("SCT", "99ICH") for c in FINDING_CODES.values())
