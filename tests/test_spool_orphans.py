"""The cleaner removes spool files no C-STORE can still be writing, on both backends.

A killed listener host leaves half-written temp files and renamed but unrecorded
files in a shared spool, where start-up recovery cannot run. The cleaner removes
them once older than ``ORPHAN_AGE_SECONDS``; a young file (perhaps being written
right now) and every recorded file stay. Real stores, real files; time is given
to ``Cleaner.run_once`` and file ages are set with ``os.utime``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from ich_node import retention
from ich_node.ingest.spool import Spool, content_digest
from ich_node.queue.interface import InstanceRecord
from ich_node.queue.store import Store
from ich_node.retention import ORPHAN_AGE_SECONDS, ORPHAN_SCAN_EVERY_SECONDS, Cleaner

HOUR = 3600.0


def _record(series: str, i: int) -> InstanceRecord:
    return InstanceRecord(
        f"{series}.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2", series, "CT", "", "", ""
    )


def _aged(path: Path, data: bytes, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def _unrecorded(spool: Spool, series: str, i: int, mtime: float) -> Path:
    """An instance renamed into place whose record never committed (listener killed)."""
    data = f"unrecorded {series} {i}".encode()
    return _aged(spool.path_for(_record(series, i), content_digest(data)), data, mtime)


def _temp(spool: Spool, series: str, i: int, mtime: float) -> Path:
    """A half-written instance, named as ``Spool.save`` names it (``.<name>.<pid>.<n>.tmp``)."""
    final = spool.path_for(_record(series, i), content_digest(b"half"))
    return _aged(final.with_name(f".{final.name}.4242.7f00.tmp"), b"half", mtime)


def _files(spool: Spool) -> set[Path]:
    return {p for p in spool.root.rglob("*") if p.is_file()}


@pytest.fixture
def node(
    tmp_path: Path, backend: str, open_store: Callable[[Path], Store]
) -> tuple[Store, Spool, bool]:
    storage = tmp_path / "node"
    store = open_store(storage)  # PostgreSQL: its store id placed, as serve does
    return store, Spool(storage, store, 0), backend == "postgresql"


def test_old_orphans_go_young_ones_and_every_recorded_file_stay(
    node: tuple[Store, Spool, bool],
) -> None:
    store, spool, shared = node
    now = time.time()
    recorded = [spool.save(f"instance {i}".encode(), _record("1.4", i), now).path for i in range(3)]
    ancient = now - 1000 * HOUR
    for path in recorded:
        os.utime(path, (ancient, ancient))  # recorded: kept whatever its age
    old, young = now - ORPHAN_AGE_SECONDS - 60, now - 60
    old_temp = _temp(spool, "1.4", 0, old)  # beside recorded files, in their folder
    old_unrecorded = _unrecorded(spool, "1.5", 0, old)  # a series nobody recorded
    # The older copy of a changed re-send that could not be removed: same series and
    # SOP Instance UID as a recorded file, other content, so another name.
    old_replaced = _unrecorded(spool, "1.4", 0, old)
    young_temp = _temp(spool, "1.5", 1, young)
    young_unrecorded = _unrecorded(spool, "1.4", 7, young)
    nfs_hidden = _aged(old_temp.with_name(".nfs000000000123abcd00000001"), b"open", ancient)
    before_records = store.instance_files()

    cleaner = Cleaner(store, spool.layout.root, 168.0, shared=shared)
    with structlog.testing.capture_logs() as logs:
        cleaned = cleaner.run_once(now)
    assert (cleaned.orphan_temp_files, cleaned.orphan_unrecorded_files) == (1, 2)
    assert _files(spool) == {*recorded, young_temp, young_unrecorded, nfs_hidden}
    assert not (old_temp.exists() or old_unrecorded.exists() or old_replaced.exists())
    assert store.instance_files() == before_records
    removed = [e for e in logs if e["event"] == "cleaner.orphans_removed"]
    assert removed == [
        {"event": "cleaner.orphans_removed", "n_temp": 1, "n_unrecorded": 2, "log_level": "info"}
    ]  # counts only: no path, no UID

    # The young ones grow old; the spool is walked again only an hour after the last walk.
    for path in (young_temp, young_unrecorded):
        os.utime(path, (old, old))
    later = now + 300
    assert cleaner.run_once(later).orphan_temp_files == 0
    assert young_temp.exists() and young_unrecorded.exists()
    cleaned = cleaner.run_once(now + ORPHAN_SCAN_EVERY_SECONDS)
    assert (cleaned.orphan_temp_files, cleaned.orphan_unrecorded_files) == (1, 1)
    assert _files(spool) == {*recorded, nfs_hidden}

    # Months on: the recorded files of a series still receiving are all there.
    cleaned = cleaner.run_once(now + 2000 * HOUR)
    assert (cleaned.orphan_temp_files, cleaned.orphan_unrecorded_files, cleaned.series) == (0, 0, 0)
    assert _files(spool) == {*recorded, nfs_hidden}
    assert store.instance_files() == before_records


def test_a_copy_written_again_during_the_removal_is_kept(
    node: tuple[Store, Spool, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same instance re-sent (same name) between the cleaner's look and its removal."""
    store, spool, shared = node
    now = time.time()
    data = b"unrecorded 1.6 0"
    orphan = _unrecorded(spool, "1.6", 0, now - 2 * HOUR)
    real_lstat = os.lstat
    resent: list[Path] = []

    def look_then_resend(path: object, *args: object, **kwargs: object) -> os.stat_result:
        status = real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]
        if Path(str(path)) == orphan and not resent:
            # The PACS re-sends it now: a new file under the same name, then recorded.
            resent.append(spool.save(data, _record("1.6", 0), time.time()).path)
        return status

    monkeypatch.setattr(retention.os, "lstat", look_then_resend)
    cleaned = Cleaner(store, spool.layout.root, 168.0, shared=shared).run_once(now)
    monkeypatch.undo()
    assert resent == [orphan]
    assert cleaned.orphan_unrecorded_files == 0
    assert orphan.read_bytes() == data and str(orphan) in store.instance_files()
    assert _files(spool) == {orphan}  # nothing set aside left behind


def test_a_store_that_fails_is_logged_and_nothing_is_removed(
    node: tuple[Store, Spool, bool],
) -> None:
    store, spool, shared = node
    now = time.time()
    recorded = spool.save(b"instance 0", _record("1.7", 0), now).path
    orphan = _unrecorded(spool, "1.7", 1, now - 2 * HOUR)
    store.close()  # every query now raises
    with structlog.testing.capture_logs() as logs:
        cleaned = Cleaner(store, spool.layout.root, 168.0, shared=shared).run_once(now)
    assert (cleaned.orphan_temp_files, cleaned.orphan_unrecorded_files) == (0, 0)
    assert recorded.exists() and orphan.exists()
    assert "cleaner.orphans_failed" in [e["event"] for e in logs]
