"""The SQLite store: instances and series bookkeeping, deliveries, heartbeats."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ich_node.jobs import job_id_for
from ich_node.store import DB_NAME, InstanceRecord, Store


def _record(sop: str, series: str = "1.2.3", expected: int | None = None) -> InstanceRecord:
    return InstanceRecord(
        sop, "1.2.840.10008.5.1.4.1.1.2", "1.2", series, "CT", "HEAD", "CT HEAD", "AX", expected
    )


def test_store_uses_wal_and_survives_reopen(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    assert store.add_instance(_record("1.1"), tmp_path / "a.dcm", 10, now=5.0)
    store.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    store = Store.open(tmp_path)
    assert store.has_instance("1.1")
    assert store.instance_paths("1.2.3") == [tmp_path / "a.dcm"]


def test_repeated_sop_instance_is_recorded_once(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    assert store.add_instance(_record("1.1"), tmp_path / "a.dcm", 10, now=1.0)
    assert not store.add_instance(_record("1.1"), tmp_path / "a.dcm", 10, now=2.0)
    series = store.series("1.2.3")
    assert series is not None and series.n_instances == 1 and series.last_at == 1.0


def test_series_versions_follow_late_instances(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.add_instance(_record("1.1", expected=2), tmp_path / "a.dcm", 10, now=1.0)
    store.add_instance(_record("1.2"), tmp_path / "b.dcm", 10, now=2.0)
    series = store.series("1.2.3")
    assert series is not None and series.expected == 2 and series.state == "receiving"
    job = store.queue_series("1.2.3", 2, job_id_for, now=3.0)
    assert job.version == 1 and store.series("1.2.3").state == "queued"  # type: ignore[union-attr]
    assert store.receiving_series() == []
    store.add_instance(_record("1.3"), tmp_path / "c.dcm", 10, now=4.0)
    assert [s.series_instance_uid for s in store.receiving_series()] == ["1.2.3"]
    job2 = store.queue_series("1.2.3", 3, job_id_for, now=5.0)
    assert job2.version == 2 and job2.job_id != job.job_id
    assert [j.version for j in store.jobs()] == [1, 2]


def test_counts_and_heartbeats(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.add_instance(_record("1.1"), tmp_path / "a.dcm", 10, now=1.0)
    store.skip_series("1.2.3", 1, "modality 'MR' is not in series.modalities")
    assert store.counts("series") == {"skipped": 1}
    assert store.series("1.2.3").reason.startswith("modality")  # type: ignore[union-attr]
    store.heartbeat("worker-0", 42, now=7.0)
    store.heartbeat("worker-0", 42, now=8.0)
    assert store.heartbeats() == {"worker-0": (42, 8.0)}
    assert store.n_instances() == 1
