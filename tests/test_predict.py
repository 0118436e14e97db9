"""Offline prediction: `ich-node predict` on phantom series and real scanner files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ich_node.imaging import preprocess_hu, read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.results.findings import read_findings
from ich_node.service.cli import main
from training.phantom import write_series


def _predict(bundle: Path, out: Path, *inputs: Path, dicom: bool = False) -> int:
    """``ich-node predict`` through the CLI's entry point; its exit code."""
    argv = ["predict", "--bundle", str(bundle), "--out", str(out)]
    return main([*argv, *([] if dicom else ["--no-dicom"]), *map(str, inputs)])


def _findings(out: Path, series_uid: str) -> dict:
    return json.loads((out / series_uid / "findings.json").read_text())


def test_predict_writes_findings_in_spatial_order(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    phantom = write_series(
        tmp_path / "in", seed=3, subtypes=("epidural",), n_slices=12, matrix=128,
        shuffle_instance_numbers=True,
    )  # fmt: skip
    out = tmp_path / "out"
    assert _predict(tiny_bundle, out, tmp_path / "in") == 0
    data = _findings(out, phantom.series_instance_uid)
    assert data["study_instance_uid"] == phantom.study_instance_uid
    assert data["n_slices"] == 12 == len(data["slices"])
    assert [s["sop_instance_uid"] for s in data["slices"]] == list(phantom.sop_instance_uids)
    positions = [s["position_mm"] for s in data["slices"]]
    assert positions == sorted(positions)
    card = load_bundle(tiny_bundle).card
    assert data["model"] == {
        "name": card.name, "version": card.version, "arch": "resnet18", "sha256": card.sha256, "demo": True,
        "stages": ["cnn"], "tta": False,
    }  # fmt: skip
    assert "not a diagnosis" in data["notice"] and "DEMO" in data["notice"]
    for label in LABELS:
        series = data["series"][label]
        per_slice = [s["probabilities"][label] for s in data["slices"]]
        assert series["probability"] == pytest.approx(max(per_slice))
        reaches = series["probability"] >= series["threshold"]
        any_positive = data["series"]["any"]["positive"]
        assert series["positive"] == (reaches if label == "any" else reaches and any_positive)
        assert all(0.0 <= p <= 1.0 for p in per_slice)
    table = capsys.readouterr().out
    assert "subdural" in table and "Results in" in table


def test_predict_equals_the_model_on_shared_preprocessing(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """findings.json holds exactly what the model says on the shared preprocessing."""
    phantom = write_series(tmp_path / "in", seed=4, subtypes=("subdural",), n_slices=8, matrix=128)
    out = tmp_path / "out"
    assert _predict(tiny_bundle, out, *phantom.paths) == 0
    bundle = load_bundle(tiny_bundle)
    images = preprocess_hu(
        phantom.volume.hu.astype(np.float32), bundle.card.windows, bundle.card.input_size
    )
    with torch.inference_mode():
        expected = torch.sigmoid(bundle.model(torch.from_numpy(images))).numpy()
    got = read_findings(out / phantom.series_instance_uid / "findings.json").slice_probabilities()
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_reversed_and_shuffled_files_give_the_same_findings(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    phantom = write_series(tmp_path / "in", seed=5, n_slices=8, matrix=128)
    bundle = load_bundle(tiny_bundle)
    classifier = Classifier(bundle, device="cpu", batch_size=3)
    forward = classifier.predict_series(read_series(list(phantom.paths))).findings
    backward = classifier.predict_series(read_series(list(reversed(phantom.paths)))).findings
    rng = np.random.default_rng(0)
    shuffled = classifier.predict_series(
        read_series([phantom.paths[i] for i in rng.permutation(8)])
    ).findings
    assert forward.to_dict() == backward.to_dict() == shuffled.to_dict()


def test_several_series_and_a_bad_file(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write_series(tmp_path / "in" / "a", seed=10, n_slices=6, matrix=128)
    b = write_series(
        tmp_path / "in" / "b", seed=11, subtypes=("intraventricular",), n_slices=6, matrix=128
    )
    out = tmp_path / "out"
    assert _predict(tiny_bundle, out, tmp_path / "in") == 0
    assert (out / a.series_instance_uid / "findings.json").is_file()
    assert (out / b.series_instance_uid / "findings.json").is_file()
    capsys.readouterr()
    # A slice whose pixel data are cut short: left out with a reason naming the file,
    # the rest of the series read (issue #13: never refuse a readable series).
    c = write_series(tmp_path / "in2", seed=12, n_slices=6, matrix=128)
    broken = c.paths[2]
    broken.write_bytes(broken.read_bytes()[:-5000])
    assert _predict(tiny_bundle, out, tmp_path / "in2") == 0
    err = capsys.readouterr().err
    assert f"left out {broken.name}: Pixel Data holds" in err
    data = json.loads((out / c.series_instance_uid / "findings.json").read_text())
    assert data["n_slices"] == 5
    assert [d["sop_instance_uid"] for d in data["dropped"]] == [c.sop_instance_uids[2]]
    # A file that is not DICOM at all beside a good series: named, the series still read.
    (tmp_path / "in" / "notes.dcm").write_text("not dicom")
    assert _predict(tiny_bundle, tmp_path / "out3", tmp_path / "in") == 1
    assert "notes.dcm: not a readable DICOM image" in capsys.readouterr().err
    assert (tmp_path / "out3" / a.series_instance_uid / "findings.json").is_file()


def test_predict_refuses_a_missing_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _predict(tmp_path / "none.safetensors", tmp_path, tmp_path, dicom=True) == 2
    assert "no such model bundle" in capsys.readouterr().err


def test_console_script(tmp_path: Path, tiny_bundle: Path) -> None:
    exe = Path(sys.executable).parent / "ich-node"
    if not exe.exists():
        pytest.skip("ich-node console script not installed (pip install -e .)")
    phantom = write_series(tmp_path / "in", seed=6, n_slices=6, matrix=128)
    run = subprocess.run(
        [str(exe), "predict", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out"), "--no-dicom", str(tmp_path / "in")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / phantom.series_instance_uid / "findings.json").is_file()


def test_real_ge_series_with_gantry_tilt(real_ct: Path, tmp_path: Path, tiny_bundle: Path) -> None:
    folder = real_ct / "neurolabusc+dcm_qa_ct" / "In" / "GE"
    if not folder.is_dir():
        pytest.skip("GE series absent")
    out = tmp_path / "out"
    assert _predict(tiny_bundle, out, folder) == 0
    (found,) = list(out.glob("*/findings.json"))
    data = json.loads(found.read_text())
    positions = [s["position_mm"] for s in data["slices"]]
    assert positions == sorted(positions) and len(positions) >= 20


def test_real_rsna_slices_write_findings_and_explain_skipped_dicom(
    real_ct: Path, tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = real_ct / "inesriahi+web-application-for-ich-detection-from-ct-scans" / "Samples"
    if not folder.is_dir():
        pytest.skip("RSNA samples absent")
    staged = tmp_path / "rsna"
    shutil.copytree(folder, staged)
    out = tmp_path / "out"
    assert _predict(tiny_bundle, out, staged, dicom=True) == 0
    assert len(list(out.glob("*/findings.json"))) == 5
    assert not list(out.glob("*/sr.dcm"))
    assert "DICOM results skipped" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu(tmp_path: Path, tiny_bundle: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    phantom = write_series(tmp_path / "in", seed=8, subtypes=("subdural",), n_slices=8, matrix=128)
    series = read_series(list(phantom.paths))
    cpu = Classifier(load_bundle(tiny_bundle), device="cpu").predict_series(series).findings
    gpu = Classifier(load_bundle(tiny_bundle), device="cuda").predict_series(series).findings
    np.testing.assert_allclose(gpu.slice_probabilities(), cpu.slice_probabilities(), atol=0.05)


def test_predict_writes_dicom_results_next_to_findings(tmp_path: Path, tiny_bundle: Path) -> None:
    import pydicom

    phantom = write_series(tmp_path / "in", seed=9, subtypes=("subdural",), n_slices=6, matrix=128)
    out = tmp_path / "out"
    argv = [
        "predict",
        "--bundle",
        str(tiny_bundle),
        "--out",
        str(out),
        "--heatmaps",
        "all",
        "--parametric-map",
        "--negative-top-slices",
        "2",
        str(tmp_path / "in"),
    ]
    assert main(argv) == 0
    folder = out / phantom.series_instance_uid
    findings = json.loads((folder / "findings.json").read_text())
    sr = pydicom.dcmread(folder / "sr.dcm")
    assert sr.Modality == "SR" and sr.StudyInstanceUID == phantom.study_instance_uid
    heatmaps = sorted((folder / "heatmaps").glob("*.dcm"))
    assert len(heatmaps) == findings["n_slices"] == 6
    assert len(list((folder / "heatmaps").glob("*.png"))) == 6
    sources = [pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID for p in heatmaps]
    assert sorted(sources) == sorted(phantom.sop_instance_uids)
    assert pydicom.dcmread(folder / "parametric_map.dcm").Modality == "OT"


def test_a_subtype_is_positive_only_in_a_series_positive_for_any() -> None:
    from ich_node.results.findings import ModelInfo, summarise

    thresholds = {label: 0.5 for label in LABELS} | {"subdural": 0.05}
    probabilities = np.zeros((3, len(LABELS)), np.float32)
    probabilities[1, LABELS.index("subdural")] = 0.2  # above its own threshold
    args = {
        "study_instance_uid": "1.2", "series_instance_uid": "1.2.3",
        "sop_instance_uids": ("1.2.3.1", "1.2.3.2", "1.2.3.3"), "positions_mm": (0.0, 5.0, 10.0),
        "thresholds": thresholds, "model": ModelInfo("m", "1", "resnet18", "0" * 64, False),
    }  # fmt: skip
    negative = summarise(probabilities=probabilities, **args)
    assert not negative.series["any"].positive and not negative.series["subdural"].positive
    assert negative.positive_labels == ()
    probabilities[1, LABELS.index("any")] = 0.9
    positive = summarise(probabilities=probabilities, **args)
    assert positive.positive_labels == ("any", "subdural")
    assert positive.positive_slices("subdural") == (1,)


def test_predict_writes_results_for_bare_data_sets(tmp_path: Path, tiny_bundle: Path) -> None:
    """Files without preamble, DICM or file meta (PS3.10 7.1 not followed) that the
    imaging stage reads are read by every later stage too: the SR and heatmaps are
    written, dated in the source's zone (read from the same bare header)."""
    import pydicom

    phantom = write_series(tmp_path / "src", seed=4, n_slices=6, matrix=128)
    bare = tmp_path / "in"
    bare.mkdir()
    for i, p in enumerate(phantom.paths):
        ds = pydicom.dcmread(p)
        ds.TimezoneOffsetFromUTC = "+0900"
        del ds.file_meta
        ds.preamble = None
        ds.save_as(bare / f"slice{i}", implicit_vr=True, little_endian=True)
        assert (bare / f"slice{i}").read_bytes()[128:132] != b"DICM"
    out = tmp_path / "out"
    argv = ["predict", "--bundle", str(tiny_bundle), "--out", str(out), "--heatmaps", "all"]
    assert main([*argv, str(bare)]) == 0
    folder = out / phantom.series_instance_uid
    sr = pydicom.dcmread(folder / "sr.dcm")
    assert sr.StudyInstanceUID == phantom.study_instance_uid
    assert sr.TimezoneOffsetFromUTC == "+0900"
    heatmaps = sorted((folder / "heatmaps").glob("*.dcm"))
    assert len(heatmaps) == 6
    assert {pydicom.dcmread(p).TimezoneOffsetFromUTC for p in heatmaps} == {"+0900"}
