"""The durable spool: each received instance written atomically, then recorded.

An instance is identified by its series and its SOP Instance UID, and its
content by the SHA-256 of its data set as received (the file meta, which the
node writes itself, is left out). The same instance sent again with the same
content is not written again; with other content (a corrected re-send) it
replaces the older copy and the series is read again; the same SOP Instance UID
in another series is stored with that series, and logged as a warning.

An instance is durable when its bytes are in a temporary file that was fsync'ed,
renamed to its final name, its folder fsync'ed, and its row committed in the
store (the folder's fsync and the commit run at the same time; both must end).
Only then may the listener answer Success: a crash at any point before leaves
either nothing, an unreferenced file that a later identical C-STORE overwrites,
or a row whose file is gone, which recovery forgets.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from pydicom.dataset import Dataset

from ich_node.queue.backend import storage_ready
from ich_node.queue.interface import Added, InstanceRecord, InstanceStore
from ich_node.queue.layout import (
    STORE_ID_NAME,
    OutsideStorage,
    StorageLayout,
    is_temp,
    path_part,
    spool_key,
)

log = structlog.get_logger(__name__)


class SpoolError(OSError):
    """An instance could not be made durable (disk full, I/O error, low free space).

    ``reason`` names the kind for the counts and the C-STORE's Error Comment:
    ``disk_low`` (``storage.min_free_mb``), ``path_outside_storage`` (a symbolic
    link in the spool), ``storage_not_mounted``, ``not_durable`` (anything else).
    """

    def __init__(self, message: str, reason: str = "not_durable") -> None:
        super().__init__(message)
        self.reason = reason


#: Opening a spool folder: never through a symbolic link, never inherited.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Spooled:
    """Where an instance is and what this C-STORE did with it.

    ``new`` is true when the C-STORE changed what the node holds (a new instance
    or a changed re-send), false for an identical re-send.
    """

    path: Path
    new: bool
    added: Added = Added.NEW
    reused_in: tuple[str, ...] = ()  # other series holding the same SOP Instance UID


def content_digest(data: bytes) -> str:
    """SHA-256 (hex) of a DICOM file's data set, without its preamble and file meta.

    ``data`` is a Part 10 file as the listener spools it: 128-byte preamble,
    ``DICM``, then the group 0002 elements, which start with their group length
    (0002,0000) UL (PS3.10 7.1). Without that layout the whole file is hashed.
    """
    if len(data) >= 144 and data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00":
        length = int.from_bytes(data[140:144], "little")
        start = 144 + length
        if start <= len(data):
            return hashlib.sha256(memoryview(data)[start:]).hexdigest()
    return hashlib.sha256(data).hexdigest()


def _positive_int(value: object) -> int | None:
    if value in (None, ""):
        return None
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


#: C-STORE statuses of an instance that can never be stored (PS3.4 B.2.3, "Error:
#: Cannot understand", C000-CFFF): a data set that cannot be decoded or lacks a UID
#: the node files it under (0xC210, pynetdicom's "failed to decode"), and a UID
#: outside the UI value representation (0xC000): a NUL, a letter, a space, a
#: backslash (several values), more than 64 characters (PS3.5 6.2, 9.1).
CANNOT_UNDERSTAND: Final = 0xC210
INVALID_UID: Final = 0xC000

#: The UI value representation: digits and dots, 1 to 64 characters (PS3.5 6.2).
_UI: Final = re.compile(r"^[0-9.]{1,64}$")


class UnusableInstance(ValueError):
    """A received data set the node can never store, with the C-STORE answer to give.

    ``status`` is :data:`CANNOT_UNDERSTAND` or :data:`INVALID_UID`; ``comment`` is
    the Error Comment (PS3.7 C.4.2.1.4: at most 64 characters, no patient data);
    ``keyword`` names the attribute at fault (the response's Offending Element).
    """

    def __init__(self, comment: str, status: int, keyword: str | None = None) -> None:
        super().__init__(comment)
        self.comment = comment[:64]
        self.status = status
        self.keyword = keyword
        self.reason = "invalid_uid" if status == INVALID_UID else "missing_uid"


def _uid(ds: Dataset, keyword: str, given: str = "", required: bool = True) -> str:
    """The UID ``keyword`` of ``ds`` (else ``given``, from the request), checked."""
    value = ds.get(keyword)
    text = "" if value is None else str(value).strip(" \0")
    text = text or given.strip(" \0")
    if not text:
        if required:
            raise UnusableInstance(f"no {keyword} in the data set", CANNOT_UNDERSTAND, keyword)
        return ""
    if not _UI.match(text):
        raise UnusableInstance(f"{keyword} is not a valid UID (PS3.5 9.1)", INVALID_UID, keyword)
    return text


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
    UnusableInstance
        When the Study, Series or SOP Instance UID is missing (0xC210), or one of
        them or the SOP Class UID is not a valid UID (0xC000).
    Exception
        Whatever decoding one of these elements raises (0xC210 for the listener).
    """
    study = _uid(ds, "StudyInstanceUID")
    series = _uid(ds, "SeriesInstanceUID")
    sop = _uid(ds, "SOPInstanceUID", sop_instance_uid)
    sop_class = _uid(ds, "SOPClassUID", sop_class_uid, required=False)
    return InstanceRecord(
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        study_instance_uid=study,
        series_instance_uid=series,
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        images_in_acquisition=_positive_int(ds.get("ImagesInAcquisition")),
        acquisition_number=_text(ds, "AcquisitionNumber"),
        series_related_instances=_positive_int(ds.get("NumberOfSeriesRelatedInstances")),
    )


def free_bytes(path: Path) -> int:
    """Bytes free for unprivileged writers on the file system holding ``path``."""
    return int(shutil.disk_usage(path).free)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :meth:`Spool.recover` cleaned up after an unclean stop."""

    temp_files: int  # half-written files of C-STOREs that were never acknowledged
    unrecorded_files: int  # renamed but not committed: never acknowledged either
    missing_files: int  # recorded but absent (should never happen; logged as an error)


class Spool:
    """Instance files under ``<storage.dir>/spool/<study>/<series>/<sop>.<digest>.dcm``.

    The digest (16 hex digits of :func:`content_digest`) in the name keeps a
    changed re-send apart from the copy it replaces until the store points at it.

    Parameters
    ----------
    storage_dir : pathlib.Path
        ``storage.dir``.
    store : InstanceStore
        Where instances are recorded.
    min_free_mb : int
        Refuse instances (out of resources) when less space than this is free.
    free_space : callable, optional
        ``free_space(folder) -> bytes``; :func:`free_bytes` by default. Tests pass
        their own probe to drive the low-disk path through real associations.

    Notes
    -----
    Folders are created 0700 and files 0600: the spool holds patient data. No
    symbolic link is followed: each folder under ``spool/`` is opened with
    ``O_NOFOLLOW`` relative to the one above it, and the file written and renamed
    inside that open folder, so a link planted in the spool makes the C-STORE fail
    (0xA700, ``path_outside_storage``) instead of writing elsewhere.

    Raises
    ------
    OutsideStorage
        When ``spool/`` itself is a symbolic link or leads outside ``storage.dir``.
    """

    def __init__(
        self,
        storage_dir: Path,
        store: InstanceStore,
        min_free_mb: int,
        free_space: Callable[[Path], int] = free_bytes,
    ) -> None:
        self.layout = StorageLayout(Path(storage_dir))
        self.root = self.layout.spool
        if not self.root.is_symlink():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.layout.own_dir(self.root)
        os.chmod(self.root, 0o700, follow_symlinks=False)
        self.store = store
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.free_space = free_space
        # Digests of new instances, computed beside their write and fsync, and folder
        # fsyncs, run beside the commit (see save).
        self._helper = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool-helper")

    def recover(self) -> Recovery:
        """Bring the spool and the store back in line after a crash; run before listening.

        Only the listener writes the spool, so with no listener running every
        temporary file is a half-written instance whose C-STORE got no Success,
        and every file missing from the store was renamed but never committed
        (no Success either): both are removed, the sender retries them.
        """
        # Compared by the path under spool/ (<study>/<series>/<sop>.dcm), so a
        # storage.dir that was moved never makes recorded files look unrecorded.
        recorded = {spool_key(name): name for name in self.store.instance_files()}
        temp = unrecorded = 0
        present: set[Path] = set()
        for path in self.root.rglob("*"):
            if not path.is_file():
                continue
            key = path.relative_to(self.root)
            if is_temp(path):
                path.unlink(missing_ok=True)
                temp += 1
            elif key not in recorded:
                path.unlink(missing_ok=True)
                unrecorded += 1
            else:
                present.add(key)
        missing = 0
        for key, name in recorded.items():
            if key not in present:
                missing += 1
                self.store.forget_instance(name)
        return Recovery(temp, unrecorded, missing)

    def _open_folder(self, folder: Path) -> int:
        """Open ``folder`` (``spool/<study>/<series>``), creating what is missing.

        Each part is opened relative to the one above with ``O_NOFOLLOW``, from
        ``spool/`` down: a symbolic link anywhere on the way raises instead of
        being followed.

        Raises
        ------
        SpoolError
            ``path_outside_storage`` for a symbolic link (logged and counted).
        """
        parts = folder.relative_to(self.root).parts
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in parts:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    refused = OutsideStorage(folder, "a symbolic link in the spool")
                    self.store.refuse_path(refused, "spool folder")
                    raise SpoolError(str(refused), "path_outside_storage") from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _undo_add(self, final: Path) -> None:
        """Take back a recorded instance whose rename could not be made durable.

        Its C-STORE is answered with a failure, so the sender sends it again and it
        is written and recorded anew (not taken for a duplicate of this copy).
        """
        with contextlib.suppress(Exception):
            self.store.forget_instance(str(final))
        with contextlib.suppress(OSError):
            final.unlink()

    def path_for(self, record: InstanceRecord, digest: str) -> Path:
        """The spool file of ``record`` with content ``digest`` (hex)."""
        return self.layout.instance_file(
            record.study_instance_uid,
            record.series_instance_uid,
            record.sop_instance_uid,
            digest,
        )

    def save(self, data: bytes, record: InstanceRecord, now: float) -> Spooled:
        """Write ``data`` (a DICOM file: preamble, meta, dataset) durably and record it.

        An instance already recorded in its series with the same content is not
        written again. A changed re-send is written beside the older copy, recorded
        in its place, and the older file removed (a crash in between leaves an
        unrecorded file that :meth:`recover` removes).

        Raises
        ------
        SpoolError
            When the instance cannot be made durable; no partial file is left.
        """
        series, sop = record.series_instance_uid, record.sop_instance_uid
        try:
            # A shared storage.dir (PostgreSQL) that is not mounted here: its empty
            # mount point would take the file, and the mount hide it when it is back.
            if not storage_ready(self.store):
                raise SpoolError(
                    f"{STORE_ID_NAME} missing: the shared storage.dir is not mounted",
                    "storage_not_mounted",
                )
            known = self.store.instance_digest(series, sop)
        except SpoolError:
            raise
        except Exception as exc:  # sqlite3.Error: cannot tell, so cannot answer Success
            raise SpoolError(f"{type(exc).__name__}: {exc}") from exc
        hashing: Future[str] | None = None
        if known is None:
            # A new instance: its digest is computed while its bytes are written and
            # fsync'ed (hashlib and fsync both release the GIL), off the latency of
            # the acknowledgement; it names the file at the rename.
            hashing = self._helper.submit(content_digest, data)
            digest = ""
        else:  # a re-send: compared before anything is written
            digest = content_digest(data)
            if digest == known:
                return Spooled(self.path_for(record, digest), new=False, added=Added.DUPLICATE)
        folder_path = self.path_for(record, "").parent
        tmp = f".{path_part(sop)}.{os.getpid()}.{id(data):x}.tmp"
        folder: int | None = None
        try:
            folder = self._open_folder(folder_path)
            free = self.free_space(folder_path)
            if free - len(data) < self.min_free_bytes:
                raise SpoolError(
                    f"{free // 2**20} MiB free, storage.min_free_mb not met", "disk_low"
                )
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600, dir_fd=folder)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if hashing is not None:
                digest = hashing.result()
            final = self.path_for(record, digest)
            os.replace(tmp, final.name, src_dir_fd=folder, dst_dir_fd=folder)
            # The folder's fsync (the rename made durable) and the row's commit (the
            # store's own fsync) overlap: Success waits for both. A crash in between
            # leaves a row whose file is gone, which recover() forgets: it was never
            # acknowledged.
            syncing = self._helper.submit(os.fsync, folder)
            try:
                result = self.store.add_instance(record, final, len(data), now, digest)
            finally:
                synced = syncing.exception()  # waits: the folder stays open until then
            if synced is not None:
                self._undo_add(final)
                raise synced
        except SpoolError:
            raise
        except Exception as exc:  # OSError, sqlite3.Error: the instance is not durable
            raise SpoolError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if folder is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=folder)
                os.close(folder)
        if result.replaced_path is not None:
            # Superseded and no longer recorded; a failure here leaves a file that
            # recover() removes at the next start. The path comes from the store:
            # removed only inside the spool.
            try:
                old = self.layout.confine(result.replaced_path, self.root, read=True)
                old.unlink(missing_ok=True)
            except OutsideStorage as exc:
                self.store.refuse_path(exc, "replaced instance path")
            except OSError as exc:
                log.warning("spool.old_copy_kept", error=type(exc).__name__)
        if result.added is Added.REPLACED:
            log.info(
                "instance.replaced",
                series_instance_uid=series,
                sop_instance_uid=sop,
                reason="same series and SOP Instance UID, other content: read again",
            )
        if result.reused_in:
            log.warning(
                "instance.sop_uid_reused",
                sop_instance_uid=sop,
                series_instance_uid=series,
                also_in_series=list(result.reused_in),
            )
        return Spooled(
            final,
            new=result.added is not Added.DUPLICATE,
            added=result.added,
            reused_in=result.reused_in,
        )
