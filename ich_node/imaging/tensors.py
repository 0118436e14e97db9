"""The one preprocessing, as torch tensor operations on any device.

Everything after the decoded integers happens here, on the CPU or on the model's
GPU alike: the CT rescale to HU (PS3.3 C.8.2.1.1, with the RSNA 12-bit fault and
pixel padding, :func:`stored_to_hu`), the turn to the reference orientation
(:class:`~ich_node.imaging.orientation.Reorientation`), the display windows
(:func:`apply_windows`), square padding and the antialiased resize
(:func:`pad_and_resize`) and the 2.5D slice context (:func:`add_slice_context`);
:func:`model_input` chains them. The node's worker runs them on the model's device,
``ich-node predict`` too, and training runs them on the CPU in its DataLoader
workers (through the numpy wrappers of :mod:`ich_node.imaging.preprocess` and
:func:`ich_node.imaging.load_hu`), so the three cannot drift.

This module imports torch: the listener process and ``results/`` never import it
(``ich_node.imaging`` does not import it either; ``tests/test_layout.py``).

Exactness: the rescale runs in float64 unless it is exact in float32 (slope 1, an
integer intercept, 16-bit values), and every step is a plain IEEE operation, so
the HU are the same bits on any device and the windowed images agree to ~1e-7
(``tests/test_tensors.py`` checks CPU against GPU and both against the numpy
reference kept in ``tests/preprocess_reference.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F

from ich_node.imaging.files import ImagingError, SeriesRefused
from ich_node.imaging.orientation import Reorientation
from ich_node.imaging.pixels import (
    _MAX_DENSE_SHARE,
    _MIN_AIR_SHARE,
    _WRAP_AIR_SHARE,
    AIR_HU,
    HUCounts,
    StoredSlice,
    count_hu,
)
from ich_node.imaging.preprocess import CONTEXT_CHANNEL, Window, context_channels

#: Slices converted, windowed and resized at once on the CPU: a few, so that the
#: full-resolution intermediates stay in the cache (measured: 2.6x faster than 16).
CPU_CHUNK: Final[int] = 4
#: The same on a GPU, where a larger chunk keeps the kernels busy.
GPU_CHUNK: Final[int] = 64


#: CPU buffers from this size on are mapped in transparent huge pages (:func:`empty_large`).
HUGE_PAGE_BYTES: Final[int] = 2 << 20
#: Free series buffers kept for the next series, at most this many bytes in all
#: (:class:`BufferMappings`): a few series' HU (512 MiB: a 512-slice 512x512 series).
KEEP_FREE_BYTES: Final[int] = 512 << 20


class BufferMappings:
    """Anonymous memory mappings for series-sized CPU buffers, used again once free.

    A new mapping's pages are faulted in by their first touch, and the kernel zeroes
    each: for a 64-slice series' HU (64 MiB, in huge pages) 5-12 ms, most of it while
    the decode pool's two threads write the HU, which then went no faster than one
    thread (docs/performance.md, "The series buffer used again"). When the last
    tensor on a buffer is gone (every view and numpy array: the memoryview the tensor
    was made from is finalised then), its mapping is kept, while the kept ones hold
    at most ``keep_bytes`` (the oldest let go first), and the next buffer that fits
    is cut from it, its pages already in place. A buffer is uninitialised either way:
    it may hold an earlier series' values.

    Thread-safe: buffers are taken in any thread and given back in whichever thread
    drops the last reference.

    Parameters
    ----------
    keep_bytes : int
        The most bytes of free mappings kept (0: none kept, every buffer is new).
    """

    def __init__(self, keep_bytes: int = KEEP_FREE_BYTES) -> None:
        self._keep = keep_bytes
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []  # oldest first
        self.reused = 0  # buffers cut from a kept mapping (tests)

    def buffer(self, nbytes: int) -> memoryview:
        """``nbytes`` of writable memory, uninitialised, page-aligned.

        From the smallest kept mapping that holds ``nbytes``, or a new mapping
        (advised for transparent huge pages where Linux has them).
        """
        with self._lock:
            fits = [m for m in self._free if len(m) >= nbytes]
            mapping = min(fits, key=len) if fits else None
            if mapping is not None:
                self._free.remove(mapping)
                self.reused += 1
        if mapping is None:
            mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            advice = getattr(mmap, "MADV_HUGEPAGE", None)
            if advice is not None:
                with contextlib.suppress(OSError):  # THP not built in: 4 KiB pages
                    mapping.madvise(advice)
        view = memoryview(mapping)[:nbytes]
        weakref.finalize(view, self._give_back, mapping).atexit = False
        return view

    def kept_bytes(self) -> int:
        """Bytes of free mappings kept now."""
        with self._lock:
            return sum(len(m) for m in self._free)

    def _give_back(self, mapping: mmap.mmap) -> None:
        """The last view of ``mapping`` is gone: keep it, within ``keep_bytes``."""
        with self._lock:
            self._free.append(mapping)
            let_go = []
            while self._free and sum(len(m) for m in self._free) > self._keep:
                let_go.append(self._free.pop(0))
        for old in let_go:
            with contextlib.suppress(BufferError):  # still exported: freed when unreferenced
                old.close()


_MAPPINGS = BufferMappings()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch's parallel regions of the calling thread on that thread alone while the
    block runs; its former setting restored after, also after an error.

    With torch's OpenMP backend the thread count is each thread's own, so threads
    that share the cores with the model's (the decode pool, the drawing of small
    heatmaps) run their operations sequentially without changing the model's.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def empty_large(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """An uninitialised tensor for a series-sized buffer (a series' HU, say).

    On the CPU, from :data:`HUGE_PAGE_BYTES` on, the memory is an anonymous mapping
    advised for transparent huge pages (``madvise(MADV_HUGEPAGE)``, Linux): its first
    touch faults 2 MiB pages instead of 4 KiB ones. A 64-slice series' HU (64 MiB)
    took 28-32 ms to allocate and fill with 4 KiB pages, 6-8 ms in huge pages, here
    (docs/performance.md). Where the kernel gives no huge pages (THP ``never``, or
    another OS) it is an ordinary mapping. A mapping whose tensors are all gone is
    used again for a later buffer (:class:`BufferMappings`: no new page faults). On
    other devices: ``torch.empty``.

    Parameters
    ----------
    shape : tuple of int
        The tensor's shape.
    dtype : torch.dtype
        Its dtype (default float32).
    device : torch.device or str, optional
        Where (default: the CPU).

    Returns
    -------
    torch.Tensor
        ``shape``, ``dtype`` on ``device``, contiguous, uninitialised; it keeps its
        mapping alive, and gives it back to be used again when the last reference
        (any view, any numpy array on it) goes.
    """
    device = torch.device(device or "cpu")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(_MAPPINGS.buffer(nbytes), dtype=dtype).view(shape)


def _transfer_dtype(slices: Sequence[StoredSlice]) -> np.dtype:
    """The integer dtype a batch of stored values travels in (16 bits where it fits).

    Unsigned 16-bit values with at most 15 bits stored (12 of 16, the usual CT)
    fit int16 once the bits above BitsStored are masked, which the copy does.
    """

    def fits16(s: StoredSlice) -> bool:
        d = s.stored.dtype
        if d.itemsize <= 2 and (d.kind == "i" or d.itemsize == 1):
            return True  # int8/16, uint8
        u = s.unused_bits
        return d == np.uint16 and u is not None and not u[1] and u[0] <= 15

    if all(fits16(s) for s in slices):
        return np.dtype(np.int16)
    if all(s.stored.dtype.itemsize <= 2 or s.stored.dtype == np.int32 for s in slices):
        return np.dtype(np.int32)  # full uint16 does not fit int16; torch lacks uint16
    return np.dtype(np.int64)


def stored_to_hu(
    slices: Sequence[StoredSlice],
    device: torch.device | str | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stored values of a batch of slices -> Hounsfield units, on ``device``.

    ``HU = v x RescaleSlope + RescaleIntercept`` per slice, ``v`` first read as a
    two's complement number of BitsStored bits where the header has the RSNA
    12-bit fault and, read so, at least 10% of the slice is air (-1100..-900 HU);
    pixel padding (:attr:`StoredSlice.padding`) and everything below -1024 HU
    become -1024 (air).

    Parameters
    ----------
    slices : sequence of StoredSlice
        From :func:`ich_node.imaging.pixels.decode_stored`; all of one matrix size.
    device : torch.device or str, optional
        Where to compute (default: the CPU). From the CPU, the integers travel in
        pinned memory, 16 bits where they fit.
    out : torch.Tensor, optional
        (S, H, W) float32 on ``device`` (a view of a series' HU, say): the HU are
        written there and ``out`` is returned; in the usual case (16-bit values,
        slope 1, an integer intercept) computed in place, with no new tensor.

    Returns
    -------
    torch.Tensor
        (S, H, W) float32 HU on ``device`` (``out`` when given).

    Raises
    ------
    ImagingError
        No slices, slices of different matrix sizes, or ``out`` of another shape,
        dtype or device.
    SeriesRefused
        A slice without RescaleIntercept or RescaleSlope whose values are not HU
        (no air near -1000 HU, or mostly above 3000 HU).
    """
    device = torch.device(device or "cpu")
    if not slices:
        raise ImagingError("no slices to convert to HU")
    shape = slices[0].stored.shape
    for s in slices[1:]:
        if s.stored.shape != shape:
            raise ImagingError(
                f"{s.name}: pixel data is {s.stored.shape}, {slices[0].name} is {shape}: "
                "one series has one matrix",
                s.path,
            )
    if out is not None and (
        tuple(out.shape) != (len(slices), *shape)
        or out.dtype != torch.float32
        or out.device.type != device.type
    ):
        raise ImagingError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}: "
            f"{(len(slices), *shape)} float32 on {device} needed"
        )
    dtype = _transfer_dtype(slices)
    # One copy into the batch (converting as it goes, unsigned values masked to their
    # BitsStored bits on the way), pinned for an asynchronous transfer to a GPU.
    stacked = torch.empty(
        (len(slices), *shape),
        dtype=_TORCH_INT[dtype],
        pin_memory=device.type == "cuda" and torch.cuda.is_available(),
    )
    as_numpy = stacked.numpy()
    signed_bits: list[int] = []  # BitsStored of signed values with bits above, else 0
    for i, s in enumerate(slices):  # (decoded arrays may be read-only views of the file)
        u = s.unused_bits
        if u is not None and not u[1]:  # PS3.5 8.1.1: only the BitsStored low bits
            np.bitwise_and(s.stored, (1 << u[0]) - 1, out=as_numpy[i], casting="unsafe")
        else:
            np.copyto(as_numpy[i], s.stored, casting="unsafe")
        signed_bits.append(u[0] if u is not None and u[1] else 0)
    x = stacked.to(device, non_blocking=True)
    if any(signed_bits):
        x = _sign_extend(x, signed_bits)

    slopes = [s.transform.slope for s in slices]
    intercepts = [s.transform.intercept for s in slices]
    # float32 is exact for 16-bit values, slope 1 and an integer intercept (nearly
    # every CT): the same bits as float64, at half the memory traffic.
    exact32 = (
        dtype != np.int64
        and all(v == 1.0 for v in slopes)
        and all(float(b).is_integer() and abs(b) < 2**20 for b in intercepts)
    )
    ftype = torch.float32 if exact32 else torch.float64
    n = len(slices)

    def column(values: Sequence[float], kind: torch.dtype = ftype) -> torch.Tensor:
        return torch.tensor(values, dtype=kind).view(n, 1, 1).to(device, non_blocking=True)

    slope, intercept = column(slopes), column(intercepts)
    bits = [s.transform.signed_bits or 0 for s in slices]
    if exact32 and not any(bits):  # the usual case: integers in, HU out
        floor = _integer_floor(x, intercepts, slices)
        if floor is not None and not _all_at_least(slices, floor):
            x.clamp_min_(floor)  # air's floor on the integers: half the bytes of HU
        # Converted, then the intercept added in place: the same float32 sums as one
        # mixed int16 + float32 addition, which on the CPU runs 1.5x slower (a
        # casting loop, not the vectorised one; docs/performance.md).
        hu = x.to(torch.float32) if out is None else out.copy_(x)
        hu.add_(intercept)
        return _finish_hu(hu, x, slices, column, floored=floor is not None)
    v = x.to(ftype)
    if any(bits):
        # RSNA 2019 fault: wrapped values, kept where they put the head's air at air.
        half = column([float(1 << (b - 1)) if b else float("inf") for b in bits])
        full = column([float(1 << b) if b else 0.0 for b in bits])
        wrapped = torch.where(v >= half, v - full, v)
        air = wrapped * slope + intercept
        share = ((air >= -1100) & (air <= -900)).sum(dim=(1, 2)) >= _WRAP_AIR_SHARE * air[0].numel()
        use = share & column([bool(b) for b in bits], torch.bool).view(n)
        v = torch.where(use.view(n, 1, 1), wrapped, v)
    # v is a new tensor (x.to converts): the rescale runs in place, a multiplication
    # then an addition, each rounded once, as the float64 reference does.
    hu = v
    if any(b != 1.0 for b in slopes):
        hu.mul_(slope)
    if any(intercepts):
        hu.add_(intercept)
    done = _finish_hu(hu, x, slices, column)
    return done if out is None else out.copy_(done)


def _integer_floor(
    x: torch.Tensor, intercepts: Sequence[float], slices: Sequence[StoredSlice]
) -> int | None:
    """The stored value of -1024 HU, when every slice of the batch shares one integer
    intercept (slope 1) and clamping the integers there gives the same HU as clamping
    the HU: not when a rescale attribute is missing (that check needs the values as
    stored) or the value does not fit ``x``'s dtype.

    Padding is unaffected: a padding value below the floor becomes the floor, and
    -1024 HU, either way; one above it is still found.
    """
    if len(set(intercepts)) != 1 or any(s.transform.missing for s in slices):
        return None
    floor = int(AIR_HU - intercepts[0])
    info = torch.iinfo(x.dtype)
    return floor if info.min <= floor <= info.max else None


def _all_at_least(slices: Sequence[StoredSlice], floor: int) -> bool:
    """Whether every stored value is known to be ``>= floor`` from its type alone
    (unsigned values and a floor of 0 or below: the usual intercept of -1024)."""
    return floor <= 0 and all(s.stored.dtype.kind == "u" for s in slices)


def _finish_hu(
    hu: torch.Tensor,
    x: torch.Tensor,
    slices: Sequence[StoredSlice],
    column: Callable[..., torch.Tensor],
    *,
    floored: bool = False,
) -> torch.Tensor:
    """The rescaled values ``hu`` (a new tensor) of stored ``x``: the missing-rescale
    check, padding and sentinels to air, float32. ``floored``: ``x`` was clamped to
    air's stored value already (:func:`_integer_floor`), so ``hu`` needs no clamp."""
    for i, s in enumerate(slices):  # rare: a rescale attribute missing (Type 1)
        if s.transform.missing and not _looks_like_hu(hu[i]):
            raise SeriesRefused(
                f"{s.name}: {' and '.join(s.transform.missing)} missing (Type 1, PS3.3 "
                f"C.8.2.1) and the values ({float(hu[i].min()):.0f}..{float(hu[i].max()):.0f} "
                f"with slope {s.transform.slope:g}, intercept {s.transform.intercept:g}) "
                "are not HU: no air near -1000",
                s.path,
            )
    ranges = [s.padding for s in slices]
    if any(r is not None for r in ranges):
        if all(r is not None and r[0] == r[1] for r in ranges):  # PixelPaddingValue alone
            pad = x == column([r[0] for r in ranges if r], torch.int64)
        else:
            lo = column([r[0] if r else 1 for r in ranges], torch.int64)
            hi = column([r[1] if r else 0 for r in ranges], torch.int64)
            pad = (x >= lo) & (x <= hi)
        hu.masked_fill_(pad, AIR_HU)
    # Nothing physical lies below air; scanners write -1500..-3024 outside the FOV.
    if not floored:
        hu.clamp_min_(AIR_HU)
    return hu.to(torch.float32)  # (float32 stays itself)


_TORCH_INT = {
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
}


def _sign_extend(x: torch.Tensor, bits: Sequence[int]) -> torch.Tensor:
    """Signed values of ``bits[i]`` bits stored (PS3.5 8.1.1), sign-extended over the
    bits above them, whatever those held; 0: the slice as it is. In place (``x`` is
    the batch's own copy of the stored values), for the whole batch on its device.
    (Unsigned values are masked as they are copied: :func:`stored_to_hu`.)
    """
    n, width = len(bits), x.element_size() * 8
    shift = torch.tensor([width - b if b else 0 for b in bits], dtype=x.dtype)
    shift = shift.view(n, 1, 1).to(x.device, non_blocking=True)
    return x.bitwise_left_shift_(shift).bitwise_right_shift_(shift)


def _looks_like_hu(hu: torch.Tensor) -> bool:
    """:func:`ich_node.imaging.pixels.values_look_like_hu` for one slice on the device."""
    n = hu.numel()
    if n == 0:
        return False
    air = int(((hu >= -1200) & (hu <= -800)).sum())
    dense = int((hu > 3000).sum())
    return air >= _MIN_AIR_SHARE * n and dense < _MAX_DENSE_SHARE * n


def hu_counts(hu: torch.Tensor, *, per_slice: bool = False) -> torch.Tensor:
    """(voxels, air, brain, dense) counts of ``hu`` as int64 on its device.

    Air is ``HU <= -900``, brain ``0 <= HU <= 100``, dense ``HU > 3000``
    (:class:`~ich_node.imaging.pixels.HUCounts`). Summed batch by batch without
    waiting for the device; :func:`counts_record` turns the sum into ``HUCounts``
    once per series. On the CPU :func:`~ich_node.imaging.pixels.count_hu` counts on
    the tensor's memory (numpy's comparisons, no copy): exact integer counts, 4x
    faster than torch's comparisons there (docs/performance.md); on a GPU, torch's.

    Parameters
    ----------
    hu : torch.Tensor
        (S, H, W) float32 HU.
    per_slice : bool
        (S, 4) counts, one row per slice, instead of the (4,) total.
    """
    if hu.device.type == "cpu":
        arr = hu.detach().numpy()
        counts = [count_hu(part) for part in (arr if per_slice else [arr])]
        rows = [(c.voxels, c.air, c.brain, c.dense) for c in counts]
        out = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 4)
        return out if per_slice else out[0]
    if per_slice:
        return torch.stack([hu_counts(h) for h in hu]) if len(hu) else hu.new_zeros((0, 4))
    # count_nonzero rather than summing a boolean tensor (8x faster on the CPU, measured).
    return torch.stack(
        [
            torch.tensor(hu.numel(), device=hu.device),
            torch.count_nonzero(hu <= -900),
            torch.count_nonzero((hu >= 0) & (hu <= 100)),
            torch.count_nonzero(hu > 3000),
        ]
    )


def counts_record(counts: torch.Tensor) -> HUCounts:
    """A (4,) tensor of :func:`hu_counts` (or a sum of them) as ``HUCounts``."""
    voxels, air, brain, dense = (int(v) for v in counts.cpu().tolist())
    return HUCounts(voxels=voxels, air=air, brain=brain, dense=dense)


def apply_windows(hu: torch.Tensor, windows: Sequence[Window]) -> torch.Tensor:
    """Map HU to one [0, 1] channel per window.

    ``(HU - (center - width / 2)) / width``, clipped to [0, 1]: a plain linear
    ramp, not PS3.3 C.11.2.1.2.1's ``center - 0.5`` / ``width - 1`` display rule,
    so that HU 40 in the (40, 80) brain window is exactly 0.5.

    Parameters
    ----------
    hu : torch.Tensor
        (..., H, W) HU, float32.
    windows : sequence of Window
        One output channel per window, in this order.

    Returns
    -------
    torch.Tensor
        (..., C, H, W) float32 in [0, 1] on ``hu``'s device, ``C = len(windows)``.
    """
    if not windows:
        raise ValueError("windows must not be empty")
    if hu.ndim < 2:
        raise ValueError(f"hu must have shape (..., H, W), got {tuple(hu.shape)}")
    hu = hu.to(torch.float32)
    shape = (len(windows), 1, 1)
    low = torch.tensor([w.center - w.width / 2 for w in windows], dtype=torch.float32)
    width = torch.tensor([w.width for w in windows], dtype=torch.float32)
    low, width = low.view(shape).to(hu.device), width.view(shape).to(hu.device)
    return hu.unsqueeze(-3).sub(low).div_(width).clamp_(0.0, 1.0)


def pad_and_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pad to a square with 0, then resize (bilinear, antialiased).

    The filter is torch's (and PIL's) antialiased bilinear one: each output pixel a
    normalised triangle-weighted mean over ``2 x scale`` input pixels per axis, the
    weights renormalised where the image ends. When the square's side is an integer
    multiple ``f >= 2`` of ``size`` (512 -> 64, 128, 256), the rows are shrunk first by
    :func:`_shrink_rows` (the same weights as sums of whole rows), then the columns
    of the ``f`` times smaller result by ``F.interpolate``: about 2x faster on the CPU
    than ``F.interpolate`` alone (docs/performance.md) and equal to it within 3e-7
    (``tests/test_tensors.py``). Other sizes use ``F.interpolate`` alone.

    Parameters
    ----------
    images : torch.Tensor
        (S, C, H, W) float32.
    size : int
        Output height and width, pixels.

    Returns
    -------
    torch.Tensor
        (S, C, size, size) float32 on ``images``' device. Non-square images are
        centred in a ``max(H, W)`` square of zeros first, keeping their aspect ratio.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (S, C, H, W), got {tuple(images.shape)}")
    s, c, h, w = images.shape
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        images = F.pad(images, (left, side - w - left, top, side - h - top))
    side = images.shape[-1]
    if side == size or s == 0:
        return images.contiguous() if s else images.new_zeros((0, c, size, size))
    if side % size == 0 and side // size >= 2:
        images = _shrink_rows(images, side // size)  # (S, C, size, side): the rows first
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


@functools.cache
def _row_weights(factor: int) -> tuple[tuple[tuple[int, int, float], ...], float, float]:
    """The antialiased bilinear filter of an integer shrink ``factor`` by blocks.

    Output row ``i`` is the weighted sum of input rows ``j`` around block ``i`` (rows
    ``factor*i .. factor*i + factor - 1``), with weights ``1 - |j + 0.5 - centre| /
    factor`` normalised to sum 1 (ATen's ``_compute_weights_aa``, PIL's
    ``precompute_coeffs``). Returns ``(block offset -1/0/+1, row in the block,
    weight)`` for an inner row, and the sums of the weights that stay inside the
    image for the first and the last row (their weights are renormalised by them).
    """
    centre = factor * 1.5  # inner row i = 1: its taps span blocks 0, 1 and 2
    lo, hi = int(centre - factor + 0.5), int(centre + factor + 0.5)
    raw = [(j, max(0.0, 1.0 - abs((j - centre + 0.5) / factor))) for j in range(lo, hi)]
    total = sum(w for _, w in raw)
    taps = tuple((j // factor - 1, j % factor, w / total) for j, w in raw if w > 0.0)
    first = sum(w for block, _, w in taps if block >= 0)
    last = sum(w for block, _, w in taps if block <= 0)
    return taps, first, last


def _shrink_rows(
    x: torch.Tensor, factor: int, clips: Sequence[tuple[float, float]] | None = None
) -> torch.Tensor:
    """(..., H, W) -> (..., H / factor, W): the antialiased bilinear filter along H.

    Whole rows are scaled and added (16 vectorised passes for 512 -> 64), not each
    output pixel gathered as ``F.interpolate`` does on the CPU; every pixel is the
    same elementwise sum on any device and in any batch. Row ``r`` of every block is
    taken once and added to each output row it is a tap of (its own block's and a
    neighbour's); the first tap is written, not added to zeros.

    ``clips=[(low, high), ...]``: (len(clips), ..., H / factor, W), the filter of each
    ``x.clamp(low, high)`` without a full-size clipped copy: each row of ``x`` is
    read once for all of them, clipped into a buffer of ``1 / factor`` of ``x`` and
    added while it is in the cache, so nothing of ``x``'s size is written (the
    windows of :func:`_windowed_resize`; one row loop for all the windows measured
    12% faster than one per window, docs/performance.md).
    """
    n = x.shape[-2] // factor
    blocks = x.reshape(*x.shape[:-2], n, factor, x.shape[-1])
    taps, first, last = _row_weights(factor)
    weights: dict[int, list[tuple[int, float]]] = {}
    for block, row, weight in taps:
        weights.setdefault(row, []).append((block, weight))
    sources: list[tuple[float, float] | None] = [None] if clips is None else list(clips)
    out = x.new_empty((len(sources), *x.shape[:-2], n, x.shape[-1]))
    clipped = None if clips is None else x.new_empty(out.shape[1:])
    # The views the taps read and write, made once (not once a row: the Python of
    # making a view is a good part of a small chunk's time, with the GIL held).
    # (whole, outputs 1..n-1, outputs 0..n-2) of each output and of the clip buffer.
    outs = [(o, o[..., 1:, :], o[..., :-1, :]) for o in out]
    cut = None if clipped is None else (clipped, clipped[..., :-1, :], clipped[..., 1:, :])
    # Row 0 of a block is first a tap of its own block (the taps start inside block 0,
    # in block order): that product is written, every other tap added to it.
    assert weights[0][0][0] == 0
    for row in sorted(weights):
        source = blocks[..., :, row, :]
        for (o, o_after, o_before), clip in zip(outs, sources, strict=True):
            if clip is None or cut is None:
                part, below, above = source, source[..., :-1, :], source[..., 1:, :]
            else:
                torch.clamp(source, *clip, out=cut[0])
                part, below, above = cut
            for block, weight in weights[row]:
                if block == 0 and row == 0:
                    torch.mul(part, weight, out=o)
                elif block == 0:
                    o.add_(part, alpha=weight)
                elif n > 1 and block < 0:  # the block below: rows i - 1, for outputs 1..n-1
                    o_after.add_(below, alpha=weight)
                elif n > 1:  # the block above: rows i + 1, for outputs 0..n-2
                    o_before.add_(above, alpha=weight)
    if n == 1:  # one output row: its own block alone, renormalised
        out.div_(sum(w for block, _, w in taps if block == 0))
    else:
        out[..., 0, :] /= first  # the first and last rows lack a neighbour block
        out[..., -1, :] /= last
    return out if clips is not None else out[0]


def add_slice_context(images: torch.Tensor, context: int) -> torch.Tensor:
    """2.5D input: append the neighbours' brain-window channel to each slice.

    Parameters
    ----------
    images : torch.Tensor
        (S, C, H, W) float32 model input of consecutive slices **in the series'
        spatial order** (inferior -> superior).
    context : int
        Neighbours on each side (0: no context; 1: s-1 and s+1).

    Returns
    -------
    torch.Tensor
        (S, C + 2 x context, H, W) float32: channels ``0..C-1`` are the slice's own
        windows, then for ``k = 1..context`` the :data:`CONTEXT_CHANNEL` of slice
        ``s - k`` and of slice ``s + k``. Edges are replicated: the first slice's
        "below" neighbour is itself, so a series of one slice gets its own brain
        window three times.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (S, C, H, W), got {tuple(images.shape)}")
    context_channels((), context)
    if context == 0 or len(images) == 0:
        if context == 0:
            return images
        return images.new_zeros((0, images.shape[1] + 2 * context, *images.shape[2:]))
    s = len(images)
    brain = images[:, CONTEXT_CHANNEL]
    padded = torch.cat(
        [brain[:1].expand(context, -1, -1), brain, brain[-1:].expand(context, -1, -1)]
    )
    extra = []
    for k in range(1, context + 1):
        extra += [padded[context - k : context - k + s], padded[context + k : context + k + s]]
    return torch.cat([images, torch.stack(extra, dim=1)], dim=1)


def model_input(
    hu: torch.Tensor,
    windows: Sequence[Window],
    size: int,
    *,
    turn: Reorientation | None = None,
    context: int = 0,
    chunk: int | None = None,
) -> torch.Tensor:
    """The model input of a run of slices: turn, windows, pad and resize, clip, context.

    Parameters
    ----------
    hu : torch.Tensor
        (S, H, W) float32 HU in source orientation, consecutive slices in spatial
        order (for the context).
    windows : sequence of Window
        Channels, in order.
    size : int
        Output side, pixels.
    turn : Reorientation, optional
        To the reference orientation (:func:`ich_node.imaging.preprocess.series_reorientation`).
    context : int
        Neighbour slices on each side (:func:`add_slice_context`); the run's ends
        replicate.
    chunk : int, optional
        Slices windowed and resized at once (default :data:`CPU_CHUNK` or
        :data:`GPU_CHUNK`); the result does not depend on it.

    Returns
    -------
    torch.Tensor
        (S, len(windows) + 2 x context, size, size) float32 in [0, 1], on ``hu``'s device.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must have shape (S, H, W), got {tuple(hu.shape)}")
    if not windows:
        raise ValueError("windows must not be empty")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if turn is not None and not turn.identity:
        hu = turn.apply(hu)
    step = chunk or (CPU_CHUNK if hu.device.type == "cpu" else GPU_CHUNK)
    out = hu.new_empty((len(hu), len(windows), size, size), dtype=torch.float32)
    for start in range(0, len(hu), step):
        part = slice(start, start + step)
        out[part] = _windowed_resize(hu[part], windows, size)
    out.clamp_(0.0, 1.0)  # float rounding in the filter must not leave [0, 1]
    return add_slice_context(out, context)


def _windowed_resize(hu: torch.Tensor, windows: Sequence[Window], size: int) -> torch.Tensor:
    """``pad_and_resize(apply_windows(hu, windows), size)``, with a fraction of the traffic.

    Each window is a clip of the HU to ``[low, low + width]`` followed by the affine
    map ``(v - low) / width``; the resize is linear with weights that sum to 1 at
    every output pixel, so the affine map commutes with it. Here the clipped HU
    (padded with ``low``, which the map takes to 0) are resized one window at a
    time, and the map runs on the small result: one read of the full-size slices
    per window instead of three passes. Square slices shrunk by an integer factor
    (512 -> 64, the usual case) are clipped row by row inside one shrink for all the
    windows (:func:`_shrink_rows` with ``clips``: each row read once, nothing of full
    size written); other sizes go through one full-size buffer (docs/performance.md).
    Equal to the composition
    within float32 rounding (``tests/test_tensors.py``).

    (S, H, W) float32 HU -> (S, C, size, size) float32, not yet clipped to [0, 1].
    """
    n, rows, cols = hu.shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    shrink = side % size == 0 and side // size >= 2  # rows by whole-row sums first
    lows = [window.center - window.width / 2 for window in windows]
    widths = [window.width for window in windows]
    if rows == cols and shrink:  # every window clipped row by row inside one shrink
        clips = [(low, low + width) for low, width in zip(lows, widths, strict=True)]
        rowwise = _shrink_rows(hu, side // size, clips=clips)  # (C, S, size, side)
        return _window_map(
            F.interpolate(  # the columns (C as the batch, the slices as channels)
                rowwise, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            ).transpose(0, 1),
            lows,
            widths,
        )
    clipped: torch.Tensor | None = None  # the full-size buffer
    parts = []
    for low, width in zip(lows, widths, strict=True):
        if clipped is None:
            clipped = hu.new_empty((n, side, side), dtype=torch.float32)
        if rows != cols:
            clipped.fill_(low)  # the square's padding: 0 once mapped
        inner = clipped[:, top : top + rows, left : left + cols]
        torch.clamp(hu, low, low + width, out=inner)
        if side == size:
            parts.append(clipped.clone())
        elif shrink:
            parts.append(_shrink_rows(clipped, side // size))  # (S, size, side), new
        else:
            parts.append(pad_and_resize(clipped.unsqueeze(1), size)[:, 0])
    small = torch.stack(parts, dim=1)
    if shrink:  # the columns of all windows at once
        small = F.interpolate(
            small, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return _window_map(small, lows, widths)


def _window_map(
    small: torch.Tensor, lows: Sequence[float], widths: Sequence[float]
) -> torch.Tensor:
    """(S, C, h, w) clipped HU, resized -> ``(v - low) / width`` of each channel's
    window, in place (a view, as given)."""
    shape = (1, len(lows), 1, 1)
    low_t = torch.tensor(lows, dtype=torch.float32).view(shape).to(small.device)
    width_t = torch.tensor(widths, dtype=torch.float32).view(shape).to(small.device)
    return small.sub_(low_t).div_(width_t)


def prepare_slices(
    decoded: Sequence[StoredSlice],
    windows: Sequence[Window],
    size: int,
    *,
    device: torch.device | str | None = None,
    turn: Reorientation | None = None,
    context: int = 0,
    chunk: int | None = None,
    hu_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded slices -> (HU, model input) on ``device``: :func:`stored_to_hu`, then
    :func:`model_input`, a chunk of slices at a time (on the CPU the intermediates of
    a chunk stay in the cache).

    Parameters
    ----------
    decoded : sequence of StoredSlice
        Consecutive slices of one series in spatial order.
    windows, size, turn, context, chunk
        As :func:`model_input`.
    device : torch.device or str, optional
        Where to compute (default: the CPU).
    hu_out : torch.Tensor, optional
        (S, H, W) float32 on ``device``: the HU are written there (as
        :func:`stored_to_hu`'s ``out``) and it is returned, with no new tensor for them.

    Returns
    -------
    tuple of torch.Tensor
        (S, H, W) float32 HU in source orientation (``hu_out`` when given) and
        (S, C, size, size) float32 model input in [0, 1], both on ``device``.

    Raises
    ------
    ImagingError
        Slices of different matrix sizes, or ``hu_out`` of the wrong shape;
        as :func:`stored_to_hu`.
    """
    device = torch.device(device or "cpu")
    shapes = {s.stored.shape for s in decoded}
    if len(shapes) > 1:
        raise ImagingError(f"slices of matrix sizes {sorted(shapes)}: one series has one")
    step = chunk or (CPU_CHUNK if device.type == "cpu" else GPU_CHUNK)
    if len(decoded) <= step:
        hu = stored_to_hu(decoded, device, out=hu_out)
        return hu, model_input(hu, windows, size, turn=turn, context=context, chunk=step)
    hus, images = [], []
    for start in range(0, len(decoded), step):
        part = slice(start, start + step)
        into = None if hu_out is None else hu_out[part]
        hu = stored_to_hu(decoded[part], device, out=into)
        hus.append(hu)
        images.append(model_input(hu, windows, size, turn=turn, chunk=step))
    whole = torch.cat(hus) if hu_out is None else hu_out
    return whole, add_slice_context(torch.cat(images), context)
