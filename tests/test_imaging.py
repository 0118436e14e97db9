"""Tests for ich_node.imaging: real files written by the phantom generator, DCMTK and
pydicom encoders, and the real scanner files in ../shared/real-ct or $ICH_REAL_CT
(the ``real_ct`` fixture of conftest.py; skipped when absent)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from ich_node.imaging import (
    DEFAULT_WINDOWS,
    UNREADABLE,
    ImagingError,
    Window,
    apply_windows,
    group_series,
    iter_dicom_files,
    load_hu,
    load_series_hu,
    preprocess_hu,
    preprocess_series,
    read_series,
    resize,
)
from tests.conftest import dcmtk
from training.phantom import PhantomSeries, write_series

GE_DIR = "neurolabusc+dcm_qa_ct/In/GE"  # under the real_ct fixture's folder


def _expected_hu(phantom: PhantomSeries) -> np.ndarray:
    # load_hu maps everything below air to -1024.
    return np.maximum(phantom.volume.hu.astype(np.float32), -1024.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    """An 8-slice 128x128 phantom, written once for the tests that only read it."""
    return write_series(tmp_path_factory.mktemp("small"), seed=3, n_slices=8, matrix=128)


def _copy(phantom: PhantomSeries, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in phantom.paths:
        shutil.copy(p, dest / p.name)
        out.append(dest / p.name)
    return out


# ----------------------------------------------------------------- round trip


def test_phantom_reads_back_in_spatial_order_with_its_hu(small: PhantomSeries) -> None:
    groups = group_series([small.paths[0].parent])
    assert list(groups) == [small.series_instance_uid]
    series = read_series(groups[small.series_instance_uid])

    assert [s.path for s in series.slices] == list(small.paths)
    assert [s.sop_instance_uid for s in series.slices] == list(small.sop_instance_uids)
    assert series.study_instance_uid == small.study_instance_uid
    assert series.uids_valid
    assert series.skipped == ()
    assert abs(series.gantry_tilt_deg) < 0.01
    assert series.normal[2] == pytest.approx(1.0)
    positions = [s.position_mm for s in series.slices]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    hu = load_series_hu(series)
    assert hu.dtype == np.float32 and hu.shape == small.volume.hu.shape
    np.testing.assert_allclose(hu, _expected_hu(small), atol=0.5)


def test_order_ignores_file_order_names_and_instance_numbers(tmp_path: Path) -> None:
    phantom = write_series(
        tmp_path / "s", seed=5, n_slices=10, matrix=64, shuffle_instance_numbers=True
    )
    expected = list(phantom.paths)
    numbers = [pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber for p in expected]
    assert numbers != sorted(numbers)  # the phantom really shuffled them

    shuffled = expected[:]
    random.Random(0).shuffle(shuffled)
    for order in (shuffled, expected[::-1]):
        series = read_series(order)
        assert [s.path for s in series.slices] == expected

    # Reverse the InstanceNumbers against space: still spatial order.
    reversed_dir = tmp_path / "reversed"
    copies = _copy(phantom, reversed_dir)
    for i, p in enumerate(copies):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = len(copies) - i
        ds.save_as(p)
    series = read_series(sorted(copies, key=lambda p: p.name))
    assert [s.path for s in series.slices] == copies
    assert [s.instance_number for s in series.slices] == list(range(len(copies), 0, -1))


def test_inferior_pointing_normal_still_orders_inferior_to_superior(
    small: PhantomSeries, tmp_path: Path
) -> None:
    paths = _copy(small, tmp_path)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]  # row x col = -z
        ds.save_as(p)
    series = read_series(paths[::-1])
    assert [s.path for s in series.slices] == paths
    assert series.normal == pytest.approx((0.0, 0.0, 1.0))


def test_rsna_named_phantom_reads_in_spatial_order(tmp_path: Path) -> None:
    phantom = write_series(tmp_path / "r", seed=2, n_slices=6, matrix=64, file_names="rsna")
    series = read_series(sorted(phantom.paths))
    assert [s.path for s in series.slices] == list(phantom.paths)
    assert [s.sop_instance_uid for s in series.slices] == list(phantom.sop_instance_uids)


# ------------------------------------------------------------- compression


def _pydicom_encode(src: Path, dest: Path, syntax: str) -> None:
    ds = pydicom.dcmread(src)
    ds.compress(syntax)
    ds.save_as(dest)


PYDICOM_LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless]


@pytest.mark.parametrize("syntax", PYDICOM_LOSSLESS, ids=lambda s: s.name)
def test_pydicom_lossless_syntaxes_decode_exactly(
    small: PhantomSeries, tmp_path: Path, syntax: pydicom.uid.UID
) -> None:
    src = small.paths[len(small.paths) // 2]
    dest = tmp_path / "c.dcm"
    _pydicom_encode(src, dest, syntax)
    assert pydicom.dcmread(dest, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_hu(dest), load_hu(src))


@pytest.mark.parametrize(
    ("tool", "options", "syntax", "lossless"),
    [
        ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70", True),  # JPEG lossless SV1
        ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57", True),  # JPEG lossless, process 14
        ("dcmcjpeg", ["+eb"], "1.2.840.10008.1.2.4.50", False),  # baseline 8-bit
        ("dcmcjpeg", ["+ee"], "1.2.840.10008.1.2.4.51", False),  # extended 12-bit
        ("dcmcjpls", [], "1.2.840.10008.1.2.4.80", True),  # JPEG-LS lossless
        ("dcmcrle", [], "1.2.840.10008.1.2.5", True),  # RLE lossless
    ],
    ids=["jpeg-sv1", "jpeg-lossless", "jpeg-baseline", "jpeg-extended", "jpeg-ls", "rle"],
)
def test_dcmtk_compressed_syntaxes_decode_to_the_same_hu(
    small: PhantomSeries,
    tmp_path: Path,
    tool: str,
    options: list[str],
    syntax: str,
    lossless: bool,
) -> None:
    binary = dcmtk(tool)
    src = small.paths[len(small.paths) // 2]
    dest = tmp_path / "c.dcm"
    subprocess.run([binary, *options, str(src), str(dest)], check=True, capture_output=True)
    assert pydicom.dcmread(dest, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    ref, got = load_hu(src), load_hu(dest)
    assert got.dtype == np.float32 and got.shape == ref.shape
    if lossless:
        np.testing.assert_array_equal(got, ref)
    else:
        # Lossy: DCMTK rescales to 8/12 bits (adjusting RescaleSlope), then quantises.
        slope = float(pydicom.dcmread(dest, stop_before_pixels=True).RescaleSlope)
        error = np.abs(got - ref)
        assert float(np.median(error)) <= 2 * slope + 3
        assert float(error.mean()) < 3 * slope + 5
        assert float(np.corrcoef(got.ravel(), ref.ravel())[0, 1]) > 0.99


# ------------------------------------------------------------ real-scanner quirks


def test_gantry_tilted_series_orders_and_reports_tilt(tmp_path: Path) -> None:
    phantom = write_series(tmp_path / "t", seed=9, n_slices=8, matrix=64, tilt_deg=20.0)
    paths = list(phantom.paths)
    series = read_series(paths[::-1])
    assert [s.path for s in series.slices] == paths
    assert abs(series.gantry_tilt_deg) == pytest.approx(20.0, abs=0.1)
    assert abs(series.normal[2]) == pytest.approx(np.cos(np.radians(20.0)), abs=1e-3)
    np.testing.assert_allclose(load_series_hu(series), _expected_hu(phantom), atol=0.5)


def test_tilt_reported_only_by_the_tag_is_used(small: PhantomSeries, tmp_path: Path) -> None:
    # Some scanners keep an axial orientation and report the tilt in (0018,1120) only.
    paths = _copy(small, tmp_path)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.GantryDetectorTilt = -12.0
        ds.save_as(p)
    series = read_series(paths)
    assert series.gantry_tilt_deg == pytest.approx(-12.0)
    assert [s.path for s in series.slices] == paths


def _add_scouts(phantom: PhantomSeries, folder: Path) -> tuple[Path, Path]:
    """A LOCALIZER and a coronal 'scout' without that ImageType, in the same series."""
    ds = pydicom.dcmread(phantom.paths[0])
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    localizer = folder / "localizer.dcm"
    ds.save_as(localizer)
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal, > max tilt
    sagittal = folder / "sagittal.dcm"
    ds.save_as(sagittal)
    return localizer, sagittal


def test_stray_localizer_and_scout_are_skipped_and_recorded(
    small: PhantomSeries, tmp_path: Path
) -> None:
    paths = _copy(small, tmp_path)
    localizer, sagittal = _add_scouts(small, tmp_path)
    series = read_series(iter_dicom_files([tmp_path]))
    assert [s.path.name for s in series.slices] == [p.name for p in small.paths]
    reasons = dict(series.skipped)
    assert "localizer" in reasons[localizer]
    assert "not axial" in reasons[sagittal]
    assert len(series.slices) == len(paths)


def test_slightly_different_orientation_is_dropped_as_scout(
    small: PhantomSeries, tmp_path: Path
) -> None:
    _copy(small, tmp_path)
    ds = pydicom.dcmread(small.paths[2])
    ds.SOPInstanceUID = generate_uid()
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    ds.ImageOrientationPatient = [1, 0, 0, 0, float(c), float(-s)]  # 10 deg off, axial-ish
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd)
    series = read_series(iter_dicom_files([tmp_path]))
    assert len(series.slices) == len(small.paths)
    assert "orientation 10.0 deg" in dict(series.skipped)[odd]


def test_missing_optional_tags_are_tolerated(small: PhantomSeries, tmp_path: Path) -> None:
    paths = _copy(small, tmp_path)
    optional = [
        "SliceLocation",
        "InstanceNumber",
        "BodyPartExamined",
        "WindowCenter",
        "WindowWidth",
        "RescaleSlope",
        "GantryDetectorTilt",
        "FrameOfReferenceUID",
        "SOPClassUID",
        "ImageType",
        "SliceThickness",
    ]
    for p in paths:
        ds = pydicom.dcmread(p)
        for keyword in optional:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(p)
    series = read_series(paths[::-1])
    assert [s.path for s in series.slices] == paths
    assert all(s.instance_number is None for s in series.slices)
    assert series.frame_of_reference_uid is None
    assert all(s.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2" for s in series.slices)
    np.testing.assert_allclose(load_series_hu(series), _expected_hu(small), atol=0.5)


def test_other_series_and_non_ct_files_are_skipped(small: PhantomSeries, tmp_path: Path) -> None:
    paths = _copy(small, tmp_path)
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    other = tmp_path / "other.dcm"
    ds.save_as(other)
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = small.series_instance_uid
    ds.Modality = "MR"
    mr = tmp_path / "mr.dcm"
    ds.save_as(mr)

    series = read_series(iter_dicom_files([tmp_path]))
    assert len(series.slices) == len(paths)
    reasons = dict(series.skipped)
    assert reasons[other].startswith("other series")
    assert "not CT" in reasons[mr]

    groups = group_series([tmp_path])
    assert set(groups) == {small.series_instance_uid, ds.SeriesInstanceUID} | {
        pydicom.dcmread(other).SeriesInstanceUID
    }


def test_pixel_padding_and_sentinels_become_air(small: PhantomSeries, tmp_path: Path) -> None:
    ds = pydicom.dcmread(small.paths[3])
    hu = load_hu(ds).astype(np.int16)
    # Store plain signed HU (intercept 0) with two outside-FOV markers.
    hu[:8, :8] = -2000  # sentinel, no tag
    hu[-8:, -8:] = -1000  # declared padding, above air so only the tag can explain -1024
    ds.PixelRepresentation = 1
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelData = hu.tobytes()
    ds["PixelPaddingValue"] = pydicom.DataElement(0x00280120, "SS", -1000)
    out = tmp_path / "pad.dcm"
    ds.save_as(out)
    got = load_hu(out)
    assert (got[:8, :8] == -1024).all()
    assert (got[-8:, -8:] == -1024).all()
    inside = hu[8:-8, 8:-8]
    keep = inside != -1000
    np.testing.assert_array_equal(got[8:-8, 8:-8][keep], np.maximum(inside, -1024)[keep])


# ----------------------------------------------------------------- failures


def test_corrupt_truncated_and_not_ct_files_raise_naming_the_file(
    small: PhantomSeries, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(300))
    with pytest.raises(ImagingError, match=r"garbage\.dcm"):
        read_series([garbage])
    with pytest.raises(ImagingError, match=r"garbage\.dcm"):
        load_hu(garbage)

    truncated = tmp_path / "truncated.dcm"
    data = small.paths[0].read_bytes()
    truncated.write_bytes(data[: len(data) - 5000])
    with pytest.raises(ImagingError, match=r"truncated\.dcm") as info:
        load_hu(truncated)
    assert info.value.path == truncated

    ds = pydicom.dcmread(small.paths[0])
    ds.Modality = "MR"
    mr = tmp_path / "mr.dcm"
    ds.save_as(mr)
    with pytest.raises(ImagingError, match=r"mr\.dcm.*not CT"):
        read_series([mr])

    ds = pydicom.dcmread(small.paths[0])
    del ds.PixelData
    nopix = tmp_path / "nopix.dcm"
    ds.save_as(nopix)
    with pytest.raises(ImagingError, match=r"nopix\.dcm.*Pixel Data"):
        load_hu(nopix)

    ds = pydicom.dcmread(small.paths[0])
    ds.RescaleSlope = 0
    zero = tmp_path / "zero.dcm"
    ds.save_as(zero)
    with pytest.raises(ImagingError, match=r"zero\.dcm.*RescaleSlope"):
        load_hu(zero)


def test_images_without_usable_geometry_are_dropped_with_a_reason(
    small: PhantomSeries, tmp_path: Path
) -> None:
    """One image that cannot be placed never costs the series (kind 2 of issue #13)."""
    paths = _copy(small, tmp_path / "a")
    ds = pydicom.dcmread(paths[4])
    del ds.ImagePositionPatient
    ds.save_as(paths[4])
    ds = pydicom.dcmread(paths[3])
    ds.PixelSpacing = [0.5, 0.5, 0.5]
    ds.save_as(paths[3])
    series = read_series(paths)
    assert [s.path for s in series.slices] == [p for i, p in enumerate(paths) if i not in (3, 4)]
    reasons = dict(series.skipped)
    assert reasons[paths[4]] == "cannot be placed: no ImagePositionPatient"
    assert "PixelSpacing must hold 2" in reasons[paths[3]]
    assert {d.sop_instance_uid for d in series.dropped} == {
        pydicom.dcmread(paths[i]).SOPInstanceUID for i in (3, 4)
    }
    # Only when nothing placeable remains is the series refused, naming why.
    for p in paths:
        ds = pydicom.dcmread(p)
        if "ImagePositionPatient" in ds:
            del ds.ImagePositionPatient
        ds.save_as(p)
    with pytest.raises(ImagingError, match=rf"{paths[0].name}: cannot be placed"):
        read_series(paths)


def test_group_series_reports_unreadable_files(small: PhantomSeries, tmp_path: Path) -> None:
    _copy(small, tmp_path)
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not dicom at all")
    (tmp_path / "notes.md").write_text("not a DICOM file, ignored by folder scans")
    groups = group_series([tmp_path])
    assert groups[UNREADABLE] == [bad]
    assert len(groups[small.series_instance_uid]) == len(small.paths)
    with pytest.raises(ImagingError, match="nowhere"):
        iter_dicom_files([tmp_path / "nowhere"])


# --------------------------------------------------------- windows and resize


def test_windows_map_hu_linearly_and_clip() -> None:
    hu = np.array([[[-1024.0, 0.0, 40.0, 80.0, 3000.0]]], dtype=np.float32)  # (1, 1, 5)
    out = apply_windows(hu)
    assert out.shape == (1, 3, 1, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.0, 0.5, 1.0, 1.0])  # brain 40/80
    np.testing.assert_allclose(out[0, 1, 0], [0.0, 0.1, 0.3, 0.5, 1.0], atol=1e-6)  # 80/200
    np.testing.assert_allclose(out[0, 2, 0, 1], (0 - (600 - 1400)) / 2800, atol=1e-6)
    assert apply_windows(np.zeros((4, 4)), [Window("w", 0, 10)]).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="width"):
        Window("bad", 40, 0)


def test_resize_pads_to_square_and_keeps_dtype() -> None:
    images = np.ones((2, 3, 40, 80), dtype=np.float32)
    out = resize(images, 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == np.float32
    # Content centred: rows 8..24 of 32 hold the 40-row image, the rest is padding.
    assert out[0, 0, 16, 16] == pytest.approx(1.0)
    assert out[0, 0, 0, 16] == pytest.approx(0.0)
    assert out[0, 0, 31, 16] == pytest.approx(0.0)
    same = resize(np.full((1, 1, 16, 16), 0.25, np.float32), 16)
    np.testing.assert_array_equal(same, 0.25)
    with pytest.raises(ValueError, match="size"):
        resize(images, 0)


def test_preprocess_is_resize_of_windows(small: PhantomSeries) -> None:
    series = read_series(small.paths)
    x = preprocess_series(series, DEFAULT_WINDOWS, 64)
    assert x.shape == (len(small.paths), 3, 64, 64) and x.dtype == np.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    hu = load_series_hu(series)
    np.testing.assert_allclose(x, resize(apply_windows(hu, DEFAULT_WINDOWS), 64), atol=1e-6)
    np.testing.assert_array_equal(x, preprocess_hu(hu, DEFAULT_WINDOWS, 64))


def test_module_does_not_import_torch() -> None:
    code = "import sys, ich_node.imaging; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------ real scanner files


def test_real_ge_tilted_series_orders_by_position(real_ct: Path) -> None:
    folder = real_ct / GE_DIR
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    files = iter_dicom_files([folder])
    random.Random(1).shuffle(files)
    series = read_series(files)
    assert len(series.slices) == 28 and series.skipped == ()
    assert series.gantry_tilt_deg == pytest.approx(18.5, abs=0.05)
    positions = [s.position_mm for s in series.slices]
    assert positions == sorted(positions)
    # Headers put the slices in this order too; sorting was by position, not by number.
    assert [s.instance_number for s in series.slices] == list(range(1, 29))
    gaps = np.array(series.slice_spacing_mm)
    assert np.allclose(gaps[:13], 4.0, atol=0.01) and np.allclose(gaps[14:], 7.0, atol=0.01)
    assert gaps[13] == pytest.approx(1.08, abs=0.01)
    hu = load_series_hu(series)
    assert hu.shape == (28, 512, 512) and hu.dtype == np.float32
    assert float(hu.min()) == -1024.0  # GE's -1500 padding outside the FOV is air
    assert 500 < float(hu.max()) < 4000  # bone


def test_real_single_slices_load(real_ct: Path) -> None:
    groups = group_series([real_ct])
    singles = {uid: paths for uid, paths in groups.items() if len(paths) == 1 and uid != UNREADABLE}
    assert len(singles) >= 13
    for paths in singles.values():
        series = read_series(paths)
        rsna = paths[0].name.startswith("ID_")
        assert series.uids_valid is (not rsna), paths[0]
        hu = load_hu(series.slices[0].path)
        assert hu.shape == (512, 512) and hu.dtype == np.float32
        # Air around the head and bone in it: plausible HU, sentinels mapped to air.
        assert float(hu.min()) == -1024.0, paths[0]
        assert 1000 < float(hu.max()) < 4000, paths[0]
        assert float(((hu > -50) & (hu < 100)).mean()) > 0.03, paths[0]  # soft tissue
        assert float((hu < -900).mean()) > 0.3, paths[0]  # air around the head
        x = preprocess_series(series, DEFAULT_WINDOWS, 64)
        assert x.shape == (1, 3, 64, 64)
