"""The whole node on 127.0.0.1 with real DICOM peers (DCMTK), no mocks.

``serve`` runs in a subprocess with a temporary YAML config; DCMTK ``storescu``
plays the PACS sending a phantom series, DCMTK ``storescp`` the destination that
receives the SR and the heatmaps.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import yaml

from benchmarks import common
from ich_node.config import NodeConfig, load_config
from ich_node.ops import echo, health, status
from ich_node.store import Store
from tests.conftest import dcmtk

CALLER = "MODALITY"
DEADLINE = 240.0


def wait_for(what: str, predicate: Callable[[], object], timeout: float = DEADLINE) -> object:
    """Poll ``predicate`` until it returns something truthy, or fail naming ``what``."""
    return common.wait_for(what, predicate, timeout, every=0.1)


@dataclass
class Pacs:
    """A DCMTK storescp destination writing into ``folder``."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "PACS", "-od", str(self.folder), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def received(self) -> list[pydicom.Dataset]:
        files = sorted(p for p in self.folder.iterdir() if p.is_file())
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in files]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    server = Pacs(common.free_port(), tmp_path / "pacs")
    yield server
    server.stop()


@dataclass
class Node:
    """``serve`` in a subprocess."""

    config_path: Path
    config: NodeConfig
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.config_path.parent / "node.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(common.serve_argv(self.config_path), stdout=log, stderr=log)
        wait_for("the listener", lambda: self._alive() and echo(self.config, timeout=2))

    def _alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"node exited with {self.process.returncode}: {self.log()}")
        return True

    def log(self) -> str:
        return (self.config_path.parent / "node.log").read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self.process = None
        return code

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self.process = None

    def store(self) -> Store:
        return Store.open(self.config.storage.dir)


def _node_yaml(tmp_path: Path, tiny_bundle: Path, pacs: Pacs, stable_seconds: float) -> Path:
    data = {
        "node": {
            "ae_title": "ICH_NODE",
            "host": "127.0.0.1",
            "port": common.free_port(),
            "workers": 1,
        },
        "callers": [{"ae_title": CALLER}, {"ae_title": "FAR_AWAY", "host": "10.255.255.1"}],
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
        ],
        "series": {"stable_seconds": stable_seconds, "min_slices": 8},
        "model": {"bundle": str(tiny_bundle), "device": "cpu", "batch_size": 8},
        "results": {"heatmaps": "all"},
        "queue": {"lease_seconds": 120.0, "max_attempts": 3, "retry_base_seconds": 0.2},
        "sender": {
            "max_attempts": 100,
            "backoff_base_seconds": 0.2,
            "backoff_max_seconds": 0.5,
            "timeout_seconds": 10.0,
        },
        "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 1},
        "logging": {"format": "json", "level": "INFO"},
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def node(
    tmp_path: Path, tiny_bundle: Path, pacs: Pacs, request: pytest.FixtureRequest
) -> Iterator[Node]:
    """A node (not started) with a small ``stable_seconds`` (``indirect`` param overrides)."""
    stable = float(getattr(request, "param", 0.5))
    path = _node_yaml(tmp_path, tiny_bundle, pacs, stable)
    running = Node(path, load_config(path))
    yield running
    if running.process is not None:
        running.kill()


def storescu(
    node: Node, files: list[Path], calling: str = CALLER
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            calling,
            "-aec",
            node.config.node.ae_title,
            "127.0.0.1",
            str(node.config.node.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _uses_torch(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps")
    return "libtorch" in maps.read_text() if maps.exists() else False


def _delivered(pacs: Pacs, study_uid: str) -> list[pydicom.Dataset]:
    received = [ds for ds in pacs.received() if ds.StudyInstanceUID == study_uid]
    return received if any(ds.Modality == "SR" for ds in received) else []


def test_series_roundtrip_with_late_destination(
    node: Node, pacs: Pacs, phantom_series: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """storescu → node → storescp, the destination coming up only after the job is done."""
    series = phantom_series
    node.start()
    assert node.process is not None
    assert not _uses_torch(node.process.pid), "the listener process loaded torch"

    echo_run = subprocess.run(
        [dcmtk("echoscu"), "-aet", CALLER, "-aec", "ICH_NODE", "127.0.0.1",
         str(node.config.node.port)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert echo_run.returncode == 0, echo_run.stderr
    rejected = subprocess.run(
        [dcmtk("echoscu"), "-aet", "STRANGER", "-aec", "ICH_NODE", "127.0.0.1",
         str(node.config.node.port)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert rejected.returncode != 0
    assert "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr

    sent = storescu(node, list(series.paths))  # type: ignore[attr-defined]
    assert sent.returncode == 0, sent.stdout + sent.stderr
    store = node.store()
    # The destination is down: the job finishes, its delivery waits in the outbox.
    wait_for("a retried delivery", lambda: store.counts("deliveries").get("retry"))
    assert store.counts("jobs") == {"done": 1}
    assert health(node.config) == 0
    assert status(node.config, as_json=False) == 0
    out = capsys.readouterr().out
    assert "workers alive: 1/1" in out and "deliveries: retry 1" in out

    pacs.start()
    study = series.study_instance_uid  # type: ignore[attr-defined]
    received = wait_for("the results at the destination", lambda: _delivered(pacs, study))
    wait_for("the delivery done", lambda: store.counts("deliveries") == {"done": 1})
    assert isinstance(received, list)
    modalities = sorted(ds.Modality for ds in received)
    assert modalities.count("SR") == 1 and modalities.count("OT") + modalities.count("CT") >= 1
    sops = [ds.SOPInstanceUID for ds in received]
    assert len(sops) == len(set(sops))
    job = store.jobs()[0]
    findings = node.config.storage.dir / "results" / job.job_id / "findings.json"
    assert findings.is_file()
    assert node.stop() == 0
    assert health(node.config) == 1  # nothing answers C-ECHO any more


def _delivered_once(pacs: Pacs, node: Node, study: str) -> list[pydicom.Dataset]:
    received = wait_for("the results at the destination", lambda: _delivered(pacs, study))
    store = node.store()
    wait_for("the delivery done", lambda: store.counts("deliveries") == {"done": 1})
    assert isinstance(received, list)
    received = _delivered(pacs, study)
    sops = [ds.SOPInstanceUID for ds in received]
    assert len(sops) == len(set(sops)), "an object arrived twice"
    assert [ds.Modality for ds in received].count("SR") == 1
    assert store.counts("jobs") == {"done": 1}
    return received


def test_worker_killed_mid_job_is_restarted_and_job_completes_once(
    node: Node, pacs: Pacs, tmp_path: Path
) -> None:
    from training.phantom import write_series

    # Long enough (decode, infer, 60 heatmaps) that the kill lands mid-job.
    series = write_series(tmp_path / "big", seed=3, subtypes=("epidural",), n_slices=60, matrix=512)
    pacs.start()
    node.start()
    store = node.store()
    wait_for("a worker heartbeat", lambda: "worker-0" in store.heartbeats())
    assert storescu(node, list(series.paths)).returncode == 0
    leased = wait_for("the job leased", lambda: store.jobs("leased"))
    assert isinstance(leased, list)
    pid = store.heartbeats()["worker-0"][0]
    os.kill(pid, signal.SIGKILL)
    wait_for("a new worker", lambda: store.heartbeats().get("worker-0", (pid, 0))[0] != pid)
    _delivered_once(pacs, node, series.study_instance_uid)
    job = store.jobs()[0]
    assert job.job_id == leased[0].job_id
    assert job.attempts == 2, "the killed attempt and the one that completed"
    assert node.stop() == 0


@pytest.mark.parametrize("node", [3.0], indirect=True)
def test_node_killed_after_ack_reads_series_after_restart(
    node: Node, pacs: Pacs, phantom_series: object
) -> None:
    series = phantom_series
    pacs.start()
    node.start()
    assert storescu(node, list(series.paths)).returncode == 0  # type: ignore[attr-defined]
    node.kill()  # SIGKILL within stable_seconds of the last acknowledged instance
    store = node.store()
    uid = series.series_instance_uid  # type: ignore[attr-defined]
    record = store.series(uid)
    assert record is not None and record.state == "receiving"
    assert record.n_instances == len(series.paths)  # type: ignore[attr-defined]
    assert store.jobs() == []
    node.start()
    _delivered_once(pacs, node, series.study_instance_uid)  # type: ignore[attr-defined]
    assert node.stop() == 0
