"""The one place that picks the store backend from ``storage.database``.

``storage.database: null`` (the default) is the embedded SQLite store in
``storage.dir`` (:class:`ich_node.queue.store.Store`, behaviour unchanged); a
``postgresql://`` URL is :class:`ich_node.queue.postgres.PgStore`, which several
hosts share. psycopg is imported only for the latter.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from ich_node.config import QueueSection, StorageSection
from ich_node.queue.interface import StoreUnusable
from ich_node.queue.jobs import JobQueue
from ich_node.queue.layout import StorageLayout
from ich_node.queue.store import Store

log = structlog.get_logger(__name__)


def _is_pg(store: object) -> bool:
    # A PgStore exists only once its module is imported: SQLite nodes never import psycopg.
    module = sys.modules.get("ich_node.queue.postgres")
    return module is not None and isinstance(store, module.PgStore)


def is_shared(config: StorageSection) -> bool:
    """Whether the store is a server database that several nodes share (PostgreSQL)."""
    return config.database is not None


def open_store(
    config: StorageSection,
    *,
    now: float | None = None,
    migrate: bool = True,
    write: bool = True,
) -> Store:
    """The node's store: SQLite in ``storage.dir``, or PostgreSQL at ``storage.database``.

    With ``migrate`` (``serve`` and its workers) a missing store is created and an
    older schema brought up to date (:func:`ich_node.queue.postgres.migrate`);
    without it the store is used as it is and must be this code's. ``write``
    (PostgreSQL): the role must be able to change every table.

    Raises
    ------
    StoreUnusable
        One line and an exit code (1: no store yet, or the database does not
        answer; 2: a file or database that cannot be used as configured: a newer
        schema (:class:`ich_node.queue.postgres.SchemaTooNew`), missing
        privileges, a wrong password).
    """
    if config.database is None:
        path = StorageLayout(Path(config.dir)).db
        if not migrate:
            return Store(path, migrate=False)
        try:
            return Store(path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnusable(f"storage.dir: {path}: cannot open the store: {exc}", 2) from None
    from ich_node.queue.postgres import PgStore

    return PgStore(config, now=time.time() if now is None else now, migrate=migrate, write=write)


def existing_store(config: StorageSection, *, write: bool = False) -> Store:
    """The store for the commands that must not change it (``status``, ``health``, ...).

    Never creates or migrates a schema: see :func:`open_store` (``migrate=False``)
    for what it raises; ``write``: the command changes rows (``resend``).
    """
    return open_store(config, migrate=False, write=write)


def job_queue(store: Store, config: QueueSection) -> JobQueue:
    """The job queue on ``store`` (row-locking leases on PostgreSQL)."""
    if _is_pg(store):
        from ich_node.queue.postgres import PgJobQueue, PgStore

        assert isinstance(store, PgStore)
        return PgJobQueue(store, config)
    return JobQueue(store, config)


def assembly_turn(store: Store) -> contextlib.AbstractContextManager[bool]:
    """Whether this process may decide complete series now (always, on SQLite)."""
    if _is_pg(store):
        from ich_node.queue.postgres import PgStore

        assert isinstance(store, PgStore)
        return store.assembly_turn()
    return contextlib.nullcontext(True)


def wait_for_jobs(store: Store, timeout: float) -> None:
    """Sleep up to ``timeout`` seconds; on PostgreSQL, wake when a job is notified."""
    if _is_pg(store):
        from ich_node.queue.postgres import PgStore

        assert isinstance(store, PgStore)
        store.wait_for_jobs(timeout)
    else:
        time.sleep(timeout)


def storage_ready(store: object) -> bool:
    """Whether this host sees the node's ``storage.dir`` (always, on SQLite).

    On PostgreSQL ``storage.dir`` is a shared mount: it is ready when its
    ``.ich-node-store-id`` names this database
    (:meth:`ich_node.queue.postgres.PgStore.storage_mounted`). Listeners refuse
    images, workers do not lease and senders do not send while it is not.
    """
    if _is_pg(store):
        from ich_node.queue.postgres import PgStore

        assert isinstance(store, PgStore)
        return store.storage_mounted()
    return True


class StorageWatch:
    """:func:`storage_ready` for one loop, logging ``event`` once each time it goes missing.

    Parameters
    ----------
    store : Store
        The node's store.
    event : str
        The structlog event logged (level error) when the storage is found missing.
    **fields
        Logged with it (``action=...``: what the loop does meanwhile).
    """

    def __init__(self, store: object, event: str, **fields: Any) -> None:
        self.store = store
        self.event = event
        self.fields = fields
        self._missing = False

    def ready(self) -> bool:
        """Whether the storage is there now; the first ``False`` of a run is logged."""
        if storage_ready(self.store):
            self._missing = False
            return True
        if not self._missing:
            log.error(self.event, **self.fields)
            self._missing = True
        return False
