"""The worker's pipeline on a real store, real phantom series and a real (random) model.

Reader (lease, headers, decoding), model and results run in three threads
(:meth:`ich_node.worker.Worker.run`). These tests check that the pipeline gives
the same findings as one series read alone, that its stages really overlap, and
that a failure in any stage ends in a recorded state without stalling the rest.
They run on both store backends (SQLite, PostgreSQL), the same tests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from benchmarks.common import queue_series
from ich_node.config import NodeConfig, parse_config
from ich_node.imaging import read_series
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.layout import results_dir
from ich_node.queue.store import JobRecord, Store
from ich_node.service.model_stage import ModelStage
from ich_node.service.read_stage import ReadStage
from ich_node.service.results_stage import ResultsStage
from ich_node.service.worker import Worker
from training.phantom import PhantomSeries, write_series

OpenStore = Callable[[Path], Store]
Section = Callable[[Path], Any]  # conftest's storage_section: the test's backend


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[PhantomSeries]:
    root = tmp_path_factory.mktemp("worker_phantoms")
    kinds: list[tuple[str, ...]] = [("subdural",), (), ("intraventricular",)]
    return [
        write_series(root / f"s{i}", seed=40 + i, subtypes=k, n_slices=10, matrix=128)
        for i, k in enumerate(kinds)
    ]


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path) -> Classifier:
    return Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=4)


def _config(tmp_path: Path, storage: Section) -> NodeConfig:
    return parse_config(
        {
            "storage": {
                "dir": str(tmp_path / "node"),
                "database": storage(tmp_path / "node").database,
            },
            "queue": {"lease_seconds": 60.0, "max_attempts": 3, "retry_base_seconds": 1.0},
            # The pipeline alone: queue_series leaves each series receiving, which a
            # streaming worker would score beside its jobs (tests/test_streaming.py).
            "series": {"streaming": False},
        }
    )


def _run_until_settled(worker: Worker, n_jobs: int, timeout: float = 120.0) -> None:
    """Run the pipeline in a thread until every job has a final state, then stop it."""
    stop = threading.Event()
    runner = threading.Thread(
        target=worker.run, args=(stop,), kwargs={"poll_seconds": 0.02}, daemon=True
    )
    runner.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            states = [j.state for j in worker.store.jobs()]
            if len(states) == n_jobs and all(s in ("done", "retry", "parked") for s in states):
                break
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(timeout)
    assert not runner.is_alive(), "the pipeline did not stop"


def test_pipeline_gives_each_job_the_findings_of_its_series_alone(
    tmp_path: Path,
    phantoms: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    jobs = [queue_series(store, p.paths, time.time() - 10) for p in phantoms]
    worker = Worker(config, "w0", store, classifier, batches_ahead=1)
    _run_until_settled(worker, len(jobs))

    assert [store.job(j.job_id).state for j in jobs] == ["done"] * 3  # type: ignore[union-attr]
    assert worker.held() == []
    for job, phantom in zip(jobs, phantoms, strict=True):
        folder = results_dir(config.storage.dir, job.job_id)
        findings = json.loads((folder / "findings.json").read_text())
        alone = classifier.predict_series(read_series(list(phantom.paths))).findings
        assert [s["sop_instance_uid"] for s in findings["slices"]] == [
            s.sop_instance_uid for s in alone.slices
        ]
        for got, want in zip(findings["slices"], alone.slices, strict=True):
            assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-5)
        assert list((folder / "outbox").rglob("*.dcm")), "no DICOM results written"
        assert not list(folder.parent.glob(f".{job.job_id}.*.tmp"))
        # The PNG previews, written after the hand-over: one per heatmap, its pixels.
        heatmaps = sorted((folder / "outbox" / "heatmaps").glob("*.dcm"))
        assert heatmaps, "no heatmaps"
        for path in heatmaps:
            ds = pydicom.dcmread(path)
            with Image.open(path.with_suffix(".png")) as png:
                assert np.array_equal(np.asarray(png), ds.pixel_array)


def test_next_job_is_on_the_model_while_the_last_ones_results_are_written(
    tmp_path: Path,
    phantoms: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    """Job 1's results stage waits until job 2 reaches the model: a serial worker never would."""
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    first, second = (
        queue_series(store, p.paths, time.time() - 10 + i) for i, p in enumerate(phantoms[:2])
    )
    on_model = threading.Event()
    seen: dict[str, bool] = {}

    class WatchedModel(ModelStage):
        def infer(self, item: Any) -> Any:
            if item.job.job_id == second.job_id:
                on_model.set()
            return super().infer(item)

    class WatchedResults(ResultsStage):
        def write_outputs(self, job: JobRecord, explained: Any, folder: Path) -> Any:
            if job.job_id == first.job_id:
                seen["overlapped"] = on_model.wait(30)  # False after 30 s if serial
            return super().write_outputs(job, explained, folder)

    class Watched(Worker):
        model_stage = WatchedModel
        results_stage = WatchedResults

    worker = Watched(config, "w0", store, classifier)
    _run_until_settled(worker, 2)
    assert seen == {"overlapped": True}
    assert [store.job(j.job_id).state for j in (first, second)] == ["done", "done"]  # type: ignore[union-attr]


def test_a_series_that_fails_to_decode_is_recorded_and_the_next_one_runs(
    tmp_path: Path,
    phantoms: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    """Headers read, pixels undecodable in the third batch: retry with the reason, no stall."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    broken_dir = tmp_path / "broken"
    broken = write_series(broken_dir, seed=41, subtypes=(), n_slices=10, matrix=128)
    last = broken.paths[-1]  # slice 10 of 10: in the third batch of 4
    # A well-formed header and fragment whose RLE data no decoder accepts (a slice cut
    # short is left out when the headers are read: issue #13).
    ds = pydicom.dcmread(last)
    ds.compress(RLELossless)
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds.save_as(last)
    bad = queue_series(store, broken.paths, time.time() - 10)
    good = queue_series(store, phantoms[0].paths, time.time() - 9)
    worker = Worker(config, "w0", store, classifier, batches_ahead=1)
    _run_until_settled(worker, 2)

    bad_now = store.job(bad.job_id)
    assert bad_now is not None and bad_now.state == "retry"
    assert bad_now.reason, "the failure was recorded without a reason"
    assert not results_dir(config.storage.dir, bad.job_id).exists()
    assert store.job(good.job_id).state == "done"  # type: ignore[union-attr]
    assert worker.held() == []


def test_a_series_with_unreadable_headers_is_recorded_and_the_next_one_runs(
    tmp_path: Path,
    phantoms: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    # Written in the spool, so the files the store records are these.
    gone = write_series(
        config.storage.dir / "spool" / "gone", seed=42, subtypes=(), n_slices=4, matrix=128
    )
    bad = queue_series(store, gone.paths, time.time() - 10)
    for path in gone.paths:  # deleted behind the node's back
        path.unlink()
    good = queue_series(store, phantoms[1].paths, time.time() - 9)
    worker = Worker(config, "w0", store, classifier)
    _run_until_settled(worker, 2)

    bad_now = store.job(bad.job_id)
    assert bad_now is not None and bad_now.state == "retry" and bad_now.reason
    assert store.job(good.job_id).state == "done"  # type: ignore[union-attr]


def test_stop_finishes_the_leased_jobs_and_leases_no_more(
    tmp_path: Path,
    phantoms: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    jobs = [queue_series(store, p.paths, time.time() - 10 + i) for i, p in enumerate(phantoms)]
    leased_once = threading.Event()

    class ReadOnce(ReadStage):
        def read(self, job: JobRecord, times: dict[str, float]) -> Any:
            leased_once.set()
            return super().read(job, times)

    class StopAfterFirstLease(Worker):
        read_stage = ReadOnce

    worker = StopAfterFirstLease(config, "w0", store, classifier)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    runner.start()
    assert leased_once.wait(60)
    stop.set()
    runner.join(120)
    assert not runner.is_alive()
    after = [store.job(j.job_id) for j in jobs]
    # Every job it took reached a recorded state: done if it reached the model before
    # the stop, else given back with its attempt not counted; the rest never leased.
    for job in after:
        assert job is not None
        assert job.state == "done" or (job.state, job.attempts) == ("queued", 0), job
    assert after[-1] is not None and after[-1].state == "queued"
    assert worker.held() == []


def test_a_worker_holds_at_most_three_jobs(
    tmp_path: Path,
    phantoms: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    """With the results stage stuck, the reader stops leasing at MAX_HELD_JOBS."""
    from ich_node.service.worker import MAX_HELD_JOBS

    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    extra = [
        write_series(tmp_path / f"x{i}", seed=60 + i, subtypes=(), n_slices=4, matrix=128)
        for i in range(2)
    ]
    jobs = [
        queue_series(store, p.paths, time.time() - 10 + i)
        for i, p in enumerate([*phantoms, *extra])
    ]
    release = threading.Event()

    class Slow(ResultsStage):
        def write_outputs(self, job: JobRecord, explained: Any, folder: Path) -> Any:
            release.wait(60)
            return super().write_outputs(job, explained, folder)

    class SlowResults(Worker):
        results_stage = Slow

    worker = SlowResults(config, "w0", store, classifier)
    stop = threading.Event()
    runner = threading.Thread(
        target=worker.run, args=(stop,), kwargs={"poll_seconds": 0.02}, daemon=True
    )
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while len(worker.held()) < MAX_HELD_JOBS and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # time for a fourth lease, if the bound did not hold
        leased = [j for j in store.jobs() if j.state == "leased"]
        assert len(worker.held()) == MAX_HELD_JOBS == len(leased) == 3
        release.set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(j.state != "done" for j in store.jobs()):
            time.sleep(0.05)
    finally:
        release.set()
        stop.set()
        runner.join(60)
    assert [store.job(j.job_id).state for j in jobs] == ["done"] * 5  # type: ignore[union-attr]


def test_stop_gives_back_a_job_that_never_reached_the_model(
    tmp_path: Path,
    phantoms: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    """Stopped while job 1 is on the model: job 1 ends done, job 2 (read ahead) is
    given back with its attempt not counted, job 3 is never leased."""
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    first, second, third = (
        queue_series(store, p.paths, time.time() - 10 + i) for i, p in enumerate(phantoms)
    )
    on_model, go_on = threading.Event(), threading.Event()

    class Held(ModelStage):
        def infer(self, item: Any) -> Any:
            if item.job.job_id == first.job_id:
                on_model.set()
                go_on.wait(60)
            return super().infer(item)

    class HeldOnTheModel(Worker):
        model_stage = Held

    worker = HeldOnTheModel(config, "w0", store, classifier, batches_ahead=1)
    stop = threading.Event()
    runner = threading.Thread(
        target=worker.run, args=(stop,), kwargs={"poll_seconds": 0.02}, daemon=True
    )
    runner.start()
    try:
        assert on_model.wait(60)
        deadline = time.monotonic() + 60  # the reader leases job 2 and decodes ahead
        while store.job(second.job_id).state != "leased" and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
    finally:
        stop.set()
        go_on.set()
        runner.join(120)
    assert not runner.is_alive()
    done, given_back, untouched = (store.job(j.job_id) for j in (first, second, third))
    assert done is not None and done.state == "done"
    assert given_back is not None and (given_back.state, given_back.attempts) == ("queued", 0)
    assert untouched is not None and (untouched.state, untouched.attempts) == ("queued", 0)
    assert worker.held() == []
    # The given-back job runs normally afterwards.
    assert worker.run_once(time.time()) is not None
    assert store.job(second.job_id).state == "done"  # type: ignore[union-attr]
