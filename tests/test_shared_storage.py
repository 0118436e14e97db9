"""When the storage goes away: a file the store recorded cannot be read, or the
shared ``storage.dir`` of a PostgreSQL node is not mounted.

The family: the operating system's error on a spooled file (missing, I/O error,
stale NFS handle, a folder in its place) is the storage's fault, not the image's.
A series is then never read short (its other images read, this one left out as
"unreadable"): the job waits and runs again, whole. With PostgreSQL, a host whose
shared mount is missing refuses images (0xA700), leases no job and sends nothing
until the mount is back, and never writes on the empty mount point (the files
would vanish under the mount when it comes back).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest

from benchmarks.common import queue_series, random_bundle, wait_for
from ich_node.config import parse_config
from ich_node.imaging import ImagingError, StorageUnavailable, read_series
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.store import Store
from ich_node.service.worker import Worker
from training.phantom import write_series


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("shared_storage")
    return list(write_series(root / "s", seed=71, subtypes=(), n_slices=8, matrix=64).paths)


def _copy(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    return [Path(shutil.copy2(p, folder / p.name)) for p in paths]


@pytest.mark.parametrize("how", ["missing", "folder in its place"])
def test_a_file_the_system_cannot_read_stops_the_read_instead_of_shortening_it(
    tmp_path: Path, series_dir: list[Path], how: str
) -> None:
    paths = _copy(series_dir, tmp_path / "s")
    gone = paths[3]
    gone.unlink()
    if how == "folder in its place":
        gone.mkdir()  # open() raises IsADirectoryError: an OS error, not the content
    with pytest.raises(StorageUnavailable) as info:
        read_series(paths)
    assert info.value.path == gone and str(gone) in str(info.value)
    assert not isinstance(info.value, ImagingError)  # never a refusal of the series


def test_a_damaged_file_is_still_left_out_with_its_reason(
    tmp_path: Path, series_dir: list[Path]
) -> None:
    """The content's fault (not DICOM at all) stays what it was: that image left out."""
    paths = _copy(series_dir, tmp_path / "s")
    paths[3].write_bytes(b"this is not DICOM" * 20)
    series = read_series(paths)
    assert len(series.slices) == len(paths) - 1
    assert [d.path for d in series.dropped] == [paths[3]]
    assert series.dropped[0].reason.startswith("unreadable")


def test_the_worker_retries_a_series_whose_file_is_missing_and_reads_it_whole_when_back(
    tmp_path: Path, series_dir: list[Path]
) -> None:
    config = parse_config(
        {
            "storage": {"dir": str(tmp_path / "node")},
            "queue": {"lease_seconds": 60.0, "max_attempts": 5, "retry_base_seconds": 0.2},
            "results": {"heatmaps": "none"},
        }
    )
    store = Store.open(config.storage.dir)
    paths = _copy(series_dir, tmp_path / "node" / "spool" / "s")  # recorded where they are
    job = queue_series(store, paths, time.time() - 10)
    hidden = paths[5].with_name("elsewhere.dcm")
    paths[5].rename(hidden)  # the storage lost it for a while
    bundle = random_bundle(tmp_path / "m.safetensors", name="shared storage test")
    worker = Worker(config, "w0", store, Classifier(load_bundle(bundle), device="cpu"))

    assert worker.run_once(time.time()) is not None
    failed = store.job(job.job_id)
    assert failed is not None and failed.state == "retry"  # not parked, not done short
    assert "cannot be read" in failed.reason and paths[5].name in failed.reason

    hidden.rename(paths[5])  # back
    outcome = worker.run_once(time.time() + 60)
    assert outcome is not None and outcome.state == "done"
    findings = (Path(config.storage.dir) / "results" / job.job_id / "findings.json").read_text()
    assert json.loads(findings)["n_slices"] == len(paths)


def test_the_assembler_waits_for_a_spooled_file_it_cannot_read_instead_of_deciding(
    tmp_path: Path, series_dir: list[Path]
) -> None:
    from ich_node.config import SeriesSection
    from ich_node.ingest import assemble
    from ich_node.ingest.assemble import Assembler
    from ich_node.ingest.spool import Spool, instance_record

    store = Store.open(tmp_path / "node")
    spool = Spool(tmp_path / "node", store, min_free_mb=0)
    assembler = Assembler(store, SeriesSection(stable_seconds=5.0, min_slices=4))
    for path in series_dir:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ds.pop("ImagesInAcquisition", None)
        spool.save(
            path.read_bytes(),
            instance_record(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID)),
            100.0,
        )
    uid = str(pydicom.dcmread(series_dir[0]).SeriesInstanceUID)
    spooled = store.instance_paths(uid)
    aside = spooled[2].with_name("aside")
    spooled[2].rename(aside)

    (waiting,) = assembler.run_once(now=110.0)
    assert waiting.deferred and not waiting.queued
    assert store.jobs() == [] and store.series(uid).state == "receiving"  # type: ignore[union-attr]
    assert assembler.run_once(now=112.0) == []  # not before STORAGE_RETRY_SECONDS
    aside.rename(spooled[2])
    (decision,) = assembler.run_once(now=110.0 + assemble.STORAGE_RETRY_SECONDS)
    assert decision.queued and store.instance_paths(uid) == spooled

    # A file that stays unreadable: skipped with its reason once the wait is over.
    other = _copy(series_dir, tmp_path / "other")
    for i, path in enumerate(other):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.3.4.5.99"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.4.5.99.{i}"
        ds.pop("ImagesInAcquisition", None)
        ds.save_as(path)
        spool.save(
            path.read_bytes(),
            instance_record(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID)),
            200.0,
        )
    store.instance_paths("1.2.3.4.5.99")[0].unlink()
    (first,) = assembler.run_once(now=210.0)
    assert first.deferred
    late = 210.0 + assemble.STORAGE_GIVE_UP_SECONDS
    (given_up,) = assembler.run_once(now=late)
    assert not given_up.deferred and not given_up.queued
    assert "could not be read" in given_up.reason
    assert store.series("1.2.3.4.5.99").state == "skipped"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- PostgreSQL

psycopg = pytest.importorskip("psycopg")


def test_the_store_id_is_placed_once_and_never_on_an_empty_mount_point(
    tmp_path: Path, pg_url: str
) -> None:
    from ich_node.config import StorageSection
    from ich_node.queue.layout import STORE_ID_NAME
    from ich_node.queue.postgres import PgStore

    shared = tmp_path / "shared"
    first = PgStore(StorageSection(dir=shared, database=pg_url))
    assert first.place_store_id() and first.storage_mounted()
    # Another host whose mount is missing: its mount point is an empty folder.
    empty = tmp_path / "host-b-mount-point"
    empty.mkdir()
    other = PgStore(StorageSection(dir=empty, database=pg_url))
    assert other.place_store_id() is False
    assert not (empty / STORE_ID_NAME).exists() and list(empty.iterdir()) == []
    # A storage placed by an older version (file there, nothing in the database):
    # recorded now, so a later host with an empty mount point is refused too.
    with psycopg.connect(pg_url) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'store_id_placed'")
    assert first.place_store_id()
    assert other.place_store_id() is False and not (empty / STORE_ID_NAME).exists()
    # Another database's storage is never taken over.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / STORE_ID_NAME).write_text("another-database\n")
    with psycopg.connect(pg_url) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'store_id_placed'")
    third = PgStore(StorageSection(dir=foreign, database=pg_url))
    assert third.place_store_id() is False
    assert (foreign / STORE_ID_NAME).read_text() == "another-database\n"
    for s in (first, other, third):
        s.close()


def _serve_config(folder: Path, bundle: Path, pacs_port: int, shared: Path, url: str) -> Path:
    import yaml

    from benchmarks.faults import node_config

    data = node_config(
        folder,
        bundle,
        pacs_port,
        stable_seconds=2.0,
        extra={
            "storage": {"dir": str(shared), "database": url, "node_id": "a"},
            "queue": {"lease_seconds": 30.0, "max_attempts": 3, "retry_base_seconds": 0.5},
            "sender": {"max_attempts": 3, "backoff_base_seconds": 0.5},
        },
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _c_store(port: int, paths: list[Path]) -> list[int]:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.mark.timeout(420)
def test_the_shared_storage_going_away_and_coming_back_under_a_live_node(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A recorded run of the deployment guide's row "the shared filesystem goes away".

    ``serve --role all`` on PostgreSQL with ``storage.dir`` at ``mnt``. The mount
    goes away (the folder moved aside, an empty mount point left in its place) just
    after a study was acknowledged and before its series is complete; then it comes
    back. Meanwhile: images answered 0xA700, nothing written on the mount point, the
    acknowledged series not decided (not skipped, no job to fail). After: that
    series read whole, the refused study sent again and read; one SR per study at
    the PACS; the node never exited; ``health`` said 1 during the outage, 0 after.
    """
    from benchmarks.common import free_port, restamp_series
    from benchmarks.multihost import Host, PacsSCP
    from ich_node.config import StorageSection, load_config
    from ich_node.queue.backend import open_store
    from ich_node.service.ops import echo, health

    src = list(write_series(tmp_path / "src", seed=72, n_slices=8, matrix=64).paths)
    studies = [
        restamp_series(src, tmp_path / f"st{i}", f"shared-{i}", drop_count=True) for i in range(3)
    ]
    heads = [pydicom.dcmread(s[0]) for s in studies]
    uids = [str(ds.StudyInstanceUID) for ds in heads]
    series_uids = [str(ds.SeriesInstanceUID) for ds in heads]
    pacs = PacsSCP(free_port())
    pacs.start()
    bundle = random_bundle(tmp_path / "m.safetensors", name="shared storage run")
    mnt, away = tmp_path / "mnt", tmp_path / "away"
    host = Host("a", "all", _serve_config(tmp_path / "a", bundle, pacs.port, mnt, pg_url))
    store = open_store(StorageSection(dir=mnt, database=pg_url))
    config = None
    try:
        host.start()
        config = load_config(host.config_path)
        wait_for("the listener", lambda: echo(config, timeout=2), 120, every=0.2)
        port = config.node.port

        def srs_of(study: str) -> int:
            return sum(1 for s in pacs.srs() if s[1] == study)

        assert _c_store(port, studies[0]) == [0] * 8
        wait_for("the first SR", lambda: srs_of(uids[0]) == 1, 120, every=0.2)

        # Study 1 acknowledged; the mount goes before its 2 s quiet period ends.
        assert _c_store(port, studies[1]) == [0] * 8
        mnt.rename(away)
        mnt.mkdir()
        assert _c_store(port, studies[2]) == [0xA700] * 8  # the PACS keeps them, retries

        time.sleep(5.0)  # past the 2 s quiet period: an assembler or worker would act now
        record = store.series(series_uids[1])  # type: ignore[attr-defined]
        assert record is not None and record.state == "receiving", record  # not decided
        assert [j for j in store.jobs() if j.series_instance_uid == series_uids[1]] == []
        assert [p for p in mnt.rglob("*") if p.is_file()] == []  # nothing on the mount point
        assert srs_of(uids[1]) == 0
        assert host.process is not None and host.process.poll() is None
        capsys.readouterr()
        assert health(config) == 1  # the load balancer takes this host out
        assert "not mounted" in capsys.readouterr().out

        shutil.rmtree(mnt)  # the mount comes back
        away.rename(mnt)
        wait_for("study 1's SR", lambda: srs_of(uids[1]) == 1, 120, every=0.2)
        assert health(config) == 0
        assert _c_store(port, studies[2]) == [0] * 8
        wait_for("study 2's SR", lambda: srs_of(uids[2]) == 1, 120, every=0.2)
        time.sleep(2.0)
        assert [srs_of(u) for u in uids] == [1, 1, 1]
        (job,) = [j for j in store.jobs() if j.series_instance_uid == series_uids[1]]
        assert job.state == "done" and job.attempts == 1
        log = host.log.read_text()
        for event in ("store.failed", "series.storage_not_mounted", "sender.storage_not_mounted"):
            assert f'"{event}"' in log, event
        assert host.process.poll() is None
    finally:
        host.stop()
        pacs.stop()
        store.close()


def test_workers_and_senders_wait_for_the_mount_then_carry_on(
    tmp_path: Path, pg_url: str, series_dir: list[Path]
) -> None:
    """A host whose mount is missing: its worker leases nothing and its sender sends
    nothing (the job stays queued, the delivery due, no attempt charged); both carry
    on when the mount is there."""
    from ich_node.config import StorageSection
    from ich_node.delivery.sender import Sender
    from ich_node.queue.postgres import PgStore

    shared = tmp_path / "shared"
    first = PgStore(StorageSection(dir=shared, database=pg_url))
    assert first.place_store_id()
    spooled = _copy(series_dir, shared / "spool")
    job = queue_series(first, spooled, time.time() - 10)
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    config = parse_config(
        {
            "storage": {"dir": str(mount_point), "database": pg_url},
            "queue": {"lease_seconds": 60.0, "max_attempts": 3, "retry_base_seconds": 0.2},
            "results": {"heatmaps": "none"},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        }
    )
    host = PgStore(config.storage)
    assert host.place_store_id() is False  # the mount is missing on this host
    bundle = random_bundle(tmp_path / "m.safetensors", name="shared storage test")
    worker = Worker(config, "b.worker-0", host, Classifier(load_bundle(bundle), device="cpu"))
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), kwargs={"poll_seconds": 0.05})
    runner.start()
    try:
        time.sleep(3.0)
        waiting = host.job(job.job_id)
        assert waiting is not None and (waiting.state, waiting.attempts) == ("queued", 0)
        mount_point.rmdir()
        mount_point.symlink_to(shared)  # the mount comes back
        wait_for("the job done", lambda: host.job(job.job_id).state == "done", 120)  # type: ignore[union-attr]
    finally:
        stop.set()
        runner.join(60)
    done = host.job(job.job_id)
    assert done is not None and done.attempts == 1
    # Its delivery is due; without the mount the sender does not try it.
    sender = Sender(host, config.destinations, config.sender, config.storage.dir, "ICH_NODE")
    mount_point.unlink()
    mount_point.mkdir()
    assert sender.run_once(time.time() + 1) == []
    (due,) = host.due_deliveries(time.time() + 1)
    assert due.attempts == 0
    mount_point.rmdir()
    mount_point.symlink_to(shared)
    (tried,) = sender.run_once(time.time() + 1)  # port 9: refused, recorded for a retry
    assert tried.state == "retry" and tried.reason
    first.close()
    host.close()
