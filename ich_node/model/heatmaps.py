"""Heatmap overlays of a whole series, rendered at once on the model's device.

The pixels of each heatmap image (the slice in the brain window, the Grad-CAM map
blended in where it is above :data:`~ich_node.results.sc.CAM_FLOOR`, only inside
the head region of :func:`ich_node.imaging.head_mask`) are a handful of tensor
operations over all images of a series together: the maps taken back to each source
slice's grid (the inverse of the square padding and resize of
:func:`ich_node.imaging.tensors.pad_and_resize`), the brain window, the colour map,
the blend. :func:`with_heatmap_images` runs on the worker's side, between the model
stage and ``results/`` (in the worker's results thread, or in
:func:`ich_node.model.explain.explain_series` for ``predict``), and hands
``results/`` plain ``uint8`` arrays; ``results/`` adds the legend and the burned-in
text and encodes them (:mod:`ich_node.results.sc`), never importing torch.

The look is :mod:`ich_node.results.sc`'s constants (window, floor, opacity, the
part of the Turbo colour map used, the head's HU).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F

from ich_node.imaging import head_mask
from ich_node.imaging.tensors import one_torch_thread
from ich_node.results.findings import ExplainedSeries
from ich_node.results.sc import (
    ALPHA_MAX,
    BRAIN_WINDOW,
    CAM_FLOOR,
    TURBO_COEFFICIENTS,
    TURBO_RANGE,
    heatmap_indices,
)

#: Images rendered at once (bounds the float32 intermediates: ~50 MB at 512 px).
CHUNK: Final[int] = 16
#: Slices of fewer pixels than this (256 x 256) are drawn on the calling thread
#: alone: their operations are too small for torch's and OpenCV's thread pools to
#: pay, and the pools' threads spin between them on a core the SR's process needs
#: (128 px, 40 slices, 25 side-by-side runs: the stage's median 0.388 -> 0.254 s,
#: its process's CPU 0.318 -> 0.213 s; at 512 px the pools halve the drawing;
#: docs/performance.md).
ONE_THREAD_BELOW_PIXELS: Final[int] = 256 * 256


def turbo(x: torch.Tensor) -> torch.Tensor:
    """Turbo-like colour map on a tensor: (...) in [0, 1] -> (..., 3) float32 RGB in [0, 1].

    The polynomials of :func:`ich_node.results.sc.turbo` (which draws the legend).
    """
    t = x.to(torch.float32).clamp(0.0, 1.0)
    channels = []
    for coefficients in TURBO_COEFFICIENTS:
        value = torch.full_like(t, coefficients[-1])
        for c in coefficients[-2::-1]:  # Horner
            value = value * t + c
        channels.append(value)
    return torch.stack(channels, dim=-1).clamp_(0.0, 1.0)


def maps_to_source(maps: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Maps at the model input size -> the source slices' grid (undoes pad and resize).

    The slice was centred in a ``max(rows, columns)`` square and resized to the
    model input; the map is resized back to that square (bilinear, as
    :func:`ich_node.results.common.cam_to_source` does with PIL) and cropped.

    Parameters
    ----------
    maps : torch.Tensor
        (N, size, size) float32 in [0, 1], source orientation.
    rows, columns : int
        Source matrix.

    Returns
    -------
    torch.Tensor
        (N, rows, columns) float32 in [0, 1], on ``maps``' device.
    """
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"maps must have shape (N, size, size), got {tuple(maps.shape)}")
    side = max(rows, columns)
    # PIL's bilinear filter: when enlarging, plain bilinear with half-pixel centres
    # (the same weights, edges included); when shrinking, its antialiased kernel.
    square = F.interpolate(
        maps[:, None].to(torch.float32),
        size=(side, side),
        mode="bilinear",
        align_corners=False,
        antialias=side < maps.shape[-1],
    )[:, 0]
    top, left = (side - rows) // 2, (side - columns) // 2
    return square[:, top : top + rows, left : left + columns].clamp(0.0, 1.0)


def _blend(grey: torch.Tensor, cam: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(...) grey in [0, 1], map, where colour may go -> (..., 3) uint8 RGB.

    The colour rises linearly from 0 at :data:`CAM_FLOOR` to :data:`ALPHA_MAX` at
    the map's maximum, only where ``inside``.
    """
    level = ((cam - CAM_FLOOR) / (1.0 - CAM_FLOOR)).clamp_(0.0, 1.0)
    alpha = (ALPHA_MAX * level * inside)[..., None]
    lo, hi = TURBO_RANGE
    rgb = (1.0 - alpha) * grey[..., None] + alpha * turbo(lo + (hi - lo) * level)
    return (rgb * 255.0).round_().to(torch.uint8)


def _render(hu: torch.Tensor, cam: torch.Tensor | None, head: torch.Tensor | None) -> torch.Tensor:
    """(N, H, W) HU, maps (or None) and head region -> (N, H, W, 3) uint8 RGB on the device."""
    low = BRAIN_WINDOW.center - BRAIN_WINDOW.width / 2
    grey = ((hu - low) / BRAIN_WINDOW.width).clamp_(0.0, 1.0)
    if cam is None or head is None:
        return (grey * 255.0).round_().to(torch.uint8)[..., None].expand(*grey.shape, 3)
    # Colour only the head, above the floor: the upsampled map spills into the air,
    # the table and the head holder, where it would suggest a finding outside the
    # patient.
    inside = (cam > CAM_FLOOR) & head
    if hu.device.type != "cpu":
        return _blend(grey, cam, inside)  # every pixel at once: the GPU does not mind
    # On the CPU, the colour map only where there is colour (a fraction of a slice);
    # elsewhere the blend is the grey image itself (alpha 0), made RGB by OpenCV. The
    # coloured pixels are found once (their flat indices, numpy's: 5x torch's
    # nonzero here), gathered with numpy's take and scattered by torch's index_put.
    import cv2  # (opencv-python-headless, as the head region)

    grey8 = grey.mul(255.0).round_().to(torch.uint8).numpy()
    rgb = cv2.cvtColor(grey8.reshape(-1, grey8.shape[-1]), cv2.COLOR_GRAY2RGB)
    out = torch.from_numpy(rgb).view(*grey.shape, 3)
    where = np.flatnonzero(inside.contiguous().numpy())
    if len(where):
        coloured = _blend(
            torch.from_numpy(grey.contiguous().numpy().reshape(-1).take(where)),
            torch.from_numpy(cam.contiguous().numpy().reshape(-1).take(where)),
            torch.ones((), dtype=torch.bool),
        )
        out.view(-1, 3)[torch.from_numpy(where)] = coloured
    return out


def render_overlays(
    hu: torch.Tensor,
    maps: torch.Tensor | None,
    explained: Sequence[bool],
    head: torch.Tensor | None = None,
) -> list[np.ndarray]:
    """Render several heatmap images of one series at once.

    Parameters
    ----------
    hu : torch.Tensor
        (N, rows, columns) float32 HU of the slices to draw, source orientation, on
        the device that renders.
    maps : torch.Tensor or None
        (M, size, size) float32 in [0, 1] maps at the model input size, source
        orientation, one per explained slice in order (None when M is 0).
    explained : sequence of bool
        Per slice, whether it has a map (the next of ``maps``); the others are the
        plain brain window.
    head : torch.Tensor, optional
        (N, rows, columns) bool head region (:func:`ich_node.imaging.head_mask` of the
        whole series), where colour may go. Default: the head region of ``hu`` itself.

    Returns
    -------
    list of numpy.ndarray
        One (rows, columns, 3) uint8 RGB per slice, on the CPU.
    """
    if len(hu) != len(explained):
        raise ValueError(f"{len(hu)} slices but {len(explained)} explained flags")
    n_maps = sum(explained)
    if n_maps and (maps is None or len(maps) != n_maps):
        raise ValueError(f"{n_maps} slices explained but {0 if maps is None else len(maps)} maps")
    if head is not None and head.shape != hu.shape:
        raise ValueError(f"head shape {tuple(head.shape)} differs from hu's {tuple(hu.shape)}")
    if n_maps and head is None:
        head = torch.from_numpy(head_mask(hu.cpu().numpy()))
    rows, columns = int(hu.shape[1]), int(hu.shape[2])
    map_at = np.cumsum([0, *explained])  # index into ``maps`` of each explained slice
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(hu), CHUNK):
            part = range(start, min(len(hu), start + CHUNK))
            slices = hu[start : part.stop]
            with_map = [k for k in part if explained[k]]
            if not with_map or maps is None or head is None:
                rgb = _render(slices, None, None)
            else:
                chosen = maps[torch.as_tensor([int(map_at[k]) for k in with_map])]
                on_source = maps_to_source(chosen.to(hu.device), rows, columns)
                if len(with_map) == len(slices):  # every slice has its map
                    cams = on_source.contiguous()
                else:
                    cams = torch.zeros_like(slices)
                    cams[torch.as_tensor([k - start for k in with_map], device=hu.device)] = (
                        on_source
                    )
                rgb = _render(slices, cams, head[start : part.stop].to(hu.device))
            out.extend(rgb.cpu().numpy())
    return out


def _consecutive(indices: Sequence[int]) -> slice | None:
    """``indices`` as a slice when they are consecutive (every slice of a series, the
    usual case, or one run of them), else None: then ``stack[run]`` is a view where
    ``stack[indices]`` copies (40 slices of 512 x 512 HU: 42 MB, about 9 ms)."""
    if len(indices) and list(indices) == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return None


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A C-contiguous array as a CPU tensor, sharing its memory where torch allows
    (a read-only array is copied: torch has no read-only tensors)."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


@contextlib.contextmanager
def _drawing_threads(pixels: int) -> Iterator[None]:
    """One thread for torch (this thread's OpenMP regions) and OpenCV (process-wide:
    only the results stage draws with it) while slices of ``pixels`` pixels are
    drawn, below :data:`ONE_THREAD_BELOW_PIXELS`; the settings are restored after."""
    if pixels >= ONE_THREAD_BELOW_PIXELS:
        yield
        return
    import cv2  # (opencv-python-headless: the head region's and the drawing's)

    before = cv2.getNumThreads()
    cv2.setNumThreads(0)  # 0: OpenCV's functions run sequentially
    try:
        with one_torch_thread():
            yield
    finally:
        cv2.setNumThreads(before)


def with_heatmap_images(
    explained: ExplainedSeries,
    which: str,
    device: torch.device | str,
    *,
    hu: torch.Tensor | None = None,
) -> ExplainedSeries:
    """``explained`` with its heatmap images rendered and its head region found.

    The worker-side step between the model stage and ``results/``: the head region
    of the series (:func:`ich_node.imaging.head_mask`, CPU), then every image the
    heatmap series shows (:func:`ich_node.results.sc.heatmap_indices`) rendered at
    once on ``device`` (:func:`render_overlays`). Slices smaller than
    :data:`ONE_THREAD_BELOW_PIXELS` are drawn on this thread alone.

    Parameters
    ----------
    explained : ExplainedSeries
        From :func:`ich_node.model.explain.explain_series`.
    which : {"positive", "all", "none"}
        ``results.heatmaps``.
    device : torch.device or str
        Where to render (the model's device).
    hu : torch.Tensor, optional
        ``explained.hu`` already on ``device`` (the prediction's), to spare a copy.

    Returns
    -------
    ExplainedSeries
        With ``overlays`` (slice index -> (rows, columns, 3) uint8) and ``head``
        ((S, rows, columns) bool, or None when no slice has a map).
    """
    indices = heatmap_indices(explained, which)
    if not indices:
        return explained
    with _drawing_threads(int(np.prod(explained.hu.shape[1:]))):
        return _drawn(explained, indices, torch.device(device), hu)


def _drawn(
    explained: ExplainedSeries,
    indices: list[int],
    device: torch.device,
    hu: torch.Tensor | None,
) -> ExplainedSeries:
    """:func:`with_heatmap_images` of the slices ``indices`` (not empty)."""
    by_index = {e.index: e for e in explained.explanations}
    flags = [i in by_index for i in indices]
    head = None
    if any(flags):
        spacing = explained.series.slices[0].pixel_spacing if explained.series.slices else 0.5
        head = head_mask(explained.hu, spacing)
    run = _consecutive(indices)
    rows = run if run is not None else indices
    with torch.inference_mode():
        if hu is not None and hu.device == device:
            chosen = hu[run] if run is not None else hu[torch.as_tensor(indices, device=device)]
        else:
            chosen = _tensor(explained.hu[rows]).to(device)
        maps = (
            torch.from_numpy(np.stack([by_index[i].cam for i in indices if i in by_index]))
            if any(flags)
            else None
        )
        images = render_overlays(
            chosen,
            maps,
            flags,
            None if head is None else _tensor(head[rows]),
        )
    return replace(explained, overlays=dict(zip(indices, images, strict=True)), head=head)


def warm_up(device: torch.device | str) -> float:
    """Draw one tiny synthetic heatmap on ``device``, so that the first study does not
    pay for what drawing loads on first use: the head region's libraries
    (``scipy.ndimage`` and OpenCV, imported when first called) and the first calls
    of the drawing's operations. The image (a 32x32 slice of brain-like 40 HU with
    a map over it) is not kept.

    Returns
    -------
    float
        Seconds it took.
    """
    started = time.perf_counter()
    hu = torch.full((1, 32, 32), 40.0, device=torch.device(device))
    maps = torch.linspace(0.0, 1.0, 64).view(1, 8, 8)
    render_overlays(hu, maps, [True])  # its head region found from ``hu`` (head_mask)
    return time.perf_counter() - started
