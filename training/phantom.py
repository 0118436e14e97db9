"""Synthetic head-CT phantoms with the five hemorrhage subtypes, written as real DICOM.

The phantom is a 3-D analytic head in patient coordinates (DICOM LPS, mm: +x to the
patient's left, +y posterior, +z superior) sampled on the image planes of an axial CT
series, so a lesion spans adjacent slices consistently and a gantry-tilted series
samples the same head on tilted planes, as a real scanner does.

Anatomy, from outside in: air, scalp, skull (outer table, diploe, inner table; denser
skull base), a thin rim of subarachnoid CSF, cortex (gray matter) folded by sulci,
white matter, deep gray nuclei, lateral/third/fourth ventricles, the interhemispheric
and Sylvian fissures and the basal cisterns around the midbrain. Hemorrhages are drawn
where and how they occur (see ``docs/phantoms.md``):

- epidural: a biconvex lens against the inner table, of limited extent (sutures);
- subdural: a long thin crescent along the inner table of one hemisphere;
- subarachnoid: blood in the sulci of a convexity region and/or the basal cisterns
  and Sylvian fissures;
- intraventricular: blood layering in the (dependent) occipital horns and/or a cast
  of a lateral or the third ventricle;
- intraparenchymal: a rounded clot in the basal ganglia or a lobe with a rim of edema.

:func:`write_series` writes one study as a CT Image Storage series; :func:`write_dataset`
writes many in the RSNA 2019 layout (``images/ID_<id>.dcm`` and ``stage_2_train.csv``)
so the same loader trains on phantoms and on RSNA. Everything is a pure function of the
seed: the same seed gives byte-identical pixel data and identical UIDs.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
)

from ich_node.labels import LABELS, RSNA_ORDER, SUBTYPES

log = structlog.get_logger(__name__)

#: The five hemorrhage subtypes, in :data:`ich_node.labels.SUBTYPES` order.
SUBTYPE_NAMES: Final[tuple[str, ...]] = SUBTYPES

# Tissue classes of :attr:`PhantomVolume.tissue`: the anatomy *before* the blood is
# drawn (with the brain pushed away by an extra-axial collection, see EXTRA_AXIAL).
AIR: Final[int] = 0  #: outside the head, and the sphenoid sinus
SCALP: Final[int] = 1  #: scalp and the soft tissue below the skull base
BONE: Final[int] = 2  #: cortical bone: outer and inner tables, skull base
DIPLOE: Final[int] = 3  #: cancellous bone between the tables
BRAIN_GM: Final[int] = 4  #: cortex and deep gray nuclei
BRAIN_WM: Final[int] = 5  #: white matter (and brainstem)
CSF_VENTRICLE: Final[int] = 6  #: lateral, third and fourth ventricles
CSF_SULCI: Final[int] = 7  #: sulci, convexity CSF rim and interhemispheric fissure
CISTERN: Final[int] = 8  #: basal (perimesencephalic, suprasellar) cisterns, Sylvian fissures
EXTRA_AXIAL: Final[int] = 9  #: space opened between inner table and brain by an EDH/SDH
SUPPORT: Final[int] = 10  #: not the patient: head holder (cradle) and table (``support=True``)

#: Names of the tissue codes, index = code.
TISSUE_NAMES: Final[tuple[str, ...]] = (
    "air",
    "scalp",
    "bone",
    "diploe",
    "brain_gm",
    "brain_wm",
    "csf_ventricle",
    "csf_sulci",
    "cistern",
    "extra_axial",
    "support",
)

#: A slice is positive for a subtype when its mask covers at least this many pixels
#: (about 5 mm² at the default 0.45 mm pixel spacing).
MIN_LESION_PIXELS: Final[int] = 25

#: Field of view of every series, mm (pixel spacing = FOV / matrix: 0.449 mm at 512).
FOV_MM: Final[float] = 230.0
#: Nominal slice spacing and thickness, mm.
SLICE_SPACING_MM: Final[float] = 5.0
#: Table position (z, mm) of the centre of the most superior slice.
Z_TOP_MM: Final[float] = 80.0
#: Short series are spread over at least this craniocaudal extent, mm.
MIN_COVERAGE_MM: Final[float] = 110.0

#: The patient support of ``support=True``, as on the real GE series in shared/real-ct:
#: a head holder (a U-shaped cradle shell around the back and sides of the head, a
#: cushion of foam between, drawn as air) and the table plate behind it.
SUPPORT_GAP_MM: Final[float] = 6.0  #: default cushion between scalp and cradle
CRADLE_MM: Final[float] = 3.0  #: cradle shell thickness
CRADLE_HU: Final[float] = 350.0  #: plastic of the holder (the GE holder reads +300 … +380)
TABLE_MM: Final[float] = 5.0  #: table plate thickness
TABLE_HU: Final[float] = 200.0  #: carbon-fibre table
#: The cradle reaches this far anterior of the head centre, mm (its side strips).
_CRADLE_FRONT_MM: Final[float] = 40.0

#: Radius (mm, scaled with the head) of the sphere the sulcal pattern is drawn on.
_SULCAL_SPHERE_MM: Final[float] = 70.0
#: Ordinary HU clip: stored value = HU + 1024 in 12 bits.
_HU_MIN: Final[int] = -1024
_HU_MAX: Final[int] = 3071
_UID_TAG: Final[str] = "ich-node phantom v1"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class PhantomVolume:
    """One synthetic head CT on its acquisition grid.

    Attributes
    ----------
    hu : numpy.ndarray
        (S, H, W) int16 Hounsfield units, slices ordered inferior -> superior (along the
        slice normal), rows anterior -> posterior, columns patient right -> left.
    masks : dict[str, numpy.ndarray]
        Subtype name -> (S, H, W) bool, one entry for each of :data:`SUBTYPE_NAMES`
        (all False when the subtype is absent).
    tissue : numpy.ndarray
        (S, H, W) uint8 tissue class (``AIR``, ``SCALP``, ... module constants) of the
        anatomy under the blood.
    pixel_spacing_mm : float
        In-plane pixel spacing, mm (square pixels).
    slice_spacing_mm : float
        Distance between slices along the slice normal, mm.
    tilt_deg : float
        Gantry tilt, degrees (0 for a plain axial series).
    subtypes : frozenset[str]
        The subtypes drawn in this volume (each is positive on at least one slice).
    """

    hu: np.ndarray
    masks: dict[str, np.ndarray]
    tissue: np.ndarray
    pixel_spacing_mm: float
    slice_spacing_mm: float
    tilt_deg: float
    subtypes: frozenset[str]

    def slice_labels(self) -> np.ndarray:
        """Per-slice labels.

        Returns
        -------
        numpy.ndarray
            (S, 6) uint8 in :data:`ich_node.labels.LABELS` order: a slice is positive
            for a subtype when its mask has at least :data:`MIN_LESION_PIXELS` pixels
            there; ``any`` is the OR of the subtypes.
        """
        n = self.hu.shape[0]
        out = np.zeros((n, len(LABELS)), dtype=np.uint8)
        for j, name in enumerate(LABELS[1:], start=1):
            out[:, j] = self.masks[name].sum(axis=(1, 2)) >= MIN_LESION_PIXELS
        out[:, 0] = out[:, 1:].max(axis=1)
        return out


@dataclass(frozen=True, slots=True)
class PhantomSeries:
    """One written phantom study (one CT series).

    Attributes
    ----------
    study_instance_uid, series_instance_uid : str
        UIDs of the study and series (``2.25.`` UIDs derived from the seed).
    patient_id : str
        The synthetic PatientID.
    paths : tuple[pathlib.Path, ...]
        The files, in spatial order inferior -> superior.
    sop_instance_uids : tuple[str, ...]
        SOP Instance UIDs, in the order of ``paths``.
    volume : PhantomVolume
        The volume the files were written from.
    """

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    paths: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    volume: PhantomVolume


@dataclass(frozen=True, slots=True)
class DatasetSummary:
    """What :func:`write_dataset` wrote.

    Attributes
    ----------
    out : pathlib.Path
        Dataset root (``images/``, ``stage_2_train.csv``, ``phantom_truth.csv``).
    n_studies, n_images : int
        Number of series and of image files.
    n_positive_studies : int
        Series with at least one positive slice.
    label_counts : dict[str, int]
        Label (``LABELS``) -> number of positive slices.
    """

    out: Path
    n_studies: int
    n_images: int
    n_positive_studies: int
    label_counts: dict[str, int]


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True, slots=True)
class _Geometry:
    """Where the slices lie in patient space (no randomness: a function of the shape)."""

    n_slices: int
    matrix: int
    pixel_spacing: float
    slice_spacing: float
    tilt_deg: float
    z_centres: np.ndarray  # (S,) float64 table z of each slice centre, inferior first

    @property
    def row_dir(self) -> np.ndarray:
        """Direction of increasing column index (IOP first triplet)."""
        return np.array([1.0, 0.0, 0.0])

    @property
    def col_dir(self) -> np.ndarray:
        """Direction of increasing row index (IOP second triplet).

        A GE-style tilt turns the column direction about x: (0, cos t, -sin t), so the
        plane rises anteriorly (as in the real +18.5° GE series in shared/real-ct).
        """
        t = math.radians(self.tilt_deg)
        return np.array([0.0, math.cos(t), -math.sin(t)])

    @property
    def normal(self) -> np.ndarray:
        """Slice normal, row x column direction: (0, sin t, cos t)."""
        return np.cross(self.row_dir, self.col_dir)

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient (centre of the first pixel) of slice ``k``, mm."""
        centre = np.array([0.0, 0.0, self.z_centres[k]])
        half = (self.matrix - 1) / 2 * self.pixel_spacing
        return centre - half * (self.row_dir + self.col_dir)


def _geometry(n_slices: int, matrix: int, tilt_deg: float) -> _Geometry:
    if n_slices < 2:
        raise ValueError(f"n_slices must be at least 2, got {n_slices!r}")
    if matrix < 64:
        raise ValueError(f"matrix must be at least 64, got {matrix!r}")
    if not -30.0 <= tilt_deg <= 30.0:
        raise ValueError(f"tilt_deg must lie in [-30, 30], got {tilt_deg!r}")
    spacing = max(SLICE_SPACING_MM, MIN_COVERAGE_MM / (n_slices - 1))
    spacing = round(spacing, 3)
    # A tilted series steps along the table (z) by spacing / cos t, so that the planes
    # are `spacing` apart along their normal; this is what GE writes.
    dz = spacing / math.cos(math.radians(tilt_deg))
    z = Z_TOP_MM - dz * np.arange(n_slices - 1, -1, -1, dtype=np.float64)
    return _Geometry(n_slices, matrix, FOV_MM / matrix, spacing, float(tilt_deg), z)


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True, slots=True)
class _Ellipsoid:
    centre: tuple[float, float, float]
    axes: tuple[float, float, float]

    def q(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Normalised squared radius: < 1 inside."""
        (cx, cy, cz), (ax, ay, az) = self.centre, self.axes
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2

    def zrange(self) -> tuple[float, float]:
        return self.centre[2] - self.axes[2], self.centre[2] + self.axes[2]


@dataclass(frozen=True, slots=True)
class _Head:
    """Random anatomy of one study, in the head frame (mm, origin at the head centre)."""

    offset: tuple[float, float, float]  # head centre in patient coordinates
    yaw: float  # rotation about z, radians
    outer: tuple[float, float, float]  # scalp surface semi-axes
    scalp: float  # scalp thickness
    skull: float  # skull thickness (tables + diploe)
    scale: float
    waves: np.ndarray  # (6, 4) sulcal field plane waves: kx, ky, kz, phase
    sulcus_depth: float
    ventricles: dict[str, _Ellipsoid]
    deep_gray: tuple[_Ellipsoid, ...]
    midbrain: _Ellipsoid
    suprasellar: _Ellipsoid
    sphenoid: _Ellipsoid
    hu: dict[int, float]  # tissue -> mean HU
    bone_base_extra: float  # extra HU of bone toward the skull base
    noise_sd: float

    @property
    def inner_table(self) -> float:
        return self.scalp + self.skull


def _draw_head(rng: np.random.Generator) -> _Head:
    s = float(rng.uniform(0.93, 1.05))
    outer = (74.0 * s * rng.uniform(0.97, 1.03), 95.0 * s * rng.uniform(0.97, 1.03), 88.0 * s)
    # Random smooth field whose zero set gives meandering sulci (about 12 mm apart).
    dirs = rng.normal(size=(6, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * math.pi / rng.uniform(22.0, 28.0, size=(6, 1))
    waves = np.hstack([dirs * k, rng.uniform(0, 2 * math.pi, size=(6, 1))])
    v = float(rng.uniform(0.8, 1.3))  # ventricle size: young to atrophic

    def e(c: tuple[float, float, float], a: tuple[float, float, float], av: float = 1.0):
        return _Ellipsoid(
            (c[0] * s, c[1] * s, c[2] * s), (a[0] * s * av, a[1] * s * av, a[2] * s * av)
        )

    ventricles = {
        "lateral_r": e((-8.0, -6.0, 18.0), (5.0, 30.0, 8.0), v),
        "lateral_l": e((8.0, -6.0, 18.0), (5.0, 30.0, 8.0), v),
        "occipital_r": e((-17.0, 36.0, 9.0), (5.5, 14.0, 6.5), v),
        "occipital_l": e((17.0, 36.0, 9.0), (5.5, 14.0, 6.5), v),
        "third": e((0.0, 4.0, -2.0), (2.5, 13.0, 10.0), v),
        "fourth": e((0.0, 32.0, -38.0), (6.0, 4.5, 7.0), v),
    }
    deep = (
        e((-21.0, -2.0, 4.0), (8.0, 14.0, 10.0)),  # lentiform nuclei
        e((21.0, -2.0, 4.0), (8.0, 14.0, 10.0)),
        e((-10.0, 15.0, 6.0), (7.0, 10.0, 8.0)),  # thalami
        e((10.0, 15.0, 6.0), (7.0, 10.0, 8.0)),
    )
    hu = {
        AIR: -1000.0,
        SCALP: float(rng.uniform(28, 50)),
        BONE: float(rng.uniform(1050, 1250)),
        DIPLOE: float(rng.uniform(600, 780)),
        BRAIN_GM: float(rng.uniform(39, 44)),
        BRAIN_WM: float(rng.uniform(23, 28)),
        CSF_VENTRICLE: float(rng.uniform(3, 10)),
        CSF_SULCI: float(rng.uniform(3, 10)),
        CISTERN: float(rng.uniform(3, 10)),
        EXTRA_AXIAL: float(rng.uniform(3, 10)),
    }
    return _Head(
        offset=(float(rng.uniform(-3, 3)), float(rng.uniform(-5, 5)), float(rng.uniform(-4, 4))),
        yaw=math.radians(float(rng.uniform(-6, 6))),
        outer=outer,
        scalp=float(rng.uniform(4.5, 6.5)),
        skull=float(rng.uniform(6.0, 8.0)),
        scale=s,
        waves=waves.astype(np.float32),
        sulcus_depth=float(rng.uniform(10.0, 15.0)),
        ventricles=ventricles,
        deep_gray=deep,
        midbrain=e((0.0, 8.0, -22.0), (11.0, 13.0, 14.0)),
        suprasellar=e((0.0, -12.0, -26.0), (10.0, 7.0, 6.0)),
        sphenoid=e((0.0, -22.0, -62.0), (13.0, 11.0, 9.0)),
        hu=hu,
        bone_base_extra=float(rng.uniform(250, 450)),
        noise_sd=float(rng.uniform(4.0, 6.0)),
    )


def _floor(y: np.ndarray, s: float) -> np.ndarray:
    """z of the cranial-cavity floor (head frame, mm) as a function of y.

    Anterior fossa highest, middle fossa lower, posterior fossa lowest.
    """
    ant = 1.0 / (1.0 + np.exp((y + 28.0 * s) / 9.0))
    post = 1.0 / (1.0 + np.exp(-(y - 8.0 * s) / 6.0))
    return (-40.0 + 16.0 * ant - 12.0 * post) * s


# --------------------------------------------------------------------------- lesions


@dataclass(frozen=True, slots=True)
class _Lesion:
    kind: str
    centre: tuple[float, float, float]  # head frame, mm
    radius: float  # EDH/SDH extent along the wall, SAH region, IPH mean radius
    thickness: float  # EDH/SDH maximal thickness; IPH edema rim
    side: float  # -1 right, +1 left, 0 both
    hu: float
    mode: str = ""
    axes: tuple[float, float, float] = (0.0, 0.0, 0.0)  # IPH clot semi-axes
    level: float = 0.0  # IVH: fraction of the occipital horns filled; IPH: edema HU


def _wall_point(head: _Head, side: float, azimuth_deg: float, elev_deg: float) -> np.ndarray:
    """A point on the inner table in the given direction (head frame)."""
    a, b, c = (ax - head.inner_table for ax in head.outer)
    th, ph = math.radians(azimuth_deg), math.radians(elev_deg)
    d = np.array([side * math.cos(th) * math.cos(ph), math.sin(th) * math.cos(ph), math.sin(ph)])
    r = 1.0 / math.sqrt((d[0] / a) ** 2 + (d[1] / b) ** 2 + (d[2] / c) ** 2)
    return d * r


def _draw_lesion(kind: str, rng: np.random.Generator, head: _Head) -> _Lesion:
    side = float(rng.choice([-1.0, 1.0]))
    s = head.scale
    if kind == "epidural":
        # Temporal/parietal; limited extent because the dura is fixed at the sutures.
        c = _wall_point(head, side, rng.uniform(-35, 35), rng.uniform(5, 40))
        radius, thick = rng.uniform(18, 30), rng.uniform(9, 17)
        return _Lesion(kind, tuple(c), radius, thick, side, rng.uniform(60, 85))
    if kind == "subdural":
        # Long arc over a hemisphere convexity; crosses sutures, stops at the falx.
        c = _wall_point(head, side, rng.uniform(-30, 30), rng.uniform(15, 45))
        radius, thick = rng.uniform(45, 70), rng.uniform(5, 10)
        return _Lesion(kind, tuple(c), radius, thick, side, rng.uniform(55, 80))
    if kind == "subarachnoid":
        mode = str(rng.choice(["basal", "convexity", "both"]))
        c = _wall_point(head, side, rng.uniform(-60, 60), rng.uniform(10, 50))
        return _Lesion(kind, tuple(c), rng.uniform(40, 60), 0.0, side, rng.uniform(60, 80), mode)
    if kind == "intraventricular":
        mode = str(rng.choice(["layering", "cast", "both"]))
        return _Lesion(
            kind, (0.0, 0.0, 0.0), 0.0, 0.0, side, rng.uniform(55, 80), mode,
            level=float(rng.uniform(0.4, 0.7)),
        )  # fmt: skip
    if kind == "intraparenchymal":
        if rng.random() < 0.5:
            mode = "basal_ganglia"
            r = rng.uniform(8, 13)
            c = np.array([side * 23.0, -2.0, 5.0]) * s + rng.uniform(-3, 3, size=3)
        else:
            mode = "lobar"
            r = rng.uniform(9, 19)
            site = [(32, -42, 22), (36, 18, 38), (44, -5, -8), (24, 52, 16)][int(rng.integers(4))]
            c = np.array([side * site[0], site[1], site[2]], dtype=float) * s
            # Pull the clot toward the centre so it stays inside the parenchyma.
            c = c * (1.0 - 0.5 * r / np.linalg.norm(c)) + rng.uniform(-3, 3, size=3)
        axes = tuple(float(r * f) for f in rng.uniform(0.8, 1.2, size=3))
        return _Lesion(
            kind, tuple(c), float(r), float(rng.uniform(3, 6)), side, rng.uniform(62, 85), mode,
            axes=axes, level=float(rng.uniform(11, 18)),  # type: ignore[arg-type]
        )  # fmt: skip
    raise ValueError(f"subtype must be one of {SUBTYPE_NAMES}, got {kind!r}")


def _snap(lesion: _Lesion, head: _Head, geo: _Geometry, rng: np.random.Generator) -> _Lesion:
    """Move a focal lesion along the slice normal onto a slice so it is seen."""
    if lesion.kind not in ("epidural", "subdural", "intraparenchymal"):
        return lesion
    p = _to_patient(np.array(lesion.centre), head)
    n = geo.normal
    cos_t = math.cos(math.radians(geo.tilt_deg))
    planes = geo.z_centres * cos_t  # n . centre of each slice
    d = planes - float(p @ n)
    inside = np.abs(d) < 25.0
    if not inside.any():
        return lesion
    idx = np.flatnonzero(inside)
    k = int(idx[np.argmin(np.abs(d[idx]))])
    shift = d[k] + float(rng.uniform(-1.0, 1.0))
    c = _to_head(p + shift * n, head)
    if lesion.kind in ("epidural", "subdural"):
        # back onto the inner table in the same direction
        a, b, cc = (ax - head.inner_table for ax in head.outer)
        c = c / math.sqrt((c[0] / a) ** 2 + (c[1] / b) ** 2 + (c[2] / cc) ** 2)
    centre = (float(c[0]), float(c[1]), float(c[2]))
    return _Lesion(
        lesion.kind, centre, lesion.radius, lesion.thickness,
        lesion.side, lesion.hu, lesion.mode, lesion.axes, lesion.level,
    )  # fmt: skip


def _to_patient(p: np.ndarray, head: _Head) -> np.ndarray:
    cy, sy = math.cos(head.yaw), math.sin(head.yaw)
    x, y, z = p
    return np.array([cy * x - sy * y, sy * x + cy * y, z]) + np.array(head.offset)


def _to_head(p: np.ndarray, head: _Head) -> np.ndarray:
    cy, sy = math.cos(head.yaw), math.sin(head.yaw)
    x, y, z = p - np.array(head.offset)
    return np.array([cy * x + sy * y, -sy * x + cy * y, z])


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True, slots=True)
class _Support:
    """Head holder and table, fixed in the scanner (patient frame, no yaw), mm."""

    centre: tuple[float, float]  # (x, y) of the cradle's axis: the head centre
    inner: tuple[float, float]  # cradle inner semi-axes (x, y)
    table_y: float  # anterior face of the table plate

    @staticmethod
    def around(head: _Head, gap_mm: float) -> _Support:
        """The cradle ``gap_mm`` from the scalp's widest section, the table behind it."""
        a, b, _ = head.outer
        ox, oy, _ = head.offset
        inner = (a + gap_mm, b + gap_mm)
        return _Support((ox, oy), inner, oy + inner[1] + CRADLE_MM + 2.0)

    def draw(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) bool cradle and table pixels (outside the patient's tissue)."""
        (cx, cy), (ax, ay) = self.centre, self.inner
        dx, dy = px - cx, py - cy
        q_in = (dx / ax) ** 2 + (dy / ay) ** 2
        q_out = (dx / (ax + CRADLE_MM)) ** 2 + (dy / (ay + CRADLE_MM)) ** 2
        cradle = (q_in >= 1) & (q_out < 1) & (dy > -_CRADLE_FRONT_MM)
        plate = (py >= self.table_y) & (py < self.table_y + TABLE_MM)  # (H, 1): whole rows
        return cradle, np.broadcast_to(plate, cradle.shape).copy()


def _render_slice(
    k: int,
    geo: _Geometry,
    head: _Head,
    lesions: list[_Lesion],
    support: _Support | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Render slice ``k``: (H, W) float32 HU before blur/noise, uint8 tissue, bool masks."""
    n = geo.matrix
    f32 = np.float32
    ipp = geo.position(k)
    idx = np.arange(n, dtype=np.float64) * geo.pixel_spacing
    # Patient coordinates of the pixel centres: x varies along columns, y and z along rows.
    px = (ipp[0] + idx)[None, :]
    py = (ipp[1] + idx * geo.col_dir[1])[:, None]
    pz = (ipp[2] + idx * geo.col_dir[2])[:, None]
    # Head frame (rotate by -yaw about z, remove the offset).
    ox, oy, oz = head.offset
    cy, sy = math.cos(head.yaw), math.sin(head.yaw)
    x = (cy * (px - ox) + sy * (py - oy)).astype(f32)  # (H, W)
    y = (-sy * (px - ox) + cy * (py - oy)).astype(f32)  # (H, W)
    z = (pz - oz).astype(f32)  # (H, 1)

    # Approximate signed distance to the scalp surface (Quilez's ellipsoid bound).
    a, b, c = head.outer
    k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    k1 = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2 + (z / c**2) ** 2) + f32(1e-6)
    depth = k0 * (1.0 - k0) / k1  # mm inward from the scalp surface
    zfloor = _floor(y, head.scale).astype(f32)
    it = head.inner_table
    dc = np.minimum(depth - it, z - zfloor)  # mm inside the cranial cavity wall
    cavity = dc >= 0

    tissue = np.zeros((n, n), dtype=np.uint8)
    tissue[depth >= 0] = SCALP
    skull = (depth >= head.scalp) & ~cavity
    below = z < zfloor
    tissue[skull] = BONE
    diploe = skull & (depth >= head.scalp + 2.0) & (depth < it - 2.0) & ~below
    tissue[diploe] = DIPLOE
    # Under the skull base: soft tissue of the face and neck, and the sphenoid sinus.
    tissue[(depth >= it) & (z < zfloor - 7.0 * head.scale)] = SCALP
    tissue[(head.sphenoid.q(x, y, z) < 1) & (depth >= it)] = AIR

    # Extra-axial collections push the brain surface inward by their thickness.
    hx = np.zeros((n, n), dtype=f32)
    masks = {name: np.zeros((n, n), dtype=bool) for name in SUBTYPE_NAMES}
    for les in lesions:
        if les.kind in ("epidural", "subdural"):
            h = _extra_axial_thickness(les, x, y, z)
            region = cavity & (dc < h)
            if les.kind == "subdural":
                region &= x * les.side > 1.0  # the falx stops it at the midline
            masks[les.kind] |= region
            hx = np.maximum(hx, np.where(region, h, f32(0)))
    db = dc - hx  # mm inside the brain surface
    tissue[cavity] = BRAIN_WM
    tissue[cavity & (db < 0)] = EXTRA_AXIAL
    ctx = cavity & (db >= 0)

    # Cortex: a ribbon under the surface, notched by sulci. The sulci are the zero set of
    # a smooth random field evaluated on the radial projection of each point onto a
    # sphere, so they are sheets running inward from the surface, as real sulci do.
    band = ctx & (db < head.sulcus_depth + 3.0)
    bx, by = x[band], y[band]
    bz = np.broadcast_to(z, x.shape)[band]
    ux, uy, uz = bx / a, by / b, bz / c
    rn = np.sqrt(ux * ux + uy * uy + uz * uz) + f32(1e-6)
    r_s = f32(_SULCAL_SPHERE_MM * head.scale)
    sx, sy_, sz = ux / rn * r_s, uy / rn * r_s, uz / rn * r_s
    g = np.zeros(bx.shape, dtype=f32)
    gx = np.zeros_like(g)
    gy = np.zeros_like(g)
    gz = np.zeros_like(g)
    for kx, ky, kz, ph in head.waves:
        arg = kx * sx + ky * sy_ + kz * sz + ph
        g += np.cos(arg)
        sn = np.sin(arg)
        gx -= kx * sn
        gy -= ky * sn
        gz -= kz * sn
    # Remove the radial part of the gradient: distance is measured along the surface.
    gr = (gx * sx + gy * sy_ + gz * sz) / r_s
    gt2 = gx * gx + gy * gy + gz * gz - gr * gr
    dist = np.abs(g) / (np.sqrt(np.maximum(gt2, 0)) + f32(1e-3))  # mm to a sulcus
    bdb = db[band]
    gm = (bdb < 3.0) | ((dist < 2.5) & (bdb < head.sulcus_depth + 2.0))
    csf = (bdb < 1.0) | ((dist < 0.9) & (bdb < head.sulcus_depth))
    tissue[band] = np.where(csf, CSF_SULCI, np.where(gm, BRAIN_GM, BRAIN_WM))

    for e in head.deep_gray:
        tissue[ctx & (e.q(x, y, z) < 1)] = BRAIN_GM
    # Interhemispheric fissure, down to the corpus callosum (not in the posterior fossa).
    fissure = ctx & (np.abs(x) < 1.0) & (db < 35.0 * head.scale) & (z > -12.0 * head.scale)
    tissue[fissure] = CSF_SULCI

    # Basal cisterns: a shell around the midbrain, the suprasellar cistern, Sylvian fissures.
    qm = head.midbrain.q(x, y, z)
    cis = (qm >= 1) & (qm < 1.6)
    cis |= head.suprasellar.q(x, y, z) < 1
    s = head.scale
    for sd in (-1.0, 1.0):
        cis |= _capsule(x, y, z, (sd * 12 * s, -12 * s, -24 * s), (sd * 52 * s, -2 * s, -8 * s)) < (
            2.5 * s
        )
    tissue[ctx & cis] = CISTERN
    tissue[ctx & (qm < 1)] = BRAIN_WM

    vent_parts: dict[str, np.ndarray] = {}
    for name, e in head.ventricles.items():
        m = ctx & (e.q(x, y, z) < 1)
        vent_parts[name] = m
        tissue[m] = CSF_VENTRICLE

    # Base HU from the tissue map; cortical bone is denser toward the skull base.
    lut = np.array([head.hu.get(t, CRADLE_HU) for t in range(len(TISSUE_NAMES))], dtype=f32)
    hu = lut[tissue]
    base = np.clip((-10.0 * s - z) / (40.0 * s), 0.0, 1.0) * f32(head.bone_base_extra)
    hu = np.where(tissue == BONE, hu + base, hu)

    # Blood.
    for les in lesions:
        if les.kind in ("epidural", "subdural"):
            continue  # mask done above
        if les.kind == "subarachnoid":
            m = np.zeros((n, n), dtype=bool)
            if les.mode in ("basal", "both"):
                m |= tissue == CISTERN
            if les.mode in ("convexity", "both"):
                d2 = (x - les.centre[0]) ** 2 + (y - les.centre[1]) ** 2 + (z - les.centre[2]) ** 2
                m |= (tissue == CSF_SULCI) & (d2 < les.radius**2) & (x * les.side > 0)
            masks[les.kind] |= m
        elif les.kind == "intraventricular":
            m = np.zeros((n, n), dtype=bool)
            if les.mode in ("layering", "both"):
                for name in ("occipital_r", "occipital_l"):
                    e = head.ventricles[name]
                    # Dependent layering: blood sinks posteriorly in a supine patient.
                    level = e.centre[1] + e.axes[1] * (1.0 - 2.0 * les.level)
                    m |= vent_parts[name] & (py > level + head.offset[1])
            if les.mode in ("cast", "both"):
                part = "lateral_l" if les.side > 0 else "lateral_r"
                m |= vent_parts[part] | vent_parts["third"]
            masks[les.kind] |= m
        elif les.kind == "intraparenchymal":
            e = _Ellipsoid(les.centre, les.axes)
            q = e.q(x, y, z)
            clot = (q < 1) & np.isin(tissue, (BRAIN_GM, BRAIN_WM, CSF_SULCI))
            rim_q = (1.0 + les.thickness / les.radius) ** 2
            edema = (q >= 1) & (q < rim_q) & np.isin(tissue, (BRAIN_GM, BRAIN_WM))
            hu[edema] = les.level  # vasogenic edema: darker than white matter
            masks[les.kind] |= clot
    for les in lesions:
        hu[masks[les.kind]] = les.hu
    if support is not None:
        cradle, table = support.draw(px, py)
        free = tissue == AIR  # a support never overlaps the patient
        for part, value in ((cradle, CRADLE_HU), (table, TABLE_HU)):
            part &= free
            tissue[part] = SUPPORT
            hu[part] = value
    return hu, tissue, masks


def _extra_axial_thickness(les: _Lesion, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(H, W) float32 thickness (mm) of an EDH/SDH at each pixel; 0 outside its extent."""
    cx, cy, cz = les.centre
    r2 = ((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / np.float32(les.radius**2)
    if les.kind == "epidural":  # noqa: SIM108
        prof = 1.0 - r2  # biconvex lens: thickest at the centre
    else:
        prof = np.sqrt(np.clip(1.0 - r2 * r2, 0.0, None))  # flat crescent, tapered ends
    return np.clip(prof, 0.0, None).astype(np.float32) * np.float32(les.thickness)


def _capsule(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    p0: tuple[float, float, float],
    p1: tuple[float, float, float],
) -> np.ndarray:
    """Distance (mm) from each point to the segment p0-p1."""
    d = np.subtract(p1, p0)
    ll = float(d @ d)
    rx, ry, rz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) / ll, 0.0, 1.0)
    return np.sqrt((rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2)


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 4, 1] / 6 blur (scanner PSF, partial volume), edges replicated."""
    out = img * np.float32(4 / 6)
    out[1:] += img[:-1] / 6
    out[:-1] += img[1:] / 6
    out[0] += img[0] / 6
    out[-1] += img[-1] / 6
    res = out * np.float32(4 / 6)
    res[:, 1:] += out[:, :-1] / 6
    res[:, :-1] += out[:, 1:] / 6
    res[:, 0] += out[:, 0] / 6
    res[:, -1] += out[:, -1] / 6
    return res


def make_volume(
    rng: np.random.Generator,
    *,
    subtypes: Iterable[str] = (),
    n_slices: int = 28,
    matrix: int = 512,
    tilt_deg: float = 0.0,
    support: bool = False,
    support_gap_mm: float = SUPPORT_GAP_MM,
) -> PhantomVolume:
    """Draw and render one synthetic head CT.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness: the same generator state gives the same volume.
    subtypes : iterable of str
        Hemorrhage subtypes to draw (names from :data:`SUBTYPE_NAMES`); empty for a
        negative study.
    n_slices : int
        Number of axial slices (5 mm apart, more when fewer than 23 slices are asked
        so that the series still covers skull base to vertex).
    matrix : int
        Rows = columns; the field of view is fixed at :data:`FOV_MM`.
    tilt_deg : float
        Gantry tilt, degrees, in [-30, 30].
    support : bool
        Also draw what the head lies on (tissue code ``SUPPORT``): a head holder, a
        :data:`CRADLE_MM` shell of +350 HU around the back and sides of the head, and
        the table plate behind it (+200 HU, where it falls in the field of view). The
        head, lesions and noise are those of the same generator state without it.
    support_gap_mm : float
        Cushion between the scalp's widest section and the cradle, mm, >= 0; 0 lays
        the back of the head on the cradle.

    Returns
    -------
    PhantomVolume
        HU volume, tissue map and lesion masks; every requested subtype is positive
        (>= :data:`MIN_LESION_PIXELS`) on at least one slice.

    Raises
    ------
    TypeError
        If ``rng`` is not a :class:`numpy.random.Generator`.
    ValueError
        If a subtype name is unknown or a size is out of range.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    wanted = tuple(dict.fromkeys(subtypes))
    for name in wanted:
        if name not in SUBTYPE_NAMES:
            raise ValueError(f"subtype must be one of {SUBTYPE_NAMES}, got {name!r}")
    if not (math.isfinite(support_gap_mm) and support_gap_mm >= 0):
        raise ValueError(f"support_gap_mm must be >= 0, got {support_gap_mm!r}")
    geo = _geometry(n_slices, matrix, tilt_deg)
    head = _draw_head(rng)
    # No random draw: the head, lesions and noise stay those of the same seed without it.
    holder = _Support.around(head, support_gap_mm) if support else None
    labels = None
    for _attempt in range(12):
        lesions = [_snap(_draw_lesion(k, rng, head), head, geo, rng) for k in wanted]
        hu_f = np.empty((n_slices, matrix, matrix), dtype=np.float32)
        tissue = np.empty((n_slices, matrix, matrix), dtype=np.uint8)
        masks = {name: np.zeros(hu_f.shape, dtype=bool) for name in SUBTYPE_NAMES}
        for k in range(n_slices):
            h, t, m = _render_slice(k, geo, head, lesions, holder)
            hu_f[k], tissue[k] = h, t
            for name in wanted:
                masks[name][k] = m[name]
        counts = {name: masks[name].sum(axis=(1, 2)) for name in wanted}
        labels = [name for name in wanted if (counts[name] >= MIN_LESION_PIXELS).any()]
        if len(labels) == len(wanted):
            break
    else:
        raise RuntimeError(f"could not place {wanted} on {n_slices} slices")  # pragma: no cover
    noise = rng.standard_normal(hu_f.shape, dtype=np.float32)
    out = np.empty(hu_f.shape, dtype=np.int16)
    for k in range(n_slices):
        img = _blur(hu_f[k]) + noise[k] * np.float32(head.noise_sd)
        out[k] = np.clip(np.rint(img), _HU_MIN, _HU_MAX).astype(np.int16)
    return PhantomVolume(
        hu=out,
        masks=masks,
        tissue=tissue,
        pixel_spacing_mm=geo.pixel_spacing,
        slice_spacing_mm=geo.slice_spacing,
        tilt_deg=float(tilt_deg),
        subtypes=frozenset(wanted),
    )


# ------------------------------------------------------------- context phantoms

#: HU of a context focus (a faint clot; brain parenchyma is about 25-40 HU).
CONTEXT_FOCUS_HU: Final[float] = 85.0
#: Radius of a context focus in the image plane, mm (range drawn per focus).
CONTEXT_FOCUS_RADIUS_MM: Final[tuple[float, float]] = (12.0, 16.0)
#: Slices a thin bleed spans; a mimic is on one slice only.
CONTEXT_BLEED_SLICES: Final[int] = 3
#: Single-slice mimics per study.
CONTEXT_MIMICS: Final[int] = 2


def _disc_fits(brain: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose disc of radius ``r`` (checked at 8 rim points and the centre) is brain."""
    ok = brain.copy()
    for dy, dx in ((r, 0), (-r, 0), (0, r), (0, -r), (r, r), (r, -r), (-r, r), (-r, -r)):
        shifted = np.zeros_like(brain)
        h, w = brain.shape
        ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
        yd, xd = slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx))
        shifted[ys, xs] = brain[yd, xd]
        ok &= shifted
    return ok


def add_context_foci(vol: PhantomVolume, rng: np.random.Generator, *, bleed: bool) -> PhantomVolume:
    """Make a volume that needs slice context: identical foci, told apart only across slices.

    Every study gets :data:`CONTEXT_MIMICS` single-slice foci (labelled negative: a
    focus seen on one 5 mm slice only, as partial volume of a vessel or a
    calcification may look); a ``bleed`` study also gets one thin intraparenchymal
    bleed, the **same** focus (same centre, radius and HU) on
    :data:`CONTEXT_BLEED_SLICES` consecutive slices, labelled ``intraparenchymal``
    (and ``any``) on those slices. On one slice a bleed and a mimic are drawn from
    the same distribution: a model that sees one slice cannot tell them apart
    (its best answer is the base rate); one that sees the neighbours can.

    Parameters
    ----------
    vol : PhantomVolume
        A volume from :func:`make_volume` (usually without lesions).
    rng : numpy.random.Generator
        Draws slices, centres, radii and noise.
    bleed : bool
        Whether to add the thin bleed.

    Returns
    -------
    PhantomVolume
        A copy with the foci in ``hu`` and the bleed in ``masks["intraparenchymal"]``.
    """
    hu = vol.hu.astype(np.float32)
    n, h, w = hu.shape
    masks = {k: v.copy() for k, v in vol.masks.items()}
    brain = np.isin(vol.tissue, (BRAIN_GM, BRAIN_WM))
    yy, xx = np.mgrid[0:h, 0:w]
    used: set[int] = set()

    def paint(k: int, cy: int, cx: int, r_px: float) -> np.ndarray:
        d = np.hypot(yy - cy, xx - cx)
        weight = np.clip(r_px + 0.5 - d, 0.0, 1.0)  # one-pixel soft edge
        weight *= brain[k]
        noise = rng.standard_normal((h, w)).astype(np.float32) * 4.0
        hu[k] = hu[k] * (1 - weight) + (CONTEXT_FOCUS_HU + noise) * weight
        return weight >= 0.5

    def centre(slices: list[int], r_px: int) -> tuple[int, int] | None:
        ok = np.ones((h, w), dtype=bool)
        for k in slices:
            ok &= _disc_fits(brain[k], r_px + 1)
        ys, xs = np.nonzero(ok)
        if not len(ys):
            return None
        j = int(rng.integers(len(ys)))
        return int(ys[j]), int(xs[j])

    def radius() -> float:
        return float(rng.uniform(*CONTEXT_FOCUS_RADIUS_MM)) / vol.pixel_spacing_mm

    lo, hi = max(1, n // 6), max(2, 5 * n // 6)
    if bleed:
        for _ in range(20):
            first = int(rng.integers(lo, max(lo + 1, hi - CONTEXT_BLEED_SLICES + 1)))
            ks = list(range(first, min(n, first + CONTEXT_BLEED_SLICES)))
            r = radius()
            c = centre(ks, math.ceil(r))
            if c is not None and len(ks) == CONTEXT_BLEED_SLICES:
                for k in ks:
                    masks["intraparenchymal"][k] |= paint(k, c[0], c[1], r)
                used.update(range(ks[0] - 2, ks[-1] + 3))
                break
        else:  # pragma: no cover - brain always has room mid-series
            raise RuntimeError("could not place a thin bleed")
    placed = 0
    for _ in range(50):
        if placed == CONTEXT_MIMICS:
            break
        k = int(rng.integers(lo, hi))
        if k in used:
            continue
        r = radius()
        c = centre([k], math.ceil(r))
        if c is None:
            continue
        paint(k, c[0], c[1], r)
        used.update(range(k - 2, k + 3))
        placed += 1
    out = np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int16)
    subtypes = vol.subtypes | ({"intraparenchymal"} if bleed else set())
    return PhantomVolume(
        hu=out,
        masks=masks,
        tissue=vol.tissue,
        pixel_spacing_mm=vol.pixel_spacing_mm,
        slice_spacing_mm=vol.slice_spacing_mm,
        tilt_deg=vol.tilt_deg,
        subtypes=frozenset(subtypes),
    )


# --------------------------------------------------------------------------- DICOM


def _uid(*parts: object) -> str:
    """A ``2.25.`` UID that is a pure function of ``parts``.

    PS3.5 B.2: ``2.25.`` followed by a UUID as a decimal integer; here a name-based
    (SHA-1, version 5) UUID of the parts. pydicom's ``generate_uid(prefix=None)``
    ignores ``entropy_srcs`` and returns a random UUID, so it cannot be used.
    """
    name = "/".join(map(str, (_UID_TAG, *parts)))
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _rsna_id(*parts: object) -> str:
    """RSNA-style image id: ``ID_`` + 9 lowercase hex digits, a function of ``parts``."""
    digest = hashlib.sha256("/".join(map(str, (_UID_TAG, *parts))).encode()).hexdigest()
    return f"ID_{digest[:9]}"


def _ds(value: float) -> str:
    """A DS string of at most 16 characters (PS3.5 6.2)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text[:16]


def _slice_dataset(
    *,
    vol: PhantomVolume,
    geo: _Geometry,
    k: int,
    instance_number: int,
    sop_uid: str,
    common: dict[str, object],
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ICHNODE_PHANTOM"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    # CT Image IOD (PS3.3 A.3): the original axial reconstruction of an acquisition.
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    for key, value in common.items():
        setattr(ds, key, value)
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = 1
    pos = geo.position(k)
    ds.ImagePositionPatient = [_ds(v) for v in pos]
    ds.ImageOrientationPatient = [_ds(v) for v in (*geo.row_dir, *geo.col_dir)]
    # SliceLocation is the table position of the slice centre, as GE writes it.
    ds.SliceLocation = _ds(float(geo.z_centres[k]))
    ds.PixelSpacing = [_ds(geo.pixel_spacing), _ds(geo.pixel_spacing)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = geo.matrix
    # 12 of 16 bits, unsigned, stored = HU + 1024 (PS3.3 C.11.1.1.2 rescale to HU).
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.WindowCenterWidthExplanation = "BRAIN"
    stored = (vol.hu[k].astype(np.int32) + 1024).astype("<u2")
    ds.PixelData = stored.tobytes()
    return ds


def write_series(
    out_dir: Path,
    *,
    seed: int,
    subtypes: Iterable[str] = (),
    n_slices: int = 28,
    matrix: int = 512,
    tilt_deg: float = 0.0,
    file_names: Literal["instance", "rsna"] = "instance",
    shuffle_instance_numbers: bool = False,
    taken_ids: set[str] | None = None,
    context_bleed: bool | None = None,
    support: bool = False,
) -> PhantomSeries:
    """Write one phantom study (one axial CT series) as DICOM files.

    Parameters
    ----------
    out_dir : pathlib.Path
        Folder for the files (created).
    seed : int
        Seeds the anatomy, lesions, noise and all UIDs: the same arguments give
        byte-identical files.
    subtypes : iterable of str
        Hemorrhage subtypes to draw (empty: a negative study).
    n_slices, matrix, tilt_deg
        As in :func:`make_volume`.
    file_names : {"instance", "rsna"}
        ``IM_0001.dcm``... (by InstanceNumber) or ``ID_<9 hex>.dcm`` as in RSNA 2019.
    shuffle_instance_numbers : bool
        Give InstanceNumbers in a random order, unrelated to position, to check that a
        reader orders slices by position.
    taken_ids : set of str, optional
        With ``file_names="rsna"``: image ids already used in ``out_dir``, updated in
        place. 9 hex digits collide (birthday bound) in large datasets; a taken id is
        re-derived with a counter, deterministically for a given writing order.
    context_bleed : bool or None
        ``None``: an ordinary phantom. ``False`` / ``True``: a context phantom
        (:func:`add_context_foci`) without / with a thin bleed; give no ``subtypes``.
    support : bool
        Draw the head holder and table (:func:`make_volume`); the series gets other
        UIDs than the same seed without them.

    Returns
    -------
    PhantomSeries
        UIDs, the paths in spatial order (inferior -> superior) and the volume.
    """
    if not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if file_names not in ("instance", "rsna"):
        raise ValueError(f"file_names must be 'instance' or 'rsna', got {file_names!r}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed!r}")
    wanted = tuple(dict.fromkeys(subtypes))
    rng = np.random.default_rng(seed)
    vol = make_volume(
        rng, subtypes=wanted, n_slices=n_slices, matrix=matrix, tilt_deg=tilt_deg, support=support
    )
    geo = _geometry(n_slices, matrix, tilt_deg)
    key: tuple[object, ...] = (seed, ",".join(sorted(wanted)), n_slices, matrix, _ds(tilt_deg))
    if support:  # other pixels, so other UIDs than the same seed without the support
        key = (*key, "support")
    if context_bleed is not None:  # other UIDs than the ordinary phantom of this seed
        vol = add_context_foci(vol, np.random.default_rng([seed, 3]), bleed=context_bleed)
        key = (*key, f"context-{int(context_bleed)}")
    study_uid = _uid("study", *key)
    series_uid = _uid("series", *key)
    frame_uid = _uid("frame", *key)

    meta_rng = np.random.default_rng([seed, 1])
    day = dt.date(2024, 1, 1) + dt.timedelta(days=int(meta_rng.integers(0, 365)))
    secs = int(meta_rng.integers(7 * 3600, 23 * 3600))
    birth = dt.date(int(meta_rng.integers(1930, 2005)), int(meta_rng.integers(1, 13)), 1)
    patient_id = f"PHANTOM-{seed:010d}"  # LO: up to 64 characters
    common: dict[str, object] = {
        "StudyDate": day.strftime("%Y%m%d"),
        "SeriesDate": day.strftime("%Y%m%d"),
        "AcquisitionDate": day.strftime("%Y%m%d"),
        "ContentDate": day.strftime("%Y%m%d"),
        "StudyTime": f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
        "SeriesTime": f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
        "AcquisitionTime": f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
        "ContentTime": f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
        "AccessionNumber": f"PH{seed % 10**12:012d}",
        "Modality": "CT",
        "Manufacturer": "ich-node phantom",
        "ManufacturerModelName": "synthetic head CT",
        "InstitutionName": "ich-node synthetic data",
        "StationName": "PHANTOM",
        "ReferringPhysicianName": "",
        "StudyDescription": "CT HEAD WO CONTRAST",
        "SeriesDescription": "AXIAL 5mm BRAIN",
        "PatientName": f"PHANTOM^{seed % 10000:04d}",
        "PatientID": patient_id,
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": str(meta_rng.choice(["F", "M", "O"])),
        # Nobody to identify: the patient is synthetic (PS3.3 C.7.1.1 requires the method).
        "PatientIdentityRemoved": "YES",
        "DeidentificationMethod": "synthetic phantom, no patient data",
        "BodyPartExamined": "HEAD",
        "SliceThickness": _ds(geo.slice_spacing),
        "KVP": "120",
        "DataCollectionDiameter": "320",
        "ReconstructionDiameter": _ds(FOV_MM),
        "GantryDetectorTilt": _ds(tilt_deg),
        "TableHeight": "150",
        "RotationDirection": "CW",
        "ExposureTime": "1000",
        "XRayTubeCurrent": "250",
        "Exposure": "250",
        "ConvolutionKernel": "STANDARD",
        "PatientPosition": "HFS",
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "StudyID": f"{seed % 10**8}",
        "SeriesNumber": 2,
        "FrameOfReferenceUID": frame_uid,
        "PositionReferenceIndicator": "",
        "ImagesInAcquisition": n_slices,
    }
    # InstanceNumber runs superior -> inferior? Scanners differ; we number from the
    # first acquired (inferior) slice, or shuffle on request.
    numbers = np.arange(1, n_slices + 1)
    if shuffle_instance_numbers:
        numbers = np.random.default_rng([seed, 2]).permutation(numbers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    sops: list[str] = []
    for k in range(n_slices):
        sop = _uid("sop", *key, k)
        ds = _slice_dataset(
            vol=vol, geo=geo, k=k, instance_number=int(numbers[k]), sop_uid=sop, common=common
        )
        if file_names == "instance":
            name = f"IM_{int(numbers[k]):04d}.dcm"
        else:
            taken = taken_ids if taken_ids is not None else set()
            image_id, salt = _rsna_id(*key, k), 0
            while image_id in taken:
                salt += 1
                image_id = _rsna_id(*key, k, salt)
            taken.add(image_id)
            name = image_id + ".dcm"
        path = out_dir / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(sop)
    log.debug(
        "phantom.series_written",
        series_uid=series_uid,
        n_slices=n_slices,
        subtypes=sorted(vol.subtypes),
        tilt_deg=tilt_deg,
    )
    return PhantomSeries(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        patient_id=patient_id,
        paths=tuple(paths),
        sop_instance_uids=tuple(sops),
        volume=vol,
    )


def _study_plan(n_studies: int, rng: np.random.Generator) -> list[tuple[tuple[str, ...], bool]]:
    """Subtypes and tilt of each study: ~40% negative, ~40% of positives multi-subtype,
    every subtype in turn as the main one, ~1 in 4 series tilted."""
    n_neg = round(0.4 * n_studies)
    n_pos = n_studies - n_neg
    n_multi = round(0.4 * n_pos)
    order = rng.permutation(len(SUBTYPE_NAMES))
    plan: list[tuple[str, ...]] = [()] * n_neg
    for j in range(n_pos):
        main = SUBTYPE_NAMES[int(order[j % len(order)])]
        chosen = [main]
        if j < n_multi:
            others = [s for s in SUBTYPE_NAMES if s != main]
            extra = int(rng.integers(1, 3))
            chosen += [str(s) for s in rng.choice(others, size=extra, replace=False)]
        plan.append(tuple(sorted(chosen, key=SUBTYPE_NAMES.index)))
    perm = rng.permutation(n_studies)
    tilted = set(rng.permutation(n_studies)[: round(n_studies / 4)].tolist())
    return [(plan[int(i)], j in tilted) for j, i in enumerate(perm)]


def write_dataset(
    out: Path,
    n_studies: int,
    seed: int = 0,
    *,
    n_slices: int | tuple[int, int] = (24, 32),
    matrix: int = 512,
    progress: Callable[[int, int], None] | None = None,
    context: bool = False,
) -> DatasetSummary:
    """Write ``n_studies`` phantom studies in the RSNA 2019 layout.

    Writes ``out/images/ID_<9 hex>.dcm``, ``out/stage_2_train.csv`` (header ``ID,Label``,
    six rows ``ID_<id>_<subtype>,<0|1>`` per image in :data:`ich_node.labels.RSNA_ORDER`)
    and ``out/phantom_truth.csv`` (one row per series with its series-level labels).

    Parameters
    ----------
    out : pathlib.Path
        Dataset root (created).
    n_studies : int
        Number of studies (one series each).
    seed : int
        Seeds the whole dataset.
    n_slices : int or (int, int)
        Slices per series, or an inclusive range drawn per study.
    matrix : int
        Rows = columns of every image.
    progress : callable, optional
        Called as ``progress(done, total)`` after each study.
    context : bool
        Write **context phantoms** (:func:`add_context_foci`) instead: half of the
        studies have one thin intraparenchymal bleed over 3 slices, every study has
        single-slice mimics of it, no other lesions and no tilt. Per slice the
        labels can only be told from the neighbours. ``False`` (the default) writes
        the ordinary phantoms, unchanged.

    Returns
    -------
    DatasetSummary
        Counts of what was written.
    """
    if not isinstance(n_studies, int) or n_studies < 1:
        raise ValueError(f"n_studies must be a positive int, got {n_studies!r}")
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0x1C4])
    plan = _study_plan(n_studies, rng)
    bleeds: list[bool | None] = [None] * n_studies
    if context:
        order = rng.permutation(n_studies)
        bleeds = [bool(order[i] < (n_studies + 1) // 2) for i in range(n_studies)]
        plan = [((), False)] * n_studies
    label_counts = dict.fromkeys(LABELS, 0)
    n_images = n_positive = 0
    truth_rows: list[list[object]] = []
    taken_ids: set[str] = set()
    csv_path = out / "stage_2_train.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["ID", "Label"])
        for i, (subtypes, tilted) in enumerate(plan):
            study_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            if isinstance(n_slices, int):
                s = n_slices
            else:
                s = int(rng.integers(n_slices[0], n_slices[1] + 1))
            tilt = float(np.round(rng.uniform(12.0, 22.0) * 2) / 2) if tilted else 0.0
            series = write_series(
                images,
                seed=study_seed,
                subtypes=subtypes,
                n_slices=s,
                matrix=matrix,
                tilt_deg=tilt,
                file_names="rsna",
                taken_ids=taken_ids,
                context_bleed=bleeds[i],
            )
            labels = series.volume.slice_labels()
            for path, row in zip(series.paths, labels, strict=True):
                image_id = path.stem
                by_name = dict(zip(LABELS, row.tolist(), strict=True))
                for name in RSNA_ORDER:
                    writer.writerow([f"{image_id}_{name}", by_name[name]])
            for j, name in enumerate(LABELS):
                label_counts[name] += int(labels[:, j].sum())
            series_truth = labels.max(axis=0)
            n_images += len(series.paths)
            n_positive += int(series_truth[0])
            truth_rows.append(
                [
                    series.study_instance_uid,
                    series.series_instance_uid,
                    series.patient_id,
                    s,
                    _ds(tilt),
                    *series_truth.tolist(),
                ]
            )
            if progress is not None:
                progress(i + 1, n_studies)
    with (out / "phantom_truth.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(
            [
                "study_instance_uid",
                "series_instance_uid",
                "patient_id",
                "n_slices",
                "tilt_deg",
                *LABELS,
            ]
        )
        writer.writerows(truth_rows)
    log.info(
        "phantom.dataset_written",
        n_studies=n_studies,
        n_images=n_images,
        n_positive_studies=n_positive,
    )
    return DatasetSummary(
        out=out,
        n_studies=n_studies,
        n_images=n_images,
        n_positive_studies=n_positive,
        label_counts=label_counts,
    )
