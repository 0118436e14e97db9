"""The worker: a separate process that reads queued series with the model.

Each worker leases a job, reads the series' headers and pixels
(:mod:`ich_node.imaging`), classifies it (:class:`ich_node.inference.Classifier`),
writes ``findings.json`` and the DICOM results (:mod:`ich_node.results`) into a
temporary folder, renames it to ``<storage.dir>/results/<job_id>`` and then, in
one transaction, marks the job done and writes its outbox. A worker that dies
anywhere before that transaction leaves the job leased; the supervisor (or the
lease expiry) gives it back and the whole job runs again, replacing the folder,
so each series version is delivered once.

Run by :mod:`ich_node.service.serve` through ``multiprocessing`` (spawn); this is the
only process of the node that imports torch.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pydicom
import structlog

from ich_node.config import NodeConfig
from ich_node.durable import fsync_dir
from ich_node.imaging import SeriesRefused, read_series
from ich_node.imaging.records import one_line
from ich_node.log import PHI, job_context, phi_values_of_file, redact, warning_counts
from ich_node.queue.backend import StorageWatch, job_queue, open_store, wait_for_jobs
from ich_node.queue.jobs import LeaseLost
from ich_node.queue.layout import StorageLayout
from ich_node.queue.store import JobRecord, JobStage, SrReference, Store

log = structlog.get_logger(__name__)

#: Seconds between two worker heartbeats in the store.
HEARTBEAT_SECONDS = 1.0

#: Jobs one worker holds at most: one writing results, one waiting for that, one
#: on the model (or being read and decoded ahead).
MAX_HELD_JOBS = 3
#: Seconds an idle worker on PostgreSQL waits for a job notification (LISTEN) before
#: looking again (retries whose backoff ended are not notified).
IDLE_WAIT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What one job attempt ended with."""

    job_id: str
    state: str  # done | retry | parked | lost
    n_files: int
    reason: str


class _End:
    """The last item of a job's batch stream."""


_END = _End()


@dataclass(frozen=True, slots=True)
class _DecodeFailed:
    """A batch that could not be decoded: the job fails with this error."""

    error: Exception


@dataclass(slots=True)
class _Leased:
    """A job between the pipeline's stages (see :meth:`Worker.run`)."""

    job: JobRecord
    started: float  # perf_counter() when leased
    times: dict[str, float]
    batches: queue.Queue[Any]  # (hu, images) | _DecodeFailed | _END
    cancel: threading.Event
    series: Any = None  # CTSeries once its headers are read
    error: Exception | None = None
    slot: bool = False  # holds one of the pipeline's MAX_HELD_JOBS slots
    phi: int = 0  # token of the series' PHI values in the log scrubber (ich_node.log.PHI)


class Worker:
    """Lease and run jobs with a loaded classifier.

    :meth:`run` (what a worker process does) runs jobs as a three-stage pipeline,
    so that the device never waits for the disk or the encoders:

    1. the *reader* thread leases a job, reads its headers and decodes and
       preprocesses its slices, a bounded number of batches ahead;
    2. the calling thread runs the model on those batches;
    3. the *results* thread writes ``findings.json``, the heatmaps and the SR,
       renames the folder and completes the job.

    While job N's results are encoded, job N+1 is on the device and job N+2's
    first batches are decoded; a worker holds at most :data:`MAX_HELD_JOBS`
    leases. Each job still ends in its own transaction: a worker that dies
    leaves each of its jobs leased, and each runs again. :meth:`process` runs
    one job through the same stages in one thread.

    Parameters
    ----------
    config : NodeConfig
        The node's configuration (``model``, ``results``, ``queue``,
        ``series.max_tilt_degrees``, ``storage.dir``, ``destinations``).
    name : str
        This worker's name in leases and heartbeats.
    store : Store
        The node's store (this process's own connection; it serialises threads).
    classifier : ich_node.inference.Classifier
        The loaded model.
    batches_ahead : int
        Batches the reader decodes ahead of the model (memory: each is
        ``model.batch_size`` slices of HU and model input).
    """

    def __init__(
        self,
        config: NodeConfig,
        name: str,
        store: Store,
        classifier: Any,
        *,
        batches_ahead: int = 2,
    ) -> None:
        if batches_ahead < 1:
            raise ValueError(f"batches_ahead must be at least 1, got {batches_ahead!r}")
        self.config = config
        self.name = name
        self.store = store
        self.queue = job_queue(store, config.queue)
        self.classifier = classifier
        self.batches_ahead = batches_ahead
        self._held: dict[str, JobRecord] = {}
        self._held_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_HELD_JOBS)
        # With PostgreSQL, leases only where the shared storage.dir is mounted (its
        # store-id file names this database): a host without it leaves the jobs to
        # the others instead of failing them.
        self._storage = StorageWatch(
            store,
            "worker.storage_not_mounted",
            worker=name,
            storage_dir=str(config.storage.dir),
            action="not leasing until the shared storage is back",
        )

    # -- leases ---------------------------------------------------------------

    def hold(self, job: JobRecord) -> None:
        """Count ``job`` as in progress: the heartbeat extends its lease until :meth:`drop`."""
        with self._held_lock:
            self._held[job.job_id] = job

    def drop(self, job: JobRecord) -> None:
        """``job`` has reached a recorded state: stop extending its lease."""
        with self._held_lock:
            held = self._held.get(job.job_id)
            if held is not None and held.attempts == job.attempts:  # not a newer lease
                del self._held[job.job_id]

    def held(self) -> list[JobRecord]:
        """The jobs this worker holds, in any stage."""
        with self._held_lock:
            return list(self._held.values())

    def keep_lease(self, now: float) -> list[JobRecord]:
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

    # -- stages ---------------------------------------------------------------

    def _read(self, job: JobRecord, times: dict[str, float]) -> Any:
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

    def _options(self) -> Any:
        """The ``results`` section as :class:`ich_node.results.build.ResultOptions`."""
        from ich_node.results.build import ResultOptions

        return ResultOptions(
            heatmaps=self.config.results.heatmaps,
            negative_top_slices=self.config.results.negative_top_slices,
            parametric_map=self.config.results.parametric_map,
            key_objects=self.config.results.key_objects,
        )

    def _alert(self, item: _Leased, prediction: Any) -> None:
        """Record this version's alerts as soon as its probabilities are known.

        Before Grad-CAM, heatmaps and the SR: the serving process's alert thread
        sends them at once. A failure to record fails the job (it runs again;
        an alert is never sent unrecorded, and recorded ones are not repeated).
        """
        if not self.config.notifications:
            return
        from ich_node.delivery.outbox import prepare_alerts
        from ich_node.results.common import source_header

        t = time.perf_counter()
        job = item.job
        alerts = prepare_alerts(
            self.store,
            self.config.storage.dir,
            self.config.notifications,
            job_id=job.job_id,
            version=job.version,
            created_at=job.created_at,
            findings=dataclasses.replace(prediction.findings, version=job.version),
            header=source_header(prediction.series),
            hu_of=lambda i: prediction.hu[i],
            now=time.time(),
        )
        item.times["alert_s"] = time.perf_counter() - t
        if alerts:
            log.info(
                "job.alerts_recorded",
                job_id=job.job_id,
                targets=[a.target for a in alerts],
                positive=[a.positive for a in alerts],
                status=[a.status for a in alerts],
            )

    def _explain(self, prediction: Any) -> Any:
        """Model stage: Grad-CAM maps and the source header, as an ``ExplainedSeries``.

        Runs in the thread that runs the model, so the results stage gets plain
        data and never touches the classifier.
        """
        from ich_node.model.explain import explain_series

        options = self._options()
        return explain_series(
            prediction,
            self.classifier,
            negative_top_slices=options.negative_top_slices,
            explain_slices=options.needs_explanations,
        )

    def _write_outputs(
        self, job: JobRecord, explained: Any, folder: Path
    ) -> tuple[int, SrReference | None]:
        """``findings.json`` and the DICOM results into ``folder``.

        Returns the number of DICOM objects written and the UIDs of the SR (which
        a later version of the series names as its predecessor).
        """
        from ich_node.results.build import ResultsSkipped, build_results, write_results
        from ich_node.results.findings import write_findings

        write_findings(
            folder / "findings.json", dataclasses.replace(explained.findings, version=job.version)
        )
        # The SR of the latest earlier version that was done and sent: this one supersedes it.
        previous = self.store.previous_sr(job.series_instance_uid, job.version)
        previous_sr = None
        if previous is not None:
            previous_sr = pydicom.Dataset()
            previous_sr.StudyInstanceUID = previous.study_instance_uid
            previous_sr.SeriesInstanceUID = previous.series_instance_uid
            previous_sr.SOPClassUID = previous.sop_class_uid
            previous_sr.SOPInstanceUID = previous.sop_instance_uid
        try:
            results = build_results(
                explained,
                self.classifier.card,
                self._options(),
                version=job.version,
                previous_sr=previous_sr,
            )
        except ResultsSkipped as exc:
            log.info("job.results_skipped", job_id=job.job_id, reason=str(exc))
            return 0, None
        written = write_results(results, folder / "outbox")
        sr = results.sr
        reference = SrReference(
            str(sr.StudyInstanceUID),
            str(sr.SeriesInstanceUID),
            str(sr.SOPClassUID),
            str(sr.SOPInstanceUID),
        )
        return sum(1 for p in written if p.suffix == ".dcm"), reference

    def _finish(
        self,
        item: _Leased,
        explained: Any,
        error: Exception | None,
        clock: Callable[[], float],
    ) -> JobOutcome:
        """Bring a job to a recorded state (done, retry, parked or lost); never raises."""
        job, times = item.job, item.times
        layout = StorageLayout(self.config.storage.dir)
        final = layout.results_dir(job.job_id)
        tmp = layout.results_temp(job.job_id, os.getpid())
        try:
            if error is not None:
                raise error
            t = time.perf_counter()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            n_files, sr = self._write_outputs(job, explained, tmp)
            times["results_s"] = time.perf_counter() - t
            times["positive"] = float(
                sum(1 for f in explained.findings.series.values() if f.positive)
            )
            shutil.rmtree(final, ignore_errors=True)  # a crashed earlier attempt's output
            os.replace(tmp, final)
            fsync_dir(final.parent)
            self.queue.complete(
                job, [d.name for d in self.config.destinations], n_files, clock(), sr=sr
            )
            outcome = JobOutcome(job.job_id, "done", n_files, "")
        except LeaseLost as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = JobOutcome(job.job_id, "lost", 0, str(exc))
        except Exception as exc:  # recorded with its reason, retried or parked
            shutil.rmtree(tmp, ignore_errors=True)
            from ich_node.results.build import ResultsError

            # An encoding error, or a series refused for its content, comes back on
            # every attempt: parked at once, with its reason.
            permanent = isinstance(exc, ResultsError | SeriesRefused)
            # One line (decoders list their plugins' errors on several): the refusal record,
            # naming attributes, never header values (ich_node.log.redact).
            reason = redact(
                one_line(
                    exc.reason if isinstance(exc, ResultsError) else f"{type(exc).__name__}: {exc}",
                    500,
                )
            )
            try:
                state = self.queue.fail(job, reason, clock(), permanent=permanent)
            except LeaseLost:
                state = "lost"
            except Exception as db_exc:  # the lease expires and the job runs again
                log.error("job.fail_not_recorded", job_id=job.job_id, error=type(db_exc).__name__)
                state = "lost"
            outcome = JobOutcome(job.job_id, state, 0, reason)
        finally:
            self._let_go(item)
        self._report(item, outcome, clock)
        return outcome

    def _stage(self, item: _Leased, stage: JobStage, clock: Callable[[], float]) -> None:
        """Record that ``item`` enters ``stage``; never raises.

        If this worker dies, only the job on the model is charged the attempt
        (:meth:`ich_node.queue.jobs.JobQueue.release_worker`). A lost lease is found
        again, and recorded, when the job finishes.
        """
        try:
            self.queue.set_stage(item.job, stage, clock())
        except LeaseLost:
            pass
        except Exception as exc:  # a busy database: the job still runs
            log.warning("job.stage_not_recorded", job_id=item.job.job_id, error=type(exc).__name__)

    def _let_go(self, item: _Leased) -> None:
        """The job has a recorded state: stop extending its lease, free its pipeline slot."""
        self.drop(item.job)
        if item.slot:
            item.slot = False
            self._slots.release()

    def _give_back(self, item: _Leased, clock: Callable[[], float]) -> JobOutcome:
        """A job that never reached the model, returned to the queue at a stop; never raises."""
        job = item.job
        item.cancel.set()
        if item.error is None:  # its reader is decoding: take the rest, up to _END
            while item.batches.get() is not _END:
                pass
        try:
            self.queue.give_back(job, clock())
            outcome = JobOutcome(job.job_id, "queued", 0, "given back at stop, not run")
        except LeaseLost as exc:
            outcome = JobOutcome(job.job_id, "lost", 0, str(exc))
        except Exception as exc:  # the lease expires and the job runs again
            outcome = JobOutcome(job.job_id, "lost", 0, f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self._let_go(item)
        self._report(item, outcome, clock)
        return outcome

    def _report(self, item: _Leased, outcome: JobOutcome, clock: Callable[[], float]) -> None:
        job, times = item.job, item.times
        total_s = time.perf_counter() - item.started
        try:  # stage latencies for the metrics (the serving process exports them)
            stages: dict[str, float] = {
                k: times[k] for k in ("read_s", "infer_s", "results_s") if k in times
            }
            if outcome.state == "done":
                stages["job_s"] = total_s
            if stages:
                self.store.add_stage_times(job.job_id, stages, clock())
        except Exception as exc:  # metrics must never fail a job
            log.warning("job.timings_not_recorded", job_id=job.job_id, error=type(exc).__name__)
        # One summary line per job: times of each stage, UIDs and counts only.
        log.info(
            "job.finished",
            job_id=job.job_id,
            series_instance_uid=job.series_instance_uid,
            version=job.version,
            attempt=job.attempts,
            state=outcome.state,
            n_files=outcome.n_files,
            n_slices=int(times.get("n_slices", 0)),
            positive_labels=int(times.get("positive", 0)),
            read_s=round(times.get("read_s", 0.0), 3),
            infer_s=round(times.get("infer_s", 0.0), 3),
            results_s=round(times.get("results_s", 0.0), 3),
            alert_s=round(times["alert_s"], 3) if "alert_s" in times else None,
            total_s=round(total_s, 3),
            reason=outcome.reason or None,
            library_warnings=warning_counts(job.job_id) or None,
        )
        PHI.release(item.phi)

    def _leased(self, job: JobRecord) -> _Leased:
        self.hold(job)
        # The patient's name, ID and birth date are scrubbed from every message
        # until the job's summary line; read raw from a few headers (the first,
        # middle and last file), before any library can warn about them.
        paths = self.store.instance_paths(job.series_instance_uid)
        values: dict[str, str] = {}
        for path in {paths[0], paths[len(paths) // 2], paths[-1]} if paths else ():
            values |= phi_values_of_file(path)
        return _Leased(
            job=job,
            started=time.perf_counter(),
            times={},
            batches=queue.Queue(maxsize=self.batches_ahead),
            cancel=threading.Event(),
            phi=PHI.hold(values),
        )

    def _decode(self, item: _Leased) -> None:
        """Feed ``item.batches`` with the series' decoded batches, then ``_END``."""
        try:
            for batch in self.classifier.prepared_batches(item.series):
                if item.cancel.is_set():  # the model stage gave up on this job
                    break
                item.batches.put(batch)
        except Exception as exc:
            item.batches.put(_DecodeFailed(exc))
        finally:
            item.batches.put(_END)

    def _infer(self, item: _Leased) -> tuple[Any, Exception | None]:
        """Run the model on the batches and explain; (explained, None) or (None, error)."""
        if item.error is not None:
            return None, item.error

        ended = False

        def batches() -> Iterator[tuple[Any, Any]]:
            nonlocal ended
            while True:
                got = item.batches.get()
                if got is _END:
                    ended = True
                    return
                if isinstance(got, _DecodeFailed):
                    raise got.error
                yield got

        t = time.perf_counter()
        try:
            prediction = self.classifier.predict_prepared(item.series, batches())
            if not ended:  # the model stopped early: take the rest so the reader can go on
                raise RuntimeError("the model stage did not read the whole series")
            self._alert(item, prediction)  # alert first: before heatmaps and the SR
            explained = self._explain(prediction)
        except Exception as exc:
            item.cancel.set()
            while not ended and item.batches.get() is not _END:  # let the reader finish
                pass
            return None, exc
        finally:
            item.times["infer_s"] = time.perf_counter() - t
        return explained, None

    # -- one job, one thread --------------------------------------------------

    def process(self, job: JobRecord, clock: Callable[[], float]) -> JobOutcome:
        """Run one leased job to a recorded state in this thread; never raises.

        :meth:`Classifier.predict_series` decodes the next batches in threads of
        its own while this one runs the model.
        """
        with job_context(job.job_id):
            return self._process(job, clock)

    def _process(self, job: JobRecord, clock: Callable[[], float]) -> JobOutcome:
        item = self._leased(job)
        explained, error = None, None
        try:
            item.series = self._read(job, item.times)
            started = time.perf_counter()
            self._stage(item, "model", clock)
            prediction = self.classifier.predict_series(item.series)
            self._alert(item, prediction)
            explained = self._explain(prediction)
            item.times["infer_s"] = time.perf_counter() - started
            self._stage(item, "results", clock)
        except Exception as exc:
            error = exc
        return self._finish(item, explained, error, clock)

    def _idle(self, stop: threading.Event, poll_seconds: float) -> None:
        """Wait for work: the poll interval, or on PostgreSQL until a job is notified."""
        if hasattr(self.store, "wait_for_jobs") and not stop.is_set():
            try:
                wait_for_jobs(self.store, IDLE_WAIT_SECONDS)
                return
            except Exception as exc:  # the database went away: poll until it is back
                log.error("worker.listen_failed", worker=self.name, error=type(exc).__name__)
        stop.wait(poll_seconds)

    def run_once(self, now: float, clock: Callable[[], float] = time.time) -> JobOutcome | None:
        """Lease one job and run it; ``None`` when nothing is runnable at ``now``."""
        job = self.queue.lease(self.name, now)
        if job is None:
            return None
        return self.process(job, clock)

    # -- the pipeline ---------------------------------------------------------

    def _reader(
        self,
        stop: threading.Event,
        ready: queue.Queue[_Leased | None],
        poll_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        """Stage 1: lease, read headers, decode ahead; ``None`` into ``ready`` at the end."""
        try:
            while not stop.is_set():
                if not self._slots.acquire(timeout=poll_seconds):
                    continue  # MAX_HELD_JOBS held: wait for the results stage
                job = None
                try:
                    if not stop.is_set() and self._storage.ready():
                        job = self.queue.lease(self.name, clock())
                except Exception as exc:  # a busy database: try again
                    log.error("worker.lease_failed", worker=self.name, error=type(exc).__name__)
                if job is None:
                    self._slots.release()
                    self._idle(stop, poll_seconds)
                    continue
                with job_context(job.job_id):
                    item = self._leased(job)
                    item.slot = True
                    try:
                        item.series = self._read(job, item.times)
                    except Exception as exc:
                        item.error = exc
                    ready.put(item)
                    if item.error is None:
                        self._decode(item)  # blocks while the model is batches_ahead behind
        finally:
            ready.put(None)

    def _results(self, finishing: queue.Queue[Any], clock: Callable[[], float]) -> None:
        """Stage 3: write each job's results and record its state, until ``None``."""
        while (entry := finishing.get()) is not None:
            item, prediction, error = entry
            try:
                with job_context(item.job.job_id):
                    self._finish(item, prediction, error, clock)
            except Exception as exc:  # _finish records everything itself; never stop here
                log.error("job.finish_failed", job_id=item.job.job_id, error=type(exc).__name__)

    def run(
        self,
        stop: threading.Event,
        poll_seconds: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Run jobs as the three-stage pipeline until ``stop`` is set.

        After ``stop`` no new job is leased; a leased job that has not reached
        the model yet is given back to the queue (its attempt not counted), and
        the ones on the model or writing results are finished and recorded
        before this returns.
        """
        ready: queue.Queue[_Leased | None] = queue.Queue(maxsize=1)
        finishing: queue.Queue[Any] = queue.Queue(maxsize=1)
        reader = threading.Thread(
            target=self._reader,
            args=(stop, ready, poll_seconds, clock),
            name=f"reader-{self.name}",
            daemon=True,
        )
        results = threading.Thread(
            target=self._results, args=(finishing, clock), name=f"results-{self.name}", daemon=True
        )
        reader.start()
        results.start()
        try:
            while (item := ready.get()) is not None:
                if stop.is_set():
                    self._give_back(item, clock)
                    continue
                self._stage(item, "model", clock)
                with job_context(item.job.job_id):
                    prediction, error = self._infer(item)
                self._stage(item, "results", clock)
                finishing.put((item, prediction, error))
        finally:
            finishing.put(None)
            results.join()
            reader.join()


def lease_extend_seconds(lease_seconds: float) -> float:
    """How often a running job's lease is extended: a quarter of the lease, at least 1 s."""
    return max(HEARTBEAT_SECONDS, lease_seconds / 4.0)


class _Heartbeat(threading.Thread):
    """Exit when orphaned; once the model is loaded, beat and extend the job's lease.

    An orphan must not go on: the restarted node gives its leases to new workers.
    The check runs from the first moments of the process (``parent`` is the
    node's pid, passed in, not read later), so a worker whose node died while
    it was still loading the model exits too.
    """

    def __init__(self, store: Store, name: str, parent: int) -> None:
        super().__init__(name=f"heartbeat-{name}", daemon=True)
        self.store = store
        self.worker = name
        self.runner: Worker | None = None  # set once the model is loaded
        self.parent = parent
        self.stop = threading.Event()

    def run(self) -> None:
        extended_at = 0.0
        while not self.stop.is_set():
            if os.getppid() != self.parent:
                log.error("worker.orphaned", worker=self.worker)
                os._exit(3)
            now = time.time()
            runner = self.runner
            try:
                if runner is not None:
                    self.store.heartbeat(self.worker, os.getpid(), now)
                    if now - extended_at >= lease_extend_seconds(runner.config.queue.lease_seconds):
                        runner.keep_lease(now)
                        extended_at = now
            except Exception as exc:  # a busy database must not kill the worker
                log.warning("worker.heartbeat_failed", error=type(exc).__name__)
            self.stop.wait(HEARTBEAT_SECONDS / 4 if runner is None else HEARTBEAT_SECONDS)


def worker_main(
    config: NodeConfig, name: str, poll_seconds: float = 0.05, parent: int | None = None
) -> int:
    """Entry point of a worker process: load the model, run jobs until SIGTERM/SIGINT."""
    os.umask(0o077)  # results hold patient data: owner-only files and folders
    try:
        from ich_node.log import configure_logging

        configure_logging(config.logging.format, config.logging.level)
    except ImportError:
        pass
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # lease no more; finish the jobs on the model or writing results, then exit

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log.info("worker.starting", worker=name, pid=os.getpid())
    store = open_store(config.storage)
    heartbeat = _Heartbeat(store, name, os.getppid() if parent is None else parent)
    heartbeat.start()

    from ich_node.model.bundle import load_bundle
    from ich_node.model.inference import Classifier

    if config.model.bundle is None:
        log.error("worker.no_bundle", worker=name)
        return 2
    bundle = load_bundle(config.model.bundle)
    classifier = Classifier(
        bundle,
        device=config.model.device,
        batch_size=config.model.batch_size,
        precision=config.model.precision,
        compile=config.model.compile,
        decode_threads=config.model.decode_threads,
        tta=config.model.tta,
    )
    # Compilation and kernel selection are paid here, once, not by the first study.
    warmup_s = classifier.warmup()
    worker = Worker(config, name, store, classifier)
    heartbeat.runner = worker
    log.info(
        "worker.ready",
        worker=name,
        model=bundle.card.name,
        version=bundle.card.version,
        device=str(classifier.device),
        warmup_s=round(warmup_s, 2),
    )
    worker.run(stop, poll_seconds)
    # Joined, not left to die with the interpreter: a daemon thread woken during
    # finalisation can abort the process ("terminate called without an active
    # exception", seen in the Docker image on Debian's Python 3.11).
    heartbeat.stop.set()
    heartbeat.join(4 * HEARTBEAT_SECONDS)
    log.info("worker.stopped", worker=name)
    return 0


def _process_entry(config: NodeConfig, name: str, parent: int | None = None) -> None:
    """``multiprocessing`` target: exit with :func:`worker_main`'s code.

    A bundle that cannot be loaded exits 2 (the supervisor does not restart it);
    any other exception is one log line and exit code 1, never a traceback on
    stderr (the supervisor logs each death and bounds the restarts).
    """
    from ich_node.model.bundle import BUNDLE_HELP, BundleError

    try:
        code = worker_main(config, name, parent=parent)
    except BundleError as exc:
        log.error(
            "worker.bad_bundle", worker=name, key="model.bundle", error=str(exc), help=BUNDLE_HELP
        )
        code = 2
    except Exception as exc:
        log.error("worker.crashed", worker=name, error=f"{type(exc).__name__}: {exc}"[:500])
        code = 1
    raise SystemExit(code)
