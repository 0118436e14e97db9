"""The node's durable state: one SQLite database (WAL) under ``storage.dir``.

Instances, series, reading jobs, deliveries (the outbox) and worker heartbeats
live here. Every part of the node (listener threads, the assembler, the sender
thread, worker processes) opens its own :class:`Store`; SQLite's WAL mode lets
readers run beside the one writer, and ``BEGIN IMMEDIATE`` serialises writers
across processes. The interface is small on purpose: a server database can
replace it later without touching the stages.

All times are seconds since the epoch (``time.time()``), passed in by callers so
that tests drive time.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal

import structlog

from ich_node.queue import layout
from ich_node.queue.interface import (
    ALERT_PREFIX,
    Added,
    AddResult,
    AlertRecord,
    AlertsChanged,
    DeliveryRecord,
    DeliveryState,
    InstanceIdentity,
    InstanceRecord,
    JobRecord,
    JobStage,
    JobState,
    RefusalCount,
    RereadCounts,
    SeriesRead,
    SeriesRecord,
    SeriesState,
    SrReference,
    StoreUnusable,
    StreamLease,
)

__all__ = [
    "DB_NAME",
    "AddResult",
    "Added",
    "AlertRecord",
    "DeliveryRecord",
    "DeliveryState",
    "InstanceRecord",
    "JobRecord",
    "JobStage",
    "JobState",
    "RefusalCount",
    "RereadCounts",
    "SeriesRead",
    "SeriesRecord",
    "SeriesState",
    "SrReference",
    "Store",
    "StreamLease",
]

log = structlog.get_logger(__name__)

#: The database file inside ``storage.dir`` (re-exported from the layout).
DB_NAME: Final = layout.DB_NAME

_SCHEMA: Final = """
-- An instance is identified by its series and its SOP Instance UID: a UID reused in
-- another series is another instance (faulty modalities, anonymisers, re-keyed archives).
CREATE TABLE IF NOT EXISTS instances (
    series_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    digest TEXT NOT NULL DEFAULT '',
    acquisition TEXT NOT NULL DEFAULT '',
    images_in_acquisition INTEGER,
    series_related INTEGER,
    content_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (series_instance_uid, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS instances_sop ON instances(sop_instance_uid);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    body_part TEXT NOT NULL,
    study_description TEXT NOT NULL,
    series_description TEXT NOT NULL,
    expected INTEGER,
    n_instances INTEGER NOT NULL,
    n_replaced INTEGER NOT NULL DEFAULT 0,
    n_read INTEGER NOT NULL DEFAULT 0,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    state TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    purged_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL,
    lease_until REAL,
    worker TEXT,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    crash_returns INTEGER NOT NULL DEFAULT 0,
    cause TEXT NOT NULL DEFAULT '',
    sr_study_uid TEXT NOT NULL DEFAULT '',
    sr_series_uid TEXT NOT NULL DEFAULT '',
    sr_sop_class_uid TEXT NOT NULL DEFAULT '',
    sr_sop_uid TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, not_before);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    n_files INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, next_at);
-- One row per result object a destination accepted: a retry (or a restart after a
-- crash) sends only the rest, so an object is re-sent only when the node died between
-- the destination's response and this row's commit.
CREATE TABLE IF NOT EXISTS accepted_objects (
    job_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (job_id, destination, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS heartbeats (
    name TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    at REAL NOT NULL
);
-- One row per alert (a series version told to one notification target), written
-- with its delivery row (destination 'alert:<target>') before it is sent: the
-- next version of the series compares its answer with the latest one here.
CREATE TABLE IF NOT EXISTS alerts (
    job_id TEXT NOT NULL,
    target TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    supersedes TEXT,
    positive_labels TEXT NOT NULL,
    last_received_at REAL NOT NULL,
    created_at REAL NOT NULL,
    accepted_at REAL,
    study_key TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, target)
);
CREATE INDEX IF NOT EXISTS alerts_series ON alerts(series_instance_uid, target, version);
-- The results ledger: one row per series version read and answered, written with the
-- job's completion and kept beyond image retention (no patient name, ID or birth
-- date). Times are NULL until they happen.
CREATE TABLE IF NOT EXISTS series_reads (
    job_id TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    accession_number TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL,
    content_fingerprint TEXT NOT NULL DEFAULT '',
    n_instances INTEGER NOT NULL DEFAULT 0,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    thresholds TEXT NOT NULL,
    probabilities TEXT NOT NULL,
    positive_labels TEXT NOT NULL DEFAULT '',
    coverage_complete INTEGER NOT NULL,
    n_notes INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL,
    completed_at REAL,
    read_at REAL,
    first_alert_at REAL,
    first_delivery_at REAL,
    sr_series_instance_uid TEXT NOT NULL DEFAULT '',
    sr_sop_class_uid TEXT NOT NULL DEFAULT '',
    sr_sop_instance_uid TEXT NOT NULL DEFAULT '',
    cause TEXT NOT NULL DEFAULT '',
    bytes_fingerprint TEXT NOT NULL DEFAULT '',
    threshold_sources TEXT NOT NULL DEFAULT '',
    mode TEXT NOT NULL DEFAULT 'live',
    result_at REAL
);
CREATE INDEX IF NOT EXISTS series_reads_read_at ON series_reads(read_at);
CREATE INDEX IF NOT EXISTS series_reads_series ON series_reads(series_instance_uid, version);
CREATE INDEX IF NOT EXISTS series_reads_study ON series_reads(study_instance_uid);
CREATE INDEX IF NOT EXISTS series_reads_accession ON series_reads(accession_number);
-- Series a worker reads while they arrive (series.streaming): one holder per series,
-- renewed while it holds the slices' outputs (nothing else depends on it).
CREATE TABLE IF NOT EXISTS streams (
    series_instance_uid TEXT PRIMARY KEY,
    worker TEXT NOT NULL,
    lease_until REAL NOT NULL,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stage_times (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    seconds REAL NOT NULL,
    at REAL NOT NULL
);
-- What the node refused, by reason (images for low disk, paths outside storage.dir):
-- counts and the last detail, for status and health.
CREATE TABLE IF NOT EXISTS refusals (
    reason TEXT PRIMARY KEY,
    n INTEGER NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
"""


#: Columns added after the first release: (table, column, declaration).
_ADDED_COLUMNS: Final = (
    ("series", "n_replaced", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "stage", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "crash_returns", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "cause", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "sr_study_uid", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "sr_series_uid", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "sr_sop_class_uid", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "sr_sop_uid", "TEXT NOT NULL DEFAULT ''"),
    ("instances", "content_id", "TEXT NOT NULL DEFAULT ''"),
    ("series", "purged_at", "REAL"),
    ("series_reads", "bytes_fingerprint", "TEXT NOT NULL DEFAULT ''"),
    ("alerts", "study_key", "TEXT NOT NULL DEFAULT ''"),
    # The results ledger, for `ich-node audit`: threshold sources, node.mode, result time.
    ("series_reads", "threshold_sources", "TEXT NOT NULL DEFAULT ''"),
    ("series_reads", "mode", "TEXT NOT NULL DEFAULT 'live'"),
    ("series_reads", "result_at", "REAL"),
)


#: The tables of the store, in the order of ``_SCHEMA``.
_TABLES: Final = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA))


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}


def _migrate_instances(db: sqlite3.Connection) -> None:
    """Re-key a store written before instances were keyed by series + SOP Instance UID."""
    columns = _columns(db, "instances")
    if not columns or "digest" in columns:
        return
    db.execute("ALTER TABLE instances RENAME TO instances_before_v2")
    db.execute("DROP INDEX IF EXISTS instances_series")


def _add_columns(db: sqlite3.Connection) -> None:
    for table, column, declaration in _ADDED_COLUMNS:
        if column not in _columns(db, table):
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    # Indexes on added columns (after them, for stores written before).
    db.execute("CREATE INDEX IF NOT EXISTS alerts_study ON alerts(study_key, target, created_at)")
    if _columns(db, "instances_before_v2"):
        db.execute(
            """INSERT OR IGNORE INTO instances (series_instance_uid, sop_instance_uid,
                sop_class_uid, path, size, received_at)
            SELECT series_instance_uid, sop_instance_uid, sop_class_uid, path, size,
                received_at FROM instances_before_v2"""
        )
        db.execute("DROP TABLE instances_before_v2")


#: A series retention may purge, for ``?`` = the cutoff (epoch s): last touched before
#: it, skipped or read, and every job and delivery of it finished (parked work stays
#: until an admin resends it). Shared by :meth:`Store.expired_series` and the
#: re-check inside :meth:`Store.purge_series`.
_EXPIRED: Final = """s.state IN ('queued', 'skipped', 'capped') AND s.last_at < ?
    AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid =
        s.series_instance_uid AND j.state != 'done')
    AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON d.job_id = j.job_id
        WHERE j.series_instance_uid = s.series_instance_uid AND d.state != 'done')"""


class Store:
    """A connection to the node's SQLite database.

    Parameters
    ----------
    path : pathlib.Path
        The database file (created with its schema when absent).
    timeout : float
        Seconds to wait for another writer (SQLite busy timeout).

    Notes
    -----
    One instance may be shared by the threads of a process (calls are
    serialised by a lock); each process opens its own.
    """

    def __init__(self, path: Path, *, timeout: float = 30.0, migrate: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        if not migrate:
            self._db = self._open_existing(timeout)
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The store holds UIDs, states and timings only, but the folder beside it
        # holds images: owner-only (the database and its -wal/-shm files too).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(
            str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives a power cut, which is what a
        # Success status to the PACS promises.
        self._db.execute("PRAGMA synchronous=FULL")
        with self.transaction() as db:
            _migrate_instances(db)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            _add_columns(db)
        for suffix in ("", "-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    def _open_existing(self, timeout: float) -> sqlite3.Connection:
        """Connect to the store as it is: no file, table or column is created.

        For the commands that only look (``status``, ``health``, ``check-config``)
        and ``resend``.

        Raises
        ------
        StoreUnusable
            Exit code 1 when there is no store yet (no file, or no table in it); 2
            when the file cannot be opened, is not a database, or was written by
            an older ich-node (``serve`` brings it up to date).
        """
        where = f"storage.dir: {self.path}"
        if not self.path.is_file():
            raise StoreUnusable(f"{where}: no node store (has the node ever run here?)", 1)
        try:
            db = sqlite3.connect(
                f"file:{self.path}?mode=rw",
                uri=True,
                timeout=timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")
            present = {
                str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not present & set(_TABLES):
                db.close()
                raise StoreUnusable(f"{where}: no node store (has the node ever run here?)", 1)
            missing = [t for t in _TABLES if t not in present]
            missing += [
                f"{t}.{c}"
                for t, c, _ in _ADDED_COLUMNS
                if t in present and c not in _columns(db, t)
            ]
        except sqlite3.Error as exc:
            raise StoreUnusable(f"{where}: cannot open the store: {exc}", 2) from None
        if missing:
            db.close()
            raise StoreUnusable(
                f"{where}: the store was written by an older ich-node (no "
                f"{', '.join(missing[:3])}): `ich-node serve` of this version brings it "
                "up to date",
                2,
            )
        return db

    @classmethod
    def open(cls, storage_dir: Path) -> Store:
        """The store of the node whose ``storage.dir`` is ``storage_dir``."""
        return cls(layout.StorageLayout(Path(storage_dir)).db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), committed on success."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, params))

    # -- instances and series -------------------------------------------------

    def has_instance(self, sop_instance_uid: str, series_instance_uid: str | None = None) -> bool:
        """Whether an instance with this SOP Instance UID (in this series, when given) is known."""
        if series_instance_uid is None:
            rows = self._query(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            )
        else:
            rows = self._query(
                """SELECT 1 FROM instances WHERE series_instance_uid = ?
                AND sop_instance_uid = ?""",
                (series_instance_uid, sop_instance_uid),
            )
        return bool(rows)

    def instance_digest(self, series_instance_uid: str, sop_instance_uid: str) -> str | None:
        """The content digest of the recorded copy of an instance; ``None`` when unknown."""
        rows = self._query(
            """SELECT digest FROM instances WHERE series_instance_uid = ?
            AND sop_instance_uid = ?""",
            (series_instance_uid, sop_instance_uid),
        )
        return str(rows[0]["digest"]) if rows else None

    def add_instance(
        self, record: InstanceRecord, path: Path, size: int, now: float, digest: str = ""
    ) -> AddResult:
        """Record a spooled instance under (series, SOP Instance UID).

        The same key with the same ``digest`` changes nothing (``DUPLICATE``); with
        another digest the row points at the new file and the series is receiving
        again (``REPLACED``: it is read again as a new version). A new key is
        ``NEW``; ``reused_in`` then names other series that hold the same SOP
        Instance UID (the instance is still stored and read with its own series).
        """
        key = (record.series_instance_uid, record.sop_instance_uid)
        with self.transaction() as db:
            row = db.execute(
                """SELECT path, digest FROM instances WHERE series_instance_uid = ?
                AND sop_instance_uid = ?""",
                key,
            ).fetchone()
            if row is not None and row["digest"] == digest:
                return AddResult(Added.DUPLICATE, None, ())
            if row is not None:
                db.execute(
                    """UPDATE instances SET path = ?, size = ?, received_at = ?, digest = ?,
                        sop_class_uid = ?, acquisition = ?, images_in_acquisition = ?,
                        series_related = ?, content_id = ''
                    WHERE series_instance_uid = ? AND sop_instance_uid = ?""",
                    (
                        str(path),
                        size,
                        now,
                        digest,
                        record.sop_class_uid,
                        record.acquisition_number,
                        record.images_in_acquisition,
                        record.series_related_instances,
                        *key,
                    ),
                )
                db.execute(
                    """UPDATE series SET n_replaced = n_replaced + 1, last_at = ?,
                        state = 'receiving' WHERE series_instance_uid = ?""",
                    (now, record.series_instance_uid),
                )
                old = Path(row["path"])
                return AddResult(Added.REPLACED, None if old == Path(path) else old, ())
            db.execute(
                """INSERT INTO instances (series_instance_uid, sop_instance_uid, sop_class_uid,
                    path, size, received_at, digest, acquisition, images_in_acquisition,
                    series_related) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    *key,
                    record.sop_class_uid,
                    str(path),
                    size,
                    now,
                    digest,
                    record.acquisition_number,
                    record.images_in_acquisition,
                    record.series_related_instances,
                ),
            )
            db.execute(
                """INSERT INTO series (series_instance_uid, study_instance_uid, modality,
                    body_part, study_description, series_description, expected,
                    n_instances, first_at, last_at, state)
                VALUES (?, ?, ?, ?, ?, ?, NULL, 1, ?, ?, 'receiving')
                ON CONFLICT(series_instance_uid) DO UPDATE SET
                    n_instances = series.n_instances + 1, last_at = excluded.last_at,
                    state = 'receiving'""",
                (
                    record.series_instance_uid,
                    record.study_instance_uid,
                    record.modality,
                    record.body_part,
                    record.study_description,
                    record.series_description,
                    now,
                    now,
                ),
            )
            others = db.execute(
                """SELECT series_instance_uid FROM instances WHERE sop_instance_uid = ?
                AND series_instance_uid != ? ORDER BY series_instance_uid""",
                (record.sop_instance_uid, record.series_instance_uid),
            ).fetchall()
            return AddResult(Added.NEW, None, tuple(str(r[0]) for r in others))

    def instance_paths(
        self, series_instance_uid: str, received_by: float | None = None
    ) -> list[Path]:
        """The spooled files of a series; with ``received_by``, only those received by then.

        A job reads the instances its series version was queued with (received by
        the job's creation): later ones belong to the next version, so each
        version's results are its own, delivered once.

        Every path is checked to lead into ``storage.dir/spool`` without a symbolic
        link (:meth:`ich_node.queue.layout.StorageLayout.confine`); one that does
        not is left out, logged (``store.path_refused``) and counted
        (``path_outside_storage``): no caller opens, reads or deletes it.
        """
        if received_by is None:
            rows = self._query(
                "SELECT path FROM instances WHERE series_instance_uid = ? ORDER BY path",
                (series_instance_uid,),
            )
        else:
            rows = self._query(
                """SELECT path FROM instances WHERE series_instance_uid = ? AND received_at <= ?
                ORDER BY path""",
                (series_instance_uid, received_by),
            )
        return self._confined([self._to_path(str(r["path"])) for r in rows])

    @property
    def storage_dir(self) -> Path:
        """``storage.dir``: the folder the database file is in."""
        return self.path.parent

    def _to_path(self, recorded: str) -> Path:
        """A path as recorded, as this host opens it (PostgreSQL records them relative)."""
        return Path(recorded)

    def _confined(self, paths: list[Path]) -> list[Path]:
        """``paths`` that stay inside ``storage.dir/spool``; the others refused (see above)."""
        where = layout.StorageLayout(self.storage_dir)
        kept: list[Path] = []
        for path in paths:
            try:
                where.confine(path, where.spool, read=True)
            except layout.OutsideStorage as exc:
                self.refuse_path(exc, "instance path")
                continue
            kept.append(path)
        return kept

    def refuse_path(self, exc: layout.OutsideStorage, what: str) -> None:
        """Log and count a path the node refused to act on (never raises)."""
        log.error("store.path_refused", what=what, path=exc.path, reason=exc.why)
        try:
            self.count_refusals({"path_outside_storage": (1, f"{what}: {exc.why}")}, time.time())
        except Exception as err:  # a read-only store, a busy database: logged above
            log.warning("store.refusal_not_counted", error=type(err).__name__)

    def _series_record(self, row: sqlite3.Row) -> SeriesRecord:
        data = dict(row)
        data["expected"] = self._whole_series_count(str(row["series_instance_uid"]))
        return SeriesRecord(**data)

    #: Per series: what :meth:`_expected` needs to know the whole series' size.
    _COUNTS_SQL: Final = """SELECT series_instance_uid, COUNT(*) AS n,
                MAX(series_related) AS related, COUNT(DISTINCT acquisition) AS acquisitions,
                SUM(CASE WHEN acquisition = '' THEN 1 ELSE 0 END) AS no_acquisition,
                COUNT(images_in_acquisition) AS with_count,
                MIN(images_in_acquisition) AS lo, MAX(images_in_acquisition) AS hi
            FROM instances"""

    @staticmethod
    def _expected(row: sqlite3.Row) -> int | None:
        # ImagesInAcquisition counts one acquisition (PS3.3 C.7.6.1): it is the
        # series size only when every instance says it and all share one
        # AcquisitionNumber. NumberOfSeriesRelatedInstances counts the series.
        if row["related"] is not None and int(row["related"]) > 0:
            return int(row["related"])
        if (
            int(row["n"]) > 0
            and int(row["acquisitions"]) == 1
            and not int(row["no_acquisition"] or 0)
            and int(row["with_count"]) == int(row["n"])
            and row["lo"] == row["hi"]
            and int(row["hi"]) > 0
        ):
            return int(row["hi"])
        return None

    def _whole_series_count(self, series_instance_uid: str) -> int | None:
        row = self._query(
            self._COUNTS_SQL + " WHERE series_instance_uid = ? GROUP BY series_instance_uid",
            (series_instance_uid,),
        )
        return self._expected(row[0]) if row else None

    def series_list(self) -> list[SeriesRecord]:
        """Every series, the most recently received first (the web console's list).

        Two queries whatever the number of series (no query per series).
        """
        expected = {
            str(r["series_instance_uid"]): self._expected(r)
            for r in self._query(self._COUNTS_SQL + " GROUP BY series_instance_uid")
        }
        rows = self._query("SELECT * FROM series ORDER BY last_at DESC, series_instance_uid")
        return [
            SeriesRecord(**{**dict(r), "expected": expected.get(str(r["series_instance_uid"]))})
            for r in rows
        ]

    def series(self, series_instance_uid: str) -> SeriesRecord | None:
        rows = self._query(
            "SELECT * FROM series WHERE series_instance_uid = ?", (series_instance_uid,)
        )
        return self._series_record(rows[0]) if rows else None

    def receiving_series(self) -> list[SeriesRecord]:
        """Series with instances that no read has covered yet."""
        rows = self._query("SELECT * FROM series WHERE state = 'receiving' ORDER BY last_at")
        return [self._series_record(r) for r in rows]

    def skip_series(
        self,
        series_instance_uid: str,
        n_read: int,
        reason: str,
        seen_last_at: float | None = None,
        state: Literal["skipped", "capped"] = "skipped",
    ) -> None:
        """Record that the series is not read (``skipped``, or ``capped`` at max_versions).

        It stays ``receiving`` when an instance came after ``seen_last_at`` (the
        ``last_at`` the decision was made on) or beyond ``n_read`` instances.
        """
        seen = float("inf") if seen_last_at is None else seen_last_at
        with self.transaction() as db:
            db.execute(
                """UPDATE series SET state = CASE WHEN n_instances > ? OR last_at > ?
                    THEN 'receiving' ELSE ? END, n_read = ?, reason = ?
                WHERE series_instance_uid = ?""",
                (n_read, seen, state, n_read, reason, series_instance_uid),
            )

    def queue_series(
        self,
        series_instance_uid: str,
        n_read: int,
        job_id_for: Callable[[str, int], str],
        now: float,
        seen_last_at: float | None = None,
        cause: str | None = None,
    ) -> JobRecord:
        """Bump the series version and enqueue its job, in one transaction.

        ``job_id_for`` is called with (series UID, version) and returns the job id.
        The job's ``cause`` says why this version is read: the first read, late
        instances, changed re-sends, a re-send after its images were purged (or
        ``cause`` when given). The series stays ``receiving`` when an
        instance came after ``seen_last_at`` (the ``last_at`` the decision saw).
        """
        seen = float("inf") if seen_last_at is None else seen_last_at
        with self.transaction() as db:
            row = db.execute(
                """SELECT version, n_read, n_replaced, purged_at FROM series
                WHERE series_instance_uid = ?""",
                (series_instance_uid,),
            ).fetchone()
            version = int(row["version"]) + 1
            job_id = job_id_for(series_instance_uid, version)
            # The version holds the instances received by `now` (what its job reads,
            # see instance_paths); any later one makes the series receiving again.
            counted = db.execute(
                """SELECT COUNT(*) AS n FROM instances WHERE series_instance_uid = ?
                AND received_at <= ?""",
                (series_instance_uid, now),
            ).fetchone()
            n_read = min(n_read, int(counted["n"])) if int(counted["n"]) else n_read
            if cause is not None:
                pass
            elif version == 1:
                cause = "first read"
            elif row["purged_at"] is not None:
                cause = f"{n_read} instances re-sent after their images were purged"
            else:
                late = max(n_read - int(row["n_read"]), 0)
                parts = [f"{late} late instances"] if late else []
                if int(row["n_replaced"]):
                    parts.append(f"{int(row['n_replaced'])} changed re-sends")
                cause = ", ".join(parts) or "read again"
            db.execute(
                """UPDATE series SET state = CASE WHEN n_instances > ? OR last_at > ?
                    THEN 'receiving' ELSE 'queued' END, n_read = ?, version = ?, reason = '',
                    n_replaced = 0, purged_at = NULL
                WHERE series_instance_uid = ?""",
                (n_read, seen, n_read, version, series_instance_uid),
            )
            db.execute(
                """INSERT INTO jobs (job_id, series_instance_uid, version, state,
                    not_before, created_at, updated_at, cause)
                VALUES (?, ?, ?, 'queued', ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
                (job_id, series_instance_uid, version, now, now, now, cause),
            )
            job = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return JobRecord(**dict(job))

    def reread_counts(self) -> RereadCounts:
        """How many series were read more than once and why, capped ones, reused UIDs."""
        row = self._query(
            """SELECT
                (SELECT COUNT(*) FROM series WHERE version > 1) AS series,
                (SELECT COUNT(*) FROM jobs WHERE version > 1 AND cause LIKE '%late%') AS late,
                (SELECT COUNT(*) FROM jobs WHERE version > 1 AND cause LIKE '%changed%')
                    AS changed,
                (SELECT COUNT(*) FROM series WHERE state = 'capped') AS capped,
                (SELECT COUNT(*) FROM instances i WHERE EXISTS (SELECT 1 FROM instances o
                    WHERE o.sop_instance_uid = i.sop_instance_uid
                    AND o.series_instance_uid != i.series_instance_uid)) AS reused"""
        )[0]
        return RereadCounts(
            int(row["series"]),
            int(row["late"]),
            int(row["changed"]),
            int(row["capped"]),
            int(row["reused"]),
        )

    def previous_sr(self, series_instance_uid: str, version: int) -> SrReference | None:
        """The SR of the latest earlier version of a series that sent one, or ``None``."""
        rows = self._query(
            """SELECT sr_study_uid, sr_series_uid, sr_sop_class_uid, sr_sop_uid FROM jobs
            WHERE series_instance_uid = ? AND version < ? AND state = 'done'
            AND sr_sop_uid != '' ORDER BY version DESC LIMIT 1""",
            (series_instance_uid, version),
        )
        if not rows:  # the ledger keeps it too (beyond retention)
            rows = self._query(
                """SELECT study_instance_uid AS sr_study_uid,
                    sr_series_instance_uid AS sr_series_uid, sr_sop_class_uid,
                    sr_sop_instance_uid AS sr_sop_uid FROM series_reads
                WHERE series_instance_uid = ? AND version < ? AND sr_sop_instance_uid != ''
                ORDER BY version DESC LIMIT 1""",
                (series_instance_uid, version),
            )
        if not rows:
            return None
        r = rows[0]
        return SrReference(
            str(r["sr_study_uid"]),
            str(r["sr_series_uid"]),
            str(r["sr_sop_class_uid"]),
            str(r["sr_sop_uid"]),
        )

    # -- the results ledger -------------------------------------------------------

    def record_read(self, db: Any, job: JobRecord, read: SeriesRead, now: float) -> None:
        """Write the ledger row of a job completing in transaction ``db``.

        Called by :meth:`ich_node.queue.jobs.JobQueue.complete` inside its
        transaction (``db``: a ``sqlite3.Connection`` or the PostgreSQL store's
        cursor wrapper, both with ``?`` placeholders). The store fills the times
        it knows: ``completed_at`` (the job's creation), ``read_at`` (``now``) and
        ``first_received_at`` (the first instance of the version) when the record
        leaves them ``None``.
        """
        first = read.first_received_at
        if first is None:
            row = db.execute(
                """SELECT MIN(received_at) AS t FROM instances WHERE series_instance_uid = ?
                AND received_at <= ?""",
                (job.series_instance_uid, job.created_at),
            ).fetchone()
            first = None if row is None or row["t"] is None else float(row["t"])
        first_alert = read.first_alert_at
        if first_alert is None:  # alerts go out before the job completes
            row = db.execute(
                "SELECT MIN(accepted_at) AS t FROM alerts WHERE job_id = ?", (job.job_id,)
            ).fetchone()
            first_alert = None if row is None or row["t"] is None else float(row["t"])
        db.execute(
            """INSERT INTO series_reads (job_id, study_instance_uid, series_instance_uid,
                accession_number, version, content_fingerprint, n_instances, model_name,
                model_version, model_sha256, thresholds, probabilities, positive_labels,
                coverage_complete, n_notes, first_received_at, completed_at, read_at,
                first_alert_at, first_delivery_at, sr_series_instance_uid, sr_sop_class_uid,
                sr_sop_instance_uid, cause, bytes_fingerprint, threshold_sources, mode,
                result_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
                ?, ?)
            ON CONFLICT (job_id) DO NOTHING""",
            (
                job.job_id, read.study_instance_uid, job.series_instance_uid,
                read.accession_number, job.version, read.content_fingerprint,
                read.n_instances, read.model_name, read.model_version, read.model_sha256,
                json.dumps(read.thresholds, sort_keys=True),
                json.dumps(read.probabilities, sort_keys=True),
                ",".join(read.positive_labels), bool(read.coverage_complete), read.n_notes,
                first, job.created_at if read.completed_at is None else read.completed_at,
                now if read.read_at is None else read.read_at, first_alert,
                read.first_delivery_at, read.sr_series_instance_uid, read.sr_sop_class_uid,
                read.sr_sop_instance_uid, read.cause or job.cause, read.bytes_fingerprint,
                json.dumps(read.threshold_sources, sort_keys=True)
                if read.threshold_sources else "",
                read.mode, read.result_at,
            ),
        )  # fmt: skip

    @staticmethod
    def _read_record(row: Any) -> SeriesRead:
        data = dict(row)
        data["thresholds"] = json.loads(data["thresholds"])
        data["probabilities"] = json.loads(data["probabilities"])
        labels = str(data["positive_labels"])
        data["positive_labels"] = tuple(labels.split(",")) if labels else ()
        data["coverage_complete"] = bool(data["coverage_complete"])
        sources = str(data.get("threshold_sources") or "")
        data["threshold_sources"] = json.loads(sources) if sources else {}
        return SeriesRead(**data)

    def reads(
        self,
        series_instance_uid: str | None = None,
        *,
        study_instance_uid: str | None = None,
        accession_number: str | None = None,
    ) -> list[SeriesRead]:
        """Ledger rows, oldest read first; filtered by series, study and accession when given."""
        where, params = [], []
        for column, value in (
            ("series_instance_uid", series_instance_uid),
            ("study_instance_uid", study_instance_uid),
            ("accession_number", accession_number),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._query(
            f"SELECT * FROM series_reads {clause} ORDER BY read_at, version, job_id",
            tuple(params),
        )
        return [self._read_record(r) for r in rows]

    def forget_reads(self, read_before: float) -> int:
        """Delete the ledger rows of reads done before ``read_before`` (seconds since the
        epoch); returns how many. ``storage.keep_results_days`` (:mod:`ich_node.retention`)."""
        with self.transaction() as db:
            cur = db.execute("DELETE FROM series_reads WHERE read_at < ?", (read_before,))
            return int(cur.rowcount or 0)

    def latest_read(self, series_instance_uid: str) -> SeriesRead | None:
        """The ledger row of the highest version of a series read, or ``None``."""
        rows = self._query(
            """SELECT * FROM series_reads WHERE series_instance_uid = ?
            ORDER BY version DESC LIMIT 1""",
            (series_instance_uid,),
        )
        return self._read_record(rows[0]) if rows else None

    # -- jobs -------------------------------------------------------------------

    def job(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return JobRecord(**dict(rows[0])) if rows else None

    def jobs(self, state: JobState | None = None) -> list[JobRecord]:
        if state is None:
            rows = self._query("SELECT * FROM jobs ORDER BY created_at")
        else:
            rows = self._query("SELECT * FROM jobs WHERE state = ? ORDER BY created_at", (state,))
        return [JobRecord(**dict(r)) for r in rows]

    # -- deliveries ---------------------------------------------------------------

    def deliveries(self, job_id: str | None = None) -> list[DeliveryRecord]:
        if job_id is None:
            rows = self._query("SELECT * FROM deliveries ORDER BY created_at")
        else:
            rows = self._query(
                "SELECT * FROM deliveries WHERE job_id = ? ORDER BY destination", (job_id,)
            )
        return [DeliveryRecord(**dict(r)) for r in rows]

    def due_deliveries(self, now: float) -> list[DeliveryRecord]:
        rows = self._query(
            """SELECT * FROM deliveries WHERE state IN ('pending', 'retry') AND next_at <= ?
            ORDER BY next_at""",
            (now,),
        )
        return [DeliveryRecord(**dict(r)) for r in rows]

    def claim_delivery(
        self,
        job_id: str,
        destination: str,
        now: float,
        *,
        holder: str = "",
        lease_seconds: float | None = None,
    ) -> bool:
        """Whether this sender may attempt a due delivery now (lease/ack of deliveries).

        With the embedded store one node sends: always ``True``. A shared store
        (:class:`ich_node.queue.postgres.PgStore`) leases the delivery to
        ``holder`` (the sending process's heartbeat name) so that one sender in
        the cluster attempts it; :meth:`finish_delivery` is the ack.
        """
        return True

    def release_delivery(self, job_id: str, destination: str, holder: str, now: float) -> None:
        """Give back a claim whose attempt was not recorded: due again at ``now``.

        The embedded store takes no claims (:meth:`claim_delivery`): nothing to do.
        """

    def finish_delivery(
        self,
        job_id: str,
        destination: str,
        state: DeliveryState,
        reason: str,
        next_at: float,
        now: float,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                """UPDATE deliveries SET state = ?, attempts = attempts + 1, reason = ?,
                    next_at = ?, updated_at = ? WHERE job_id = ? AND destination = ?""",
                (state, reason, next_at, now, job_id, destination),
            )
            if state == "done" and not destination.startswith(ALERT_PREFIX):
                db.execute(
                    """UPDATE series_reads SET first_delivery_at = ?
                    WHERE job_id = ? AND first_delivery_at IS NULL""",
                    (now, job_id),
                )

    def requeue_deliveries(self, job_id: str, now: float) -> int:
        """Parked deliveries of ``job_id`` back to pending with fresh attempts.

        An admin's resend sends every object again, also those accepted before.
        """
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE deliveries SET state = 'pending', attempts = 0, next_at = ?,
                    updated_at = ? WHERE job_id = ? AND state = 'parked'""",
                (now, now, job_id),
            )
            db.execute(
                """DELETE FROM accepted_objects WHERE job_id = ? AND destination IN
                    (SELECT destination FROM deliveries WHERE job_id = ? AND state = 'pending')""",
                (job_id, job_id),
            )
            return cur.rowcount

    def accepted_objects(self, job_id: str, destination: str) -> set[str]:
        """SOP Instance UIDs of ``job_id``'s objects that ``destination`` accepted."""
        rows = self._query(
            """SELECT sop_instance_uid FROM accepted_objects
            WHERE job_id = ? AND destination = ?""",
            (job_id, destination),
        )
        return {str(r["sop_instance_uid"]) for r in rows}

    def accept_object(
        self, job_id: str, destination: str, sop_instance_uid: str, now: float
    ) -> None:
        """Record that ``destination`` accepted one object (committed at once)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO accepted_objects VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (job_id, destination, sop_instance_uid, now),
            )

    # -- alerts ---------------------------------------------------------------------

    def last_received_at(self, series_instance_uid: str, received_by: float) -> float | None:
        """When the last instance of a series received by ``received_by`` arrived."""
        rows = self._query(
            """SELECT MAX(received_at) AS t FROM instances WHERE series_instance_uid = ?
            AND received_at <= ?""",
            (series_instance_uid, received_by),
        )
        return None if not rows or rows[0]["t"] is None else float(rows[0]["t"])

    @staticmethod
    def _alert_record(row: sqlite3.Row) -> AlertRecord:
        data = dict(row)
        labels = str(data["positive_labels"])
        data["positive_labels"] = tuple(labels.split(",")) if labels else ()
        return AlertRecord(**data)

    def alerts(self, job_id: str | None = None) -> list[AlertRecord]:
        """The recorded alerts sent or to be sent (of one job when given), oldest first."""
        if job_id is None:
            rows = self._query(
                "SELECT * FROM alerts WHERE status != '' ORDER BY created_at, target"
            )
        else:
            rows = self._query(
                "SELECT * FROM alerts WHERE job_id = ? AND status != '' ORDER BY target",
                (job_id,),
            )
        return [self._alert_record(r) for r in rows]

    def decided_targets(self, job_id: str) -> set[str]:
        """The targets whose alert decision for ``job_id`` is recorded (sent or not)."""
        rows = self._query("SELECT target FROM alerts WHERE job_id = ?", (job_id,))
        return {str(r["target"]) for r in rows}

    def previous_alert(
        self, series_instance_uid: str, version: int, target: str
    ) -> AlertRecord | None:
        """The latest alert to ``target`` of an earlier version of the series, or ``None``.

        Of a version's preliminary alert and its final, the final (recorded later).
        """
        rows = self._query(
            """SELECT * FROM alerts WHERE series_instance_uid = ? AND target = ? AND version < ?
            AND status != '' ORDER BY version DESC, created_at DESC LIMIT 1""",
            (series_instance_uid, target, version),
        )
        return self._alert_record(rows[0]) if rows else None

    def previous_study_alert(self, study_key: str, target: str, job_id: str) -> AlertRecord | None:
        """The latest alert to ``target`` about the study ``study_key`` from another job."""
        rows = self._query(
            """SELECT * FROM alerts WHERE study_key = ? AND target = ? AND job_id != ?
            AND status != '' ORDER BY created_at DESC, version DESC LIMIT 1""",
            (study_key, target, job_id),
        )
        return self._alert_record(rows[0]) if rows else None

    def latest_alerts(self, study_key: str, target: str) -> dict[str, AlertRecord]:
        """The latest alert decision for ``target`` of each series of the study (sent or
        not: its answer), by SeriesInstanceUID."""
        rows = self._query(  # a version's final after its preliminary (created later)
            """SELECT * FROM alerts WHERE study_key = ? AND target = ?
            ORDER BY version, created_at""",
            (study_key, target),
        )
        return {str(r["series_instance_uid"]): self._alert_record(r) for r in rows}

    def record_alerts(
        self,
        alerts: list[AlertRecord],
        prefix: str,
        now: float,
        expected: dict[str, str | None] | None = None,
        *,
        unless_job: str = "",
    ) -> int:
        """Record alerts and their delivery rows (``prefix + target``) in one transaction.

        An alert already recorded for the same job and target is left as it is
        (a job run again after a crash): exactly one per target per version.
        ``expected`` (target -> key of the study's latest alert the decision was
        made on, ``None`` for none) is checked in the same transaction, so that two
        series of one study read side by side never both send a first alert.
        With ``unless_job``, nothing is recorded when that job exists (a preliminary
        alert of a version that is complete meanwhile). Returns how many were new.

        Raises
        ------
        AlertsChanged
            When a target's latest study alert is no longer the expected one
            (nothing is recorded; the caller decides again).
        """
        n = 0
        with self.transaction() as db:
            if (
                unless_job
                and db.execute("SELECT 1 FROM jobs WHERE job_id = ?", (unless_job,)).fetchone()
            ):
                return 0
            for a in alerts:
                if expected is None or a.target not in expected or not a.study_key:
                    continue
                row = db.execute(
                    """SELECT key FROM alerts WHERE study_key = ? AND target = ?
                    AND job_id != ? AND status != '' ORDER BY created_at DESC, version DESC
                    LIMIT 1""",
                    (a.study_key, a.target, a.job_id),
                ).fetchone()
                if (None if row is None else str(row["key"])) != expected[a.target]:
                    raise AlertsChanged(f"another alert to {a.target} about this study")
            for a in alerts:
                cur = db.execute(
                    """INSERT INTO alerts (job_id, target, series_instance_uid, version,
                        key, status, supersedes, positive_labels, last_received_at, created_at,
                        study_key)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
                    (a.job_id, a.target, a.series_instance_uid, a.version, a.key, a.status,
                     a.supersedes, ",".join(a.positive_labels), a.last_received_at,
                     a.created_at, a.study_key),
                )  # fmt: skip
                if cur.rowcount and a.status:  # a decision to send nothing has no delivery
                    n += 1
                    db.execute(
                        """INSERT INTO deliveries (job_id, destination, state, next_at,
                            n_files, created_at, updated_at)
                        VALUES (?, ?, 'pending', ?, 1, ?, ?) ON CONFLICT DO NOTHING""",
                        (a.job_id, prefix + a.target, now, now, now),
                    )
        return n

    def alert_accepted(self, job_id: str, target: str, now: float) -> None:
        """Record when the target accepted the alert (the first time only)."""
        with self.transaction() as db:
            db.execute(
                """UPDATE alerts SET accepted_at = COALESCE(accepted_at, ?)
                WHERE job_id = ? AND target = ?""",
                (now, job_id, target),
            )
            db.execute(
                """UPDATE series_reads SET first_alert_at = ?
                WHERE job_id = ? AND first_alert_at IS NULL""",
                (now, job_id),
            )

    # -- streaming reads -------------------------------------------------------------

    def lease_stream(self, series_instance_uid: str, worker: str, now: float, until: float) -> bool:
        """Take or renew the in-progress lease of a series for ``worker`` until ``until``.

        Granted when no one holds it, when ``worker`` does, or when the holder's
        lease ended before ``now``; one atomic statement, so two workers (two hosts
        on PostgreSQL) never both get it. Returns whether ``worker`` holds it now.
        """
        with self.transaction() as db:
            cur = db.execute(
                """INSERT INTO streams (series_instance_uid, worker, lease_until, since)
                VALUES (?, ?, ?, ?)
                ON CONFLICT (series_instance_uid) DO UPDATE SET
                    since = CASE WHEN streams.worker = excluded.worker THEN streams.since
                        ELSE excluded.since END,
                    worker = excluded.worker, lease_until = excluded.lease_until
                WHERE streams.worker = excluded.worker OR streams.lease_until < ?""",
                (series_instance_uid, worker, until, now, now),
            )
            return int(cur.rowcount) == 1

    def release_stream(self, series_instance_uid: str, worker: str) -> None:
        """End ``worker``'s in-progress lease of a series (nothing when another holds it)."""
        with self.transaction() as db:
            db.execute(
                "DELETE FROM streams WHERE series_instance_uid = ? AND worker = ?",
                (series_instance_uid, worker),
            )

    def streams(self) -> list[StreamLease]:
        """Every in-progress lease, live or ended, oldest first."""
        rows = self._query("SELECT * FROM streams ORDER BY since, series_instance_uid")
        return [StreamLease(**dict(r)) for r in rows]

    # -- heartbeats and counts ---------------------------------------------------

    def heartbeat(self, name: str, pid: int, now: float) -> None:
        with self.transaction() as db:
            db.execute(
                """INSERT INTO heartbeats (name, pid, at) VALUES (?, ?, ?)
                ON CONFLICT(name) DO UPDATE SET pid = excluded.pid, at = excluded.at""",
                (name, pid, now),
            )

    def heartbeats(self) -> dict[str, tuple[int, float]]:
        return {
            r["name"]: (int(r["pid"]), float(r["at"]))
            for r in self._query("SELECT * FROM heartbeats")
        }

    def forget_heartbeat(self, name: str) -> None:
        """A process stopped cleanly: it is gone now, not only once its beat is stale."""
        with self.transaction() as db:
            db.execute("DELETE FROM heartbeats WHERE name = ?", (name,))

    def probe_write(self) -> None:
        """Write a row and roll it back: raises when the store cannot be written now.

        For ``health``: the database file or role must allow writes, the disk take
        them; nothing is left.
        """

        class _Rollback(Exception):
            pass

        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO heartbeats (name, pid, at) VALUES (?, 0, 0)",
                    (f".health-probe.{os.getpid()}",),
                )
                raise _Rollback
        except _Rollback:
            pass

    def parked_deliveries(self, before: float) -> list[DeliveryRecord]:
        """Deliveries (results and alerts) parked at or before ``before``, oldest first."""
        rows = self._query(
            """SELECT * FROM deliveries WHERE state = 'parked' AND updated_at <= ?
            ORDER BY updated_at""",
            (before,),
        )
        return [DeliveryRecord(**dict(r)) for r in rows]

    def skipped_series(self, limit: int) -> list[tuple[str, str, str, float]]:
        """The latest series not read, with why: (UID, state, reason, when), newest first."""
        rows = self._query(
            """SELECT series_instance_uid, state, reason, last_at FROM series
            WHERE state IN ('skipped', 'capped') ORDER BY last_at DESC LIMIT ?""",
            (limit,),
        )
        return [
            (str(r["series_instance_uid"]), str(r["state"]), str(r["reason"]), float(r["last_at"]))
            for r in rows
        ]

    def counts(self, table: Literal["series", "jobs", "deliveries"]) -> dict[str, int]:
        """Rows per state of ``series``, ``jobs`` or ``deliveries``."""
        if table not in ("series", "jobs", "deliveries"):
            raise ValueError(f"table must be series, jobs or deliveries, got {table!r}")
        rows = self._query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    def series_states(self) -> dict[str, SeriesState]:
        """The state of every series, by SeriesInstanceUID (for ``status``)."""
        rows = self._query("SELECT series_instance_uid, state FROM series")
        return {r["series_instance_uid"]: r["state"] for r in rows}

    def n_instances(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"])

    # -- content identity (re-sends) ----------------------------------------------

    def instance_identities(
        self, series_instance_uid: str, received_by: float | None = None
    ) -> list[InstanceIdentity]:
        """Path, digest and content identity of each instance of a series (by path).

        With ``received_by``, only those received by then (a version's instances).
        A path outside ``storage.dir/spool`` is left out, logged and counted, as by
        :meth:`instance_paths`.
        """
        sql = """SELECT path, digest, content_id FROM instances
            WHERE series_instance_uid = ?"""
        params: tuple[object, ...] = (series_instance_uid,)
        if received_by is not None:
            sql += " AND received_at <= ?"
            params = (series_instance_uid, received_by)
        rows = self._query(sql + " ORDER BY path", params)
        found = [
            InstanceIdentity(self._to_path(str(r["path"])), str(r["digest"]), str(r["content_id"]))
            for r in rows
        ]
        # Only files inside storage.dir/spool are ever opened (see instance_paths).
        kept = set(self._confined([i.path for i in found]))
        return [i for i in found if i.path in kept]

    def set_content_ids(self, content_ids: dict[Path, str]) -> None:
        """Remember the content identity of instance files (a cache: by path).

        The path holds the digest of the copy (``<sop>.<digest>.dcm``), so an
        identity computed from a file replaced since is never stored on its successor.
        """
        if not content_ids:
            return
        with self.transaction() as db:
            db.executemany(
                "UPDATE instances SET content_id = ? WHERE path = ?",
                [(cid, str(path)) for path, cid in content_ids.items()],
            )

    def latest_job(self, series_instance_uid: str) -> JobRecord | None:
        """The job of the highest version of a series, or ``None``."""
        rows = self._query(
            """SELECT * FROM jobs WHERE series_instance_uid = ?
            ORDER BY version DESC LIMIT 1""",
            (series_instance_uid,),
        )
        return JobRecord(**dict(rows[0])) if rows else None

    def settle_series(
        self, series_instance_uid: str, n_read: int, reason: str, seen_last_at: float | None = None
    ) -> None:
        """Record that a series holds what its last read answered: no new version.

        Its state goes back to ``queued`` (read; its latest job tells how far) with
        ``reason``; it stays ``receiving`` when an instance came after
        ``seen_last_at`` or beyond ``n_read`` instances.
        """
        seen = float("inf") if seen_last_at is None else seen_last_at
        with self.transaction() as db:
            db.execute(
                """UPDATE series SET state = CASE WHEN n_instances > ? OR last_at > ?
                    THEN 'receiving' ELSE 'queued' END, n_read = ?, n_replaced = 0,
                    purged_at = NULL, reason = ?
                WHERE series_instance_uid = ?""",
                (n_read, seen, n_read, reason, series_instance_uid),
            )

    # -- timings (metrics) and retention ------------------------------------------

    def add_stage_times(self, job_id: str, times: dict[str, float], now: float) -> None:
        """Record the seconds each stage of a job attempt took (for the metrics)."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO stage_times (job_id, stage, seconds, at) VALUES (?, ?, ?, ?)",
                [(job_id, stage, float(sec), now) for stage, sec in times.items()],
            )

    def count_refusals(self, counts: dict[str, tuple[int, str]], now: float) -> None:
        """Add ``{reason: (n, detail)}`` to the refusal counts (one transaction)."""
        if not counts:
            return
        with self.transaction() as db:
            for reason, (n, detail) in counts.items():
                db.execute(
                    """INSERT INTO refusals (reason, n, first_at, last_at, detail)
                    VALUES (?, ?, ?, ?, ?) ON CONFLICT (reason) DO UPDATE SET
                        n = refusals.n + excluded.n, last_at = excluded.last_at,
                        detail = excluded.detail""",
                    (reason, n, now, now, detail[:300]),
                )

    def refusals(self) -> dict[str, RefusalCount]:
        """The refusal counts by reason."""
        return {
            str(r["reason"]): RefusalCount(
                str(r["reason"]),
                int(r["n"]),
                float(r["first_at"]),
                float(r["last_at"]),
                str(r["detail"]),
            )
            for r in self._query("SELECT * FROM refusals ORDER BY reason")
        }

    def stage_times_after(self, last_id: int) -> list[tuple[int, str, float]]:
        """``(id, stage, seconds)`` rows recorded after row ``last_id``."""
        rows = self._query(
            "SELECT id, stage, seconds FROM stage_times WHERE id > ? ORDER BY id LIMIT 10000",
            (last_id,),
        )
        return [(int(r["id"]), str(r["stage"]), float(r["seconds"])) for r in rows]

    def instance_files(self) -> dict[str, str]:
        """Path → SOP Instance UID of every recorded instance (recovery checks)."""
        return {
            r["path"]: r["sop_instance_uid"]
            for r in self._query("SELECT path, sop_instance_uid FROM instances")
        }

    def forget_instance(self, path: str) -> None:
        """Drop the instance row of a file that is gone (recovery), keeping the counts right."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT series_instance_uid FROM instances WHERE path = ?", (path,)
            ).fetchone()
            if row is None:
                return
            db.execute("DELETE FROM instances WHERE path = ?", (path,))
            db.execute(
                """UPDATE series
                SET n_instances = CASE WHEN n_instances > 0 THEN n_instances - 1 ELSE 0 END
                WHERE series_instance_uid = ?""",
                (row["series_instance_uid"],),
            )

    def expired_series(self, cutoff: float) -> list[str]:
        """Series last touched before ``cutoff`` whose every job and delivery is finished.

        Finished: the series was skipped, or each of its jobs is ``done`` and each
        delivery ``done``. Parked work is kept until an admin resends it.
        """
        rows = self._query(
            f"SELECT s.series_instance_uid FROM series s WHERE {_EXPIRED}", (cutoff,)
        )
        return [str(r["series_instance_uid"]) for r in rows]

    def purge_series(
        self, series_instance_uid: str, now: float | None = None, cutoff: float | None = None
    ) -> list[Path] | None:
        """Forget a purged series' instances; keep its UIDs, state and timings.

        Its counts start again from zero (they count the instances the node holds),
        and ``purged_at`` (``now``, else its last activity) marks that what comes
        next is a re-send of a series already answered (see the results ledger).

        With ``cutoff``, the series is purged only if it is still expired at
        ``cutoff`` (:meth:`expired_series`), checked in the transaction that purges
        it: an instance recorded since the caller looked (a late instance, a
        re-send) keeps the series and every row of it.

        Returns
        -------
        list of Path or None
            The files the forgotten rows named (inside the spool, see
            :meth:`instance_paths`), for the caller to remove now that no row names
            them; ``None`` when the series was not purged.
        """
        with self.transaction() as db:
            if cutoff is not None:
                still = db.execute(
                    f"SELECT 1 FROM series s WHERE s.series_instance_uid = ? AND {_EXPIRED}",
                    (series_instance_uid, cutoff),
                ).fetchone()
                if still is None:
                    return None
            recorded = [
                str(r["path"])
                for r in db.execute(
                    "SELECT path FROM instances WHERE series_instance_uid = ?",
                    (series_instance_uid,),
                )
            ]
            db.execute(
                "DELETE FROM instances WHERE series_instance_uid = ?", (series_instance_uid,)
            )
            db.execute(
                """UPDATE series SET state = 'purged', body_part = '', study_description = '',
                    series_description = '', n_instances = 0, n_read = 0, n_replaced = 0,
                    purged_at = COALESCE(?, last_at)
                WHERE series_instance_uid = ?""",
                (now, series_instance_uid),
            )
        return self._confined([self._to_path(path) for path in sorted(recorded)])

    def results_expired(self, job_id: str, cutoff: float) -> bool:
        """Whether a job's results folder may go: done, delivered everywhere, old enough."""
        rows = self._query(
            """SELECT 1 FROM jobs j WHERE j.job_id = ? AND j.state = 'done' AND j.updated_at < ?
            AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = j.job_id
                AND (d.state != 'done' OR d.updated_at >= ?))""",
            (job_id, cutoff, cutoff),
        )
        return bool(rows)
