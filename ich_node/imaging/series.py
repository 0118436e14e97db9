"""One series' images: which are usable, how they are ordered, and their geometry.

Step 2 of :mod:`ich_node.imaging`: headers only (``stop_before_pixels``); keeps the
axial CT images of one series, drops localizers and images of another orientation,
and orders the slices along the slice normal (``ImagePositionPatient · normal``),
never by ``InstanceNumber``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import RE_VALID_UID

from ich_node.imaging.files import ImagingError, _optional_int, _read_header, _uid

log = structlog.get_logger(__name__)

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
