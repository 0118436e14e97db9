"""RSNA 2019 layout: labels CSV, header index, patient-level split, slice dataset.

The same code reads the real RSNA 2019 Intracranial Hemorrhage data
(``stage_2_train.csv`` + a folder of ``ID_<image>.dcm``) and the phantoms of
:mod:`training.phantom`, which are written in that layout.

Pixels always go through :func:`ich_node.imaging.load_hu` and
:func:`ich_node.imaging.preprocess_hu`, the node's own preprocessing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
import structlog
import torch
from torch.utils.data import Dataset, Sampler

from ich_node.imaging import (
    ImagingError,
    StorageUnavailable,
    Window,
    add_slice_context,
    load_hu,
    preprocess_hu,
    slice_position_mm,
    unit_normal,
)
from ich_node.labels import LABELS, RSNA_ORDER

log = structlog.get_logger(__name__)

#: Images of RSNA 2019 known to be unusable (ID_6431af929: corrupt pixel data).
KNOWN_CORRUPT: Final[frozenset[str]] = frozenset({"ID_6431af929"})
#: Manufacturer (0008,0070) written by :mod:`training.phantom`.
PHANTOM_MANUFACTURER: Final[str] = "ich-node phantom"
#: Bumped when the index columns change, so old caches are not reused.
_INDEX_VERSION: Final[int] = 2  # 2: positions along the superior-pointing normal


class DataError(ValueError):
    """Training data that cannot be used; the message names the file or ID."""


# ---------------------------------------------------------------- labels CSV


def read_labels(path: Path) -> dict[str, np.ndarray]:
    """Read an RSNA ``stage_2_train.csv``.

    Parameters
    ----------
    path : pathlib.Path
        CSV with header ``ID,Label`` and rows ``ID_<image>_<subtype>,<0|1>``
        (subtype one of :data:`ich_node.labels.RSNA_ORDER`).

    Returns
    -------
    dict of str to numpy.ndarray
        ``ID_<image>`` -> (6,) uint8 labels in :data:`ich_node.labels.LABELS` order.
        Sorted by image ID.

    Raises
    ------
    DataError
        Bad header or row, a duplicate row whose label conflicts with an earlier
        one (the message names the ID), or an image missing one of the six rows.
        Identical duplicate rows (the real file has them) are dropped.
    """
    path = Path(path)
    column = {name: i for i, name in enumerate(LABELS)}
    found: dict[str, np.ndarray] = {}
    duplicates = 0
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ID", "Label"]:
            raise DataError(f"{path}: the header must be 'ID,Label', got {header!r}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{line}: expected 'ID_<image>_<subtype>,<label>': {row!r}")
            key, value = row[0].strip(), row[1].strip()
            image, _, subtype = key.rpartition("_")
            if subtype not in column or not image.startswith("ID_"):
                raise DataError(f"{path}:{line}: cannot parse the ID {key!r}")
            if value not in ("0", "1"):
                raise DataError(f"{path}:{line}: {key}: label must be 0 or 1, got {value!r}")
            labels = found.get(image)
            if labels is None:
                labels = found[image] = np.full(len(LABELS), 255, dtype=np.uint8)
            j = column[subtype]
            if labels[j] != 255:
                if labels[j] != int(value):
                    raise DataError(
                        f"{path}:{line}: {key} is listed twice with different labels "
                        f"({labels[j]} and {value})"
                    )
                duplicates += 1
                continue
            labels[j] = int(value)
    for image, labels in found.items():
        if (labels == 255).any():
            missing = [LABELS[j] for j in np.flatnonzero(labels == 255)]
            raise DataError(f"{path}: {image} has no row for {missing}")
    if duplicates:
        log.warning("data.duplicate_rows", csv=str(path), dropped=duplicates)
    if not found:
        raise DataError(f"{path}: no labels")
    assert set(RSNA_ORDER) == set(LABELS)
    return dict(sorted(found.items()))


def write_labels(path: Path, labels: dict[str, np.ndarray]) -> None:
    """Write ``labels`` (as from :func:`read_labels`) in the RSNA layout."""
    with Path(path).open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["ID", "Label"])
        for image, row in labels.items():
            for name in RSNA_ORDER:
                out.writerow([f"{image}_{name}", int(row[LABELS.index(name)])])


# ---------------------------------------------------------------------- index


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One labelled slice of the index.

    Attributes
    ----------
    image_id : str
        ``ID_<image>``.
    path : pathlib.Path
        The DICOM file.
    patient_id, study_uid, series_uid : str
        From the header; the split is by ``patient_id``.
    position_mm : float
        ``ImagePositionPatient · normal`` in mm (NaN when the header lacks it).
    phantom : bool
        Manufacturer is :data:`PHANTOM_MANUFACTURER`.
    labels : tuple of 6 int
        0/1 in :data:`ich_node.labels.LABELS` order.
    """

    image_id: str
    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    position_mm: float
    phantom: bool
    labels: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DataIndex:
    """The usable labelled images, and the ones left out with the reason."""

    records: tuple[ImageRecord, ...]
    skipped: tuple[tuple[str, str], ...]

    @property
    def labels(self) -> np.ndarray:
        """(N, 6) float32 0/1 labels."""
        return np.asarray([r.labels for r in self.records], dtype=np.float32).reshape(-1, 6)

    def subset(self, indices: Iterable[int]) -> DataIndex:
        return replace(self, records=tuple(self.records[i] for i in indices))


_COLUMNS: Final = ("image_id", "path", "patient_id", "study_uid", "series_uid", "position_mm",
                   "phantom")  # fmt: skip


def _header_row(path: Path) -> tuple[str, str, str, str, float, bool] | str:
    """(patient, study, series, position, phantom) from the header, or the reason it failed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RSNA's IDs are not valid UIDs
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            patient = str(ds.get("PatientID", "") or "")
            study = str(ds.get("StudyInstanceUID", "") or "")
            series = str(ds.get("SeriesInstanceUID", "") or "")
            manufacturer = str(ds.get("Manufacturer", "") or "")
            ipp = ds.get("ImagePositionPatient")
            iop = ds.get("ImageOrientationPatient")
    except Exception as exc:  # pydicom raises many types on damaged files
        return f"unreadable header ({type(exc).__name__}: {exc})"
    if not series or not study:
        return "no Study/Series Instance UID"
    position = math.nan
    try:  # the node's one definition of slice order (ich_node.imaging.slice_position_mm)
        if ipp is not None and iop is not None:
            normal = unit_normal([float(v) for v in iop])
            position = slice_position_mm([float(v) for v in ipp], normal)
    except (TypeError, ValueError, IndexError):
        position = math.nan
    # A study without PatientID is its own patient: never merge strangers.
    return (
        patient or f"study:{study}",
        study,
        series,
        position,
        manufacturer == PHANTOM_MANUFACTURER,
    )


def _fingerprint(labels_csv: Path, files: Sequence[Path]) -> str:
    digest = hashlib.sha256(f"v{_INDEX_VERSION}".encode())
    for p in (labels_csv, *files):
        st = p.stat()
        digest.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def build_index(
    images: Path,
    labels_csv: Path,
    *,
    cache_dir: Path | None = None,
    workers: int = 0,
) -> DataIndex:
    """Index the labelled images by reading their headers once (no pixels).

    Parameters
    ----------
    images : pathlib.Path
        Folder of ``ID_<image>.dcm`` files.
    labels_csv : pathlib.Path
        ``stage_2_train.csv``-style labels (:func:`read_labels`).
    cache_dir : pathlib.Path or None
        Where ``index-<fingerprint>.json`` is kept; the fingerprint covers the
        CSV and every file's name, size and mtime, so any change re-indexes.
    workers : int
        Processes reading headers (0: in this process).

    Returns
    -------
    DataIndex
        Records sorted by (patient, study, series, position, image ID). Images in
        the CSV without a file, known corrupt images (:data:`KNOWN_CORRUPT`) and
        unreadable headers are in ``skipped`` with the reason, and logged.
    """
    images, labels_csv = Path(images), Path(labels_csv)
    if not images.is_dir():
        raise DataError(f"--images {images}: no such folder")
    if not labels_csv.is_file():
        raise DataError(f"--labels {labels_csv}: no such file")
    labels = read_labels(labels_csv)
    files = {p.stem: p for p in images.glob("ID_*.dcm")}
    wanted = [files[i] for i in labels if i in files]
    cache: Path | None = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"index-{_fingerprint(labels_csv, wanted)}.json"
        if cache.is_file():
            index = _read_index(cache, images, labels)
            log.info("data.index_cached", cache=str(cache), images=len(index.records))
            return index

    skipped: list[tuple[str, str]] = []
    todo: list[Path] = []
    for image_id in labels:
        if image_id in KNOWN_CORRUPT:
            skipped.append((image_id, "known corrupt image in RSNA 2019"))
        elif image_id not in files:
            skipped.append((image_id, "no file"))
        else:
            todo.append(files[image_id])
    if workers > 0 and len(todo) > 256:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_header_row, todo, chunksize=256))
    else:
        rows = [_header_row(p) for p in todo]
    records: list[ImageRecord] = []
    for path, row in zip(todo, rows, strict=True):
        if isinstance(row, str):
            skipped.append((path.stem, row))
            continue
        patient, study, series, position, phantom = row
        lab = tuple(int(v) for v in labels[path.stem])
        records.append(ImageRecord(path.stem, path, patient, study, series, position, phantom, lab))
    records.sort(key=lambda r: (r.patient_id, r.study_uid, r.series_uid, r.position_mm, r.image_id))
    for image_id, reason in skipped:
        log.warning("data.skipped_image", image=image_id, reason=reason)
    if not records:
        raise DataError(f"{images}: none of the {len(labels)} labelled images is usable")
    index = DataIndex(tuple(records), tuple(skipped))
    if cache is not None:
        _write_index(cache, index, images)
    return index


def _write_index(path: Path, index: DataIndex, images: Path) -> None:
    rows = [
        [r.image_id, r.path.name, r.patient_id, r.study_uid, r.series_uid,
         None if math.isnan(r.position_mm) else r.position_mm, r.phantom]
        for r in index.records
    ]  # fmt: skip
    data = {"version": _INDEX_VERSION, "columns": _COLUMNS, "rows": rows,
            "skipped": index.skipped}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # atomic: several ranks may race to write the same index


def _read_index(path: Path, images: Path, labels: dict[str, np.ndarray]) -> DataIndex:
    data = json.loads(path.read_text())
    records = tuple(
        ImageRecord(i, images / name, pat, study, series,
                    math.nan if pos is None else float(pos), bool(ph),
                    tuple(int(v) for v in labels[i]))
        for i, name, pat, study, series, pos, ph in data["rows"]
    )  # fmt: skip
    return DataIndex(records, tuple((a, b) for a, b in data["skipped"]))


# ---------------------------------------------------------------------- split


@dataclass(frozen=True, slots=True)
class Split:
    """Train/validation indices into a :class:`DataIndex`, by patient."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    train_patients: tuple[str, ...]
    val_patients: tuple[str, ...]
    excluded_studies: tuple[str, ...]

    def describe(self, index: DataIndex) -> dict[str, object]:
        """Summary for the model card and ``split.json``."""

        def studies(ids: Sequence[int]) -> int:
            return len({index.records[i].study_uid for i in ids})

        return {
            "unit": "patient",
            "train": {"patients": len(self.train_patients), "studies": studies(self.train),
                      "images": len(self.train)},
            "val": {"patients": len(self.val_patients), "studies": studies(self.val),
                    "images": len(self.val)},
            "excluded_studies": len(self.excluded_studies),
        }  # fmt: skip


def read_study_list(path: Path) -> frozenset[str]:
    """StudyInstanceUIDs, one per line; blank lines and ``#`` comments ignored."""
    text = Path(path).read_text()
    return frozenset(
        s.split("#", 1)[0].strip() for s in text.splitlines() if s.split("#", 1)[0].strip()
    )


def split_by_patient(
    index: DataIndex,
    *,
    val_fraction: float,
    seed: int,
    exclude_studies: Iterable[str] = (),
) -> Split:
    """Split patients (never images) into train and validation, reproducibly.

    Patients are sorted, shuffled with ``numpy.random.default_rng(seed)``, and
    the first ``round(val_fraction * n_patients)`` (at least 1 when
    ``0 < val_fraction`` and there are two or more patients) go to validation.
    Images of the excluded studies (e.g. a held-out test set) are in neither split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    excluded = frozenset(exclude_studies)
    keep = [i for i, r in enumerate(index.records) if r.study_uid not in excluded]
    patients = sorted({index.records[i].patient_id for i in keep})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_val = round(val_fraction * len(patients))
    if val_fraction > 0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    val_patients = frozenset(patients[j] for j in order[:n_val])
    train = tuple(i for i in keep if index.records[i].patient_id not in val_patients)
    val = tuple(i for i in keep if index.records[i].patient_id in val_patients)
    return Split(
        train=train,
        val=val,
        train_patients=tuple(sorted(set(patients) - val_patients)),
        val_patients=tuple(sorted(val_patients)),
        excluded_studies=tuple(sorted(excluded & {r.study_uid for r in index.records})),
    )


# -------------------------------------------------------------------- dataset


@dataclass(frozen=True, slots=True)
class Augment:
    """Random, CT-suited augmentation; all ranges are symmetric around no change.

    Attributes
    ----------
    hflip : float
        Probability of a left-right flip.
    rotate_deg : float
        Rotation drawn from U(-rotate_deg, rotate_deg), degrees.
    scale : float
        Zoom factor drawn from U(1 - scale, 1 + scale).
    translate : float
        Shift drawn from U(-translate, translate) in fractions of the image side.
    window_center_hu : float
        Each window's center moves by U(-window_center_hu, window_center_hu) HU.
    window_width : float
        Each window's width is multiplied by U(1 - window_width, 1 + window_width).
    """

    hflip: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    window_center_hu: float = 0.0
    window_width: float = 0.0

    @property
    def jitters_windows(self) -> bool:
        return self.window_center_hu > 0 or self.window_width > 0


def jitter_windows(windows: Sequence[Window], aug: Augment, rng: np.random.Generator) -> tuple[
        Window, ...]:  # fmt: skip
    """Windows with jittered centers and widths (the windowing itself stays shared)."""
    out = []
    for w in windows:
        dc = rng.uniform(-aug.window_center_hu, aug.window_center_hu)
        fw = rng.uniform(1 - aug.window_width, 1 + aug.window_width)
        out.append(Window(w.name, w.center + dc, max(w.width * fw, 1.0)))
    return tuple(out)


def affine_augment(image: torch.Tensor, aug: Augment, rng: np.random.Generator) -> torch.Tensor:
    """Flip, rotate, scale and shift one (3, H, W) float32 image in [0, 1].

    Uses ``affine_grid``/``grid_sample`` (bilinear, zero padding: outside the
    field of view is 0, i.e. below every window, like air).
    """
    flip = rng.random() < aug.hflip
    angle = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    zoom = rng.uniform(1 - aug.scale, 1 + aug.scale)
    tx, ty = rng.uniform(-aug.translate, aug.translate, size=2) * 2  # grid units span 2
    if flip:
        image = image.flip(-1)
    if angle == 0 and zoom == 1 and tx == 0 and ty == 0:
        return image
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=image.dtype)[None]
    grid = torch.nn.functional.affine_grid(theta, [1, *image.shape], align_corners=False)
    out = torch.nn.functional.grid_sample(
        image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out[0].clamp_(0.0, 1.0)


class SliceDataset(Dataset):
    """Labelled slices as model input.

    ``dataset[i]`` is ``(image, labels, i)``: image (3, size, size) float32 in
    [0, 1] from ``preprocess_hu(load_hu(path, reorient=True)[None], windows, size)[0]``, labels
    (6,) float32 in :data:`ich_node.labels.LABELS` order. An image that cannot be
    decoded gives ``None`` (logged); :func:`collate_skip_none` drops it.

    Augmentation is seeded by ``(seed, epoch, i)``: the same sample gets the same
    transform whatever the process, worker or rank, so runs are reproducible,
    resumable and identical under DDP.

    Parameters
    ----------
    records : sequence of ImageRecord
    windows : sequence of Window
        The bundle's windows.
    size : int
        Output side, pixels.
    augment : Augment or None
        None for validation.
    seed : int
    cache_dir : pathlib.Path or None
        Preprocessed slices (uint8, ``round(255 * x)``) are kept there as
        ``.npy`` and reused. Window jitter needs the HU, so with jitter the
        cache is not used for training.
    context : int
        2.5D slice context: the image gets ``2 x context`` more channels, the brain
        window of the ``context`` neighbours on each side in the same series
        (records are in spatial order within a series, as :func:`build_index`
        sorts them), built by :func:`ich_node.imaging.add_slice_context`, the
        node's own function; at a series' ends the slice itself stands in.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        windows: Sequence[Window],
        size: int,
        *,
        augment: Augment | None = None,
        seed: int = 0,
        cache_dir: Path | None = None,
        context: int = 0,
    ) -> None:
        self.records = tuple(records)
        self.context = context
        # [first, end) of each record's series run within ``records``
        self._run: list[tuple[int, int]] = []
        start = 0
        for i in range(1, len(self.records) + 1):
            if (
                i == len(self.records)
                or self.records[i].series_uid != self.records[start].series_uid
            ):
                self._run.extend([(start, i)] * (i - start))
                start = i
        self.windows = tuple(windows)
        self.size = size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.cache = None
        if cache_dir is not None and not (augment is not None and augment.jitters_windows):
            self.cache = Path(cache_dir) / preprocess_key(self.windows, size)
            self.cache.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, i: int, windows: Sequence[Window] | None = None) -> np.ndarray:
        """(3, size, size) float32 in [0, 1]; raises ImagingError when undecodable."""
        record = self.records[i]
        if windows is None and self.cache is not None:
            path = self.cache / f"{record.image_id}.npy"
            try:
                return np.load(path).astype(np.float32) / 255.0
            except (OSError, ValueError):
                pass
            image = preprocess_hu(
                load_hu(record.path, reorient=True)[None], self.windows, self.size
            )[0]
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, np.round(image * 255).astype(np.uint8))
            tmp.replace(path)
            return np.round(image * 255) / 255.0
        return preprocess_hu(
            load_hu(record.path, reorient=True)[None], windows or self.windows, self.size
        )[0]

    def load_with_context(self, i: int, windows: Sequence[Window] | None = None) -> np.ndarray:
        """(3 + 2 x context, size, size) float32 in [0, 1]: the slice and its neighbours."""
        if self.context == 0:
            return self.load(i, windows)
        first, end = self._run[i]
        lo, hi = max(first, i - self.context), min(end, i + self.context + 1)
        stack = np.stack([self.load(j, windows) for j in range(lo, hi)])
        return add_slice_context(stack, self.context)[i - lo]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        record = self.records[i]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.augment else None
        windows = None
        if self.augment is not None and self.augment.jitters_windows:
            assert rng is not None
            windows = jitter_windows(self.windows, self.augment, rng)
        try:
            array = self.load_with_context(i, windows)
        except (ImagingError, StorageUnavailable) as exc:  # left out of the batch, logged
            log.warning("data.undecodable_image", image=record.image_id, reason=str(exc))
            return None
        image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if self.augment is not None:
            assert rng is not None
            image = affine_augment(image, self.augment, rng)
        return image, torch.tensor(record.labels, dtype=torch.float32), i


def preprocess_key(windows: Sequence[Window], size: int) -> str:
    """Name of the cache folder for one (windows, size) preprocessing."""
    text = json.dumps([[w.name, w.center, w.width] for w in windows] + [size])
    return f"pre-{size}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def collate_skip_none(
    batch: list[tuple[torch.Tensor, torch.Tensor, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack a batch, leaving out undecodable images (``None``)."""
    items = [b for b in batch if b is not None]
    if not items:
        return (
            torch.empty(0, 3, 1, 1),
            torch.empty(0, len(LABELS)),
            torch.empty(0, dtype=torch.long),
        )
    images, labels, idx = zip(*items, strict=True)
    return torch.stack(images), torch.stack(labels), torch.tensor(idx, dtype=torch.long)


class BlockShardSampler(Sampler[int]):
    """Shuffled indices, sharded over ranks in blocks of one batch.

    Unlike ``DistributedSampler`` (which deals indices round-robin), rank ``r``
    takes batch blocks ``r, r + W, r + 2W, ...`` of one permutation. So ``W``
    ranks with batch ``b`` see at each step exactly the micro-batches one process
    sees with batch ``b`` and ``W`` accumulation steps: the two runs compute the
    same update (BatchNorm statistics included). The permutation depends on
    ``(seed, epoch)`` only; it is padded (by repeating its start) to a multiple of
    ``W``, and the last, short round is split evenly so every rank takes the same
    number of steps.
    """

    def __init__(
        self, n: int, *, batch_size: int, rank: int = 0, world_size: int = 1,
        shuffle: bool = True, seed: int = 0,
    ) -> None:  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.n, self.b, self.rank, self.world = n, batch_size, rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _mine(self) -> list[int]:
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
        else:
            perm = list(range(self.n))
        if self.world == 1:
            return perm
        pad = (-len(perm)) % self.world
        perm = perm + (perm * (pad // max(len(perm), 1) + 1))[:pad]
        round_size = self.b * self.world
        full = len(perm) // round_size * round_size
        mine: list[int] = []
        for start in range(0, full, round_size):
            offset = start + self.rank * self.b
            mine.extend(perm[offset : offset + self.b])
        rest = perm[full:]
        share = len(rest) // self.world
        mine.extend(rest[self.rank * share : (self.rank + 1) * share])
        return mine

    def __iter__(self) -> Iterator[int]:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


def shard(n: int, rank: int, world_size: int) -> range:
    """Contiguous, unpadded shard of ``range(n)`` for evaluation on ``world_size`` ranks."""
    per = math.ceil(n / world_size)
    return range(min(n, rank * per), min(n, (rank + 1) * per))
