"""SR building blocks: the plain-text summary, the codes, and the document highdicom builds."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from ich_node.imaging import CTSeries, read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import ModelCard
from ich_node.results import sr
from ich_node.results.build import _part10, source_evidence
from ich_node.results.common import study_attributes
from ich_node.results.findings import ModelInfo, SeriesFindings, summarise
from ich_node.results.sr import FINDING_CODES, SR_CLASSES, slices_phrase, summary_text
from training.phantom import write_series


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


def _phantom_series(tmp_path: Path, n: int = 10) -> tuple[CTSeries, pydicom.Dataset]:
    """A phantom series whose slices 4-7 are frames 1-4 of one multi-frame image."""
    phantom = write_series(tmp_path / "s", seed=3, n_slices=n, matrix=64)
    series = read_series(list(phantom.paths))
    shared = series.slices[4].sop_instance_uid
    slices = tuple(
        replace(s, sop_instance_uid=shared, frame_number=i - 3) if 4 <= i <= 7 else s
        for i, s in enumerate(series.slices)
    )
    return replace(series, slices=slices), pydicom.dcmread(phantom.paths[0])


#: build_sr's UIDs in these tests.
_SR_UIDS: dict[str, Any] = dict(
    series_instance_uid="2.25.1",
    sop_instance_uid="2.25.2",
    device_uid="2.25.3",
    tracking_uids=[f"2.25.{10 + i}" for i in range(len(LABELS))],
)


def _sr_inputs(
    series: CTSeries, header: pydicom.Dataset, p: np.ndarray, *, demo: bool
) -> tuple[SeriesFindings, ModelCard, list[pydicom.Dataset]]:
    """Findings of (S, 6) probabilities ``p`` on ``series``, the model card, the evidence."""
    info = ModelInfo(name="m", version="1.2", arch="resnet18", sha256="x", demo=demo)
    findings = summarise(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        sop_instance_uids=tuple(s.sop_instance_uid for s in series.slices),
        positions_mm=tuple(s.position_mm for s in series.slices),
        probabilities=p,
        thresholds=dict.fromkeys(LABELS, 0.5),
        model=info,
        source=series,
    )
    card = ModelCard(name="m", version="1.2", arch="resnet18", input_size=64, demo=demo)
    evidence = source_evidence(series, study_attributes(header, series.study_instance_uid).plain)
    return findings, card, evidence


def _reference_documents(
    series: CTSeries, header: pydicom.Dataset, p: np.ndarray, sop_class: str, **kwargs: Any
) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """build_sr's document, and the one highdicom's constructor builds from the whole tree."""
    findings, card, evidence = _sr_inputs(series, header, p, demo=True)
    args = dict(_SR_UIDS, sop_class=sop_class, **kwargs)
    ours = sr.build_sr(findings, series, card, evidence, **args)
    whole = sr._document
    try:  # highdicom's constructor given the whole tree, as build_sr called it before
        sr._document = lambda sr_type, root, **kw: sr_type(content=root, **kw)
        theirs = sr.build_sr(findings, series, card, evidence, **args)
    finally:
        sr._document = whole
    # highdicom's clock, read once per document.
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        if keyword in theirs:
            ours[keyword] = copy.deepcopy(theirs[keyword])
    for mine, its in zip(
        ours.ContributingEquipmentSequence, theirs.ContributingEquipmentSequence, strict=True
    ):
        if "ContributionDateTime" in its:
            mine.ContributionDateTime = its.ContributionDateTime
    return ours, theirs


@pytest.mark.parametrize("sop_class", sorted(SR_CLASSES))
def test_the_sr_is_what_highdicom_builds_from_the_whole_tree(
    tmp_path: Path, sop_class: str
) -> None:
    """highdicom's constructor given only the root container, the tree set after: the
    same document, byte for byte, and the same ``content`` view, for positive findings
    on single-frame images and on frames of a multi-frame image, for a negative series,
    with and without a predecessor."""
    series, header = _phantom_series(tmp_path)
    positive = np.full((10, 6), 0.1)
    positive[2:7, 0] = positive[2:7, 5] = 0.9  # any and subdural: slices 3-7, two of them frames
    positive[6, 2] = 0.8
    previous = pydicom.Dataset()
    previous.StudyInstanceUID = series.study_instance_uid
    previous.SeriesInstanceUID = "2.25.7"
    previous.SOPClassUID = SR_CLASSES["comprehensive3d"]
    previous.SOPInstanceUID = "2.25.8"
    for p, kwargs in (
        (positive, {}),
        (positive, {"previous_versions": (previous,)}),
        (np.full((10, 6), 0.1), {}),
    ):
        ours, theirs = _reference_documents(series, header, p, sop_class, **kwargs)
        assert _part10(ours) == _part10(theirs)
        assert len(ours.content) == 1 and ours.content[0] == theirs.content[0]
        assert type(ours.content[0]) is type(theirs.content[0])
        images = sr.referenced_instances(ours.ContentSequence)
        if p is positive:  # 5 slices, 3 of them frames of one image: 3 instances
            assert len(images) == 3
            assert series.slices[4].sop_instance_uid in images
        else:
            assert images == set()


def test_an_sr_referencing_an_image_outside_its_evidence_is_refused(tmp_path: Path) -> None:
    """The check highdicom's constructor makes on the whole tree, made on its UIDs."""
    series, header = _phantom_series(tmp_path)
    p = np.full((10, 6), 0.1)
    p[8, 0] = 0.9
    findings, card, evidence = _sr_inputs(series, header, p, demo=False)
    assert sr.build_sr(findings, series, card, evidence, **_SR_UIDS).SOPInstanceUID == "2.25.2"
    missing = series.slices[8].sop_instance_uid
    with pytest.raises(ValueError, match=f'referenced in the document content: "{missing}"'):
        sr.build_sr(findings, series, card, evidence[:8] + evidence[9:], **_SR_UIDS)
