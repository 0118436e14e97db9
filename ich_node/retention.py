"""Retention: spooled images and delivered results are deleted after ``storage.keep_hours``.

What goes, once it is older than the keep period:

- the spooled instances of a series whose work is finished (skipped, or every
  job ``done`` and every delivery ``done``); the series row stays, state
  ``purged``, with its UIDs and times only (descriptions are blanked, counts start
  again from zero: they count what the node holds; the results ledger keeps what
  was read);
- the ``results/<job_id>`` folder of a job that is ``done`` and delivered to
  every destination.

What stays: anything still receiving, queued, leased, retrying or parked (an
admin may still ``resend`` it), and the store's rows (UIDs, states, timings).
The results ledger (``series_reads``: one row per series version read, what
``ich-node audit`` compares with the radiologists' reads) has its own, longer
period, ``storage.keep_results_days`` (default 730): a row goes once its read is
older than that.
Half-written result folders (``results/.<job>.<pid>.tmp``) of a worker that is
gone are removed as well, whatever their age. With a shared store (PostgreSQL,
several hosts on one ``storage.dir``) a pid names a process of some host, not
necessarily this one: such folders are then removed only once older than the
keep period.

Orphans in the spool (both backends): a half-written instance
(``spool/<study>/<series>/.<name>.<pid>.<n>.tmp``) or an instance file the store
does not record, last modified more than :data:`ORPHAN_AGE_SECONDS` ago. Neither
was ever acknowledged (Success goes out only after write, fsync, rename and
record), and no C-STORE takes that long to write and record one instance, so
neither is being written any more. On one host (SQLite) the spool's start-up
recovery removes them too; on a shared ``storage.dir`` (PostgreSQL) it cannot,
another host's listener may be writing them, so this age rule is what removes
what a killed listener host left. The spool is walked at most once every
:data:`ORPHAN_SCAN_EVERY_SECONDS` per node (a big spool on NFS is slow to list).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from ich_node.queue.backend import storage_ready
from ich_node.queue.interface import job_of_record
from ich_node.queue.layout import OutsideStorage, StorageLayout, is_temp, spool_key
from ich_node.queue.store import Store

log = structlog.get_logger(__name__)

#: Seconds between two clean-up passes of the running node.
CLEAN_EVERY_SECONDS = 300.0

#: Age (seconds since last modified) past which a spool file that is half-written or
#: not recorded in the store is an orphan. Writing and recording one instance takes
#: seconds, minutes at worst (an NFS server or a database connection that stalls
#: until TCP gives up, ~15 min); an hour is far past that. Not tied to
#: ``storage.keep_hours``, which says how long read images are kept, not how long
#: a write can take.
ORPHAN_AGE_SECONDS: Final = 3600.0
#: Seconds between two walks of the spool for orphans, per node.
ORPHAN_SCAN_EVERY_SECONDS: Final = 3600.0
#: Names a file system gives files that are deleted but still open (NFS "silly
#: rename", FUSE): not ours to remove, the file system does when they are closed.
_HIDDEN_BY_FS: Final = (".nfs", ".fuse_hidden")


@dataclass(frozen=True, slots=True)
class Cleaned:
    """What one clean-up pass removed."""

    series: int
    instance_files: int
    result_folders: int
    temp_folders: int
    orphan_temp_files: int = 0  # half-written spool files, older than ORPHAN_AGE_SECONDS
    orphan_unrecorded_files: int = 0  # spool files the store does not record, as old
    reads: int = 0  # rows of the results ledger past storage.keep_results_days


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state != b"Z"


class Cleaner:
    """Delete what ``storage.keep_hours`` no longer keeps.

    Parameters
    ----------
    store : Store
        The node's store.
    storage_dir : pathlib.Path
        ``storage.dir``.
    keep_hours : float
        ``storage.keep_hours``.
    shared : bool
        Whether other hosts share ``storage.dir`` (``storage.database`` set).
    keep_results_days : float
        ``storage.keep_results_days``: how long the results ledger keeps a read.
    """

    def __init__(
        self,
        store: Store,
        storage_dir: Path,
        keep_hours: float,
        *,
        shared: bool = False,
        keep_results_days: float = 730.0,
    ) -> None:
        self.shared = shared
        self.keep_results_seconds = keep_results_days * 86400.0
        self.store = store
        self.storage_dir = Path(storage_dir)
        self.layout = StorageLayout(self.storage_dir)
        self.keep_seconds = keep_hours * 3600.0
        self._orphans_due: float | None = None  # the first pass looks

    def _own(self, folder: Path) -> bool:
        """Whether ``folder`` may be walked: not a link out of ``storage.dir`` (else refused)."""
        try:
            self.layout.own_dir(folder)
        except OutsideStorage as exc:
            self.store.refuse_path(exc, "storage folder")
            return False
        return True

    def spool_checked(self, now: float) -> None:
        """The spool was just made whole (:meth:`Spool.recover`): next orphan walk in an hour."""
        self._orphans_due = now + ORPHAN_SCAN_EVERY_SECONDS

    def run_once(self, now: float) -> Cleaned:
        """One pass at time ``now``; never raises (a failure is logged, retried next pass)."""
        cutoff = now - self.keep_seconds
        n_series = n_files = n_results = n_temp = 0
        try:
            for uid in self.store.expired_series(cutoff):
                # The rows go first, in a transaction that checks the series is still
                # expired (an instance recorded since keeps it whole); then the files.
                # A re-send written meanwhile under the same name (a name is the
                # content's digest) is newer than the cutoff and recorded anew: kept.
                # Only paths inside spool/ come back (the store refuses the others).
                paths = self.store.purge_series(uid, now, cutoff)
                if paths is None:
                    continue
                for path in paths:
                    try:
                        if _remove_if_old(path, cutoff):
                            n_files += 1
                    except FileNotFoundError:
                        pass
                spool = Path(os.path.realpath(self.layout.spool))
                for folder in {p.parent for p in paths}:
                    for empty in (folder, folder.parent):
                        # Only folders under spool/, never spool/ itself; not empty
                        # (another series of the study) or gone: kept.
                        if spool not in Path(os.path.realpath(empty)).parents:
                            continue
                        with contextlib.suppress(OSError):
                            empty.rmdir()
                n_series += 1
            results = self.layout.results
            if results.is_dir() and self._own(results):
                for folder in results.iterdir():
                    owner = self.layout.results_temp_owner(folder.name)
                    if owner is not None:
                        if (
                            folder.stat().st_mtime < cutoff
                            if self.shared
                            else not _pid_alive(owner)
                        ):
                            shutil.rmtree(folder, ignore_errors=True)
                            n_temp += 1
                    elif self.store.results_expired(folder.name, cutoff):
                        shutil.rmtree(folder, ignore_errors=True)
                        n_results += 1
            # Alert records (they hold patient identifiers for HL7): same rule.
            alerts = self.layout.alerts
            if alerts.is_dir() and self._own(alerts):
                for folder in alerts.iterdir():
                    # A preliminary alert's folder goes with its version's job.
                    if self.store.results_expired(job_of_record(folder.name), cutoff):
                        shutil.rmtree(folder, ignore_errors=True)
        except Exception as exc:  # log and go on; the next pass tries again
            log.error("retention.failed", error=type(exc).__name__)
        n_reads = 0
        try:  # the results ledger: its own, longer period
            n_reads = self.store.forget_reads(now - self.keep_results_seconds)
        except Exception as exc:  # log and go on; the next pass tries again
            log.error("retention.reads_failed", error=type(exc).__name__)
        orphans = (0, 0)
        if self._orphans_due is None or now >= self._orphans_due:
            # Due again in an hour even when this walk fails: never a walk each pass.
            self._orphans_due = now + ORPHAN_SCAN_EVERY_SECONDS
            try:
                orphans = self._remove_orphans(now - ORPHAN_AGE_SECONDS)
            except Exception as exc:  # log and go on; the next walk tries again
                log.error("cleaner.orphans_failed", error=type(exc).__name__)
        cleaned = Cleaned(n_series, n_files, n_results, n_temp, *orphans, reads=n_reads)
        if n_series or n_results or n_temp or n_reads:
            log.info(
                "retention.cleaned",
                series=n_series,
                instance_files=n_files,
                result_folders=n_results,
                temp_folders=n_temp,
                ledger_reads=n_reads,
            )
        return cleaned

    def _remove_orphans(self, before: float) -> tuple[int, int]:
        """Remove spool files never acknowledged, last modified before ``before`` (epoch s).

        Returns (half-written files, unrecorded files) removed. A recorded file is
        never touched, whatever its age; a file is judged by its path under
        ``spool/`` against :func:`spool_key` of the recorded paths, as
        :meth:`ich_node.ingest.spool.Spool.recover` does.
        """
        root = self.layout.spool
        if not root.is_dir() or not storage_ready(self.store):
            return 0, 0  # a shared storage.dir not mounted here: an empty mount point
        if not self._own(root):
            return 0, 0
        # Read before the walk: a file recorded after this was written after it too
        # (young, kept), unless its write stalled past ORPHAN_AGE_SECONDS.
        recorded = {spool_key(name) for name in self.store.instance_files()}
        n_temp = n_unrecorded = n_failed = 0
        for folder, _subfolders, names in os.walk(root):
            for name in names:
                if name.startswith(_HIDDEN_BY_FS):
                    continue
                path = Path(folder) / name
                try:
                    if is_temp(path):
                        status = os.lstat(path)
                        # A name of its own per write (pid, id): nobody writes an
                        # old one again, and a writer that is somehow still on it
                        # fails at its rename and answers no Success.
                        if status.st_mtime < before:
                            path.unlink(missing_ok=True)
                            n_temp += 1
                    elif path.relative_to(root) not in recorded and _remove_if_old(path, before):
                        n_unrecorded += 1
                except OSError:  # gone meanwhile (retention), stale handle: next walk
                    n_failed += 1
        if n_temp or n_unrecorded:
            log.info("cleaner.orphans_removed", n_temp=n_temp, n_unrecorded=n_unrecorded)
        if n_failed:
            log.warning("cleaner.orphans_not_checked", n=n_failed)
        return n_temp, n_unrecorded


def _remove_if_old(path: Path, before: float) -> bool:
    """Remove the unrecorded file ``path`` if it is a regular file last modified before ``before``.

    Used for orphans and for the files of a series retention has just purged
    (their rows gone first).

    The same name is written again when the same instance is re-sent (its name
    is its content digest), and then recorded. So that a copy written between
    the look and the removal is never removed, the file is first renamed to a
    name of this process (atomic), looked at again through an open descriptor
    (fresh attributes, on NFS too), and put back unless it is still the old file.

    Raises
    ------
    OSError
        When the file cannot be looked at, renamed or removed.
    """
    status = os.lstat(path)
    if not stat.S_ISREG(status.st_mode) or status.st_mtime >= before:
        return False
    aside = path.with_name(f".{path.name}.{os.getpid()}.orphan.tmp")
    os.rename(path, aside)
    fd = os.open(aside, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        now_there = os.fstat(fd)
    finally:
        os.close(fd)
    if (now_there.st_ino, now_there.st_mtime_ns) == (status.st_ino, status.st_mtime_ns):
        aside.unlink()
        return True
    # A listener wrote it again just now: put it back (beside an even newer copy, keep that).
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links here: rename back (same name, same content)
        os.rename(aside, path)
        return False
    aside.unlink()
    return False
