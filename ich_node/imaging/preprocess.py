"""Model input from HU: reference orientation, display windows, square padding, resizing.

Step 4 of :mod:`ich_node.imaging`, the one preprocessing shared by the node and
training: :func:`model_hu` turns slices to one patient orientation
(:class:`~ich_node.imaging.orientation.Reorientation`), then :func:`preprocess_hu`
windows, pads and resizes. The arithmetic is :mod:`ich_node.imaging.tensors` (torch,
on any device); the functions here are its numpy face on the CPU, for training's
DataLoader workers and for tools. Must not import torch at import time: each
function imports it lazily.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from ich_node.imaging.orientation import Reorientation
from ich_node.imaging.series import CTSeries, load_series_hu


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


# ---------------------------------------------------------------- model input


def apply_windows(hu: np.ndarray, windows: Sequence[Window] = DEFAULT_WINDOWS) -> np.ndarray:
    """Map HU to one [0, 1] channel per window (numpy in and out).

    ``(HU - (center - width / 2)) / width``, clipped to [0, 1]: a plain linear
    ramp, not PS3.3 C.11.2.1.2.1's ``center - 0.5`` / ``width - 1`` display rule,
    so that HU 40 in the (40, 80) brain window is exactly 0.5. Runs
    :func:`ich_node.imaging.tensors.apply_windows` on the CPU.

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
    import torch  # lazily: not in the listener process

    from ich_node.imaging import tensors

    arr = np.ascontiguousarray(hu, dtype=np.float32)
    if arr.ndim < 2:
        raise ValueError(f"hu must have shape (..., H, W), got {arr.shape}")
    out: np.ndarray = tensors.apply_windows(torch.from_numpy(arr), windows).numpy()
    return out


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square with 0, then resize (bilinear, antialiased); numpy in and out.

    Runs :func:`ich_node.imaging.tensors.pad_and_resize` on the CPU.

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
    import torch

    from ich_node.imaging import tensors

    arr = np.ascontiguousarray(images, dtype=np.float32)
    if arr.ndim != 4:
        raise ValueError(f"images must have shape (S, C, H, W), got {arr.shape}")
    with torch.no_grad():
        out: np.ndarray = tensors.pad_and_resize(torch.from_numpy(arr), size).numpy()
    return out


def preprocess_hu(hu: np.ndarray, windows: Sequence[Window], size: int) -> np.ndarray:
    """The model input: windows, pad and resize, clip (numpy in and out).

    Runs :func:`ich_node.imaging.tensors.model_input` on the CPU: the function the
    node's worker runs on the model's device, so training (which calls this in its
    DataLoader workers) and the node cannot drift.

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
    import torch

    from ich_node.imaging import tensors

    arr = np.ascontiguousarray(hu, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"hu must have shape (S, H, W), got {arr.shape}")
    with torch.no_grad():
        out: np.ndarray = tensors.model_input(torch.from_numpy(arr), windows, size).numpy()
    return out


def preprocess_series(series: CTSeries, windows: Sequence[Window], size: int) -> np.ndarray:
    """Decode and preprocess a series: :func:`load_series_hu`, :func:`model_hu`, then
    :func:`preprocess_hu`.

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
    return preprocess_hu(model_hu(series, load_series_hu(series)), windows, size)


def series_reorientation(series: CTSeries) -> Reorientation:
    """How the slices of ``series`` turn to the reference orientation (one for the stack)."""
    if not series.slices:
        return Reorientation()
    return Reorientation.from_orientation(series.slices[0].image_orientation)


def model_hu(series: CTSeries, hu: np.ndarray) -> np.ndarray:
    """HU of ``series`` (or of a run of its slices) turned to the reference orientation.

    Parameters
    ----------
    series : CTSeries
        Gives ImageOrientationPatient.
    hu : numpy.ndarray
        (S, H, W) HU in source orientation (:func:`load_series_hu`).

    Returns
    -------
    numpy.ndarray
        (S, H', W') HU, rows toward patient left, columns toward posterior; the
        source array itself when no turn is needed.
    """
    turn = series_reorientation(series)
    return hu if turn.identity else turn.apply(hu)


# ------------------------------------------------------------ 2.5D slice context


#: Index of the channel neighbours contribute (the brain window, first of DEFAULT_WINDOWS).
CONTEXT_CHANNEL: Final[int] = 0


def context_channels(windows: Sequence[Window], context: int) -> int:
    """Channels of the model input: one per window plus ``2 x context`` neighbour channels."""
    if not isinstance(context, int) or isinstance(context, bool) or context < 0:
        raise ValueError(f"context must be an int >= 0, got {context!r}")
    return len(windows) + 2 * context


def add_slice_context(images: np.ndarray, context: int) -> np.ndarray:
    """2.5D input: append the neighbours' brain-window channel to each slice (numpy).

    Runs :func:`ich_node.imaging.tensors.add_slice_context` on the CPU, the one
    implementation of slice context, used by training
    (:class:`training.data.SliceDataset`), ``ich-node predict`` and the node's worker
    (:class:`ich_node.model.inference.Classifier`, on the model's device).

    Parameters
    ----------
    images : numpy.ndarray
        (S, C, H, W) float32 model input of consecutive slices **in the series'
        spatial order** (inferior -> superior, as :func:`~ich_node.imaging.read_series`
        orders them), from :func:`preprocess_hu`.
    context : int
        Neighbours on each side (0: no context; 1: s-1 and s+1).

    Returns
    -------
    numpy.ndarray
        (S, C + 2 x context, H, W) float32: channels ``0..C-1`` are the slice's own
        windows, then for ``k = 1..context`` the :data:`CONTEXT_CHANNEL` of slice
        ``s - k`` and of slice ``s + k``. Edges are replicated: the first slice's
        "below" neighbour is itself, so a series of one slice gets its own brain
        window three times.
    """
    import torch

    from ich_node.imaging import tensors

    arr = np.ascontiguousarray(images, dtype=np.float32)
    if arr.ndim != 4:
        raise ValueError(f"images must have shape (S, C, H, W), got {arr.shape}")
    context_channels((), context)
    if context == 0:
        return arr
    out: np.ndarray = tensors.add_slice_context(torch.from_numpy(arr), context).numpy()
    return out
