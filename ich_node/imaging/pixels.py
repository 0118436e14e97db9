"""Decoding pixel data and converting it to Hounsfield units.

Step 3 of :mod:`ich_node.imaging`: native and compressed transfer syntaxes through
pydicom's pixel handlers, then the CT rescale (PS3.3 C.8.2.1) to HU.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ich_node.imaging.files import ImagingError, _optional_int
from ich_node.imaging.series import CTSeries

#: HU given to padding and to sentinel values below the physical range (air).
AIR_HU: Final[float] = -1024.0

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
