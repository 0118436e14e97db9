"""Retention: spooled images and delivered results are deleted after ``storage.keep_hours``.

What goes, once it is older than the keep period:

- the spooled instances of a series whose work is finished (skipped, or every
  job ``done`` and every delivery ``done``); the series row stays, state
  ``purged``, with its UIDs, counts and times only (descriptions are blanked);
- the ``results/<job_id>`` folder of a job that is ``done`` and delivered to
  every destination.

What stays: anything still receiving, queued, leased, retrying or parked (an
admin may still ``resend`` it), and the store's rows (UIDs, states, timings).
Half-written result folders (``results/.<job>.<pid>.tmp``) of a worker that is
gone are removed as well, whatever their age. With a shared store (PostgreSQL,
several hosts on one ``storage.dir``) a pid names a process of some host, not
necessarily this one: such folders are then removed only once older than the
keep period.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

from ich_node.queue.layout import StorageLayout
from ich_node.queue.store import Store

log = structlog.get_logger(__name__)

#: Seconds between two clean-up passes of the running node.
CLEAN_EVERY_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class Cleaned:
    """What one clean-up pass removed."""

    series: int
    instance_files: int
    result_folders: int
    temp_folders: int


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
    """

    def __init__(
        self, store: Store, storage_dir: Path, keep_hours: float, *, shared: bool = False
    ) -> None:
        self.shared = shared
        self.store = store
        self.storage_dir = Path(storage_dir)
        self.layout = StorageLayout(self.storage_dir)
        self.keep_seconds = keep_hours * 3600.0

    def run_once(self, now: float) -> Cleaned:
        """One pass at time ``now``; never raises (a failure is logged, retried next pass)."""
        cutoff = now - self.keep_seconds
        n_series = n_files = n_results = n_temp = 0
        try:
            for uid in self.store.expired_series(cutoff):
                paths = self.store.instance_paths(uid)
                for path in paths:
                    path.unlink(missing_ok=True)
                    n_files += 1
                for folder in {p.parent for p in paths}:
                    for empty in (folder, folder.parent):
                        # not empty (another series of the study) or gone: kept
                        with contextlib.suppress(OSError):
                            empty.rmdir()
                self.store.purge_series(uid)
                n_series += 1
            results = self.layout.results
            if results.is_dir():
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
            if alerts.is_dir():
                for folder in alerts.iterdir():
                    if self.store.results_expired(folder.name, cutoff):
                        shutil.rmtree(folder, ignore_errors=True)
        except Exception as exc:  # log and go on; the next pass tries again
            log.error("retention.failed", error=type(exc).__name__)
        cleaned = Cleaned(n_series, n_files, n_results, n_temp)
        if n_series or n_results or n_temp:
            log.info(
                "retention.cleaned",
                series=n_series,
                instance_files=n_files,
                result_folders=n_results,
                temp_folders=n_temp,
            )
        return cleaned
