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
the spool. Job ids and target names become path parts only when they are plain
names (:func:`plain_name`).

The node never acts outside ``storage.dir``: a path read from the store, or an
entry found under it, is checked by :meth:`StorageLayout.confine` before it is
opened, written or deleted. Its folder is resolved (symbolic links followed) and
must lie inside the part of ``storage.dir`` it belongs to (``spool/`` for an
instance), and a file that is read must not itself be a symbolic link; anything
else raises :class:`OutsideStorage`, which the caller logs and counts. Folders
are listed only after the same check (:meth:`StorageLayout.own_dir`). Only
these checks and :meth:`StorageLayout.outbox_files` touch the disk here.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: The store's database file inside ``storage.dir``.
DB_NAME: Final = "node.sqlite3"
#: The file in a shared ``storage.dir`` that names the PostgreSQL database it belongs to.
STORE_ID_NAME: Final = ".ich-node-store-id"

_UID: Final = re.compile(r"^[0-9][0-9.]{0,63}$")
_NAME: Final = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


class OutsideStorage(ValueError):
    """A path that would make the node act outside its ``storage.dir``; nothing was done.

    Raised for a path read from the store that leads outside the folder it must be
    in (absolute elsewhere, ``../``, through a symbolic link), a file that is a
    symbolic link, or a job id or target name that is not a plain name.
    """

    def __init__(self, path: object, why: str) -> None:
        super().__init__(f"{path}: {why}; refused (the node acts only inside storage.dir)")
        self.path = str(path)
        self.why = why


def plain_name(value: str, what: str = "name") -> str:
    """``value`` when it is a plain file name (letters, digits, ``._-``, no leading dot).

    Raises
    ------
    OutsideStorage
        For anything else (``..``, a slash, an empty or hidden name).
    """
    if not _NAME.match(value):  # no slash, not ".", "..", hidden or empty
        raise OutsideStorage(value, f"not a plain {what}")
    return value


def _inside(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


#: The folder of a job's results that holds its SR in other SR classes.
SR_CLASSES_DIR: Final = "sr-classes"


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

    def confine(self, path: Path | str, under: Path | None = None, *, read: bool = False) -> Path:
        """The entry ``path`` names, checked to lie inside ``under`` (default ``storage.dir``).

        A relative ``path`` is taken under ``storage.dir`` (as PostgreSQL records
        them). Its folder is resolved, symbolic links followed, and must be inside
        ``under`` resolved; the entry itself is not followed: the returned path is
        its name in that real folder, so deleting it removes the entry, never what a
        link points at. With ``read``, the entry must not be a symbolic link.

        Raises
        ------
        OutsideStorage
            When it leads elsewhere; nothing was opened, written or deleted.
        """
        given = Path(path)
        full = given if given.is_absolute() else self.root / given
        if full.name in ("", ".", ".."):
            raise OutsideStorage(path, "not a file name")
        base = Path(os.path.realpath(self.root if under is None else under))
        folder = Path(os.path.realpath(full.parent))
        if not _inside(folder, base):
            raise OutsideStorage(path, f"outside {base}")
        entry = folder / full.name
        if read and entry.is_symlink():
            raise OutsideStorage(path, "a symbolic link")
        return entry

    def own_dir(self, folder: Path) -> Path:
        """``folder`` (one of this layout's) when it is a real folder inside ``storage.dir``.

        Checked before a folder is listed or written into: a planted symbolic link
        (``spool`` -> ``/``) would make the node walk or write elsewhere.

        Raises
        ------
        OutsideStorage
            When it is a symbolic link or resolves outside ``storage.dir``.
        """
        if folder.is_symlink():
            raise OutsideStorage(folder, "a symbolic link")
        if not _inside(Path(os.path.realpath(folder)), Path(os.path.realpath(self.root))):
            raise OutsideStorage(folder, "outside storage.dir")
        return folder

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
        """Where a job's alert records (one per notification target) live.

        Raises
        ------
        OutsideStorage
            When ``job_id`` is not a plain name (it comes from the store).
        """
        return self.alerts / plain_name(job_id, "job id")

    def instance_file(self, study_uid: str, series_uid: str, sop_uid: str, digest: str) -> Path:
        """The spool file of one instance; ``digest`` is its content digest (hex, 16+ digits)."""
        return (
            self.spool
            / path_part(study_uid)
            / path_part(series_uid)
            / f"{path_part(sop_uid)}.{digest[:16]}.dcm"
        )

    def results_dir(self, job_id: str) -> Path:
        """Where a job's ``findings.json`` and ``outbox/`` live.

        Raises
        ------
        OutsideStorage
            When ``job_id`` is not a plain name (it comes from the store).
        """
        return self.results / plain_name(job_id, "job id")

    def results_temp(self, job_id: str, pid: int) -> Path:
        """The folder a worker (process ``pid``) writes a job's results into before renaming."""
        return self.results / f".{plain_name(job_id, 'job id')}.{pid}.tmp"

    @staticmethod
    def results_temp_owner(name: str) -> int | None:
        """The pid in a :meth:`results_temp` folder name, or ``None`` for any other name."""
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "" and parts[3] == "tmp" and parts[2].isdigit():
            return int(parts[2])
        return None

    def outbox(self, job_id: str) -> Path:
        return self.results_dir(job_id) / "outbox"

    def sr_classes(self, job_id: str) -> Path:
        """The job's SR in other SR classes (``<class>.dcm``), beside the outbox."""
        return self.results_dir(job_id) / SR_CLASSES_DIR

    def outbox_files(self, job_id: str) -> list[Path]:
        """The DICOM objects a job sends (``*.dcm``), in a stable order.

        Raises
        ------
        OutsideStorage
            When the outbox or one of its entries is a symbolic link, or ``job_id``
            is not a plain name: what it points at is never read nor sent.
        """
        folder = self.outbox(job_id)
        if self.results.exists() or self.results.is_symlink():
            self.own_dir(self.results)
        self.confine(folder.parent, self.results, read=True)  # results/<job_id>
        if not folder.is_dir() and not folder.is_symlink():
            return []
        self.confine(folder, self.results, read=True)
        files = []
        for top, folders, names in os.walk(folder):  # never into a linked folder
            for name in [*folders, *names]:
                entry = Path(top) / name
                if entry.is_symlink():
                    raise OutsideStorage(entry, "a symbolic link")
                if name.endswith(".dcm") and stat.S_ISREG(os.lstat(entry).st_mode):
                    files.append(entry)
        return sorted(files)


def results_dir(storage_dir: Path, job_id: str) -> Path:
    """``StorageLayout(storage_dir).results_dir(job_id)``."""
    return StorageLayout(Path(storage_dir)).results_dir(job_id)


def outbox_files(storage_dir: Path, job_id: str) -> list[Path]:
    """``StorageLayout(storage_dir).outbox_files(job_id)``."""
    return StorageLayout(Path(storage_dir)).outbox_files(job_id)
