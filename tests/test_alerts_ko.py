"""The Key Object Selection document ("Of Interest") of the positive slices."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from ich_node.imaging import read_series
from ich_node.model.bundle import load_bundle
from ich_node.model.explain import explain_series
from ich_node.model.inference import Classifier
from ich_node.results.build import ResultOptions, build_results, write_results
from ich_node.results.findings import ExplainedSeries, LabelFinding
from ich_node.results.ko import key_slices
from tests.conftest import dcmtk

KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture(scope="module")
def explained(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from training.phantom import write_series

    phantom = write_series(tmp_path_factory.mktemp("ko"), seed=5, subtypes=("subdural",),
                           n_slices=10, matrix=128)  # fmt: skip
    classifier = Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=8)
    prediction = classifier.predict_series(read_series(list(phantom.paths)))
    return classifier, explain_series(prediction, classifier, explain_slices=False)


def _with_any_threshold(inputs: ExplainedSeries, threshold: float) -> ExplainedSeries:
    findings = inputs.findings
    p = findings.series["any"].probability
    series = dict(findings.series) | {"any": LabelFinding(p, p >= threshold, threshold)}
    return dataclasses.replace(inputs, findings=dataclasses.replace(findings, series=series))


def test_kos_lists_the_positive_slices_and_is_dciodvfy_clean(
    explained: tuple[Any, Any], tmp_path: Path
) -> None:
    classifier, inputs = explained
    probs = [s.probabilities["any"] for s in inputs.findings.slices]
    # A threshold inside the slices' range: some slices positive, some not.
    inputs = _with_any_threshold(inputs, float(np.median(probs)))
    positive = key_slices(inputs.findings)
    assert 0 < len(positive) < len(probs)
    results = build_results(inputs, classifier.card, ResultOptions(heatmaps="none",
                                                                  key_objects=True))  # fmt: skip
    assert results.key_objects is not None and results.datasets()[-1] is results.key_objects
    files = write_results(results, tmp_path)
    path = tmp_path / "key_objects.dcm"
    assert path in files
    ko = pydicom.dcmread(path)
    assert ko.SOPClassUID == KOS_CLASS and ko.Modality == "KO"
    assert ko.SeriesDescription == "ICH AI key images" and ko.SeriesNumber == 9903
    title = ko.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")  # Of Interest
    referenced = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in ko.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert referenced == [inputs.findings.slices[i].sop_instance_uid for i in positive]
    text = " ".join(str(i.TextValue) for i in ko.ContentSequence if i.ValueType == "TEXT")
    assert "not a diagnosis" in text and classifier.card.name in text
    assert ko.StudyInstanceUID == inputs.series.study_instance_uid
    assert ko.PatientID == inputs.header.PatientID
    run = subprocess.run([dcmtk("dciodvfy"), str(path)], capture_output=True, text=True,
                         check=False)  # fmt: skip
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
    assert errors == [], errors


def test_no_kos_when_negative_or_not_asked(explained: tuple[Any, Any]) -> None:
    classifier, inputs = explained
    negative = _with_any_threshold(inputs, 1.01)
    assert build_results(negative, classifier.card, ResultOptions(key_objects=True,
                                                                  heatmaps="none")).key_objects is None  # fmt: skip
    positive = _with_any_threshold(inputs, 0.0)
    assert (
        build_results(positive, classifier.card, ResultOptions(heatmaps="none")).key_objects is None
    )
