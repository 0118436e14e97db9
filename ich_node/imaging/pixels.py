"""Decoding pixel data and converting it to Hounsfield units.

Step 3 of :mod:`ich_node.imaging`: native and compressed transfer syntaxes through
pydicom's pixel handlers, then the CT rescale (PS3.3 C.8.2.1.1) to HU. Before any
decoding, :func:`pixel_data_problem` checks the header against the pixel data's
length, so a header that lies never makes the node allocate a huge array.
Stored values that are not HU are corrected or refused here, in one place:

- the RSNA 2019 fault (:class:`HUTransform` ``signed_bits``): BitsStored below
  BitsAllocated, PixelRepresentation 0 (unsigned), RescaleIntercept above -100 —
  air is then stored as ``4096 - 1000 = 3096``. The stored values are two's
  complement numbers of BitsStored bits (air 3096 -> -1000, padding 3072 -> -1024),
  which is what the data show; they are read so when, read so, at least 10% of the
  image is air (-1100..-900 HU), as in any head CT slice.
- RescaleIntercept or RescaleSlope missing (Type 1 in the CT Image module): the
  values (with slope 1 or intercept 0 for the missing one) are used only when they
  are shown to be HU (air near -1000 HU present); otherwise the image is refused
  naming the attribute.
- :func:`check_hu_plausible`: a series whose HU are not those of a head CT (no
  air, no brain-range tissue, or mostly above 3000 HU) is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.pixels
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ich_node.imaging.files import (
    ImagingError,
    SeriesRefused,
    _optional_int,
    read_dataset,
    storage_error,
)
from ich_node.imaging.orientation import Reorientation

#: HU given to padding and to sentinel values below the physical range (air).
AIR_HU: Final[float] = -1024.0
#: Largest Rows or Columns of an image this module decodes: CT matrices are at most
#: 2048 (512 for nearly all head CT); more means a header that does not describe
#: its pixels.
MAX_MATRIX: Final[int] = 4096
#: RSNA 2019 fault: an unsigned image with an intercept above this cannot hold air.
_WRAP_INTERCEPT: Final[float] = -100.0
#: Share of a slice at air (-1100..-900 HU) that shows the RSNA fault once corrected.
_WRAP_AIR_SHARE: Final[float] = 0.10
#: Plausibility of a head CT's HU (whole series, after padding and clipping at air).
_MIN_AIR_SHARE: Final[float] = 0.005  # voxels at or below -900 HU (air around the head)
_MIN_BRAIN_SHARE: Final[float] = 0.005  # voxels in 0..100 HU (brain, CSF, blood)
_MAX_DENSE_SHARE: Final[float] = 0.10  # voxels above 3000 HU (more than metal artefacts)

_PIXEL_DATA_TAG: Final[int] = 0x7FE00010


@dataclass(frozen=True, slots=True)
class HUTransform:
    """How one image's (or frame's) stored values become HU.

    ``HU = v × slope + intercept`` where ``v`` is the stored value, first read as a
    two's complement number of ``signed_bits`` bits when that is set.

    Attributes
    ----------
    slope, intercept : float
        RescaleSlope and RescaleIntercept (PS3.3 C.8.2.1.1; per frame from the
        Pixel Value Transformation functional group for multi-frame images).
    signed_bits : int or None
        BitsStored, when the header has the RSNA 12-bit fault; the values are read
        as two's complement when that puts air at -1000 HU. None otherwise.
    missing : tuple of str
        ``RescaleIntercept`` / ``RescaleSlope`` when absent (0 and 1 are used): the
        result is then used only if :func:`values_look_like_hu`.
    """

    slope: float
    intercept: float
    signed_bits: int | None
    missing: tuple[str, ...]


def _describe(path_or_ds: Any) -> str:
    if isinstance(path_or_ds, Dataset):
        name = getattr(path_or_ds, "filename", None)
        return str(name) if name else "<in-memory dataset>"
    return str(path_or_ds)


def functional_group(ds: Dataset, keyword: str, frame_index: int | None) -> Dataset | None:
    """The first item of a functional group macro for one frame (PS3.3 C.7.6.16).

    Looks in the frame's Per-frame Functional Groups Sequence item first, then in
    the Shared Functional Groups Sequence; None when neither has ``keyword``.
    """
    places: list[Any] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if frame_index is not None and per_frame is not None and frame_index < len(per_frame):
        places.append(per_frame[frame_index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        places.append(shared[0])
    for item in places:
        seq = item.get(keyword)
        if seq:
            return seq[0]
    return None


def _number(value: Any, keyword: str, name: str, path: Path | None) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise ImagingError(f"{name}: {keyword} is not a number: {value!r}", path) from exc
    if not math.isfinite(out):
        raise ImagingError(f"{name}: {keyword} is not finite: {value!r}", path)
    return out


def hu_transform(
    ds: Dataset, frame_index: int | None = None, *, name: str = "", path: Path | None = None
) -> HUTransform:
    """Read how an image's stored values become HU, recognising the RSNA 12-bit fault.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The image's data set (pixels not needed).
    frame_index : int or None
        0-based frame of a multi-frame image, whose rescale may be per frame.
    name, path
        For error messages.

    Returns
    -------
    HUTransform

    Raises
    ------
    ImagingError
        Slope or intercept not a finite number, slope 0, or a Modality LUT
        Sequence instead of a rescale (unsupported).
    """
    values: dict[str, Any] = {}
    group = functional_group(ds, "PixelValueTransformationSequence", frame_index)
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if (value is None or value == "") and group is not None:
            value = group.get(keyword)
        if value is not None and value != "":
            values[keyword] = _number(value, keyword, name, path)
    missing = tuple(k for k in ("RescaleIntercept", "RescaleSlope") if k not in values)
    if missing and "ModalityLUTSequence" in ds:
        raise ImagingError(f"{name}: Modality LUT Sequence instead of rescale: unsupported", path)
    slope = values.get("RescaleSlope", 1.0)
    intercept = values.get("RescaleIntercept", 0.0)
    if slope == 0.0:
        raise ImagingError(f"{name}: RescaleSlope is 0", path)
    bits_stored = _optional_int(ds, "BitsStored")
    bits_allocated = _optional_int(ds, "BitsAllocated")
    unsigned = (_optional_int(ds, "PixelRepresentation") or 0) == 0
    signed_bits = None
    if (
        not missing
        and unsigned
        and bits_stored is not None
        and bits_allocated is not None
        and 1 < bits_stored < bits_allocated
        and intercept > _WRAP_INTERCEPT
        and slope > 0
    ):
        signed_bits = bits_stored
    return HUTransform(slope=slope, intercept=intercept, signed_bits=signed_bits, missing=missing)


def values_look_like_hu(values: np.ndarray) -> bool:
    """Whether values are plausibly HU: air (-1200..-800 HU) is present, little above 3000.

    Used only when RescaleIntercept/RescaleSlope are missing: unsigned values
    (0..4095 for air to bone) fail; signed values with air at about -1000 pass.
    """
    arr = np.asarray(values)
    if arr.size == 0:
        return False
    air = np.count_nonzero((arr >= -1200) & (arr <= -800))
    dense = np.count_nonzero(arr > 3000)
    return bool(air >= _MIN_AIR_SHARE * arr.size and dense < _MAX_DENSE_SHARE * arr.size)


def pixel_data_problem(ds: Dataset, n_frames: int = 1) -> str | None:
    """Why an image's Pixel Data cannot be what its header says, before decoding.

    Checks Rows × Columns × SamplesPerPixel × BitsAllocated / 8 × frames against
    the Pixel Data's length (native, PS3.5 8.1.1), or the number of fragments
    against the frames (encapsulated, PS3.5 A.4), and rejects matrices above
    :data:`MAX_MATRIX`, so that no decoder allocates an array the data cannot fill.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Read with :func:`ich_node.imaging.files.read_dataset` (``defer=True`` keeps
        the pixel bytes on disk; their declared length and offset are checked).
    n_frames : int
        NumberOfFrames (1 for single-frame images).

    Returns
    -------
    str or None
        One line naming the mismatch, or None when the data can hold the image.
    """
    if _PIXEL_DATA_TAG not in ds:
        return "no Pixel Data (7FE0,0010)"
    rows, columns = _optional_int(ds, "Rows"), _optional_int(ds, "Columns")
    if not rows or not columns:
        return None  # reported as missing geometry
    if rows > MAX_MATRIX or columns > MAX_MATRIX:
        return f"header claims a {rows}x{columns} matrix (at most {MAX_MATRIX}): not decoded"
    samples = _optional_int(ds, "SamplesPerPixel") or 1
    bits = _optional_int(ds, "BitsAllocated") or 16
    raw: Any = ds._dict.get(Tag(_PIXEL_DATA_TAG))  # the element as read: may still be deferred
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    undefined = bool(getattr(raw, "is_undefined_length", False))
    encapsulated = undefined or (syntax is not None and syntax.is_encapsulated)
    if encapsulated:
        if syntax is None:
            return "compressed Pixel Data without a Transfer Syntax UID"
        value = ds.PixelData
        try:
            fragments = pydicom.encaps.parse_fragments(value)[0]
        except Exception as exc:  # damaged item tags
            return f"encapsulated Pixel Data cannot be parsed ({exc})"
        if fragments < n_frames:
            return f"{fragments} fragment(s) of compressed Pixel Data for {n_frames} frame(s)"
        return None
    expected = rows * columns * samples * n_frames * bits // 8
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if length is None or getattr(raw, "value", b"") is not None:
        length = len(ds.PixelData)
    elif (
        tell is not None
        and getattr(ds, "filename", None)
        and syntax != DeflatedExplicitVRLittleEndian
    ):
        # (A deflated data set's offsets are in the inflated stream, not the file.)
        with contextlib.suppress(OSError):  # a file cut short: the length runs past its end
            length = min(length, os.path.getsize(ds.filename) - tell)
    if length < expected:
        return (
            f"Pixel Data holds {length} bytes; Rows x Columns x SamplesPerPixel x "
            f"BitsAllocated x frames ({rows}x{columns}x{samples}x{bits}x{n_frames}) "
            f"needs {expected}"
        )
    return None


@dataclass(frozen=True, slots=True)
class StoredSlice:
    """One decoded image before any arithmetic: the stored values and how they become HU.

    What the CPU part of reading a slice makes (parsing, pixel decoding): a decode
    pool makes these in parallel, and :func:`ich_node.imaging.tensors.stored_to_hu`
    turns a batch of them into HU on the model's device.

    Attributes
    ----------
    stored : numpy.ndarray
        (H, W) integer stored values as decoded (uint8/16, int8/16/32).
    transform : HUTransform
        Rescale (PS3.3 C.8.2.1.1) and the RSNA 12-bit fault flag.
    padding : tuple of int or None
        Inclusive range of stored values that are pixel padding (PixelPaddingValue,
        PixelPaddingRangeLimit; PS3.3 C.7.5.1.1.2), or None.
    unused_bits : tuple of (int, bool) or None
        (BitsStored, signed) when BitsStored < BitsAllocated: the bits above
        BitsStored in ``stored`` are as in the file (PS3.5 8.1.1: their values
        cannot be assumed) and :func:`ich_node.imaging.tensors.stored_to_hu` masks
        them (or extends the sign) with the rest of the arithmetic. None: nothing
        to mask.
    orientation : tuple of float or None
        ImageOrientationPatient (from the Plane Orientation functional group for a
        frame), or None when absent.
    name : str
        The file (and frame) for messages.
    path : pathlib.Path or None
        The file, for errors.
    """

    stored: np.ndarray
    transform: HUTransform
    padding: tuple[int, int] | None
    orientation: tuple[float, ...] | None
    name: str
    path: Path | None
    unused_bits: tuple[int, bool] | None = None


def decode_stored(path_or_ds: Path | str | Dataset, frame: int | None = None) -> StoredSlice:
    """Parse and decode one CT image (or one frame of a multi-frame one); no arithmetic.

    Parameters
    ----------
    path_or_ds : pathlib.Path, str or pydicom.dataset.Dataset
        A file, or a dataset read with its pixel data. Native and compressed
        transfer syntaxes (JPEG baseline/extended, JPEG lossless, JPEG-LS,
        JPEG 2000, RLE) are decoded through pydicom's pixel handlers
        (pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls). A file without
        file meta is decoded with the transfer syntax it was read with.
    frame : int or None
        1-based frame number of an Enhanced / Legacy Converted Enhanced CT image
        (PS3.3 A.38, A.70); its rescale comes from the functional groups. None for
        a single-frame image.

    Returns
    -------
    StoredSlice

    Raises
    ------
    ImagingError
        Naming the file: unreadable, no or corrupt/truncated pixel data, pixel data
        shorter than the header says, several frames (without ``frame``) or
        samples, zero or non-finite slope or intercept.
    """
    name = _describe(path_or_ds)
    path = Path(name) if not isinstance(path_or_ds, Dataset) else None
    if isinstance(path_or_ds, Dataset):
        ds = path_or_ds
    else:
        ds = read_dataset(Path(path_or_ds), defer=True)
    if frame is not None:
        name = f"{name} frame {frame}"

    frames = _optional_int(ds, "NumberOfFrames") or 1
    if frame is None and frames != 1:
        raise ImagingError(f"{name}: {frames} frames; give the frame to read", path)
    if frame is not None and not 1 <= frame <= frames:
        raise ImagingError(f"{name}: no such frame (NumberOfFrames {frames})", path)
    if (_optional_int(ds, "SamplesPerPixel") or 1) != 1:
        raise ImagingError(f"{name}: not a grayscale image (SamplesPerPixel != 1)", path)
    problem = pixel_data_problem(ds, frames)
    if problem is not None:
        raise ImagingError(f"{name}: {problem}", path)
    transform = hu_transform(ds, None if frame is None else frame - 1, name=name, path=path)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # The unused high bits are masked with the rest of the arithmetic
            # (StoredSlice.unused_bits), and native data comes as a read-only view of
            # the bytes read (view_only): no copy here, one into the batch later.
            options: dict[str, Any] = {"correct_unused_bits": False, "view_only": True}
            if frame is None:
                stored = pydicom.pixels.pixel_array(ds, **options)
            else:  # from the file when there is one: only that frame's bytes are read
                src: Any = path if path is not None else ds
                stored = pydicom.pixels.pixel_array(src, index=frame - 1, **options)
    except Exception as exc:  # decoders raise ValueError, RuntimeError, ...; all mean corrupt
        raise storage_error(exc, path) or ImagingError(
            f"{name}: cannot decode the pixel data ({exc})", path
        ) from exc
    if stored.ndim != 2:
        raise ImagingError(f"{name}: pixel data has shape {stored.shape}, expected (H, W)", path)
    if stored.dtype.kind not in "iu":
        raise ImagingError(f"{name}: pixel data decoded as {stored.dtype}, not integers", path)
    return _stored_slice(ds, stored, transform, frame, name, path)


def _stored_slice(
    ds: Dataset,
    stored: np.ndarray,
    transform: HUTransform,
    frame: int | None,
    name: str,
    path: Path | None,
) -> StoredSlice:
    """The :class:`StoredSlice` of decoded ``stored`` values, from its header ``ds``."""
    iop = ds.get("ImageOrientationPatient")
    plane = functional_group(ds, "PlaneOrientationSequence", (frame or 1) - 1)
    if iop is None and plane is not None:
        iop = plane.get("ImageOrientationPatient")
    orientation = None
    if iop is not None and len(iop) == 6:
        with contextlib.suppress(TypeError, ValueError):
            orientation = tuple(float(v) for v in iop)
    bits_stored = _optional_int(ds, "BitsStored")
    bits_allocated = _optional_int(ds, "BitsAllocated") or stored.dtype.itemsize * 8
    unused = None
    if bits_stored is not None and 0 < bits_stored < min(bits_allocated, stored.dtype.itemsize * 8):
        unused = (bits_stored, stored.dtype.kind == "i")
    return StoredSlice(
        stored=stored,
        transform=transform,
        padding=_padding_range(ds),
        orientation=orientation,
        name=name,
        path=path,
        unused_bits=unused,
    )


#: Transfer syntaxes whose Pixel Data is the stored values themselves, little endian.
_NATIVE_LITTLE_ENDIAN: Final = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


@dataclass(frozen=True, slots=True)
class NativePixels:
    """Where an uncompressed image's stored values lie in its file (found by the header read).

    With it, decoding is one read of ``rows x columns`` values at ``offset``: the
    file is not parsed again (:func:`read_native`). Only for single-frame images
    in Implicit or Explicit VR Little Endian with one sample of 8 or 16 bits.

    Attributes
    ----------
    offset : int
        Byte offset of the Pixel Data value in the file.
    dtype : str
        numpy dtype of the stored values (``"<u2"``, ``"<i2"``, ``"u1"``, ``"i1"``).
    rows, columns : int
        The matrix.
    meta : StoredSlice
        Everything else of the decoded slice (rescale, padding, unused bits,
        orientation), with an empty ``stored``.
    """

    offset: int
    dtype: str
    rows: int
    columns: int
    meta: StoredSlice


def native_pixels(
    ds: Dataset, path: Path, *, transform: HUTransform | None = None, checked: bool = False
) -> NativePixels | None:
    """:class:`NativePixels` of a header read with :func:`read_dataset` ``(defer=True)``;
    None when the image is compressed, big endian, multi-frame or anything unusual
    (it is then decoded by pydicom, :func:`decode_stored`).

    ``transform``: the image's :func:`hu_transform`, where the caller read it
    already; ``checked``: the caller found no :func:`pixel_data_problem` for one
    frame. Neither is then read again (the header read, 10% less work).
    """
    try:
        meta = getattr(ds, "file_meta", None)
        syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        raw: Any = ds._dict.get(Tag(_PIXEL_DATA_TAG))
        rows, columns = _optional_int(ds, "Rows"), _optional_int(ds, "Columns")
        bits = _optional_int(ds, "BitsAllocated")
        signed = (_optional_int(ds, "PixelRepresentation") or 0) == 1
        if (
            syntax not in _NATIVE_LITTLE_ENDIAN
            or raw is None
            or getattr(raw, "is_undefined_length", False)
            or getattr(raw, "value_tell", None) is None
            or not rows
            or not columns
            or bits not in (8, 16)
            or (_optional_int(ds, "SamplesPerPixel") or 1) != 1
            or (_optional_int(ds, "NumberOfFrames") or 1) != 1
            or raw.length < rows * columns * bits // 8
            or (not checked and pixel_data_problem(ds, 1) is not None)
        ):
            return None
        dtype = ("i" if signed else "u") + str(bits // 8)
        dtype = dtype if bits == 8 else "<" + dtype
        name = str(path)
        if transform is None:
            transform = hu_transform(ds, None, name=name, path=path)
        empty = np.empty((0, 0), dtype=np.dtype(dtype))
        stored_meta = _stored_slice(ds, empty, transform, None, name, path)
        return NativePixels(int(raw.value_tell), dtype, rows, columns, stored_meta)
    except Exception:  # anything odd: pydicom decodes it, and says what is wrong
        return None


def read_native(path: Path, where: NativePixels) -> StoredSlice | None:
    """The stored values at ``where`` in ``path``, as :func:`decode_stored` gives them;
    None when the file no longer holds them (then decode it with pydicom)."""
    dtype = np.dtype(where.dtype)
    count = where.rows * where.columns
    try:
        with open(path, "rb") as fh:
            fh.seek(where.offset)
            data = fh.read(count * dtype.itemsize)
    except OSError:
        return None
    if len(data) != count * dtype.itemsize:
        return None
    stored = np.frombuffer(data, dtype=dtype).reshape(where.rows, where.columns)
    return replace(where.meta, stored=stored)


def load_hu(
    path_or_ds: Path | str | Dataset, frame: int | None = None, *, reorient: bool = False
) -> np.ndarray:
    """Decode one CT image (or one frame of a multi-frame one) to Hounsfield units.

    :func:`decode_stored`, then :func:`ich_node.imaging.tensors.stored_to_hu` on the
    CPU (torch, imported here lazily): the one HU conversion, also used on the
    model's device.

    Parameters
    ----------
    path_or_ds : pathlib.Path, str or pydicom.dataset.Dataset
        See :func:`decode_stored`.
    frame : int or None
        See :func:`decode_stored`.
    reorient : bool
        Turn the slice to the reference patient orientation from its
        ImageOrientationPatient (:class:`~ich_node.imaging.orientation.Reorientation`),
        as the model sees it; training reads single slices this way.

    Returns
    -------
    numpy.ndarray
        (H, W) float32, HU = stored value × RescaleSlope + RescaleIntercept, with
        the RSNA 12-bit fault corrected (see :class:`HUTransform`). Pixel padding
        (PixelPaddingValue, with PixelPaddingRangeLimit) and every value below
        -1024 HU (sentinels such as -2000 or -3024 outside the reconstruction field
        of view) become -1024 (air).

    Raises
    ------
    ImagingError
        As :func:`decode_stored`; :class:`SeriesRefused` when RescaleIntercept or
        RescaleSlope is missing and the values are not HU.
    """
    from ich_node.imaging.tensors import stored_to_hu  # torch: not in the listener

    decoded = decode_stored(path_or_ds, frame)
    out: np.ndarray = stored_to_hu([decoded]).numpy()[0]
    if reorient and decoded.orientation is not None:
        out = Reorientation.from_orientation(decoded.orientation).apply(out)
    return out


def _padding_range(ds: Dataset) -> tuple[int, int] | None:
    """Inclusive range of stored values that are padding, PS3.3 C.7.5.1.1.2; None when no
    padding tag."""
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
        return pad, pad
    limit = as_signed(limit)
    return min(pad, limit), max(pad, limit)


def check_hu_plausible(hu: np.ndarray, what: str) -> None:
    """Refuse HU that are not those of a head CT.

    A head CT has air around the head (at or below -900 HU), tissue in the brain
    range (0..100 HU), and is not mostly denser than 3000 HU. Values that fail
    come from a header that does not describe its pixels; reading them would give
    a confident answer on nonsense.

    Parameters
    ----------
    hu : numpy.ndarray
        (S, H, W) HU of a whole series (from :func:`load_series_hu`).
    what : str
        Names the series in the message.

    Raises
    ------
    SeriesRefused
        With the shares of air, brain-range and dense voxels.
    """
    check_hu_counts(count_hu(hu), what)


def count_hu(hu: np.ndarray) -> HUCounts:
    """The :class:`HUCounts` of HU values of any shape (float or integer), counted exactly."""
    arr = np.asarray(hu)
    return HUCounts(
        voxels=arr.size,
        air=int(np.count_nonzero(arr <= -900)),
        brain=int(np.count_nonzero((arr >= 0) & (arr <= 100))),
        dense=int(np.count_nonzero(arr > 3000)),
    )


@dataclass(frozen=True, slots=True)
class HUCounts:
    """Voxel counts of a series for :func:`check_hu_counts` (summed batch by batch).

    Attributes
    ----------
    voxels : int
        All voxels.
    air, brain, dense : int
        Voxels at or below -900 HU, in 0..100 HU, above 3000 HU.
    """

    voxels: int
    air: int
    brain: int
    dense: int

    def __add__(self, other: HUCounts) -> HUCounts:
        return HUCounts(
            self.voxels + other.voxels,
            self.air + other.air,
            self.brain + other.brain,
            self.dense + other.dense,
        )


def check_hu_counts(counts: HUCounts, what: str) -> None:
    """:func:`check_hu_plausible` on counts made elsewhere (on the model's device).

    Raises
    ------
    ImagingError
        No voxels.
    SeriesRefused
        With the shares of air, brain-range and dense voxels.
    """
    n = counts.voxels
    if n == 0:
        raise ImagingError(f"{what}: no pixels")
    air, brain, dense = counts.air / n, counts.brain / n, counts.dense / n
    if air < _MIN_AIR_SHARE or brain < _MIN_BRAIN_SHARE or dense > _MAX_DENSE_SHARE:
        raise SeriesRefused(
            f"{what}: HU not those of a head CT ({air:.1%} of voxels at air <= -900 HU, "
            f"{brain:.1%} in 0..100 HU, {dense:.1%} above 3000 HU); refused rather than "
            "read wrong"
        )
