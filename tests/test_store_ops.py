"""Retention, resend and the SQLite -> PostgreSQL migration on both store backends."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ich_node.config import NodeConfig, QueueSection, parse_config
from ich_node.ingest.spool import Spool
from ich_node.queue.backend import job_queue, open_store
from ich_node.queue.interface import InstanceRecord, SeriesRead
from ich_node.queue.jobs import job_id_for
from ich_node.queue.layout import StorageLayout
from ich_node.queue.store import Store
from ich_node.retention import Cleaner


def _config(tmp_path: Path, database: str | None) -> NodeConfig:
    return parse_config(
        {
            "storage": {"dir": str(tmp_path / "node"), "database": database, "keep_hours": 1.0},
            "queue": {"max_attempts": 1},
        }
    )


@pytest.fixture
def config(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> NodeConfig:
    """A node configuration on the test's backend (SQLite, or a fresh PostgreSQL database)."""
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    return _config(tmp_path, url)


def _record(series: str, i: int) -> InstanceRecord:
    return InstanceRecord(
        f"{series}.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2", series, "CT", "", "", ""
    )


def _spool_and_queue(store: Store, config: NodeConfig, series: str, now: float) -> str:
    if config.storage.database is not None:
        assert store.place_store_id()  # type: ignore[attr-defined]  # as serve does at start
    spool = Spool(config.storage.dir, store, 0)
    for i in range(3):
        spool.save(f"instance {i}".encode(), _record(series, i), now)
    return store.queue_series(series, 3, job_id_for, now).job_id


def test_retention_purges_finished_series_on_both_backends(config: NodeConfig) -> None:
    store = open_store(config.storage)
    queue = job_queue(store, config.queue)
    now = time.time()
    job_id = _spool_and_queue(store, config, "1.4", now)
    job = queue.lease("w", now)
    assert job is not None and job.job_id == job_id
    results = StorageLayout(config.storage.dir).results_dir(job_id)
    results.mkdir(parents=True)
    (results / "findings.json").write_text("{}")
    queue.complete(job, ["pacs"], 1, now)
    store.finish_delivery(job_id, "pacs", "done", "", now, now)
    cleaner = Cleaner(store, config.storage.dir, config.storage.keep_hours)
    assert cleaner.run_once(now).series == 0  # not yet past keep_hours
    cleaned = cleaner.run_once(now + 3601)
    assert (cleaned.series, cleaned.instance_files, cleaned.result_folders) == (1, 3, 1)
    assert [p for p in (config.storage.dir / "spool").rglob("*") if p.is_file()] == []
    record = store.series("1.4")
    assert record is not None and record.state == "purged" and store.n_instances() == 0
    store.close()


def test_resend_requeues_parked_work_on_both_backends(
    config: NodeConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    from ich_node.service.ops import resend

    store = open_store(config.storage)
    queue = job_queue(store, config.queue)
    now = time.time()
    job_id = _spool_and_queue(store, config, "1.5", now)
    job = queue.lease("w", now)
    assert job is not None
    assert queue.fail(job, "decoder said no", now) == "parked"  # max_attempts 1
    store.close()
    assert resend(config, job_id) == 0
    assert "job re-queued" in capsys.readouterr().out
    store = open_store(config.storage)
    again = store.job(job_id)
    assert again is not None and again.state == "queued" and again.attempts == 0
    assert resend(config, job_id) == 1  # nothing parked any more
    store.close()


def test_sqlite_store_migrates_to_postgresql(tmp_path: Path, pg_url: str) -> None:
    from ich_node.service.cli import main

    sqlite_config = _config(tmp_path, None)
    store = open_store(sqlite_config.storage)
    queue = job_queue(store, QueueSection())
    now = time.time()
    job_id = _spool_and_queue(store, sqlite_config, "1.6", now)
    job = queue.lease("w", now)
    assert job is not None
    read = SeriesRead(
        job_id, "1.2", "1.6", "ACC", 1, "f" * 64, 1, "m", "1", "a" * 64,
        {"any": 0.5}, {"any": 0.7}, ("any",), False, 2,
    )  # fmt: skip
    queue.complete(job, ["pacs"], 1, now, read=read)
    store.accept_object(job_id, "pacs", "9.9.9", now)
    before = (store.series("1.6"), store.jobs(), store.deliveries(), store.instance_files())
    ledger = store.reads()
    assert len(ledger) == 1 and ledger[0].coverage_complete is False
    store.close()
    path = tmp_path / "node.yaml"
    path.write_text(f"storage:\n  dir: {sqlite_config.storage.dir}\n  database: {pg_url}\n")
    assert main(["migrate-store", "--config", str(path)]) == 0
    pg_config = _config(tmp_path, pg_url)
    moved = open_store(pg_config.storage)
    assert (moved.series("1.6"), moved.jobs(), moved.deliveries(), moved.instance_files()) == (
        before
    )
    assert moved.accepted_objects(job_id, "pacs") == {"9.9.9"}
    assert moved.reads() == ledger  # the results ledger too (BOOLEAN from SQLite's 0/1)
    import psycopg

    with psycopg.connect(pg_url) as conn:
        paths = [r[0] for r in conn.execute("SELECT path FROM instances").fetchall()]
    assert paths and all(p.startswith("spool/") for p in paths)  # relative to storage.dir
    moved.close()
    assert main(["migrate-store", "--config", str(path)]) == 2  # never into a used database


def test_a_role_without_a_shared_store_is_refused(tmp_path: Path) -> None:
    from ich_node.service.serve import EXIT_CONFIG, serve

    config = _config(tmp_path, None)
    for role in ("listener", "worker"):
        assert serve(config, role=role) == EXIT_CONFIG
    assert not (tmp_path / "node").exists()  # nothing touched


def test_serve_refuses_a_database_newer_than_the_code(tmp_path: Path, pg_url: str) -> None:
    import psycopg

    from ich_node.queue import postgres
    from ich_node.service.serve import EXIT_CONFIG, serve

    config = _config(tmp_path, pg_url)
    open_store(config.storage).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ich_schema_migrations VALUES (%s, 0)", (postgres.SCHEMA_VERSION + 1,)
        )
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert serve(config, role="listener") == EXIT_CONFIG
    finally:
        for sig, handler in handlers.items():  # serve installs its own
            signal.signal(sig, handler)


def test_status_prints_the_alerts_line_on_both_backends(
    config: NodeConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    from ich_node.queue.interface import AlertRecord
    from ich_node.service.ops import status

    store = open_store(config.storage)
    try:
        now = time.time()
        job_id = _spool_and_queue(store, config, "1.2.3", now)
        assert status(config, as_json=False) == 0
        assert "alerts:" not in capsys.readouterr().out  # no alert recorded: no line
        alerts = [
            AlertRecord(job_id, t, "1.2.3", 1, f"key-{t}", "F", None, ("any",), now, now + 1)
            for t in ("ris", "pager")
        ]
        assert store.record_alerts(alerts, "alert:", now + 1) == 2
        assert status(config, as_json=False) == 0
        out = capsys.readouterr().out
        assert "alerts: pending 2 (median time to notification none accepted yet)" in out
        store.alert_accepted(job_id, "ris", now + 4.5)
        assert status(config, as_json=False) == 0
        assert "alerts: pending 2 (median time to notification 4.5 s)" in capsys.readouterr().out
        # Two accepted: the median is the mean of the two middle values, not the upper one.
        store.alert_accepted(job_id, "pager", now + 7.0)
        assert status(config, as_json=False) == 0
        assert "(median time to notification 5.75 s)" in capsys.readouterr().out
    finally:
        store.close()


def test_median_is_the_true_median() -> None:
    """The mean of the two middle values for an even count (status and the web console)."""
    from ich_node.service.ops import median

    assert median([0.98, 7.0]) == pytest.approx(3.99)
    assert median([7.0, 0.98, 3.0]) == 3.0
    assert median([4.5]) == 4.5 and median([]) is None
