"""The durable spool: each received instance written atomically, then recorded.

An instance is durable when its bytes are in a temporary file that was fsync'ed,
renamed to its final name, its folder fsync'ed, and its row committed in the
store. Only then may the listener answer Success: a crash at any point before
leaves either nothing or an unreferenced file that a later identical C-STORE
overwrites.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom.dataset import Dataset

from ich_node.store import InstanceRecord, Store

_UID: Final = re.compile(r"^[0-9][0-9.]{0,63}$")


class SpoolError(OSError):
    """An instance could not be made durable (disk full, I/O error, low free space)."""


@dataclass(frozen=True, slots=True)
class Spooled:
    """Where an instance is and whether this C-STORE added it."""

    path: Path
    new: bool


def _name(uid: str) -> str:
    # A UID is digits and dots (PS3.5 9.1); anything else becomes a hash, so a
    # hostile UID never names a path outside the spool.
    return uid if _UID.match(uid) and ".." not in uid else hashlib.sha256(uid.encode()).hexdigest()


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def instance_record(ds: Dataset, sop_class_uid: str, sop_instance_uid: str) -> InstanceRecord:
    """The header fields the node records, from a (lazily decoded) dataset.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The received dataset; only the few elements named here are decoded.
    sop_class_uid, sop_instance_uid : str
        From the C-STORE request (Affected SOP Class/Instance UID).

    Raises
    ------
    ValueError
        When the Study or Series Instance UID is missing.
    """
    study = _text(ds, "StudyInstanceUID")
    series = _text(ds, "SeriesInstanceUID")
    if not study or not series:
        raise ValueError("the dataset has no StudyInstanceUID or SeriesInstanceUID")
    sop = _text(ds, "SOPInstanceUID") or sop_instance_uid
    if not sop:
        raise ValueError("the dataset has no SOPInstanceUID")
    expected: int | None = None
    raw = ds.get("ImagesInAcquisition")
    if raw not in (None, ""):
        try:
            expected = int(raw) if int(raw) > 0 else None
        except (TypeError, ValueError):
            expected = None
    return InstanceRecord(
        sop_instance_uid=sop,
        sop_class_uid=_text(ds, "SOPClassUID") or sop_class_uid,
        study_instance_uid=study,
        series_instance_uid=series,
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        expected=expected,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Instance files under ``<storage.dir>/spool/<study>/<series>/<sop>.dcm``.

    Parameters
    ----------
    storage_dir : pathlib.Path
        ``storage.dir``.
    store : Store
        Where instances are recorded.
    min_free_mb : int
        Refuse instances (out of resources) when less space than this is free.
    """

    def __init__(self, storage_dir: Path, store: Store, min_free_mb: int) -> None:
        self.root = Path(storage_dir) / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.min_free_bytes = min_free_mb * 1024 * 1024

    def path_for(self, record: InstanceRecord) -> Path:
        return (
            self.root
            / _name(record.study_instance_uid)
            / _name(record.series_instance_uid)
            / f"{_name(record.sop_instance_uid)}.dcm"
        )

    def save(self, data: bytes, record: InstanceRecord, now: float) -> Spooled:
        """Write ``data`` (a DICOM file: preamble, meta, dataset) durably and record it.

        A SOP Instance UID already in the store is not written again.

        Raises
        ------
        SpoolError
            When the instance cannot be made durable; no partial file is left.
        """
        final = self.path_for(record)
        if self.store.has_instance(record.sop_instance_uid):
            return Spooled(final, new=False)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{id(data):x}.tmp")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(final.parent).free
            if free - len(data) < self.min_free_bytes:
                raise SpoolError(f"{free // 2**20} MiB free, storage.min_free_mb not met")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            new = self.store.add_instance(record, final, len(data), now)
        except SpoolError:
            raise
        except Exception as exc:  # OSError, sqlite3.Error: the instance is not durable
            raise SpoolError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return Spooled(final, new=new)
