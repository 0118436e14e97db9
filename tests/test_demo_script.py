"""Pieces of ``scripts/demo.py`` (``make demo`` itself takes 20+ minutes).

The demo says when the positive study's HL7 alert reached its RIS stand-in
relative to the SR at its PACS; here a real MLLP receiver, a real pynetdicom
storage SCP (the demo's own ``Pacs``) and, where installed, Orthanc.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from benchmarks.common import MLLPReceiver
from ich_node.delivery import hl7 as hl7_alert
from tests.orthanc_util import orthanc_binary
from tests.test_alerts_transports import _alert, _hl7_target

REPO = Path(__file__).resolve().parents[1]
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ich_demo", REPO / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ich_demo"] = module
    spec.loader.exec_module(module)
    return module


def _sr(study_uid: str, folder: Path) -> tuple[pydicom.Dataset, Path]:
    """A minimal SR header of ``study_uid`` (what the PACS keys on), also as a file."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = COMPREHENSIVE_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "DEMO"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, path


def test_alert_lead_says_before_or_after(demo: ModuleType) -> None:
    assert demo.alert_lead(10.0, 11.5) == "1.5 s before its SR reached the PACS"
    assert demo.alert_lead(10.0, 8.0) == "2.0 s after its SR reached the PACS"
    assert demo.alert_lead(10.0, 10.01) == "together with its SR"
    assert demo.alert_lead(10.0, None) == "its SR has not reached the PACS"


def test_alert_and_sr_arrivals_are_printed_in_order(
    demo: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pynetdicom import AE

    ris = MLLPReceiver()
    pacs = demo.Pacs(tmp_path / "pacs")
    try:
        target = _hl7_target(ris.port)
        alert = _alert(target)
        study = alert.study_instance_uid
        assert pacs.sr_arrival(study) is None
        hl7_alert.send_oru(alert, target)  # the alert first, as the node sends it
        sr, _ = _sr(study, tmp_path)
        ae = AE(ae_title="ICH_NODE")
        ae.add_requested_context(COMPREHENSIVE_SR, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", pacs.port, ae_title=pacs.ae_title)
        assert assoc.is_established
        assert assoc.send_c_store(sr).Status == 0x0000
        assoc.release()
        sr_at = pacs.sr_arrival(study)
        (alert_at, _message), *_ = ris.arrived
        assert sr_at is not None and alert_at < sr_at
        demo._print_alerts(ris, {study: sr_at, "1.2.3.other": None})
        out = capsys.readouterr().out
        assert "Alerts at the demo RIS (HL7 ORU^R01 over MLLP): 1" in out
        assert f"arrived {demo.alert_lead(alert_at, sr_at)}" in out
        assert "accession ACC123: priority S" in out
        assert "Subdural hemorrhage: 0.9100  <- flagged" in out
    finally:
        pacs.stop()
        ris.close()


def test_a_preliminary_alert_and_its_final_are_told_apart(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's node reads while the series arrives: its RIS gets P, then F."""
    import time

    ris = MLLPReceiver()
    try:
        target = _hl7_target(ris.port)
        sent = time.perf_counter()
        for status in ("P", "F"):
            hl7_alert.send_oru(_alert(target, status=status), target)
        study = _alert(target).study_instance_uid
        demo._print_alerts(ris, {study: None}, {study: sent})
        out = capsys.readouterr().out
        assert "Alerts at the demo RIS (HL7 ORU^R01 over MLLP): 2" in out
        first, second = (line for line in out.splitlines() if "result status" in line)
        assert "result status P (preliminary: sent while the series was still arriving)" in first
        assert "result status F (final)" in second
        for line, (alert_at, _) in zip((first, second), ris.arrived, strict=True):
            assert f"({alert_at - sent:.1f} s after the study was sent)" in line
        assert "NTE: PRELIMINARY: based on the 6 slices received so far" in out
    finally:
        ris.close()


@pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed")
def test_orthanc_pacs_sees_the_sr_arrive(demo: ModuleType, tmp_path: Path) -> None:
    from benchmarks.common import free_port

    pacs = demo.OrthancPacs(tmp_path / "orthanc", free_port())
    try:
        study = generate_uid()
        assert pacs.sr_arrival(study) is None
        _, path = _sr(study, tmp_path)
        pacs.server.upload([path])
        first = pacs.sr_arrival(study)
        assert first is not None
        assert pacs.sr_arrival(study) == first  # the first sighting is kept
        # Without the web viewer plugin, the study's lines say why there are no links.
        pacs.viewer = False
        where = pacs.where(study)
        assert "Orthanc Explorer" in where and "orthanc-webviewer" in where
        assert "/web-viewer/" not in where
    finally:
        pacs.server.stop()  # not pacs.stop(): that leaves the demo's Orthanc running


def test_the_demo_starts_the_web_console_and_prints_how_to_log_in(
    demo: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_console: a real ``ich-node web`` on the demo's config; its user logs in."""
    import json
    import re
    import time

    import httpx

    from benchmarks.common import free_port

    monkeypatch.setattr(demo, "DEMO", tmp_path)
    port = free_port()
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({
        "storage": {"dir": str(tmp_path / "node")},
        "web": {"address": f"127.0.0.1:{port}", "users_file": str(tmp_path / "web-users")},
    }))  # fmt: skip
    url, password = demo.start_console(config, tmp_path)
    try:
        assert url == f"http://127.0.0.1:{port}/" and len(password) >= 16
        with httpx.Client(base_url=url) as client:
            token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)
            assert token is not None
            answer = client.post("/login", data={"csrf": token.group(1), "name": "demo",
                                                 "password": password, "next": "/"})  # fmt: skip
            assert answer.status_code == 303 and answer.headers["location"] == "/"
            page = client.get("/validation")
            assert page.status_code == 200 and "demo (admin)" in page.text
    finally:
        demo.stop_console()
    assert not (tmp_path / "web.pid").exists()
    deadline = time.monotonic() + 30
    while not demo._port_free(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert demo._port_free(port), "the console did not stop"


def _series_column(text: str, header: str) -> list[str]:
    """The first column of the table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 1 :]:
        first = line.split()[0] if line.strip() else ""
        if first == "threshold":
            continue
        if not (first.startswith("...") or first[:1].isdigit()):  # a UID, whole or cut
            break
        rows.append(first)
    return rows


def test_truth_table_lists_series_in_predicts_order(
    demo: ModuleType,
    tiny_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The demo's truth table and ``predict``'s table: one order, the same short UIDs."""
    import csv

    from ich_node.service.cli import main, short_uid
    from training.phantom import write_dataset

    holdout = tmp_path / "holdout"
    write_dataset(holdout, 4, seed=2, n_slices=3, matrix=64)
    with open(holdout / "phantom_truth.csv", newline="") as handle:
        uids = [row["series_instance_uid"] for row in csv.DictReader(handle)]
    # These UIDs sort differently by their shortened form than whole: the old fault.
    assert sorted(uids) != sorted(uids, key=short_uid)
    results = tmp_path / "results"
    argv = ["predict", "--bundle", str(tiny_bundle), "--out", str(results), str(holdout / "images")]
    assert main([*argv, "--no-dicom"]) == 0
    predicted = _series_column(capsys.readouterr().out, "series ")
    monkeypatch.setattr(demo, "HOLDOUT", holdout)
    monkeypatch.setattr(demo, "RESULTS", results)
    assert demo.report() == 0
    truth = _series_column(capsys.readouterr().out, "series ")
    assert predicted == truth == [short_uid(u) for u in sorted(uids)]


def test_web_viewer_links_or_why_there_are_none(demo: ModuleType) -> None:
    url = "http://127.0.0.1:8042"
    assert demo.viewer_lines(url, ["abc", "def"], True) == [
        f"  heatmaps in the web viewer: {url}/web-viewer/app/viewer.html?series=abc",
        f"  heatmaps in the web viewer: {url}/web-viewer/app/viewer.html?series=def",
    ]
    (why,) = demo.viewer_lines(url, ["abc"], False)
    assert "no web-viewer links" in why and "apt-get install orthanc-webviewer" in why


def test_demo_stop_says_when_nothing_was_running(
    demo: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import subprocess

    monkeypatch.setattr(demo, "DEMO", tmp_path)
    # A running "Orthanc" (a sleeping child of this test): stopped, pid file gone.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / "orthanc.pid").write_text(f"{child.pid}\n")
    demo.demo_stop()
    assert child.wait(timeout=30) != 0
    assert capsys.readouterr().out == f"stopped the demo's Orthanc (pid {child.pid})\n"
    assert not (tmp_path / "orthanc.pid").exists()
    # A second `make demo-stop`: says there was nothing to stop.
    nothing = "no Orthanc or web console of an earlier demo is running: nothing to stop\n"
    demo.demo_stop()
    assert capsys.readouterr().out == nothing
    # Pid files left by processes that ended on their own: nothing to stop either.
    for name in ("orthanc.pid", "web.pid"):
        (tmp_path / name).write_text(f"{child.pid}\n")
    demo.demo_stop()
    assert capsys.readouterr().out == nothing
    assert not (tmp_path / "orthanc.pid").exists() and not (tmp_path / "web.pid").exists()
    # The demo's own clean-up at its start stays quiet.
    assert demo.stop_orthanc() == "none" and demo.stop_console() == "none"
    assert capsys.readouterr().out == ""


def test_training_notice_before_the_demo_trains(demo: ModuleType) -> None:
    import os

    preset = REPO / "config" / "train_demo.yaml"
    quiet = demo.training_notice(preset, 0.1)
    assert quiet.startswith(
        "Training the demo model: 12 epochs, about 25 s each on 2 idle cores (about 5 min)"
    )
    assert "estimate for this machine" in quiet and "load" not in quiet
    busy = demo.training_notice(preset, 10.0 * (os.cpu_count() or 1))
    assert "expect it to take longer" in busy
