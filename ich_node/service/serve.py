"""``ich-node serve``: the listener, the assembler, the sender and the workers.

The serving process runs the listener (pynetdicom threads), a sender thread and
a main loop that assembles series and supervises the worker processes
(multiprocessing, spawn): a worker that dies has its leases given back and is
started again (with a growing delay when it keeps dying, and not at all after
``node.worker_max_crashes`` quick deaths in a row). Before anything else,
``serve`` verifies the model bundle (:func:`ich_node.bundle.check_bundle`) and
takes an exclusive lock on ``storage.dir`` (a second node on the same storage
exits 2 and touches nothing); it listens only once a worker has loaded the
model. SIGTERM and SIGINT
only set a flag; the loop then stops accepting associations, asks the workers to
finish the jobs they hold (SIGTERM, ``SHUTDOWN_GRACE_SECONDS``), releases what
they still hold, and returns 0. This process never imports torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import multiprocessing.context
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final

import structlog

from ich_node.config import NodeConfig, mode_fields
from ich_node.delivery.sender import Sender
from ich_node.ingest.assemble import Assembler
from ich_node.ingest.guard import GuardedServer
from ich_node.ingest.listener import start_listener
from ich_node.ingest.refusals import write_refusals
from ich_node.ingest.spool import Spool
from ich_node.metrics import Metrics
from ich_node.model.bundle import BUNDLE_HELP
from ich_node.queue.backend import assembly_turn, is_shared, job_queue, open_store
from ich_node.queue.interface import HEARTBEAT_STALE_SECONDS, StoreUnusable
from ich_node.queue.jobs import JobQueue
from ich_node.queue.layout import StorageLayout
from ich_node.queue.store import Store
from ich_node.retention import CLEAN_EVERY_SECONDS, Cleaner
from ich_node.service.spawn import WORKER_EXIT_BAD_DEVICE, worker_process

log = structlog.get_logger(__name__)

#: Seconds the workers get to finish the jobs they hold at shutdown.
SHUTDOWN_GRACE_SECONDS: Final = 30.0
#: Seconds the sender gets at shutdown once its attempts in flight are cut: a SIGTERM
#: ends the node within about this plus the listener's and the workers' stop (a
#: worker idle or between jobs stops in under a second): 15 s in all (docs/admin.md).
SENDER_STOP_SECONDS: Final = 5.0
#: Seconds between two passes of the main loop and of the sender.
LOOP_SECONDS: Final = 0.2
#: At most this often the listener's refusals by peer are written for the console.
REFUSALS_EVERY_SECONDS: Final = 2.0
#: Restart delay of a worker that died: doubles per quick death, up to the max.
RESTART_BASE_SECONDS: Final = 0.5
RESTART_MAX_SECONDS: Final = 60.0
#: Seconds a previous run's worker gets to notice it is orphaned before SIGKILL.
LEFTOVER_GRACE_SECONDS: Final = 5.0
#: A worker that lived this long before dying starts a new count of crashes.
LONG_LIFE_SECONDS: Final = 60.0
#: Exit codes of ``serve``: 1 it could not run (port, no worker ever ready), 2 bad
#: configuration: an unusable model bundle, or a storage another node holds.
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
#: Exit code of a worker that cannot load the bundle (restarting it cannot help).
WORKER_EXIT_BAD_BUNDLE: Final = 2
#: The lock file in ``storage.dir`` (holds the pid of the node that has it).
LOCK_NAME: Final = "node.lock"
#: How long ``serve`` watches a recent heartbeat under its own node id before it
#: decides that the id is another live node's (the serving loop beats every 0.2 s,
#: workers every second).
NODE_ID_CHECK_SECONDS: Final = 3.0
#: What the supervisor knows about its workers, for ``health`` (JSON, in ``storage.dir``).
WORKERS_STATE_NAME: Final = "workers.json"


class StorageLocked(Exception):
    """Another live node holds ``storage.dir``."""

    def __init__(self, storage_dir: os.PathLike[str] | str, pid: int | None) -> None:
        holder = f"node pid {pid}" if pid else "another process"
        super().__init__(
            f"storage.dir {os.fspath(storage_dir)} is in use by {holder} "
            f"(lock {LOCK_NAME}); one node per storage: stop that node first, "
            "or give this one its own storage.dir"
        )
        self.pid = pid


def lock_storage(storage_dir: os.PathLike[str] | str) -> int:
    """Take the node's exclusive lock on ``storage_dir``; returns the open lock fd.

    ``flock`` (an OS lock on an open file): the kernel releases it when the
    process dies however it dies, so a stale lock file never blocks a restart.
    The file keeps the holder's pid for the message a second node prints. The fd
    is not inherited by the workers (PEP 446), so the lock dies with the node.

    Raises
    ------
    StorageLocked
        When another process holds the lock; nothing under the folder is changed.
    """
    path = os.path.join(os.fspath(storage_dir), LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        raise StorageLocked(storage_dir, int(text) if text.isdigit() else None) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def workers_state(
    storage_dir: os.PathLike[str] | str, prefix: str = ""
) -> dict[str, dict[str, object]]:
    """The supervisor's last word on each worker (``{}`` when unknown); see ``health``.

    ``prefix``: ``"<node_id>."`` in a shared ``storage.dir`` (one file per node).
    """
    try:
        with open(os.path.join(os.fspath(storage_dir), prefix + WORKERS_STATE_NAME)) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    if code == WORKER_EXIT_BAD_BUNDLE:
        return "exit code 2: the model bundle cannot be loaded"
    if code == WORKER_EXIT_BAD_DEVICE:
        return f"exit code {code}: model.device cannot take the model"
    return f"exit code {code}"


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
    gave_up: str = ""  # why this slot is no longer restarted; empty while it is
    last_exit: str = ""


class Supervisor:
    """Start worker processes and restart those that die.

    Parameters
    ----------
    config : NodeConfig
        The node's configuration (the workers get all of it).
    queue : JobQueue
        To give back the leases of a dead worker.
    """

    def __init__(self, config: NodeConfig, queue: JobQueue, prefix: str = "") -> None:
        self.config = config
        self.queue = queue
        self.prefix = prefix
        self.context = multiprocessing.get_context("spawn")
        # In a shared database every name starts with the node id: recovery gives back
        # only the leases of this node's workers, never another host's.
        self.slots = [_Slot(f"{prefix}worker-{i}") for i in range(config.node.workers)]
        self.max_crashes = config.node.worker_max_crashes

    def ready(self) -> list[str]:
        """Workers of this run that have loaded the model (they beat only then)."""
        beats = self.queue.store.heartbeats()
        return [
            slot.name
            for slot in self.slots
            if slot.process is not None
            and slot.name in beats
            and beats[slot.name][0] == slot.process.pid
        ]

    def all_gave_up(self) -> bool:
        """True when no worker will be started again."""
        return all(slot.gave_up for slot in self.slots)

    def bad_device(self) -> bool:
        """True when a worker said ``model.device`` cannot take the model."""
        return any(slot.last_exit.startswith(f"exit code {WORKER_EXIT_BAD_DEVICE}")
                   for slot in self.slots)  # fmt: skip

    def bad_bundle(self) -> bool:
        """True when a worker said the bundle cannot be loaded."""
        return any(slot.last_exit.startswith("exit code 2") for slot in self.slots)

    def _write_state(self) -> None:
        state = {
            slot.name: {
                "pid": slot.process.pid if slot.process is not None else None,
                "crashes": slot.failures,
                "last_exit": slot.last_exit,
                "gave_up": slot.gave_up,
            }
            for slot in self.slots
        }
        path = os.path.join(self.config.storage.dir, self.prefix + WORKERS_STATE_NAME)
        try:
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(state, fh)
            os.replace(tmp, path)
        except OSError as exc:  # only health's wording depends on it
            log.warning("worker.state_not_written", error=type(exc).__name__)

    def release_all(self, reason: str, now: float) -> None:
        """Give back leases held under this node's worker names (a previous run's).

        Waits first for the previous run's workers to be gone.
        """
        stop_leftover_workers(self.queue.store, [slot.name for slot in self.slots])
        for slot in self.slots:
            self.queue.release_worker(slot.name, reason, now)

    def _start(self, slot: _Slot, now: float) -> None:
        process = self.context.Process(
            target=worker_process,
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
                # Quick deaths (crash at start, bad bundle) back off; a long life resets.
                quick = now - slot.started_at < LONG_LIFE_SECONDS
                slot.failures = slot.failures + 1 if quick else 1
                slot.last_exit = _exit_text(process.exitcode)
                delay = min(RESTART_BASE_SECONDS * 2 ** (slot.failures - 1), RESTART_MAX_SECONDS)
                slot.not_before = now + delay
                if process.exitcode == WORKER_EXIT_BAD_BUNDLE:
                    slot.gave_up = "the model bundle cannot be loaded (see worker.bad_bundle)"
                elif process.exitcode == WORKER_EXIT_BAD_DEVICE:
                    slot.gave_up = "model.device cannot take the model (see worker.bad_device)"
                elif slot.failures >= self.max_crashes:
                    slot.gave_up = (
                        f"{slot.failures} crashes in a row (node.worker_max_crashes), "
                        f"the last: {slot.last_exit}"
                    )
                # One line per crash: who, how it ended, what happens next.
                log.warning(
                    "worker.died",
                    worker=slot.name,
                    pid=process.pid,
                    exitcode=process.exitcode,
                    exit=slot.last_exit,
                    crashes=slot.failures,
                    max_crashes=self.max_crashes,
                    restart_in_s=None if slot.gave_up else round(delay, 1),
                    released_jobs=len(released),
                    # Only the job on the model is charged the attempt (ich_node.queue.jobs).
                    charged_job=released.charged[0] if len(released.charged) == 1 else None,
                    charged_jobs=list(released.charged) if len(released.charged) > 1 else None,
                    given_back_jobs=list(released.given_back),
                    parked_jobs=list(released.parked) or None,
                )
                if slot.gave_up:
                    log.error(
                        "worker.gave_up",
                        worker=slot.name,
                        reason=slot.gave_up,
                        action="not restarted; `ich-node health` fails until the node is restarted",
                    )
                process.close()
                slot.process = None
                self._write_state()
            if slot.process is None and not slot.gave_up and now >= slot.not_before:
                self._start(slot, now)
                self._write_state()

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
            if not slot.process.is_alive():  # gone: health says so at once
                with contextlib.suppress(Exception):
                    self.queue.store.forget_heartbeat(slot.name)


class _SenderThread(threading.Thread):
    # Starts the sender's lanes (one thread per destination and per alert target) and
    # returns at once; a slow receiver holds only its own lane.
    def __init__(self, sender: Sender, stop: threading.Event) -> None:
        super().__init__(name="sender", daemon=True)
        self.sender = sender
        self.stop = stop

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sender.dispatch(time.time())
            except Exception as exc:  # log and go on
                log.error("sender.loop_error", error=type(exc).__name__)
            self.stop.wait(LOOP_SECONDS)


class _RefusalsWriter:
    """Writes the listener's refusals by peer for the web console (ingest/refusals.py).

    Only after a change and at most every :data:`REFUSALS_EVERY_SECONDS`; nothing
    when this process does not listen.
    """

    def __init__(self, path: Path, started_at: float, server: GuardedServer | None) -> None:
        self.path = path
        self.started_at = started_at
        self.tally = server.guard.tally if server is not None else None
        self.written = 0
        self.at = 0.0

    def run_once(self, now: float) -> None:
        if self.tally is None or self.tally.changes == self.written:
            return
        if now - self.at < REFUSALS_EVERY_SECONDS:
            return
        changes = self.tally.changes
        self.at = now
        try:
            write_refusals(self.path, self.tally.rows(), self.started_at)
        except OSError as exc:  # a full disk must not stop the loop (and its heartbeat)
            log.warning("serve.refusals_not_written", error=type(exc).__name__)
            return
        self.written = changes


def _preflight(config: NodeConfig, role: str) -> int | None:
    """What ``check-config`` checks without torch (:mod:`ich_node.service.preflight`).

    The first problem is one log line naming the key and the file (``serve.bad_bundle``
    for the model bundle, else ``serve.config_error``); returns its exit code, or
    ``None`` when ``serve`` may go on. Warnings are logged (``serve.config_warning``;
    a DEMO bundle: ``serve.demo_bundle``).
    """
    from ich_node.service.preflight import check_static

    report = check_static(config, role, lock=False)  # the lock: taken next, by serve
    for warning in report.warnings:
        if warning.startswith("model.bundle:"):
            log.warning("serve.demo_bundle", model=warning.split(": ", 1)[1],
                        path=str(config.model.bundle))  # fmt: skip
        else:
            log.warning("serve.config_warning", warning=warning)
    problem = report.problem
    if problem is None:
        return None
    fields: dict[str, object] = {"key": problem.key, "path": problem.path, "error": problem.message}
    if problem.help:
        fields["help"] = problem.help
    event = "serve.bad_bundle" if problem.key == "model.bundle" else "serve.config_error"
    log.error(event, **fields)
    return problem.exit_code


def _await_worker(
    supervisor: Supervisor, stop: threading.Event, clock: Callable[[], float]
) -> int | None:
    """Run the supervisor until a worker has loaded the model; an exit code if none will."""
    log.info("serve.loading_model", bundle=str(supervisor.config.model.bundle))
    while not stop.is_set():
        supervisor.run_once(clock())
        if supervisor.ready():
            return None
        if supervisor.bad_bundle():
            log.error(
                "serve.bad_bundle",
                key="model.bundle",
                path=str(supervisor.config.model.bundle),
                error="a worker could not load it (see worker.bad_bundle)",
                help=BUNDLE_HELP,
            )
            return EXIT_CONFIG
        if supervisor.bad_device():
            log.error(
                "serve.config_error",
                key="model.device",
                path=str(supervisor.config.model.bundle),
                error=f"model.device {supervisor.config.model.device!r} cannot take the model "
                "(see worker.bad_device)",
            )
            return EXIT_CONFIG
        if supervisor.all_gave_up():
            log.error("serve.no_worker", reason="no worker could start; see worker.died")
            return EXIT_FAILED
        stop.wait(LOOP_SECONDS)
    return 0


#: What one ``serve`` process runs: everything, or one side of a multi-host node.
ROLES: Final = ("all", "listener", "worker")


def node_id(config: NodeConfig) -> str:
    """This node's name in a shared database: ``storage.node_id``, else the host name."""
    return config.storage.node_id or socket.gethostname()


def node_id_in_use(
    store: Store, names: list[str], wait: float = NODE_ID_CHECK_SECONDS
) -> str | None:
    """The first of ``names`` another live process beats under, or ``None``.

    In a shared database each node registers under its node id; two hosts with
    one id would give back each other's leases. A recent heartbeat under one of
    ``names`` may be this node's own previous run (killed a moment ago): it is
    someone else only when it is still beating ``wait`` seconds later.
    """
    before = store.heartbeats()
    now = time.time()
    recent = [n for n in names if n in before and now - before[n][1] < HEARTBEAT_STALE_SECONDS]
    if not recent:
        return None
    time.sleep(wait)
    after = store.heartbeats()
    for name in recent:
        if after[name][1] > before[name][1]:
            return name
    return None


def serve(config: NodeConfig, *, clock: Callable[[], float] = time.time, role: str = "all") -> int:
    """Run the node until SIGTERM or SIGINT; returns the exit code.

    ``role``: ``all`` (listener, assembler, workers, sender: one host),
    ``listener`` (receive, spool, assemble, retention) or ``worker`` (infer,
    encode, send); the last two need a shared store (``storage.database``).

    0 after a clean stop; 1 when the port cannot be bound, no worker could
    load the model or the database cannot be reached; 2, with one line naming the
    key and the file, for what ``check-config`` finds (:mod:`ich_node.service.preflight`:
    no callers or destinations, ``storage.dir`` not writable, TLS files that do not
    load or match, a notification target's file, an unusable ``model.bundle``),
    ``model.device`` that cannot take the model (the first worker says so), a
    ``storage.dir`` held by another node (embedded SQLite), a store this code
    cannot use (schema, privileges, password); nothing is changed then.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    try:
        from ich_node.log import configure_logging

        configure_logging(config.logging.format, config.logging.level)
    except ImportError:
        pass
    # What check-config checks, without torch: the first problem is one line, exit 2.
    code = _preflight(config, role)
    if code is not None:
        return code
    # The spool, the outbox and the store hold patient data: owner-only.
    os.umask(0o077)
    try:
        config.storage.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:  # checked above; changed since
        log.error("serve.config_error", key="storage.dir", path=str(config.storage.dir),
                  error=f"cannot be created: {exc.strerror or exc}")  # fmt: skip
        return EXIT_CONFIG
    if is_shared(config.storage):
        # Several nodes share storage.dir by design: no storage lock (it protects the
        # embedded SQLite mode); each node's recovery touches only its own node id.
        return _serve_locked(config, clock, role)
    # One node per storage, checked before anything under it is touched.
    try:
        lock_fd = lock_storage(config.storage.dir)
    except StorageLocked as exc:
        log.error(
            "serve.storage_locked", storage_dir=str(config.storage.dir), pid=exc.pid, error=str(exc)
        )
        return EXIT_CONFIG
    except OSError as exc:  # checked above; changed since
        log.error("serve.config_error", key="storage.dir", path=str(config.storage.dir),
                  error=f"the lock cannot be taken: {exc.strerror or exc}")  # fmt: skip
        return EXIT_CONFIG
    try:
        return _serve_locked(config, clock, role)
    finally:
        os.close(lock_fd)


def _serve_locked(config: NodeConfig, clock: Callable[[], float], role: str = "all") -> int:
    try:
        os.chmod(config.storage.dir, 0o700)
    except OSError as exc:
        log.warning("serve.storage_mode", error=type(exc).__name__)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    shared = is_shared(config.storage)
    try:
        store = open_store(config.storage)
    except StoreUnusable as exc:
        # 2 (no restart helps): a newer schema, missing privileges, a wrong password;
        # 1 (systemd restarts): a database that does not answer yet.
        key = "storage.database" if shared else "storage.dir"
        log.error("serve.store_failed", key=key, error=str(exc)[:500], exit=exc.exit_code)
        return EXIT_CONFIG if exc.exit_code == 2 else EXIT_FAILED
    except Exception as exc:  # anything else: one line, and systemd tries again
        log.error("serve.store_failed", error=f"{type(exc).__name__}: {exc}"[:500])
        return EXIT_FAILED
    prefix = f"{node_id(config)}." if shared else ""
    beat_name = f"{prefix}{role}" if shared else "node"
    listens, works = role in ("all", "listener"), role in ("all", "worker")
    if shared:
        from ich_node.queue.postgres import PgStore

        assert isinstance(store, PgStore)
        names = [beat_name] + (
            [f"{prefix}worker-{i}" for i in range(config.node.workers)] if works else []
        )
        holder = node_id_in_use(store, names)
        if holder is not None:
            log.error(
                "serve.node_id_in_use",
                node_id=node_id(config),
                name=holder,
                action="give each host its own storage.node_id",
            )
            store.close()
            return EXIT_CONFIG
        # Written by the first node on a new database, then only checked: listeners
        # store, workers lease and senders send only where this file is seen.
        if not store.place_store_id():
            log.error(
                "serve.storage_not_mounted",
                storage_dir=str(config.storage.dir),
                action="images refused (0xA700) and no jobs taken until it is mounted",
            )
    metrics = Metrics(store)
    queue = job_queue(store, config.queue)
    spool = Spool(config.storage.dir, store, config.storage.min_free_mb)
    assembler = Assembler(store, config.series, metrics, queue=queue)
    sender = Sender(
        store,
        config.destinations,
        config.sender,
        config.storage.dir,
        config.node.ae_title,
        metrics,
        targets=config.notifications,
        holder=beat_name,
    )
    supervisor = Supervisor(config, queue, prefix)
    cleaner = Cleaner(
        store,
        config.storage.dir,
        config.storage.keep_hours,
        shared=shared,
        keep_results_days=config.storage.keep_results_days,
    )
    # Workers of a previous run (killed with the node) exit when their parent is
    # gone; what they held runs again. Shared store: only this node id's leases.
    if works:
        supervisor.release_all("the node restarted during the job", clock())
    # Before listening: what a crash left half-done was never acknowledged. In a
    # shared storage.dir other listeners write the spool right now: their files
    # are not this node's to judge, so the spool's recovery runs on one host only;
    # there the cleaner removes what no C-STORE can still be writing (an hour old).
    if shared:
        from ich_node.ingest.spool import Recovery

        recovered = Recovery(0, 0, 0)
    else:
        recovered = spool.recover()
        cleaner.spool_checked(clock())  # its hourly orphan walk: not again right now
        cleaner.run_once(clock())  # also removes dead workers' half-written results
    if recovered.temp_files or recovered.unrecorded_files or recovered.missing_files:
        log.info(
            "serve.recovered",
            temp_files=recovered.temp_files,
            unrecorded_files=recovered.unrecorded_files,
            missing_files=recovered.missing_files,
        )
    if recovered.missing_files:
        log.error("serve.recorded_files_missing", n=recovered.missing_files)
    # The listener accepts images only once a worker can read them.
    code = _await_worker(supervisor, stop, clock) if works else None
    if code is not None:
        supervisor.stop()
        store.close()
        return code
    metrics_server = None
    try:
        if config.metrics.address is not None:
            metrics_server = metrics.serve(config.metrics.address)
        server = start_listener(config, spool, clock, metrics) if listens else None
    except (OSError, ValueError) as exc:
        log.error("serve.listen_failed", port=config.node.port, error=str(exc))
        supervisor.stop()
        store.close()
        return EXIT_FAILED
    if works and shared:
        # Beat before sending: a claim whose holder has no fresh heartbeat goes to
        # others. What this node id held when it last stopped is due again now.
        store.heartbeat(beat_name, os.getpid(), clock())
        released = store.release_claims(beat_name, clock())  # type: ignore[attr-defined]
        if released:
            log.info("serve.deliveries_released", n=released)
    sender_stop = threading.Event()
    sender_thread = _SenderThread(sender, sender_stop)
    if works:
        sender_thread.start()
    log.info(
        "serve.started",
        pid=os.getpid(),
        role=role,
        node=beat_name,
        workers=config.node.workers if works else 0,
        **mode_fields(config),
    )
    cleaned_at = clock()
    refusals = _RefusalsWriter(
        StorageLayout(config.storage.dir).refusals_file(beat_name), clock(), server
    )
    while not stop.is_set():
        now = clock()
        try:
            if works:
                supervisor.run_once(now)
            if listens:
                with assembly_turn(store) as mine:
                    if mine:  # one assembler in the whole cluster decides a series
                        assembler.run_once(now)
            metrics.run_once()
            refusals.run_once(now)
            if server is not None:  # C-STORE refusals by reason, for status and health
                server.store_refusals.flush(store, now)
            if listens and now - cleaned_at >= CLEAN_EVERY_SECONDS:
                cleaner.run_once(now)
                cleaned_at = now
            store.heartbeat(beat_name, os.getpid(), now)
        except Exception as exc:  # log and go on
            log.error("serve.loop_error", error=type(exc).__name__)
        stop.wait(LOOP_SECONDS)
    log.info("serve.stopping")
    # Sends in flight are cut first (their claims given back, not charged: sent again
    # after the restart), so the sender never holds the stop (SENDER_STOP_SECONDS).
    sender_stop.set()
    if works:
        sender_thread.join(LOOP_SECONDS * 5)
        if not sender.stop(SENDER_STOP_SECONDS):
            log.warning("serve.sender_still_busy", action="exiting; its claims are given back")
    if server is not None:
        server.shutdown()  # no new associations; running ones are closed
    supervisor.stop()
    if metrics_server is not None:
        metrics_server.shutdown()  # type: ignore[attr-defined]
    if server is not None:  # what the listener refused since the last pass
        with contextlib.suppress(Exception):
            server.store_refusals.flush(store, clock())
    with contextlib.suppress(Exception):  # a clean stop: this process is gone now
        store.forget_heartbeat(beat_name)
    store.close()
    log.info("serve.stopped")
    return 0
