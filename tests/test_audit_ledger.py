"""What the results ledger keeps for the audit, and for how long. Both store backends.

The ledger (``series_reads``, issue #25) gained, for ``ich-node audit``, where each
threshold came from, ``node.mode`` and the result time (SQLite: added columns;
PostgreSQL: the migration that adds them), and its own retention,
``storage.keep_results_days``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import queue_series
from ich_node.config import parse_config
from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.interface import JobRecord, SeriesRead
from ich_node.queue.store import Store
from ich_node.retention import Cleaner
from ich_node.service.worker import Worker
from training.phantom import write_series

OpenStore = Callable[[Path], Store]
DAY = 86400.0


def _read(i: int, read_at: float, **kw: Any) -> SeriesRead:
    values: dict[str, Any] = {
        "job_id": f"j{i}", "study_instance_uid": f"1.2.{i}", "series_instance_uid": f"1.2.{i}.1",
        "accession_number": f"A{i}", "version": 1, "content_fingerprint": "", "n_instances": 1,
        "model_name": "m", "model_version": "1", "model_sha256": "0" * 64,
        "thresholds": dict.fromkeys(LABELS, 0.5), "probabilities": dict.fromkeys(LABELS, 0.1),
        "positive_labels": (), "coverage_complete": True, "n_notes": 0,
        "first_received_at": read_at - 60, "completed_at": read_at - 20, "read_at": read_at,
    }  # fmt: skip
    return SeriesRead(**(values | kw))


def _record(store: Store, reads: list[SeriesRead]) -> None:
    with store.transaction() as db:
        for r in reads:
            job = JobRecord(r.job_id, r.series_instance_uid, 1, "done", 1, 0.0, None, None, "",
                            r.completed_at or 0.0, r.read_at or 0.0)  # fmt: skip
            store.record_read(db, job, r, r.read_at or 0.0)


def test_new_fields_round_trip(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    sources = dict.fromkeys(LABELS, "bundle") | {"any": "site"}
    _record(store, [_read(1, 100.0, threshold_sources=sources, mode="shadow", result_at=95.5),
                    _read(2, 200.0)])  # fmt: skip
    one, two = store.reads()
    assert (one.threshold_sources, one.mode, one.result_at) == (sources, "shadow", 95.5)
    assert (two.threshold_sources, two.mode, two.result_at) == ({}, "live", None)  # defaults


def test_keep_results_days_outlives_keep_hours(tmp_path: Path, open_store: OpenStore) -> None:
    now = 1_900_000_000.0
    store = open_store(tmp_path)
    _record(store, [_read(1, now - 800 * DAY), _read(2, now - 700 * DAY), _read(3, now - DAY)])
    cleaned = Cleaner(store, tmp_path, keep_hours=1.0, keep_results_days=730.0).run_once(now)
    assert cleaned.reads == 1
    assert [r.job_id for r in store.reads()] == ["j2", "j3"]  # far past keep_hours, kept
    cleaned = Cleaner(store, tmp_path, keep_hours=1.0, keep_results_days=30.0).run_once(now)
    assert cleaned.reads == 1 and [r.job_id for r in store.reads()] == ["j3"]
    assert parse_config({}).storage.keep_results_days == 730.0


def test_the_worker_records_source_mode_and_result_time(
    tmp_path: Path, tiny_bundle: Path, open_store: OpenStore, storage_section: Any
) -> None:
    phantom = write_series(tmp_path / "s", seed=6, subtypes=(), n_slices=6, matrix=64)
    config = parse_config(
        {
            "node": {"mode": "shadow"},
            "model": {"thresholds": {"subdural": 0.3}},
            "storage": {"dir": str(tmp_path / "node"),
                        "database": storage_section(tmp_path / "node").database},
        }
    )  # fmt: skip
    store = open_store(config.storage.dir)
    queue_series(store, phantom.paths, time.time() - 5)
    classifier = Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=4,
                            thresholds={"subdural": 0.3})  # fmt: skip
    before = time.time()
    outcome = Worker(config, "w0", store, classifier).run_once(time.time())
    assert outcome is not None and outcome.state == "done", outcome
    (row,) = store.reads()
    assert row.mode == "shadow"
    assert row.threshold_sources == dict.fromkeys(LABELS, "bundle") | {"subdural": "site"}
    assert row.thresholds["subdural"] == 0.3
    assert row.result_at is not None and before <= row.result_at <= row.read_at  # type: ignore[operator]


def test_an_older_sqlite_store_gains_the_columns(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    with store.transaction() as db:  # the ledger as issue #25 first wrote it
        db.execute("DROP INDEX series_reads_read_at")
        for column in ("threshold_sources", "mode", "result_at"):
            db.execute(f"ALTER TABLE series_reads DROP COLUMN {column}")
    store.close()
    store = Store.open(tmp_path)  # serve's open brings it up to date
    _record(store, [_read(1, 10.0, mode="shadow", result_at=9.0)])
    assert store.reads()[0].mode == "shadow"
    store.close()


def test_postgres_migration_adds_the_columns(pg_url: str, tmp_path: Path) -> None:
    """A database at the schema before the audit's columns, with a ledger row in it, is
    migrated by the next serve to the latest schema: the row gains the defaults."""
    import psycopg

    from ich_node.config import StorageSection
    from ich_node.queue import postgres

    number = next(i + 1 for i, m in enumerate(postgres.MIGRATIONS) if "result_at" in m)
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as an older ich-node left it
        conn.execute(
            """CREATE TABLE ich_schema_migrations (
                version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"""
        )
        for version in range(1, number):
            conn.execute(postgres.MIGRATIONS[version - 1])
            conn.execute("INSERT INTO ich_schema_migrations VALUES (%s, 0)", (version,))
        conn.execute(
            """INSERT INTO series_reads (job_id, study_instance_uid, series_instance_uid,
                version, model_name, model_version, model_sha256, thresholds, probabilities,
                coverage_complete, read_at)
            VALUES ('job-1', '1.2.3', '1.2.3.4', 1, 'm', '1', %s, '{}', '{}', true, 10.0)""",
            ("0" * 64,),
        )
    store = postgres.PgStore(StorageSection(dir=tmp_path, database=pg_url))
    try:
        (row,) = store.reads()
        assert (row.job_id, row.mode, row.threshold_sources, row.result_at) == (
            "job-1", "live", {}, None,
        )  # fmt: skip
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert postgres.schema_version(conn) == postgres.SCHEMA_VERSION
    finally:
        store.close()
