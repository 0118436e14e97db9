"""The worker's first stage: lease a job, read its series' headers, decode ahead.

:class:`ReadStage` is the *reader* thread of :meth:`ich_node.service.worker.Worker.run`:
it leases the oldest runnable job while the worker holds fewer than
:data:`MAX_HELD_JOBS`, reads the headers of the job's series version
(:func:`ich_node.imaging.read_series`) and feeds the decoded, preprocessed batches
into the job's bounded queue, a few batches ahead of the model stage
(:mod:`ich_node.service.model_stage`). :class:`Leases` is the bookkeeping of the
jobs a worker holds in any stage: the heartbeat extends their leases until the
results stage (:mod:`ich_node.service.results_stage`) lets them go.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ich_node.config import NodeConfig
from ich_node.imaging import CTSeries, read_series
from ich_node.log import PHI, job_context, phi_values_of_file
from ich_node.queue.backend import StorageWatch, wait_for_jobs
from ich_node.queue.jobs import JobQueue, LeaseLost
from ich_node.queue.store import JobRecord, Store

log = structlog.get_logger(__name__)

#: Jobs one worker holds at most: one writing results, one waiting for that, one
#: on the model (or being read and decoded ahead).
MAX_HELD_JOBS = 3
#: Seconds an idle worker on PostgreSQL waits for a job notification (LISTEN) before
#: looking again (retries whose backoff ended are not notified).
IDLE_WAIT_SECONDS = 1.0


class BatchesEnd:
    """The last item of a job's batch stream."""


#: The one :class:`BatchesEnd`.
END = BatchesEnd()


@dataclass(frozen=True, slots=True)
class DecodeFailed:
    """A batch that could not be decoded: the job fails with this error."""

    error: Exception


@dataclass(slots=True)
class LeasedJob:
    """A job between the pipeline's stages (see :meth:`ich_node.service.worker.Worker.run`).

    Mutable on purpose: each stage adds what it learnt (the series, the times,
    an error) and the results stage reads it all at the end.
    """

    job: JobRecord
    started: float  # perf_counter() when leased
    times: dict[str, float]
    batches: queue.Queue[Any]  # (hu, images) | DecodeFailed | END
    cancel: threading.Event
    series: CTSeries | None = None  # once its headers are read
    error: Exception | None = None
    slot: bool = False  # holds one of the pipeline's MAX_HELD_JOBS slots
    phi: int = 0  # token of the series' PHI values in the log scrubber (ich_node.log.PHI)

    def drain(self) -> None:
        """Take the rest of the batch stream up to :data:`END` (the reader then goes on)."""
        while self.batches.get() is not END:
            pass


class Leases:
    """The jobs one worker holds, in any stage, and its :data:`MAX_HELD_JOBS` slots.

    The heartbeat thread extends every held job's lease (:meth:`keep`); a job is
    held from its lease until it reaches a recorded state (:meth:`let_go`).
    """

    def __init__(self, job_queue: JobQueue) -> None:
        self.queue = job_queue
        self._held: dict[str, JobRecord] = {}
        self._lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_HELD_JOBS)

    def hold(self, job: JobRecord) -> None:
        """Count ``job`` as in progress: :meth:`keep` extends its lease until :meth:`drop`."""
        with self._lock:
            self._held[job.job_id] = job

    def drop(self, job: JobRecord) -> None:
        """``job`` has reached a recorded state: stop extending its lease."""
        with self._lock:
            held = self._held.get(job.job_id)
            if held is not None and held.attempts == job.attempts:  # not a newer lease
                del self._held[job.job_id]

    def held(self) -> list[JobRecord]:
        """The jobs held, in any stage."""
        with self._lock:
            return list(self._held.values())

    def keep(self, now: float) -> list[JobRecord]:
        """Extend the leases of the jobs in progress; returns them.

        Called from the heartbeat thread; a lost lease is only logged here, the
        job's own completion then finds it lost and records nothing.
        """
        jobs = self.held()
        for job in jobs:
            try:
                self.queue.extend(job, now)
            except LeaseLost:
                log.warning("job.lease_lost", job_id=job.job_id, attempt=job.attempts)
            except Exception as exc:  # a busy database: the next beat tries again
                log.warning("job.lease_not_extended", job_id=job.job_id, error=type(exc).__name__)
        return jobs

    def let_go(self, item: LeasedJob) -> None:
        """The job has a recorded state: stop extending its lease, free its pipeline slot."""
        self.drop(item.job)
        if item.slot:
            item.slot = False
            self.slots.release()


class ReadStage:
    """Stage 1: lease, read the headers, decode and preprocess ahead.

    Parameters
    ----------
    config : NodeConfig
        ``series`` (reading rules), ``storage.dir``, ``queue``.
    name : str
        The worker's name in leases.
    store : Store
        The node's store (instance paths).
    leases : Leases
        The worker's held jobs and slots.
    classifier : ich_node.model.inference.Classifier
        Gives the series' batches (:meth:`~ich_node.model.inference.Classifier.prepared_batches`).
    batches_ahead : int
        Batches decoded ahead of the model (memory: each is ``model.batch_size``
        slices of HU and model input).
    """

    def __init__(
        self,
        config: NodeConfig,
        name: str,
        store: Store,
        leases: Leases,
        classifier: Any,
        *,
        batches_ahead: int = 2,
    ) -> None:
        if batches_ahead < 1:
            raise ValueError(f"batches_ahead must be at least 1, got {batches_ahead!r}")
        self.config = config
        self.name = name
        self.store = store
        self.leases = leases
        self.classifier = classifier
        self.batches_ahead = batches_ahead
        # With PostgreSQL, leases only where the shared storage.dir is mounted (its
        # store-id file names this database): a host without it leaves the jobs to
        # the others instead of failing them.
        self.storage = StorageWatch(
            store,
            "worker.storage_not_mounted",
            worker=name,
            storage_dir=str(config.storage.dir),
            action="not leasing until the shared storage is back",
        )

    def open(self, job: JobRecord) -> LeasedJob:
        """Hold a just-leased ``job`` and scrub its patient's identifiers from the log."""
        self.leases.hold(job)
        # The patient's name, ID and birth date are scrubbed from every message
        # until the job's summary line; read raw from a few headers (the first,
        # middle and last file), before any library can warn about them.
        paths = self.store.instance_paths(job.series_instance_uid)
        values: dict[str, str] = {}
        for path in {paths[0], paths[len(paths) // 2], paths[-1]} if paths else ():
            values |= phi_values_of_file(path)
        return LeasedJob(
            job=job,
            started=time.perf_counter(),
            times={},
            batches=queue.Queue(maxsize=self.batches_ahead),
            cancel=threading.Event(),
            phi=PHI.hold(values),
        )

    def read(self, job: JobRecord, times: dict[str, float]) -> CTSeries:
        """The series' headers (slice order, geometry); pixels are decoded later."""
        t = time.perf_counter()
        uid = job.series_instance_uid
        # This version's instances; all of them if clocks disagree (none by then).
        paths = self.store.instance_paths(uid, received_by=job.created_at)
        series = read_series(
            paths or self.store.instance_paths(uid),
            max_tilt_deg=self.config.series.max_tilt_degrees,
            preferred_kernels=self.config.series.preferred_kernels,
            max_gap_mm=self.config.series.max_gap_mm,
            pool=self.classifier.header_pool,
        )
        # What the reading did (images left out, notes): UIDs, counts and reasons only.
        log.info(
            "job.series_read",
            job_id=job.job_id,
            series_instance_uid=uid,
            n_slices=len(series.slices),
            n_dropped=len(series.dropped),
            notes=[n.kind for n in series.notes] or None,
            coverage_incomplete=series.coverage_incomplete,
        )
        times["read_s"] = time.perf_counter() - t
        times["n_slices"] = float(len(series.slices))
        return series

    def decode(self, item: LeasedJob) -> None:
        """Feed ``item.batches`` with the series' decoded batches, then :data:`END`."""
        try:
            for batch in self.classifier.prepared_batches(item.series):
                if item.cancel.is_set():  # the model stage gave up on this job
                    break
                item.batches.put(batch)
        except Exception as exc:
            item.batches.put(DecodeFailed(exc))
        finally:
            item.batches.put(END)

    def idle(self, stop: threading.Event, poll_seconds: float) -> None:
        """Wait for work: the poll interval, or on PostgreSQL until a job is notified."""
        if hasattr(self.store, "wait_for_jobs") and not stop.is_set():
            try:
                wait_for_jobs(self.store, IDLE_WAIT_SECONDS)
                return
            except Exception as exc:  # the database went away: poll until it is back
                log.error("worker.listen_failed", worker=self.name, error=type(exc).__name__)
        stop.wait(poll_seconds)

    def run(
        self,
        stop: threading.Event,
        ready: queue.Queue[LeasedJob | None],
        poll_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        """The reader thread: lease, read, decode ahead; ``None`` into ``ready`` at the end."""
        slots = self.leases.slots
        try:
            while not stop.is_set():
                if not slots.acquire(timeout=poll_seconds):
                    continue  # MAX_HELD_JOBS held: wait for the results stage
                job = None
                try:
                    if not stop.is_set() and self.storage.ready():
                        job = self.leases.queue.lease(self.name, clock())
                except Exception as exc:  # a busy database: try again
                    log.error("worker.lease_failed", worker=self.name, error=type(exc).__name__)
                if job is None:
                    slots.release()
                    self.idle(stop, poll_seconds)
                    continue
                with job_context(job.job_id):
                    item = self.open(job)
                    item.slot = True
                    try:
                        item.series = self.read(job, item.times)
                    except Exception as exc:
                        item.error = exc
                    ready.put(item)
                    if item.error is None:
                        self.decode(item)  # blocks while the model is batches_ahead behind
        finally:
            ready.put(None)
