"""The streaming read and early alerts through `ich-node serve`, with real peers.

A node in a subprocess (listener, assembler, worker with its stream stage, sender)
receives a phantom study from DCMTK's ``storescu``, one image per association with
pauses between them, as a modality sends; python-hl7's MLLP server plays the RIS
and DCMTK's ``storescp`` the PACS. The RIS gets the preliminary alert (OBR-25 ``P``)
while the series still arrives, the final (``F``) after the series is complete, and
the findings equal the same series read from scratch. A worker SIGKILLed mid-stream
(both store backends) still gives exactly one SR and one final alert.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from benchmarks.common import MLLPReceiver, free_port, random_bundle, send
from benchmarks.end_to_end import Destination
from ich_node.delivery.alerts import alert_key, preliminary_job_id
from ich_node.imaging import read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.layout import results_dir
from ich_node.queue.store import Store
from tests.alert_servers import wait_for
from tests.conftest import dcmtk
from tests.test_alerts_node import ServedNode
from training.phantom import PhantomSeries, write_series

OpenStore = Callable[[Path], Store]
Section = Callable[[Path], Any]
#: Seconds between two images: a modality that sends while it reconstructs.
PAUSE = 0.7


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Thresholds low enough that every slice of the phantom is positive for every label.
    return random_bundle(tmp_path_factory.mktemp("bundle") / "model.safetensors",
                         name="stream node model", thresholds=dict.fromkeys(LABELS, 0.01))  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    """A positive phantom without ImagesInAcquisition, as most PACS send: the series is
    complete after the quiet period (series.stable_seconds), not with its last image."""
    phantom = write_series(tmp_path_factory.mktemp("study") / "s", seed=83,
                           subtypes=("subdural",), n_slices=10, matrix=96)  # fmt: skip
    for path in phantom.paths:
        ds = pydicom.dcmread(path)
        del ds.ImagesInAcquisition
        ds.save_as(path, enforce_file_format=True)
    return phantom


class RIS(MLLPReceiver):
    """The MLLP receiver, each message with the epoch time it arrived."""

    def received(self) -> list[tuple[float, Any]]:
        offset = time.time() - time.perf_counter()
        return [(t + offset, m) for t, m in self.arrived]


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[RIS, Destination]]:
    dcmtk("storescu")
    ris, pacs = RIS(), Destination(tmp_path / "pacs")
    yield ris, pacs
    ris.close()
    pacs.process.terminate()
    pacs.process.wait(10)


def _config(tmp_path: Path, bundle: Path, ris: RIS, pacs: Destination,
            database: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port(), "workers": 1},
        "callers": [{"ae_title": "MODALITY"}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": pacs.port}],
        "series": {"stable_seconds": 3.0, "min_slices": 4},
        "model": {"bundle": str(bundle), "device": "cpu", "batch_size": 4},
        "results": {"heatmaps": "none"},
        "sender": {"backoff_base_seconds": 0.2, "backoff_max_seconds": 1.0},
        "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 1, "database": database},
        "logging": {"format": "json", "level": "INFO"},
        "notifications": [{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port,
                           "receiving_application": "RIS", "receiving_facility": "HOSP",
                           "early": True, "timeout_seconds": 10.0}],
    }  # fmt: skip


def send_one_by_one(port: int, files: list[Path], between: Callable[[int], None] | None = None
                    ) -> list[float]:  # fmt: skip
    """Each file in its own storescu association, PAUSE apart; epoch times of the acks."""
    acks = []
    for i, path in enumerate(files):
        send(port, [[path]], called="ICH_NODE")
        acks.append(time.time())
        if between is not None:
            between(i)
        time.sleep(PAUSE)
    return acks


def _events(node: ServedNode, event: str) -> list[dict[str, Any]]:
    out = []
    for line in node.log().splitlines():
        if f'"{event}"' in line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _status(message: Any) -> str:
    return str(message.segment("OBR")(25))


@pytest.mark.parametrize("order", ["in order", "out of order"])
def test_early_alert_while_the_series_arrives_then_the_final(
    order: str,
    tmp_path: Path,
    bundle: Path,
    study: PhantomSeries,
    peers: tuple[RIS, Destination],
) -> None:
    ris, pacs = peers
    node = ServedNode(tmp_path, _config(tmp_path, bundle, ris, pacs))
    node.start()
    try:
        files = list(study.paths)
        if order == "out of order":
            random.Random(5).shuffle(files)
        acks = send_one_by_one(node.port, files)
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert wait_for(lambda: len(ris.arrived) >= 2, 120), node.log()[-3000:]
        assert wait_for(lambda: "SR" in pacs.modalities(str(header.StudyInstanceUID)), 120)
        store = node.store()
        (job,) = store.jobs()
        assert job.state == "done"
        (preliminary, p_message), (final, f_message) = ris.received()
        # The preliminary came while the series was still arriving: before its last
        # image, and before the series was complete (its job queued); the final after.
        assert _status(p_message) == "P" and preliminary < acks[-1] < job.created_at
        assert _status(f_message) == "F" and final > job.created_at
        assert {str(o(11)) for o in p_message.segments("OBX")} == {"P"}
        notes = [p_message.unescape(str(n(3))) for n in p_message.segments("NTE")]
        assert any("PRELIMINARY" in n and "still arriving" in n for n in notes)
        keys = [str(m.segment("MSH")(10)) for m in (p_message, f_message)]
        assert keys == [alert_key(preliminary_job_id(job.job_id), "ris"),
                        alert_key(job.job_id, "ris")]  # fmt: skip
        # The read at completion used the stream's outputs, and equals one from scratch.
        (finished,) = _events(node, "job.finished")
        assert finished["streamed"] == len(files) and finished["state"] == "done"
        findings = json.loads((results_dir(tmp_path / "node", job.job_id) /
                               "findings.json").read_text())  # fmt: skip
        scratch = Classifier(load_bundle(bundle), device="cpu", batch_size=4)
        scratch.fix_batch_numerics()
        alone = scratch.predict_series(read_series(list(study.paths))).findings
        for got, want in zip(findings["slices"], alone.slices, strict=True):
            assert got["sop_instance_uid"] == want.sop_instance_uid
            assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-6, rel=0)
    finally:
        node.stop()


def test_a_worker_killed_mid_stream_gives_one_sr_and_one_final_alert(
    tmp_path: Path,
    bundle: Path,
    study: PhantomSeries,
    peers: tuple[RIS, Destination],
    backend: str,
    storage_section: Section,
    open_store: OpenStore,
) -> None:
    ris, pacs = peers
    database = storage_section(tmp_path / "node").database
    node = ServedNode(tmp_path, _config(tmp_path, bundle, ris, pacs, database))
    node.start()
    store = open_store(tmp_path / "node")
    killed: list[int] = []

    def kill_the_streaming_worker(i: int) -> None:
        if killed or i < 3:
            return
        assert wait_for(lambda: store.streams(), 30), node.log()[-3000:]
        (holder,) = {s.worker for s in store.streams()}
        pid, _ = store.heartbeats()[holder]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    try:
        files = list(study.paths)
        send_one_by_one(node.port, files, kill_the_streaming_worker)
        assert killed, "no worker was streaming the series"
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        study_uid = str(header.StudyInstanceUID)
        assert wait_for(lambda: "SR" in pacs.modalities(study_uid), 180), node.log()[-3000:]
        assert wait_for(lambda: any(_status(m) in "FC" for _, m in ris.received()), 60)
        time.sleep(3.0)  # anything sent twice would be here by now
        assert pacs.modalities(study_uid).count("SR") == 1
        statuses = [_status(m) for _, m in ris.received()]
        assert statuses.count("F") + statuses.count("C") == 1 and statuses.count("P") <= 1
        keys = [str(m.segment("MSH")(10)) for _, m in ris.received()]
        assert len(keys) == len(set(keys))
        (job,) = store.jobs()
        assert job.state == "done"
        # It was the streaming worker that died, and the supervisor started another.
        assert [e["pid"] for e in _events(node, "worker.died")] == killed
        assert len(_events(node, "worker.started")) == 2
    finally:
        node.stop()
