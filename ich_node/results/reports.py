"""A process that encodes a job's SR (and key objects) beside the results thread.

Encoding the TID 1500 SR is highdicom building a content tree and pydicom writing
it: about 0.08 s of pure Python for a 40-slice series (0.16 s before
:func:`ich_node.results.sr.build_sr` kept highdicom from copying the tree), all of
it under the GIL. In a thread it only takes turns with the rest of the results
stage (the heatmap images, their Secondary Capture encoding), which is Python too.
In a process of its own it runs on another core:
:func:`ich_node.results.build.build_results` sends it the findings, the source
references and the outputs' UIDs (tens of kB, never the pixels) and gets Part 10
bytes back, which it reads as the SR (reading and writing them again costs about a
millisecond: pydicom keeps the encoded values).

One process, started with ``spawn`` (the worker holds threads and torch: no
``fork``), imports the encoders when it starts. When it dies or cannot start,
:class:`ReportProcess` says so in the log and the caller encodes in its own
thread; a new process is tried again a minute later.
"""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Final

import structlog

from ich_node.imaging.decode import child_pid, quiet_child

log = structlog.get_logger(__name__)

#: Seconds before a process is tried again after one died or could not start.
RETRY_SECONDS: Final[float] = 60.0


def freeze_startup_heap() -> int:
    """Collect once, then keep every object alive now out of the garbage collector's
    full collections (:func:`gc.freeze`): for a process that has just imported and
    warmed up what it keeps until it exits (modules, highdicom's tables, the model).

    A full collection walks every object the collector tracks. In the worker (torch,
    the model, pydicom, highdicom: about 630,000 objects) one took 0.31-0.42 s and
    came about every 13 studies, inside a study; in the report process (about
    315,000) 0.09-0.15 s every 5-6 SRs. Frozen, they walk only what came after:
    10-24 ms (docs/performance.md, ``benchmarks/gc_pauses.py``). Objects that
    become garbage later are still freed, by their reference counts or, in cycles
    made after the freeze, by the collector; cycles made before it and dropped later
    would stay, so call this once the process holds only what it keeps.

    Returns
    -------
    int
        The objects frozen (:func:`gc.get_freeze_count`).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _start_child(fmt: str, level: str) -> None:
    """Process initializer: the parent's logging (scrubbed), the encoders imported
    and warmed up, then the heap frozen (:func:`freeze_startup_heap`)."""
    from ich_node.log import configure_logging

    configure_logging(fmt, level)
    # Library warnings may quote header values; the parent counts its own per job.
    quiet_child()
    import ich_node.results.build  # noqa: F401  (highdicom: a second, paid here)
    from ich_node.results import sc

    sc.warm_up()  # highdicom's IOD tables, read on first use: here, not in the first SR
    freeze_startup_heap()


class ReportProcess:
    """One process for SR encoding, started on first use (or by :meth:`start`).

    Parameters
    ----------
    log_format, log_level : str
        The node's ``logging`` section, for the process's own log lines.

    Notes
    -----
    Thread-safe. Holds about 100 MB (pydicom, highdicom, numpy; no torch).
    """

    def __init__(self, log_format: str = "json", log_level: str = "INFO") -> None:
        self._fmt, self._level = log_format, log_level
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._retry_at = 0.0
        self.starts = 0  # processes started, for tests and the log

    def _executor_now(self) -> ProcessPoolExecutor | None:
        with self._lock:
            if self._executor is None and time.monotonic() >= self._retry_at:
                self._executor = ProcessPoolExecutor(
                    1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_child,
                    initargs=(self._fmt, self._level),
                )
                self.starts += 1
            return self._executor

    def start(self, timeout: float = 60.0) -> int:
        """Start the process now and wait until it has imported the encoders.

        Returns
        -------
        int
            Its process id.

        Raises
        ------
        RuntimeError
            When it cannot be started (it is tried again on a later use).
        """
        executor = self._executor_now()
        if executor is None:
            raise RuntimeError("the report process failed recently; it is tried again later")
        try:
            return int(executor.submit(child_pid).result(timeout))
        except Exception as exc:
            self.lost(exc)
            raise RuntimeError(f"the report process did not start: {type(exc).__name__}") from exc

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any] | None:
        """``fn(*args)`` in the process, or ``None`` when there is none (run it yourself).

        ``fn`` and ``args`` must pickle. The future raises
        :class:`concurrent.futures.BrokenExecutor` if the process dies meanwhile:
        call :meth:`lost` and run ``fn`` yourself.
        """
        try:
            executor = self._executor_now()
            return None if executor is None else executor.submit(fn, *args)
        except Exception as exc:  # cannot start a process, or it died before this
            self.lost(exc)
            return None

    def lost(self, exc: BaseException) -> None:
        """The process died or did not start: let it go; a new one is tried in a minute."""
        log.warning("results.report_process_lost", error=type(exc).__name__)
        with self._lock:
            executor, self._executor = self._executor, None
            self._retry_at = time.monotonic() + RETRY_SECONDS
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the process (after the task it is running)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
