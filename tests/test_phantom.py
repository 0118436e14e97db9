"""Tests of the synthetic head-CT phantoms: real DICOM files read back with pydicom."""

from __future__ import annotations

import csv
import math
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from ich_node.labels import LABELS, RSNA_ORDER
from tests.conftest import dcmtk
from training.phantom import (
    AIR,
    BONE,
    BRAIN_GM,
    BRAIN_WM,
    CISTERN,
    CSF_SULCI,
    CSF_VENTRICLE,
    DIPLOE,
    MIN_LESION_PIXELS,
    SCALP,
    SUBTYPE_NAMES,
    PhantomSeries,
    PhantomVolume,
    make_volume,
    write_dataset,
    write_series,
)


@pytest.fixture(scope="module")
def full_series(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    """One 512x512 study with all five subtypes (the size the node really receives)."""
    out = tmp_path_factory.mktemp("full")
    return write_series(out, seed=11, subtypes=SUBTYPE_NAMES, n_slices=20, matrix=512)


@pytest.fixture(scope="module")
def negative_series(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    out = tmp_path_factory.mktemp("negative")
    return write_series(out, seed=12, n_slices=16, matrix=256)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dataset")
    write_dataset(out, 10, seed=0, n_slices=(8, 10), matrix=160)
    return out


def _read_hu(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    return ds, hu


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary dilation of a (..., H, W) mask, ``steps`` pixels."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[..., 1:, :] |= out[..., :-1, :]
        grown[..., :-1, :] |= out[..., 1:, :]
        grown[..., :, 1:] |= out[..., :, :-1]
        grown[..., :, :-1] |= out[..., :, 1:]
        out = grown
    return out


def _volume(subtype: str, seed: int, **kw: object) -> PhantomVolume:
    return make_volume(np.random.default_rng(seed), subtypes=(subtype,), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- DICOM


def test_files_are_ct_images_with_realistic_tags(full_series: PhantomSeries) -> None:
    vol = full_series.volume
    assert len(full_series.paths) == 20 == vol.hu.shape[0]
    along_normal = []
    for k, path in enumerate(full_series.paths):
        ds, hu = _read_hu(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPInstanceUID == full_series.sop_instance_uids[k]
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert UID(uid).is_valid
        assert UID(ds.FrameOfReferenceUID).is_valid
        assert ds.StudyInstanceUID == full_series.study_instance_uid
        assert ds.SeriesInstanceUID == full_series.series_instance_uid
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
        assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.StudyDescription == "CT HEAD WO CONTRAST"
        assert ds.SeriesDescription == "AXIAL 5mm BRAIN"
        assert ds.Manufacturer == "ich-node phantom"
        assert str(ds.PatientName).startswith("PHANTOM^")
        assert ds.PatientID == full_series.patient_id and ds.PatientID.startswith("PHANTOM")
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 80.0)
        assert 0.4 < float(ds.PixelSpacing[0]) < 0.5
        assert float(ds.GantryDetectorTilt) == 0.0
        for keyword in ("KVP", "SliceThickness", "StudyDate", "StudyTime", "AccessionNumber",
                        "PatientBirthDate", "PatientSex", "SliceLocation", "PatientPosition"):  # fmt: skip
            assert keyword in ds, keyword
        assert ds.InstanceNumber == k + 1
        np.testing.assert_array_equal(hu, vol.hu[k])
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        along_normal.append(float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)))
    steps = np.diff(along_normal)
    assert np.allclose(steps, vol.slice_spacing_mm, atol=1e-3)  # inferior -> superior


def test_dciodvfy_finds_no_errors(negative_series: PhantomSeries) -> None:
    tool = dcmtk("dciodvfy")
    res = subprocess.run([tool, str(negative_series.paths[5])], capture_output=True, text=True)
    report = res.stdout + res.stderr
    assert "CTImage" in report
    assert "Error" not in report, report


def test_gantry_tilt_series_steps_along_the_table(tmp_path: Path) -> None:
    tilt = 18.5
    series = write_series(tmp_path, seed=3, n_slices=8, matrix=128, tilt_deg=tilt)
    t = math.radians(tilt)
    positions = []
    for path in series.paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert float(ds.GantryDetectorTilt) == tilt
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        np.testing.assert_allclose(iop, [1, 0, 0, 0, math.cos(t), -math.sin(t)], atol=1e-5)
        positions.append(np.array(ds.ImagePositionPatient, dtype=float))
    pos = np.array(positions)
    # As in real GE tilted series: x and y fixed, z stepped by spacing / cos(tilt).
    assert np.ptp(pos[:, 0]) < 1e-6 and np.ptp(pos[:, 1]) < 1e-6
    np.testing.assert_allclose(np.diff(pos[:, 2]), series.volume.slice_spacing_mm / math.cos(t))
    assert series.volume.tilt_deg == tilt


def test_real_ge_tilt_convention_matches(real_ct: Path, tmp_path: Path) -> None:
    ge = sorted((real_ct / "neurolabusc+dcm_qa_ct" / "In" / "GE").glob("*.dcm"))
    if not ge:
        pytest.skip("GE tilted series not present")
    real = pydicom.dcmread(ge[0], stop_before_pixels=True)
    tilt = float(real.GantryDetectorTilt)
    ours = write_series(tmp_path, seed=1, n_slices=4, matrix=64, tilt_deg=tilt)
    mine = pydicom.dcmread(ours.paths[0], stop_before_pixels=True)
    np.testing.assert_allclose(
        np.array(mine.ImageOrientationPatient, dtype=float),
        np.array(real.ImageOrientationPatient, dtype=float),
        atol=1e-5,
    )


def test_shuffled_instance_numbers_and_rsna_names(tmp_path: Path) -> None:
    series = write_series(
        tmp_path, seed=5, n_slices=10, matrix=64, file_names="rsna", shuffle_instance_numbers=True
    )
    numbers = [
        int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in series.paths
    ]
    assert sorted(numbers) == list(range(1, 11)) and numbers != sorted(numbers)
    for path in series.paths:
        assert path.name.startswith("ID_") and len(path.stem) == 12
        int(path.stem[3:], 16)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kw = {"subtypes": ("subdural", "intraparenchymal"), "n_slices": 8, "matrix": 128}
    a = write_series(tmp_path / "a", seed=21, **kw)  # type: ignore[arg-type]
    b = write_series(tmp_path / "b", seed=21, **kw)  # type: ignore[arg-type]
    c = write_series(tmp_path / "c", seed=22, **kw)  # type: ignore[arg-type]
    assert (a.study_instance_uid, a.series_instance_uid) == (
        b.study_instance_uid,
        b.series_instance_uid,
    )
    assert a.sop_instance_uids == b.sop_instance_uids
    for pa, pb in zip(a.paths, b.paths, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    assert c.study_instance_uid != a.study_instance_uid
    assert not set(c.sop_instance_uids) & set(a.sop_instance_uids)
    pixels_a = b"".join(pydicom.dcmread(p).PixelData for p in a.paths)
    pixels_c = b"".join(pydicom.dcmread(p).PixelData for p in c.paths)
    assert pixels_a != pixels_c


def test_invalid_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="subtype"):
        make_volume(np.random.default_rng(0), subtypes=("chronic",), matrix=64)
    with pytest.raises(TypeError, match="rng"):
        make_volume(0, matrix=64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="file_names"):
        write_series(tmp_path, seed=0, matrix=64, file_names="nope")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- anatomy


def test_tissue_hu_ranges_of_written_files(full_series: PhantomSeries) -> None:
    vol = full_series.volume
    hu = np.stack([_read_hu(p)[1] for p in full_series.paths])
    blood = np.zeros(hu.shape, dtype=bool)
    for mask in vol.masks.values():
        blood |= mask
    medians = {}
    for code, (lo, hi) in {
        AIR: (-1010, -990),
        SCALP: (20, 60),
        BONE: (700, 1500),
        DIPLOE: (300, 900),
        BRAIN_GM: (35, 45),
        BRAIN_WM: (20, 30),
        CSF_VENTRICLE: (0, 15),
        CSF_SULCI: (0, 15),
    }.items():
        sel = (vol.tissue == code) & ~_dilate(blood, 2)
        assert sel.sum() > 500, code
        medians[code] = float(np.median(hu[sel]))
        assert lo <= medians[code] <= hi, (code, medians[code])
    assert medians[BRAIN_GM] > medians[BRAIN_WM] > medians[CSF_VENTRICLE]
    assert medians[BONE] > medians[DIPLOE]
    noise = hu[:, :24, :24].std()  # air in the corners, far from any edge
    assert 3.0 < noise < 7.0


def test_head_shrinks_toward_vertex_and_has_cisterns(negative_series: PhantomSeries) -> None:
    vol = negative_series.volume
    head_area = (vol.tissue != AIR).sum(axis=(1, 2))
    widest = int(np.argmax(head_area))
    assert head_area[-1] < 0.6 * head_area[widest]
    cistern_slices = np.flatnonzero((vol.tissue == CISTERN).sum(axis=(1, 2)) > 50)
    ventricle_slices = np.flatnonzero((vol.tissue == CSF_VENTRICLE).sum(axis=(1, 2)) > 50)
    assert cistern_slices.size and ventricle_slices.size
    assert cistern_slices.min() < ventricle_slices.max()  # cisterns at the lower levels
    assert not any(m.any() for m in vol.masks.values())
    assert vol.slice_labels().sum() == 0
    # skull base denser than the vault
    bone = vol.tissue == BONE
    per_slice = [np.median(vol.hu[k][bone[k]]) for k in range(len(bone)) if bone[k].sum() > 100]
    assert per_slice[0] > per_slice[-1]


# --------------------------------------------------------------------------- lesions


def test_hemorrhage_hu_range(full_series: PhantomSeries) -> None:
    vol = full_series.volume
    assert vol.subtypes == frozenset(SUBTYPE_NAMES)
    for name in SUBTYPE_NAMES:
        mask = vol.masks[name]
        assert mask.sum() >= MIN_LESION_PIXELS, name
        assert 50 <= np.median(vol.hu[mask]) <= 90, name


@pytest.mark.parametrize("subtype", ["epidural", "subdural"])
def test_extra_axial_blood_lies_against_the_inner_table(subtype: str) -> None:
    for seed in range(3):
        vol = _volume(subtype, seed, n_slices=12, matrix=256)
        mask = vol.masks[subtype]
        bone = np.isin(vol.tissue, (BONE, DIPLOE))
        # outside the brain: the brain is pushed away, not overlapped
        assert not (mask & np.isin(vol.tissue, (BRAIN_GM, BRAIN_WM, CSF_VENTRICLE))).any()
        for k in np.flatnonzero(mask.sum(axis=(1, 2)) >= MIN_LESION_PIXELS):
            assert (mask[k] & _dilate(bone[k], 2)).any()  # touches the skull
        # and no deeper than its thickness (<= 17 mm, 19 px at 0.9 mm) from the skull
        assert not (mask & ~_dilate(bone, 20)).any()


def _shape_ratio(vol: PhantomVolume, subtype: str) -> float:
    """area / contact² on the largest slice: thick short lens high, long thin crescent low."""
    mask = vol.masks[subtype]
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    contact = (mask[k] & _dilate(np.isin(vol.tissue[k], (BONE, DIPLOE)), 2)).sum()
    return float(mask[k].sum() / contact**2)


def test_epidural_is_a_lens_subdural_a_long_crescent() -> None:
    edh = [
        _shape_ratio(_volume("epidural", s, n_slices=12, matrix=256), "epidural") for s in (0, 1)
    ]
    sdh = [
        _shape_ratio(_volume("subdural", s, n_slices=12, matrix=256), "subdural") for s in (0, 1)
    ]
    assert min(edh) > 1.4 * max(sdh)
    # the subdural covers a longer arc of the skull than the epidural
    e = _volume("epidural", 0, n_slices=12, matrix=256)
    s = _volume("subdural", 0, n_slices=12, matrix=256)
    assert (e.slice_labels()[:, 1] > 0).sum() < (s.slice_labels()[:, 5] > 0).sum()


def test_subarachnoid_blood_fills_sulci_and_cisterns() -> None:
    for seed in range(3):
        vol = _volume("subarachnoid", seed, n_slices=12, matrix=256)
        mask = vol.masks["subarachnoid"]
        assert mask.sum() >= MIN_LESION_PIXELS
        assert np.isin(vol.tissue[mask], (CSF_SULCI, CISTERN)).all()


def test_intraventricular_blood_is_inside_the_ventricles() -> None:
    for seed in range(3):
        vol = _volume("intraventricular", seed, n_slices=12, matrix=256)
        mask = vol.masks["intraventricular"]
        assert mask.sum() >= MIN_LESION_PIXELS
        assert (vol.tissue[mask] == CSF_VENTRICLE).all()


def test_intraparenchymal_clot_with_edema_rim_away_from_skull() -> None:
    for seed in range(3):
        vol = _volume("intraparenchymal", seed, n_slices=12, matrix=256)
        mask = vol.masks["intraparenchymal"]
        parenchyma = np.isin(vol.tissue, (BRAIN_GM, BRAIN_WM))
        assert parenchyma[mask].mean() > 0.9
        bone = np.isin(vol.tissue, (BONE, DIPLOE))
        assert not (mask & _dilate(bone, 5)).any()  # > 4 mm from the skull
        k = int(np.argmax(mask.sum(axis=(1, 2))))
        rows, cols = np.nonzero(mask[k])
        diameter_mm = max(np.ptp(rows), np.ptp(cols)) * vol.pixel_spacing_mm
        assert 12 <= diameter_mm <= 45
        rim = _dilate(mask, 2) & ~mask & parenchyma
        white = (vol.tissue == BRAIN_WM) & ~_dilate(mask, 12)
        rim_hu, wm_hu = np.median(vol.hu[rim]), np.median(vol.hu[white])
        assert 5 <= rim_hu < wm_hu, (rim_hu, wm_hu)
        assert np.median(vol.hu[mask & ~_dilate(~mask, 2)]) >= 55


def test_slice_labels_follow_the_masks(full_series: PhantomSeries) -> None:
    vol = full_series.volume
    labels = vol.slice_labels()
    assert labels.shape == (vol.hu.shape[0], 6) and labels.dtype == np.uint8
    for j, name in enumerate(LABELS[1:], start=1):
        counts = vol.masks[name].sum(axis=(1, 2))
        np.testing.assert_array_equal(labels[:, j], (counts >= MIN_LESION_PIXELS).astype(np.uint8))
        assert labels[:, j].any()
    np.testing.assert_array_equal(labels[:, 0], labels[:, 1:].max(axis=1))
    assert 0 < labels[:, 0].sum() < len(labels)  # not every slice is positive


# --------------------------------------------------------------------------- dataset


def _read_rsna_csv(out: Path) -> list[list[str]]:
    with (out / "stage_2_train.csv").open(newline="") as fh:
        return list(csv.reader(fh))


def test_dataset_rsna_layout(dataset: Path) -> None:
    rows = _read_rsna_csv(dataset)
    assert rows[0] == ["ID", "Label"]
    body = rows[1:]
    assert len(body) % 6 == 0
    images = sorted(p.stem for p in (dataset / "images").glob("ID_*.dcm"))
    assert len(body) == 6 * len(images)
    per_image: dict[str, dict[str, int]] = {}
    for i in range(0, len(body), 6):
        group = body[i : i + 6]
        image_id = group[0][0].rsplit("_", 1)[0]
        assert [r[0] for r in group] == [f"{image_id}_{name}" for name in RSNA_ORDER]
        assert all(r[1] in ("0", "1") for r in group)
        labels = {name: int(r[1]) for name, r in zip(RSNA_ORDER, group, strict=True)}
        assert labels["any"] == max(labels[s] for s in SUBTYPE_NAMES)
        per_image[image_id] = labels
    assert sorted(per_image) == images

    # Series-level truth agrees with the per-image rows of the series' files.
    by_series: dict[str, list[str]] = {}
    for path in (dataset / "images").glob("ID_*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPClassUID == CTImageStorage and ds.Rows == 160
        by_series.setdefault(ds.SeriesInstanceUID, []).append(path.stem)
    with (dataset / "phantom_truth.csv").open(newline="") as fh:
        truth = list(csv.DictReader(fh))
    assert len(truth) == 10 == len(by_series)
    for row in truth:
        ids = by_series[row["series_instance_uid"]]
        assert len(ids) == int(row["n_slices"])
        for name in LABELS:
            assert int(row[name]) == max(per_image[i][name] for i in ids), name


def test_dataset_mixes_negatives_multi_subtype_and_tilt(dataset: Path) -> None:
    with (dataset / "phantom_truth.csv").open(newline="") as fh:
        truth = list(csv.DictReader(fh))
    n_sub = [sum(int(r[s]) for s in SUBTYPE_NAMES) for r in truth]
    assert n_sub.count(0) >= 3  # negatives
    assert sum(1 for n in n_sub if n >= 2) >= 1  # several subtypes in one study
    for name in SUBTYPE_NAMES:
        assert any(int(r[name]) for r in truth), name
    tilts = [float(r["tilt_deg"]) for r in truth]
    assert 1 <= sum(t != 0 for t in tilts) <= 4
    assert len({r["patient_id"] for r in truth}) == 10


def test_dataset_summary_counts(tmp_path: Path) -> None:
    summary = write_dataset(tmp_path, 3, seed=4, n_slices=6, matrix=96)
    assert summary.n_studies == 3 and summary.n_images == 18
    rows = _read_rsna_csv(tmp_path)[1:]
    for name in LABELS:
        assert summary.label_counts[name] == sum(
            int(r[1]) for r in rows if r[0].endswith(f"_{name}")
        )
    assert summary.n_positive_studies <= 3


def test_rsna_ids_never_overwrite_within_a_dataset(tmp_path: Path) -> None:
    taken: set[str] = set()
    a = write_series(tmp_path, seed=9, n_slices=3, matrix=64, file_names="rsna", taken_ids=taken)
    b = write_series(tmp_path, seed=9, n_slices=3, matrix=64, file_names="rsna", taken_ids=taken)
    assert not {p.name for p in a.paths} & {p.name for p in b.paths}
    assert len(list(tmp_path.glob("ID_*.dcm"))) == 6 == len(taken)
