"""The CPU part of reading a series, in parallel: parsing and pixel decoding.

:class:`DecodePool` runs :func:`ich_node.imaging.series.decode_slice` for many
slices at once, in threads or in processes; what comes back are the stored
integers (:class:`~ich_node.imaging.pixels.StoredSlice`), which the model's device
turns into HU and model input (:mod:`ich_node.imaging.tensors`).

Threads or processes: pydicom's parser is Python (it holds the GIL), its native
pixel copy and the compressed decoders (pylibjpeg, OpenJPEG) release it only in
part, so processes scale further on many cores while threads start at once and
share memory. ``docs/performance.md`` has the measurement behind the default
(:data:`DEFAULT_KIND`). In a process pool, library warnings are silenced in the
children: the node's log scrubber (patient names, IDs) lives in the parent.

No torch here: the pool is picklable work on plain arrays.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import structlog

from ich_node.imaging.pixels import StoredSlice
from ich_node.imaging.series import CTSlice, decode_slice, headers_of

PoolKind = Literal["thread", "process"]
log = structlog.get_logger(__name__)
T = TypeVar("T")

#: What ``model.decode_threads`` pools are made of (measured: docs/performance.md).
DEFAULT_KIND: Final[PoolKind] = "thread"
#: Files a series needs for its headers to be parsed in a process pool: below, the
#: tasks' round trips cost more than they save.
MIN_PARALLEL_HEADERS: Final[int] = 16


def pool_size(requested: int) -> int:
    """``model.decode_threads``: 0 is the cores this process may run on."""
    if requested < 0:
        raise ValueError(f"decode_threads must be >= 0, got {requested!r}")
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def quiet_child() -> None:
    """Process pool initializer: no library warnings (they may quote header values)."""
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def child_pid() -> int:
    """A pool child's process id: a no-op task that waits for the child to start."""
    return os.getpid()


class DecodePool:
    """Decode slices in parallel (threads or processes).

    Parameters
    ----------
    workers : int
        Threads or processes; 0: the cores (:func:`pool_size`).
    kind : {"thread", "process"}
        ``process`` pools start with ``spawn`` (safe beside CUDA and torch's
        threads) and cost a second or two once, at :meth:`start`.

    Notes
    -----
    Thread-safe: the worker's reader and ``predict`` submit from one thread each.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, workers: int = 0, kind: PoolKind = DEFAULT_KIND) -> None:
        if kind not in ("thread", "process"):
            raise ValueError(f"kind must be 'thread' or 'process', got {kind!r}")
        self.workers = pool_size(workers)
        self.kind = kind
        self._executor: Executor | None = None

    def start(self) -> DecodePool:
        """Start the threads or processes now (else at the first :meth:`submit`)."""
        if self._executor is None:
            if self.kind == "thread":
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
            else:
                self._executor = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=quiet_child,
                )
                # Spawn them all now: the first study must not wait for it.
                try:
                    for f in [self._executor.submit(child_pid) for _ in range(self.workers)]:
                        f.result()
                except BaseException:
                    self.close()  # none half-started: a later call tries again
                    raise
        return self

    def submit(self, s: CTSlice) -> Future[StoredSlice]:
        """Decode ``s`` in the pool; the future raises what :func:`decode_slice` raises."""
        executor = self.start()._executor
        assert executor is not None
        return executor.submit(decode_slice, s)

    def run(self, task: Callable[..., T], *args: Any) -> Future[T]:
        """``task(*args)`` in the pool (picklable for a process pool)."""
        executor = self.start()._executor
        assert executor is not None
        return executor.submit(task, *args)

    def parse_headers(self, paths: Sequence[Path]) -> dict[Path, list[Any] | Exception]:
        """Each file's headers (:func:`ich_node.imaging.series.headers_of`), parsed in
        this pool's processes, a few files per task; what a file raised in its place.

        pydicom's parser holds the GIL: threads parse no faster than one thread
        (measured slower, docs/performance.md), so a thread pool, or fewer than
        :data:`MIN_PARALLEL_HEADERS` files, gives ``{}`` and the caller parses them.
        """
        if self.kind != "process" or len(paths) < MIN_PARALLEL_HEADERS:
            return {}
        size = max(1, -(-len(paths) // (2 * self.workers)))  # two tasks per process
        chunks = [list(paths[i : i + size]) for i in range(0, len(paths), size)]
        out: dict[Path, list[Any] | Exception] = {}
        try:
            executor = self.start()._executor
            assert executor is not None
            futures = [executor.submit(headers_of, chunk) for chunk in chunks]
            for chunk, future in zip(chunks, futures, strict=True):
                out.update(zip(chunk, future.result(), strict=True))
        except BrokenExecutor:  # a child died (killed, out of memory): parse them here
            log.warning("decode_pool.broken", kind=self.kind, workers=self.workers)
            self.close()  # the next series starts a new pool
            return {}
        return out

    def map(self, slices: Sequence[CTSlice]) -> list[StoredSlice]:
        """Decode ``slices``, in order (raises the first slice's error)."""
        return [f.result() for f in [self.submit(s) for s in slices]]

    def close(self) -> None:
        """Stop the pool (waits for what runs)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> DecodePool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
