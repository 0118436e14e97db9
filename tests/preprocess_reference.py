"""The numpy preprocessing the node used before it ran on the model's device (#26).

Kept only as the reference the torch implementation (:mod:`ich_node.imaging.tensors`)
is tested against; nothing in ``ich_node/`` or ``training/`` calls it. Each function
is the earlier code, unchanged but for its name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydicom
import pydicom.pixels

from ich_node.imaging.pixels import (
    _WRAP_AIR_SHARE,
    AIR_HU,
    _padding_range,
    hu_transform,
    values_look_like_hu,
)
from ich_node.imaging.preprocess import CONTEXT_CHANNEL, Window
from ich_node.imaging.series import CTSlice


def hu_reference(s: CTSlice) -> np.ndarray:
    """The former ``load_hu`` of one slice: pydicom's own decoding (unused bits corrected
    by pydicom), then the rescale in float64; (H, W) float32 HU."""
    ds = pydicom.dcmread(s.path)
    if s.frame_number is None:
        stored = ds.pixel_array
    else:
        stored = pydicom.pixels.pixel_array(s.path, index=s.frame_number - 1)
    frame = None if s.frame_number is None else s.frame_number - 1
    transform = hu_transform(ds, frame)
    padding = _padding_range(ds)
    values = stored.astype(np.float64)
    if transform.signed_bits is not None:
        bits = transform.signed_bits
        wrapped = np.where(values >= (1 << (bits - 1)), values - (1 << bits), values)
        air = wrapped * transform.slope + transform.intercept
        if np.count_nonzero((air >= -1100) & (air <= -900)) >= _WRAP_AIR_SHARE * air.size:
            values = wrapped
    hu = values * transform.slope + transform.intercept
    if transform.missing and not values_look_like_hu(hu):
        raise ValueError("not HU")
    if padding is not None:
        lo, hi = padding
        hu[(stored >= lo) & (stored <= hi)] = AIR_HU
    np.maximum(hu, AIR_HU, out=hu)
    return hu.astype(np.float32)


def windows_reference(hu: np.ndarray, windows: Sequence[Window]) -> np.ndarray:
    """The former ``apply_windows``: (..., H, W) -> (..., C, H, W) float32 in [0, 1]."""
    arr = np.asarray(hu, dtype=np.float32)
    out = np.empty((*arr.shape[:-2], len(windows), *arr.shape[-2:]), dtype=np.float32)
    for c, w in enumerate(windows):
        channel = out[..., c, :, :]
        np.subtract(arr, np.float32(w.center - w.width / 2), out=channel)
        np.divide(channel, np.float32(w.width), out=channel)
        np.clip(channel, 0.0, 1.0, out=channel)
    return out


def resize_reference(images: np.ndarray, size: int) -> np.ndarray:
    """The former ``resize``: zero padding to a square in numpy, then torch's antialiased
    bilinear resize on the CPU (as it always was)."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(images, dtype=np.float32)
    s, c, h, w = arr.shape
    if h != w:
        side = max(h, w)
        square = np.zeros((s, c, side, side), dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        square[:, :, top : top + h, left : left + w] = arr
        arr = square
    if arr.shape[-1] == size:
        return np.ascontiguousarray(arr)
    with torch.no_grad():
        out = F.interpolate(
            torch.from_numpy(np.ascontiguousarray(arr)),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    return out.numpy().astype(np.float32, copy=False)


def preprocess_reference(hu: np.ndarray, windows: Sequence[Window], size: int) -> np.ndarray:
    """The former ``preprocess_hu``: windows, resize, clip."""
    out = resize_reference(windows_reference(hu, windows), size)
    return np.clip(out, 0.0, 1.0)


def context_reference(images: np.ndarray, context: int) -> np.ndarray:
    """The former ``add_slice_context`` (edges replicated)."""
    arr = np.asarray(images, dtype=np.float32)
    if context == 0:
        return arr
    s = arr.shape[0]
    out = np.empty((s, arr.shape[1] + 2 * context, *arr.shape[2:]), dtype=np.float32)
    out[:, : arr.shape[1]] = arr
    brain = arr[:, CONTEXT_CHANNEL]
    padded = np.pad(brain, ((context, context), (0, 0), (0, 0)), mode="edge")
    for k in range(1, context + 1):
        out[:, arr.shape[1] + 2 * (k - 1)] = padded[context - k : context - k + s]
        out[:, arr.shape[1] + 2 * (k - 1) + 1] = padded[context + k : context + k + s]
    return out


def overlay_reference(hu: np.ndarray, cam: np.ndarray | None, head: np.ndarray) -> np.ndarray:
    """The pixels of the former ``results.sc.render_overlay`` before its text: (rows,
    columns) HU, map and head region on the same grid -> (rows, columns, 3) uint8."""
    from ich_node.results.sc import (
        ALPHA_MAX,
        BRAIN_WINDOW,
        CAM_FLOOR,
        TURBO_RANGE,
        turbo,
    )

    hu = np.asarray(hu, dtype=np.float32)
    low = BRAIN_WINDOW.center - BRAIN_WINDOW.width / 2
    grey = np.clip((hu - low) / BRAIN_WINDOW.width, 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if cam is not None:
        level = np.clip((cam - CAM_FLOOR) / (1.0 - CAM_FLOOR), 0.0, 1.0)
        alpha = ALPHA_MAX * level * (cam > CAM_FLOOR) * head
        colour = turbo(TURBO_RANGE[0] + (TURBO_RANGE[1] - TURBO_RANGE[0]) * level)
        rgb = (1.0 - alpha[..., None]) * rgb + alpha[..., None] * colour
    return np.round(rgb * 255.0).astype(np.uint8)
