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
from pydicom.errors import InvalidDicomError

from benchmarks import common
from ich_node.config import NodeConfig, load_config
from ich_node.queue.store import Store
from ich_node.service.ops import echo, health, status
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
        """The instances storescp has written; a file it is still writing is left for
        the next look (the sender sends the SR last, so once the SR reads, all do)."""
        out = []
        for path in sorted(p for p in self.folder.iterdir() if p.is_file()):
            try:
                out.append(pydicom.dcmread(path, stop_before_pixels=True))
            except (InvalidDicomError, EOFError, OSError):
                continue
        return out


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


def _node_yaml(
    tmp_path: Path, tiny_bundle: Path, pacs: Pacs, stable_seconds: float, **series: object
) -> Path:
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
        "series": {"stable_seconds": stable_seconds, "min_slices": 8, **series},
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
    """A node (not started) with a small ``stable_seconds`` (``indirect`` param overrides).

    The param is ``stable_seconds`` or a dict of ``series`` keys.
    """
    param = getattr(request, "param", 0.5)
    series = dict(param) if isinstance(param, dict) else {"stable_seconds": param}
    stable = float(series.pop("stable_seconds", 0.5))
    path = _node_yaml(tmp_path, tiny_bundle, pacs, stable, **series)
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
    # Past reading: a job only read ahead would be given back without an attempt.
    leased = wait_for(
        "the job on the model",
        lambda: [j for j in store.jobs("leased") if j.stage in ("model", "results")],
    )
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


# -- instance identity and series versions (issue 12) ---------------------------------


def _derive(
    paths: list[Path], out: Path, each: Callable[[int, pydicom.Dataset], None]
) -> list[Path]:
    """Copies of ``paths`` changed in code by ``each(i, ds)``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        each(i, ds)
        target = out / path.name
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def _srs(pacs: Pacs, series_uid: str | None = None) -> list[pydicom.Dataset]:
    """SRs at the destination (for one source series when given), read back with pydicom."""
    found = []
    for ds in pacs.received() if pacs.folder.is_dir() else []:
        if ds.Modality != "SR":
            continue
        if series_uid is not None:  # an SR has no pixel data: the whole SR is read
            refs = {
                str(s.SeriesInstanceUID)
                for item in ds.CurrentRequestedProcedureEvidenceSequence
                for s in item.ReferencedSeriesSequence
            }
            if series_uid not in refs:
                continue
        found.append(ds)
    return found


def _all_delivered(store: Store) -> bool:
    deliveries = store.counts("deliveries")
    return bool(deliveries) and set(deliveries) == {"done"}


@pytest.mark.parametrize("node", [{"stable_seconds": 1.0}], indirect=True)
def test_sop_uids_reused_by_another_series_both_series_read(
    node: Node, pacs: Pacs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pydicom.uid import generate_uid

    from training.phantom import write_series

    a = write_series(tmp_path / "a", seed=11, n_slices=10, matrix=64)
    uid_b = generate_uid(entropy_srcs=["reused", a.series_instance_uid])

    def as_b(i: int, ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID, ds.SeriesNumber = uid_b, 2  # SOP Instance UIDs kept

    b = _derive(list(a.paths), tmp_path / "b", as_b)
    pacs.start()
    node.start()
    assert storescu(node, list(a.paths)).returncode == 0
    assert storescu(node, b).returncode == 0
    store = node.store()
    wait_for("both series read", lambda: store.counts("jobs") == {"done": 2})
    wait_for("both deliveries done", lambda: _all_delivered(store))
    assert {j.series_instance_uid for j in store.jobs()} == {a.series_instance_uid, uid_b}
    wait_for("2 SRs at the PACS", lambda: len(_srs(pacs)) == 2)
    assert len(_srs(pacs, a.series_instance_uid)) == len(_srs(pacs, uid_b)) == 1
    assert status(node.config, as_json=False) == 0
    assert "SOP Instance UID is also in another series: 20" in capsys.readouterr().out
    assert node.stop() == 0
    log = (node.config_path.parent / "node.log").read_text(errors="replace")
    assert '"event": "instance.sop_uid_reused"' in log and '"level": "warning"' in log


@pytest.mark.parametrize("node", [{"stable_seconds": 1.0}], indirect=True)
def test_identical_resend_is_idempotent_and_changed_resend_names_its_predecessor(
    node: Node, pacs: Pacs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import time

    from training.phantom import write_series

    series = write_series(tmp_path / "s", seed=12, n_slices=10, matrix=64)
    uid = series.series_instance_uid
    pacs.start()
    node.start()
    store = node.store()
    assert storescu(node, list(series.paths)).returncode == 0
    wait_for("version 1 delivered", lambda: _all_delivered(store) and len(_srs(pacs)) == 1)
    (first_sr,) = _srs(pacs)

    assert storescu(node, list(series.paths), calling="MODALITY").returncode == 0
    time.sleep(3 * 1.0 + 1.0)  # three quiet periods: a new version would be queued by now
    assert [j.version for j in store.jobs()] == [1]
    assert len(_srs(pacs)) == 1

    def corrected(i: int, ds: pydicom.Dataset) -> None:
        ds.SeriesDescription = "AX BRAIN CORRECTED"

    fixed = _derive(list(series.paths[:1]), tmp_path / "fixed", corrected)
    assert storescu(node, fixed).returncode == 0
    wait_for("version 2 done", lambda: store.counts("jobs") == {"done": 2})
    wait_for("version 2 delivered", lambda: _all_delivered(store) and len(_srs(pacs)) == 2)
    jobs = store.jobs()
    assert [(j.version, j.cause) for j in jobs] == [(1, "first read"), (2, "1 changed re-sends")]
    (second_sr,) = [ds for ds in _srs(pacs) if ds.SOPInstanceUID != first_sr.SOPInstanceUID]
    (study_item,) = second_sr.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == first_sr.StudyInstanceUID
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == first_sr.SeriesInstanceUID
    (sop_item,) = series_item.ReferencedSOPSequence
    assert sop_item.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert sop_item.ReferencedSOPClassUID == first_sr.SOPClassUID
    assert "PredecessorDocumentsSequence" not in first_sr
    for job in jobs:
        findings = node.config.storage.dir / "results" / job.job_id / "findings.json"
        assert json.loads(findings.read_text())["version"] == job.version
    record = store.series(uid)
    assert record is not None and record.n_instances == 10
    assert status(node.config, as_json=False) == 0
    out = capsys.readouterr().out
    assert "series read more than once: 1 (versions for late instances 0, " in out
    assert "for changed re-sends 1)" in out
    assert node.stop() == 0


@pytest.mark.parametrize("node", [{"stable_seconds": 3.0}], indirect=True)
def test_series_sent_image_by_image_with_per_acquisition_count_gives_one_sr(
    node: Node, pacs: Pacs, tmp_path: Path
) -> None:
    """As a GE scanner sends: one acquisition per image, ImagesInAcquisition per acquisition."""
    import time

    from training.phantom import write_series

    series = write_series(tmp_path / "s", seed=13, n_slices=12, matrix=64)

    def per_acquisition(i: int, ds: pydicom.Dataset) -> None:
        ds.AcquisitionNumber = i + 1
        ds.ImagesInAcquisition = 1

    files = _derive(list(series.paths), tmp_path / "ge", per_acquisition)
    pacs.start()
    node.start()
    store = node.store()
    for path in files:  # one association per image
        assert storescu(node, [path]).returncode == 0
        time.sleep(0.2)
    wait_for("the series delivered", lambda: _all_delivered(store) and _srs(pacs))
    time.sleep(2 * 3.0)  # two more quiet periods: nothing else may be read
    (job,) = store.jobs()
    assert job.version == 1 and job.state == "done"
    assert len(_srs(pacs)) == 1
    assert node.stop() == 0


@pytest.mark.parametrize("node", [{"stable_seconds": 1.0, "max_versions": 2}], indirect=True)
def test_slow_adder_gets_at_most_max_versions(
    node: Node, pacs: Pacs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.phantom import write_series

    series = write_series(tmp_path / "s", seed=14, n_slices=12, matrix=64)
    uid = series.series_instance_uid
    paths = list(series.paths)
    node.start()
    store = node.store()
    assert storescu(node, paths[:8]).returncode == 0
    for n, path in enumerate(paths[8:], start=1):  # one image each time the series was decided
        wait_for(f"decision {n}", lambda: (r := store.series(uid)) and r.state != "receiving")
        assert storescu(node, [path]).returncode == 0
    wait_for("the cap", lambda: (r := store.series(uid)) and r.state == "capped")
    assert [j.version for j in store.jobs()] == [1, 2]
    record = store.series(uid)
    assert record is not None and record.n_instances == 12
    assert record.reason.startswith("series.max_versions (2) reached")
    assert status(node.config, as_json=False) == 0
    assert "series at series.max_versions: 1" in capsys.readouterr().out
    assert node.stop() == 0


def test_worker_killed_holding_three_jobs_charges_only_the_job_on_the_model(
    node: Node, pacs: Pacs, tmp_path: Path
) -> None:
    import json

    from training.phantom import write_series

    studies = [
        write_series(tmp_path / f"s{i}", seed=20 + i, n_slices=40, matrix=512) for i in range(4)
    ]
    pacs.start()
    node.start()
    store = node.store()
    wait_for("a worker heartbeat", lambda: "worker-0" in store.heartbeats())
    for series in studies:
        assert storescu(node, list(series.paths)).returncode == 0

    def three_held() -> list[object]:
        held = [j for j in store.jobs("leased") if j.worker == "worker-0"]
        return held if len(held) == 3 and any(j.stage == "model" for j in held) else []

    held = wait_for("the worker holding three jobs, one on the model", three_held)
    assert isinstance(held, list)
    pid = store.heartbeats()["worker-0"][0]
    os.kill(pid, signal.SIGKILL)
    wait_for("every series read", lambda: store.counts("jobs") == {"done": 4})
    wait_for("every delivery done", lambda: _all_delivered(store))
    assert node.stop() == 0
    lines = [json.loads(line) for line in node.config_path.parent.joinpath("node.log").open()
             if line.startswith("{")]  # fmt: skip
    (died,) = [line for line in lines if line.get("event") == "worker.died"]
    # Each worker started froze what it loaded (out of the collector's full collections).
    ready = [line for line in lines if line.get("event") == "worker.ready"]
    assert len(ready) == 2 and all(line["gc_frozen"] > 100_000 for line in ready)
    charged = died["charged_job"]
    assert charged in {j.job_id for j in held}
    assert died["released_jobs"] >= 2 and charged not in died["given_back_jobs"]
    attempts = {j.job_id: j.attempts for j in store.jobs()}
    assert attempts.pop(charged) == 2, "the job on the model: the killed attempt and the next"
    assert set(attempts.values()) == {1}, "the other jobs were given back without an attempt"
