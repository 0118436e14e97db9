"""Irregular series (issue #13): each kind of fault built in code from phantoms.

Every test derives its input from a clean phantom series and asserts the right values:
slice order, n_slices, the dropped list, coverage figures, HU of air and brain, and
probabilities equal to the clean series' where the fix makes them equal.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from ich_node.config import SeriesSection
from ich_node.imaging import (
    DEFAULT_MAX_GAP_MM,
    DEFAULT_PREFERRED_KERNELS,
    CTSeries,
    ImagingError,
    check_hu_plausible,
    group_series,
    load_series_hu,
    read_series,
)
from ich_node.model.bundle import load_bundle
from training.phantom import PhantomSeries, write_series

N = 12


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    """A 12-slice 128x128 phantom with a bleed, written once and only read."""
    return write_series(
        tmp_path_factory.mktemp("clean"), seed=21, subtypes=("subdural",), n_slices=N, matrix=128
    )


@pytest.fixture(scope="module")
def clean_series(clean: PhantomSeries) -> CTSeries:
    return read_series(clean.paths)


@pytest.fixture(scope="module")
def clean_hu(clean_series: CTSeries) -> np.ndarray:
    return load_series_hu(clean_series)


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path):  # type: ignore[no-untyped-def]
    from ich_node.model.inference import Classifier

    return Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=16, prefetch=False)


def _copy(phantom: PhantomSeries, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, dest / p.name)) for p in phantom.paths]


def _probabilities(classifier, series: CTSeries) -> np.ndarray:  # type: ignore[no-untyped-def]
    return classifier.predict_series(series).findings.slice_probabilities()


def _air_and_brain(hu: np.ndarray) -> tuple[float, float]:
    """Median HU of the air corner and of the head's centre (brain) of the middle slice."""
    mid = hu[len(hu) // 2]
    h, w = mid.shape
    return float(np.median(mid[:8, :8])), float(np.median(mid[h // 2 - 4 : h // 2 + 4, w // 2]))


def test_defaults_match_the_config_keys() -> None:
    assert SeriesSection().preferred_kernels == DEFAULT_PREFERRED_KERNELS
    assert SeriesSection().max_gap_mm == DEFAULT_MAX_GAP_MM


def test_clean_series_has_full_coverage(clean: PhantomSeries, clean_series: CTSeries) -> None:
    cov = clean_series.coverage
    assert cov is not None
    spacing = np.diff([s.position_mm for s in clean_series.slices])
    assert cov.n_gaps == 0 and clean_series.dropped == () and clean_series.notes == ()
    assert cov.median_spacing_mm == pytest.approx(float(np.median(spacing)), abs=1e-3)
    assert cov.z_max_mm - cov.z_min_mm == pytest.approx(float(spacing.sum()), abs=1e-2)


# ------------------------------------------------------------- kind 1: one position


def test_two_images_at_one_position_are_both_read_in_a_fixed_order(
    clean: PhantomSeries, tmp_path: Path
) -> None:
    paths = _copy(clean, tmp_path)
    twins = []
    for instance in (99, 3):  # InstanceNumber decides between images at one position
        ds = pydicom.dcmread(paths[5])
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = instance
        twin = tmp_path / f"twin{instance}.dcm"
        ds.save_as(twin)
        twins.append(twin)
    forward = read_series([*paths, *twins])
    backward = read_series([*twins, *paths][::-1])
    assert [s.path for s in forward.slices] == [s.path for s in backward.slices]
    expected = [*paths[:5], twins[1], paths[5], twins[0], *paths[6:]]
    assert [s.path for s in forward.slices] == expected
    assert len(forward.slices) == N + 2 and forward.dropped == ()
    assert [n.kind for n in forward.notes] == ["duplicate_position"]
    assert "3 images share 1 position" in forward.notes[0].text
    assert forward.coverage is not None and forward.coverage.n_gaps == 0


@pytest.mark.parametrize(
    ("acquisition", "instance_offset", "label"),
    [(2, 100, "AcquisitionNumber 2"), (1, N, f"InstanceNumber {N + 1}-{2 * N}")],
)
def test_several_complete_volumes_are_split(
    clean: PhantomSeries, tmp_path: Path, acquisition: int, instance_offset: int, label: str
) -> None:
    paths = _copy(clean, tmp_path)
    second = []
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = generate_uid()
        ds.AcquisitionNumber = acquisition
        ds.InstanceNumber = int(ds.InstanceNumber) + instance_offset
        out = tmp_path / f"b_{p.name}"
        ds.save_as(out)
        second.append(out)
    series = read_series([*second, *paths])
    assert [s.path for s in series.slices] == paths
    assert {d.path for d in series.dropped} == set(second)
    assert {d.reason for d in series.dropped} == {
        f"another complete volume at the same positions ({label})"
    }
    assert [n.kind for n in series.notes] == ["volumes_split"]


def test_interleaved_images_at_every_position_are_all_read(
    clean: PhantomSeries, tmp_path: Path
) -> None:
    """No attribute separates them into volumes: every image read, none dropped."""
    paths = _copy(clean, tmp_path)
    twins = []
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = int(ds.InstanceNumber) + (100 if i % 2 else -100)
        out = tmp_path / f"b_{p.name}"
        ds.save_as(out)
        twins.append(out)
    series = read_series([*twins, *paths])
    assert len(series.slices) == 2 * N and series.dropped == ()
    assert [n.kind for n in series.notes] == ["duplicate_position"]
    numbers = [s.instance_number for s in series.slices]
    for a, b in zip(numbers[::2], numbers[1::2], strict=True):
        assert a is not None and b is not None and a < b  # InstanceNumber within a position


# ------------------------------------------------------- kind 2: cannot be placed


def test_images_that_cannot_be_placed_are_dropped_and_the_rest_read(
    clean: PhantomSeries, clean_series: CTSeries, tmp_path: Path, classifier
) -> None:  # type: ignore[no-untyped-def]
    paths = _copy(clean, tmp_path)
    extra: dict[str, str] = {}

    def add(name: str, change) -> None:  # type: ignore[no-untyped-def]
        ds = pydicom.dcmread(paths[4])
        ds.SOPInstanceUID = generate_uid()
        change(ds)
        ds.save_as(tmp_path / name)
        extra[ds.SOPInstanceUID] = name

    def screen_save(ds: pydicom.Dataset) -> None:
        del ds.ImagePositionPatient
        ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]

    def localizer(ds: pydicom.Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    def tilted(ds: pydicom.Dataset) -> None:
        c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
        ds.ImageOrientationPatient = [1, 0, 0, 0, float(c), float(-s)]

    def small_matrix(ds: pydicom.Dataset) -> None:
        ds.Rows = ds.Columns = 64
        ds.PixelData = np.full((64, 64), 1024, np.uint16).tobytes()

    for name, change in [
        ("screen.dcm", screen_save),
        ("scout.dcm", localizer),
        ("tilted.dcm", tilted),
        ("small.dcm", small_matrix),
    ]:
        add(name, change)
    series = read_series(sorted(tmp_path.iterdir()))
    assert [s.path for s in series.slices] == paths
    reasons = {d.sop_instance_uid: d.reason for d in series.dropped}
    assert set(reasons) == set(extra)
    by_name = {extra[uid]: r for uid, r in reasons.items()}
    assert by_name["screen.dcm"] == "cannot be placed: no ImagePositionPatient"
    assert by_name["scout.dcm"] == "localizer (ImageType LOCALIZER)"
    assert "orientation 20.0 deg" in by_name["tilted.dcm"]
    assert "matrix 64x64" in by_name["small.dcm"]
    np.testing.assert_allclose(
        _probabilities(classifier, series), _probabilities(classifier, clean_series), atol=1e-5
    )
    findings = classifier.predict_series(series).findings.to_dict()
    assert sorted(d["sop_instance_uid"] for d in findings["dropped"]) == sorted(extra)


# ---------------------------------------------------------------- kind 3: coverage


def test_a_hole_is_measured_and_a_negative_result_says_coverage_is_incomplete(
    clean: PhantomSeries, clean_series: CTSeries, tmp_path: Path
) -> None:
    from ich_node.results.findings import ModelInfo, summarise

    paths = _copy(clean, tmp_path)
    kept = paths[:4] + paths[8:]  # 4 slices missing in the middle
    series = read_series(kept)
    z = [s.position_mm for s in clean_series.slices]
    step = float(np.median(np.diff(z)))
    cov = series.coverage
    assert cov is not None and len(series.slices) == N - 4
    assert cov.z_min_mm == pytest.approx(z[0], abs=1e-3)
    assert cov.z_max_mm == pytest.approx(z[-1], abs=1e-3)
    assert cov.median_spacing_mm == pytest.approx(step, abs=1e-3)
    assert cov.largest_gap_mm == pytest.approx(z[8] - z[3], abs=1e-3)
    assert cov.n_gaps == 1
    assert [n.kind for n in series.notes] == ["gap"]
    assert series.coverage_incomplete is not None  # 5 spacings > 12 mm

    model = ModelInfo("m", "1", "resnet18", "0" * 64, demo=False)
    thresholds = dict.fromkeys(("any", "epidural", "intraparenchymal"), 0.5) | dict.fromkeys(
        ("intraventricular", "subarachnoid", "subdural"), 0.5
    )
    negative = summarise(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        sop_instance_uids=tuple(s.sop_instance_uid for s in series.slices),
        positions_mm=tuple(s.position_mm for s in series.slices),
        probabilities=np.zeros((len(series.slices), 6)),
        thresholds=thresholds,
        model=model,
        source=series,
    )
    data = negative.to_dict()
    assert data["coverage"]["n_gaps"] == 1 and data["coverage"]["complete"] is False
    assert any("Negative result on incomplete coverage" in n for n in data["notes"])
    # A larger series.max_gap_mm accepts the same hole.
    lenient = read_series(kept, max_gap_mm=1000.0)
    assert lenient.coverage_incomplete is None

    from ich_node.labels import LABELS
    from ich_node.results.sr import summary_text

    class _Card:
        name, version, demo = "m", "1", False

    text = summary_text(negative, _Card())  # type: ignore[arg-type]
    assert "No hemorrhage detected" in text and "incomplete coverage" in text
    assert f"{len(LABELS)}" and ", 1 gap." in text


# ------------------------------------------------------- kind 4: reconstructions


def _bone_stack(paths: list[Path], dest: Path, *, offset_mm: float, kernel: str) -> list[Path]:
    out = []
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = generate_uid()
        ds.ConvolutionKernel = kernel
        ds.InstanceNumber = int(ds.InstanceNumber) + 50
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + offset_mm]
        target = dest / f"bone_{p.name}"
        ds.save_as(target)
        out.append(target)
    return out


def test_two_reconstructions_are_split_and_the_soft_tissue_one_read(
    clean: PhantomSeries, clean_series: CTSeries, tmp_path: Path, classifier
) -> None:  # type: ignore[no-untyped-def]
    paths = _copy(clean, tmp_path)
    bone = _bone_stack(paths, tmp_path, offset_mm=2.0, kernel="BONE")
    series = read_series([*bone, *paths])
    assert [s.path for s in series.slices] == paths
    assert sorted(d.path for d in series.dropped) == sorted(bone)
    assert all("ConvolutionKernel BONE" in d.reason for d in series.dropped)
    assert [n.kind for n in series.notes] == ["stack_skipped"]
    np.testing.assert_allclose(
        _probabilities(classifier, series), _probabilities(classifier, clean_series), atol=1e-5
    )
    # The preference is configurable: series.preferred_kernels.
    chosen = read_series([*bone, *paths], preferred_kernels=("BONE",))
    assert [s.path for s in chosen.slices] == bone


def test_thickness_changing_along_z_stays_one_volume(clean: PhantomSeries, tmp_path: Path) -> None:
    """A thin posterior fossa then thicker slices (the GE series) is one stack, not two."""
    paths = _copy(clean, tmp_path)
    step = float(pydicom.dcmread(paths[0]).SliceThickness)
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.SliceThickness = f"{step:.3f}" if i < 6 else f"{1.5 * step:.3f}"
        if i >= 6:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "ADD"]
        ds.save_as(p)
    series = read_series(paths)
    assert [s.path for s in series.slices] == paths and series.dropped == ()
    assert [n.kind for n in series.notes] == ["thickness_change"]


# ---------------------------------------------------------------- kind 5: pixels


def test_rsna_12bit_wrap_is_corrected(
    clean: PhantomSeries, clean_hu: np.ndarray, tmp_path: Path
) -> None:
    paths = _copy(clean, tmp_path)
    for p in paths:
        ds = pydicom.dcmread(p)
        hu = ds.pixel_array.astype(np.int32) - 1024  # the phantom stores HU + 1024
        ds.PixelData = (hu & 0xFFF).astype(np.uint16).tobytes()  # 12-bit two's complement
        ds.RescaleIntercept = "0"
        ds.save_as(p)
    raw = pydicom.dcmread(paths[N // 2]).pixel_array
    assert np.median(raw[:8, :8]) > 3000  # air wrapped, as in RSNA 2019
    series = read_series(paths)
    assert [n.kind for n in series.notes] == ["pixel_correction"]
    hu = load_series_hu(series)
    np.testing.assert_array_equal(hu, clean_hu)
    air, brain = _air_and_brain(hu)
    assert air <= -990 and 0 <= brain <= 80


def test_missing_rescale_is_refused_unless_the_values_are_hu(
    clean: PhantomSeries, clean_hu: np.ndarray, tmp_path: Path
) -> None:
    unsigned = _copy(clean, tmp_path / "u")
    for p in unsigned:
        ds = pydicom.dcmread(p)
        del ds.RescaleIntercept, ds.RescaleSlope
        ds.save_as(p)
    series = read_series(unsigned)
    with pytest.raises(ImagingError, match="RescaleIntercept and RescaleSlope missing"):
        load_series_hu(series)
    signed = _copy(clean, tmp_path / "s")
    for p in signed:
        ds = pydicom.dcmread(p)
        hu = ds.pixel_array.astype(np.int32) - 1024
        ds.PixelRepresentation = 1
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = hu.astype(np.int16).tobytes()
        del ds.RescaleIntercept, ds.RescaleSlope
        ds.save_as(p)
    series = read_series(signed)
    assert [n.kind for n in series.notes] == ["hu_as_stored"]
    np.testing.assert_array_equal(load_series_hu(series), clean_hu)


def test_header_that_does_not_match_its_pixels_drops_the_image_before_decoding(
    clean: PhantomSeries, tmp_path: Path
) -> None:
    paths = _copy(clean, tmp_path)
    huge = pydicom.dcmread(paths[3])
    huge.Rows = huge.Columns = 65535
    huge.PixelData = bytes(32 * 1024)
    huge.save_as(paths[3])
    short = pydicom.dcmread(paths[7])
    short.PixelData = short.PixelData[: len(short.PixelData) // 2]
    short.save_as(paths[7])
    cut = paths[9]
    cut.write_bytes(cut.read_bytes()[:-5000])
    series = read_series(paths)
    assert [s.path for s in series.slices] == [p for i, p in enumerate(paths) if i not in (3, 7, 9)]
    reasons = dict(series.skipped)
    assert "65535x65535" in reasons[paths[3]]
    assert "Pixel Data holds 16384 bytes" in reasons[paths[7]]
    assert "Pixel Data holds" in reasons[cut]
    assert load_series_hu(series).shape == (N - 3, 128, 128)


def test_implausible_hu_are_refused(clean: PhantomSeries, clean_hu: np.ndarray) -> None:
    check_hu_plausible(clean_hu, "clean")  # a head CT passes
    with pytest.raises(ImagingError, match="not those of a head CT"):
        check_hu_plausible(clean_hu + 1050.0, "no air")  # a wrong intercept
    with pytest.raises(ImagingError, match="above 3000 HU"):
        check_hu_plausible(np.where(clean_hu > -500, 3500.0, clean_hu), "dense")


def test_implausible_hu_refuse_the_prediction(
    clean: PhantomSeries, tmp_path: Path, classifier
) -> None:  # type: ignore[no-untyped-def]
    paths = _copy(clean, tmp_path)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.RescaleIntercept = "26"  # +1050 HU on every pixel: no air left
        ds.save_as(p)
    with pytest.raises(ImagingError, match="not those of a head CT"):
        classifier.predict_series(read_series(paths))


# ------------------------------------------------------------ kind 6: lenient files


def test_bare_data_sets_are_decoded_with_the_transfer_syntax_read(
    clean: PhantomSeries, clean_hu: np.ndarray, tmp_path: Path
) -> None:
    for p in clean.paths:
        ds = pydicom.dcmread(p)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(tmp_path / p.stem, implicit_vr=True, little_endian=True)
        assert (tmp_path / p.stem).read_bytes()[:2] == b"\x08\x00"  # no preamble, no DICM
    groups = group_series([tmp_path])
    assert list(groups) == [clean.series_instance_uid]
    series = read_series(groups[clean.series_instance_uid])
    assert len(series.slices) == N
    assert [n.kind for n in series.notes] == ["transfer_syntax"]
    assert "decoded as Implicit VR Little Endian" in series.notes[0].text
    np.testing.assert_array_equal(load_series_hu(series), clean_hu)


# -------------------------------------------------------------- kind 7: multi-frame


def test_legacy_converted_enhanced_ct_is_read_frame_by_frame(
    clean: PhantomSeries,
    clean_series: CTSeries,
    clean_hu: np.ndarray,
    tmp_path: Path,
    classifier,  # type: ignore[no-untyped-def]
) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    from ich_node.results.sr import measurement_groups

    legacy = [pydicom.dcmread(p) for p in reversed(clean.paths)]
    enhanced = LegacyConvertedEnhancedCTImage(
        legacy,
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    series = read_series([path])
    assert len(series.slices) == N
    # Ordered by position, whatever the frame order in the object.
    positions = [s.position_mm for s in series.slices]
    assert positions == sorted(positions)
    np.testing.assert_allclose(positions, [s.position_mm for s in clean_series.slices], atol=1e-3)
    assert {s.sop_instance_uid for s in series.slices} == {enhanced.SOPInstanceUID}
    assert [n.kind for n in series.notes] == ["multi_frame"]
    np.testing.assert_array_equal(load_series_hu(series), clean_hu)
    prediction = classifier.predict_series(series)
    np.testing.assert_allclose(
        prediction.findings.slice_probabilities(),
        _probabilities(classifier, clean_series),
        atol=1e-5,
    )
    frames = [s["frame_number"] for s in prediction.findings.to_dict()["slices"]]
    assert frames == [s.frame_number for s in series.slices] and sorted(frames) == list(
        range(1, N + 1)
    )
    # The SR's source images reference the frames of the one multi-frame image.
    card = classifier.card
    groups = measurement_groups(
        prediction.findings, series, card, tracking_uids=[generate_uid() for _ in range(6)]
    )
    refs = [
        item
        for g in groups
        for item in g[0].ContentSequence
        if item.ValueType == "IMAGE" and item.RelationshipType == "CONTAINS"
    ]
    for item in refs:
        ref = item.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        assert set(ref.ReferencedFrameNumber) <= set(range(1, N + 1))


def test_results_of_a_multi_frame_source_reference_frames_and_validate(
    clean: PhantomSeries, tmp_path: Path, tiny_bundle: Path
) -> None:
    import subprocess

    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    from ich_node.service.cli import main
    from tests.conftest import dcmtk

    dciodvfy = dcmtk("dciodvfy")
    enhanced = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in clean.paths],
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    src = tmp_path / "in" / "enhanced.dcm"
    src.parent.mkdir()
    enhanced.save_as(src)
    out = tmp_path / "out"
    argv = ["predict", "--bundle", str(tiny_bundle), "--out", str(out), "--heatmaps", "all"]
    assert main([*argv, "--parametric-map", str(src)]) == 0
    (folder,) = out.iterdir()
    heatmaps = sorted((folder / "heatmaps").glob("*.dcm"))
    assert len(heatmaps) == N
    frames = sorted(
        int(pydicom.dcmread(h).SourceImageSequence[0].ReferencedFrameNumber) for h in heatmaps
    )
    assert frames == list(range(1, N + 1))
    for path in (folder / "sr.dcm", heatmaps[0]):
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        errors = [x for x in (report.stdout + report.stderr).splitlines() if x.startswith("Error")]
        assert errors == [], errors


# -------------------------------------------------------------- kind 8: orientation


def _restore(paths: list[Path], dest: Path, how: str) -> list[Path]:
    """The same head stored another way: prone, feet-first, or rows and columns swapped."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        r, c = iop[:3], iop[3:]
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        dy, dx = (float(v) for v in ds.PixelSpacing)
        rows, cols = arr.shape
        if how == "prone":  # both axes reversed: the first pixel is the old last one
            arr = arr[::-1, ::-1]
            ipp = ipp + (cols - 1) * dx * r + (rows - 1) * dy * c
            r, c = -r, -c
        elif how == "feet_first":  # left and right exchanged on screen
            arr = arr[:, ::-1]
            ipp = ipp + (cols - 1) * dx * r
            r = -r
        elif how == "transposed":
            arr = arr.T
            r, c = c, r
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*r, *c)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        target = dest / p.name
        ds.save_as(target)
        out.append(target)
    return out


@pytest.mark.parametrize(
    ("how", "to_source"),
    [
        ("prone", lambda m: m[::-1, ::-1]),
        ("feet_first", lambda m: m[:, ::-1]),
        ("transposed", lambda m: m.T),
    ],
)
def test_same_head_stored_another_way_gives_the_same_result(
    clean: PhantomSeries,
    clean_series: CTSeries,
    tmp_path: Path,
    classifier,  # type: ignore[no-untyped-def]
    how: str,
    to_source,  # type: ignore[no-untyped-def]
) -> None:
    from ich_node.imaging.orientation import Reorientation
    from ich_node.model.explain import explain

    paths = _restore(list(clean.paths), tmp_path, how)
    series = read_series(paths)
    assert [s.path for s in series.slices] == paths
    assert [n.kind for n in series.notes] == ["reoriented"]
    np.testing.assert_allclose(
        [s.position_mm for s in series.slices],
        [s.position_mm for s in clean_series.slices],
        atol=1e-3,
    )
    turned = classifier.predict_series(series)
    reference = classifier.predict_series(clean_series)
    np.testing.assert_allclose(
        turned.findings.slice_probabilities(), reference.findings.slice_probabilities(), atol=1e-5
    )
    # The source pixels are kept as stored; heatmaps land on them exactly.
    np.testing.assert_array_equal(turned.hu, np.stack([to_source(h) for h in reference.hu]))
    maps = explain(turned, classifier)
    reference_maps = explain(reference, classifier)
    assert [m.index for m in maps] == [m.index for m in reference_maps] != []
    for m, r in zip(maps, reference_maps, strict=True):
        np.testing.assert_allclose(m.cam, to_source(r.cam), atol=1e-5)
    # Round trip of the mapping itself.
    turn = Reorientation.from_orientation(series.slices[0].image_orientation)
    x = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(turn.invert(turn.apply(x)), x)


def test_training_reads_slices_in_the_reference_orientation_and_the_same_order(
    clean: PhantomSeries, clean_series: CTSeries, tmp_path: Path
) -> None:
    from ich_node.imaging import load_hu
    from training.data import _header_row

    paths = _restore(list(clean.paths), tmp_path, "prone")
    series = read_series(paths)
    for p, s, ref in zip(paths, series.slices, clean_series.slices, strict=True):
        row = _header_row(p)
        assert not isinstance(row, str)
        assert row[3] == pytest.approx(s.position_mm, abs=1e-6)  # one slice_position_mm
        np.testing.assert_array_equal(load_hu(p, reorient=True), load_hu(ref.path, reorient=True))


def test_file_meta_without_a_transfer_syntax_is_decoded_as_read(
    clean: PhantomSeries, clean_hu: np.ndarray, tmp_path: Path
) -> None:
    for p in clean.paths:
        ds = pydicom.dcmread(p)
        del ds.file_meta.TransferSyntaxUID
        ds.save_as(tmp_path / p.name, enforce_file_format=False, implicit_vr=False)
    series = read_series(sorted(tmp_path.iterdir()))
    assert len(series.slices) == N
    assert [n.kind for n in series.notes] == ["transfer_syntax"]
    assert "decoded as Explicit VR Little Endian" in series.notes[0].text
    np.testing.assert_array_equal(load_series_hu(series), clean_hu)


# ------------------------------------------------------------------ in the worker


def test_worker_reads_records_and_parks_a_refused_series_at_once(
    clean: PhantomSeries, tmp_path: Path, tiny_bundle: Path
) -> None:
    """The worker takes the records from the series: findings.json lists the image left
    out; a series refused for its content is parked at once with the one-line reason."""
    import json
    import threading
    import time

    from benchmarks.common import queue_series
    from ich_node.config import parse_config
    from ich_node.model.inference import Classifier
    from ich_node.queue.layout import results_dir
    from ich_node.queue.store import Store
    from ich_node.service.worker import Worker

    good = _copy(clean, tmp_path / "good")
    ds = pydicom.dcmread(good[4])
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(tmp_path / "good" / "scout.dcm")
    scout_uid = ds.SOPInstanceUID
    bad = write_series(tmp_path / "bad", seed=22, n_slices=6, matrix=128)
    for p in bad.paths:
        ds = pydicom.dcmread(p)
        del ds.RescaleIntercept, ds.RescaleSlope
        ds.save_as(p)

    config = parse_config(
        {
            "storage": {"dir": str(tmp_path / "node")},
            "queue": {"lease_seconds": 60.0, "max_attempts": 3, "retry_base_seconds": 1.0},
            "results": {"heatmaps": "none"},
        }
    )
    store = Store.open(config.storage.dir)
    refused = queue_series(store, bad.paths, time.time() - 10)
    read = queue_series(store, sorted((tmp_path / "good").iterdir()), time.time() - 9)
    classifier = Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=16)
    worker = Worker(config, "w0", store, classifier)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), kwargs={"poll_seconds": 0.02})
    runner.start()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            states = [j.state for j in store.jobs()]
            if len(states) == 2 and all(s in ("done", "parked") for s in states):
                break
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(60)
    parked = store.job(refused.job_id)
    assert parked is not None and parked.state == "parked" and parked.attempts == 1
    assert "RescaleIntercept and RescaleSlope missing" in parked.reason
    assert "\n" not in parked.reason
    done = store.job(read.job_id)
    assert done is not None and done.state == "done"
    findings = json.loads(
        (results_dir(config.storage.dir, read.job_id) / "findings.json").read_text()
    )
    assert findings["n_slices"] == N
    assert findings["dropped"] == [
        {"sop_instance_uid": scout_uid, "reason": "localizer (ImageType LOCALIZER)"}
    ]
    assert findings["coverage"]["n_gaps"] == 0 and findings["coverage"]["complete"] is True
