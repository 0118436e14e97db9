"""Reading head-CT series and turning them into model input: the one preprocessing.

The node's worker and the training code both call :func:`preprocess_hu` (or
:func:`preprocess_series`), so what the model sees in training is exactly what it
sees in service. The package follows the pipeline's own steps:

1. :mod:`~ich_node.imaging.files`: :func:`iter_dicom_files` and :func:`group_series`
   find DICOM files and group them by SeriesInstanceUID (headers only).
2. :mod:`~ich_node.imaging.series`: :func:`read_series` keeps the axial CT images of
   one series, drops localizers and images of another orientation, and orders the
   slices along the slice normal (``ImagePositionPatient · normal``), never by
   ``InstanceNumber``.
3. :mod:`~ich_node.imaging.pixels`: :func:`load_hu` / :func:`load_series_hu` decode
   the pixels (native and the common compressed transfer syntaxes) and convert
   them to Hounsfield units.
4. :mod:`~ich_node.imaging.preprocess`: :func:`apply_windows` maps HU to one [0, 1]
   channel per display window; :func:`resize` pads to a square and resizes with
   antialiased bilinear interpolation.
5. :mod:`~ich_node.imaging.head`: :func:`head_mask` finds the head region (the
   largest connected body, without table and head holder) that heatmaps are
   coloured in.

``from ich_node.imaging import X`` keeps working for every public name. This
package must not import torch at import time: the listener process reads headers
with it and never loads torch. :func:`resize` imports it lazily.
"""

from __future__ import annotations

from ich_node.imaging.files import (
    UNREADABLE,
    ImagingError,
    SeriesRefused,
    StorageUnavailable,
    group_series,
    iter_dicom_files,
)
from ich_node.imaging.head import head_mask
from ich_node.imaging.pixels import AIR_HU, check_hu_plausible, load_hu
from ich_node.imaging.preprocess import (
    DEFAULT_WINDOWS,
    Window,
    add_slice_context,
    apply_windows,
    context_channels,
    preprocess_hu,
    preprocess_series,
    resize,
)
from ich_node.imaging.records import Coverage, Dropped, Note, Refusal
from ich_node.imaging.series import (
    CT_IMAGE_STORAGE,
    DEFAULT_MAX_GAP_MM,
    DEFAULT_PREFERRED_KERNELS,
    CTSeries,
    CTSlice,
    load_series_hu,
    read_series,
    slice_position_mm,
    unit_normal,
)

__all__ = [
    "AIR_HU",
    "CT_IMAGE_STORAGE",
    "DEFAULT_MAX_GAP_MM",
    "DEFAULT_PREFERRED_KERNELS",
    "DEFAULT_WINDOWS",
    "UNREADABLE",
    "CTSeries",
    "CTSlice",
    "Coverage",
    "Dropped",
    "ImagingError",
    "Note",
    "Refusal",
    "SeriesRefused",
    "StorageUnavailable",
    "Window",
    "add_slice_context",
    "apply_windows",
    "check_hu_plausible",
    "context_channels",
    "group_series",
    "head_mask",
    "iter_dicom_files",
    "load_hu",
    "load_series_hu",
    "preprocess_hu",
    "preprocess_series",
    "read_series",
    "resize",
    "slice_position_mm",
    "unit_normal",
]
