"""Every refusal says why (#30 item 5, #25): C-STORE failures carry an Error Comment
(PS3.7 C.4.2.1.4) naming what is wrong, never patient data; a UID that can never be
stored gets the 0xC000 "cannot understand" status, not "retry later"; refusals are
logged once per peer and reason per minute and counted by reason; a called AE title
that is not ours is logged once per peer and title, and refused with
``node.require_called_ae``. Real associations on 127.0.0.1 (pynetdicom and DCMTK), the
store on both backends.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from ich_node.config import parse_config
from ich_node.ingest.guard import GuardedServer
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool
from ich_node.metrics import Metrics
from ich_node.queue.store import Store
from tests.conftest import dcmtk

Listen = Callable[..., tuple[GuardedServer, Store, Metrics]]
# The datasets with bad UIDs are made on purpose; pydicom warns when it writes them.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
    pytest.mark.filterwarnings("ignore:The value length"),
]


@pytest.fixture
def listen(tmp_path: Path, free_port: int, open_store: Callable[[Path], Store]) -> Iterator[Listen]:
    """Start a listener on ``free_port`` (store on the test's backend) with ``node`` keys."""
    servers: list[GuardedServer] = []

    def start(min_free_mb: int = 0, **node: Any) -> tuple[GuardedServer, Store, Metrics]:
        config = parse_config(
            {
                "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port, **node},
                "callers": [{"ae_title": "MODALITY"}],
                "storage": {"dir": str(tmp_path / "node"), "min_free_mb": min_free_mb},
            }
        )
        store = open_store(config.storage.dir)
        metrics = Metrics()
        spool = Spool(config.storage.dir, store, min_free_mb)
        server = start_listener(config, spool, metrics=metrics)
        servers.append(server)
        return server, store, metrics

    yield start
    for server in servers:
        with contextlib.suppress(ValueError):  # a test may have shut it down already
            server.shutdown()


def _send(port: int, datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def _phantom(phantom_series: Any, i: int = 0) -> pydicom.Dataset:
    return pydicom.dcmread(phantom_series.paths[i])


def test_a_uid_that_can_never_be_stored_gets_0xC000_with_its_keyword(
    listen: Listen, free_port: int, phantom_series: Any
) -> None:
    server, store, _ = listen()
    cases = {
        ("SeriesInstanceUID", "1.2.826.0.1.3680043.2\x00.99"): 0xC000,  # a NUL
        ("StudyInstanceUID", "1.2.826.0.1.ABC"): 0xC000,  # letters
        ("SOPInstanceUID", "1.2.826 0.1"): 0xC000,  # a space
        ("SeriesInstanceUID", "1.2.3\\1.2.4"): 0xC000,  # two values
        ("SeriesInstanceUID", "1." + "2" * 70): 0xC000,  # longer than 64
    }
    datasets = []
    for (keyword, value), _status in cases.items():
        ds = _phantom(phantom_series)
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
        datasets.append(ds)
    missing = _phantom(phantom_series, 1)
    del missing.SeriesInstanceUID
    datasets.append(missing)
    with structlog.testing.capture_logs() as logs:
        answers = _send(free_port, datasets)
    for ((keyword, _), status), answer in zip(cases.items(), answers[:-1], strict=True):
        assert answer.Status == status, keyword
        assert answer.ErrorComment == f"{keyword} is not a valid UID (PS3.5 9.1)"
        assert answer.OffendingElement == pydicom.tag.Tag(keyword)
    assert answers[-1].Status == 0xC210
    assert answers[-1].ErrorComment == "no SeriesInstanceUID in the data set"
    assert answers[-1].OffendingElement == pydicom.tag.Tag("SeriesInstanceUID")
    assert store.n_instances() == 0
    # One line per peer and reason: the five invalid UIDs once, the missing one too.
    rejected = [e for e in logs if e["event"] == "store.rejected"]
    assert [(e["reason"], e["status"]) for e in rejected] == [
        ("invalid_uid", "0xC000"),
        ("missing_uid", "0xC210"),
    ]
    assert rejected[1]["comment"] == "no SeriesInstanceUID in the data set"
    server.store_refusals.flush(store, time.time())
    counts = store.refusals()
    assert counts["invalid_uid"].n == 5 and counts["missing_uid"].n == 1


@pytest.mark.parametrize("min_free", [10**9])
def test_low_disk_is_answered_with_its_reason_and_counted(
    listen: Listen, free_port: int, phantom_series: Any, min_free: int
) -> None:
    server, store, _ = listen(min_free_mb=min_free)
    # DCMTK's storescu prints the status and the Error Comment it got (-d: details).
    run = subprocess.run(
        [dcmtk("storescu"), "-d", "-aet", "MODALITY", "-aec", "ICH_NODE", "127.0.0.1",
         str(free_port), str(phantom_series.paths[0])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    text = run.stdout + run.stderr
    assert "0xa700: Refused: Out of resources" in text, text
    assert "[storage.min_free_mb not met: the node is out of disk space]" in text, text
    (answer,) = _send(free_port, [_phantom(phantom_series, 1)])
    assert answer.Status == 0xA700
    assert answer.ErrorComment == "storage.min_free_mb not met: the node is out of disk space"
    server.store_refusals.flush(store, time.time())
    assert store.refusals()["disk_low"].n == 2


def test_each_reason_from_a_peer_is_logged_not_only_the_first(
    listen: Listen, free_port: int, phantom_series: Any
) -> None:
    listen()
    nul = _phantom(phantom_series)
    nul.SeriesInstanceUID = "1.2.3\x004"
    missing = _phantom(phantom_series, 1)
    del missing.StudyInstanceUID
    with structlog.testing.capture_logs() as logs:
        _send(free_port, [nul, nul])
        _send(free_port, [missing])  # another reason, seconds later: its own line
        _send(free_port, [nul])  # the same reason again within the minute: counted only
    rejected = [
        (e["reason"], e["not_logged_since_last"]) for e in logs if e["event"] == "store.rejected"
    ]
    assert rejected == [("invalid_uid", 0), ("missing_uid", 0)]


def _echo(port: int, called: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_called_ae_title_not_ours_is_logged_once_and_refused_when_required(
    listen: Listen, free_port: int, tmp_path: Path
) -> None:
    server, _, metrics = listen()
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert _echo(free_port, "ICHNODE").returncode == 0  # accepted by default
        assert _echo(free_port, "OTHER").returncode == 0
        assert _echo(free_port, "ICH_NODE").returncode == 0
    mismatches = [e for e in logs if e["event"] == "association.called_ae_mismatch"]
    assert [(e["called_ae"], e["action"]) for e in mismatches] == [
        ("ICHNODE", "accepted"),
        ("OTHER", "accepted"),
    ]
    assert mismatches[0]["expected"] == "ICH_NODE" and mismatches[0]["peer"] == "127.0.0.1"
    server.shutdown()

    _, _, metrics = listen(require_called_ae=True)
    with structlog.testing.capture_logs() as logs:
        refused = _echo(free_port, "ICHNODE")
        assert _echo(free_port, "ICH_NODE").returncode == 0
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stdout + refused.stderr, refused
    (mismatch,) = [e for e in logs if e["event"] == "association.called_ae_mismatch"]
    assert mismatch["action"].startswith("refused")
    (line,) = [e for e in logs if e["event"] == "association.refused"]
    assert line["reason"] == "called_ae_not_recognised" and line["calling_ae"] == "MODALITY"
    sample = metrics.registry.get_sample_value(
        "ich_node_associations_refused_total", {"reason": "called_ae_not_recognised"}
    )
    assert sample == 1.0


def test_health_echo_and_own_title_are_unaffected_by_require_called_ae(
    listen: Listen, free_port: int
) -> None:
    listen(require_called_ae=True)
    ae = AE(ae_title="ICH_NODE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", free_port, ae_title="ICH_NODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
