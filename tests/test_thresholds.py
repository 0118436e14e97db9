"""Site thresholds (``model.thresholds``): the decision uses them, every output names them.

A site that chose its own operating point (docs/validation.md) sets some labels'
thresholds; the others keep the bundle's. findings.json, the SR (its text and the
TID 4019 algorithm parameters), the alerts (HL7 NTE, webhook body, email text)
say the thresholds in use and where each came from.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import hl7
import pydicom
import pytest

from ich_node.config import HL7Target, parse_config
from ich_node.delivery import hl7 as hl7_alert
from ich_node.delivery import webhook
from ich_node.delivery.alerts import findings_text, make_alert
from ich_node.imaging import read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from ich_node.model.explain import explain_series
from ich_node.model.inference import Classifier
from ich_node.results.build import ResultOptions, build_results, write_results
from ich_node.results.findings import SeriesFindings, Thresholds, read_findings, write_findings
from tests.conftest import dcmtk


def test_resolve_overrides_only_the_labels_named() -> None:
    bundle = dict.fromkeys(LABELS, 0.5) | {"subdural": 0.4}
    t = Thresholds.resolve(bundle, {"any": 0.25})
    assert t.values == dict.fromkeys(LABELS, 0.5) | {"subdural": 0.4, "any": 0.25}
    assert t.sources == dict.fromkeys(LABELS, "bundle") | {"any": "site"}
    assert t.source == "bundle+site"
    assert Thresholds.resolve(bundle).source == "bundle"
    assert Thresholds.resolve(bundle, dict.fromkeys(LABELS, 0.3)).source == "site"
    for bad in ({"any": 0.0}, {"any": 1.5}, {"bleed": 0.3}):
        with pytest.raises(ValueError):
            Thresholds.resolve(bundle, bad)


def test_config_key_validated() -> None:
    config = parse_config({"model": {"thresholds": {"any": 0.3, "subdural": 1}}})
    assert config.model.thresholds == {"any": 0.3, "subdural": 1.0}
    assert parse_config({}).model.thresholds == {}  # default: the bundle's


@pytest.fixture(scope="module")
def predicted(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One phantom series read with the bundle's thresholds and with site thresholds
    placed just below and just above its series probabilities."""
    from training.phantom import write_series

    folder = tmp_path_factory.mktemp("thresholds")
    study = write_series(folder / "s", seed=5, subtypes=("subdural",), n_slices=10, matrix=128)
    series = read_series(list(study.paths))
    bundle = load_bundle(tiny_bundle)
    plain = Classifier(bundle, device="cpu", batch_size=8)
    first = plain.predict_series(series)
    p = {label: first.findings.series[label].probability for label in LABELS}
    # any and subdural just below their probability (positive); epidural just above.
    site = {
        "any": max(p["any"] * 0.99, 1e-6),
        "subdural": max(p["subdural"] * 0.99, 1e-6),
        "epidural": min(p["epidural"] + 1e-3, 1.0),
    }
    sited = Classifier(bundle, device="cpu", batch_size=8, thresholds=site)
    return {
        "p": p,
        "site": site,
        "bundle": bundle,
        "plain": first,
        "sited": sited.predict_series(series),
        "classifier": sited,
        "folder": folder,
    }


def test_decision_follows_the_site_thresholds(predicted: dict[str, Any]) -> None:
    findings: SeriesFindings = predicted["sited"].findings
    site, card = predicted["site"], predicted["bundle"].card
    for label in LABELS:
        f = findings.series[label]
        expected = site.get(label, card.thresholds[label])
        assert f.threshold == pytest.approx(expected)
        assert f.threshold_source == ("site" if label in site else "bundle")
        assert f.probability == predicted["p"][label]  # the model's answer is unchanged
    assert findings.series["any"].positive and findings.series["subdural"].positive
    assert not findings.series["epidural"].positive
    assert findings.thresholds_source == "bundle+site"
    assert predicted["plain"].findings.thresholds_source == "bundle"


def test_findings_json_names_each_threshold_and_its_source(
    predicted: dict[str, Any], tmp_path: Path
) -> None:
    findings: SeriesFindings = predicted["sited"].findings
    write_findings(tmp_path / "findings.json", findings)
    raw = json.loads((tmp_path / "findings.json").read_text())
    assert raw["thresholds_source"] == "bundle+site"
    for label in LABELS:
        entry = raw["series"][label]
        # the fields findings.json always had are still there, unchanged
        assert set(entry) == {"probability", "positive", "threshold", "threshold_source"}
        assert entry["threshold_source"] == ("site" if label in predicted["site"] else "bundle")
    assert read_findings(tmp_path / "findings.json") == findings
    # findings written before the field existed read as the bundle's
    for entry in raw["series"].values():
        del entry["threshold_source"]
    del raw["thresholds_source"]
    old = SeriesFindings.from_dict(raw)
    assert old.thresholds_source == "bundle"


def test_sr_names_the_thresholds_in_use_and_their_source(predicted: dict[str, Any]) -> None:
    classifier: Classifier = predicted["classifier"]
    explained = explain_series(predicted["sited"], classifier, explain_slices=False)
    results = build_results(explained, classifier.card, ResultOptions(heatmaps="none"))
    out = predicted["folder"] / "out"
    written = write_results(results, out)
    sr = pydicom.dcmread(next(p for p in written if p.name == "sr.dcm"))

    def texts(items: Any) -> list[str]:
        found: list[str] = []
        for item in items:
            if "TextValue" in item:
                found.append(str(item.TextValue))
            if "ContentSequence" in item:
                found.extend(texts(item.ContentSequence))
        return found

    values = texts(sr.ContentSequence)
    site = predicted["site"]
    expected = ";".join(
        f"{label}:{site.get(label, classifier.card.thresholds[label]):g}" for label in LABELS
    )
    assert f"thresholds={expected}" in values  # TID 4019 algorithm parameters
    sources = ";".join(f"{label}:{'site' if label in site else 'bundle'}" for label in LABELS)
    assert f"thresholds_source={sources}" in values
    summary = next(v for v in values if v.startswith("AI triage result"))
    assert f"any {site['any']:.2f} (site)" in summary
    assert "site configuration (model.thresholds)" in summary
    run = subprocess.run(
        [dcmtk("dciodvfy"), str(out / "sr.dcm")], capture_output=True, text=True, check=False
    )
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
    assert errors == []


def test_all_site_thresholds_read_as_site_in_the_sr(predicted: dict[str, Any]) -> None:
    from ich_node.results.sr import thresholds_text

    site = dict.fromkeys(LABELS, 0.42)
    classifier = Classifier(predicted["bundle"], device="cpu", batch_size=8, thresholds=site)
    findings = classifier.predict_series(predicted["sited"].series).findings
    text = thresholds_text(findings)
    assert text == (
        "Thresholds: " + ", ".join(f"{label} 0.42" for label in LABELS)
        + " (site configuration (model.thresholds))."
    )  # fmt: skip


def test_alerts_name_the_thresholds_and_their_source(predicted: dict[str, Any]) -> None:
    findings: SeriesFindings = predicted["sited"].findings
    header = pydicom.dcmread(predicted["sited"].series.slices[0].path, stop_before_pixels=True)
    target = HL7Target(
        name="ris", kind="hl7", host="127.0.0.1", port=2575,
        receiving_application="RIS", receiving_facility="H",
    )  # fmt: skip
    alert = make_alert(
        findings, header, target, job_id="j1", version=1, status="F", supersedes=None,
        result_time=1.0e9, last_received_at=1.0e9,
    )  # fmt: skip
    site = predicted["site"]
    by_label = {f.label: f for f in alert.findings}
    for label in LABELS:
        assert by_label[label].threshold_source == ("site" if label in site else "bundle")
    # webhook: each finding's threshold and its source
    doc = webhook.body(alert)
    assert {f["label"]: f["threshold_source"] for f in doc["findings"]} == {
        label: "site" if label in site else "bundle" for label in LABELS
    }
    # HL7: a second NTE with the thresholds in use and their source
    message = hl7.parse(str(hl7_alert.build_oru(alert, target)))
    notes = [str(seg(3)) for seg in message.segments("NTE")]
    assert len(notes) == 2 and notes[1].startswith("Thresholds: any ")
    assert f"any {site['any']:.2f} (site)" in notes[1]
    # email: each line names its threshold's source
    lines = findings_text(alert)
    assert any(
        line.startswith("  any:") and "site configuration (model.thresholds)" in line
        for line in lines
    )
    assert any(line.startswith("  intraventricular:") and "model bundle" in line for line in lines)
