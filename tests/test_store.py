"""The store on both backends (SQLite, PostgreSQL): instances and series, deliveries, heartbeats."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from ich_node.queue.jobs import job_id_for
from ich_node.queue.store import DB_NAME, Added, InstanceRecord, Store

OpenStore = Callable[[Path], Store]


def _record(
    sop: str,
    series: str = "1.2.3",
    expected: int | None = None,
    acquisition: str = "1",
    related: int | None = None,
) -> InstanceRecord:
    return InstanceRecord(
        sop,
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2",
        series,
        "CT",
        "HEAD",
        "CT HEAD",
        "AX",
        images_in_acquisition=expected,
        acquisition_number=acquisition,
        series_related_instances=related,
    )


def test_store_uses_wal_and_survives_reopen(tmp_path: Path) -> None:
    # SQLite only: it reads the journal mode of the SQLite file itself.
    store = Store.open(tmp_path)
    assert store.add_instance(_record("1.1"), tmp_path / "spool" / "a.dcm", 10, now=5.0)
    store.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    store = Store.open(tmp_path)
    assert store.has_instance("1.1")
    assert store.instance_paths("1.2.3") == [tmp_path / "spool" / "a.dcm"]


def test_repeated_sop_instance_is_recorded_once(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    added = store.add_instance(_record("1.1"), tmp_path / "a.dcm", 10, now=1.0, digest="d1")
    assert added.added is Added.NEW and added.reused_in == ()
    again = store.add_instance(_record("1.1"), tmp_path / "a.dcm", 10, now=2.0, digest="d1")
    assert again.added is Added.DUPLICATE
    series = store.series("1.2.3")
    assert series is not None and series.n_instances == 1 and series.last_at == 1.0


def test_instances_are_keyed_by_series_and_sop_uid(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    spool = tmp_path / "spool" / "1.2"  # instance paths lie in storage.dir/spool
    store.add_instance(_record("1.1", series="9.1"), spool / "a.dcm", 10, now=1.0, digest="x")
    other = store.add_instance(
        _record("1.1", series="9.2"), spool / "b.dcm", 10, now=2.0, digest="x"
    )
    assert other.added is Added.NEW and other.reused_in == ("9.1",)
    assert store.instance_paths("9.1") == [spool / "a.dcm"]
    assert store.instance_paths("9.2") == [spool / "b.dcm"]
    assert store.reread_counts().sop_uid_reused == 2
    job = store.queue_series("9.1", 1, job_id_for, now=3.0)
    changed = store.add_instance(
        _record("1.1", series="9.1"), spool / "c.dcm", 10, now=4.0, digest="y"
    )
    assert changed.added is Added.REPLACED and changed.replaced_path == spool / "a.dcm"
    record = store.series("9.1")
    assert record is not None and record.state == "receiving" and record.n_instances == 1
    assert record.n_replaced == 1 and store.instance_paths("9.1") == [spool / "c.dcm"]
    assert store.instance_paths("9.1", received_by=job.created_at) == []
    job2 = store.queue_series("9.1", 1, job_id_for, now=5.0)
    assert (job.cause, job2.cause) == ("first read", "1 changed re-sends")
    counts = store.reread_counts()
    assert (counts.series, counts.changed_resends, counts.late_instances) == (1, 1, 0)


def test_whole_series_count_only_from_counts_that_describe_the_series(
    tmp_path: Path, open_store: OpenStore
) -> None:
    store = open_store(tmp_path)
    # ImagesInAcquisition with one AcquisitionNumber: the series size.
    for i in range(2):
        store.add_instance(_record(f"1.{i}", "5.1", expected=3), tmp_path / f"a{i}", 1, 1.0)
    assert store.series("5.1").expected == 3  # type: ignore[union-attr]
    # Two acquisitions: a per-acquisition count says nothing about the series.
    store.add_instance(_record("2.1", "5.2", expected=1, acquisition="1"), tmp_path / "b1", 1, 1.0)
    store.add_instance(_record("2.2", "5.2", expected=1, acquisition="2"), tmp_path / "b2", 1, 1.0)
    assert store.series("5.2").expected is None  # type: ignore[union-attr]
    # No AcquisitionNumber: cannot tell.
    store.add_instance(_record("3.1", "5.3", expected=1, acquisition=""), tmp_path / "c1", 1, 1.0)
    assert store.series("5.3").expected is None  # type: ignore[union-attr]
    # NumberOfSeriesRelatedInstances counts the series whatever the acquisitions.
    store.add_instance(
        _record("4.1", "5.4", expected=1, acquisition="1", related=4), tmp_path / "d1", 1, 1.0
    )
    store.add_instance(_record("4.2", "5.4", acquisition="2"), tmp_path / "d2", 1, 1.0)
    assert store.series("5.4").expected == 4  # type: ignore[union-attr]


def test_store_written_before_series_keyed_instances_is_migrated(tmp_path: Path) -> None:
    # SQLite only: a SQLite file of an older layout; PostgreSQL's versioned migrations
    # are tested in tests/test_postgres.py.
    db = sqlite3.connect(tmp_path / DB_NAME)
    spooled = tmp_path / "spool" / "1.2" / "1.2.3" / "x.dcm"
    db.executescript(
        """CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY,
            series_instance_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, path TEXT NOT NULL,
            size INTEGER NOT NULL, received_at REAL NOT NULL);
        CREATE INDEX instances_series ON instances(series_instance_uid);
        INSERT INTO instances VALUES ('1.1', '1.2.3', '1.2.840.10008.5.1.4.1.1.2', 'SPOOLED',
            5, 1.0);
        CREATE TABLE jobs (job_id TEXT PRIMARY KEY, series_instance_uid TEXT NOT NULL,
            version INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            not_before REAL NOT NULL, lease_until REAL, worker TEXT,
            reason TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL,
            updated_at REAL NOT NULL);
        INSERT INTO jobs (job_id, series_instance_uid, version, state, not_before, created_at,
            updated_at) VALUES ('j', '1.2.3', 1, 'done', 0, 0, 0);""".replace(
            "SPOOLED", str(spooled)
        )
    )
    db.close()
    store = Store.open(tmp_path)
    assert store.instance_paths("1.2.3") == [spooled]
    assert store.has_instance("1.1", "1.2.3")
    (job,) = store.jobs()
    assert job.state == "done" and job.stage == "" and job.cause == ""


def test_series_versions_follow_late_instances(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    store.add_instance(_record("1.1", expected=2), tmp_path / "a.dcm", 10, now=1.0)
    store.add_instance(_record("1.2"), tmp_path / "b.dcm", 10, now=2.0)
    series = store.series("1.2.3")
    assert series is not None and series.expected is None and series.state == "receiving"
    job = store.queue_series("1.2.3", 2, job_id_for, now=3.0)
    assert job.version == 1 and store.series("1.2.3").state == "queued"  # type: ignore[union-attr]
    assert store.receiving_series() == []
    store.add_instance(_record("1.3"), tmp_path / "c.dcm", 10, now=4.0)
    assert [s.series_instance_uid for s in store.receiving_series()] == ["1.2.3"]
    job2 = store.queue_series("1.2.3", 3, job_id_for, now=5.0)
    assert job2.version == 2 and job2.job_id != job.job_id
    assert [j.version for j in store.jobs()] == [1, 2]


def test_counts_and_heartbeats(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    store.add_instance(_record("1.1"), tmp_path / "a.dcm", 10, now=1.0)
    store.skip_series("1.2.3", 1, "modality 'MR' is not in series.modalities")
    assert store.counts("series") == {"skipped": 1}
    assert store.series("1.2.3").reason.startswith("modality")  # type: ignore[union-attr]
    store.heartbeat("worker-0", 42, now=7.0)
    store.heartbeat("worker-0", 42, now=8.0)
    assert store.heartbeats() == {"worker-0": (42, 8.0)}
    assert store.n_instances() == 1
