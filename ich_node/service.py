"""``ich-node serve``: the listener, the assembler, the sender and the workers.

The serving process runs the listener (pynetdicom threads), a sender thread and
a main loop that assembles series and supervises the worker processes
(multiprocessing, spawn): a worker that dies has its leases given back and is
started again (with a growing delay when it keeps dying). SIGTERM and SIGINT
only set a flag; the loop then stops accepting associations, asks the workers to
finish the jobs they hold (SIGTERM, ``SHUTDOWN_GRACE_SECONDS``), releases what
they still hold, and returns 0. This process never imports torch.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Final

import structlog

from ich_node.assemble import Assembler
from ich_node.config import NodeConfig
from ich_node.jobs import JobQueue
from ich_node.listener import start_listener
from ich_node.metrics import Metrics
from ich_node.retention import CLEAN_EVERY_SECONDS, Cleaner
from ich_node.sender import Sender
from ich_node.spool import Spool
from ich_node.store import Store

log = structlog.get_logger(__name__)

#: Seconds the workers get to finish the jobs they hold at shutdown.
SHUTDOWN_GRACE_SECONDS: Final = 30.0
#: Seconds between two passes of the main loop and of the sender.
LOOP_SECONDS: Final = 0.2
#: Restart delay of a worker that died: doubles per quick death, up to the max.
RESTART_BASE_SECONDS: Final = 0.5
RESTART_MAX_SECONDS: Final = 60.0
#: Seconds a previous run's worker gets to notice it is orphaned before SIGKILL.
LEFTOVER_GRACE_SECONDS: Final = 5.0


def _is_python(pid: int) -> bool:
    # Guard against a recycled pid: only a python process can be our worker (a
    # zombie has an empty command line: it is gone).
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"python" in fh.read()
    except OSError:
        return False


def stop_leftover_workers(
    store: Store, names: list[str], grace: float = LEFTOVER_GRACE_SECONDS
) -> list[int]:
    """Wait for (then SIGKILL) workers of a previous run of this node that still live.

    A worker whose node was killed exits by itself within a second
    (``worker._Heartbeat``), but until it has, it could still write a results
    folder; its leases are given back only once it is gone. Returns the pids
    that were still alive.
    """
    beats = store.heartbeats()
    pids = [
        beats[n][0]
        for n in names
        if n in beats and beats[n][0] != os.getpid() and _is_python(beats[n][0])
    ]
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _is_python(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
            log.warning("worker.leftover_killed", pid=pid)
        except OSError:
            pass
    return pids


@dataclass(slots=True)
class _Slot:
    name: str
    process: multiprocessing.process.BaseProcess | None = None
    started_at: float = 0.0
    failures: int = 0
    not_before: float = 0.0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Start worker processes and restart those that die.

    Parameters
    ----------
    config : NodeConfig
        The node's configuration (the workers get all of it).
    queue : JobQueue
        To give back the leases of a dead worker.
    """

    def __init__(self, config: NodeConfig, queue: JobQueue) -> None:
        self.config = config
        self.queue = queue
        self.context = multiprocessing.get_context("spawn")
        self.slots = [_Slot(f"worker-{i}") for i in range(config.node.workers)]

    def release_all(self, reason: str, now: float) -> None:
        """Give back leases held under this node's worker names (a previous run's).

        Waits first for the previous run's workers to be gone.
        """
        stop_leftover_workers(self.queue.store, [slot.name for slot in self.slots])
        for slot in self.slots:
            self.queue.release_worker(slot.name, reason, now)

    def _start(self, slot: _Slot, now: float) -> None:
        from ich_node.worker import _process_entry

        process = self.context.Process(
            target=_process_entry,
            args=(self.config, slot.name, os.getpid()),
            name=slot.name,
            daemon=False,
        )
        process.start()
        slot.process, slot.started_at = process, now
        assert process.pid is not None
        slot.pids.append(process.pid)
        log.info("worker.started", worker=slot.name, pid=process.pid, restarts=len(slot.pids) - 1)

    def run_once(self, now: float) -> None:
        """Start missing workers, record dead ones and give back their leases."""
        for slot in self.slots:
            process = slot.process
            if process is not None and not process.is_alive():
                released = self.queue.release_worker(
                    slot.name, f"worker exited with code {process.exitcode}", now
                )
                log.warning(
                    "worker.died",
                    worker=slot.name,
                    pid=process.pid,
                    exitcode=process.exitcode,
                    released_jobs=len(released),
                )
                # Quick deaths (crash at start, bad bundle) back off; a long life resets.
                slot.failures = slot.failures + 1 if now - slot.started_at < 60 else 1
                slot.not_before = now + min(
                    RESTART_BASE_SECONDS * 2 ** (slot.failures - 1), RESTART_MAX_SECONDS
                )
                process.close()
                slot.process = None
            if slot.process is None and now >= slot.not_before:
                self._start(slot, now)

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """SIGTERM every worker, wait ``grace`` seconds, kill the rest, give back leases."""
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.terminate()
        deadline = time.monotonic() + grace
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(max(deadline - time.monotonic(), 0.0))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(5.0)
            self.queue.release_worker(slot.name, "node stopped during the job", time.time())


class _SenderThread(threading.Thread):
    def __init__(self, sender: Sender, stop: threading.Event) -> None:
        super().__init__(name="sender", daemon=True)
        self.sender = sender
        self.stop = stop

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sender.run_once(time.time())
            except Exception as exc:  # log and go on
                log.error("sender.loop_error", error=type(exc).__name__)
            self.stop.wait(LOOP_SECONDS)


def serve(config: NodeConfig, *, clock: Callable[[], float] = time.time) -> int:
    """Run the node until SIGTERM or SIGINT; returns the exit code (0 after a clean stop)."""
    try:
        from ich_node.log import configure_logging

        configure_logging(config.logging.format, config.logging.level)
    except ImportError:
        pass
    if config.model.bundle is None or not config.model.bundle.is_file():
        log.error("serve.no_bundle", bundle=str(config.model.bundle))
        return 2
    # The spool, the outbox and the store hold patient data: owner-only.
    os.umask(0o077)
    config.storage.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.chmod(config.storage.dir, 0o700)
    except OSError as exc:
        log.warning("serve.storage_mode", error=type(exc).__name__)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    store = Store.open(config.storage.dir)
    metrics = Metrics(store)
    queue = JobQueue(store, config.queue)
    spool = Spool(config.storage.dir, store, config.storage.min_free_mb)
    assembler = Assembler(store, config.series, metrics)
    sender = Sender(
        store,
        config.destinations,
        config.sender,
        config.storage.dir,
        config.node.ae_title,
        metrics,
    )
    supervisor = Supervisor(config, queue)
    cleaner = Cleaner(store, config.storage.dir, config.storage.keep_hours)
    # Workers of a previous run (killed with the node) exit when their parent is
    # gone; what they held runs again.
    supervisor.release_all("the node restarted during the job", clock())
    # Before listening: what a crash left half-done was never acknowledged.
    recovered = spool.recover()
    cleaner.run_once(clock())  # also removes dead workers' half-written results
    log.info(
        "serve.recovered",
        temp_files=recovered.temp_files,
        unrecorded_files=recovered.unrecorded_files,
        missing_files=recovered.missing_files,
    )
    if recovered.missing_files:
        log.error("serve.recorded_files_missing", n=recovered.missing_files)
    metrics_server = None
    try:
        if config.metrics.address is not None:
            metrics_server = metrics.serve(config.metrics.address)
        server = start_listener(config, spool, clock, metrics)
    except (OSError, ValueError) as exc:
        log.error("serve.listen_failed", port=config.node.port, error=str(exc))
        return 1
    sender_stop = threading.Event()
    sender_thread = _SenderThread(sender, sender_stop)
    sender_thread.start()
    log.info("serve.started", pid=os.getpid(), workers=config.node.workers)
    cleaned_at = clock()
    while not stop.is_set():
        now = clock()
        try:
            supervisor.run_once(now)
            assembler.run_once(now)
            metrics.run_once()
            if now - cleaned_at >= CLEAN_EVERY_SECONDS:
                cleaner.run_once(now)
                cleaned_at = now
            store.heartbeat("node", os.getpid(), now)
        except Exception as exc:  # log and go on
            log.error("serve.loop_error", error=type(exc).__name__)
        stop.wait(LOOP_SECONDS)
    log.info("serve.stopping")
    server.shutdown()  # no new associations; running ones are closed
    supervisor.stop()
    sender_stop.set()
    sender_thread.join(config.sender.timeout_seconds + 5)
    if metrics_server is not None:
        metrics_server.shutdown()  # type: ignore[attr-defined]
    store.close()
    log.info("serve.stopped")
    return 0
