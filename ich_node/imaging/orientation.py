"""Turning slices to one patient orientation before windowing, and back.

The model sees every head the same way round, whatever the patient position
(head-first or feet-first, supine or prone) or the scanner's choice of rows and
columns: the reference is the usual axial view of a head-first supine scan,
rows running toward the patient's left (+x, LPS) and columns toward posterior
(+y). Only exact flips and transposes are used (no resampling), so a map made on
the model input goes back onto the source pixels exactly with :meth:`Reorientation.invert`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Reorientation:
    """Flips and a transpose that turn a slice to the reference orientation.

    Attributes
    ----------
    transpose : bool
        Swap rows and columns first (rows of the source run along patient y).
    flip_rows : bool
        Then reverse the row order (axis -2).
    flip_cols : bool
        Then reverse the column order (axis -1).
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @classmethod
    def from_orientation(cls, orientation: Sequence[float]) -> Reorientation:
        """From ImageOrientationPatient (0020,0037), PS3.3 C.7.6.2.1.1.

        Parameters
        ----------
        orientation : sequence of 6 float
            Row direction cosines (along a row, i.e. increasing column index), then
            column direction cosines (down a column, increasing row index), LPS.
        """
        r = [float(v) for v in orientation[:3]]
        c = [float(v) for v in orientation[3:6]]
        if abs(r[0]) >= abs(r[1]):
            return cls(transpose=False, flip_rows=c[1] < 0, flip_cols=r[0] < 0)
        # Rows run along y: after the transpose, rows follow r and columns follow c.
        return cls(transpose=True, flip_rows=r[1] < 0, flip_cols=c[0] < 0)

    @property
    def identity(self) -> bool:
        """True when slices are already in the reference orientation."""
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def apply(self, arr: Any) -> Any:
        """(..., H, W) source -> (..., H', W') reference orientation (W, H when transposed).

        ``arr`` is a numpy array or a torch tensor (on any device); the result is
        the same kind, contiguous.
        """
        out = _array(arr)
        if self.transpose:
            out = out.swapaxes(-1, -2)
        if self.flip_rows:
            out = _flip(out, -2)
        if self.flip_cols:
            out = _flip(out, -1)
        return _contiguous(out)

    def invert(self, arr: Any) -> Any:
        """(..., H', W') reference orientation -> (..., H, W) source: undoes :meth:`apply`."""
        out = _array(arr)
        if self.flip_cols:
            out = _flip(out, -1)
        if self.flip_rows:
            out = _flip(out, -2)
        if self.transpose:
            out = out.swapaxes(-1, -2)
        return _contiguous(out)

    def describe(self) -> str:
        """What is done, in words (for notes)."""
        steps = []
        if self.transpose:
            steps.append("rows and columns swapped")
        if self.flip_rows:
            steps.append("flipped top to bottom")
        if self.flip_cols:
            steps.append("flipped left to right")
        return ", ".join(steps) or "none"


# numpy arrays and torch tensors alike (torch is never imported here: the listener
# process reads orientations too).
def _is_numpy(arr: Any) -> bool:
    return isinstance(arr, np.ndarray)


def _array(arr: Any) -> Any:
    if isinstance(arr, np.ndarray) or not hasattr(arr, "swapaxes"):
        return np.asarray(arr)
    return arr  # a torch tensor


def _flip(arr: Any, axis: int) -> Any:
    return np.flip(arr, axis) if _is_numpy(arr) else arr.flip(axis)


def _contiguous(arr: Any) -> Any:
    return np.ascontiguousarray(arr) if _is_numpy(arr) else arr.contiguous()
