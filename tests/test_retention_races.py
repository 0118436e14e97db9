"""Retention never loses an instance acknowledged while it purges a series (both backends).

Retention looks for expired series, then purges each: its rows go first, in a
transaction that checks the series is still expired, then its files, each only
if it is still the old file. Two C-STOREs can land in between, and each was
answered Success, so each must stay: a late instance of the series recorded
after the look, and the same instance re-sent (same bytes, so the same file
name) after the rows went. The steps are real (store, spool, files); the tests
only choose the moment the second C-STORE lands, by wrapping the store's method
that ends the step before it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ich_node.ingest.spool import Spool
from ich_node.queue.interface import InstanceRecord
from ich_node.queue.store import Store
from ich_node.retention import Cleaner

HOUR = 3600.0
SERIES = "1.2.826.0.1.3680043.10.1.77"


def _record(i: int) -> InstanceRecord:
    return InstanceRecord(
        f"{SERIES}.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.10.1", SERIES, "CT",
        "", "", "",
    )  # fmt: skip


def _data(i: int) -> bytes:
    return f"instance {i} of the series".encode()


@pytest.fixture
def node(
    tmp_path: Path, backend: str, open_store: Callable[[Path], Store]
) -> tuple[Store, Spool, bool]:
    storage = tmp_path / "node"
    store = open_store(storage)
    return store, Spool(storage, store, 0), backend == "postgresql"


def _expired_series(store: Store, spool: Spool, received: float) -> list[Path]:
    """Three instances received at ``received``, the series skipped: due for purging."""
    paths = [spool.save(_data(i), _record(i), received).path for i in range(3)]
    for path in paths:
        os.utime(path, (received, received))
    store.skip_series(SERIES, 3, "test: not a head CT")
    return paths


def _files(spool: Spool) -> set[Path]:
    return {p for p in spool.root.rglob("*") if p.is_file()}


def test_a_late_instance_recorded_after_the_look_keeps_the_whole_series(
    node: tuple[Store, Spool, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, spool, shared = node
    now = time.time()
    old = _expired_series(store, spool, now - 200 * HOUR)
    look = store.expired_series
    late: list[Path] = []

    def look_then_a_late_instance(cutoff: float) -> list[str]:
        found = look(cutoff)
        late.append(spool.save(_data(3), _record(3), time.time()).path)  # Success went out
        return found

    monkeypatch.setattr(store, "expired_series", look_then_a_late_instance)
    cleaned = Cleaner(store, spool.layout.root, 168.0, shared=shared).run_once(now)
    monkeypatch.undo()

    assert (cleaned.series, cleaned.instance_files) == (0, 0)
    assert _files(spool) == {*old, *late}
    assert set(store.instance_files()) == {str(p) for p in (*old, *late)}
    record = store.series(SERIES)
    assert record is not None and record.state == "receiving" and record.n_instances == 4


def test_the_same_instance_resent_after_the_rows_went_is_kept(
    node: tuple[Store, Spool, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, spool, shared = node
    now = time.time()
    old = _expired_series(store, spool, now - 200 * HOUR)
    purge = store.purge_series
    resent: list[Path] = []

    def purge_then_a_resend(uid: str, when: float | None = None, cutoff: float | None = None):  # type: ignore[no-untyped-def]
        gone = purge(uid, when, cutoff)
        # The PACS re-sends instance 0 now: no row names it any more, so it is new,
        # written under the very name retention is about to remove, and recorded.
        resent.append(spool.save(_data(0), _record(0), time.time()).path)
        return gone

    monkeypatch.setattr(store, "purge_series", purge_then_a_resend)
    cleaned = Cleaner(store, spool.layout.root, 168.0, shared=shared).run_once(now)
    monkeypatch.undo()

    assert resent == [old[0]]  # the same file name as the purged copy
    assert (cleaned.series, cleaned.instance_files) == (1, 2)
    assert _files(spool) == {old[0]}  # the re-sent copy, nothing set aside left behind
    assert old[0].read_bytes() == _data(0)
    assert set(store.instance_files()) == {str(old[0])}
    record = store.series(SERIES)
    assert record is not None and record.n_instances == 1


def test_an_expired_series_goes_rows_first_then_every_file(
    node: tuple[Store, Spool, bool],
) -> None:
    store, spool, shared = node
    now = time.time()
    _expired_series(store, spool, now - 200 * HOUR)
    cleaned = Cleaner(store, spool.layout.root, 168.0, shared=shared).run_once(now)
    assert (cleaned.series, cleaned.instance_files) == (1, 3)
    assert _files(spool) == set() and store.instance_files() == {}
    record = store.series(SERIES)
    assert record is not None and record.state == "purged" and record.n_instances == 0
    # Purged already: a second pass finds nothing to do.
    assert Cleaner(store, spool.layout.root, 168.0, shared=shared).run_once(now).series == 0
