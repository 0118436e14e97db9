"""What reading a series did besides reading it: the one place these records are made.

Every image left out, every irregularity noted, every correction applied and every
refusal is one of these frozen records. :func:`ich_node.imaging.read_series` and the
pixel reader make them; the worker, ``ich-node predict``, ``findings.json``, the SR
and the log all read them from :class:`ich_node.imaging.CTSeries` (or from
:class:`ich_node.imaging.ImagingError` for a refusal), never rebuild them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

#: Kinds of :class:`Note`; stable strings (``findings.json`` consumers may key on them).
NoteKind = Literal[
    "duplicate_position",  # two or more images at one position, all read
    "volumes_split",  # several complete volumes at the same positions, one read
    "stack_skipped",  # another reconstruction (kernel, thickness, ...) not read
    "thickness_change",  # one volume whose slice thickness changes along z
    "gap",  # incomplete coverage: a hole between two slices
    "pixel_correction",  # stored values corrected to HU (RSNA 12-bit fault)
    "hu_as_stored",  # no rescale, but the stored values are shown to be HU
    "transfer_syntax",  # no file meta: the transfer syntax detected when read
    "multi_frame",  # frames of an Enhanced/Legacy Converted Enhanced CT image
    "reoriented",  # model input turned to the reference patient orientation
    "lossy_compression",  # images lossy-compressed on the way (PS3.3 C.7.6.1.1.5)
    "dropped",  # a summary of the images left out
]


@dataclass(frozen=True, slots=True)
class Dropped:
    """One image of the series left out, and why.

    Attributes
    ----------
    sop_instance_uid : str
        The image's SOP Instance UID; empty when it could not be read.
    path : pathlib.Path or None
        The file (never written to outputs: paths may carry PHI in folder names).
    reason : str
        One line, naming the attribute or value that made it unusable.
    frame_number : int or None
        1-based frame of a multi-frame image; None for a single-frame image.
    """

    sop_instance_uid: str
    path: Path | None
    reason: str
    frame_number: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"sop_instance_uid", "reason"}`` (plus ``frame_number`` for a frame)."""
        out: dict[str, Any] = {"sop_instance_uid": self.sop_instance_uid, "reason": self.reason}
        if self.frame_number is not None:
            out["frame_number"] = self.frame_number
        return out


#: Transfer syntaxes whose compression is lossy (or may be: JPEG 2000, HTJ2K), with
#: the LossyImageCompressionMethod defined term of each (PS3.3 C.7.6.1.1.5.1).
LOSSY_TRANSFER_SYNTAXES: Final[dict[str, str]] = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000 (lossy allowed)
    "1.2.840.10008.1.2.4.93": "ISO_15444_2",  # JPEG 2000 Part 2 Multi-component (lossy allowed)
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # High-Throughput JPEG 2000 (lossy allowed)
}


@dataclass(frozen=True, slots=True)
class LossyCompression:
    """That, and how, an image was lossy-compressed (PS3.3 C.7.6.1.1.5).

    Attributes
    ----------
    methods : tuple of str
        LossyImageCompressionMethod (0028,2114) of the source, else the defined
        term of the lossy transfer syntax it came in; empty when unknown.
    ratios : tuple of str
        LossyImageCompressionRatio (0028,2112), one per method, when the source
        gives them (DS values, as written); empty otherwise.
    transfer_syntax : str
        The lossy transfer syntax the file came in (its name); empty when it came
        in a lossless one (LossyImageCompression "01": compressed before).
    """

    methods: tuple[str, ...] = ()
    ratios: tuple[str, ...] = ()
    transfer_syntax: str = ""


def describe_lossy(images: Sequence[LossyCompression]) -> str:
    """What is known of how images were lossy-compressed, in a few words, for a note.

    ``"JPEG Baseline (Process 1); ISO_10918_1; ratio 5.9:1 to 15.7:1"``: the
    transfer syntaxes they came in, the methods, and the range of the ratios given.
    """
    syntaxes = dict.fromkeys(c.transfer_syntax for c in images if c.transfer_syntax)
    methods = dict.fromkeys(m for c in images for m in c.methods)
    ratios = []
    for c in images:
        for r in c.ratios:
            try:
                ratios.append(float(r))
            except ValueError:
                continue
    parts = [", ".join(syntaxes), ", ".join(methods) or "method not given"]
    if ratios:
        lo, hi = min(ratios), max(ratios)
        parts.append(f"ratio {lo:.1f}:1" if f"{lo:.1f}" == f"{hi:.1f}" else
                     f"ratio {lo:.1f}:1 to {hi:.1f}:1")  # fmt: skip
    return "; ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True)
class Note:
    """A correction or irregularity, as a readable sentence.

    Attributes
    ----------
    kind : str
        One of :data:`NoteKind`.
    text : str
        One readable line (UIDs and counts only, no patient data).
    """

    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class Coverage:
    """How much of the head the read slices cover, along the slice normal.

    Attributes
    ----------
    z_min_mm, z_max_mm : float
        Lowest and highest slice position (``ImagePositionPatient · normal``), mm.
    median_spacing_mm : float or None
        Median distance between consecutive distinct positions, mm; None for one slice.
    largest_gap_mm : float
        Largest distance between consecutive distinct positions, mm (0 for one slice).
    n_gaps : int
        Holes: consecutive slices further apart than 1.5 times both the median
        spacing and their mean SliceThickness (when known), i.e. missing slices
        with tissue between them that no slice shows.
    """

    z_min_mm: float
    z_max_mm: float
    median_spacing_mm: float | None
    largest_gap_mm: float
    n_gaps: int

    def to_dict(self) -> dict[str, Any]:
        """The ``coverage`` object of ``findings.json``."""
        return {
            "z_min_mm": self.z_min_mm,
            "z_max_mm": self.z_max_mm,
            "median_spacing_mm": self.median_spacing_mm,
            "largest_gap_mm": self.largest_gap_mm,
            "n_gaps": self.n_gaps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Coverage:
        """Inverse of :meth:`to_dict`."""
        median = data.get("median_spacing_mm")
        return cls(
            z_min_mm=float(data["z_min_mm"]),
            z_max_mm=float(data["z_max_mm"]),
            median_spacing_mm=None if median is None else float(median),
            largest_gap_mm=float(data["largest_gap_mm"]),
            n_gaps=int(data["n_gaps"]),
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """A series the node will not read, with a one-line reason.

    Attributes
    ----------
    series_instance_uid : str
        The series refused.
    reason : str
        One line (newlines removed, at most 400 characters).
    """

    series_instance_uid: str
    reason: str


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
