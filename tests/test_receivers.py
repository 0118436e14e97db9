"""Results to the PACS as real receivers take them (issue #24), on 127.0.0.1.

- DCMTK ``storescp +xi`` (Implicit VR Little Endian only) receives the SR and every
  heatmap: each object is offered in its own syntax, Explicit and Implicit VR LE.
- DCMTK ``storescp`` with a restricted SOP class list (``-xf``) that takes no
  Comprehensive 3D SR receives the SR in a class it takes (highdicom encodes the
  report in Comprehensive SR and Enhanced SR too); one that takes no SR class at
  all gets a reason naming the class and the syntaxes, at the first attempt.
- C-STORE warnings count as stored, the warning recorded (a pynetdicom SCP).
- A hung destination beside a healthy one: the healthy one gets each study's
  results within seconds of its job (each destination in its own lane), through
  the sender's lanes and through a whole ``serve``, which SIGTERM still stops.
- DICOMweb (STOW-RS) into a real Orthanc with its DICOMweb plugin, and a
  token-checking proxy in front of it that refuses a wrong bearer token.
"""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from benchmarks.common import free_port, queue_series, random_bundle
from ich_node.config import Destination, SenderSection, parse_config
from ich_node.delivery.sender import Sender
from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.layout import results_dir
from ich_node.queue.store import Store
from ich_node.results.sr import SR_CLASSES
from ich_node.service.worker import Worker
from tests.conftest import dcmtk
from tests.receiver_peers import HungPeer, Storescp
from tests.receiver_peers import job_with_results as _job
from tests.receiver_peers import restricted_profile as _restricted
from training.phantom import write_series

SR_3D, SR_COMPREHENSIVE, SR_ENHANCED = (SR_CLASSES[k] for k in SR_CLASSES)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real job's results folder: outbox (SR + a heatmap per slice) and sr-classes/."""
    root = tmp_path_factory.mktemp("receivers")
    study = write_series(root / "s", seed=11, subtypes=("subdural",), n_slices=10, matrix=128)
    bundle = random_bundle(root / "m.safetensors", name="receiver test model", version="1.0.0",
                           thresholds=dict.fromkeys(LABELS, 0.01))  # fmt: skip
    config = parse_config(
        {
            "storage": {"dir": str(root / "node")},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
            "results": {"heatmaps": "all"},
        }
    )
    store = Store.open(config.storage.dir)
    job = queue_series(store, study.paths, time.time() - 5)
    classifier = Classifier(load_bundle(bundle), device="cpu", batch_size=8)
    outcome = Worker(config, "w0", store, classifier).run_once(time.time())
    assert outcome is not None and outcome.state == "done", outcome
    store.close()
    return results_dir(config.storage.dir, job.job_id)


def _classes(folder: Path) -> list[str]:
    """SOP Class UIDs of the DICOM files under ``folder`` (PNG previews left out)."""
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
                  for p in folder.rglob("*") if p.is_file() and p.suffix != ".png")  # fmt: skip


def _syntaxes(folder: Path) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for p in folder.rglob("*") if p.is_file()}  # fmt: skip


def _send(storage: Path, destination: Destination, **sender: Any) -> Any:
    store = Store.open(storage)
    try:
        config = SenderSection(**({"max_attempts": 3, "timeout_seconds": 10.0} | sender))
        (outcome,) = Sender(store, [destination], config, storage, "ICH_NODE").run_once(time.time())
        return outcome, store.deliveries()
    finally:
        store.close()


def _dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run([dcmtk("dciodvfy"), str(path)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    return [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("Error")]


def test_implicit_vr_only_pacs_receives_the_sr_and_every_heatmap(
    tmp_path: Path, template: Path
) -> None:
    job_id = _job(tmp_path / "node", template, ["pacs"])
    pacs = Storescp(tmp_path / "pacs", "+xi")  # accepts Implicit VR Little Endian only
    try:
        outcome, _ = _send(tmp_path / "node", pacs.destination())
    finally:
        pacs.stop()
    assert outcome.state == "done", outcome.reason
    sent = _classes(template / "outbox")
    assert _classes(pacs.folder) == sent and sent.count(SR_3D) == 1
    assert sent.count(SECONDARY_CAPTURE) == 10  # a heatmap per slice
    assert _syntaxes(pacs.folder) == {"1.2.840.10008.1.2"}  # re-encoded in Implicit VR LE
    sr = next(p for p in pacs.folder.iterdir() if pydicom.dcmread(p).SOPClassUID == SR_3D)
    assert _dciodvfy_errors(sr) == []
    assert job_id


@pytest.mark.parametrize(
    ("accepted", "forced", "expected"),
    [
        (["ComprehensiveSRStorage", "EnhancedSRStorage"], "auto", SR_COMPREHENSIVE),
        (["EnhancedSRStorage"], "auto", SR_ENHANCED),
        (["ComprehensiveSRStorage", "EnhancedSRStorage", "Comprehensive3DSRStorage"], "enhanced",
         SR_ENHANCED),
    ],
)  # fmt: skip
def test_a_pacs_without_comprehensive_3d_sr_receives_the_sr_in_a_class_it_takes(
    tmp_path: Path, template: Path, accepted: list[str], forced: str, expected: str
) -> None:
    _job(tmp_path / "node", template, ["pacs"])
    options = _restricted(tmp_path, ["SecondaryCaptureImageStorage", *accepted])
    pacs = Storescp(tmp_path / "pacs", *options)
    try:
        outcome, _ = _send(tmp_path / "node", pacs.destination(sr_sop_class=forced))
    finally:
        pacs.stop()
    assert outcome.state == "done", outcome.reason
    received = _classes(pacs.folder)
    assert received.count(expected) == 1 and received.count(SECONDARY_CAPTURE) == 10
    assert SR_3D not in received
    assert "SR sent as" in outcome.reason  # recorded with the done delivery
    sr = next(p for p in pacs.folder.iterdir() if pydicom.dcmread(p).SOPClassUID == expected)
    assert _dciodvfy_errors(sr) == []
    import highdicom as hd

    kind = {SR_COMPREHENSIVE: hd.sr.ComprehensiveSR, SR_ENHANCED: hd.sr.EnhancedSR}[expected]
    assert isinstance(hd.sr.srread(sr), kind)  # highdicom reads it back in its class
    texts = [str(e.value) for e in pydicom.dcmread(sr).iterall() if e.keyword == "TextValue"]
    assert any("AI triage result, not a diagnosis" in t for t in texts)


def test_a_pacs_that_takes_no_sr_class_is_told_which_class_and_syntaxes_at_once(
    tmp_path: Path, template: Path
) -> None:
    job_id = _job(tmp_path / "node", template, ["pacs"])
    pacs = Storescp(tmp_path / "pacs", *_restricted(tmp_path, ["SecondaryCaptureImageStorage"]))
    try:
        outcome, _ = _send(tmp_path / "node", pacs.destination())
    finally:
        pacs.stop()
    assert outcome.state == "retry"  # the first attempt
    for words in ("Comprehensive 3D SR Storage", "Comprehensive SR Storage",
                  "Enhanced SR Storage", "Implicit VR Little Endian",
                  "Explicit VR Little Endian"):  # fmt: skip
        assert words in outcome.reason, outcome.reason
    assert _classes(pacs.folder).count(SECONDARY_CAPTURE) == 10  # the heatmaps went
    store = Store.open(tmp_path / "node")
    assert len(store.accepted_objects(job_id, "pacs")) == 10
    store.close()


def test_cstore_warnings_count_as_stored_and_are_recorded(tmp_path: Path, template: Path) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    _job(tmp_path / "node", template, ["pacs"])
    codes = iter([0xB000, 0xB007, 0xB006])
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return next(codes, 0x0000)

    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
    try:
        destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        outcome, (delivery,) = _send(tmp_path / "node", destination)
    finally:
        server.shutdown()
    assert outcome.state == "done" and delivery.state == "done"
    assert len(received) == 11
    for code in ("0xB000", "0xB007", "0xB006"):
        assert code in delivery.reason
    assert "stored with 3 warning(s)" in delivery.reason


@pytest.mark.parametrize("which", ["called", "calling"])
def test_a_rejected_association_names_the_peers_reason_and_the_setting(
    tmp_path: Path, template: Path, which: str
) -> None:
    """A PACS that rejects the association (A-ASSOCIATE-RJ, PS3.8 9.3.4) because it does
    not answer to the called AE title, or does not know the node's calling AE title:
    the delivery's reason gives the result, the source, the reason and the key to
    check, at the first attempt (a pynetdicom SCP that checks both titles)."""
    from pynetdicom import AE, AllStoragePresentationContexts

    _job(tmp_path / "node", template, ["pacs"])
    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    scp.require_called_aet = True
    if which == "calling":
        scp.require_calling_aet = ["ANOTHER_NODE"]
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        title = "NOT_PACS" if which == "called" else "PACS"
        destination = Destination(name="pacs", ae_title=title, host="127.0.0.1", port=port)
        outcome, (delivery,) = _send(tmp_path / "node", destination)
    finally:
        server.shutdown()
    assert outcome.state == "retry" and delivery.attempts == 1  # the PACS may be fixed
    assert "association rejected (rejected permanent, service user: " in delivery.reason
    if which == "called":
        assert "Called AE title not recognised" in delivery.reason
        assert "check destinations[].ae_title" in delivery.reason
    else:
        assert "Calling AE title not recognised" in delivery.reason
        assert "node.ae_title" in delivery.reason


def test_a_hung_destination_delays_only_itself(tmp_path: Path, template: Path) -> None:
    storage = tmp_path / "node"
    hung, pacs = HungPeer(), Storescp(tmp_path / "pacs")
    destinations = [
        Destination(name="hung", ae_title="HUNG", host="127.0.0.1", port=hung.port),
        pacs.destination(),
    ]
    store = Store.open(storage)
    sender = Sender(store, destinations, SenderSection(timeout_seconds=30.0), storage, "ICH_NODE")
    stop = threading.Event()

    def loop() -> None:  # as serve's sender thread: start lanes, never wait for them
        while not stop.is_set():
            sender.dispatch(time.time())
            stop.wait(0.2)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        jobs = []
        for i in range(3):
            jobs.append(_job(storage, template, ["hung", "pacs"], series=f"1.2.3.{i + 5}"))
            time.sleep(1.0)
        for job_id in jobs:
            finished = store.job(job_id).updated_at  # type: ignore[union-attr]
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                state = {d.destination: d for d in store.deliveries(job_id)}
                if state["pacs"].state == "done":
                    break
                time.sleep(0.1)
            delivered = {d.destination: d for d in store.deliveries(job_id)}["pacs"]
            assert delivered.state == "done", delivered
            assert delivered.updated_at - finished < 5.0, delivered.updated_at - finished
            assert {d.destination: d.state for d in store.deliveries(job_id)}["hung"] == "pending"
    finally:
        stop.set()
        thread.join(5)
        assert sender.stop(5.0)  # the hung attempt is cut, its lane ends
        hung.close()
        pacs.stop()
    assert len(list(pacs.folder.iterdir())) == 11  # the same objects each time (one template)
    # The cut attempt was not charged: the hung destination's job is due again at once.
    (first,) = [d for d in store.deliveries(jobs[0]) if d.destination == "hung"]
    assert first.state == "pending" and first.attempts == 0
    store.close()


# -- DICOMweb ------------------------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Any]:
    from tests.orthanc_util import find_plugin, free_ports, orthanc_binary, running_orthanc

    plugin = find_plugin("libOrthancDicomWeb.so")
    if orthanc_binary() is None or plugin is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (orthanc-dicomweb)")
    http_port, dicom_port = free_ports(2)
    with running_orthanc(tmp_path / "orthanc", http_port=http_port, dicom_port=dicom_port,
                         modalities={}, lua_scripts=(), plugins=[plugin]) as server:  # fmt: skip
        yield server


class BearerProxy:
    """An HTTP reverse proxy to Orthanc that lets through only ``Bearer <token>``."""

    def __init__(self, upstream: str, token: str) -> None:
        outer = self
        self.refused = 0
        self.forwarded: list[int] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if self.headers.get("Authorization") != f"Bearer {token}":
                    outer.refused += 1
                    body = b'{"error": "invalid bearer token"}'
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else _chunked(self.rfile)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "authorization", "transfer-encoding", "accept-encoding",
                                                "content-length", "connection")}  # fmt: skip
                request = urllib.request.Request(upstream + self.path, data=data,
                                                 method=self.command, headers=headers)  # fmt: skip
                outer.forwarded.append(len(data))
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, body, kind = response.status, response.read(), response.headers
                except urllib.error.HTTPError as exc:
                    status, body, kind = exc.code, exc.read(), exc.headers
                self.send_response(status)
                self.send_header("Content-Type", kind.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _chunked(stream: Any) -> bytes:
    data = b""
    while True:
        size = int(stream.readline().strip() or b"0", 16)
        if size == 0:
            stream.readline()
            return data
        data += stream.read(size)
        stream.readline()


def _dicomweb(name: str, url: str, **kw: Any) -> Destination:
    return parse_config({"destinations": [{"name": name, "kind": "dicomweb", "url": url, **kw}]}
                        ).destinations[0]  # fmt: skip


def test_stow_rs_puts_the_sr_and_heatmaps_in_the_study(
    tmp_path: Path, template: Path, orthanc: Any
) -> None:
    job_id = _job(tmp_path / "node", template, ["web"])
    destination = _dicomweb("web", f"{orthanc.url}/dicom-web")
    outcome, _ = _send(tmp_path / "node", destination)
    assert outcome.state == "done", outcome.reason
    sr = pydicom.dcmread(template / "outbox" / "sr.dcm", stop_before_pixels=True)
    study_id = orthanc.study_id(str(sr.StudyInstanceUID))
    assert study_id is not None
    instances = orthanc.get(f"/studies/{study_id}/instances")
    classes = sorted(orthanc.get(f"/instances/{i['ID']}/tags?simplify")["SOPClassUID"]
                     for i in instances)  # fmt: skip
    assert classes == _classes(template / "outbox")  # the SR and the ten heatmaps
    store = Store.open(tmp_path / "node")
    assert len(store.accepted_objects(job_id, "web")) == 11
    store.close()


def test_a_token_protected_endpoint_parks_a_wrong_token_with_a_clear_reason(
    tmp_path: Path, template: Path, orthanc: Any
) -> None:
    proxy = BearerProxy(orthanc.url, "right-token")
    try:
        good, bad = tmp_path / "good.token", tmp_path / "bad.token"
        good.write_text("right-token\n")
        bad.write_text("wrong-token\n")
        url = f"http://127.0.0.1:{proxy.port}/dicom-web"
        _job(tmp_path / "a", template, ["web"])
        outcome, (delivery,) = _send(tmp_path / "a", _dicomweb("web", url, token_file=str(bad)))
        assert outcome.state == "parked" and delivery.attempts == 1, outcome
        assert "HTTP 401" in delivery.reason and "token_file" in delivery.reason
        assert proxy.refused >= 1
        _job(tmp_path / "b", template, ["web"])
        outcome, _ = _send(tmp_path / "b", _dicomweb("web", url, token_file=str(good)))
        assert outcome.state == "done", outcome.reason
    finally:
        proxy.close()


def test_a_busy_archive_is_tried_again_after_its_retry_after(
    tmp_path: Path, template: Path
) -> None:
    """An archive answering STOW-RS with 503 and Retry-After: 30 (RFC 9110 10.2.3) is
    not tried again before 30 s, though the backoff alone would be 0.1 s; the reason
    says so. A wait longer than sender.backoff_max_seconds is cut to it."""
    answers: list[int] = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0) or 0)
            answers.append(503)
            body = b"busy"
            self.send_response(503)
            self.send_header("Retry-After", "30" if len(answers) == 1 else "3600")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        _job(tmp_path / "a", template, ["web"])
        before = time.time()
        outcome, (delivery,) = _send(tmp_path / "a", _dicomweb("web", url),
                                     backoff_base_seconds=0.1)  # fmt: skip
        assert outcome.state == "retry" and delivery.state == "retry", outcome
        assert "HTTP 503, Retry-After 30 s" in delivery.reason, delivery.reason
        assert delivery.next_at >= before + 30.0
        assert delivery.next_at <= time.time() + 30.0
        _job(tmp_path / "b", template, ["web"])
        before = time.time()
        outcome, (delivery,) = _send(tmp_path / "b", _dicomweb("web", url),
                                     backoff_base_seconds=0.1, backoff_max_seconds=20.0)  # fmt: skip
        assert delivery.state == "retry" and before + 20.0 <= delivery.next_at <= time.time() + 20.0
        assert answers == [503, 503]
    finally:
        server.shutdown()
        server.server_close()


def test_destination_keys_by_kind() -> None:
    from ich_node.config import ConfigError

    config = parse_config({"destinations": [{"name": "p", "ae_title": "P", "host": "h",
                                             "port": 104}]})  # fmt: skip
    assert config.destinations[0].kind == "dicom"
    assert config.destinations[0].sr_sop_class == "auto"
    for bad in (
        {"name": "w", "kind": "dicomweb"},  # no url
        {"name": "w", "kind": "dicomweb", "url": "https://x/dicom-web", "host": "h"},
        {"name": "w", "kind": "dicomweb", "url": "https://x", "token_file": "t",
         "credentials_file": "c"},
        {"name": "p", "ae_title": "P", "host": "h"},  # no port
        {"name": "p", "ae_title": "P", "host": "h", "port": 1, "sr_sop_class": "basic"},
    ):  # fmt: skip
        with pytest.raises(ConfigError):
            parse_config({"destinations": [bad]})


def test_dicomweb_files_are_checked_at_start(tmp_path: Path) -> None:
    """check-config and serve name a token, credentials or CA file that cannot be used."""
    from ich_node.delivery.outbox import check_targets

    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    creds = tmp_path / "one-line.creds"
    creds.write_text("user-only\n")
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate")
    destinations = [
        _dicomweb("a", "https://x/dicom-web", token_file=str(tmp_path / "missing.token")),
        _dicomweb("b", "https://x/dicom-web", token_file=str(empty)),
        _dicomweb("c", "https://x/dicom-web", credentials_file=str(creds)),
        _dicomweb("d", "https://x/dicom-web", ca_file=str(bad_ca)),
        Destination(name="e", ae_title="E", host="h", port=104),
    ]
    problems = check_targets((), destinations)
    assert [p.split(":")[0] for p in problems] == [
        "destinations[0] (a)",
        "destinations[1] (b)",
        "destinations[2] (c)",
        "destinations[3] (d)",
    ]
    assert "unreadable" in problems[0] and "empty" in problems[1] and "line 2" in problems[2]


def test_a_served_node_with_a_hung_destination_delivers_to_the_healthy_one(tmp_path: Path) -> None:
    """``serve`` (a subprocess) with a destination that accepts TCP and never answers,
    beside DCMTK storescp: each of 3 studies' SR and heatmaps reach the healthy PACS
    within 5 s of its job finishing; SIGTERM with the hung attempt in flight ends the
    node within 15 s; the hung destination's deliveries stay due (never parked)."""
    from benchmarks.end_to_end import _send
    from tests.alert_servers import wait_for
    from tests.test_alerts_node import ServedNode

    bundle = random_bundle(tmp_path / "model.safetensors", name="hung test model",
                           thresholds=dict.fromkeys(LABELS, 0.01))  # fmt: skip
    hung, pacs = HungPeer(), Storescp(tmp_path / "pacs")
    config = {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port(), "workers": 1},
        "callers": [{"ae_title": "MODALITY"}],
        "series": {"stable_seconds": 0.5, "min_slices": 8},
        "model": {"bundle": str(bundle), "device": "cpu", "batch_size": 8},
        "results": {"heatmaps": "positive"},
        "sender": {"timeout_seconds": 30.0},
        "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 1},
        "destinations": [
            {"name": "hung", "ae_title": "HUNG", "host": "127.0.0.1", "port": hung.port},
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
        ],
    }  # fmt: skip
    node = ServedNode(tmp_path, config)
    try:
        studies = [write_series(tmp_path / f"study{i}", seed=40 + i, subtypes=("subdural",),
                                n_slices=10, matrix=128) for i in range(3)]  # fmt: skip
        node.start()
        for study in studies:
            _send(list(study.paths), node.port, nodelay=True, calling="MODALITY")
            time.sleep(1.0)
        store = node.store()

        def delivered() -> bool:
            jobs = store.jobs()
            return len(jobs) == 3 and all(
                {d.destination: d.state for d in store.deliveries(j.job_id)}.get("pacs") == "done"
                for j in jobs
            )

        assert wait_for(delivered, 240), node.log()[-3000:]
        jobs = store.jobs()
        assert sorted(j.series_instance_uid for j in jobs) == sorted(
            s.series_instance_uid for s in studies
        )
        for job in jobs:
            assert job.state == "done"
            state = {d.destination: d for d in store.deliveries(job.job_id)}
            assert state["pacs"].updated_at - job.updated_at < 5.0, (
                state["pacs"].updated_at - job.updated_at
            )
            assert state["hung"].state in ("pending", "retry"), state["hung"]
        srs = [c for c in _classes(pacs.folder) if c in SR_CLASSES.values()]
        assert len(srs) == 3 and _classes(pacs.folder).count(SECONDARY_CAPTURE) == 30
        assert hung.held  # an attempt to the hung destination is in flight
        assert node.process is not None
        node.process.terminate()
        t = time.monotonic()
        node.process.wait(60)
        stopped_in = time.monotonic() - t
        node.process = None
        assert stopped_in < 15.0, stopped_in  # docs/admin.md: SIGTERM within 15 s
        for job in store.jobs():
            (cut,) = [d for d in store.deliveries(job.job_id) if d.destination == "hung"]
            assert cut.state in ("pending", "retry"), cut  # due again after a restart
        store.close()
    finally:
        node.stop()
        hung.close()
        pacs.stop()
