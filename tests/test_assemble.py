"""Series assembly on real phantom files spooled into a real store, time injected.

Every test runs on both store backends (SQLite, PostgreSQL): the same tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom

from ich_node.config import QueueSection, SeriesSection
from ich_node.ingest.assemble import Assembler
from ich_node.ingest.spool import Spool, instance_record
from ich_node.queue.backend import job_queue
from ich_node.queue.store import Store

OpenStore = Callable[[Path], Store]


def _spool_files(spool: Spool, paths: list[Path], now: float, **override: str | None) -> None:
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for key, value in override.items():
            if value is None:
                ds.pop(key, None)
            else:
                setattr(ds, key, value)
        record = instance_record(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        spool.save(path.read_bytes(), record, now)


def _setup(
    open_store: OpenStore, tmp_path: Path, **series: object
) -> tuple[Store, Spool, Assembler]:
    """A store on the test's backend, its spool in ``tmp_path/node``, and an assembler."""
    store = open_store(tmp_path / "node")
    spool = Spool(tmp_path / "node", store, min_free_mb=0)
    settings: dict[str, object] = {"stable_seconds": 5.0, "min_slices": 8, **series}
    config = SeriesSection(**settings)  # type: ignore[arg-type]
    return store, spool, Assembler(store, config, queue=job_queue(store, QueueSection()))


def test_series_complete_after_quiet_period_and_versioned_on_late_instance(
    open_store: OpenStore, tmp_path: Path, phantom_series: object
) -> None:
    store, spool, assembler = _setup(open_store, tmp_path)
    paths = list(phantom_series.paths)  # type: ignore[attr-defined]
    _spool_files(spool, paths[:-1], now=100.0, ImagesInAcquisition=None)
    assert assembler.run_once(now=104.9) == []
    (decision,) = assembler.run_once(now=105.0)
    assert decision.queued and decision.version == 1
    assert assembler.run_once(now=200.0) == []  # read once
    _spool_files(spool, paths[-1:], now=300.0, ImagesInAcquisition=None)  # a late slice
    assert assembler.run_once(now=301.0) == []
    (late,) = assembler.run_once(now=305.0)
    assert late.queued and late.version == 2 and late.job_id != decision.job_id
    assert [j.state for j in store.jobs()] == ["queued", "queued"]


def test_series_complete_early_when_all_expected_images_arrived(
    open_store: OpenStore, tmp_path: Path, phantom_series: object
) -> None:
    _store, spool, assembler = _setup(open_store, tmp_path)
    paths = list(phantom_series.paths)  # type: ignore[attr-defined]
    _spool_files(spool, paths, now=100.0, ImagesInAcquisition=str(len(paths)))
    (decision,) = assembler.run_once(now=100.1)
    assert decision.queued


def test_skipped_series_are_recorded_with_reason(
    open_store: OpenStore, tmp_path: Path, phantom_series: object
) -> None:
    paths = list(phantom_series.paths)  # type: ignore[attr-defined]
    store, spool, assembler = _setup(
        open_store, tmp_path, series_description_patterns=(r"(?i)brain",)
    )
    _spool_files(spool, paths, now=0.0, SeriesDescription="AX SOFT TISSUE NECK")
    (decision,) = assembler.run_once(now=10.0)
    assert not decision.queued
    assert "series_description_patterns" in decision.reason
    record = store.series(decision.series_instance_uid)
    assert record is not None and record.state == "skipped" and record.reason == decision.reason

    store, spool, assembler = _setup(open_store, tmp_path / "few", min_slices=100)
    _spool_files(spool, paths, now=0.0)
    (decision,) = assembler.run_once(now=10.0)
    assert "series.min_slices is 100" in decision.reason

    store, spool, assembler = _setup(open_store, tmp_path / "mr")
    _spool_files(spool, paths, now=0.0, Modality="MR")
    (decision,) = assembler.run_once(now=10.0)
    assert decision.reason.startswith("modality 'MR'")
    assert store.jobs() == []


def test_tilted_series_beyond_tolerance_is_skipped(open_store: OpenStore, tmp_path: Path) -> None:
    from training.phantom import write_series

    tilted = write_series(tmp_path / "tilted", seed=2, n_slices=10, matrix=64, tilt_deg=20.0)
    _store, spool, assembler = _setup(open_store, tmp_path, max_tilt_degrees=10.0)
    _spool_files(spool, list(tilted.paths), now=0.0)
    (decision,) = assembler.run_once(now=10.0)
    assert not decision.queued
    assert "axial" in decision.reason


def _spool_each(spool: Spool, paths: list[Path], now: float, **override: object) -> None:
    """Spool each file with its own header changes: ``override`` maps keyword -> f(i)."""
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for key, value in override.items():
            setattr(ds, key, value(i))  # type: ignore[operator]
        record = instance_record(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        spool.save(path.read_bytes() + bytes([i]), record, now + i)


def test_per_acquisition_count_does_not_end_the_series_early(
    open_store: OpenStore, tmp_path: Path, phantom_series: object
) -> None:
    """A GE-like series: one acquisition per image, ImagesInAcquisition 1 on each."""
    store, spool, assembler = _setup(open_store, tmp_path)
    paths = list(phantom_series.paths)  # type: ignore[attr-defined]
    decisions = []
    for i, path in enumerate(paths):  # one image a second, the quiet period is 5 s
        _spool_each(
            spool, [path], now=100.0 + i, AcquisitionNumber=lambda _, i=i: i + 1,
            ImagesInAcquisition=lambda _: 1,
        )  # fmt: skip
        decisions += assembler.run_once(now=100.5 + i)
    assert decisions == []
    record = store.series(phantom_series.series_instance_uid)  # type: ignore[attr-defined]
    assert record is not None and record.expected is None
    last = 100.0 + len(paths) - 1
    (decision,) = assembler.run_once(now=last + 5.0)
    assert decision.queued and decision.version == 1
    assert [j.version for j in store.jobs()] == [1]


def test_series_count_ends_early_and_late_instances_wait_for_quiet(
    open_store: OpenStore, tmp_path: Path, phantom_series: object
) -> None:
    store, spool, assembler = _setup(open_store, tmp_path)
    paths = list(phantom_series.paths)  # type: ignore[attr-defined]
    n = len(paths)
    _spool_files(spool, paths[:-2], now=100.0, NumberOfSeriesRelatedInstances=str(n - 2))
    (first,) = assembler.run_once(now=100.1)  # the whole-series count is met
    assert first.queued and first.version == 1
    _spool_files(spool, paths[-2:-1], now=101.0)  # late: the count no longer ends it
    assert assembler.run_once(now=101.1) == []
    _spool_files(spool, paths[-1:], now=103.0)
    assert assembler.run_once(now=107.9) == []
    (second,) = assembler.run_once(now=108.0)
    assert second.version == 2
    assert [j.cause for j in store.jobs()] == ["first read", "2 late instances"]


def test_slow_adder_gets_at_most_max_versions(
    open_store: OpenStore, tmp_path: Path, phantom_series: object
) -> None:
    store, spool, assembler = _setup(open_store, tmp_path, max_versions=3)
    paths = list(phantom_series.paths)  # type: ignore[attr-defined]
    now = 0.0
    for path in paths:  # each image after the series was quiet: a version per image at most
        _spool_files(spool, [path], now=now, ImagesInAcquisition=None)
        assembler.run_once(now=now + 6.0)
        now += 10.0
    assert [j.version for j in store.jobs()] == [1, 2, 3]
    record = store.series(phantom_series.series_instance_uid)  # type: ignore[attr-defined]
    assert record is not None and record.state == "capped"
    assert record.reason.startswith("series.max_versions (3) reached")
    assert store.reread_counts().capped == 1
