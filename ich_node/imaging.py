"""Reading head-CT series and turning them into model input: the one preprocessing.

The node's worker and the training code both call :func:`preprocess_hu` (or
:func:`preprocess_series`), so what the model sees in training is exactly what it
sees in service. The pipeline is:

1. :func:`group_series` / :func:`read_series` read headers only
   (``stop_before_pixels``), keep the axial CT images of one series, drop
   localizers and images of another orientation, and order the slices along the
   slice normal (``ImagePositionPatient · normal``), never by ``InstanceNumber``.
2. :func:`load_hu` / :func:`load_series_hu` decode the pixels (native and the
   common compressed transfer syntaxes) and convert them to Hounsfield units.
3. :func:`apply_windows` maps HU to one [0, 1] channel per display window.
4. :func:`resize` pads to a square and resizes with antialiased bilinear
   interpolation.

This module must not import torch at import time: the listener process reads
headers with it and never loads torch. :func:`resize` imports it lazily.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
import pydicom.datadict
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import RE_VALID_UID

log = structlog.get_logger(__name__)

#: Key under which :func:`group_series` returns the files it could not use: not
#: DICOM, unreadable, or without a SeriesInstanceUID. The angle brackets cannot
#: occur in a UID, not even in RSNA's invalid ``ID_...`` ones.
UNREADABLE: Final[str] = "<unreadable>"

#: HU given to padding and to sentinel values below the physical range (air).
AIR_HU: Final[float] = -1024.0

#: PS3.4 B.5: CT Image Storage, the single-frame CT image this module reads.
CT_IMAGE_STORAGE: Final[str] = "1.2.840.10008.5.1.4.1.1.2"
_MULTIFRAME_CT: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}

#: Slices whose normal is further than this from the series' majority normal are
#: dropped as scouts/localizers or stray reformats.
_ORIENTATION_TOL_DEG: Final[float] = 2.0
#: Two slices closer than this along the normal are at "the same position".
_SAME_POSITION_MM: Final[float] = 0.01
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


@dataclass(frozen=True, slots=True)
class Window:
    """A display window in Hounsfield units.

    Attributes
    ----------
    name : str
        Short name (``"brain"``), used in model bundles and logs.
    center : float
        Window center, HU.
    width : float
        Window width, HU; strictly positive.
    """

    name: str
    center: float
    width: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise ValueError(
                f"window {self.name!r}: center and width must be finite, "
                f"got center={self.center!r}, width={self.width!r}"
            )
        if self.width <= 0:
            raise ValueError(f"window {self.name!r}: width must be > 0, got {self.width!r}")


#: Brain, subdural and bone windows: the usual three channels for ICH models.
DEFAULT_WINDOWS: Final[tuple[Window, ...]] = (
    Window("brain", 40, 80),
    Window("subdural", 80, 200),
    Window("bone", 600, 2800),
)


@dataclass(frozen=True, slots=True)
class CTSlice:
    """One axial CT image, from its header.

    Attributes
    ----------
    path : pathlib.Path
        The file.
    sop_instance_uid, sop_class_uid : str
        From the dataset (SOP Class falls back to the file meta's Media Storage
        SOP Class UID, then to CT Image Storage, as RSNA's files omit it).
    position_mm : float
        ``ImagePositionPatient · normal`` (mm), the sort key along the series normal.
    image_position : tuple of 3 float
        ImagePositionPatient (0020,0032), mm, patient coordinates (LPS).
    image_orientation : tuple of 6 float
        ImageOrientationPatient (0020,0037): row then column direction cosines.
    pixel_spacing : tuple of 2 float
        PixelSpacing (0028,0030): (row spacing, column spacing), mm.
    rows, columns : int
        Image matrix.
    instance_number : int or None
        InstanceNumber (0020,0013) when present; informative only, never used to sort.
    """

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    position_mm: float
    image_position: tuple[float, float, float]
    image_orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    instance_number: int | None


@dataclass(frozen=True, slots=True)
class CTSeries:
    """The usable axial CT images of one series, ordered inferior to superior.

    Attributes
    ----------
    study_instance_uid, series_instance_uid : str
        As in the files (possibly invalid UIDs, see ``uids_valid``).
    frame_of_reference_uid : str or None
        FrameOfReferenceUID (0020,0052) when present.
    slices : tuple of CTSlice
        Ordered by ``position_mm`` ascending, i.e. inferior -> superior along ``normal``.
    normal : tuple of 3 float
        Unit slice normal (row cosines × column cosines), flipped if needed so
        that it points superior (+z in LPS patient coordinates).
    gantry_tilt_deg : float
        Signed tilt, degrees: the angle between ``normal`` and the patient z axis,
        positive when the normal leans toward +y (posterior). Taken from
        GantryDetectorTilt (0018,1120) only when the orientation does not encode a
        tilt the tag reports.
    slice_spacing_mm : tuple of float
        ``S - 1`` gaps between consecutive slices along the normal, mm.
    skipped : tuple of (Path, str)
        Files left out of ``slices`` and why.
    uids_valid : bool
        False when a Study, Series or SOP Instance UID is not a valid DICOM UID
        (PS3.5 9.1), as in RSNA's anonymised ``ID_...`` files.
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    slices: tuple[CTSlice, ...]
    normal: tuple[float, float, float]
    gantry_tilt_deg: float
    slice_spacing_mm: tuple[float, ...]
    skipped: tuple[tuple[Path, str], ...]
    uids_valid: bool


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
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass  # no preamble: maybe a raw dataset, try once more below
    except Exception as exc:  # pydicom raises many types on damaged files
        raise ImagingError(f"{path}: not a readable DICOM file ({exc})", path) from exc
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        # force=True "parses" anything; insist on the tags every image has.
        if not _uid(ds, "SOPInstanceUID") or not _uid(ds, "SeriesInstanceUID"):
            raise ValueError("no SOP/Series Instance UID")
    except Exception as exc:
        raise ImagingError(f"{path}: not a DICOM file ({exc})", path) from exc
    return ds


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
        except ImagingError as exc:
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


# ------------------------------------------------------------------------ headers


@dataclass(frozen=True, slots=True)
class _Header:
    """What :func:`read_series` needs from one file, with values already checked."""

    path: Path
    study_uid: str
    series_uid: str
    frame_uid: str | None
    sop_uid: str
    sop_class: str
    modality: str
    image_type: tuple[str, ...]
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    spacing: tuple[float, float] | None
    rows: int | None
    columns: int | None
    instance_number: int | None
    gantry_tilt: float | None
    geometry_error: str | None  # a malformed geometry value; raised only if the image is kept


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> tuple[float, ...] | None:
    """The ``n`` numbers of a multi-valued DS element, None when absent or empty."""
    elem = ds.get(keyword)
    if elem is None or elem == "":
        return None
    values = list(elem) if isinstance(elem, Sequence) and not isinstance(elem, str) else [elem]
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ImagingError(f"{path}: {keyword} is not numeric: {elem!r}", path) from exc
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ImagingError(f"{path}: {keyword} must hold {n} finite numbers, got {elem!r}", path)
    return out


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


def _header(path: Path) -> _Header:
    ds = _read_header(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # invalid UIDs (RSNA)
        meta = getattr(ds, "file_meta", None)
        sop_class = _uid(ds, "SOPClassUID")
        if not sop_class and meta is not None:
            sop_class = _uid(meta, "MediaStorageSOPClassUID")
        sop_uid = _uid(ds, "SOPInstanceUID")
        if not sop_uid and meta is not None:
            sop_uid = _uid(meta, "MediaStorageSOPInstanceUID")
        image_type = ds.get("ImageType", [])
        if isinstance(image_type, str):
            image_type = image_type.split("\\")
        frame_uid = _uid(ds, "FrameOfReferenceUID") or None
        geometry_error = None
        try:
            position = _floats(ds, "ImagePositionPatient", 3, path)
            orientation = _floats(ds, "ImageOrientationPatient", 6, path)
            spacing = _floats(ds, "PixelSpacing", 2, path)
        except ImagingError as exc:
            geometry_error = str(exc)
            position = orientation = spacing = None
        try:
            tilt = _floats(ds, "GantryDetectorTilt", 1, path)
        except ImagingError:
            tilt = None  # informative only
        return _Header(
            path=path,
            study_uid=_uid(ds, "StudyInstanceUID"),
            series_uid=_uid(ds, "SeriesInstanceUID"),
            frame_uid=frame_uid,
            sop_uid=sop_uid,
            sop_class=sop_class,
            modality=str(ds.get("Modality", "") or "").upper(),
            image_type=tuple(str(v).upper() for v in image_type),
            position=position,  # type: ignore[arg-type]
            orientation=orientation,  # type: ignore[arg-type]
            spacing=spacing,  # type: ignore[arg-type]
            rows=_optional_int(ds, "Rows"),
            columns=_optional_int(ds, "Columns"),
            instance_number=_optional_int(ds, "InstanceNumber"),
            gantry_tilt=tilt[0] if tilt else None,
            geometry_error=geometry_error,
        )


def _why_not_ct_image(h: _Header) -> str | None:
    """Reason a header is not an image this module reads, or None."""
    if h.modality and h.modality != "CT":
        return f"modality {h.modality}, not CT"
    if h.sop_class in _MULTIFRAME_CT:
        return f"{_MULTIFRAME_CT[h.sop_class]} (multi-frame) is not supported"
    if h.sop_class and h.sop_class != CT_IMAGE_STORAGE:
        return f"SOP class {h.sop_class} is not CT Image Storage"
    if not h.modality and h.sop_class != CT_IMAGE_STORAGE:
        return "no Modality and no CT SOP class"
    # PS3.3 C.8.2.1.1.1: ImageType value 3 is AXIAL or LOCALIZER for CT.
    if "LOCALIZER" in h.image_type:
        return "localizer (ImageType LOCALIZER)"
    return None


def _unit_normal(orientation: Sequence[float], path: Path) -> np.ndarray:
    """Superior-pointing unit normal of an image plane, shape (3,) float64."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    # PS3.3 C.7.6.2.1.1: row and column cosines are unit vectors and orthogonal.
    if not (0.99 < nr < 1.01 and 0.99 < nc < 1.01) or abs(float(row @ col)) > 0.01:
        raise ImagingError(
            f"{path}: ImageOrientationPatient {list(orientation)} is not two orthogonal "
            "unit vectors",
            path,
        )
    normal = np.cross(row / nr, col / nc)
    normal /= np.linalg.norm(normal)
    return -normal if normal[2] < 0 else normal


def _tilt_deg(normal: np.ndarray) -> float:
    """Signed angle (degrees) between a superior-pointing normal and +z."""
    magnitude = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    return magnitude if normal[1] >= 0 else -magnitude


def read_series(paths: Sequence[Path], *, max_tilt_deg: float = 30.0) -> CTSeries:
    """Read the headers of one series and order its axial CT images.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        Files of one series (files of other series are skipped: the series with
        the most usable images wins).
    max_tilt_deg : float
        Images whose normal is further than this from the patient z axis are
        not axial and are skipped.

    Returns
    -------
    CTSeries
        Slices ordered by ``ImagePositionPatient · normal`` (inferior ->
        superior), with every left-out file and its reason in ``skipped``.

    Raises
    ------
    ImagingError
        When no usable image remains (the message lists why each file was left
        out), when an image misses mandatory geometry (ImagePositionPatient,
        ImageOrientationPatient, PixelSpacing, Rows, Columns), or on conflicting
        geometry (two images at one position, mixed frames of reference or
        studies, two series with as many images each).
    """
    skipped: list[tuple[Path, str]] = []
    candidates: list[_Header] = []
    seen_sop: set[str] = set()
    for path in sorted(dict.fromkeys(Path(p) for p in paths)):
        try:
            h = _header(path)
        except ImagingError as exc:
            skipped.append((path, f"unreadable: {exc}"))
            continue
        reason = _why_not_ct_image(h)
        if reason is None and h.sop_uid in seen_sop:
            reason = f"duplicate SOP Instance UID {h.sop_uid}"
        if reason is not None:
            skipped.append((path, reason))
            continue
        seen_sop.add(h.sop_uid)
        candidates.append(h)

    if not candidates:
        raise _nothing_usable(paths, skipped)

    # One series: the one with the most images; a tie is ambiguous.
    counts = Counter(h.series_uid for h in candidates).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        raise ImagingError(
            f"{candidates[0].path.parent}: files of {len(counts)} series with "
            f"{counts[0][1]} images each; group them with group_series() first",
            candidates[0].path,
        )
    series_uid = counts[0][0]
    kept: list[_Header] = []
    for h in candidates:
        if h.series_uid != series_uid:
            skipped.append((h.path, f"other series {h.series_uid}"))
        else:
            kept.append(h)

    # Mandatory geometry: PS3.3 C.7.6.2 (Image Plane) and C.7.6.3 (Image Pixel).
    normals: list[np.ndarray] = []
    for h in kept:
        missing = [
            name
            for name, value in (
                ("ImagePositionPatient", h.position),
                ("ImageOrientationPatient", h.orientation),
                ("PixelSpacing", h.spacing),
                ("Rows", h.rows),
                ("Columns", h.columns),
            )
            if value is None
        ]
        if h.geometry_error is not None:
            raise ImagingError(h.geometry_error, h.path)
        if missing:
            raise ImagingError(f"{h.path}: missing {', '.join(missing)}", h.path)
        assert h.orientation is not None  # checked above; for mypy
        normals.append(_unit_normal(h.orientation, h.path))

    # Not axial: normal too far from the patient z axis.
    axial: list[tuple[_Header, np.ndarray]] = []
    for h, n in zip(kept, normals, strict=True):
        tilt = abs(_tilt_deg(n))
        if tilt > max_tilt_deg:
            skipped.append((h.path, f"not axial ({tilt:.1f} deg from the patient z axis)"))
        else:
            axial.append((h, n))
    if not axial:
        raise _nothing_usable(paths, skipped)

    # Majority orientation; the rest are scouts or stray reformats.
    stack = np.stack([n for _, n in axial])
    cos_tol = math.cos(math.radians(_ORIENTATION_TOL_DEG))
    agree = (stack @ stack.T) >= cos_tol
    ref = stack[int(np.argmax(agree.sum(axis=1)))]
    normal = stack[(stack @ ref) >= cos_tol].mean(axis=0)
    normal /= np.linalg.norm(normal)
    usable: list[tuple[_Header, float]] = []
    for h, n in axial:
        if float(n @ ref) < cos_tol:
            angle = math.degrees(math.acos(max(-1.0, min(1.0, float(n @ ref)))))
            skipped.append(
                (h.path, f"orientation {angle:.1f} deg from the series majority (scout?)")
            )
        else:
            assert h.position is not None
            usable.append((h, float(np.asarray(h.position) @ normal)))
    usable.sort(key=lambda item: item[1])

    _check_consistency([h for h, _ in usable])
    for (h0, p0), (h1, p1) in itertools.pairwise(usable):
        if p1 - p0 < _SAME_POSITION_MM:
            raise ImagingError(
                f"{h1.path}: same position ({p1:.3f} mm along the normal) as {h0.path}; "
                "two images at one position (several phases or echoes in one series?)",
                h1.path,
            )

    tilt = _tilt_deg(normal)
    tag_tilts = {h.gantry_tilt for h, _ in usable if h.gantry_tilt is not None}
    if len(tag_tilts) == 1:
        tag_tilt = tag_tilts.pop()
        if abs(tilt) < 0.5 and abs(tag_tilt) >= 0.5:
            # Some scanners report the tilt only in (0018,1120) and keep an axial
            # orientation (the images are then sheared); report what the tag says.
            tilt = tag_tilt
        elif abs(abs(tilt) - abs(tag_tilt)) > 1.0:
            log.warning(
                "imaging.tilt_mismatch", series_uid=series_uid, orientation=tilt, tag=tag_tilt
            )

    first = usable[0][0]
    slices = tuple(
        CTSlice(
            path=h.path,
            sop_instance_uid=h.sop_uid,
            sop_class_uid=h.sop_class or CT_IMAGE_STORAGE,
            position_mm=pos,
            image_position=h.position,  # type: ignore[arg-type]
            image_orientation=h.orientation,  # type: ignore[arg-type]
            pixel_spacing=h.spacing,  # type: ignore[arg-type]
            rows=h.rows,  # type: ignore[arg-type]
            columns=h.columns,  # type: ignore[arg-type]
            instance_number=h.instance_number,
        )
        for h, pos in usable
    )
    uids = [first.study_uid, series_uid, *(s.sop_instance_uid for s in slices)]
    for path, reason in skipped:
        log.info("imaging.skipped", series_uid=series_uid, path=str(path), reason=reason)
    return CTSeries(
        study_instance_uid=first.study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=first.frame_uid,
        slices=slices,
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        gantry_tilt_deg=float(tilt),
        slice_spacing_mm=tuple(float(b - a) for (_, a), (_, b) in itertools.pairwise(usable)),
        skipped=tuple(skipped),
        uids_valid=all(_valid_uid(u) for u in uids),
    )


def _valid_uid(uid: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros in a component, 64 characters at most."""
    return 0 < len(uid) <= 64 and RE_VALID_UID.match(uid) is not None


def _nothing_usable(paths: Sequence[Path], skipped: list[tuple[Path, str]]) -> ImagingError:
    shown = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
    more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
    first = skipped[0][0] if skipped else None
    return ImagingError(
        f"no usable axial CT image among {len(paths)} file(s): {shown}{more}", first
    )


def _check_consistency(headers: Sequence[_Header]) -> None:
    """Raise ImagingError when the kept images disagree on study or frame of reference."""
    first = headers[0]
    for h in headers[1:]:
        if h.study_uid != first.study_uid:
            raise ImagingError(
                f"{h.path}: StudyInstanceUID differs from {first.path} within one series", h.path
            )
        # PS3.3 C.7.4.1.1.1: positions are only comparable in one frame of reference.
        if h.frame_uid != first.frame_uid:
            raise ImagingError(
                f"{h.path}: FrameOfReferenceUID differs from {first.path} within one series",
                h.path,
            )


# ------------------------------------------------------------------------- pixels


def _describe(path_or_ds: Any) -> str:
    if isinstance(path_or_ds, Dataset):
        name = getattr(path_or_ds, "filename", None)
        return str(name) if name else "<in-memory dataset>"
    return str(path_or_ds)


def load_hu(path_or_ds: Path | str | Dataset) -> np.ndarray:
    """Decode one CT image to Hounsfield units.

    Parameters
    ----------
    path_or_ds : pathlib.Path, str or pydicom.dataset.Dataset
        A file, or a dataset read with its pixel data. Native and compressed
        transfer syntaxes (JPEG baseline/extended, JPEG lossless, JPEG-LS,
        JPEG 2000, RLE) are decoded through pydicom's pixel handlers
        (pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls).

    Returns
    -------
    numpy.ndarray
        (H, W) float32, HU = stored value × RescaleSlope + RescaleIntercept
        (1 and 0 when absent). Pixel padding (PixelPaddingValue, with
        PixelPaddingRangeLimit) and every value below -1024 HU (sentinels such as
        -2000 or -3024 outside the reconstruction field of view) become -1024 (air).

    Raises
    ------
    ImagingError
        Naming the file: unreadable, no or corrupt/truncated pixel data, several
        frames or samples, zero or non-finite slope or intercept.
    """
    name = _describe(path_or_ds)
    path = Path(name) if not isinstance(path_or_ds, Dataset) else None
    if isinstance(path_or_ds, Dataset):
        ds = path_or_ds
    else:
        try:
            ds = pydicom.dcmread(path_or_ds)
        except InvalidDicomError:
            try:
                ds = pydicom.dcmread(path_or_ds, force=True)
            except Exception as exc:
                raise ImagingError(f"{name}: not a DICOM file ({exc})", path) from exc
        except Exception as exc:
            raise ImagingError(f"{name}: not a readable DICOM file ({exc})", path) from exc

    if "PixelData" not in ds:
        raise ImagingError(f"{name}: no Pixel Data (7FE0,0010)", path)
    frames = _optional_int(ds, "NumberOfFrames") or 1
    if frames != 1:
        raise ImagingError(f"{name}: {frames} frames; only single-frame CT images are read", path)
    if (_optional_int(ds, "SamplesPerPixel") or 1) != 1:
        raise ImagingError(f"{name}: not a grayscale image (SamplesPerPixel != 1)", path)
    slope = _rescale(ds, "RescaleSlope", 1.0, name, path)
    intercept = _rescale(ds, "RescaleIntercept", 0.0, name, path)
    if slope == 0.0:
        raise ImagingError(f"{name}: RescaleSlope is 0", path)
    if "RescaleSlope" not in ds and "ModalityLUTSequence" in ds:
        raise ImagingError(f"{name}: Modality LUT Sequence instead of rescale: unsupported", path)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            stored = ds.pixel_array
    except Exception as exc:  # decoders raise ValueError, RuntimeError, ...; all mean corrupt
        raise ImagingError(f"{name}: cannot decode the pixel data ({exc})", path) from exc
    if stored.ndim != 2:
        raise ImagingError(f"{name}: pixel data has shape {stored.shape}, expected (H, W)", path)

    hu = stored.astype(np.float64) * slope + intercept
    pad = _padding_mask(ds, stored)
    if pad is not None:
        hu[pad] = AIR_HU
    # Nothing physical lies below air; scanners write -1500..-3024 outside the FOV.
    np.maximum(hu, AIR_HU, out=hu)
    return hu.astype(np.float32)


def _rescale(ds: Dataset, keyword: str, default: float, name: str, path: Path | None) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise ImagingError(f"{name}: {keyword} is not a number: {value!r}", path) from exc
    if not math.isfinite(out):
        raise ImagingError(f"{name}: {keyword} is not finite: {value!r}", path)
    return out


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Stored values that are padding, PS3.3 C.7.5.1.1.2; None when no padding tag."""
    pad = _optional_int(ds, "PixelPaddingValue")
    if pad is None:
        return None
    limit = _optional_int(ds, "PixelPaddingRangeLimit")
    bits = _optional_int(ds, "BitsAllocated") or 16
    signed = (_optional_int(ds, "PixelRepresentation") or 0) == 1

    def as_signed(v: int) -> int:
        # US/SS ambiguity (PS3.5 A.1 c): an SS value read as US wraps around.
        return v - (1 << bits) if signed and v >= (1 << (bits - 1)) else v

    pad = as_signed(pad)
    if limit is None:
        return stored == pad
    limit = as_signed(limit)
    return (stored >= min(pad, limit)) & (stored <= max(pad, limit))


def load_series_hu(series: CTSeries) -> np.ndarray:
    """Decode every slice of a series to HU.

    Parameters
    ----------
    series : CTSeries
        From :func:`read_series`.

    Returns
    -------
    numpy.ndarray
        (S, H, W) float32 HU, in ``series.slices`` order (inferior -> superior).

    Raises
    ------
    ImagingError
        When slices differ in matrix size, or any slice fails :func:`load_hu`.
    """
    if not series.slices:
        raise ImagingError(f"series {series.series_instance_uid}: no slices")
    first = series.slices[0]
    for s in series.slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise ImagingError(
                f"{s.path}: matrix {s.rows}x{s.columns} differs from {first.path} "
                f"({first.rows}x{first.columns}) in one series",
                s.path,
            )
    out = np.empty((len(series.slices), first.rows, first.columns), dtype=np.float32)
    for i, s in enumerate(series.slices):
        hu = load_hu(s.path)
        if hu.shape != out.shape[1:]:
            raise ImagingError(
                f"{s.path}: pixel data is {hu.shape}, header says {out.shape[1:]}", s.path
            )
        out[i] = hu
    return out


# ---------------------------------------------------------------- model input


def apply_windows(hu: np.ndarray, windows: Sequence[Window] = DEFAULT_WINDOWS) -> np.ndarray:
    """Map HU to one [0, 1] channel per window.

    ``(HU - (center - width / 2)) / width``, clipped to [0, 1]: a plain linear
    ramp, not PS3.3 C.11.2.1.2.1's ``center - 0.5`` / ``width - 1`` display rule,
    so that HU 40 in the (40, 80) brain window is exactly 0.5.

    Parameters
    ----------
    hu : numpy.ndarray
        (..., H, W) HU, any real dtype.
    windows : sequence of Window
        One output channel per window, in this order.

    Returns
    -------
    numpy.ndarray
        (..., C, H, W) float32 in [0, 1], ``C = len(windows)``.
    """
    if not windows:
        raise ValueError("windows must not be empty")
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim < 2:
        raise ValueError(f"hu must have shape (..., H, W), got {arr.shape}")
    out = np.empty((*arr.shape[:-2], len(windows), *arr.shape[-2:]), dtype=np.float32)
    for c, w in enumerate(windows):
        channel = out[..., c, :, :]
        np.subtract(arr, np.float32(w.center - w.width / 2), out=channel)
        np.divide(channel, np.float32(w.width), out=channel)
        np.clip(channel, 0.0, 1.0, out=channel)
    return out


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square with 0, then resize (bilinear, antialiased).

    Parameters
    ----------
    images : numpy.ndarray
        (S, C, H, W) float32.
    size : int
        Output height and width, pixels.

    Returns
    -------
    numpy.ndarray
        (S, C, size, size) float32. Non-square images are centred in an
        ``max(H, W)`` square of zeros first, keeping their aspect ratio.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 4:
        raise ValueError(f"images must have shape (S, C, H, W), got {arr.shape}")
    s, c, h, w = arr.shape
    if h != w:
        side = max(h, w)
        square = np.zeros((s, c, side, side), dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        square[:, :, top : top + h, left : left + w] = arr
        arr = square
    if arr.shape[-1] == size or s == 0:
        return np.ascontiguousarray(arr) if s else np.zeros((0, c, size, size), np.float32)

    import torch  # lazily: the listener process imports this module without torch
    import torch.nn.functional as F

    with torch.no_grad():
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        out = F.interpolate(
            tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return out.numpy().astype(np.float32, copy=False)


def _chunks(n: int, step: int) -> Iterator[slice]:
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def preprocess_hu(hu: np.ndarray, windows: Sequence[Window], size: int) -> np.ndarray:
    """The model input: ``resize(apply_windows(hu, windows), size)``.

    Both the node's worker and training call this, so they cannot drift. Works
    on chunks of slices to bound memory on long series.

    Parameters
    ----------
    hu : numpy.ndarray
        (S, H, W) HU.
    windows : sequence of Window
        Channels, in order.
    size : int
        Output side, pixels.

    Returns
    -------
    numpy.ndarray
        (S, C, size, size) float32 in [0, 1].
    """
    arr = np.asarray(hu)
    if arr.ndim != 3:
        raise ValueError(f"hu must have shape (S, H, W), got {arr.shape}")
    if not windows:
        raise ValueError("windows must not be empty")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    out = np.empty((arr.shape[0], len(windows), size, size), dtype=np.float32)
    for part in _chunks(arr.shape[0], 16):
        out[part] = resize(apply_windows(arr[part], windows), size)
    np.clip(out, 0.0, 1.0, out=out)  # float rounding in the filter must not leave [0, 1]
    return out


def preprocess_series(series: CTSeries, windows: Sequence[Window], size: int) -> np.ndarray:
    """Decode and preprocess a series: :func:`load_series_hu` then :func:`preprocess_hu`.

    Parameters
    ----------
    series : CTSeries
        From :func:`read_series`.
    windows : sequence of Window
        Channels, in order.
    size : int
        Output side, pixels.

    Returns
    -------
    numpy.ndarray
        (S, C, size, size) float32 in [0, 1], slices inferior -> superior.
    """
    return preprocess_hu(load_series_hu(series), windows, size)
