"""The worker: a separate process that reads queued series with the model.

Each worker leases a job, reads the series' headers and pixels
(:mod:`ich_node.imaging`), classifies it (:class:`ich_node.inference.Classifier`),
writes ``findings.json`` and the DICOM results (:mod:`ich_node.results`) into a
temporary folder, renames it to ``<storage.dir>/results/<job_id>`` and then, in
one transaction, marks the job done and writes its outbox. A worker that dies
anywhere before that transaction leaves the job leased; the supervisor (or the
lease expiry) gives it back and the whole job runs again, replacing the folder,
so each series version is delivered once.

Run by :mod:`ich_node.service` through ``multiprocessing`` (spawn); this is the
only process of the node that imports torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from ich_node.config import NodeConfig
from ich_node.durable import fsync_dir
from ich_node.imaging import read_series
from ich_node.jobs import JobQueue, LeaseLost
from ich_node.store import JobRecord, Store

log = structlog.get_logger(__name__)

#: Seconds between two worker heartbeats in the store.
HEARTBEAT_SECONDS = 1.0


def results_dir(storage_dir: Path, job_id: str) -> Path:
    """Where a job's ``findings.json`` and ``outbox/`` live."""
    return Path(storage_dir) / "results" / job_id


def outbox_files(storage_dir: Path, job_id: str) -> list[Path]:
    """The DICOM objects a job sends (``*.dcm``; PNG previews stay), in a stable order."""
    folder = results_dir(storage_dir, job_id) / "outbox"
    return sorted(p for p in folder.rglob("*.dcm") if p.is_file()) if folder.is_dir() else []


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What one job attempt ended with."""

    job_id: str
    state: str  # done | retry | parked | lost
    n_files: int
    reason: str


class Worker:
    """Lease and run jobs with a loaded classifier.

    Parameters
    ----------
    config : NodeConfig
        The node's configuration (``model``, ``results``, ``queue``,
        ``series.max_tilt_degrees``, ``storage.dir``, ``destinations``).
    name : str
        This worker's name in leases and heartbeats.
    store : Store
        The node's store (this process's own connection).
    classifier : ich_node.inference.Classifier
        The loaded model.
    """

    def __init__(self, config: NodeConfig, name: str, store: Store, classifier: Any) -> None:
        self.config = config
        self.name = name
        self.store = store
        self.queue = JobQueue(store, config.queue)
        self.classifier = classifier
        #: The job being processed (read by the heartbeat thread to extend its lease).
        self.current: JobRecord | None = None

    def keep_lease(self, now: float) -> JobRecord | None:
        """Extend the lease of the job in progress, if any; returns that job.

        Called from the heartbeat thread; a lost lease is only logged here, the
        job's own completion then finds it lost and records nothing.
        """
        job = self.current
        if job is None:
            return None
        try:
            self.queue.extend(job, now)
        except LeaseLost:
            log.warning("job.lease_lost", job_id=job.job_id, attempt=job.attempts)
        return job

    def _build_outputs(self, job: JobRecord, folder: Path, times: dict[str, float]) -> int:
        from ich_node.findings import write_findings

        t = time.perf_counter()
        uid = job.series_instance_uid
        # This version's instances; all of them if clocks disagree (none by then).
        paths = self.store.instance_paths(uid, received_by=job.created_at)
        series = read_series(
            paths or self.store.instance_paths(uid),
            max_tilt_deg=self.config.series.max_tilt_degrees,
        )
        times["read_s"] = time.perf_counter() - t
        t = time.perf_counter()
        prediction = self.classifier.predict_series(series)
        times["infer_s"] = time.perf_counter() - t
        write_findings(folder / "findings.json", prediction.findings)
        t = time.perf_counter()
        n_files = 0
        try:
            from ich_node.results import ResultOptions, ResultsSkipped, build_results, write_results
        except ImportError:  # results.py not installed: findings only, nothing to send
            log.warning("job.no_results_module", job_id=job.job_id)
        else:
            options = ResultOptions(
                heatmaps=self.config.results.heatmaps,
                negative_top_slices=self.config.results.negative_top_slices,
                parametric_map=self.config.results.parametric_map,
            )
            try:
                results = build_results(prediction, self.classifier, options)
                written = write_results(results, folder / "outbox")
                n_files = sum(1 for p in written if p.suffix == ".dcm")
            except ResultsSkipped as exc:
                log.info("job.results_skipped", job_id=job.job_id, reason=str(exc))
        times["results_s"] = time.perf_counter() - t
        times["positive"] = float(sum(1 for f in prediction.findings.series.values() if f.positive))
        times["n_slices"] = float(len(series.slices))
        return n_files

    def process(self, job: JobRecord, clock: Callable[[], float]) -> JobOutcome:
        """Run one leased job to a recorded state; never raises."""
        started = time.perf_counter()
        times: dict[str, float] = {}
        self.current = job
        final = results_dir(self.config.storage.dir, job.job_id)
        tmp = final.with_name(f".{job.job_id}.{os.getpid()}.tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            n_files = self._build_outputs(job, tmp, times)
            shutil.rmtree(final, ignore_errors=True)  # a crashed earlier attempt's output
            os.replace(tmp, final)
            fsync_dir(final.parent)
            self.queue.complete(job, [d.name for d in self.config.destinations], n_files, clock())
            outcome = JobOutcome(job.job_id, "done", n_files, "")
        except LeaseLost as exc:
            outcome = JobOutcome(job.job_id, "lost", 0, str(exc))
        except Exception as exc:  # recorded with its reason, retried or parked
            shutil.rmtree(tmp, ignore_errors=True)
            reason = f"{type(exc).__name__}: {exc}"[:500]
            try:
                state = self.queue.fail(job, reason, clock())
            except LeaseLost:
                state = "lost"
            outcome = JobOutcome(job.job_id, state, 0, reason)
        finally:
            self.current = None
        total_s = time.perf_counter() - started
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
            total_s=round(total_s, 3),
            reason=outcome.reason or None,
        )
        return outcome

    def run_once(self, now: float, clock: Callable[[], float] = time.time) -> JobOutcome | None:
        """Lease one job and run it; ``None`` when nothing is runnable at ``now``."""
        job = self.queue.lease(self.name, now)
        if job is None:
            return None
        return self.process(job, clock)


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
        stop.set()  # finish the current job, then exit

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log.info("worker.starting", worker=name, pid=os.getpid())
    store = Store.open(config.storage.dir)
    heartbeat = _Heartbeat(store, name, os.getppid() if parent is None else parent)
    heartbeat.start()

    from ich_node.bundle import load_bundle
    from ich_node.inference import Classifier

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
    while not stop.is_set():
        try:
            outcome = worker.run_once(time.time())
        except Exception as exc:  # log and go on
            log.error("worker.loop_error", worker=name, error=type(exc).__name__)
            outcome = None
        if outcome is None:
            stop.wait(poll_seconds)
    heartbeat.stop.set()
    log.info("worker.stopped", worker=name)
    return 0


def _process_entry(config: NodeConfig, name: str, parent: int | None = None) -> None:
    """``multiprocessing`` target: exit with :func:`worker_main`'s code."""
    raise SystemExit(worker_main(config, name, parent=parent))
