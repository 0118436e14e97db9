"""Hostile input on the series reader (``read_series``/``load_hu``) and the assembler.

Malformed DICOM must end in a value or :class:`ImagingError`, never another
exception; through the assembler, a series that cannot be read is recorded as
skipped with the reason.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ich_node.config import SeriesSection
from ich_node.imaging import ImagingError, load_hu, load_series_hu, read_series
from ich_node.ingest.assemble import Assembler
from ich_node.ingest.spool import instance_record
from ich_node.queue.store import Store

EXAMPLES = int(os.environ.get("ICH_FUZZ_EXAMPLES", "40"))

_CHANGES = st.lists(
    st.one_of(
        st.tuples(st.just("Rows"), st.sampled_from([0, 1, 65535])),
        st.tuples(st.just("Columns"), st.sampled_from([0, 1, 65535])),
        st.tuples(st.just("BitsAllocated"), st.sampled_from([0, 1, 8, 12, 32, 64])),
        st.tuples(st.just("BitsStored"), st.sampled_from([0, 1, 17, 40])),
        st.tuples(st.just("HighBit"), st.sampled_from([0, 31, 99])),
        st.tuples(st.just("PixelRepresentation"), st.sampled_from([0, 1, 7])),
        st.tuples(st.just("SamplesPerPixel"), st.sampled_from([0, 3])),
        st.tuples(st.just("RescaleSlope"), st.sampled_from(["0", "NaN", "inf", "-1", "abc", ""])),
        st.tuples(st.just("RescaleIntercept"), st.sampled_from(["NaN", "1e400", "x"])),
        st.tuples(st.just("ImageOrientationPatient"),
                  st.sampled_from([[0] * 6, [1, 0, 0, 1, 0, 0], [1, 0, 0], ["a"] * 6, [math.nan] * 6])),
        st.tuples(st.just("ImagePositionPatient"), st.sampled_from([[0, 0], ["x", 0, 0], [math.inf, 0, 0]])),
        st.tuples(st.just("PixelSpacing"), st.sampled_from([[0, 0], [-1, 1], [1]])),
        st.tuples(st.just("PixelData"), st.sampled_from([b"", b"\x00\x01", b"\x00" * 1001])),
        st.tuples(st.just("NumberOfFrames"), st.sampled_from(["0", "3", "x"])),
        st.tuples(st.just("Modality"), st.sampled_from(["", "MR", "SR"])),
        st.tuples(st.just("SeriesInstanceUID"), st.sampled_from(["", "1.2.3.999", "x" * 70])),
        st.tuples(st.just("truncate"), st.integers(0, 3000)),
    ),
    min_size=1,
    max_size=4,
)  # fmt: skip


def _write(ds: pydicom.Dataset, path: Path, changes: list[tuple[str, object]]) -> None:
    truncate = None
    for keyword, value in changes:
        if keyword == "truncate":
            truncate = value
            continue
        if keyword not in ds:
            with contextlib.suppress(Exception):
                setattr(ds, keyword, value)
        else:
            ds.data_element(keyword)._value = value  # type: ignore[union-attr]  # wrong values and VRs as a broken modality would write
    try:
        ds.save_as(path, enforce_file_format=True)
    except Exception:
        path.write_bytes(b"DICM-not-really")  # unencodable: an unreadable file instead
    if isinstance(truncate, int):
        data = path.read_bytes()
        path.write_bytes(data[:truncate])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from training.phantom import write_series

    return list(write_series(tmp_path_factory.mktemp("src"), seed=9, n_slices=4, matrix=64).paths)


def _read_all(paths: list[Path]) -> None:
    try:
        series = read_series(paths)
    except ImagingError:
        return
    try:
        hu = load_series_hu(series)
    except ImagingError:
        return
    assert hu.dtype == np.float32 and hu.ndim == 3


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(changes=_CHANGES, which=st.integers(0, 3), count=st.integers(1, 4))
def test_malformed_series_raise_only_imaging_error(
    source, tmp_path_factory, changes, which, count
) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("case")
    paths = []
    for i, src in enumerate(source[:count]):
        out = folder / f"{i}.dcm"
        ds = pydicom.dcmread(src)
        if i == which % count:
            _write(ds, out, changes)
        else:
            ds.save_as(out, enforce_file_format=True)
        paths.append(out)
    _read_all(paths)
    for path in paths:
        with contextlib.suppress(ImagingError):
            assert load_hu(path).ndim == 2


def test_one_slice_and_mixed_series(source: list[Path], tmp_path: Path) -> None:
    from training.phantom import write_series

    other = write_series(tmp_path / "other", seed=10, n_slices=2, matrix=64).paths
    series = read_series(source[:1])
    assert len(series.slices) == 1
    # Two series in one read: the one with the most usable images wins, alone.
    mixed = read_series([*source, *other])
    assert len(mixed.slices) == len(source)
    assert mixed.series_instance_uid == pydicom.dcmread(source[0]).SeriesInstanceUID


def test_two_thousand_slice_series_headers(source: list[Path], tmp_path: Path) -> None:
    """2,000 header-only instances: the reader refuses them by reason, quickly."""
    ds = pydicom.dcmread(source[0], stop_before_pixels=True)
    paths = []
    for i in range(2000):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.2.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.InstanceNumber = i + 1
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    try:
        series = read_series(paths)
    except ImagingError as exc:
        assert "Pixel" in str(exc) or str(exc)
    else:
        assert len(series.slices) == 2000
        with pytest.raises(ImagingError):
            load_series_hu(series)  # no pixel data: a reason, not a crash


@settings(
    max_examples=max(EXAMPLES // 4, 5),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(changes=_CHANGES)
def test_assembler_records_a_reason_for_every_unreadable_series(
    source, tmp_path_factory, changes
) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("asm")
    store = Store.open(folder / "node")
    spooled = folder / "node" / "spool" / "s"  # the node reads only what is in its spool
    spooled.mkdir(parents=True)
    paths = []
    for i, src in enumerate(source):
        ds = pydicom.dcmread(src)
        out = spooled / f"{i}.dcm"
        if i == 0:
            _write(ds, out, changes)
        else:
            ds.save_as(out, enforce_file_format=True)
        paths.append(out)
    header = pydicom.dcmread(source[1], stop_before_pixels=True)
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            record = instance_record(ds, "", "")
        except Exception:
            continue  # the listener answers 0xC210 for these: never recorded
        # Keep them in one series, as the listener would group them.
        record = type(record)(**{**{f: getattr(record, f) for f in record.__slots__},
                                 "series_instance_uid": str(header.SeriesInstanceUID)})  # fmt: skip
        store.add_instance(record, path, path.stat().st_size, 0.0)
    assembler = Assembler(store, SeriesSection(stable_seconds=0, min_slices=1))
    decisions = assembler.run_once(now=10.0)
    for decision in decisions:
        assert decision.queued or decision.reason
    series = store.series(str(header.SeriesInstanceUID))
    assert series is not None and series.state in ("queued", "skipped")
    if series.state == "skipped":
        assert series.reason
    store.close()
