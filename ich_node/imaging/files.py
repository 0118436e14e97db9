"""Finding DICOM files and grouping them by series, reading headers only.

Step 1 of :mod:`ich_node.imaging`: which files are worth reading, and which series
each belongs to. The listener process uses this without torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import pydicom
import pydicom.datadict
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ich_node.imaging.records import Refusal, one_line

log = structlog.get_logger(__name__)

#: Key under which :func:`group_series` returns the files it could not use: not
#: DICOM, unreadable, or without a SeriesInstanceUID. The angle brackets cannot
#: occur in a UID, not even in RSNA's invalid ``ID_...`` ones.
UNREADABLE: Final[str] = "<unreadable>"

#: Suffixes of files inside folders that are certainly not DICOM (manifests, labels).
_NOT_DICOM_SUFFIXES: Final[frozenset[str]] = frozenset(
    {".md", ".txt", ".csv", ".json", ".yaml", ".yml", ".png", ".jpg", ".jpeg", ".py", ".zip"}
)


class ImagingError(ValueError):
    """An input that cannot be used; the message names the file and what is wrong.

    Parameters
    ----------
    message : str
        What is wrong, naming the file.
    path : pathlib.Path or None
        The offending file, when there is one, for callers that record it.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        # Across a process decode pool: the path travels with the message.
        return (type(self), (str(self), self.path))

    def refusal(self, series_instance_uid: str) -> Refusal:
        """This error as the typed record of a refused series (one line)."""
        return Refusal(series_instance_uid, one_line(str(self)))


class SeriesRefused(ImagingError):
    """The content itself is refused (not HU, not a head CT): reading again cannot help.

    The worker records such a job as parked at once, with the reason, instead of
    retrying it; everything else about it is an :class:`ImagingError`.
    """


class StorageUnavailable(OSError):
    """A file could not be opened or read: the storage failed, not the image.

    The operating system's error (no such file, I/O error, stale NFS handle,
    permission denied) on a file the store recorded. It is never taken for a
    damaged image, left out of a series or refused: a series read without it
    would be read silently short. The worker records the job for a retry.

    Parameters
    ----------
    message : str
        What failed, naming the file.
    path : pathlib.Path or None
        The file.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def storage_error(exc: BaseException, path: Path | None) -> StorageUnavailable | None:
    """``exc`` as :class:`StorageUnavailable` when the operating system raised it, else None.

    Errors that come with an ``errno`` are the system's (the file, its disk or its
    mount); decoders' errors on damaged content have none.
    """
    if isinstance(exc, StorageUnavailable):
        return exc
    if isinstance(exc, OSError) and exc.errno is not None:
        return StorageUnavailable(f"{path}: cannot be read ({exc.strerror or exc})", path)
    return None


# --------------------------------------------------------------------------- files


def _looks_like_dicom(path: Path) -> bool:
    """True for a file inside a folder worth trying as DICOM."""
    if path.name.startswith(".") or path.name == "DICOMDIR":
        return False
    if path.suffix.lower() in _NOT_DICOM_SUFFIXES:
        return False
    if path.suffix.lower() in {".dcm", ".dicom", ".ima"}:
        return True  # claims to be DICOM: kept, so that a broken one is reported
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return True  # let the reader report it
    # PS3.10 7.1: a 128-byte preamble then "DICM".
    if head[128:132] == b"DICM":
        return True
    # A raw dataset (no preamble) starts with a group 0x0002 or 0x0008 tag,
    # little endian; this keeps LICENSE or README files out.
    return head[:2] in (b"\x02\x00", b"\x08\x00")


def iter_dicom_files(inputs: Iterable[Path]) -> list[Path]:
    """List the candidate DICOM files among files and folders.

    Parameters
    ----------
    inputs : iterable of pathlib.Path
        Files (always kept) and folders (searched recursively; hidden files,
        ``DICOMDIR`` and files that are plainly not DICOM, such as ``.md`` or
        ``.csv``, are left out).

    Returns
    -------
    list of pathlib.Path
        Sorted, without duplicates.

    Raises
    ------
    ImagingError
        When an input does not exist.
    """
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and _looks_like_dicom(p))
        elif path.is_file():
            found.add(path)
        else:
            raise ImagingError(f"{path}: no such file or folder", path)
    return sorted(found)


def _read_header(path: Path) -> Dataset:
    """Read one file's header (no pixels); ImagingError if it is not DICOM."""
    return read_dataset(path, pixels=False)


def read_dataset(path: Path | str, *, pixels: bool = True, defer: bool = False) -> Dataset:
    """Read one DICOM file, leniently, with the transfer syntax it was read with.

    The header reader and the pixel reader both come here, so a file one accepts
    the other decodes: a bare data set (no preamble, no ``DICM``, no file meta,
    PS3.10 7.1 not followed) is read with ``force`` and its detected encoding is
    written into ``file_meta.TransferSyntaxUID`` (Implicit VR Little Endian,
    Explicit VR Little or Big Endian), which pydicom's pixel handlers need.

    Parameters
    ----------
    path : pathlib.Path or str
        The file.
    pixels : bool
        False: stop before Pixel Data (headers only).
    defer : bool
        With ``pixels``: defer reading values over 4 KiB (Pixel Data), so that its
        declared length and offset can be checked before anything is decoded.

    Returns
    -------
    pydicom.dataset.Dataset

    Raises
    ------
    ImagingError
        Not DICOM, or damaged beyond reading; names the file.
    StorageUnavailable
        The operating system could not open or read it (missing, I/O error).
    """
    path = Path(path)
    kwargs: dict[str, Any] = {"stop_before_pixels": not pixels}
    if pixels and defer:
        kwargs["defer_size"] = 4096
    try:
        ds = pydicom.dcmread(path, **kwargs)
    except InvalidDicomError:
        ds = None  # no preamble: maybe a raw dataset, try once more below
    except Exception as exc:  # pydicom raises many types on damaged files
        raise storage_error(exc, path) or ImagingError(
            f"{path}: not a readable DICOM file ({exc})", path
        ) from exc
    if ds is None:
        try:
            ds = pydicom.dcmread(path, force=True, **kwargs)
            # force=True "parses" anything; insist on the tags every image has.
            if not _uid(ds, "SOPInstanceUID") or not _uid(ds, "SeriesInstanceUID"):
                raise ValueError("no SOP/Series Instance UID")
        except Exception as exc:
            raise storage_error(exc, path) or ImagingError(
                f"{path}: not a DICOM file ({exc})", path
            ) from exc
    detected_transfer_syntax(ds)
    return ds


def detected_transfer_syntax(ds: Dataset) -> str | None:
    """Give a data set read without file meta the transfer syntax it was read with.

    Returns the UID written into ``ds.file_meta.TransferSyntaxUID`` when it was
    missing (PS3.5 A.1 Implicit VR Little Endian, A.2 Explicit VR Little Endian,
    A.3 Explicit VR Big Endian), else None. Encapsulated (compressed) data cannot
    be recognised this way and are left for the pixel reader to refuse.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return None
    encoding = getattr(ds, "original_encoding", None)
    if not encoding or encoding[0] is None:
        return None
    implicit, little = encoding
    uid = (
        ImplicitVRLittleEndian
        if implicit and little
        else ExplicitVRLittleEndian
        if little
        else ExplicitVRBigEndian
    )
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    ds._detected_transfer_syntax = str(uid)  # read by the series reader for its note
    return str(uid)


def group_series(inputs: Iterable[Path]) -> dict[str, list[Path]]:
    """Group files by SeriesInstanceUID, reading headers only.

    Parameters
    ----------
    inputs : iterable of pathlib.Path
        Files and folders, as for :func:`iter_dicom_files`.

    Returns
    -------
    dict of str to list of pathlib.Path
        SeriesInstanceUID -> sorted files. Files that are not readable DICOM or
        have no SeriesInstanceUID are returned under the key :data:`UNREADABLE`
        (present only when there are such files), so one bad file never hides
        the good series and is never silently dropped.
    """
    groups: dict[str, list[Path]] = {}
    bad: list[Path] = []
    for path in iter_dicom_files(inputs):
        try:
            ds = _read_header(path)
            uid = _uid(ds, "SeriesInstanceUID")
        except (ImagingError, StorageUnavailable) as exc:
            log.warning("imaging.unreadable", path=str(path), reason=str(exc))
            bad.append(path)
            continue
        if not uid:
            log.warning("imaging.no_series_uid", path=str(path))
            bad.append(path)
            continue
        groups.setdefault(uid, []).append(path)
    if bad:
        groups[UNREADABLE] = bad
    return groups


def _optional_int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID's text without pydicom's validation (RSNA's ``ID_...`` values would warn)."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    elem = ds.get_item(tag)
    value = elem.value if elem is not None else None
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return str(value or "").strip()
