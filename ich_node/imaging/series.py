"""One series' images: which are usable, how they are ordered, and their geometry.

Step 2 of :mod:`ich_node.imaging`, headers only (pixel bytes are never decoded here).
:func:`read_series` reads a series the way a radiologist would, and says what it did:

- images that cannot be placed (no ImagePositionPatient, a localizer, another
  orientation or matrix, pixel data shorter than the header says, another frame of
  reference) are left out, each with a reason (:class:`~ich_node.imaging.records.Dropped`);
  the series is refused only when nothing readable remains;
- a series holding several reconstructions (kernel, slice thickness, ImageType,
  pixel spacing, orientation, matrix) is split into homogeneous stacks; the
  preferred one is read and the others are recorded as skipped. Parts of one
  volume that differ only in thickness along z (a thin posterior fossa and thicker
  slices above) stay one stack;
- two images at one position are all read, in a deterministic order (position,
  AcquisitionNumber, InstanceNumber, SOP Instance UID) with a note; only several
  complete volumes at the same positions are split;
- slices are ordered along the slice normal (``ImagePositionPatient · normal``,
  :func:`slice_position_mm`), never by ``InstanceNumber``;
- coverage (extent, spacing, holes) is measured and every irregularity becomes a
  :class:`~ich_node.imaging.records.Note`.

Enhanced CT and Legacy Converted Enhanced CT images (multi-frame) are read frame by
frame from their functional groups; each frame is one :class:`CTSlice`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import RE_VALID_UID, UID

from ich_node.imaging.files import (
    ImagingError,
    StorageUnavailable,
    _optional_int,
    _uid,
    read_dataset,
)
from ich_node.imaging.orientation import Reorientation
from ich_node.imaging.pixels import (
    HUTransform,
    NativePixels,
    StoredSlice,
    decode_stored,
    functional_group,
    hu_transform,
    native_pixels,
    pixel_data_problem,
    read_native,
)
from ich_node.imaging.records import (
    LOSSY_TRANSFER_SYNTAXES,
    Coverage,
    Dropped,
    LossyCompression,
    Note,
    describe_lossy,
)

if TYPE_CHECKING:
    from ich_node.imaging.decode import DecodePool

log = structlog.get_logger(__name__)

#: PS3.4 B.5: CT Image Storage, the single-frame CT image.
CT_IMAGE_STORAGE: Final[str] = "1.2.840.10008.5.1.4.1.1.2"
#: PS3.4 B.5: the multi-frame CT images, read frame by frame.
MULTIFRAME_CT: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}

#: Soft-tissue / brain reconstruction kernels, in order of preference (case-insensitive
#: substrings of ConvolutionKernel): GE STANDARD/SOFT, Siemens H/J/Hr/Br 3x-4x,
#: Canon/Toshiba FC2x, Philips UB/UC/A. The default of ``series.preferred_kernels``.
DEFAULT_PREFERRED_KERNELS: Final[tuple[str, ...]] = (
    "BRAIN",
    "STANDARD",
    "STD",
    "SOFT",
    "H31",
    "H30",
    "J30",
    "J40",
    "H40",
    "HR38",
    "HR40",
    "BR36",
    "BR38",
    "FC21",
    "FC26",
    "FC2",
    "UB",
    "UC",
)
#: Kernels that are never preferred when another stack exists (bone, lung, sharp).
_SHARP_KERNELS: Final[tuple[str, ...]] = (
    "BONE",
    "LUNG",
    "SHARP",
    "EDGE",
    "DETAIL",
    "H60",
    "H70",
    "J70",
    "HR60",
    "HR64",
    "HR68",
    "BR60",
    "BR64",
    "FC30",
    "FC8",
    "YC",
    "YD",
)
#: Images whose normal is within this angle share an orientation.
_ORIENTATION_TOL_DEG: Final[float] = 2.0
#: Two slices closer than this along the normal are at "the same position".
_SAME_POSITION_MM: Final[float] = 0.01
#: A stack with at least this many images is a reconstruction, not a stray image.
_MIN_STACK: Final[int] = 3
#: Default of ``series.max_gap_mm``: a larger hole makes the coverage incomplete.
DEFAULT_MAX_GAP_MM: Final[float] = 12.0


@dataclass(frozen=True, slots=True)
class CTSlice:
    """One axial CT image (or one frame of a multi-frame CT image), from its header.

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
    frame_number : int or None
        1-based frame of a multi-frame image (Referenced Frame Number in results);
        None for a single-frame image.
    slice_thickness_mm : float or None
        SliceThickness (0018,0050) when present.
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
    frame_number: int | None = None
    slice_thickness_mm: float | None = None
    # Lossy-compressed on the way (LossyImageCompression "01" or a lossy transfer syntax).
    lossy: LossyCompression | None = None
    # Where an uncompressed image's values lie in the file, from the header read: then
    # decode_slice reads them without parsing the file again (None: pydicom decodes).
    native: NativePixels | None = field(default=None, compare=False, repr=False)


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
        Ordered by ``position_mm`` ascending, i.e. inferior -> superior along
        ``normal``; images at one position by AcquisitionNumber, InstanceNumber,
        SOP Instance UID.
    normal : tuple of 3 float
        Unit slice normal (row cosines × column cosines), flipped if needed so
        that it points superior (+z in LPS patient coordinates).
    gantry_tilt_deg : float
        Signed tilt, degrees: the angle between ``normal`` and the patient z axis,
        positive when the normal leans toward +y (posterior). Taken from
        GantryDetectorTilt (0018,1120) only when the orientation does not encode a
        tilt the tag reports.
    slice_spacing_mm : tuple of float
        ``S - 1`` distances between consecutive slices along the normal, mm (0 for
        two images at one position).
    skipped : tuple of (Path, str)
        Files left out of ``slices`` and why (``dropped`` as path/reason pairs).
    uids_valid : bool
        False when a Study, Series or SOP Instance UID is not a valid DICOM UID
        (PS3.5 9.1), as in RSNA's anonymised ``ID_...`` files.
    dropped : tuple of Dropped
        Every image left out, with its SOP Instance UID and reason.
    notes : tuple of Note
        Every correction and irregularity, as readable lines.
    coverage : Coverage or None
        Extent, spacing and holes of ``slices`` (None only for hand-built series).
    max_gap_mm : float
        The ``series.max_gap_mm`` this series was read with.
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
    dropped: tuple[Dropped, ...] = ()
    notes: tuple[Note, ...] = ()
    coverage: Coverage | None = None
    max_gap_mm: float = DEFAULT_MAX_GAP_MM

    @property
    def lossy(self) -> LossyCompression | None:
        """How the series' lossy-compressed slices were compressed, or None when none was.

        The methods of all of them, in order of first appearance; the ratios only
        when every lossy slice gives the same ones (else they are not known for the
        series as a whole); the transfer syntax when they all came in one.
        """
        found = [s.lossy for s in self.slices if s.lossy is not None]
        if not found:
            return None
        methods = tuple(dict.fromkeys(m for lossy in found for m in lossy.methods))
        pairs = {(lossy.methods, lossy.ratios) for lossy in found}
        ratios = found[0].ratios if len(pairs) == 1 and found[0].methods == methods else ()
        syntaxes = {lossy.transfer_syntax for lossy in found}
        return LossyCompression(methods, ratios, syntaxes.pop() if len(syntaxes) == 1 else "")

    @property
    def coverage_incomplete(self) -> str | None:
        """Why the slices do not cover the head, or None when they do.

        Incomplete when a hole is larger than ``max_gap_mm`` or only one slice is read.
        """
        cov = self.coverage
        if cov is None:
            return None
        if len(self.slices) < 2:
            return "one image only: the rest of the head is not seen"
        if cov.largest_gap_mm > self.max_gap_mm:
            return (
                f"a {cov.largest_gap_mm:.1f} mm hole between slices (more than "
                f"{self.max_gap_mm:g} mm): part of the head is not seen"
            )
        return None


# ------------------------------------------------------------------------ geometry


def unit_normal(orientation: Sequence[float]) -> np.ndarray:
    """Superior-pointing unit normal of an image plane.

    Parameters
    ----------
    orientation : sequence of 6 float
        ImageOrientationPatient (0020,0037), PS3.3 C.7.6.2.1.1.

    Returns
    -------
    numpy.ndarray
        (3,) float64, row cosines × column cosines, flipped to point toward +z.

    Raises
    ------
    ValueError
        When the cosines are not two orthogonal unit vectors.
    """
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if not (0.99 < nr < 1.01 and 0.99 < nc < 1.01) or abs(float(row @ col)) > 0.01:
        raise ValueError(
            f"ImageOrientationPatient {list(orientation)} is not two orthogonal unit vectors"
        )
    normal = np.cross(row / nr, col / nc)
    normal /= np.linalg.norm(normal)
    return -normal if normal[2] < 0 else normal


def slice_position_mm(position: Sequence[float], normal: Sequence[float]) -> float:
    """A slice's position along the slice normal: ``ImagePositionPatient · normal``, mm.

    The one definition of slice order, shared by the node and training
    (PS3.3 C.7.6.2.1.1: the position is that of the first transmitted pixel).

    Parameters
    ----------
    position : sequence of 3 float
        ImagePositionPatient, mm (LPS).
    normal : sequence of 3 float
        Unit slice normal (:func:`unit_normal`).
    """
    p = np.asarray(position, dtype=np.float64)
    n = np.asarray(normal, dtype=np.float64)
    return float(p @ n)


def _tilt_deg(normal: np.ndarray) -> float:
    """Signed angle (degrees) between a superior-pointing normal and +z."""
    magnitude = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    return magnitude if normal[1] >= 0 else -magnitude


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b)))))


# ------------------------------------------------------------------------ headers


@dataclass(frozen=True, slots=True)
class _Header:
    """What :func:`read_series` needs from one image or frame, with values checked."""

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
    geometry_error: str | None  # a malformed geometry value
    frame_number: int | None = None
    acquisition_number: int | None = None
    kernel: str = ""
    thickness: float | None = None
    pixel_problem: str | None = None
    hu_note: tuple[str, str] | None = None  # (kind, text) of a correction to note
    syntax_note: str | None = None
    lossy: LossyCompression | None = None
    native: NativePixels | None = None
    normal: Any = field(default=None, compare=False)  # np.ndarray once placed


def _floats(ds: Dataset | None, keyword: str, n: int, path: Path) -> tuple[float, ...] | None:
    """The ``n`` numbers of a multi-valued DS element, None when absent or empty."""
    if ds is None:
        return None
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


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _hu_transform_of(ds: Dataset, frame_index: int | None, path: Path) -> HUTransform | None:
    """:func:`hu_transform`, or None where it raises (it raises again, with its
    reason, when the pixels are read)."""
    try:
        return hu_transform(ds, frame_index, name=str(path), path=path)
    except ImagingError:
        return None


def _hu_note_of(t: HUTransform | None) -> tuple[str, str] | None:
    """The note a series gets for an image's rescale (the RSNA 12-bit fault, missing
    rescale attributes), or None."""
    if t is None:
        return None
    if t.signed_bits is not None:
        return (
            "pixel_correction",
            f"BitsStored {t.signed_bits}, unsigned, RescaleIntercept {t.intercept:g} "
            "(RSNA 2019 fault: air stored as about +3096): stored values read as "
            f"{t.signed_bits}-bit two's complement",
        )
    if t.missing:
        return (
            "hu_as_stored",
            f"{' and '.join(t.missing)} missing: slope {t.slope:g}, intercept "
            f"{t.intercept:g} used (checked to give HU: air near -1000)",
        )
    return None


def _lossy(ds: Dataset) -> LossyCompression | None:
    """Whether (and how) an image was lossy-compressed: LossyImageCompression "01"
    (PS3.3 C.7.6.1.1.5), or a transfer syntax that compresses lossily; else None."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    lossy_syntax = syntax in LOSSY_TRANSFER_SYNTAXES
    if str(ds.get("LossyImageCompression", "") or "").strip() != "01" and not lossy_syntax:
        return None

    def values(keyword: str) -> tuple[str, ...]:
        value = ds.get(keyword)
        if value is None or value == "":
            return ()
        items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        return tuple(str(v).strip() for v in items if str(v).strip())

    methods = values("LossyImageCompressionMethod")
    ratios = values("LossyImageCompressionRatio")
    if not methods and lossy_syntax:
        methods = (LOSSY_TRANSFER_SYNTAXES[syntax],)
    if len(ratios) != len(methods):
        ratios = ()  # a ratio is paired with its method (PS3.3 C.7.6.1.1.5.2)
    return LossyCompression(methods, ratios, UID(syntax).name if lossy_syntax else "")


def _headers(path: Path) -> list[_Header]:
    """One header per image: one for a single-frame file, one per frame otherwise."""
    ds = read_dataset(path, defer=True)
    syntax_note = None
    meta = getattr(ds, "file_meta", None)
    if getattr(ds, "_detected_transfer_syntax", None) and meta is not None:
        detected = meta.TransferSyntaxUID
        syntax_note = f"no Transfer Syntax UID in the file: decoded as {detected.name}, as read"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # invalid UIDs (RSNA)
        sop_class = _uid(ds, "SOPClassUID")
        if not sop_class and meta is not None:
            sop_class = _uid(meta, "MediaStorageSOPClassUID")
        sop_uid = _uid(ds, "SOPInstanceUID")
        if not sop_uid and meta is not None:
            sop_uid = _uid(meta, "MediaStorageSOPInstanceUID")
        image_type = ds.get("ImageType", [])
        if isinstance(image_type, str):
            image_type = image_type.split("\\")
        common: dict[str, Any] = dict(
            path=path,
            study_uid=_uid(ds, "StudyInstanceUID"),
            series_uid=_uid(ds, "SeriesInstanceUID"),
            frame_uid=_uid(ds, "FrameOfReferenceUID") or None,
            sop_uid=sop_uid,
            sop_class=sop_class,
            modality=str(ds.get("Modality", "") or "").upper(),
            rows=_optional_int(ds, "Rows"),
            columns=_optional_int(ds, "Columns"),
            instance_number=_optional_int(ds, "InstanceNumber"),
            acquisition_number=_optional_int(ds, "AcquisitionNumber"),
            syntax_note=syntax_note,
            lossy=_lossy(ds),
        )
        try:
            tilt = _floats(ds, "GantryDetectorTilt", 1, path)
        except ImagingError:
            tilt = None  # informative only
        common["gantry_tilt"] = tilt[0] if tilt else None
        if sop_class in MULTIFRAME_CT:
            return _frame_headers(ds, path, common, tuple(str(v).upper() for v in image_type))
        n_frames = _optional_int(ds, "NumberOfFrames") or 1
        geometry_error = None
        try:
            position = _floats(ds, "ImagePositionPatient", 3, path)
            orientation = _floats(ds, "ImageOrientationPatient", 6, path)
            spacing = _floats(ds, "PixelSpacing", 2, path)
        except ImagingError as exc:
            geometry_error = str(exc)
            position = orientation = spacing = None
        try:
            thickness = _floats(ds, "SliceThickness", 1, path)
        except ImagingError:
            thickness = None
        problem = pixel_data_problem(ds, n_frames)
        transform = _hu_transform_of(ds, None, path)  # read once: the note and the pixels
        if problem is None and n_frames != 1:
            problem = f"{n_frames} frames in a single-frame CT image"
        return [
            _Header(
                **common,
                image_type=tuple(str(v).upper() for v in image_type),
                position=position,  # type: ignore[arg-type]
                orientation=orientation,  # type: ignore[arg-type]
                spacing=spacing,  # type: ignore[arg-type]
                geometry_error=geometry_error,
                kernel=_text(ds, "ConvolutionKernel").upper(),
                thickness=thickness[0] if thickness else None,
                pixel_problem=problem,
                hu_note=_hu_note_of(transform),
                # (its Pixel Data checked above, for one frame: not again)
                native=(
                    native_pixels(ds, path, transform=transform, checked=True)
                    if problem is None and transform is not None
                    else None
                ),
            )
        ]


def headers_of(paths: Sequence[Path]) -> list[list[_Header] | Exception]:
    """:func:`_headers` of each file, its ImagingError or StorageUnavailable in its place.

    A decode pool's task (:meth:`ich_node.imaging.decode.DecodePool.parse_headers`):
    picklable in and out, and one unreadable file does not stop the others.
    """
    out: list[list[_Header] | Exception] = []
    for path in paths:
        try:
            out.append(_headers(path))
        except (ImagingError, StorageUnavailable) as exc:
            out.append(exc)
    return out


def _frame_headers(
    ds: Dataset, path: Path, common: dict[str, Any], image_type: tuple[str, ...]
) -> list[_Header]:
    """Headers of the frames of an Enhanced / Legacy Converted Enhanced CT image.

    Position, orientation, pixel measures, rescale, kernel and frame type come
    from the frame's Per-frame Functional Groups item, else from the Shared
    Functional Groups (PS3.3 C.7.6.16, A.38.1, A.70).
    """
    n_frames = _optional_int(ds, "NumberOfFrames") or 1
    problem = pixel_data_problem(ds, n_frames)
    out = []
    for index in range(n_frames):
        geometry_error = None
        try:
            position = _floats(
                functional_group(ds, "PlanePositionSequence", index),
                "ImagePositionPatient",
                3,
                path,
            )
            orientation = _floats(
                functional_group(ds, "PlaneOrientationSequence", index),
                "ImageOrientationPatient",
                6,
                path,
            )
            measures = functional_group(ds, "PixelMeasuresSequence", index)
            spacing = _floats(measures, "PixelSpacing", 2, path)
        except ImagingError as exc:
            geometry_error = str(exc)
            position = orientation = spacing = None
            measures = None
        try:
            thickness = _floats(measures, "SliceThickness", 1, path)
        except ImagingError:
            thickness = None
        frame_type = _text(functional_group(ds, "CTImageFrameTypeSequence", index), "FrameType")
        recon = functional_group(ds, "CTReconstructionSequence", index)
        kernel = _text(recon, "ConvolutionKernel") or _text(ds, "ConvolutionKernel")
        out.append(
            _Header(
                **common,
                image_type=tuple(frame_type.upper().split("\\")) if frame_type else image_type,
                position=position,  # type: ignore[arg-type]
                orientation=orientation,  # type: ignore[arg-type]
                spacing=spacing,  # type: ignore[arg-type]
                geometry_error=geometry_error,
                frame_number=index + 1,
                kernel=kernel.upper(),
                thickness=thickness[0] if thickness else None,
                pixel_problem=problem,
                hu_note=_hu_note_of(_hu_transform_of(ds, index, path)),
            )
        )
    return out


def _why_not_ct_image(h: _Header) -> str | None:
    """Reason a header is not an image this module reads, or None."""
    if h.modality and h.modality != "CT":
        return f"modality {h.modality}, not CT"
    if h.sop_class and h.sop_class != CT_IMAGE_STORAGE and h.sop_class not in MULTIFRAME_CT:
        return f"SOP class {h.sop_class} is not a CT image"
    if not h.modality and h.sop_class != CT_IMAGE_STORAGE:
        return "no Modality and no CT SOP class"
    # PS3.3 C.8.2.1.1.1: ImageType value 3 is AXIAL or LOCALIZER for CT.
    if "LOCALIZER" in h.image_type:
        return "localizer (ImageType LOCALIZER)"
    return None


def _cannot_place(h: _Header) -> str | None:
    """Why an image cannot be placed in a volume (PS3.3 C.7.6.2, C.7.6.3), or None."""
    if h.geometry_error is not None:
        return f"cannot be placed: {h.geometry_error.split(': ', 1)[-1]}"
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
    if missing:
        return f"cannot be placed: no {', '.join(missing)}"
    if h.pixel_problem is not None:
        return h.pixel_problem
    return None


# ------------------------------------------------------------------------- stacks


@dataclass(slots=True)
class _Stack:
    """Images of one reconstruction: same orientation, matrix and (soft key) kernel."""

    headers: list[_Header]
    normal: np.ndarray

    @property
    def kernel(self) -> str:
        return Counter(h.kernel for h in self.headers).most_common(1)[0][0]

    def span(self) -> tuple[float, float]:
        z = [slice_position_mm(h.position, self.normal) for h in self.headers]  # type: ignore[arg-type]
        return min(z), max(z)


def _soft_key(h: _Header) -> tuple[Any, ...]:
    thickness = None if h.thickness is None else round(h.thickness, 2)
    spacing = None if h.spacing is None else tuple(round(v, 3) for v in h.spacing)
    return (h.kernel, thickness, h.image_type[:3], spacing)


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return max(a[0], b[0]) <= min(a[1], b[1]) + _SAME_POSITION_MM


def _stacks(headers: list[_Header]) -> list[_Stack]:
    """Split placed images into homogeneous stacks.

    Orientation (within 2 degrees) and matrix always separate stacks. Within those,
    images differing in kernel always do; images differing in thickness, ImageType
    or pixel spacing are one stack when they lie one after another along z (one
    volume reconstructed in parts) and separate stacks when they overlap (two
    reconstructions of the same anatomy).
    """
    cos_tol = math.cos(math.radians(_ORIENTATION_TOL_DEG))
    clusters: list[tuple[np.ndarray, list[_Header]]] = []
    for h in headers:
        for ref, members in clusters:
            if float(h.normal @ ref) >= cos_tol:
                members.append(h)
                break
        else:
            clusters.append((h.normal, [h]))
    stacks: list[_Stack] = []
    for _, members in clusters:
        normal = np.mean([h.normal for h in members], axis=0)
        normal /= np.linalg.norm(normal)
        by_hard: dict[tuple[Any, ...], list[_Header]] = defaultdict(list)
        for h in members:
            by_hard[(h.rows, h.columns, h.kernel)].append(h)
        for group in by_hard.values():
            by_soft: dict[tuple[Any, ...], list[_Header]] = defaultdict(list)
            for h in group:
                by_soft[_soft_key(h)].append(h)
            chains: list[list[_Stack]] = []
            for part in sorted(by_soft.values(), key=lambda g: (-len(g), g[0].sop_uid)):
                piece = _Stack(part, normal)
                span = piece.span()
                for chain in chains:
                    if not any(_overlap(span, other.span()) for other in chain):
                        chain.append(piece)
                        break
                else:
                    chains.append([piece])
            for chain in chains:
                stacks.append(_Stack([h for p in chain for h in p.headers], normal))
    return stacks


def _kernel_rank(kernel: str, preferred: Sequence[str]) -> int:
    k = kernel.upper()
    for i, pattern in enumerate(preferred):
        if pattern and pattern.upper() in k:
            return i
    if any(p in k for p in _SHARP_KERNELS):
        return len(preferred) + 1
    return len(preferred)


def _choose(stacks: list[_Stack], preferred: Sequence[str]) -> _Stack:
    """The stack to read: a volume (3+ images), preferred kernel, then the most images."""

    def rank(s: _Stack) -> tuple[Any, ...]:
        thick = Counter(h.thickness or 0.0 for h in s.headers).most_common(1)[0][0]
        return (
            len(s.headers) < _MIN_STACK,
            _kernel_rank(s.kernel, preferred),
            -len(s.headers),
            thick,
            min(h.sop_uid for h in s.headers),
        )

    return min(stacks, key=rank)


def _describe_stack(s: _Stack) -> str:
    h = s.headers[0]
    parts = [f"ConvolutionKernel {h.kernel or '(none)'}"]
    if h.thickness is not None:
        parts.append(f"SliceThickness {h.thickness:g} mm")
    parts.append(f"{h.rows}x{h.columns}")
    return ", ".join(parts)


def _difference(h: _Header, main: _Stack) -> str:
    """What sets an image apart from the stack that is read, in words."""
    ref = main.headers[0]
    angle = _angle_deg(h.normal, main.normal)
    if angle > _ORIENTATION_TOL_DEG:
        return f"orientation {angle:.1f} deg from the stack read"
    if (h.rows, h.columns) != (ref.rows, ref.columns):
        return f"matrix {h.rows}x{h.columns}, the stack read is {ref.rows}x{ref.columns}"
    if h.kernel != main.kernel:
        return f"ConvolutionKernel {h.kernel or '(none)'}, the stack read has {main.kernel}"
    diffs = []
    if h.thickness != ref.thickness:
        diffs.append(f"SliceThickness {h.thickness} mm (read: {ref.thickness} mm)")
    if h.image_type[:3] != ref.image_type[:3]:
        diffs.append(f"ImageType {'/'.join(h.image_type[:3])}")
    if h.spacing != ref.spacing:
        diffs.append(f"PixelSpacing {h.spacing} (read: {ref.spacing})")
    return ", ".join(diffs) or "overlaps the stack read"


# ----------------------------------------------------------------------- ordering


def _order_key(h: _Header, z: float) -> tuple[Any, ...]:
    big = 1 << 62
    return (
        z,
        big if h.acquisition_number is None else h.acquisition_number,
        big if h.instance_number is None else h.instance_number,
        h.sop_uid,
        h.frame_number or 0,
    )


def _positions(items: list[tuple[_Header, float]]) -> list[list[tuple[_Header, float]]]:
    """Consecutive runs of images at one position (within 0.01 mm), in order."""
    groups: list[list[tuple[_Header, float]]] = []
    for item in items:
        if groups and item[1] - groups[-1][0][1] < _SAME_POSITION_MM:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _volume_split(
    groups: list[list[tuple[_Header, float]]],
) -> tuple[str, list[list[tuple[_Header, float]]], list[str]] | None:
    """Several complete volumes at the same positions: (by what, volumes, labels) or None.

    Only when every one of 3+ positions holds the same number k >= 2 of images, and
    either AcquisitionNumber puts exactly one image of each position in each of k
    groups, or InstanceNumber does in k consecutive blocks (1..n, n+1..2n, ...).
    """
    k = len(groups[0])
    if k < 2 or len(groups) < 3 or any(len(g) != k for g in groups):
        return None
    acquisitions = {h.acquisition_number for g in groups for h, _ in g}
    if None not in acquisitions and len(acquisitions) == k:
        by: dict[Any, list[tuple[_Header, float]]] = defaultdict(list)
        for g in groups:
            if len({h.acquisition_number for h, _ in g}) != k:
                break
            for item in g:
                by[item[0].acquisition_number].append(item)
        else:
            order = sorted(by)
            return (
                "AcquisitionNumber",
                [by[v] for v in order],
                [f"AcquisitionNumber {v}" for v in order],
            )
    if all(h.instance_number is not None for g in groups for h, _ in g):
        ranked = [sorted(g, key=lambda item: item[0].instance_number or 0) for g in groups]
        volumes = [[g[r] for g in ranked] for r in range(k)]
        spans = [
            (min(h.instance_number or 0 for h, _ in v), max(h.instance_number or 0 for h, _ in v))
            for v in volumes
        ]
        if all(a[1] < b[0] for a, b in itertools.pairwise(spans)):
            return "InstanceNumber", volumes, [f"InstanceNumber {lo}-{hi}" for lo, hi in spans]
    return None


def _coverage(
    items: list[tuple[_Header, float]],
) -> tuple[Coverage, list[tuple[float, float]]]:
    """Coverage of ordered slices and the holes found ((z_from, z_to) per hole)."""
    z = [p for _, p in items]
    distinct: list[tuple[float, float | None]] = []  # (z, thickness) per position
    for h, p in items:
        if not distinct or p - distinct[-1][0] >= _SAME_POSITION_MM:
            distinct.append((p, h.thickness))
    steps = [b[0] - a[0] for a, b in itertools.pairwise(distinct)]
    median = float(np.median(steps)) if steps else None
    holes = []
    for (za, ta), (zb, tb) in itertools.pairwise(distinct):
        step = zb - za
        nominal = (ta + tb) / 2 if ta and tb else median
        # Missing slices: a step well above both the series' usual step and the
        # slices' own thickness (so a thin part then a thick part is not a hole).
        if median and nominal and step > 1.5 * max(median, nominal) + _SAME_POSITION_MM:
            holes.append((za, zb))
    cov = Coverage(
        z_min_mm=round(min(z), 3),
        z_max_mm=round(max(z), 3),
        median_spacing_mm=None if median is None else round(median, 3),
        largest_gap_mm=round(max(steps), 3) if steps else 0.0,
        n_gaps=len(holes),
    )
    return cov, holes


# --------------------------------------------------------------------- read_series


def read_series(
    paths: Sequence[Path],
    *,
    max_tilt_deg: float = 30.0,
    preferred_kernels: Sequence[str] = DEFAULT_PREFERRED_KERNELS,
    max_gap_mm: float = DEFAULT_MAX_GAP_MM,
    headers: MutableMapping[Path, list[_Header]] | None = None,
    quiet: bool = False,
    pool: DecodePool | None = None,
) -> CTSeries:
    """Read the headers of one series, keep what can be read, and order it.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        Files of one series (files of other series are left out: the series with
        the most usable images wins).
    max_tilt_deg : float
        Images whose normal is further than this from the patient z axis are
        not axial and are left out (``series.max_tilt_degrees``).
    preferred_kernels : sequence of str
        Case-insensitive ConvolutionKernel substrings, most preferred first, that
        choose the stack read when a series holds several reconstructions
        (``series.preferred_kernels``).
    max_gap_mm : float
        A hole between slices larger than this makes the coverage incomplete
        (``series.max_gap_mm``); a negative result then says so.
    headers : dict, optional
        Headers already read, by path, reused and filled in: a series read again
        as it grows (the worker's streaming read) reads each file's header once.
        A spooled file's path names its content (:mod:`ich_node.ingest.spool`),
        so a path's headers never change.
    quiet : bool
        Do not log the images left out and the notes (a partial read, logged
        when the whole series is read).
    pool : DecodePool, optional
        Parse the headers in this pool's processes, a few files per task
        (:meth:`~ich_node.imaging.decode.DecodePool.parse_headers`): pydicom's
        parser holds the GIL, so only processes parse in parallel. Without it,
        or for a few files, or with a thread pool, they are parsed here.

    Returns
    -------
    CTSeries
        Slices ordered by ``ImagePositionPatient · normal`` (inferior ->
        superior), with every left-out image in ``dropped``, every correction or
        irregularity in ``notes`` and the ``coverage``.

    Raises
    ------
    ImagingError
        When no placeable axial CT image remains (the message lists why images
        were left out), or two series have as many images each.
    StorageUnavailable
        When a file cannot be opened or read (missing, I/O error): the whole
        series waits for its storage, none of it is left out.
    """
    record = _Record()
    candidates = _candidates(paths, record, headers, pool)
    if not candidates:
        raise _nothing_usable(paths, record.dropped)
    series_uid = _one_series(candidates)
    placed = _placed(candidates, series_uid, max_tilt_deg, record)
    if not placed:
        raise _nothing_usable(paths, record.dropped)
    main = _main_stack(_one_frame_of_reference(placed, record), preferred_kernels, record)
    usable = _ordered(main, record)
    coverage = _describe_reading(usable, record)
    normal = main.normal
    tilt = _tilt(normal, usable, series_uid)

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
            frame_number=h.frame_number,
            slice_thickness_mm=h.thickness,
            lossy=h.lossy,
            native=h.native,
        )
        for h, pos in usable
    )
    uids = [first.study_uid, series_uid, *(s.sop_instance_uid for s in slices)]
    for d in () if quiet else record.dropped:
        log.info(
            "imaging.dropped",
            series_uid=series_uid,
            sop_instance_uid=d.sop_instance_uid,
            frame=d.frame_number,
            reason=d.reason,
        )
    for note in () if quiet else record.notes:
        log.info("imaging.note", series_uid=series_uid, kind=note.kind, note=note.text)
    return CTSeries(
        study_instance_uid=first.study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=first.frame_uid,
        slices=slices,
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        gantry_tilt_deg=float(tilt),
        slice_spacing_mm=tuple(float(b - a) for (_, a), (_, b) in itertools.pairwise(usable)),
        skipped=tuple((d.path, d.reason) for d in record.dropped if d.path is not None),
        uids_valid=all(_valid_uid(u) for u in uids),
        dropped=tuple(record.dropped),
        notes=tuple(record.notes),
        coverage=coverage,
        max_gap_mm=max_gap_mm,
    )


@dataclass(slots=True)
class _Record:
    """What one reading dropped and noted, in order; becomes the series' records."""

    dropped: list[Dropped] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    def drop(self, h: _Header, reason: str) -> None:
        self.dropped.append(Dropped(h.sop_uid, h.path, reason, h.frame_number))

    def note(self, kind: str, text: str) -> None:
        self.notes.append(Note(kind, text))


def _candidates(
    paths: Sequence[Path],
    record: _Record,
    known: MutableMapping[Path, list[_Header]] | None = None,
    pool: DecodePool | None = None,
) -> list[_Header]:
    """Headers of the CT images (and frames) among ``paths``; the rest dropped."""
    candidates: list[_Header] = []
    seen: set[tuple[str, int | None]] = set()
    ordered = sorted(dict.fromkeys(Path(p) for p in paths))
    parsed: dict[Path, list[_Header] | Exception] = {}
    if pool is not None:
        parsed = pool.parse_headers([p for p in ordered if known is None or p not in known])
    for path in ordered:
        try:
            headers = known.get(path) if known is not None else None
            if headers is None:
                got = parsed.get(path)
                if isinstance(got, Exception):
                    raise got  # as _headers raised it in the pool's process
                headers = got if got is not None else _headers(path)
                if known is not None:
                    known[path] = headers
        except ImagingError as exc:
            record.dropped.append(Dropped("", path, f"unreadable: {str(exc).split(': ', 1)[-1]}"))
            continue
        for h in headers:
            reason = _why_not_ct_image(h)
            if reason is None and (h.sop_uid, h.frame_number) in seen:
                reason = f"duplicate SOP Instance UID {h.sop_uid}"
            if reason is not None:
                record.drop(h, reason)
                continue
            seen.add((h.sop_uid, h.frame_number))
            candidates.append(h)
    return candidates


def _one_series(candidates: list[_Header]) -> str:
    """The series with the most images; a tie is ambiguous (ImagingError)."""
    counts = Counter(h.series_uid for h in candidates).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        raise ImagingError(
            f"{candidates[0].path.parent}: files of {len(counts)} series with "
            f"{counts[0][1]} images each; group them with group_series() first",
            candidates[0].path,
        )
    return counts[0][0]


def _placed(
    candidates: list[_Header], series_uid: str, max_tilt_deg: float, record: _Record
) -> list[_Header]:
    """Images of ``series_uid`` that can be placed, with their normal; the rest dropped."""
    placed: list[_Header] = []
    for h in candidates:
        if h.series_uid != series_uid:
            record.drop(h, f"other series {h.series_uid}")
            continue
        reason = _cannot_place(h)
        if reason is None:
            try:
                normal = unit_normal(h.orientation)  # type: ignore[arg-type]
            except ValueError as exc:
                reason = f"cannot be placed: {exc}"
            else:
                tilt = abs(_tilt_deg(normal))
                if tilt > max_tilt_deg:
                    reason = f"not axial ({tilt:.1f} deg from the patient z axis)"
        if reason is not None:
            record.drop(h, reason)
            continue
        placed.append(replace(h, normal=normal))
    return placed


def _one_frame_of_reference(placed: list[_Header], record: _Record) -> list[_Header]:
    """The majority study and frame of reference (PS3.3 C.7.4.1.1.1); the rest dropped."""
    for keyword, attr in (("StudyInstanceUID", "study_uid"), ("FrameOfReferenceUID", "frame_uid")):
        majority = Counter(getattr(h, attr) for h in placed).most_common(1)[0][0]
        kept = []
        for h in placed:
            if getattr(h, attr) != majority:
                record.drop(h, f"{keyword} differs from the rest of the series")
            else:
                kept.append(h)
        placed = kept
    return placed


def _main_stack(placed: list[_Header], preferred: Sequence[str], record: _Record) -> _Stack:
    """Split into homogeneous stacks; the preferred one is read, the others recorded."""
    stacks = _stacks(placed)
    main = _choose(stacks, preferred)
    for s in stacks:
        if s is main:
            continue
        if len(s.headers) >= _MIN_STACK:
            record.note(
                "stack_skipped",
                f"another reconstruction in this series was not read: "
                f"{len(s.headers)} images ({_describe_stack(s)}); read: "
                f"{len(main.headers)} images ({_describe_stack(main)})",
            )
            for h in s.headers:
                record.drop(h, f"other reconstruction, not read: {_difference(h, main)}")
        else:
            for h in s.headers:
                record.drop(h, f"cannot be placed in the series' stack: {_difference(h, main)}")
    return main


def _ordered(main: _Stack, record: _Record) -> list[tuple[_Header, float]]:
    """The stack's images in reading order, with their positions along the normal.

    Several complete volumes at the same positions are split (the first read);
    other images sharing a position are all read, and noted.
    """
    usable = sorted(
        ((h, slice_position_mm(h.position, main.normal)) for h in main.headers),  # type: ignore[arg-type]
        key=lambda item: _order_key(item[0], item[1]),
    )
    groups = _positions(usable)
    split = _volume_split(groups)
    if split is not None:
        attribute, volumes, labels = split
        for other, label in zip(volumes[1:], labels[1:], strict=True):
            for h, _ in other:
                record.drop(h, f"another complete volume at the same positions ({label})")
        record.note(
            "volumes_split",
            f"{len(volumes)} complete volumes at the same {len(groups)} positions "
            f"(by {attribute}): the first was read",
        )
        return sorted(volumes[0], key=lambda item: _order_key(item[0], item[1]))
    crowded = [g for g in groups if len(g) > 1]
    if crowded:
        n = sum(len(g) for g in crowded)
        where = ", ".join(f"{g[0][1]:.1f}" for g in crowded[:5])
        record.note(
            "duplicate_position",
            f"{n} images share {len(crowded)} position(s) (at {where} mm); all read, "
            "ordered by AcquisitionNumber, InstanceNumber, SOP Instance UID",
        )
    return usable


def _describe_reading(usable: list[tuple[_Header, float]], record: _Record) -> Coverage:
    """Coverage of the slices read, and notes on thickness, holes, pixels and orientation."""
    thicknesses = sorted({h.thickness for h, _ in usable if h.thickness is not None})
    if len(thicknesses) > 1:
        record.note(
            "thickness_change",
            "slice thickness changes along the series ("
            + ", ".join(f"{t:g}" for t in thicknesses)
            + " mm): one volume, read as one stack",
        )
    coverage, holes = _coverage(usable)
    for za, zb in holes:
        record.note("gap", f"hole of {zb - za:.1f} mm between slices at {za:.1f} and {zb:.1f} mm")
    for (kind, text), n in Counter(h.hu_note for h, _ in usable if h.hu_note).items():
        record.note(kind, f"{text} ({n} image(s))")
    for text, n in Counter(h.syntax_note for h, _ in usable if h.syntax_note).items():
        record.note("transfer_syntax", f"{text} ({n} image(s))")
    lossy = [h.lossy for h, _ in usable if h.lossy is not None]
    if lossy:
        how = describe_lossy(lossy)
        record.note(
            "lossy_compression",
            f"{len(lossy)} of {len(usable)} image(s) read were lossy-compressed before they "
            f"reached the node ({how}): their HU differ from the scanner's, and the result "
            "rests on these images",
        )
    frames = [h for h, _ in usable if h.frame_number is not None]
    if frames:
        record.note(
            "multi_frame",
            f"{len(frames)} frames of {len({h.sop_uid for h in frames})} multi-frame "
            "image(s) read as slices (per-frame functional groups)",
        )
    turn = Reorientation.from_orientation(usable[0][0].orientation)  # type: ignore[arg-type]
    if not turn.identity:
        record.note(
            "reoriented",
            f"model input turned to the reference orientation ({turn.describe()}); "
            "heatmaps are mapped back onto the source pixels",
        )
    return coverage


def _tilt(normal: np.ndarray, usable: list[tuple[_Header, float]], series_uid: str) -> float:
    """Signed gantry tilt, degrees, from the geometry (or the tag when only it tells)."""
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
    return tilt


def _valid_uid(uid: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros in a component, 64 characters at most."""
    return 0 < len(uid) <= 64 and RE_VALID_UID.match(uid) is not None


def _nothing_usable(paths: Sequence[Path], dropped: list[Dropped]) -> ImagingError:
    shown = "; ".join(
        f"{d.path if d.path else d.sop_instance_uid}: {d.reason}" for d in dropped[:5]
    )
    more = f" (and {len(dropped) - 5} more)" if len(dropped) > 5 else ""
    first = dropped[0].path if dropped else None
    return ImagingError(
        f"no usable axial CT image among {len(paths)} file(s): {shown}{more}", first
    )


def check_matrix(series: CTSeries) -> None:
    """Raise :class:`ImagingError` when the slices of ``series`` differ in matrix size."""
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


def decode_slice(s: CTSlice) -> StoredSlice:
    """Decode one slice of a series to its stored values.

    An uncompressed image whose header read found its values (``CTSlice.native``)
    is one read at that offset (:func:`ich_node.imaging.pixels.read_native`): the
    file is not parsed twice; anything else goes through pydicom
    (:func:`ich_node.imaging.pixels.decode_stored`). The CPU part of reading a
    slice, what a decode pool runs in parallel
    (:class:`ich_node.imaging.decode.DecodePool`); picklable, no torch.

    Raises
    ------
    ImagingError
        As :func:`decode_stored`, or when the pixel data's shape differs from the
        header's Rows and Columns.
    """
    decoded = read_native(s.path, s.native) if s.native is not None else None
    if decoded is None:  # compressed, unusual, or the file changed: pydicom decodes it
        decoded = decode_stored(s.path, s.frame_number)
    if decoded.stored.shape != (s.rows, s.columns):
        raise ImagingError(
            f"{s.path}: pixel data is {decoded.stored.shape}, header says {(s.rows, s.columns)}",
            s.path,
        )
    return decoded


def load_series_hu(series: CTSeries) -> np.ndarray:
    """Decode every slice of a series to HU, on the CPU, one slice after the other.

    :func:`decode_slice` for each slice, then
    :func:`ich_node.imaging.tensors.stored_to_hu` (torch, imported lazily). The
    node's worker does the same with a decode pool and on the model's device
    (:meth:`ich_node.model.inference.Classifier.prepared_batches`).

    Parameters
    ----------
    series : CTSeries
        From :func:`read_series` (or a run of its slices).

    Returns
    -------
    numpy.ndarray
        (S, H, W) float32 HU, in ``series.slices`` order (inferior -> superior).
        Frames of a multi-frame image are read one by one (``CTSlice.frame_number``).

    Raises
    ------
    ImagingError
        When slices differ in matrix size, or any slice fails :func:`decode_slice`;
        :class:`SeriesRefused` as :func:`ich_node.imaging.load_hu`.
    """
    from ich_node.imaging.tensors import stored_to_hu  # torch: not in the listener

    check_matrix(series)
    out: np.ndarray = stored_to_hu([decode_slice(s) for s in series.slices]).numpy()
    return out
