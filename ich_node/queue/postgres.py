"""The node's durable state in PostgreSQL: one store that several hosts share.

Chosen with ``storage.database: postgresql://USER@HOST:PORT/DB``. It implements
the same interfaces as the embedded SQLite store (:mod:`ich_node.queue.interface`)
with the same SQL semantics: :class:`PgStore` runs :class:`ich_node.queue.store.Store`'s
statements on PostgreSQL through psycopg 3 and its connection pool, and
:class:`PgJobQueue` is :class:`ich_node.queue.jobs.JobQueue` with PostgreSQL's
row locks.

Concurrency (what replaces SQLite's one writer at a time):

- Every write transaction but a lease takes one transaction-level advisory lock
  (``pg_advisory_xact_lock``), so read-then-write steps (recording an instance,
  bumping a series version) keep SQLite's ``BEGIN IMMEDIATE`` semantics across
  hosts, and a series version is decided once even when its instances arrive at
  two listeners.
- A lease takes a job with ``SELECT … FOR UPDATE SKIP LOCKED`` (no global lock),
  and every change to a leased job first locks its row, so two workers never hold
  one job and a lease that expired cannot be completed by its old holder.
- ``NOTIFY ich_node_jobs`` is sent when a job becomes runnable; idle workers
  ``LISTEN`` and wake at once instead of waiting for their poll interval.
- One assembler at a time in the whole cluster decides complete series
  (:meth:`PgStore.assembly_turn`, a session advisory lock tried once per pass).

The schema is versioned (:data:`MIGRATIONS`); :func:`migrate` applies the missing
ones at start under a session advisory lock, and refuses a database whose schema
is newer than this code (:class:`SchemaTooNew`). Times are seconds since the epoch
(``DOUBLE PRECISION``), passed in by callers as with SQLite.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import psycopg
import psycopg.rows
import structlog
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from ich_node.config import QueueSection, StorageSection
from ich_node.durable import fsync_dir
from ich_node.queue.interface import (
    HEARTBEAT_STALE_SECONDS,
    AddResult,
    DeliveryRecord,
    DeliveryState,
    InstanceRecord,
    JobRecord,
    StoreUnusable,
)
from ich_node.queue.jobs import NOT_STREAMED_ELSEWHERE, STREAM_AFFINITY_SECONDS, JobQueue, Released
from ich_node.queue.layout import StorageLayout
from ich_node.queue.store import Store

log = structlog.get_logger(__name__)
#: Advisory lock keys (one 64-bit namespace per purpose; "ICH" in the high bytes).
MIGRATION_LOCK: Final = 0x49434800_00000001
WRITE_LOCK: Final = 0x49434800_00000002
ASSEMBLY_LOCK: Final = 0x49434800_00000003
#: Seconds a sender holds a delivery it attempts; a sender that dies leaves it to
#: another after this (objects already accepted are not sent again).
DELIVERY_LEASE_SECONDS: Final = 300.0
#: Seconds a store call waits for a database connection before it raises.
POOL_TIMEOUT_SECONDS: Final = 5.0
#: The channel idle workers listen on.
JOBS_CHANNEL: Final = "ich_node_jobs"

#: Versioned schema migrations: index + 1 is the version. Append only; never edit one
#: that has shipped.
MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: the SQLite store's tables, with PostgreSQL types.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta VALUES ('store_id', gen_random_uuid()::text);
    CREATE TABLE instances (
        series_instance_uid TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL,
        path TEXT NOT NULL,
        size BIGINT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        digest TEXT NOT NULL DEFAULT '',
        acquisition TEXT NOT NULL DEFAULT '',
        images_in_acquisition INTEGER,
        series_related INTEGER,
        PRIMARY KEY (series_instance_uid, sop_instance_uid)
    );
    CREATE INDEX instances_sop ON instances(sop_instance_uid);
    CREATE INDEX instances_path ON instances(path);
    CREATE TABLE series (
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
        first_at DOUBLE PRECISION NOT NULL,
        last_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL,
        version INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX series_state ON series(state, last_at);
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        series_instance_uid TEXT NOT NULL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION,
        worker TEXT,
        reason TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        stage TEXT NOT NULL DEFAULT '',
        crash_returns INTEGER NOT NULL DEFAULT 0,
        cause TEXT NOT NULL DEFAULT '',
        sr_study_uid TEXT NOT NULL DEFAULT '',
        sr_series_uid TEXT NOT NULL DEFAULT '',
        sr_sop_class_uid TEXT NOT NULL DEFAULT '',
        sr_sop_uid TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX jobs_state ON jobs(state, not_before);
    CREATE INDEX jobs_series ON jobs(series_instance_uid, version);
    CREATE TABLE deliveries (
        job_id TEXT NOT NULL,
        destination TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at DOUBLE PRECISION NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        n_files INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (job_id, destination)
    );
    CREATE INDEX deliveries_state ON deliveries(state, next_at);
    CREATE TABLE accepted_objects (
        job_id TEXT NOT NULL,
        destination TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (job_id, destination, sop_instance_uid)
    );
    CREATE TABLE heartbeats (
        name TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE stage_times (
        id BIGSERIAL PRIMARY KEY,
        job_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        seconds DOUBLE PRECISION NOT NULL,
        at DOUBLE PRECISION NOT NULL
    );
    """,
    # 2: alerts (ich_node.delivery): one per job and target, sent through deliveries.
    """
    CREATE TABLE alerts (
        job_id TEXT NOT NULL,
        target TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        version INTEGER NOT NULL,
        key TEXT NOT NULL,
        status TEXT NOT NULL,
        supersedes TEXT,
        positive_labels TEXT NOT NULL,
        last_received_at DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        accepted_at DOUBLE PRECISION,
        PRIMARY KEY (job_id, target)
    );
    CREATE INDEX alerts_series ON alerts(series_instance_uid, target, version);
    """,
    # 3: who holds each claimed delivery, so that a dead host's claims go to others
    # once its heartbeat is stale instead of after the whole lease.
    """
    CREATE TABLE delivery_claims (
        job_id TEXT NOT NULL,
        destination TEXT NOT NULL,
        holder TEXT NOT NULL,
        PRIMARY KEY (job_id, destination)
    );
    CREATE INDEX delivery_claims_holder ON delivery_claims(holder);
    """,
    # 4: the results ledger: one row per series version read, kept beyond retention.
    """
    CREATE TABLE series_reads (
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
        coverage_complete BOOLEAN NOT NULL,
        n_notes INTEGER NOT NULL DEFAULT 0,
        first_received_at DOUBLE PRECISION,
        completed_at DOUBLE PRECISION,
        read_at DOUBLE PRECISION,
        first_alert_at DOUBLE PRECISION,
        first_delivery_at DOUBLE PRECISION,
        sr_series_instance_uid TEXT NOT NULL DEFAULT '',
        sr_sop_class_uid TEXT NOT NULL DEFAULT '',
        sr_sop_instance_uid TEXT NOT NULL DEFAULT '',
        cause TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX series_reads_series ON series_reads(series_instance_uid, version);
    CREATE INDEX series_reads_study ON series_reads(study_instance_uid);
    CREATE INDEX series_reads_accession ON series_reads(accession_number);
    """,
    # 5: content identity of re-sends: each instance's (cached once computed), when a
    # series' images were purged, and the ledger's fingerprint of the bytes.
    """
    ALTER TABLE instances ADD COLUMN content_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE series ADD COLUMN purged_at DOUBLE PRECISION;
    ALTER TABLE series_reads ADD COLUMN bytes_fingerprint TEXT NOT NULL DEFAULT '';
    """,
    # 6: what the node refused, by reason (status and health show them).
    """
    CREATE TABLE refusals (
        reason TEXT PRIMARY KEY,
        n BIGINT NOT NULL,
        first_at DOUBLE PRECISION NOT NULL,
        last_at DOUBLE PRECISION NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    """,
    # 7: alerts per study (AccessionNumber, else StudyInstanceUID), not per series.
    """
    ALTER TABLE alerts ADD COLUMN study_key TEXT NOT NULL DEFAULT '';
    CREATE INDEX alerts_study ON alerts(study_key, target, created_at);
    """,
    # 8: the results ledger for `ich-node audit`: where each threshold came from
    # (bundle or site), node.mode of the read, when the probabilities were known.
    """
    ALTER TABLE series_reads ADD COLUMN threshold_sources TEXT NOT NULL DEFAULT '';
    ALTER TABLE series_reads ADD COLUMN mode TEXT NOT NULL DEFAULT 'live';
    ALTER TABLE series_reads ADD COLUMN result_at DOUBLE PRECISION;
    CREATE INDEX series_reads_read_at ON series_reads(read_at);
    """,
    # 9: in-progress leases of series read while they arrive (series.streaming).
    """
    CREATE TABLE streams (
        series_instance_uid TEXT PRIMARY KEY,
        worker TEXT NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        since DOUBLE PRECISION NOT NULL
    );
    """,
)

#: The schema version this code writes and reads.
SCHEMA_VERSION: Final = len(MIGRATIONS)


#: The tables the migrations create (the store's tables on PostgreSQL).
TABLES: Final = (
    *(n for m in MIGRATIONS for n in re.findall(r"CREATE TABLE (\w+)", m) if n != "meta"),
    "meta",
    "ich_schema_migrations",
)


class SchemaTooNew(StoreUnusable):
    """The database's schema is newer than this code: upgrade ich-node on this host."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


#: Words of libpq's connection errors that an admin must fix (exit 2): a wrong
#: role, database or password, an address pg_hba.conf refuses, TLS settings.
#: Anything else (refused, timed out, the server starting up) may pass (exit 1).
_CONFIG_ERRORS: Final = (
    "password authentication failed",
    "authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
    "no password supplied",
    "certificate",
    "SSL",
    "invalid",
)


def store_problem(exc: BaseException, url: str) -> StoreUnusable:
    """``exc``, raised while opening the store at ``url``, as one line and an exit code.

    2 for what an admin must fix (:data:`_CONFIG_ERRORS`, a missing privilege, an
    unreadable password file), 1 for a database that does not answer now.
    """
    if isinstance(exc, StoreUnusable):
        return exc
    where = f"storage.database {_display(url)}"
    if isinstance(exc, OSError):  # storage.database_password_file
        return StoreUnusable(f"storage.database_password_file: {exc}", 2)
    text = " ".join(str(exc).split())[:300]
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return StoreUnusable(f"{where}: {text}", 2)
    if isinstance(exc, psycopg.OperationalError):
        code = 2 if any(w in text for w in _CONFIG_ERRORS) else 1
        return StoreUnusable(f"{where}: {text}", code)
    return StoreUnusable(f"{where}: {type(exc).__name__}: {text}", 2)


def _display(url: str) -> str:
    """The URL as it can be printed (it never holds a password: see the config)."""
    return url.split("?", 1)[0]


class _Row:
    """A result row read by name (``row["state"]``), position (``row[0]``) or ``dict(row)``.

    It behaves like :class:`sqlite3.Row`, so the store's code reads rows of both
    backends the same way.
    """

    __slots__ = ("_names", "_values")

    def __init__(self, names: tuple[str, ...], values: Sequence[Any]) -> None:
        self._names = names
        self._values = tuple(values)

    def keys(self) -> tuple[str, ...]:
        return self._names

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, int):
            return self._values[key]
        return self._values[self._names.index(key)]


def _row_factory(cursor: Any) -> Any:
    names = tuple(c.name for c in cursor.description or ())

    def make(values: Sequence[Any]) -> _Row:
        return _Row(names, values)

    return make


def _sql(statement: str) -> str:
    """A statement of the store (``?`` placeholders) in psycopg's style (``%s``)."""
    return statement.replace("%", "%%").replace("?", "%s")


class _Db:
    """One connection inside a transaction, with the sqlite3-style ``execute`` the store uses."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, statement: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        cur = self.conn.cursor(row_factory=_row_factory)
        cur.execute(_sql(statement), tuple(params))
        return cur

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_sql(statement), [tuple(r) for r in rows])


def password(config: StorageSection) -> str | None:
    """The password in ``storage.database_password_file`` (first line), or ``None``.

    Raises
    ------
    OSError
        When the named file cannot be read.
    """
    if config.database_password_file is None:
        return None
    text = Path(config.database_password_file).read_text(encoding="utf-8")
    return text.splitlines()[0] if text else ""


#: TCP keepalives, both ways (seconds idle, between probes, probes): a host that
#: loses power is found dead within about a minute, so the session locks it held
#: (the assembly turn) go with it, instead of after the system default of ~2 h.
#: The server side is set per session (``tcp_keepalives_*`` are user settings).
KEEPALIVE: Final = (30, 10, 3)


def connect_kwargs(config: StorageSection) -> dict[str, Any]:
    """Keyword arguments for :func:`psycopg.connect` beside the URL.

    Autocommit, the password from ``storage.database_password_file``, a connect
    timeout, and TCP keepalives on both ends (:data:`KEEPALIVE`), added to any
    ``options`` the URL gives.
    """
    idle, interval, count = KEEPALIVE
    server = (
        f"-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval={interval} "
        f"-c tcp_keepalives_count={count}"
    )
    given = conninfo_to_dict(config.database or "").get("options")
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "application_name": "ich-node",
        "connect_timeout": int(POOL_TIMEOUT_SECONDS),
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": count,
        "options": f"{given} {server}" if given else server,
    }
    secret = password(config)
    if secret is not None:
        kwargs["password"] = secret
    return kwargs


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The highest migration applied to the database (0 for an empty one); reads only."""
    exists = conn.execute("SELECT to_regclass('ich_schema_migrations')").fetchone()
    if exists is None or exists[0] is None:
        return 0
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM ich_schema_migrations").fetchone()
    return int(row[0]) if row else 0


def _too_new(current: int) -> SchemaTooNew:
    return SchemaTooNew(
        f"storage.database: the database's schema is version {current}, this ich-node "
        f"knows up to {SCHEMA_VERSION}: upgrade ich-node on this host (never downgrade a "
        "shared database)"
    )


def _role(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    row = conn.execute("SELECT current_user, current_schema()").fetchone()
    return (str(row[0]), str(row[1])) if row else ("?", "?")


def check_schema(conn: psycopg.Connection[Any]) -> int:
    """The schema version, checked for a command that must not change it.

    Raises
    ------
    SchemaTooNew
        A schema newer than this code (exit 2).
    StoreUnusable
        An empty database (exit 1: the node has not run on it), or a schema older
        than this code (exit 2: ``serve`` of this version migrates it).
    """
    current = schema_version(conn)
    if current > SCHEMA_VERSION:
        raise _too_new(current)
    if current == 0:
        raise StoreUnusable(
            "storage.database: the database holds no node store yet (has the node ever run on it?)",
            1,
        )
    if current < SCHEMA_VERSION:
        raise StoreUnusable(
            f"storage.database: the database's schema is version {current}, this ich-node "
            f"needs {SCHEMA_VERSION}: `ich-node serve` of this version migrates it",
            2,
        )
    return current


def check_privileges(conn: psycopg.Connection[Any], *, write: bool) -> None:
    """Raise when the connected role cannot read (and with ``write``, change) every table.

    Sequences need USAGE (``stage_times``' ids). Checked at open, so that a role
    granted too little exits 2 with what is missing, not at its first write.

    Raises
    ------
    StoreUnusable
        Naming the role, the first tables and the privileges missing (exit 2).
    """
    wanted = ["SELECT", "INSERT", "UPDATE", "DELETE"] if write else ["SELECT"]
    # has_table_privilege('A, B') is true when any one is held: one row per privilege.
    rows = conn.execute(
        """SELECT c.relname, p.priv FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN unnest(%s::text[]) AS p(priv)
        WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname = ANY(%s)
        AND NOT has_table_privilege(c.oid, p.priv)
        UNION ALL
        SELECT s.relname, 'USAGE' FROM pg_class s
        JOIN pg_depend d ON d.objid = s.oid AND d.classid = 'pg_class'::regclass
        JOIN pg_class t ON t.oid = d.refobjid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE %s AND s.relkind = 'S' AND n.nspname = current_schema()
        AND t.relname = ANY(%s)
        AND CASE WHEN s.relkind = 'S' THEN NOT has_sequence_privilege(s.oid, 'USAGE, UPDATE')
            ELSE false END
        ORDER BY 1, 2""",
        (wanted, list(TABLES), write, list(TABLES)),
    ).fetchall()
    if rows:
        user, schema = _role(conn)
        missing: dict[str, list[str]] = {}
        for name, priv in rows:
            missing.setdefault(str(name), []).append(str(priv))
        names = "; ".join(f"{', '.join(p)} on {t}" for t, p in list(missing.items())[:3])
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise StoreUnusable(
            f"storage.database: role {user} lacks {names}{more} in schema {schema}: "
            "GRANT them (docs/deployment.md)",
            2,
        )


def migrate(conn: psycopg.Connection[Any], now: float) -> int:
    """Apply the missing migrations, under a session advisory lock; returns the version.

    Several processes starting together wait for each other on the lock; each
    migration is one transaction. A database already at :data:`SCHEMA_VERSION` is
    only read: a role with privileges on the tables alone can serve it.

    Raises
    ------
    SchemaTooNew
        When the database's schema is newer than :data:`SCHEMA_VERSION`.
    StoreUnusable
        When migrations are due and the role may not create tables (exit 2).
    """
    current = schema_version(conn)
    if current > SCHEMA_VERSION:
        raise _too_new(current)
    if current == SCHEMA_VERSION:
        return current
    _check_can_migrate(conn, current)
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        conn.execute(
            """CREATE TABLE IF NOT EXISTS ich_schema_migrations (
                version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"""
        )
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise _too_new(current)
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with conn.transaction():
                conn.execute(MIGRATIONS[version - 1])
                conn.execute("INSERT INTO ich_schema_migrations VALUES (%s, %s)", (version, now))
        return SCHEMA_VERSION
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def _check_can_migrate(conn: psycopg.Connection[Any], current: int) -> None:
    """Raise when migrations are due and the role may not create tables."""
    row = conn.execute("SELECT has_schema_privilege(current_schema(), 'CREATE')").fetchone()
    if not (row and row[0]):
        user, schema = _role(conn)
        raise StoreUnusable(
            f"storage.database: the schema is at version {current}, this ich-node needs "
            f"{SCHEMA_VERSION}, and role {user} may not create tables in schema {schema}: "
            "start the node once as the database owner, or GRANT CREATE ON SCHEMA "
            f"{schema} TO {user}",
            2,
        )


def check_for_serve(config: StorageSection) -> int:
    """What ``serve`` would find opening the store, found without changing anything.

    For ``check-config``: connects, reads the schema version and checks the role's
    privileges (to migrate when the schema is behind, on the tables when it is
    not); returns the schema version (0: empty, ``serve`` creates it).

    Raises
    ------
    StoreUnusable
        As :class:`PgStore` would at ``serve``'s start (see :func:`store_problem`).
    """
    url = config.database or ""
    try:
        with psycopg.connect(url, **connect_kwargs(config)) as conn:
            current = schema_version(conn)
            if current > SCHEMA_VERSION:
                raise _too_new(current)
            if current < SCHEMA_VERSION:
                _check_can_migrate(conn, current)
            if current > 0:
                check_privileges(conn, write=True)
            return current
    except Exception as exc:  # one line and an exit code, never a traceback
        raise store_problem(exc, url) from None


_migrate = migrate  # PgStore's parameter of the same name hides it there


class PgStore(Store):
    """The node's store in a PostgreSQL database (see the module's notes).

    Parameters
    ----------
    config : StorageSection
        ``storage``: ``database`` (the URL, required), ``database_password_file``,
        ``database_pool_size``, ``dir`` (the shared spool and results).
    now : float
        The time recorded with migrations applied at open.
    migrate : bool
        Apply missing migrations (``serve``); ``False`` for the commands that
        must not change the database (``status``, ``health``, ``check-config``,
        ``resend``): the schema must then be this code's.
    write : bool
        Whether the role must be able to change every table (checked at open).

    Raises
    ------
    StoreUnusable
        When the database cannot be used, with its exit code (see
        :func:`store_problem`): unreachable (1), empty when ``migrate`` is off
        (1), a schema newer (:class:`SchemaTooNew`) or older than this code, a
        role without the privileges it needs, a wrong password (2).
    """

    def __init__(
        self,
        config: StorageSection,
        *,
        now: float = 0.0,
        migrate: bool = True,
        write: bool = True,
    ) -> None:
        if config.database is None:
            raise ValueError("PgStore needs storage.database (a postgresql:// URL)")
        self.config = config
        self.url = config.database
        self.path = Path(config.dir)
        self._local = threading.local()
        self._listening: list[psycopg.Connection[Any]] = []  # LISTEN connections, per thread
        try:
            self._kwargs = connect_kwargs(config)
            with psycopg.connect(self.url, **self._kwargs) as conn:
                if migrate:
                    _migrate(conn, now)
                else:
                    check_schema(conn)
                check_privileges(conn, write=write)
                row = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
                self.store_id = str(row[0]) if row else ""
        except Exception as exc:  # one line and an exit code, never a traceback
            raise store_problem(exc, self.url) from None
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.url,
            min_size=1,
            max_size=config.database_pool_size,
            # Called for each new connection: a changed password file is read then,
            # so a rotated password needs no restart.
            kwargs=self._fresh_kwargs,
            open=True,
            name="ich-node",
            # A connection the database dropped (restart, failover) is replaced when
            # taken, so the node carries on once the database is back.
            check=ConnectionPool.check_connection,
            reconnect_timeout=float("inf"),
            # A call waits this long for a connection, then raises: a C-STORE is then
            # answered 0xA700 well within the peer's DIMSE timeout.
            timeout=POOL_TIMEOUT_SECONDS,
        )

    def _fresh_kwargs(self) -> dict[str, Any]:
        """:func:`connect_kwargs` read now; the last good ones when the file cannot be read."""
        try:
            self._kwargs = connect_kwargs(self.config)
        except OSError as exc:
            log.warning(
                "store.password_file_unreadable",
                key="storage.database_password_file",
                path=str(self.config.database_password_file),
                error=exc.strerror or type(exc).__name__,
                action="connecting with the password read before",
            )
        return self._kwargs

    @classmethod
    def open(cls, storage_dir: Path) -> Store:  # pragma: no cover - a URL is needed
        raise TypeError("open a PostgreSQL store with PgStore(config.storage)")

    def close(self) -> None:
        for conn in self._listening:
            conn.close()
        self._pool.close()

    @contextmanager
    def transaction(self) -> Iterator[_Db]:  # type: ignore[override]
        """A write transaction holding :data:`WRITE_LOCK`; nested calls join the outer one."""
        with self._transaction(write_lock=True) as db:
            yield db

    @contextmanager
    def row_transaction(self) -> Iterator[_Db]:
        """A transaction without the global write lock (leases: row locks only)."""
        with self._transaction(write_lock=False) as db:
            yield db

    @contextmanager
    def _transaction(self, *, write_lock: bool) -> Iterator[_Db]:
        """The thread's transaction: nested calls join the outer one (and its lock)."""
        current: _Db | None = getattr(self._local, "db", None)
        if current is not None:
            yield current
            return
        with self._pool.connection() as conn, conn.transaction():
            db = _Db(conn)
            if write_lock:
                db.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
            self._local.db = db
            try:
                yield db
            finally:
                self._local.db = None

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        current: _Db | None = getattr(self._local, "db", None)
        if current is not None:
            return list(current.execute(sql, params).fetchall())
        with self._pool.connection() as conn:
            return list(_Db(conn).execute(sql, params).fetchall())

    # -- paths: relative to storage.dir in the database ---------------------------
    # Every host mounts the shared storage.dir, perhaps at another mount point: the
    # database holds paths relative to it and each host resolves them under its own.

    def _relative(self, path: Path | str) -> str:
        try:
            return str(Path(path).relative_to(self.path))
        except ValueError:  # outside storage.dir (never written by the spool): as given
            return str(path)

    def _absolute(self, path: Path | str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.path / p

    def add_instance(
        self, record: InstanceRecord, path: Path, size: int, now: float, digest: str = ""
    ) -> AddResult:
        result = super().add_instance(record, Path(self._relative(path)), size, now, digest)
        if result.replaced_path is None:
            return result
        return AddResult(result.added, self._absolute(result.replaced_path), result.reused_in)

    @property
    def storage_dir(self) -> Path:
        return self.path

    def _to_path(self, recorded: str) -> Path:
        return self._absolute(recorded)

    def instance_files(self) -> dict[str, str]:
        return {str(self._absolute(p)): uid for p, uid in super().instance_files().items()}

    def set_content_ids(self, content_ids: dict[Path, str]) -> None:
        super().set_content_ids({Path(self._relative(p)): c for p, c in content_ids.items()})

    def forget_instance(self, path: str) -> None:
        super().forget_instance(self._relative(path))

    def lease_stream(self, series_instance_uid: str, worker: str, now: float, until: float) -> bool:
        # One atomic upsert: its row lock is enough, not the global write lock.
        with self.row_transaction():
            return super().lease_stream(series_instance_uid, worker, now, until)

    def release_stream(self, series_instance_uid: str, worker: str) -> None:
        with self.row_transaction():
            super().release_stream(series_instance_uid, worker)

    def notify_jobs(self) -> None:
        """Wake idle workers (sent when the current transaction commits)."""
        with self.row_transaction() as db:
            db.execute(f"NOTIFY {JOBS_CHANNEL}")

    def queue_series(self, *args: Any, **kwargs: Any) -> JobRecord:
        with self.transaction():
            job = super().queue_series(*args, **kwargs)
            self.notify_jobs()
            return job

    # A claimed delivery whose holder's heartbeat is stale (the host died while
    # sending): due again at once, without waiting for the rest of its lease.
    _ORPHANED = """EXISTS (SELECT 1 FROM delivery_claims c
        WHERE c.job_id = deliveries.job_id AND c.destination = deliveries.destination
        AND NOT EXISTS (SELECT 1 FROM heartbeats h WHERE h.name = c.holder AND h.at >= ?))"""

    def due_deliveries(self, now: float) -> list[DeliveryRecord]:
        """Deliveries due at ``now``: past ``next_at``, or claimed by a dead sender."""
        rows = self._query(
            f"""SELECT * FROM deliveries WHERE state IN ('pending', 'retry')
            AND (next_at <= ? OR {self._ORPHANED}) ORDER BY next_at""",
            (now, now - HEARTBEAT_STALE_SECONDS),
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
        """Lease a due delivery to ``holder``: its ``next_at`` moves past the lease.

        Exactly one sender of the cluster gets ``True`` for a due delivery. The
        lease is ``lease_seconds`` (at least :data:`DELIVERY_LEASE_SECONDS`; the
        sender gives more when one attempt may take longer, so that a slow live
        sender is never doubled). A sender that dies before :meth:`finish_delivery`
        (the ack) leaves it due again when ``holder``'s heartbeat is older than
        :data:`ich_node.queue.interface.HEARTBEAT_STALE_SECONDS`, or when
        :meth:`release_claims` runs at its restart; an anonymous holder (``""``)
        only when the lease ends.
        """
        lease = max(DELIVERY_LEASE_SECONDS, lease_seconds or 0.0)
        with self.row_transaction() as db:
            cur = db.execute(
                f"""UPDATE deliveries SET next_at = ? WHERE job_id = ? AND destination = ?
                AND state IN ('pending', 'retry') AND (next_at <= ? OR {self._ORPHANED})""",
                (now + lease, job_id, destination, now, now - HEARTBEAT_STALE_SECONDS),
            )
            if cur.rowcount != 1:
                return False
            if holder:
                db.execute(
                    """INSERT INTO delivery_claims VALUES (?, ?, ?)
                    ON CONFLICT (job_id, destination) DO UPDATE SET holder = excluded.holder""",
                    (job_id, destination, holder),
                )
            else:
                db.execute(
                    "DELETE FROM delivery_claims WHERE job_id = ? AND destination = ?",
                    (job_id, destination),
                )
            return True

    def finish_delivery(
        self,
        job_id: str,
        destination: str,
        state: DeliveryState,
        reason: str,
        next_at: float,
        now: float,
    ) -> None:
        """Record an attempt's outcome (the ack of :meth:`claim_delivery`); the claim ends."""
        with self.transaction() as db:
            super().finish_delivery(job_id, destination, state, reason, next_at, now)
            db.execute(
                "DELETE FROM delivery_claims WHERE job_id = ? AND destination = ?",
                (job_id, destination),
            )

    def release_delivery(self, job_id: str, destination: str, holder: str, now: float) -> None:
        """Give back ``holder``'s claim of one delivery without an outcome: due at ``now``.

        The sender calls it (in a ``finally``) when it claimed a delivery and could
        not attempt or record it, so that another pass takes it within seconds
        instead of after the claim's lease.
        """
        with self.transaction() as db:
            cur = db.execute(
                """DELETE FROM delivery_claims WHERE job_id = ? AND destination = ?
                AND holder = ?""",
                (job_id, destination, holder),
            )
            if cur.rowcount or not holder:
                db.execute(
                    """UPDATE deliveries SET next_at = ? WHERE job_id = ? AND destination = ?
                    AND state IN ('pending', 'retry') AND next_at > ?""",
                    (now, job_id, destination, now),
                )

    def release_claims(self, holder: str, now: float) -> int:
        """Make the deliveries ``holder`` claimed due now (its process restarted); their count."""
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE deliveries SET next_at = ? WHERE state IN ('pending', 'retry')
                AND (job_id, destination) IN
                    (SELECT job_id, destination FROM delivery_claims WHERE holder = ?)""",
                (now, holder),
            )
            db.execute("DELETE FROM delivery_claims WHERE holder = ?", (holder,))
            return int(cur.rowcount)

    @contextmanager
    def assembly_turn(self) -> Iterator[bool]:
        """Whether this process may decide complete series now (one assembler at a time).

        Yields ``True`` while this process holds :data:`ASSEMBLY_LOCK` (a session
        advisory lock, released at the end of the block), ``False`` when another
        node's assembler holds it.
        """
        with self._pool.connection() as conn:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (ASSEMBLY_LOCK,)).fetchone()
            held = bool(row and row[0])
            try:
                yield held
            finally:
                if held:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (ASSEMBLY_LOCK,))

    def wait_for_jobs(self, timeout: float) -> bool:
        """Block until a job is notified or ``timeout`` seconds pass; whether one was."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "listen", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.url, **self._fresh_kwargs())
            conn.execute(f"LISTEN {JOBS_CHANNEL}")
            self._local.listen = conn
            self._listening.append(conn)
        got = False
        for _ in conn.notifies(timeout=timeout, stop_after=1):
            got = True
        return got

    def place_store_id(self) -> bool:
        """Name this database in ``storage.dir`` once; afterwards only check that it is there.

        The first node to start on a new database writes ``.ich-node-store-id``
        (write, rename) and records in the database that it did. Every later start,
        on any host, only reads it: a host whose shared mount is missing sees the
        empty mount point instead, and writing the file there would make the local
        disk look like the shared storage (and the files the listener wrote there
        vanish under the mount when it comes back).

        Returns
        -------
        bool
            Whether ``storage.dir`` is this database's storage now
            (:meth:`storage_mounted`).
        """
        marker = StorageLayout(self.path).store_id
        if not self.storage_mounted():
            placed = self._query("SELECT value FROM meta WHERE key = 'store_id_placed'")
            if placed or marker.exists():  # not mounted, or another database's storage
                return False
            marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(self.store_id + "\n", encoding="utf-8")
            tmp.replace(marker)
            fsync_dir(marker.parent)
        # Also for a storage placed before this was recorded (older versions).
        with self._transaction(write_lock=True) as db:
            db.execute(
                "INSERT INTO meta VALUES ('store_id_placed', ?) ON CONFLICT (key) DO NOTHING",
                (str(marker),),
            )
        return True

    def storage_mounted(self) -> bool:
        """Whether ``storage.dir`` here is the spool of this database (its id file matches)."""
        try:
            text = StorageLayout(self.path).store_id.read_text(encoding="utf-8")
        except OSError:
            return False
        return text.strip() == self.store_id


class PgJobQueue(JobQueue):
    """The job queue on PostgreSQL: leases with ``FOR UPDATE SKIP LOCKED``.

    Every other step locks the job's row before it checks the lease, so a lease
    taken over by another worker (expired) is never completed by the old one.
    """

    store: PgStore

    def __init__(self, store: PgStore, config: QueueSection) -> None:
        super().__init__(store, config)

    def lease(self, worker: str, now: float) -> JobRecord | None:
        """Take the oldest runnable job (queued, due retry, or expired lease) no one is taking."""
        while True:
            with self.store.row_transaction() as db:
                row = db.execute(
                    f"""SELECT * FROM jobs WHERE ((state IN ('queued', 'retry') AND not_before <= ?)
                        OR (state = 'leased' AND lease_until < ?))
                        AND {NOT_STREAMED_ELSEWHERE}
                    ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED""",
                    (now, now, worker, now, now - STREAM_AFFINITY_SECONDS),
                ).fetchone()
                if row is None:
                    return None
                job = JobRecord(**dict(row))
                if self._park_if_exhausted(db, job, now):
                    continue
                leased = db.execute(
                    """UPDATE jobs SET state = 'leased', attempts = attempts + 1, stage = 'read',
                        lease_until = ?, worker = ?, updated_at = ? WHERE job_id = ?
                    RETURNING *""",
                    (now + self.config.lease_seconds, worker, now, job.job_id),
                ).fetchone()
                assert leased is not None  # the row is locked by this transaction
                return JobRecord(**dict(leased))

    def _check_lease(self, db: Any, job: JobRecord) -> None:
        db.execute("SELECT 1 FROM jobs WHERE job_id = ? FOR UPDATE", (job.job_id,))
        super()._check_lease(db, job)

    def give_back(self, job: JobRecord, now: float) -> None:
        with self.store.transaction():
            super().give_back(job, now)
            self.store.notify_jobs()

    def release_worker(self, worker: str, reason: str, now: float) -> Released:
        with self.store.transaction() as db:
            db.execute(
                "SELECT 1 FROM jobs WHERE state = 'leased' AND worker = ? FOR UPDATE", (worker,)
            )
            released = super().release_worker(worker, reason, now)
            if released:
                self.store.notify_jobs()
            return released

    def requeue(self, job_id: str, now: float) -> bool:
        with self.store.transaction():
            done = super().requeue(job_id, now)
            if done:
                self.store.notify_jobs()
            return done


#: The tables copied from an embedded store, in an order that keeps references valid.
_COPIED_TABLES: Final = (
    "series",
    "instances",
    "jobs",
    "deliveries",
    "accepted_objects",
    "alerts",
    "series_reads",
    "stage_times",
    "refusals",
)


class NotEmpty(RuntimeError):
    """The PostgreSQL database already holds a node's data: nothing was copied."""


def copy_from_sqlite(sqlite_path: Path, target: PgStore) -> dict[str, int]:
    """Copy an embedded SQLite store into an empty PostgreSQL store, in one transaction.

    Instance paths become relative to ``storage.dir`` (the shared spool keeps its
    files where they are). Heartbeats are not copied (they belong to processes
    that are gone). Returns rows copied per table.

    Raises
    ------
    NotEmpty
        When the target already holds instances, series or jobs.
    FileNotFoundError
        When ``sqlite_path`` does not exist.
    """
    import sqlite3

    if not Path(sqlite_path).is_file():
        raise FileNotFoundError(f"no SQLite store at {sqlite_path}")
    source_store = Store(Path(sqlite_path))  # brings an old store's schema up to date
    source_store.close()
    source = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    source.row_factory = sqlite3.Row
    copied: dict[str, int] = {}
    try:
        with target.transaction() as db:
            for table in ("instances", "series", "jobs"):
                row = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
                if row is not None and int(row[0]):
                    raise NotEmpty(
                        f"the PostgreSQL database already holds {table}: migrate into an "
                        "empty database"
                    )
            for table in _COPIED_TABLES:
                if not source.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
                ).fetchone():
                    continue
                target_columns = {
                    str(r[0])
                    for r in db.execute(
                        "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                        (table,),
                    ).fetchall()
                }
                rows = source.execute(f"SELECT * FROM {table}").fetchall()
                if not rows:
                    copied[table] = 0
                    continue
                names = rows[0].keys()  # a sqlite3.Row iterates over values, not names
                columns = [c for c in names if c in target_columns and c != "id"]
                values = []
                for r in rows:
                    item = {c: r[c] for c in columns}
                    if table == "instances":
                        item["path"] = target._relative(item["path"])
                    if table == "series_reads":  # SQLite's 0/1, PostgreSQL's BOOLEAN
                        item["coverage_complete"] = bool(item["coverage_complete"])
                    values.append(tuple(item[c] for c in columns))
                marks = ", ".join("?" for _ in columns)
                db.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", values
                )
                copied[table] = len(values)
    finally:
        source.close()
    return copied
