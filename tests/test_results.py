"""build_results / write_results on phantom series: files that validate and agree with findings."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from pydicom.uid import RE_VALID_UID

from ich_node.imaging import read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import Bundle, load_bundle
from ich_node.model.explain import explain_series
from ich_node.model.inference import Classifier, Prediction
from ich_node.results.build import (
    ResultOptions,
    ResultSet,
    ResultsSkipped,
    write_results,
)
from ich_node.results.build import build_results as encode
from ich_node.results.common import STUDY_KEYWORDS
from ich_node.results.sr import FINDING_CODES
from tests.conftest import dcmtk

#: Patient-module keywords a CT header may carry that outputs must not copy.
_OTHER_PATIENT_KEYWORDS = (
    "PatientAge",
    "PatientWeight",
    "PatientSize",
    "OtherPatientIDs",
    "PatientAddress",
    "EthnicGroup",
    "PatientComments",
)


def build_results(
    prediction: Prediction, classifier: Classifier, options: ResultOptions | None = None
) -> ResultSet:
    """The node's two stages: explain with the model, then encode plain data."""
    options = options or ResultOptions()
    explained = explain_series(
        prediction,
        classifier,
        negative_top_slices=options.negative_top_slices,
        explain_slices=options.needs_explanations,
        heatmaps=options.heatmaps,
    )
    return encode(explained, classifier.card, options)


def _classifier(path: Path, thresholds: dict[str, float]) -> Classifier:
    """The tiny bundle with chosen decision thresholds (the card's own parameter)."""
    bundle = load_bundle(path)
    card = replace(bundle.card, thresholds=thresholds)
    return Classifier(Bundle(bundle.path, card, bundle.model), device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from training.phantom import write_series

    out = tmp_path_factory.mktemp("results-phantom")
    return write_series(out, seed=11, subtypes=("subdural",), n_slices=12, matrix=256)


@pytest.fixture(scope="module")
def positive(tiny_bundle: Path, phantom: Any) -> tuple[Classifier, Prediction]:
    # any and subdural decide at 0 (always present); the other subtypes never.
    thresholds = {label: 1.01 for label in LABELS} | {"any": 0.0, "subdural": 0.0}
    classifier = _classifier(tiny_bundle, thresholds)
    return classifier, classifier.predict_series(read_series(list(phantom.paths)))


@pytest.fixture(scope="module")
def negative(tiny_bundle: Path, phantom: Any) -> tuple[Classifier, Prediction]:
    classifier = _classifier(tiny_bundle, dict.fromkeys(LABELS, 1.01))
    return classifier, classifier.predict_series(read_series(list(phantom.paths)))


@pytest.fixture(scope="module")
def written(
    positive: tuple[Classifier, Prediction], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ResultSet, list[Path]]:
    classifier, prediction = positive
    results = build_results(prediction, classifier, ResultOptions(parametric_map=True))
    return results, write_results(results, tmp_path_factory.mktemp("results-out"))


def _strict_read(path: Path) -> pydicom.Dataset:
    with pydicom.config.strict_reading():
        ds = pydicom.dcmread(path)
        for elem in ds.iterall():  # values are parsed (and validated) lazily
            _ = elem.value
    return ds


def test_files_written_and_valid_dicom(written: tuple[ResultSet, list[Path]]) -> None:
    results, files = written
    names = sorted(p.relative_to(files[0].parents[1]).as_posix() for p in files)
    n = len(results.heatmaps)
    assert n == 12  # subdural positive on every slice at threshold 0
    assert "sr.dcm" in names and "parametric_map.dcm" in names
    assert all(
        f"heatmaps/{i}.dcm" in names and f"heatmaps/{i}.png" in names for i in range(1, n + 1)
    )
    for path in files:
        if path.suffix == ".dcm":
            ds = _strict_read(path)
            assert ds.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID  # readable
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        else:
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results.datasets()[-1] is results.sr  # referenced instances go first


def test_dciodvfy_reports_no_errors(written: tuple[ResultSet, list[Path]]) -> None:
    dciodvfy = dcmtk("dciodvfy")
    _, files = written
    checked = [p for p in files if p.suffix == ".dcm"]
    for path in checked:
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        assert errors == [], f"{path.name}: {errors}"


def test_dsrdump_renders_every_finding(written: tuple[ResultSet, list[Path]]) -> None:
    dsrdump = dcmtk("dsrdump")
    sr_path = next(p for p in written[1] if p.name == "sr.dcm")
    run = subprocess.run(
        [dsrdump, "+Pl", "+Pc", str(sr_path)], capture_output=True, text=True, check=True
    )
    text = run.stdout
    for label in LABELS:
        assert f'"{FINDING_CODES[label].meaning}")=(' in text
    assert text.count('(52101004,SCT,"Present")') == 2  # any, subdural
    assert text.count('(2667000,SCT,"Absent")') == 4
    assert "Suspected intracranial hemorrhage: subdural" in text
    assert "DEMO" in text


def _sr_probabilities(sr: pydicom.Dataset) -> dict[str, tuple[float, str]]:
    """label -> (probability, Present/Absent code) read back from the SR tree."""
    by_code = {code.value: label for label, code in FINDING_CODES.items()}
    out: dict[str, tuple[float, str]] = {}
    (measurements,) = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    for group in measurements.ContentSequence:
        label, p, presence = None, None, None
        for item in group.ContentSequence:
            name = item.ConceptNameCodeSequence[0]
            if name.CodeValue == "121071":  # Finding
                label = by_code[item.ConceptCodeSequence[0].CodeValue]
            elif item.ValueType == "NUM":
                p = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE" and name.CodeValue in by_code:
                presence = item.ConceptCodeSequence[0].CodeValue
        assert label is not None and p is not None and presence is not None
        out[label] = (p, presence)
    return out


def test_sr_numbers_equal_findings_json(
    written: tuple[ResultSet, list[Path]], positive: tuple[Classifier, Prediction]
) -> None:
    _, prediction = positive
    expected = prediction.findings.to_dict()["series"]
    sr = _strict_read(next(p for p in written[1] if p.name == "sr.dcm"))
    got = _sr_probabilities(sr)
    assert set(got) == set(LABELS)
    for label in LABELS:
        p, presence = got[label]
        assert p == expected[label]["probability"]
        assert presence == ("52101004" if expected[label]["positive"] else "2667000")


def test_uids_new_valid_and_study_kept(
    written: tuple[ResultSet, list[Path]], positive: tuple[Classifier, Prediction]
) -> None:
    results, _ = written
    _, prediction = positive
    source = pydicom.dcmread(prediction.series.slices[0].path, stop_before_pixels=True)
    source_uids = {s.sop_instance_uid for s in prediction.series.slices}
    source_uids |= {prediction.series.series_instance_uid}
    seen: set[str] = set()
    for ds in results.datasets():
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID):
            assert RE_VALID_UID.match(uid) and len(uid) <= 64
            assert uid not in source_uids
        assert ds.SOPInstanceUID not in seen
        seen.add(ds.SOPInstanceUID)
        assert ds.StudyInstanceUID == prediction.series.study_instance_uid
        for keyword in STUDY_KEYWORDS:
            assert str(ds.get(keyword, "")) == str(source.get(keyword, "")), keyword
        for keyword in _OTHER_PATIENT_KEYWORDS:
            assert keyword not in ds, keyword
        assert ds.SeriesDate and ds.SeriesTime  # viewers group series by them
    series_uids = {ds.SeriesInstanceUID for ds in results.datasets()}
    assert len(series_uids) == 3  # heatmaps, parametric map, SR: each its own series


def test_uids_are_stable_across_runs(positive: tuple[Classifier, Prediction]) -> None:
    classifier, prediction = positive
    options = ResultOptions(heatmaps="none")
    first = build_results(prediction, classifier, options)
    again = build_results(prediction, classifier, options)
    assert first.sr.SOPInstanceUID == again.sr.SOPInstanceUID
    other = build_results(prediction, classifier, ResultOptions(heatmaps="positive"))
    assert other.sr.SOPInstanceUID != first.sr.SOPInstanceUID


def test_heatmaps_reference_sources_in_spatial_order(
    written: tuple[ResultSet, list[Path]], positive: tuple[Classifier, Prediction]
) -> None:
    results, _ = written
    _, prediction = positive
    slices = prediction.series.slices
    assert [int(ds.InstanceNumber) for ds in results.heatmaps] == list(range(1, 13))
    for ds, src in zip(results.heatmaps, slices, strict=True):
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == src.sop_instance_uid
        assert ref.ReferencedSOPClassUID == src.sop_class_uid
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(src.pixel_spacing)
        assert (ds.Rows, ds.Columns) == (src.rows, src.columns)
        assert ds.BurnedInAnnotation == "YES"
        assert ds.SeriesDescription == "ICH AI heatmaps"
        (node,) = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "ich-node"]
        assert node.PurposeOfReferenceCodeSequence[0].CodeValue == "109103"
        assert node.ManufacturerModelName == prediction.findings.model.name
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in results.sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert {s.sop_instance_uid for s in slices} <= evidence
    assert {ds.SOPInstanceUID for ds in results.heatmaps} <= evidence
    assert results.parametric_map is not None
    assert results.parametric_map.SOPInstanceUID in evidence


def test_negative_series(negative: tuple[Classifier, Prediction]) -> None:
    classifier, prediction = negative
    results = build_results(prediction, classifier)
    assert results.heatmaps == () and results.previews == ()
    assert results.parametric_map is None
    presence = {label: code for label, (_, code) in _sr_probabilities(results.sr).items()}
    assert set(presence.values()) == {"2667000"}
    text = results.sr.ContentSequence[-1].ContentSequence[0].TextValue
    assert text.startswith("AI triage result, not a diagnosis.")
    assert "No hemorrhage detected" in text

    top = build_results(prediction, classifier, ResultOptions(negative_top_slices=2))
    assert len(top.heatmaps) == 2


def test_invalid_source_uids_are_skipped(tiny_bundle: Path, tmp_path: Path, phantom: Any) -> None:
    # RSNA's anonymised files carry "ID_..." strings where UIDs belong.
    paths = []
    for i, path in enumerate(phantom.paths[:4]):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = "ID_0a1b2c3d4e"
        ds.SeriesInstanceUID = "ID_5f6a7b8c9d"
        ds.SOPInstanceUID = f"ID_{i:010d}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = tmp_path / f"ID_{i}.dcm"
        ds.save_as(out)
        paths.append(out)
    classifier = _classifier(tiny_bundle, dict.fromkeys(LABELS, 0.0))
    prediction = classifier.predict_series(read_series(paths))
    with pytest.raises(ResultsSkipped) as info:
        build_results(prediction, classifier)
    assert "not valid DICOM UIDs" in info.value.reason


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="heatmaps"):
        ResultOptions(heatmaps="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative_top_slices"):
        ResultOptions(negative_top_slices=-1)


def test_real_scanner_series(real_ct: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    folder = real_ct / "neurolabusc+dcm_qa_ct" / "In" / "GE"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    classifier = _classifier(tiny_bundle, {label: 1.01 for label in LABELS} | {"any": 0.0})
    prediction = classifier.predict_series(read_series(sorted(folder.rglob("*"))))
    results = build_results(prediction, classifier, ResultOptions(negative_top_slices=0))
    files = write_results(results, tmp_path)
    dciodvfy = dcmtk("dciodvfy")
    for path in (files[0], files[-1]):  # a heatmap and the SR
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        assert errors == [], f"{path.name}: {errors}"
    assert results.heatmaps[0].Rows == prediction.series.slices[0].rows


def test_results_import_no_torch_model_or_network() -> None:
    """results/ is pure data -> DICOM (architecture.md): no torch, model or network code."""
    code = (
        "import sys\n"
        "import ich_node.results.build, ich_node.results.sr, ich_node.results.sc\n"
        "import ich_node.results.pm, ich_node.results.findings, ich_node.results.common\n"
        "bad = ['torch', 'torchvision', 'pytorch_grad_cam', 'ich_node.model.networks', 'ich_node.model.bundle',\n"
        "       'ich_node.model.inference', 'ich_node.model.explain', 'pynetdicom', 'ich_node.delivery.sender',\n"
        "       'ich_node.ingest.listener', 'ich_node.net']\n"
        "print(sorted(m for m in bad if m in sys.modules))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert run.stdout.strip() == "[]", run.stdout + run.stderr


def test_warm_ups_load_what_the_first_study_would(tmp_path: Path) -> None:
    """In a fresh interpreter (a worker starting): highdicom's IOD tables are read
    by ``sc.warm_up`` and not again when the next image is built, and
    ``heatmaps.warm_up`` imports the head region's libraries; both write nothing."""
    code = (
        "import json, sys\n"
        "from highdicom import _standard_utils as tables\n"
        "import ich_node.model.heatmaps as heatmaps\n"
        "from ich_node.results import sc\n"
        "out = {'before': [tables.get_module_attribute_map.cache_info().misses,\n"
        "                  'scipy.ndimage' in sys.modules, 'cv2' in sys.modules]}\n"
        "out['seconds'] = [sc.warm_up(), heatmaps.warm_up('cpu')]\n"
        "out['after'] = [tables.get_module_attribute_map.cache_info().misses,\n"
        "                'scipy.ndimage' in sys.modules, 'cv2' in sys.modules]\n"
        "sc.warm_up()  # the next image built\n"
        "out['again'] = tables.get_module_attribute_map.cache_info().misses\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=180,
        cwd=tmp_path,
    )
    import json

    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["before"] == [0, False, False]
    assert out["after"] == [1, True, True]
    assert out["again"] == 1  # read once: the first study's images do not read them again
    assert all(isinstance(t, float) and t >= 0 for t in out["seconds"])
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_report_process_reads_highdicoms_tables_when_it_starts() -> None:
    """The SR process loads highdicom's IOD tables in its initializer, so that the
    first SR does not (it was 0.43 s against 0.16 s for the next ones)."""
    import operator

    from highdicom import _standard_utils as tables

    from ich_node.results.reports import ReportProcess

    process = ReportProcess("console", "WARNING")
    try:
        process.start()
        # The child runs list(...) of the cache's (hits, misses, maxsize, currsize):
        # the cached function pickles by name, a bound method or CacheInfo does not.
        query = map(
            tuple, map(operator.methodcaller("cache_info"), [tables.get_module_attribute_map])
        )
        future = process.submit(list, query)
        assert future is not None
        [(_, misses, _, currsize)] = future.result(timeout=60)
        assert misses == 1 and currsize == 1
    finally:
        process.close()


def test_the_report_process_freezes_what_it_loaded_when_it_starts() -> None:
    """After its warm-up the SR process keeps its modules and tables out of the
    collector's full collections (gc.freeze); SRs are still encoded."""
    import gc

    from ich_node.results.reports import ReportProcess

    process = ReportProcess("console", "WARNING")
    try:
        process.start()
        future = process.submit(gc.get_freeze_count)
        assert future is not None
        assert future.result(timeout=60) > 10_000  # pydicom, highdicom, their tables
    finally:
        process.close()


def test_a_frozen_heap_still_frees_what_comes_after() -> None:
    """freeze_startup_heap, in a fresh interpreter: it collects first (a cycle
    dropped before it is freed, not frozen), freezes what is alive, and cycles made
    after it are still collected."""
    import json

    script = """
import gc, json
from ich_node.results.reports import freeze_startup_heap
class Node:
    pass
def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
cycle()  # garbage before the freeze
gc.disable()  # (nothing collects it but freeze_startup_heap's own collection)
frozen = freeze_startup_heap()
gc.enable()
before = sum(isinstance(o, Node) for o in gc.get_objects())
cycle()
made = sum(isinstance(o, Node) for o in gc.get_objects())
collected = gc.collect()
after = sum(isinstance(o, Node) for o in gc.get_objects())
print(json.dumps([frozen, gc.get_freeze_count(), before, made, collected, after]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    frozen, count, before, made, collected, after = json.loads(out.stdout.splitlines()[-1])
    assert frozen == count > 1_000
    assert before == 0  # the cycle dropped before was collected, not frozen
    assert made == 2 and collected >= 2 and after == 0


def test_frame_of_reference_absent_or_invalid_leaves_out_only_the_map(
    positive: tuple[Classifier, Prediction],
) -> None:
    classifier, prediction = positive
    for frame_uid in (None, "1.2.03"):
        series = replace(prediction.series, frame_of_reference_uid=frame_uid)
        with structlog.testing.capture_logs() as logs:
            results = build_results(
                replace(prediction, series=series), classifier, ResultOptions(parametric_map=True)
            )
        assert results.parametric_map is None
        assert results.heatmaps and results.sr is not None
        (dropped,) = [e for e in logs if e["event"] == "results.value_dropped"]
        assert dropped["keyword"] == "FrameOfReferenceUID"
        assert all("1.2.03" not in repr(e) for e in logs)


@pytest.fixture(scope="module")
def backslash_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle named with a backslash: no LO may hold one, so every encoding fails."""
    from benchmarks.common import random_bundle

    path = tmp_path_factory.mktemp("bad-bundle") / "model.safetensors"
    return random_bundle(path, name="ich\\model", thresholds=dict.fromkeys(LABELS, 0.0))


def test_a_results_error_parks_the_job_on_its_first_attempt(
    tmp_path: Path, backslash_bundle: Path, phantom: Any, open_store: Any, storage_section: Any
) -> None:
    """On both store backends (SQLite, PostgreSQL): the queue parks without a retry."""
    import time

    from benchmarks.common import queue_series
    from ich_node.config import parse_config
    from ich_node.service.worker import Worker

    config = parse_config(
        {
            "storage": {
                "dir": str(tmp_path / "node"),
                "database": storage_section(tmp_path / "node").database,
            },
            "queue": {"lease_seconds": 60.0, "max_attempts": 5, "retry_base_seconds": 1.0},
        }
    )
    store = open_store(config.storage.dir)
    job = queue_series(store, phantom.paths[:3], time.time() - 10)
    classifier = Classifier(load_bundle(backslash_bundle), device="cpu", batch_size=4)
    worker = Worker(config, "w0", store, classifier)
    outcome = worker.run_once(time.time())
    assert outcome is not None and outcome.state == "parked"
    record = store.job(job.job_id)
    assert record is not None and record.state == "parked" and record.attempts == 1
    assert record.reason.startswith("not retried: results could not be encoded: ValueError")
    assert worker.run_once(time.time() + 3600) is None  # nothing left to retry


def test_predict_goes_on_after_each_results_failure(
    tmp_path: Path, backslash_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ich_node.service.cli import main
    from training.phantom import write_series

    a = write_series(tmp_path / "in" / "a", seed=21, n_slices=3, matrix=96)
    b = write_series(tmp_path / "in" / "b", seed=22, n_slices=3, matrix=96)
    out = tmp_path / "out"
    code = main(["predict", "--bundle", str(backslash_bundle), "--out", str(out), str(tmp_path)])
    assert code == 1
    lines = [
        line for line in capsys.readouterr().err.splitlines() if "DICOM results failed" in line
    ]
    assert len(lines) == 2  # one line per series, and the second series was still read
    for series in (a, b):
        assert (out / series.series_instance_uid / "findings.json").is_file()
        assert sum(series.series_instance_uid in line for line in lines) == 1


def test_predict_delivers_every_shared_header_case(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ich_node.service.cli import main

    cases = Path(__file__).resolve().parents[2] / "shared" / "cases"
    folders = [cases / "charset", cases / "invalid-values"]
    if not all(f.is_dir() for f in folders):
        pytest.skip(f"{cases} not present")
    out = tmp_path / "out"
    assert (
        main(["predict", "--bundle", str(tiny_bundle), "--out", str(out), *map(str, folders)]) == 0
    )
    n_cases = len(list(cases.glob("charset/*/*.dcm")) + list(cases.glob("invalid-values/*/*.dcm")))
    assert len(list(out.glob("*/sr.dcm"))) == n_cases
    assert "failed" not in capsys.readouterr().err


def test_heatmaps_name_their_slice_in_the_srs_numbering(
    written: tuple[ResultSet, list[Path]], positive: tuple[Classifier, Prediction]
) -> None:
    """Slice number and position are burned in (read back from the pixels) and in the tags."""
    import numpy as np

    from ich_node.results.sc import burn_in, slice_label, slice_text

    results, _ = written
    classifier, prediction = positive
    explained = explain_series(prediction, classifier)
    cams = {e.index: e for e in explained.explanations}
    findings = prediction.findings
    n = findings.n_slices
    for ds in results.heatmaps:
        i = int(ds.InstanceNumber) - 1  # the SR's numbering: slice i + 1 of n
        src = prediction.series.slices[i]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.sop_instance_uid
        assert float(ds.SliceLocation) == pytest.approx(src.position_mm, abs=1e-3)
        assert findings.slices[i].position_mm == pytest.approx(float(ds.SliceLocation), abs=1e-3)
        label = slice_label(findings, i)
        assert label.startswith(f"Slice {i + 1} of {n} (inferior to superior), ")
        hu = prediction.hu[i]
        base = explained.overlays[i]  # the model stage's rendering of this slice
        pixels = ds.pixel_array
        expected = burn_in(base, slice_text(findings, classifier.card, i, cams[i].labels))
        assert np.array_equal(pixels, expected)  # the whole image, text included
        # The first text line is the slice's label: another slice's label reads differently.
        font_size = max(9, min(hu.shape) // 36)
        band = slice(max(2, font_size // 3), max(2, font_size // 3) + font_size + 2)
        other = slice_label(findings, (i + 1) % n)
        mine = burn_in(base, [label])[band]
        theirs = burn_in(base, [other])[band]
        assert np.array_equal(pixels[band], mine)
        assert not np.array_equal(pixels[band], theirs)


def _part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _without_dimension_uids(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy with every Dimension Organization UID (0020,9164) emptied."""
    out = copy.deepcopy(ds)
    for elem in out.iterall():
        if elem.tag == 0x00209164:
            elem.value = ""
    return out


def test_pixels_drawn_beside_the_sr_and_previews_after_give_the_same_files(
    positive: tuple[Classifier, Prediction], tmp_path: Path
) -> None:
    """The worker's way (render inside build_results while the SR is encoded, the
    PNG previews written after the hand-over) makes byte for byte what rendering
    first and encoding everything at once makes, the SR naming the parametric map."""
    from ich_node.model.heatmaps import with_heatmap_images
    from ich_node.results.build import write_previews
    from ich_node.results.common import output_time

    classifier, prediction = positive
    options = ResultOptions(parametric_map=True, key_objects=True)
    plain = explain_series(prediction, classifier, render=False)
    when = output_time(plain.header)
    first = encode(
        with_heatmap_images(plain, "positive", "cpu"), classifier.card, options, when=when
    )
    drawn: list[int] = []

    def render(e: Any) -> Any:
        drawn.append(len(e.overlays))
        return with_heatmap_images(e, "positive", "cpu")

    out = tmp_path / "outbox"
    second = encode(
        plain, classifier.card, options, when=when, render=render, previews=False, out_dir=out
    )
    assert drawn == [0]  # the pixels were drawn inside, once, from none
    assert len(first.heatmaps) == len(second.heatmaps) == 12
    assert second.previews == ()
    assert [_part10(ds) for ds in second.heatmaps] == [_part10(ds) for ds in first.heatmaps]
    assert first.parametric_map is not None and second.parametric_map is not None
    # highdicom draws a random Dimension Organization UID for each map: not compared.
    assert _part10(_without_dimension_uids(second.parametric_map)) == _part10(
        _without_dimension_uids(first.parametric_map)
    )
    assert _part10(second.sr) == _part10(first.sr)
    assert first.key_objects is not None and second.key_objects is not None
    assert _part10(second.key_objects) == _part10(first.key_objects)
    # The SR's evidence names the map as it was built (class, series, instance).
    pm = second.parametric_map
    named = {
        (series.SeriesInstanceUID, ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
        for study in second.sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert (pm.SeriesInstanceUID, pm.SOPClassUID, pm.SOPInstanceUID) in named

    # Written while built: the files write_results writes, the same bytes, no previews.
    again = tmp_path / "again"
    files = write_results(second, again)
    assert len(files) == 12 + 3  # heatmaps, map, SR, key objects
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again).as_posix() for p in files)
    for path in files:
        assert (out / path.relative_to(again)).read_bytes() == path.read_bytes(), path
    previews = write_previews(second, out)
    assert [p.name for p in previews] == [name for name, _ in first.previews]
    assert [p.read_bytes() for p in previews] == [png for _, png in first.previews]
    assert write_previews(second, out) == []  # those present are left as they are


def test_the_sr_encoded_in_the_report_process_is_the_same_and_survives_its_death(
    positive: tuple[Classifier, Prediction], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SR and key objects encoded in the report process are, once written, the
    bytes encoded in a thread; a process killed mid-way leaves the job to encode
    them itself (same bytes), and the next use after the pause starts a new one."""
    import os
    import signal

    import ich_node.results.reports as reports_module
    from ich_node.results.common import output_time
    from ich_node.results.reports import ReportProcess

    classifier, prediction = positive
    options = ResultOptions(parametric_map=True, key_objects=True, sr_classes=("enhanced",))
    explained = explain_series(prediction, classifier)
    when = output_time(explained.header)
    here = encode(explained, classifier.card, options, when=when)
    process = ReportProcess("console", "WARNING")
    try:
        pid = process.start()
        assert pid != os.getpid()
        there = encode(explained, classifier.card, options, when=when, reports=process)
        assert process.starts == 1
        assert there.sr_alternatives == here.sr_alternatives
        assert here.key_objects is not None and there.key_objects is not None
        for a, b in ((here.sr, there.sr), (here.key_objects, there.key_objects)):
            assert _part10(b) == _part10(a)
        assert [_part10(ds) for ds in there.heatmaps] == [_part10(ds) for ds in here.heatmaps]
        written = write_results(there, tmp_path / "there")
        assert (tmp_path / "there" / "sr.dcm").read_bytes() == _part10(here.sr)
        assert len(written) == 12 * 2 + 3  # heatmaps and previews, map, SR, key objects

        os.kill(pid, signal.SIGKILL)  # the process dies: the SR is encoded in this one
        again = encode(explained, classifier.card, options, when=when, reports=process)
        assert _part10(again.sr) == _part10(here.sr)
        assert process.submit(os.getpid) is None  # paused after the loss
        monkeypatch.setattr(reports_module, "RETRY_SECONDS", 0.0)  # no pause now
        process.lost(RuntimeError("the pause, shortened"))
        assert process.start() not in (pid, os.getpid())
        assert process.starts == 2
    finally:
        process.close()


def test_inputs_that_cannot_travel_to_the_report_process_are_encoded_here(
    positive: tuple[Classifier, Prediction],
) -> None:
    """What cannot be sent to the process (here a predecessor SR's dataset carrying
    a Python attribute that does not pickle) is encoded in the job's own process,
    the same bytes, and the process is kept."""
    from ich_node.results.common import output_time
    from ich_node.results.reports import ReportProcess

    classifier, prediction = positive
    explained = explain_series(prediction, classifier)
    when = output_time(explained.header)
    previous = pydicom.Dataset()
    previous.StudyInstanceUID = prediction.series.study_instance_uid
    previous.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    previous.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    previous.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    here = encode(explained, classifier.card, previous_sr=previous, when=when)
    object.__setattr__(previous, "on_read", lambda: None)  # pickle refuses a lambda
    process = ReportProcess("console", "WARNING")
    try:
        pid = process.start()
        with structlog.testing.capture_logs() as logs:
            there = encode(
                explained, classifier.card, previous_sr=previous, when=when, reports=process
            )
        assert _part10(there.sr) == _part10(here.sr)
        assert "PredecessorDocumentsSequence" in there.sr
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "results.report_process_failed"
        ]
        assert process.start() == pid and process.starts == 1  # the same process
    finally:
        process.close()


def test_heatmaps_built_before_their_pixels_are_what_highdicom_builds_from_them(
    positive: tuple[Classifier, Prediction],
) -> None:
    """The Secondary Capture images are built (highdicom) while their pixels are
    drawn, then given them: byte for byte what highdicom builds from the drawn
    pixels; and pixels of another size, or an encapsulated image, are refused."""
    import numpy as np

    from ich_node.results.build import _finish
    from ich_node.results.common import output_time, study_attributes
    from ich_node.results.sc import (
        HeatmapImage,
        build_heatmap_series,
        render_heatmaps,
        set_heatmap_pixels,
    )

    classifier, prediction = positive
    explained = explain_series(prediction, classifier)  # overlays drawn
    series = explained.series
    images = render_heatmaps(explained, classifier.card)
    assert len(images) == 12 and any(image.rgb.any() for image in images)
    attributes = study_attributes(explained.header, series.study_instance_uid)
    study, when = attributes.plain, output_time(explained.header)
    uids = [f"2.25.{100 + k}" for k in range(len(images))]
    common: dict[str, Any] = {"series_instance_uid": "2.25.99", "sop_instance_uids": uids}
    drawn = build_heatmap_series(series, images, classifier.card, study, **common)
    blank = [replace(image, rgb=np.zeros_like(image.rgb)) for image in images]
    early = build_heatmap_series(series, blank, classifier.card, study, **common)
    assert _part10(early[0]) != _part10(drawn[0])
    for ds, image in zip(early, images, strict=True):
        set_heatmap_pixels(ds, image.rgb)
    for ds in (*early, *drawn):  # as build_results does: one output time for all
        _finish(ds, attributes, when, series.lossy)
    assert [_part10(ds) for ds in early] == [_part10(ds) for ds in drawn]
    with pytest.raises(ValueError, match="the image holds"):
        set_heatmap_pixels(early[0], images[0].rgb[:-1])
    with pytest.raises(ValueError, match="the image holds"):
        set_heatmap_pixels(early[0], images[0].rgb.astype(np.uint16))
    compressed = copy.deepcopy(early[0])
    compressed.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    with pytest.raises(ValueError, match="native"):
        set_heatmap_pixels(compressed, images[0].rgb)
    assert isinstance(images[0], HeatmapImage)


def test_a_heatmap_file_serialised_around_blank_pixels_is_what_pydicom_writes(
    positive: tuple[Classifier, Prediction],
) -> None:
    """pixel_template: a heatmap image's file written before its pixels are drawn,
    then given them, is byte for byte pydicom's file of the finished image, in
    Explicit and Implicit VR Little Endian and with an odd-length Pixel Data (its
    padding byte); where the bytes of Pixel Data are not the file's last bytes as
    they are (an element after it, a deflated or encapsulated syntax) there is no
    template, and pixels of another size are refused."""
    import numpy as np

    from ich_node.results.common import study_attributes
    from ich_node.results.sc import (
        build_heatmap_series,
        pixel_template,
        render_heatmaps,
        set_heatmap_pixels,
    )

    classifier, prediction = positive
    explained = explain_series(prediction, classifier)
    series = explained.series
    images = render_heatmaps(explained, classifier.card)[:2]
    study = study_attributes(explained.header, series.study_instance_uid).plain
    blank = [replace(image, rgb=np.zeros_like(image.rgb)) for image in images]
    common: dict[str, Any] = {"series_instance_uid": "2.25.99"}
    early = build_heatmap_series(
        series, blank, classifier.card, study, sop_instance_uids=["2.25.1", "2.25.2"], **common
    )

    def finished(ds: pydicom.Dataset, rgb: np.ndarray) -> bytes:
        done = copy.deepcopy(ds)
        set_heatmap_pixels(done, rgb)
        return _part10(done)

    def written(template: Any, rgb: np.ndarray) -> bytes:
        return b"".join(bytes(piece) for piece in template.chunks(rgb))

    syntaxes = (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian)
    for ds, image in zip(early, images, strict=True):
        for syntax in syntaxes:
            ds.file_meta.TransferSyntaxUID = syntax
            template = pixel_template(ds)
            assert template is not None and template.tail == b""
            assert written(template, image.rgb) == finished(ds, image.rgb)
            assert written(template, image.rgb) != _part10(ds)  # the pixels did change
    # An odd number of pixel bytes (3 x 5 x 3): pydicom pads the value with one zero.
    odd = copy.deepcopy(early[0])
    odd.Rows, odd.Columns = 3, 5
    odd.PixelData = bytes(45)
    rgb = np.arange(45, dtype=np.uint8).reshape(3, 5, 3)
    for syntax in syntaxes:
        odd.file_meta.TransferSyntaxUID = syntax
        template = pixel_template(odd)
        assert template is not None and template.tail == b"\x00" and template.length == 45
        assert written(template, rgb) == finished(odd, rgb)
    with pytest.raises(ValueError, match="contiguous bytes needed"):
        template.chunks(rgb[:, :4])
    with pytest.raises(ValueError, match="contiguous bytes needed"):
        template.chunks(rgb.astype(np.uint16))
    # No template where the value is not the file's last bytes, as they are.
    trailing = copy.deepcopy(early[0])
    trailing.DataSetTrailingPadding = b"\x00\x00"
    assert pixel_template(trailing) is None
    for syntax in (pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.RLELossless):
        other = copy.deepcopy(early[0])
        other.file_meta.TransferSyntaxUID = syntax
        assert pixel_template(other) is None


def _varied_geometry(series: Any) -> Any:
    """The series with three geometries among its slices: slices 4-7 another pixel
    spacing, slices 8-11 another orientation (rows along -x: patient orientation
    "R" first) and slices 6 and 10 lossy-compressed."""
    from ich_node.imaging.records import LossyCompression

    lossy = LossyCompression(methods=("ISO_10918_1",), ratios=("8.5",), transfer_syntax="")
    slices = []
    for i, src in enumerate(series.slices):
        if 4 <= i < 8:
            src = replace(src, pixel_spacing=(0.625, 0.625))
        if i >= 8:
            src = replace(src, image_orientation=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
        if i in (6, 10):
            src = replace(src, lossy=lossy)
        slices.append(src)
    return replace(series, slices=tuple(slices))


def test_heatmap_images_copied_from_highdicom_s_are_what_highdicom_builds_for_each(
    positive: tuple[Classifier, Prediction], monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_heatmap_series builds one image per geometry with highdicom and copies
    the others from it: each image is byte for byte the one highdicom builds for it
    alone (with the same finishing), over slices of three pixel spacings and
    orientations, some lossy-compressed; and no two images share a sequence, an
    item or a value list."""
    import highdicom as hd

    from ich_node.results import sc
    from ich_node.results.build import _finish
    from ich_node.results.common import output_time, study_attributes

    classifier, prediction = positive
    explained = explain_series(prediction, classifier)
    series = _varied_geometry(explained.series)
    images = sc.render_heatmaps(explained, classifier.card)
    attributes = study_attributes(explained.header, series.study_instance_uid)
    when = output_time(explained.header)

    def finish(ds: pydicom.Dataset, source: Any) -> None:  # (the slice's own compression)
        _finish(ds, attributes, when, source.lossy)

    built = 0
    highdicom_sc = hd.sc.SCImage

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal built
        built += 1
        return highdicom_sc(*args, **kwargs)

    monkeypatch.setattr(hd.sc, "SCImage", counted)
    uids = [f"2.25.{100 + k}" for k in range(len(images))]
    common: dict[str, Any] = {"series_instance_uid": "2.25.99", "finish": finish}
    together = sc.build_heatmap_series(
        series, images, classifier.card, attributes.plain, sop_instance_uids=uids, **common
    )
    # Geometries: 0-3, 4-5 and 7, 6 (lossy), 8-9 and 11, 10 (lossy).
    assert built == 5
    alone = [
        sc.build_heatmap_series(
            series, [image], classifier.card, attributes.plain, sop_instance_uids=[uid], **common
        )[0]
        for image, uid in zip(images, uids, strict=True)
    ]
    assert built == 5 + len(images)
    assert [_part10(ds) for ds in together] == [_part10(ds) for ds in alone]
    assert together[8].PatientOrientation == ["R", "P"] and together[4].PixelSpacing == [
        0.625,
        0.625,
    ]
    assert together[6].LossyImageCompression == "01" and "LossyImageCompression" not in together[5]
    # Each image its own: changing one changes no other.
    before = [_part10(together[0]), _part10(together[1])]
    together[2].ContributingEquipmentSequence[0].Manufacturer = "changed"
    together[2].ImageType[2] = "CHANGED"
    together[2].file_meta.ImplementationVersionName = "CHANGED"
    assert [_part10(together[0]), _part10(together[1])] == before


def test_heatmap_files_serialised_together_are_what_pydicom_writes_for_each(
    positive: tuple[Classifier, Prediction],
) -> None:
    """pixel_templates: the files of a series' images, their elements alike
    encoded once, are byte for byte pixel_template's (pydicom's) for each image:
    in Explicit and Implicit VR, with a Latin-1 patient name; an image whose
    decimal strings are equal to the first's but written otherwise ("0.50"), one in
    another character set and one in another transfer syntax in between; and no
    template where pixel_template has none."""
    import numpy as np

    from ich_node.results import sc
    from ich_node.results.common import study_attributes

    classifier, prediction = positive
    explained = explain_series(prediction, classifier)
    series = _varied_geometry(explained.series)
    images = sc.render_heatmaps(explained, classifier.card)
    study = study_attributes(explained.header, series.study_instance_uid).plain
    study.PatientName = "Müller^Jürgen"
    blank = [replace(image, rgb=np.zeros_like(image.rgb)) for image in images]
    uids = [f"2.25.{100 + k}" for k in range(len(images))]
    early = sc.build_heatmap_series(
        series, blank, classifier.card, study, series_instance_uid="2.25.99", sop_instance_uids=uids
    )
    for ds in early:
        ds.SpecificCharacterSet = "ISO_IR 100"
    early[2].PixelSpacing = ["0.50", "0.50"]  # equal to the first's 0.5, written otherwise
    early[3].SpecificCharacterSet = "ISO_IR 192"
    early[4].file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    early[5].file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    for syntax in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian):
        early[0].file_meta.TransferSyntaxUID = syntax
        together = sc.pixel_templates(early)
        one_by_one = [sc.pixel_template(ds) for ds in early]
        assert together[5] is None and one_by_one[5] is None
        for ds, mine, theirs, image in zip(early, together, one_by_one, images, strict=True):
            if theirs is None:
                continue
            assert mine is not None
            assert (mine.head, mine.length, mine.tail) == (theirs.head, theirs.length, theirs.tail)
            done = copy.deepcopy(ds)
            done.PixelData = image.rgb.tobytes()
            assert b"".join(bytes(piece) for piece in mine.chunks(image.rgb)) == _part10(done)
    assert b"M\xfcller" in together[0].head  # Latin-1, as the character set says


def test_heatmaps_built_ahead_or_after_the_drawing_are_the_same_files(
    positive: tuple[Classifier, Prediction], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Whether the Secondary Capture images are built while the pixels are drawn
    (images of AHEAD_MIN_PIXELS and more) or after, the files are the same bytes;
    written as they are encoded (their files serialised around the blank pixels),
    each file is pydicom's file of the finished image."""
    import ich_node.results.build as build
    from ich_node.model.heatmaps import with_heatmap_images
    from ich_node.results.common import output_time

    classifier, prediction = positive
    plain = explain_series(prediction, classifier, render=False)
    when = output_time(plain.header)
    drawn = []
    for limit in (1, 10**12):  # ahead, after
        monkeypatch.setattr(build, "AHEAD_MIN_PIXELS", limit)
        drawn.append(
            encode(
                plain,
                classifier.card,
                ResultOptions(),
                when=when,
                render=lambda e: with_heatmap_images(e, "positive", "cpu"),
                previews=False,
                out_dir=tmp_path / str(limit),
            )
        )
    ahead, after = drawn
    assert len(ahead.heatmaps) == len(after.heatmaps) == 12
    assert [_part10(ds) for ds in ahead.heatmaps] == [_part10(ds) for ds in after.heatmaps]
    assert _part10(ahead.sr) == _part10(after.sr)
    for limit, results in ((1, ahead), (10**12, after)):
        for ds in results.heatmaps:
            path = tmp_path / str(limit) / "heatmaps" / f"{int(ds.InstanceNumber)}.dcm"
            assert path.read_bytes() == _part10(ds), path
