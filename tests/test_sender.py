"""The sender against a real DCMTK storescp; backoff, parking and resend, time injected.

Every test runs on both store backends (SQLite, PostgreSQL): the same tests.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from benchmarks.common import free_port
from ich_node.config import Destination, QueueSection, SenderSection, parse_config
from ich_node.delivery.sender import Sender
from ich_node.queue.backend import job_queue
from ich_node.queue.jobs import job_id_for
from ich_node.queue.layout import results_dir
from ich_node.queue.store import InstanceRecord, Store
from ich_node.service.ops import resend
from tests.conftest import dcmtk

OpenStore = Callable[[Path], Store]


def _job_with_outbox(
    open_store: OpenStore, storage: Path, phantom_series: object, n: int = 3
) -> str:
    """A done job whose outbox holds ``n`` CT files (real DICOM objects to send)."""
    store = open_store(storage)
    queue = job_queue(store, QueueSection())
    uid = "1.2.3.4"
    store.add_instance(
        InstanceRecord("1.2.3.4.1", "1.2", "1.2", uid, "CT", "", "", "", None), storage, 1, 0.0
    )
    job = store.queue_series(uid, 1, job_id_for, now=0.0)
    outbox = results_dir(storage, job.job_id) / "outbox"
    outbox.mkdir(parents=True)
    for i, path in enumerate(phantom_series.paths[:n]):  # type: ignore[attr-defined]
        (outbox / f"{i}.dcm").write_bytes(Path(path).read_bytes())
    leased = queue.lease("w", now=0.0)
    assert leased is not None
    queue.complete(leased, ["pacs"], n, now=0.0)
    store.close()
    return job.job_id


def test_delivery_retries_with_backoff_then_parks_and_resend_delivers(
    open_store: OpenStore,
    storage_section: Callable[[Path], object],
    tmp_path: Path,
    phantom_series: object,
) -> None:
    storage = tmp_path / "node"
    job_id = _job_with_outbox(open_store, storage, phantom_series)
    port = free_port()
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    config = SenderSection(
        max_attempts=3, backoff_base_seconds=10.0, backoff_max_seconds=15.0, timeout_seconds=5.0
    )
    store = open_store(storage)
    sender = Sender(store, [destination], config, storage, "ICH_NODE")
    assert [sender.backoff(n) for n in (1, 2, 3)] == [10.0, 15.0, 15.0]

    (outcome,) = sender.run_once(now=100.0)  # nobody listens on the port
    assert outcome.state == "retry" and "association" in outcome.reason
    assert sender.run_once(now=109.9) == []  # backoff 10 s
    (outcome,) = sender.run_once(now=110.0)
    assert outcome.state == "retry"
    assert sender.run_once(now=124.9) == []  # capped at 15 s
    (outcome,) = sender.run_once(now=125.0)
    assert outcome.state == "parked" and outcome.reason.startswith("after 3 attempts")
    assert sender.run_once(now=10_000.0) == []

    database = storage_section(storage).database  # type: ignore[attr-defined]
    node_config = parse_config({"storage": {"dir": str(storage), "database": database}})
    assert resend(node_config, job_id) == 0
    assert resend(node_config, "no-such-job") == 1
    received = tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        outcomes = sender.run_once(now=time.time())
        while outcomes and outcomes[0].state != "done" and time.monotonic() < deadline:
            time.sleep(0.2)  # storescp still starting
            outcomes = sender.run_once(now=time.time() + 1000)
        assert [o.state for o in outcomes] == ["done"]
    finally:
        pacs.terminate()
        pacs.wait(10)
    files = sorted(received.iterdir())
    assert len(files) == 3
    sops = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert sops == {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        for p in phantom_series.paths[:3]  # type: ignore[attr-defined]
    }
    (delivery,) = store.deliveries(job_id)
    assert delivery.state == "done"


def test_missing_outbox_file_is_a_recorded_failure(
    open_store: OpenStore, tmp_path: Path, phantom_series: object
) -> None:
    storage = tmp_path / "node"
    job_id = _job_with_outbox(open_store, storage, phantom_series)
    (results_dir(storage, job_id) / "outbox" / "0.dcm").unlink()
    store = open_store(storage)
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())
    sender = Sender(store, [destination], SenderSection(max_attempts=1), storage, "ICH_NODE")
    (outcome,) = sender.run_once(now=1.0)
    assert outcome.state == "parked"
    assert "outbox holds 2 files, the job wrote 3" in outcome.reason


def test_a_retry_sends_only_what_the_destination_has_not_accepted(
    open_store: OpenStore, tmp_path: Path, phantom_series: object
) -> None:
    """A destination fails mid-job: the retry sends the rest, never an accepted object again."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    storage = tmp_path / "node"
    job_id = _job_with_outbox(open_store, storage, phantom_series, n=5)
    received: list[str] = []
    calls = {"n": 0}

    def on_store(event: evt.Event) -> int:
        calls["n"] += 1
        if calls["n"] == 3:  # the third object of the first attempt: out of resources
            return 0xA700
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    scp = AE(ae_title="PACS")
    scp.add_supported_context(CTImageStorage, [str(u) for u in _ts_of(phantom_series)])
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        store = open_store(storage)
        sender = Sender(
            store, [destination], SenderSection(backoff_base_seconds=0.0), storage, "ICH_NODE"
        )
        (first,) = store.due_deliveries(time.time())
        assert sender.deliver(first, time.time()).state == "retry"
        assert len(store.accepted_objects(job_id, "pacs")) == 2
        (again,) = store.due_deliveries(time.time())
        assert sender.deliver(again, time.time()).state == "done"
        sent = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in phantom_series.paths[:5]  # type: ignore[attr-defined]
        }
        assert sorted(received) == sorted(sent)  # each object accepted exactly once
        assert calls["n"] == 6  # 3 in the first association (1 refused), 3 in the retry
        store.close()
    finally:
        server.shutdown()


def _ts_of(phantom_series: object) -> set[str]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for p in phantom_series.paths  # type: ignore[attr-defined]
    }
