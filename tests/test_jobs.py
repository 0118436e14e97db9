"""The job queue on a real store (SQLite and PostgreSQL, the same tests), time driven by the tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ich_node.config import QueueSection
from ich_node.queue.backend import job_queue
from ich_node.queue.jobs import JobQueue, LeaseLost, job_id_for
from ich_node.queue.store import InstanceRecord, JobRecord, Store

OpenStore = Callable[[Path], Store]


@pytest.fixture
def _queue(open_store: OpenStore) -> Callable[..., JobQueue]:
    """``_queue(tmp_path, **queue_keys)``: a queue on the test's backend."""

    def make(tmp_path: Path, **kw: float) -> JobQueue:
        config = QueueSection(lease_seconds=10.0, max_attempts=3, retry_base_seconds=2.0, **kw)
        return job_queue(open_store(tmp_path), config)

    return make


def _enqueue(queue: JobQueue, series: str = "1.2.3", now: float = 0.0) -> JobRecord:
    record = InstanceRecord(
        "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2", series, "CT", "", "", "", None
    )
    queue.store.add_instance(record, Path("/x.dcm"), 1, now)
    return queue.store.queue_series(series, 1, job_id_for, now)


def test_job_ids_are_deterministic_per_series_version() -> None:
    assert job_id_for("1.2.3", 1) == job_id_for("1.2.3", 1)
    assert job_id_for("1.2.3", 1) != job_id_for("1.2.3", 2)


def test_lease_then_complete_writes_outbox_in_the_same_step(
    tmp_path: Path, _queue: Callable[..., JobQueue]
) -> None:
    queue = _queue(tmp_path)
    job = _enqueue(queue)
    leased = queue.lease("w", now=1.0)
    assert leased is not None and leased.state == "leased" and leased.attempts == 1
    assert leased.lease_until == 11.0
    assert queue.lease("other", now=2.0) is None  # not taken twice
    queue.complete(leased, ["a", "b"], n_files=3, now=3.0)
    assert queue.store.job(job.job_id).state == "done"  # type: ignore[union-attr]
    deliveries = queue.store.deliveries(job.job_id)
    assert [(d.destination, d.state, d.n_files) for d in deliveries] == [
        ("a", "pending", 3),
        ("b", "pending", 3),
    ]


def test_expired_lease_runs_again_and_stale_worker_cannot_complete(
    tmp_path: Path, _queue: Callable[..., JobQueue]
) -> None:
    queue = _queue(tmp_path)
    _enqueue(queue)
    first = queue.lease("w1", now=0.0)
    assert first is not None
    assert queue.lease("w2", now=9.0) is None
    second = queue.lease("w2", now=10.5)  # the first worker's lease expired
    assert second is not None and second.attempts == 2 and second.worker == "w2"
    with pytest.raises(LeaseLost):
        queue.complete(first, ["a"], 1, now=11.0)
    queue.complete(second, ["a"], 1, now=11.0)
    assert len(queue.store.deliveries()) == 1


def test_failures_back_off_then_park_with_reason(
    tmp_path: Path, _queue: Callable[..., JobQueue]
) -> None:
    queue = _queue(tmp_path)
    job = _enqueue(queue)
    leased = queue.lease("w", now=0.0)
    assert leased is not None
    assert queue.fail(leased, "ImagingError: bad", now=1.0) == "retry"
    assert queue.lease("w", now=2.9) is None  # backoff 2 s after attempt 1
    leased = queue.lease("w", now=3.0)
    assert leased is not None
    assert queue.fail(leased, "ImagingError: bad", now=3.0) == "retry"
    assert queue.lease("w", now=6.9) is None  # 4 s after attempt 2
    leased = queue.lease("w", now=7.0)
    assert leased is not None
    assert queue.fail(leased, "ImagingError: bad", now=7.0) == "parked"
    parked = queue.store.job(job.job_id)
    assert parked is not None and parked.state == "parked"
    assert parked.reason == "after 3 attempts: ImagingError: bad"
    assert queue.lease("w", now=1000.0) is None
    assert queue.requeue(job.job_id, now=1000.0)
    again = queue.lease("w", now=1000.0)
    assert again is not None and again.attempts == 1


def test_released_worker_job_reruns_and_parks_after_max_attempts(
    tmp_path: Path, _queue: Callable[..., JobQueue]
) -> None:
    queue = _queue(tmp_path)
    job = _enqueue(queue)
    for attempt in range(1, 4):
        leased = queue.lease("w", now=float(attempt))
        assert leased is not None and leased.attempts == attempt
        queue.set_stage(leased, "model", now=float(attempt))
        released = queue.release_worker("w", "worker exited with code -9", now=float(attempt))
        assert released.charged == (job.job_id,) and released.given_back == ()
    parked = queue.store.job(job.job_id)
    assert parked is not None and parked.state == "parked"
    assert "worker exited with code -9 while this job was on the model" in parked.reason


def test_worker_death_charges_only_the_job_on_the_model(
    tmp_path: Path, _queue: Callable[..., JobQueue]
) -> None:
    queue = _queue(tmp_path)
    jobs = [_enqueue(queue, series=f"1.2.{i}") for i in range(3)]
    writing, on_model, ahead = (queue.lease("w", now=1.0) for _ in range(3))
    assert writing and on_model and ahead
    assert [writing.job_id, on_model.job_id, ahead.job_id] == [j.job_id for j in jobs]
    queue.set_stage(writing, "results", now=2.0)
    queue.set_stage(on_model, "model", now=2.0)
    released = queue.release_worker("w", "worker exited with code -9", now=3.0)
    assert released.charged == (on_model.job_id,)
    assert released.given_back == (writing.job_id, ahead.job_id) and released.parked == ()
    by_id = {j.job_id: j for j in queue.store.jobs()}
    charged = by_id[on_model.job_id]
    assert (charged.state, charged.attempts, charged.stage) == ("retry", 1, "")
    assert charged.reason == "worker exited with code -9 while this job was on the model"
    for job_id in (writing.job_id, ahead.job_id):
        back = by_id[job_id]
        assert (back.state, back.attempts, back.crash_returns) == ("queued", 0, 1)


def test_job_only_read_ahead_at_every_crash_is_charged_in_the_end(
    tmp_path: Path, _queue: Callable[..., JobQueue]
) -> None:
    """A decoder that kills the worker while reading ahead must not loop for ever."""
    queue = _queue(tmp_path)  # max_attempts 3
    job = _enqueue(queue)
    states = []
    for crash in range(1, 10):
        leased = queue.lease("w", now=float(crash))
        if leased is None:
            break
        queue.release_worker("w", "worker exited with code -11", now=float(crash))
        got = queue.store.job(job.job_id)
        assert got is not None
        states.append((got.state, got.attempts))
    assert states[:5] == [("queued", 0)] * 5  # given back, no attempt
    assert states[5] == ("retry", 1)  # the sixth return: charged
    assert states[-1][0] == "parked" and len(states) == 8


def test_extend_pushes_the_lease_and_fails_once_it_is_lost(
    tmp_path: Path, _queue: Callable[..., JobQueue]
) -> None:
    queue = _queue(tmp_path)
    _enqueue(queue)
    leased = queue.lease("w", now=1.0)
    assert leased is not None
    assert queue.extend(leased, now=9.0) == 19.0
    assert queue.lease("other", now=15.0) is None  # the extended lease still holds
    taken = queue.lease("other", now=19.5)  # expired: another worker takes the job
    assert taken is not None and taken.attempts == 2
    with pytest.raises(LeaseLost):
        queue.extend(leased, now=20.0)


def test_worker_heartbeat_extends_the_lease_of_a_long_job(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """A real heartbeat thread keeps a 2 s lease alive for 4 s of work."""
    import os
    import time

    from ich_node.config import parse_config
    from ich_node.service.worker import Worker, _Heartbeat

    config = parse_config({"queue": {"lease_seconds": 2.0}, "storage": {"dir": str(tmp_path)}})
    store = open_store(tmp_path)
    worker = Worker(config, "worker-0", store, classifier=None)
    _enqueue(worker.queue, now=time.time())
    job = worker.queue.lease("worker-0", now=time.time())
    assert job is not None
    worker.hold(job)  # what the worker does while the job is in any stage
    beat = _Heartbeat(store, "worker-0", os.getppid())
    beat.runner = worker
    beat.start()
    try:
        for _ in range(8):
            time.sleep(0.5)
            assert worker.queue.lease("thief", now=time.time()) is None
        worker.drop(job)  # the job ended (or hung without beating): no more extension
        time.sleep(2.5)
        assert worker.queue.lease("thief", now=time.time()) is not None
    finally:
        beat.stop.set()
        beat.join(5)
    assert "worker-0" in store.heartbeats()
