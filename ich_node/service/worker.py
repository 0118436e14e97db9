"""The worker: a separate process that reads queued series with the model.

Each worker leases a job, reads the series' headers and pixels
(:mod:`ich_node.imaging`), classifies it (:class:`ich_node.model.inference.Classifier`),
writes ``findings.json`` and the DICOM results (:mod:`ich_node.results`) into a
temporary folder, renames it to ``<storage.dir>/results/<job_id>`` and then, in
one transaction, marks the job done and writes its outbox. A worker that dies
anywhere before that transaction leaves the job leased; the supervisor (or the
lease expiry) gives it back and the whole job runs again, replacing the folder,
so each series version is delivered once.

The pipeline's stages are modules of their own: :mod:`~ich_node.service.read_stage`
(lease, headers, decoding ahead), :mod:`~ich_node.service.model_stage` (classify,
alert, explain) and :mod:`~ich_node.service.results_stage` (write, complete, record
failures); with ``series.streaming``, :mod:`~ich_node.service.stream_stage` scores
slices while their series arrives, so that a complete series leaves the model
little to do. This module wires them into threads and runs the worker process.

Run by :mod:`ich_node.service.serve` through ``multiprocessing`` (spawn); this is the
only process of the node that imports torch.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog

from ich_node.config import NodeConfig
from ich_node.log import job_context
from ich_node.queue.backend import job_queue, open_store
from ich_node.queue.jobs import LeaseLost
from ich_node.queue.store import JobRecord, JobStage, Store
from ich_node.service.model_stage import ModelStage
from ich_node.service.read_stage import MAX_HELD_JOBS, LeasedJob, Leases, ReadStage
from ich_node.service.results_stage import JobOutcome, ResultsStage
from ich_node.service.spawn import WORKER_EXIT_BAD_DEVICE
from ich_node.service.stream_stage import Streams, StreamStage

log = structlog.get_logger(__name__)

__all__ = [
    "HEARTBEAT_SECONDS",
    "MAX_HELD_JOBS",
    "JobOutcome",
    "Worker",
    "lease_extend_seconds",
    "worker_main",
]

#: Seconds between two worker heartbeats in the store.
HEARTBEAT_SECONDS = 1.0


class Worker:
    """Lease and run jobs with a loaded classifier.

    :meth:`run` (what a worker process does) runs jobs as a three-stage pipeline,
    so that the device never waits for the disk or the encoders:

    1. the *reader* thread (:class:`~ich_node.service.read_stage.ReadStage`) leases
       a job, reads its headers and decodes and preprocesses its slices, a bounded
       number of batches ahead;
    2. the calling thread (:class:`~ich_node.service.model_stage.ModelStage`) runs
       the model on those batches, records the alerts, makes the Grad-CAM maps;
    3. the *results* thread (:class:`~ich_node.service.results_stage.ResultsStage`)
       writes ``findings.json``, the heatmaps and the SR, renames the folder and
       completes the job.

    While job N's results are encoded, job N+1 is on the device and job N+2's
    first batches are decoded; a worker holds at most :data:`MAX_HELD_JOBS`
    leases. Each job still ends in its own transaction: a worker that dies
    leaves each of its jobs leased, and each runs again. :meth:`process` runs
    one job through the same stages in one thread.

    The stage classes are class attributes, so a subclass can swap one (tests
    slow a stage down or watch it).

    Parameters
    ----------
    config : NodeConfig
        The node's configuration (``model``, ``results``, ``queue``,
        ``series``, ``storage.dir``, ``destinations``, ``notifications``).
    name : str
        This worker's name in leases and heartbeats.
    store : Store
        The node's store (this process's own connection; it serialises threads).
    classifier : ich_node.model.inference.Classifier
        The loaded model.
    batches_ahead : int
        Batches the reader decodes ahead of the model (memory: each is
        ``model.batch_size`` slices of HU and model input).
    """

    read_stage: type[ReadStage] = ReadStage
    model_stage: type[ModelStage] = ModelStage
    results_stage: type[ResultsStage] = ResultsStage
    stream_stage: type[StreamStage] = StreamStage

    def __init__(
        self,
        config: NodeConfig,
        name: str,
        store: Store,
        classifier: Any,
        *,
        batches_ahead: int = 2,
    ) -> None:
        self.config = config
        self.name = name
        self.store = store
        self.queue = job_queue(store, config.queue)
        self.classifier = classifier
        self.leases = Leases(self.queue)
        self.reader = self.read_stage(
            config, name, store, self.leases, classifier, batches_ahead=batches_ahead
        )
        # A slice's outputs must not depend on the batch it ran in: the streaming read
        # keeps them, and the read at completion must equal one from scratch.
        if getattr(classifier, "min_batch", None) == 1:
            classifier.fix_batch_numerics()
        self.model_lock = threading.Lock()  # one thread at a time runs the model
        self.streams = Streams()
        self.model = self.model_stage(
            config, store, classifier, streams=self.streams, lock=self.model_lock
        )
        self.streamer = (
            self.stream_stage(config, name, store, classifier, self.streams, self.model_lock)
            if config.series.streaming
            else None
        )
        card = getattr(classifier, "card", None)
        device = getattr(classifier, "device", "cpu")
        self.results = self.results_stage(config, store, self.leases, card, device)

    # -- leases (the heartbeat's view) ----------------------------------------

    def hold(self, job: JobRecord) -> None:
        """Count ``job`` as in progress: the heartbeat extends its lease until :meth:`drop`."""
        self.leases.hold(job)

    def drop(self, job: JobRecord) -> None:
        """``job`` has reached a recorded state: stop extending its lease."""
        self.leases.drop(job)

    def held(self) -> list[JobRecord]:
        """The jobs this worker holds, in any stage."""
        return self.leases.held()

    def keep_lease(self, now: float) -> list[JobRecord]:
        """Extend the leases of the jobs in progress; returns them (heartbeat thread)."""
        return self.leases.keep(now)

    def _stage(self, item: LeasedJob, stage: JobStage, clock: Callable[[], float]) -> None:
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

    # -- one job, one thread --------------------------------------------------

    def process(self, job: JobRecord, clock: Callable[[], float]) -> JobOutcome:
        """Run one leased job to a recorded state in this thread; never raises.

        :meth:`Classifier.predict_series` decodes the next batches in threads of
        its own while this one runs the model.
        """
        with job_context(job.job_id):
            item = self.reader.open(job)
            explained, error = None, None
            try:
                item.series = self.reader.read(job, item.times)
                self._stage(item, "model", clock)
                explained = self.model.predict(item)
                self._stage(item, "results", clock)
            except Exception as exc:
                error = exc
            return self.results.finish(item, explained, error, clock)

    def run_once(self, now: float, clock: Callable[[], float] = time.time) -> JobOutcome | None:
        """Lease one job and run it; ``None`` when nothing is runnable at ``now``."""
        job = self.queue.lease(self.name, now)
        if job is None:
            return None
        return self.process(job, clock)

    # -- the pipeline ---------------------------------------------------------

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
        ready: queue.Queue[LeasedJob | None] = queue.Queue(maxsize=1)
        finishing: queue.Queue[Any] = queue.Queue(maxsize=1)
        reader = threading.Thread(
            target=self.reader.run,
            args=(stop, ready, poll_seconds, clock),
            name=f"reader-{self.name}",
            daemon=True,
        )
        results = threading.Thread(
            target=self.results.run,
            args=(finishing, clock),
            name=f"results-{self.name}",
            daemon=True,
        )
        streamer = None
        if self.streamer is not None:
            streamer = threading.Thread(
                target=self.streamer.run,
                args=(stop, lambda: not ready.empty(), clock),
                name=f"stream-{self.name}",
                daemon=True,
            )
        reader.start()
        results.start()
        if streamer is not None:
            streamer.start()
        try:
            while (item := ready.get()) is not None:
                if stop.is_set():
                    self.results.give_back(item, clock)
                    continue
                self._stage(item, "model", clock)
                with job_context(item.job.job_id):
                    explained, error = self.model.infer(item)
                self._stage(item, "results", clock)
                finishing.put((item, explained, error))
        finally:
            finishing.put(None)
            results.join()
            reader.join()
            if streamer is not None:
                streamer.join()


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


class DeviceUnusable(RuntimeError):
    """``model.device`` cannot take the model (no CUDA, too little memory)."""


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
    from ich_node.model.inference import resolve_device

    try:
        device = resolve_device(config.model.device)  # cuda without CUDA: ValueError
    except ValueError as exc:
        raise DeviceUnusable(" ".join(str(exc).split())[:300]) from exc
    try:
        classifier = Classifier(
            bundle,
            device=config.model.device,
            batch_size=config.model.batch_size,
            precision=config.model.precision,
            compile=config.model.compile,
            decode_threads=config.model.decode_threads,
            tta=config.model.tta,
            thresholds={str(k): v for k, v in config.model.thresholds.items()},
        )
    except RuntimeError as exc:  # the model does not fit on the GPU (out of memory)
        if device.type == "cpu":
            raise
        raise DeviceUnusable(" ".join(str(exc).split())[:300]) from exc
    # Compilation and kernel selection are paid here, once, not by the first study;
    # so is the start of the header pool's processes (a second or two).
    try:
        classifier.header_pool.start()
    except Exception as exc:  # no processes here: headers are parsed in the reader thread
        log.warning("worker.header_pool_unavailable", error=type(exc).__name__)
    warmup_s = classifier.warmup()
    worker = Worker(config, name, store, classifier)
    # The SR is encoded in a process of its own, on another core than the heatmaps
    # (ich_node.results.reports); started here, not by the first study.
    from ich_node.results.reports import ReportProcess, freeze_startup_heap

    reports = ReportProcess(config.logging.format, config.logging.level)
    try:
        reports.start()
        worker.results.reports = reports
    except Exception as exc:  # encoded in the results thread instead
        log.warning("worker.report_process_unavailable", error=type(exc).__name__)
    # The encoders (highdicom: about a second to import) here, not in the first study,
    # and what they and the drawing load on first use (highdicom's IOD tables, the
    # head region's libraries): one tiny synthetic heatmap drawn and encoded.
    import ich_node.model.heatmaps
    import ich_node.results.build
    from ich_node.results import sc

    results_warmup_s = ich_node.model.heatmaps.warm_up(classifier.device) + sc.warm_up()
    # What the worker keeps until it exits is loaded now: out of the collector's full
    # collections, which walked all of it (0.3-0.4 s) inside every 13th study or so.
    gc_frozen = freeze_startup_heap()

    heartbeat.runner = worker
    log.info(
        "worker.ready",
        worker=name,
        model=bundle.card.name,
        version=bundle.card.version,
        device=str(classifier.device),
        warmup_s=round(warmup_s, 2),
        results_warmup_s=round(results_warmup_s, 2),
        gc_frozen=gc_frozen,
        mode=config.node.mode,
        thresholds=classifier.thresholds.values,
        thresholds_source=classifier.thresholds.source,
    )
    worker.run(stop, poll_seconds)
    classifier.close()  # the decode and header pools' threads and processes
    reports.close()
    # Joined, not left to die with the interpreter: a daemon thread woken during
    # finalisation can abort the process ("terminate called without an active
    # exception", seen in the Docker image on Debian's Python 3.11).
    heartbeat.stop.set()
    heartbeat.join(4 * HEARTBEAT_SECONDS)
    try:  # a clean stop: gone now, not only once the beat is stale (health)
        store.forget_heartbeat(name)
    except Exception as exc:  # it goes stale instead
        log.warning("worker.heartbeat_not_removed", error=type(exc).__name__)
    log.info("worker.stopped", worker=name)
    return 0


def _process_entry(config: NodeConfig, name: str, parent: int | None = None) -> None:
    """``multiprocessing`` target: exit with :func:`worker_main`'s code.

    A bundle that cannot be loaded exits 2, a ``model.device`` that cannot be used
    :data:`~ich_node.service.spawn.WORKER_EXIT_BAD_DEVICE` (the supervisor restarts
    neither);
    any other exception is one log line and exit code 1, never a traceback on
    stderr (the supervisor logs each death and bounds the restarts).
    """
    from ich_node.model.bundle import BundleError, bundle_help

    try:
        code = worker_main(config, name, parent=parent)
    except BundleError as exc:
        log.error(
            "worker.bad_bundle",
            worker=name,
            key="model.bundle",
            error=str(exc),
            help=bundle_help(exc),
        )
        code = 2
    except DeviceUnusable as exc:
        log.error(
            "worker.bad_device",
            worker=name,
            key="model.device",
            device=config.model.device,
            error=str(exc),
        )
        code = WORKER_EXIT_BAD_DEVICE
    except Exception as exc:
        log.error("worker.crashed", worker=name, error=f"{type(exc).__name__}: {exc}"[:500])
        code = 1
    raise SystemExit(code)
