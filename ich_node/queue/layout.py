"""Where the node keeps things under ``storage.dir``: the one owner of these paths.

::

    node.sqlite3(-wal, -shm)                       the store
    spool/<study>/<series>/<sop>.<digest>.dcm      received instances, as received
    spool/<study>/<series>/.<name>.<pid>.<n>.tmp   an instance being written
    results/<job_id>/findings.json                 a job's findings
    results/<job_id>/outbox/                       what is sent (*.dcm; PNG previews stay)
    results/.<job_id>.<pid>.tmp/                   a job's results being written
    alerts/<job_id>/<target>.json (.png)           a job's alert to one target (key image)
    refusals/<process>.json                        refused associations by peer (a listener's)
    audit/latest/report.json, report.html          the latest ``ich-node audit`` report

UIDs become path parts only when they are digits and dots (PS3.5 9.1); any other
value is replaced by its SHA-256, so a hostile UID never names a path outside
the spool. Nothing here touches the disk except :meth:`StorageLayout.outbox_files`,
which lists a folder.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: The store's database file inside ``storage.dir``.
DB_NAME: Final = "node.sqlite3"
#: The file in a shared ``storage.dir`` that names the PostgreSQL database it belongs to.
STORE_ID_NAME: Final = ".ich-node-store-id"

_UID: Final = re.compile(r"^[0-9][0-9.]{0,63}$")
_NAME: Final = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")


def path_part(uid: str) -> str:
    """``uid`` as a file-name part: itself when a plain UID, else its SHA-256 (hex)."""
    return uid if _UID.match(uid) and ".." not in uid else hashlib.sha256(uid.encode()).hexdigest()


def spool_key(path: Path | str) -> Path:
    """The place of a spool file under ``spool/``: ``<study>/<series>/<file>``.

    The last three parts of ``path``, whatever ``storage.dir`` it was recorded
    under (a moved ``storage.dir``, another host's mount point, or PostgreSQL's
    paths relative to ``storage.dir``). Spool recovery and the cleaner compare
    it with a file's path relative to ``spool/``.
    """
    return Path(*Path(path).parts[-3:])


def is_temp(path: Path) -> bool:
    """Whether ``path`` is a half-written file or folder (``.<name>.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


@dataclass(frozen=True, slots=True)
class StorageLayout:
    """The paths under one ``storage.dir``.

    Parameters
    ----------
    root : pathlib.Path
        ``storage.dir``.
    """

    root: Path

    @property
    def db(self) -> Path:
        return self.root / DB_NAME

    @property
    def store_id(self) -> Path:
        return self.root / STORE_ID_NAME

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def alerts(self) -> Path:
        return self.root / "alerts"

    @property
    def refusals(self) -> Path:
        return self.root / "refusals"

    def refusals_file(self, process: str) -> Path:
        """Where a listener process (its heartbeat name) writes its refusals by peer."""
        name = process if _NAME.match(process) else hashlib.sha256(process.encode()).hexdigest()
        return self.refusals / f"{name}.json"

    @property
    def audit_latest(self) -> Path:
        """The latest ``ich-node audit`` report (``report.json``, ``report.html``)."""
        return self.root / "audit" / "latest"

    def alerts_dir(self, job_id: str) -> Path:
        """Where a job's alert records (one per notification target) live."""
        return self.alerts / job_id

    def instance_file(self, study_uid: str, series_uid: str, sop_uid: str, digest: str) -> Path:
        """The spool file of one instance; ``digest`` is its content digest (hex, 16+ digits)."""
        return (
            self.spool
            / path_part(study_uid)
            / path_part(series_uid)
            / f"{path_part(sop_uid)}.{digest[:16]}.dcm"
        )

    def results_dir(self, job_id: str) -> Path:
        """Where a job's ``findings.json`` and ``outbox/`` live."""
        return self.results / job_id

    def results_temp(self, job_id: str, pid: int) -> Path:
        """The folder a worker (process ``pid``) writes a job's results into before renaming."""
        return self.results / f".{job_id}.{pid}.tmp"

    @staticmethod
    def results_temp_owner(name: str) -> int | None:
        """The pid in a :meth:`results_temp` folder name, or ``None`` for any other name."""
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "" and parts[3] == "tmp" and parts[2].isdigit():
            return int(parts[2])
        return None

    def outbox(self, job_id: str) -> Path:
        return self.results_dir(job_id) / "outbox"

    def outbox_files(self, job_id: str) -> list[Path]:
        """The DICOM objects a job sends (``*.dcm``), in a stable order."""
        folder = self.outbox(job_id)
        return sorted(p for p in folder.rglob("*.dcm") if p.is_file()) if folder.is_dir() else []


def results_dir(storage_dir: Path, job_id: str) -> Path:
    """``StorageLayout(storage_dir).results_dir(job_id)``."""
    return StorageLayout(Path(storage_dir)).results_dir(job_id)


def outbox_files(storage_dir: Path, job_id: str) -> list[Path]:
    """``StorageLayout(storage_dir).outbox_files(job_id)``."""
    return StorageLayout(Path(storage_dir)).outbox_files(job_id)
