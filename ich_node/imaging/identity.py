"""Content identity of an instance: what it says, whatever its transfer syntax.

A PACS re-sends the same images in another transfer syntax (Implicit VR, RLE
Lossless, JPEG-LS lossless, Deflated, ...). Their bytes differ; their content does
not. Two instances are the same content when

- their pixels decoded to HU are equal: the node's own decoding
  (:func:`ich_node.imaging.pixels.load_hu`, every frame), so the values after the
  rescale (PS3.3 C.8.2.1.1, C.7.6.16.2.9 per frame), with padding as air; and
- their clinically relevant attributes (:data:`IDENTITY_ATTRIBUTES`) are equal:
  those that say whose images and which study they are, what the node selects
  series on, where each slice lies, what the pixels mean, and whether they were
  lossy-compressed. How the values are encoded (VR explicit or implicit, byte
  order, character set, DS and IS spelling, trailing spaces) does not count.

Everything else does not count: the transfer syntax and the file meta, the pixel
module's storage attributes (BitsAllocated, BitsStored, HighBit,
PixelRepresentation, RescaleSlope, RescaleIntercept: their effect is in the HU),
creation dates and times of the copy, private elements, display hints (window
centre and width). docs/admin.md ("Re-sends") lists the attributes for admins.

:func:`content_identity` is the SHA-256 of both; :func:`fingerprint` combines
the identities of a series version, in any order. Both are hex strings. The
spool keeps the SHA-256 of the bytes as received as the fast path
(:func:`ich_node.ingest.spool.content_digest`): equal bytes are equal content and
nothing is decoded; only differing bytes are decoded and compared here, off the
C-STORE's acknowledgement path.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

from ich_node.imaging.files import _optional_int, read_dataset
from ich_node.imaging.pixels import load_hu

#: The attributes that are part of an instance's content identity (DICOM keywords).
IDENTITY_ATTRIBUTES: Final[tuple[str, ...]] = (
    # Whose images, which study, series and instance (the answer is about them).
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "TimezoneOffsetFromUTC",
    # What the node selects series on and reports.
    "Modality",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ImageType",
    "ConvolutionKernel",
    "AcquisitionNumber",
    # Where each slice lies.
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "GantryDetectorTilt",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    # What the pixels mean (their values are compared after the rescale).
    "PhotometricInterpretation",
    "RescaleType",
    # Whether they were lossy-compressed on the way (PS3.3 C.7.6.1.1.5).
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)

#: Elements left out inside the functional groups: their effect is in the HU.
_IN_PIXELS: Final = frozenset(
    {"PixelValueTransformationSequence", "RescaleSlope", "RescaleIntercept"}
)


def _value(value: Any) -> Any:
    """A JSON-able canonical form of an element's value (encoding differences removed)."""
    if value is None:
        return None
    if isinstance(value, Sequence):
        return [_items(item) for item in value]
    if isinstance(value, MultiValue | list | tuple):
        return [_value(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return "sha256:" + hashlib.sha256(bytes(value)).hexdigest()
    if isinstance(value, float):  # DS, FD, FL: the number, not its spelling
        return repr(float(value)) if math.isfinite(value) else str(float(value))
    if isinstance(value, int):  # IS, US, SS, ...
        return int(value)
    if isinstance(value, PersonName):
        return str(value).strip(" \0")
    text = str(value).strip(" \0")
    return text or None


def _items(ds: Dataset) -> dict[str, Any]:
    """Every public element of a sequence item, canonical, by keyword (or tag)."""
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.is_private or elem.keyword in _IN_PIXELS:
            continue
        value = _value(elem.value)
        if value not in (None, "", []):
            out[elem.keyword or str(elem.tag)] = value
    return out


def relevant_attributes(ds: Dataset) -> dict[str, Any]:
    """The values of :data:`IDENTITY_ATTRIBUTES` present in ``ds``, canonical.

    Absent and empty are the same; numbers compare as numbers (``"1.0"`` and
    ``"1"`` in a DS are equal); texts without their padding.
    """
    out: dict[str, Any] = {}
    for keyword in IDENTITY_ATTRIBUTES:
        elem = ds.get(keyword)
        if elem is None:
            continue
        value = _value(ds[keyword].value)
        if value not in (None, "", []):
            out[keyword] = value
    return out


def content_identity(path: Path | str) -> str:
    """The content identity of one instance file (SHA-256, 64 hex digits).

    Parameters
    ----------
    path : pathlib.Path or str
        A DICOM file (Part 10 or a bare data set), any transfer syntax the node decodes.

    Returns
    -------
    str
        ``sha256(attributes, frame count, shape, HU float32 bytes of every frame)``.
        An image whose pixels cannot be decoded is identified by its attributes and
        the SHA-256 of its Pixel Data as stored (prefix ``"raw:"``): it equals only
        a byte-identical copy.

    Raises
    ------
    ich_node.imaging.ImagingError
        When the file is not DICOM at all.
    ich_node.imaging.StorageUnavailable
        When the file cannot be read (missing, I/O error).
    """
    from ich_node.imaging.files import ImagingError, StorageUnavailable

    ds = read_dataset(Path(path), defer=True)
    n = _optional_int(ds, "NumberOfFrames") or 1
    try:
        # Multi-frame: each frame from the file, with its own rescale (functional groups).
        frames = [load_hu(path, k) for k in range(1, n + 1)] if n > 1 else [load_hu(ds)]
    except StorageUnavailable:
        raise
    except ImagingError:
        h = hashlib.sha256()
        h.update(
            json.dumps(relevant_attributes(ds), sort_keys=True, separators=(",", ":")).encode()
        )
        pixels = ds.get("PixelData")
        h.update(b"|raw:" + hashlib.sha256(bytes(pixels) if pixels is not None else b"").digest())
        return "raw:" + h.hexdigest()
    return identity_from_hu(ds, frames)


def identity_from_hu(ds: Dataset, frames: Iterable[np.ndarray]) -> str:
    """The content identity of an instance whose frames are already decoded to HU.

    ``ds`` is its header (pixels not needed) and ``frames`` its (H, W) float32 HU
    arrays in frame order, as :func:`ich_node.imaging.pixels.load_hu` returns them:
    the result equals :func:`content_identity` of the file, without decoding it again.
    """
    h = hashlib.sha256()
    h.update(json.dumps(relevant_attributes(ds), sort_keys=True, separators=(",", ":")).encode())
    for hu in frames:
        h.update(f"|{hu.shape[0]}x{hu.shape[1]}|".encode())
        h.update(np.ascontiguousarray(hu, dtype="<f4").tobytes())
    return h.hexdigest()


def version_identities(
    paths: Iterable[Path], slices: Iterable[Any] = (), hu: np.ndarray | None = None
) -> dict[Path, str]:
    """The content identity of every file of a series version, reusing decoded slices.

    Parameters
    ----------
    paths : iterable of pathlib.Path
        The instance files of the version.
    slices : iterable of ich_node.imaging.CTSlice
        The slices read from them (``CTSeries.slices``), in the order of ``hu``.
    hu : numpy.ndarray, optional
        (S, H, W) float32 HU of ``slices`` (:func:`ich_node.imaging.load_series_hu`).
        A file all of whose frames are among them is not decoded again; any other
        (an image left out of the read, part of a multi-frame image) is.

    Returns
    -------
    dict of pathlib.Path to str
        :func:`content_identity` of each file.

    Raises
    ------
    ich_node.imaging.StorageUnavailable
        When a file cannot be read.
    """
    decoded: dict[Path, dict[int, np.ndarray]] = {}
    if hu is not None:
        for i, s in enumerate(slices):
            decoded.setdefault(Path(s.path), {})[s.frame_number or 1] = hu[i]
    out: dict[Path, str] = {}
    for path in paths:
        path = Path(path)
        frames = decoded.get(path)
        if frames:
            ds = read_dataset(path, pixels=False)
            n = _optional_int(ds, "NumberOfFrames") or 1
            if sorted(frames) == list(range(1, n + 1)):
                out[path] = identity_from_hu(ds, (frames[k] for k in range(1, n + 1)))
                continue
        out[path] = content_identity(path)
    return out


def fingerprint(identities: Iterable[str]) -> str:
    """The content fingerprint of a series version: SHA-256 over its sorted identities.

    The same set of instances gives the same fingerprint in any order and any
    transfer syntax; one instance more, less or changed gives another.
    """
    h = hashlib.sha256()
    for identity in sorted(identities):
        h.update(identity.encode())
        h.update(b"\n")
    return h.hexdigest()
