"""Headers parsed in a process pool (DecodePool.parse_headers): the same series, the
same files left out with the same reasons, storage errors still raised, and a pool
whose processes died parses in the caller instead of failing the read."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pydicom
import pytest

from ich_node.imaging import read_series
from ich_node.imaging.decode import MIN_PARALLEL_HEADERS, DecodePool
from ich_node.imaging.files import StorageUnavailable
from ich_node.imaging.series import CTSeries
from training.phantom import write_series


@pytest.fixture(scope="module")
def odd_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A phantom series of 24 slices with a corrupt file, a duplicate, a localizer
    and a file without pixel data among them."""
    out = tmp_path_factory.mktemp("header_pool")
    phantom = write_series(out / "series", seed=4, n_slices=24, matrix=64)
    paths = list(phantom.paths)
    (out / "series" / "corrupt.dcm").write_bytes(b"\x00" * 200 + b"not DICOM at all")
    duplicate = out / "series" / "zz_duplicate.dcm"
    duplicate.write_bytes(paths[3].read_bytes())
    scout = pydicom.dcmread(paths[5])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(out / "series" / "scout.dcm")
    empty = pydicom.dcmread(paths[6])
    del empty.PixelData
    empty.SOPInstanceUID = pydicom.uid.generate_uid()
    empty.save_as(out / "series" / "no_pixels.dcm")
    return sorted((out / "series").iterdir())


def _summary(series: CTSeries) -> tuple[Any, ...]:
    return (
        [
            (s.path, s.sop_instance_uid, s.position_mm, s.native and s.native.offset)
            for s in series.slices
        ],
        series.dropped,
        series.notes,
        series.coverage,
    )


def test_a_process_pool_reads_the_series_a_single_thread_reads(odd_series: list[Path]) -> None:
    here = read_series(odd_series)
    assert len(here.slices) == 24 and len(here.dropped) == 4  # what the fixture made
    with DecodePool(2, "process") as pool:
        parsed = pool.parse_headers(odd_series)
        assert set(parsed) == set(odd_series)  # every file parsed there, none skipped
        assert _summary(read_series(odd_series, pool=pool)) == _summary(here)
        # Headers already known (the streaming read) are not parsed again.
        known: dict[Path, Any] = {}
        read_series(odd_series[:10], headers=known)
        assert _summary(read_series(odd_series, headers=known, pool=pool)) == _summary(here)
        assert set(known) == {p for p in odd_series if p.name != "corrupt.dcm"}


def test_threads_and_few_files_parse_in_the_caller(odd_series: list[Path]) -> None:
    with DecodePool(2, "thread") as threads:
        assert threads.parse_headers(odd_series) == {}  # the GIL: no faster in threads
        assert _summary(read_series(odd_series, pool=threads)) == _summary(read_series(odd_series))
    with DecodePool(2, "process") as pool:
        assert pool.parse_headers(odd_series[: MIN_PARALLEL_HEADERS - 1]) == {}


def test_a_missing_file_still_stops_the_read_as_storage(odd_series: list[Path]) -> None:
    gone = odd_series[0].parent / "gone.dcm"
    with DecodePool(2, "process") as pool, pytest.raises(StorageUnavailable) as caught:
        read_series([*odd_series, gone], pool=pool)
    assert caught.value.path == gone


def test_a_pool_whose_processes_died_parses_in_the_caller(odd_series: list[Path]) -> None:
    pool = DecodePool(2, "process").start()
    try:
        executor: Any = pool._executor
        for pid in list(executor._processes):
            os.kill(pid, signal.SIGKILL)
        series = read_series(odd_series, pool=pool)  # the broken pool is let go
        assert _summary(series) == _summary(read_series(odd_series))
        assert pool.parse_headers(odd_series) != {}  # and a new one starts
    finally:
        pool.close()
