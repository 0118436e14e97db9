"""Alerts through `ich-node serve`: a real node, real receivers, a SIGKILL of the node.

The node (listener, assembler, worker process, sender threads) runs in a
subprocess; a phantom study is sent over DICOM; python-hl7's MLLP server and an
HTTPS server (test CA, signature checked) receive the alerts. The node is then
SIGKILLed while the webhook holds an alert it received and has not answered:
the restarted node sends it again with the same idempotency key and the same
bytes, and nothing else twice. Every log line of the node is free of patient data.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml

from benchmarks.common import free_port, port_open, random_bundle, serve_argv
from benchmarks.end_to_end import _send
from ich_node.delivery.alerts import alert_key
from ich_node.labels import LABELS
from ich_node.queue.store import Store
from tests.alert_servers import CertAuthority, MLLPServer, WebhookServer, make_ca, wait_for
from training.phantom import write_series

SECRET = b"node-test-secret"


class ServedNode:
    """``serve`` in a subprocess (its own process group, so a SIGKILL takes its workers)."""

    def __init__(self, folder: Path, config: dict[str, object]) -> None:
        self.folder = folder
        self.config_path = folder / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = int(config["node"]["port"])  # type: ignore[index]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.folder / "node.log", "ab") as log:
            self.process = subprocess.Popen(
                serve_argv(self.config_path), stdout=log, stderr=log, start_new_session=True
            )
        assert wait_for(lambda: port_open(self.port) or self.process.poll() is not None, 180)
        assert self.process.poll() is None, self.log()[-3000:]

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)  # the node and its worker, at once
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process = None

    def log(self) -> str:
        return (self.folder / "node.log").read_text(errors="replace")

    def store(self) -> Store:
        return Store.open(self.folder / "node")


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    return make_ca(tmp_path / "ca")


@pytest.fixture
def served(tmp_path: Path, ca: CertAuthority) -> Iterator[tuple[ServedNode, MLLPServer,
                                                                 WebhookServer]]:  # fmt: skip
    bundle = random_bundle(tmp_path / "model.safetensors", name="node alert model",
                           thresholds=dict.fromkeys(LABELS, 0.01))  # fmt: skip
    mllp, hook = MLLPServer("AA"), WebhookServer(ca, SECRET)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    config = {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port(), "workers": 1},
        "callers": [{"ae_title": "MODALITY"}],
        "series": {"stable_seconds": 0.5, "min_slices": 8},
        "model": {"bundle": str(bundle), "device": "cpu", "batch_size": 8},
        "results": {"heatmaps": "none"},
        "sender": {"max_attempts": 50, "backoff_base_seconds": 0.2, "backoff_max_seconds": 0.5,
                   "timeout_seconds": 10.0},
        "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 1},
        "logging": {"format": "json", "level": "INFO"},
        "notifications": [
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": mllp.port,
             "receiving_application": "RIS", "receiving_facility": "HOSP",
             "timeout_seconds": 30.0},
            {"name": "oncall", "kind": "webhook", "url": hook.url, "secret_file": str(secret),
             "ca_file": str(ca.ca), "timeout_seconds": 30.0},
        ],
    }  # fmt: skip
    node = ServedNode(tmp_path, config)
    yield node, mllp, hook
    node.stop()
    mllp.close()
    hook.close()


def test_served_node_alerts_once_per_target_across_a_sigkill(
    tmp_path: Path, served: tuple[ServedNode, MLLPServer, WebhookServer]
) -> None:
    node, mllp, hook = served
    study = write_series(tmp_path / "study", seed=19, subtypes=("subdural",), n_slices=10,
                         matrix=128)  # fmt: skip
    header = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
    hook.delay = 600.0  # holds the alert, never answers in time
    node.start()
    _send(list(study.paths), node.port, nodelay=True, calling="MODALITY")
    # The RIS answered at once; the webhook has the alert and has not answered.
    assert wait_for(lambda: mllp.messages and hook.arrived, 240), node.log()[-3000:]
    assert wait_for(lambda: any(a.accepted_at for a in node.store().alerts()), 30)
    node.kill()

    store = node.store()
    (job,) = store.jobs()
    states = {d.destination: d.state for d in store.deliveries(job.job_id)}
    assert states == {"alert:ris": "done", "alert:oncall": "pending"}  # sent, never acked

    hook.delay = 0.0
    node.start()
    assert wait_for(
        lambda: {d.state for d in node.store().deliveries(job.job_id)} == {"done"}, 120
    ), node.log()[-3000:]
    keys = [h["Idempotency-Key"] for h, _ in hook.arrived]
    assert keys == [alert_key(job.job_id, "oncall")] * 2  # again, with the same key
    assert len({raw for _, raw in hook.arrived}) == 1  # and the same bytes
    assert [str(m.segment("MSH")(10)) for m in mllp.messages] == [alert_key(job.job_id, "ris")]
    assert str(mllp.messages[0].segment("ORC")(2)) == str(header.AccessionNumber)
    node.stop()

    # No patient name, ID or birth date in any log line of the node or its worker.
    log = node.log()
    assert '"alert.finished"' in log and "time_to_notification_s" in log
    for value in (str(header.PatientName), str(header.PatientID), str(header.PatientBirthDate)):
        assert value not in log
