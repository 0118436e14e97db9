"""The head region of a CT series: the patient's largest connected body, without supports.

Heatmaps and maps are coloured only inside this region (``ich_node.results.sc``):
a Grad-CAM map upsampled from a 4x4 to 16x16 grid spills beyond the skull, and on
a real scan that puts colour on the table, the head holder and the air around the
head, which reads as a finding outside the patient.

The region is found from HU alone, with the usual body-segmentation steps
(threshold, morphological opening, largest connected component) and one step for
supports that touch the head:

1. tissue is every pixel above :data:`HEAD_MIN_HU` (air, the foam of cushions and
   the air of the sinuses are below it; skin, fat, brain and bone above it);
2. supports: each dense piece of a slice (above :data:`SUPPORT_MIN_HU`: the plastic
   of a head holder, a table; bone too, but never blood, brain or skin) that lies
   within :data:`SUPPORT_REACH_MM` of the air around the patient is taken out with
   its partial-volume rim. Bone is covered by the scalp, so it stays; a holder that
   touches an ear or the scalp goes, contact included. The largest dense piece of
   a slice (the skull, where the scalp is thin) is never a support;
3. a morphological opening with a square of side ``2 x OPENING_RADIUS_MM`` in each
   slice removes what is thin (a pinna, a foam-covered shell, the edge of a table);
4. the largest 3-D connected component of what is left is the patient: over a
   whole series it is always the head (a table or holder is smaller), even at the
   vertex, where one slice's head may be smaller than its support;
5. the component is grown back by one grid step and cut to the tissue pixels that
   are not support, so its edge follows the skin at full resolution.

Steps 2 to 4 run on a grid of about 1 mm (every ``f``-th pixel, ``f = floor(1 mm /
pixel spacing)``), which is enough to tell the head from its supports and keeps the
cost to a fraction of a second for a 40-slice 512x512 series.

Shared by the node's results stage and by anyone rendering maps on CT slices; it
works on HU arrays (:func:`ich_node.imaging.load_series_hu`), so it knows nothing
of DICOM. The in-plane steps (filters, per-slice labelling) are OpenCV calls over
all slices stacked into one image with rows of zeros between them (the result of
``scipy.ndimage`` with ``mode="constant"``, checked equal in ``tests/test_head.py``);
the 3-D labelling is ``scipy.ndimage``'s. Both are imported when the function is
called, not with the package, so the listener (which reads headers through this
package) stays light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np

#: Pixels above this HU are tissue (skin, fat at about -100, brain, bone); below it
#: are air, cushion foam (about -900 to -700) and the air of the sinuses.
HEAD_MIN_HU: Final[float] = -300.0
#: Pixels above this HU are dense: bone and the plastics and carbon fibre of supports
#: (PMMA about +120, the GE holder in shared/real-ct +300 to +380), never skin,
#: brain or blood (at most about +90).
SUPPORT_MIN_HU: Final[float] = 100.0
#: A dense piece this close to the air around the patient is a support, mm: the
#: scalp over bone is thicker.
SUPPORT_REACH_MM: Final[float] = 2.0
#: Half the side of the opening's square, mm: structures thinner than twice this
#: (head-holder shells, table skins, a pinna) are not part of the region.
OPENING_RADIUS_MM: Final[float] = 3.0
#: Side of the grid, mm, on which supports, the opening and the components are found.
GRID_MM: Final[float] = 1.0

#: 4- and 8-connectivity within each slice of an (S, H, W) array, none across slices.
_IN_PLANE_4 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_4[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
_IN_PLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8[1] = True


def head_mask(
    hu: np.ndarray,
    pixel_spacing_mm: float | Sequence[float] = 0.5,
) -> np.ndarray:
    """The pixels of the patient's head in a stack of CT slices.

    Parameters
    ----------
    hu : numpy.ndarray
        (S, rows, columns) or (rows, columns) Hounsfield units, any real dtype; for
        a stack, consecutive slices in spatial order (as
        :func:`~ich_node.imaging.read_series` orders them), so that the head is one
        3-D connected component. NaN counts as air.
    pixel_spacing_mm : float or (float, float)
        In-plane spacing, mm: one value for square pixels, or PixelSpacing (0028,0030)
        as (row spacing, column spacing). The default 0.5 mm is a usual head CT
        (250 mm field of view, 512 matrix), for callers that have no header.

    Returns
    -------
    numpy.ndarray
        bool, the shape of ``hu``: True on tissue pixels (above :data:`HEAD_MIN_HU`)
        of the patient's head (module docstring). False on air inside and outside
        the head, on the table and head holder (touching the head or not), and on
        thin appendages (the outer ear). All False when there is no tissue.

    Raises
    ------
    ValueError
        If ``hu`` is not 2-D or 3-D, or a spacing is not a positive finite number.
    """
    from scipy import ndimage  # lazily: see the module docstring

    arr = np.asarray(hu)
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"hu must have shape (S, rows, columns) or (rows, columns), got {arr.shape}"
        )
    spacing = (
        (float(pixel_spacing_mm),) * 2
        if isinstance(pixel_spacing_mm, int | float | np.number)
        else tuple(float(v) for v in pixel_spacing_mm)
    )
    if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"pixel_spacing_mm must be positive and finite, got {pixel_spacing_mm!r}")
    stack = arr[None] if arr.ndim == 2 else arr
    tissue = stack > HEAD_MIN_HU
    if not tissue.any():
        return np.zeros(arr.shape, dtype=bool)
    rows, columns = tissue.shape[1:]
    # Every f-th pixel: a grid of about GRID_MM (never coarser than the image).
    fy = max(1, int(GRID_MM // spacing[0]))
    fx = max(1, int(GRID_MM // spacing[1]))
    step = min(spacing[0] * fy, spacing[1] * fx)  # mm between grid samples
    coarse = np.ascontiguousarray(stack[:, ::fy, ::fx])
    body = coarse > HEAD_MIN_HU
    support = _supports(coarse, body, max(1, round(SUPPORT_REACH_MM / step)))
    body &= ~support
    ky = 2 * round(OPENING_RADIUS_MM / (spacing[0] * fy)) + 1
    kx = 2 * round(OPENING_RADIUS_MM / (spacing[1] * fx)) + 1
    # Opening with a square, in each slice: erosion then dilation. Outside the image
    # counts as air.
    opened = _in_plane(_dilate, _in_plane(_erode, body.view(np.uint8), ky, kx), ky, kx)
    labels, n = ndimage.label(opened)  # 6-connected in 3-D
    if n == 0:  # everything was thinner than the opening: no head to show
        return np.zeros(arr.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    head = (labels == int(sizes.argmax())).view(np.uint8)
    # One grid step back (the samples are f pixels apart), then to full resolution.
    head = _in_plane(_dilate, head, 3, 3).view(bool)
    # Replication to full resolution commutes with the pixelwise operations: done once.
    out = _full(head & ~support, fy, fx, rows, columns) & tissue
    return out[0] if arr.ndim == 2 else out


def _full(grid: np.ndarray, fy: int, fx: int, rows: int, columns: int) -> np.ndarray:
    """(S, h, w) bool grid samples -> (S, rows, columns) bool, each sample over its
    f x f block: OpenCV's exact nearest-neighbour resize of the stacked slices (for an
    integer factor, sample ``y // fy, x // fx``), 10x faster than numpy's copy of a
    broadcast view (22 -> 2 ms for 40 slices of 512, docs/performance.md)."""
    import cv2

    s, h, w = grid.shape
    stacked = np.ascontiguousarray(grid).view(np.uint8).reshape(s * h, w)
    out = cv2.resize(stacked, (w * fx, s * h * fy), interpolation=cv2.INTER_NEAREST_EXACT)
    return out.reshape(s, h * fy, w * fx)[:, :rows, :columns].view(bool)


def _stacked(grid: np.ndarray, pad: int) -> np.ndarray:
    """(S, h, w) uint8 -> (S * (h + pad), w): the slices one under another, ``pad`` rows
    of 0 after each, so that a 2-D operation with a reach of at most ``pad`` rows
    treats each slice as an image with zeros around it."""
    s, h, w = grid.shape
    out = np.zeros((s, h + pad, w), dtype=np.uint8)
    out[:, :h] = grid
    return out.reshape(s * (h + pad), w)


def _erode(image: np.ndarray, ky: int, kx: int) -> np.ndarray:
    import cv2  # OpenCV (opencv-python-headless, installed with grad-cam)

    kernel = np.ones((ky, kx), dtype=np.uint8)
    return cv2.erode(image, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)


def _dilate(image: np.ndarray, ky: int, kx: int) -> np.ndarray:
    import cv2

    kernel = np.ones((ky, kx), dtype=np.uint8)
    return cv2.dilate(image, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)


def _in_plane(
    op: Callable[[np.ndarray, int, int], np.ndarray], grid: np.ndarray, ky: int, kx: int
) -> np.ndarray:
    """A ky x kx (odd) minimum or maximum filter of each slice of an (S, h, w) uint8
    array, zeros outside each slice: ``scipy.ndimage.minimum_filter`` (or maximum)
    with ``size=(1, ky, kx), mode="constant"``, as one OpenCV call over the stacked
    slices (SIMD, and the GIL released once, not once a slice)."""
    s, h, w = grid.shape
    pad = ky // 2
    out = op(_stacked(grid, pad), ky, kx)
    return np.ascontiguousarray(out.reshape(s, h + pad, w)[:, :h])


def _components(
    mask: np.ndarray, connectivity: int, *, where: bool = True
) -> tuple[np.ndarray, int, np.ndarray | None, np.ndarray | None]:
    """Connected components of each slice of an (S, h, w) bool array (none across slices).

    Returns (labels, n, slice_of, areas): (S, h, w) int32 labels 1..n numbered in
    raster order of each component's first pixel (as ``scipy.ndimage.label`` numbers
    them), 0 outside (a view into the stacked slices, not contiguous); and (n,) the
    slice each component lies in and (n,) its pixel count (both ``None`` unless
    ``where``). OpenCV's Wu (SAUF) labelling, one call over the stacked slices.
    """
    import cv2

    s, h, w = mask.shape
    stacked = _stacked(mask.view(np.uint8), 1)
    slice_of = areas = None
    if where:
        n, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
            stacked, connectivity, cv2.CV_32S, cv2.CCL_WU
        )
        slice_of = stats[1:, cv2.CC_STAT_TOP] // (h + 1)
        areas = stats[1:, cv2.CC_STAT_AREA]
    else:
        n, labels = cv2.connectedComponentsWithAlgorithm(
            stacked, connectivity, cv2.CV_32S, cv2.CCL_WU
        )
    return labels.reshape(s, h + 1, w)[:, :h], n - 1, slice_of, areas


def _supports(hu: np.ndarray, body: np.ndarray, reach: int) -> np.ndarray:
    """(S, h, w) bool: the dense pieces near the air around the patient, and their rims.

    ``hu`` and ``body`` (tissue) are on the grid; ``reach`` is in grid steps. The
    air around the patient is the air of each slice connected to the image's edge
    (the air of the sinuses is enclosed, so bone walls next to it stay).
    """
    air, n_air, _, _ = _components(~body, 4, where=False)
    edge = np.zeros(n_air + 1, dtype=bool)
    for side in (air[:, 0, :], air[:, -1, :], air[:, :, 0], air[:, :, -1]):
        edge[side] = True
    edge[0] = False
    span = 2 * reach + 1
    near = _in_plane(_dilate, edge[air].view(np.uint8), span, span).view(bool)
    dense, n_dense, where, sizes = _components(hu > SUPPORT_MIN_HU, 8)
    if n_dense == 0 or where is None or sizes is None:
        return np.zeros(body.shape, dtype=bool)
    chosen = np.zeros(n_dense + 1, dtype=bool)
    chosen[dense[near]] = True
    chosen[0] = False
    # Never the largest dense piece of a slice: the skull, where the scalp is thin.
    # Pieces are in-plane, so each lies in one slice: sort by (slice, size).
    order = np.lexsort((sizes, where))
    last = np.r_[where[order][1:] != where[order][:-1], True]  # the largest of its slice
    chosen[order[last] + 1] = False
    support = chosen[dense]
    # The partial-volume rim (pixels between the dense core and air or skin).
    rim = _in_plane(_dilate, support.view(np.uint8), 3, 3)
    return rim.view(bool) & body
