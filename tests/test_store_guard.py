"""The store guards its paths (#25): the node never opens, writes or deletes outside
``storage.dir``, whatever the store's rows say and whatever links are planted in it.

Rows pointing outside (absolute, ``../``, or elsewhere inside ``storage.dir``) and
symbolic links planted in the spool, the results and the alert records leave every
file outside untouched, unread and unsent; each refusal is logged and counted. Both
store backends.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from ich_node.config import Destination, QueueSection, SenderSection
from ich_node.delivery.alerts import read_alert
from ich_node.delivery.sender import Sender
from ich_node.ingest.spool import Spool, SpoolError
from ich_node.queue.backend import job_queue
from ich_node.queue.interface import InstanceRecord
from ich_node.queue.jobs import job_id_for
from ich_node.queue.layout import OutsideStorage, StorageLayout
from ich_node.queue.store import Store
from ich_node.retention import Cleaner

OpenStore = Callable[[Path], Store]


def _record(series: str, i: int, study: str = "1.2") -> InstanceRecord:
    return InstanceRecord(
        f"{series}.{i}", "1.2.840.10008.5.1.4.1.1.2", study, series, "CT", "", "", ""
    )


def _outside(tmp_path: Path) -> dict[Path, bytes]:
    """Files outside storage.dir (and one inside it but outside the spool): what they hold."""
    files = {
        tmp_path / "outside" / "a.dcm": b"precious a",
        tmp_path / "outside" / "b.dcm": b"precious b",
        tmp_path / "outside" / "sub" / "c.dcm": b"precious c",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _untouched(files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        assert path.read_bytes() == data, path


def _point(store: Store, sop: str, path: str) -> None:
    """Tamper with one instance row (someone with write access to the database)."""
    with store.transaction() as db:
        db.execute("UPDATE instances SET path = ? WHERE sop_instance_uid = ?", (path, sop))


def test_rows_pointing_outside_are_never_read_nor_deleted(
    open_store: OpenStore, backend: str, tmp_path: Path
) -> None:
    storage = tmp_path / "node"
    outside = _outside(tmp_path)
    store = open_store(storage)
    spool = Spool(storage, store, 0)
    now = time.time()
    kept = [spool.save(f"instance {i}".encode(), _record("1.9", i), now).path for i in range(5)]
    shared = backend == "postgresql"  # PostgreSQL records paths relative to storage.dir
    rows = {
        "1.9.0": str(tmp_path / "outside" / "a.dcm"),  # absolute, elsewhere
        "1.9.1": "../outside/b.dcm" if shared else f"{storage}/spool/../../outside/b.dcm",
        "1.9.2": "spool/1.2/../../../outside/sub/c.dcm"
        if shared
        else f"{storage}/spool/1.2/../../../outside/sub/c.dcm",
        "1.9.3": "node.sqlite3" if shared else str(storage / "node.sqlite3"),  # not spool/
    }
    for sop, path in rows.items():
        _point(store, sop, path)
    with structlog.testing.capture_logs() as logs:
        paths = store.instance_paths("1.9")
    assert paths == [kept[4]]  # what a worker, the assembler and retention get
    refused = [e for e in logs if e["event"] == "store.path_refused"]
    assert len(refused) == 4 and all(e["what"] == "instance path" for e in refused)
    assert store.refusals()["path_outside_storage"].n == 4
    # What the assembler compares re-sends by: the same files only.
    assert [i.path for i in store.instance_identities("1.9")] == [kept[4]]

    # Retention of the finished series removes what is in the spool, nothing else.
    queue = job_queue(store, QueueSection())
    job = store.queue_series("1.9", 5, job_id_for, now)
    leased = queue.lease("w", now)
    assert leased is not None and leased.job_id == job.job_id
    queue.complete(leased, [], 0, now)
    cleaned = Cleaner(store, storage, 1.0).run_once(now + 7200)
    assert cleaned.series == 1 and cleaned.instance_files == 1
    assert not kept[4].exists()
    _untouched(outside)
    if not shared:
        assert (storage / "node.sqlite3").is_file()
    assert store.refusals()["path_outside_storage"].n == 12  # counted again at each look


def test_a_symlink_planted_in_the_spool_is_never_written_through(
    open_store: OpenStore, tmp_path: Path
) -> None:
    storage = tmp_path / "node"
    outside = _outside(tmp_path)
    store = open_store(storage)
    spool = Spool(storage, store, 0)
    now = time.time()
    spool.save(b"first", _record("1.5", 0, study="1.4"), now)
    # A study folder and a series folder replaced by links to a folder outside.
    (storage / "spool" / "1.7").symlink_to(tmp_path / "outside")
    with pytest.raises(SpoolError) as info:
        spool.save(b"through the study link", _record("1.8", 0, study="1.7"), now)
    assert info.value.reason == "path_outside_storage"
    series = storage / "spool" / "1.4" / "1.6"
    series.symlink_to(tmp_path / "outside" / "sub", target_is_directory=True)
    with pytest.raises(SpoolError):
        spool.save(b"through the series link", _record("1.6", 0, study="1.4"), now)
    _untouched(outside)
    assert sorted(p.name for p in (tmp_path / "outside").rglob("*")) == [
        "a.dcm",
        "b.dcm",
        "c.dcm",
        "sub",
    ]
    assert store.refusals()["path_outside_storage"].n == 2
    assert store.series("1.8") is None and store.series("1.6") is None  # never recorded

    # A recorded instance file replaced by a link to a file outside: not read, not
    # deleted through (the link is what the row names).
    first = store.instance_paths("1.5")[0]
    first.unlink()
    first.symlink_to(tmp_path / "outside" / "a.dcm")
    assert store.instance_paths("1.5") == []
    queue = job_queue(store, QueueSection())
    store.queue_series("1.5", 1, job_id_for, now)
    leased = queue.lease("w", now)
    assert leased is not None
    queue.complete(leased, [], 0, now)
    Cleaner(store, storage, 1.0).run_once(now + 7200)
    _untouched(outside)

    # spool/ itself a link: no Spool is made on it.
    other = tmp_path / "other"
    other.mkdir()
    (other / "spool").symlink_to(tmp_path / "outside")
    with pytest.raises(OutsideStorage):
        Spool(other, store, 0)
    _untouched(outside)


def test_results_and_alert_records_through_links_are_never_read_nor_sent(
    open_store: OpenStore, tmp_path: Path
) -> None:
    storage = tmp_path / "node"
    outside = _outside(tmp_path)
    store = open_store(storage)
    queue = job_queue(store, QueueSection())
    store.add_instance(_record("1.3", 0), storage / "spool" / "x.dcm", 1, 0.0)
    job = store.queue_series("1.3", 1, job_id_for, now=0.0)
    leased = queue.lease("w", now=0.0)
    assert leased is not None
    queue.complete(leased, ["pacs"], 1, now=0.0)
    layout = StorageLayout(storage)
    outbox = layout.outbox(job.job_id)
    outbox.mkdir(parents=True)
    (outbox / "0.dcm").symlink_to(tmp_path / "outside" / "a.dcm")
    # Nobody listens on port 9: were the file read and sent, the reason would say so.
    pacs = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=9)
    sender = Sender(store, [pacs], SenderSection(timeout_seconds=2.0), storage, "ICH_NODE")
    (outcome,) = sender.run_once(now=1.0)
    assert outcome.state == "parked" and "symbolic link" in outcome.reason, outcome
    # A whole results folder that is a link: the same.
    store.add_instance(_record("1.31", 0), storage / "spool" / "y.dcm", 1, 0.0)
    other = store.queue_series("1.31", 1, job_id_for, now=0.0)
    leased = queue.lease("w", now=0.0)
    assert leased is not None
    queue.complete(leased, ["pacs"], 1, now=0.0)
    (tmp_path / "outside" / "outbox").mkdir()
    outside[tmp_path / "outside" / "outbox" / "0.dcm"] = b"precious d"
    (tmp_path / "outside" / "outbox" / "0.dcm").write_bytes(b"precious d")
    layout.results_dir(other.job_id).symlink_to(tmp_path / "outside")
    (outcome,) = sender.run_once(now=2.0)
    assert outcome.state == "parked" and "symbolic link" in outcome.reason, outcome
    # A job id or target name from the store that is not a plain name.
    with pytest.raises(OutsideStorage):
        layout.results_dir("../../outside")
    with pytest.raises(OutsideStorage):
        read_alert(storage, job.job_id, "../../../outside/a")
    alerts = layout.alerts_dir(job.job_id)
    alerts.mkdir(parents=True)
    (alerts / "pager.json").symlink_to(tmp_path / "outside" / "b.dcm")
    with pytest.raises(OutsideStorage):
        read_alert(storage, job.job_id, "pager")
    _untouched(outside)
    assert store.refusals()["path_outside_storage"].n == 2


def test_the_spool_write_path_keeps_its_digest_names(tmp_path: Path) -> None:
    # The folder-relative writes name files as before: <sop>.<digest>.dcm, 0600.
    store = Store.open(tmp_path / "node")
    spool = Spool(tmp_path / "node", store, 0)
    data = b"\0" * 200
    saved = spool.save(data, _record("1.2.4", 1), time.time())
    digest = hashlib.sha256(data).hexdigest()[:16]
    assert saved.path == tmp_path / "node" / "spool" / "1.2" / "1.2.4" / f"1.2.4.1.{digest}.dcm"
    assert saved.path.read_bytes() == data
    assert oct(os.stat(saved.path).st_mode & 0o777) == "0o600"
    assert [p.name for p in saved.path.parent.iterdir()] == [saved.path.name]  # no temp left
    store.close()


def test_a_worker_never_writes_results_through_a_planted_link(
    open_store: OpenStore,
    storage_section: Callable[..., object],
    tmp_path: Path,
    tiny_bundle: Path,
) -> None:
    from benchmarks.common import queue_series
    from ich_node.config import parse_config
    from ich_node.model.bundle import load_bundle
    from ich_node.model.inference import Classifier
    from ich_node.service.worker import Worker
    from training.phantom import write_series

    outside = _outside(tmp_path)
    storage = tmp_path / "node"
    database = storage_section(storage).database  # type: ignore[attr-defined]
    config = parse_config(
        {
            "storage": {"dir": str(storage), "database": database},
            "queue": {"lease_seconds": 60.0, "max_attempts": 3},
            "results": {"heatmaps": "none"},
        }
    )
    store = open_store(storage)
    series = write_series(tmp_path / "src", seed=3, subtypes=(), n_slices=6, matrix=64)
    job = queue_series(store, list(series.paths), time.time() - 5)
    (storage / "results").symlink_to(tmp_path / "outside")  # planted before the job ends
    worker = Worker(config, "w0", store, Classifier(load_bundle(tiny_bundle), device="cpu"))
    outcome = worker.run_once(time.time())
    assert outcome is not None and outcome.state == "parked", outcome
    assert "symbolic link" in outcome.reason
    _untouched(outside)
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["a.dcm", "b.dcm", "sub"]
    assert store.refusals()["path_outside_storage"].n == 1
    record = store.job(job.job_id)
    assert record is not None and record.state == "parked"
