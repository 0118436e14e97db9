"""The worker's streaming read: score each slice while its series arrives.

With ``series.streaming: true`` (the default) each worker runs a :class:`StreamStage`
thread beside its pipeline (:mod:`ich_node.service.worker`). It leases series that
are still ``receiving`` (:meth:`ich_node.queue.store.Store.lease_stream`: one holder
in the whole node, every host of a PostgreSQL store), and on each pass:

1. reads the headers of the files spooled so far (:func:`ich_node.imaging.read_series`,
   each file's header once), which orders the slices received so far;
2. decodes and preprocesses the slices it has not scored in their current place
   (new ones, re-sent ones, and, with 2.5D slice context, those whose neighbours
   arrived since) with :meth:`~ich_node.model.inference.Classifier.prepare_run`, the
   code the read at completion runs, and runs the CNN on them
   (:meth:`~ich_node.model.inference.Classifier.outputs`), keeping each slice's
   outputs by the digest of its input (:class:`ich_node.model.slice_cache.SliceCache`);
3. once every slice received so far is scored, records the preliminary alerts of
   the targets with ``early: true`` when the slices are positive by the early rule
   (:func:`ich_node.delivery.outbox.prepare_preliminary_alerts`).

When the series is complete, the assembler queues its job as always and the model
stage reads it from the spool as from scratch, but runs the CNN only on slices
whose input is not in the stream's cache (:class:`Streams` shares it): only what
needs the whole series is left (order and coverage, the sequence stage, the summary,
explanations, results). The result equals the read from scratch: the same inputs,
and forward passes padded so that a slice's outputs do not depend on its batch
(:attr:`ich_node.model.inference.Classifier.min_batch`).

Bounds. A worker streams at most :data:`MAX_STREAMS` series at a time; others wait
(another worker may take them) and are read at completion as without streaming.
A stream keeps per slice only the CNN's outputs (about 2-15 KB: embedding, logits,
class activation maps), never the pixels; decoding happens one batch at a time.
The model is shared with the job pipeline under one lock, and a stream gives way
whenever a job waits for the model. Nothing depends on a stream but speed: a
worker that dies mid-stream loses only its cache, and the series is read from the
spool at completion.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import structlog

from ich_node.config import NodeConfig
from ich_node.imaging import CTSeries, ImagingError, StorageUnavailable, load_hu, read_series
from ich_node.log import PHI, phi_values_of_file, redact
from ich_node.model.slice_cache import SliceCache, SliceRow, input_digest
from ich_node.queue.jobs import job_id_for
from ich_node.queue.store import SeriesRecord, Store

log = structlog.get_logger(__name__)

#: Series one worker reads while they arrive, at most.
MAX_STREAMS: Final = 4
#: Seconds a stream's lease lasts unless renewed (each pass renews it).
STREAM_LEASE_SECONDS: Final = 10.0
#: Seconds between two passes over the streams.
POLL_SECONDS: Final = 0.2
#: Seconds between two looks for new series to stream.
TAKE_EVERY_SECONDS: Final = 0.5
#: Seconds a stream is kept after its series stopped arriving, for its job to read it.
HOLD_SECONDS: Final = 60.0
#: Seconds a pass waits for the model (held by a job's read) before it stops.
LOCK_WAIT_SECONDS: Final = 0.05

#: Where a slice is, as far as its model input is concerned: itself and its
#: ``context`` neighbours on each side (the series' ends replicate), by (file, frame).
Signature = tuple[tuple[str, int | None], ...]


@dataclass(slots=True)
class Stream:
    """One series a worker reads while it arrives (the stage's own, mutable, state)."""

    series_instance_uid: str
    since: float
    phi: int  # token of the series' patient values in the log scrubber
    cache: SliceCache = field(default_factory=SliceCache)
    headers: dict[Path, list[Any]] = field(default_factory=dict)  # read_series' cache
    paths: tuple[Path, ...] = ()  # the files the last read saw
    series: CTSeries | None = None  # the slices received so far, in order
    digests: dict[Signature, bytes] = field(default_factory=dict)  # scored slices' inputs
    failed: set[Signature] = field(default_factory=set)  # could not be decoded
    quiet_since: float | None = None  # when the series stopped receiving
    early_checked: tuple[Path, ...] = ()  # the files of the last early-alert check
    preliminary: set[tuple[int, str]] = field(default_factory=set)  # (version, target) done
    scored: int = 0  # slices run through the CNN


class Streams:
    """The series a worker streams, by SeriesInstanceUID; shared with the model stage."""

    def __init__(self) -> None:
        self._by_uid: dict[str, Stream] = {}
        self._lock = threading.Lock()

    def get(self, series_instance_uid: str) -> Stream | None:
        with self._lock:
            return self._by_uid.get(series_instance_uid)

    def cache(self, series_instance_uid: str) -> SliceCache | None:
        """The slice outputs kept for a series, or ``None`` when it was not streamed here."""
        stream = self.get(series_instance_uid)
        return None if stream is None else stream.cache

    def add(self, stream: Stream) -> None:
        with self._lock:
            self._by_uid[stream.series_instance_uid] = stream

    def pop(self, series_instance_uid: str) -> Stream | None:
        with self._lock:
            return self._by_uid.pop(series_instance_uid, None)

    def all(self) -> list[Stream]:
        with self._lock:
            return list(self._by_uid.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_uid)


def signatures(series: CTSeries, context: int) -> list[Signature]:
    """Each slice's :data:`Signature`: its file and frame, and its neighbours' within context."""
    n = len(series.slices)
    where = [(str(s.path), s.frame_number) for s in series.slices]
    return [
        tuple(where[min(max(j, 0), n - 1)] for j in range(i - context, i + context + 1))
        for i in range(n)
    ]


def runs(indices: Sequence[int], size: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` runs of consecutive ``indices`` (ascending), at most ``size`` long."""
    start = prev = None
    for i in indices:
        if start is not None and prev is not None and i == prev + 1 and i - start < size:
            prev = i
            continue
        if start is not None and prev is not None:
            yield start, prev + 1
        start = prev = i
    if start is not None and prev is not None:
        yield start, prev + 1


class StreamStage:
    """Read series while they arrive: lease, score new slices, alert early.

    Parameters
    ----------
    config : NodeConfig
        ``series`` (reading and selection rules, ``early_min_slices``),
        ``notifications`` (targets with ``early: true``), ``storage.dir``.
    name : str
        The worker's name (stream leases are held under it, as job leases are).
    store : Store
        The node's store.
    classifier : ich_node.model.inference.Classifier
        The worker's model.
    streams : Streams
        The streams, shared with the model stage (which reads their caches).
    lock : threading.Lock
        Held while the model runs: the model stage holds it too.
    max_streams : int
        Series streamed at once (:data:`MAX_STREAMS`).
    """

    def __init__(
        self,
        config: NodeConfig,
        name: str,
        store: Store,
        classifier: Any,
        streams: Streams,
        lock: threading.Lock,
        *,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self.config = config
        self.name = name
        self.store = store
        self.classifier = classifier
        self.streams = streams
        self.lock = lock
        self.max_streams = max_streams
        self._taken_at = float("-inf")
        self.early_targets = tuple(t for t in config.notifications if t.early)

    # -- leases -----------------------------------------------------------------

    def wanted(self, record: SeriesRecord) -> bool:
        """Whether a receiving series is one the node would read (headers' rules)."""
        from ich_node.ingest.assemble import select_headers

        return (
            record.state == "receiving"
            and record.version < self.config.series.max_versions
            and select_headers(record, self.config.series) is None
        )

    def take(self, now: float) -> list[str]:
        """Lease receiving series until :attr:`max_streams` are held; their UIDs."""
        if len(self.streams) >= self.max_streams or now - self._taken_at < TAKE_EVERY_SECONDS:
            return []
        self._taken_at = now
        held_elsewhere = {
            s.series_instance_uid
            for s in self.store.streams()
            if s.worker != self.name and s.lease_until >= now
        }
        taken: list[str] = []
        for record in self.store.receiving_series():
            uid = record.series_instance_uid
            if len(self.streams) >= self.max_streams:
                break
            if self.streams.get(uid) is not None or uid in held_elsewhere:
                continue
            if not self.wanted(record):
                continue
            if not self.store.lease_stream(uid, self.name, now, now + STREAM_LEASE_SECONDS):
                continue
            paths = self.store.instance_paths(uid)
            values = phi_values_of_file(paths[0]) if paths else {}
            self.streams.add(Stream(uid, now, PHI.hold(values)))
            taken.append(uid)
            log.info("stream.started", worker=self.name, series_instance_uid=uid)
        return taken

    def end(self, stream: Stream, why: str) -> None:
        """Stop streaming a series: its lease ends, its outputs are let go."""
        uid = stream.series_instance_uid
        self.streams.pop(uid)
        PHI.release(stream.phi)
        try:
            self.store.release_stream(uid, self.name)
        except Exception as exc:  # it expires on its own
            log.warning("stream.release_failed", series_instance_uid=uid, error=type(exc).__name__)
        log.info(
            "stream.ended",
            worker=self.name,
            series_instance_uid=uid,
            reason=why,
            n_slices=0 if stream.series is None else len(stream.series.slices),
            scored=stream.scored,
            seconds=round(time.time() - stream.since, 3),
        )

    def keep(self, stream: Stream, now: float) -> bool:
        """Renew the lease of a stream still of use; end it otherwise. Whether it goes on.

        A stream goes on while its series receives, and after that while the job
        of its last version waits or runs on this worker, at most
        :data:`HOLD_SECONDS`.
        """
        record = self.store.series(stream.series_instance_uid)
        if record is None or record.state in ("skipped", "capped", "purged"):
            self.end(stream, f"series {record.state if record else 'gone'}")
            return False
        if record.state == "receiving":
            stream.quiet_since = None
        else:
            stream.quiet_since = stream.quiet_since or now
            job = self.store.job(job_id_for(record.series_instance_uid, record.version))
            if job is None or job.state in ("done", "parked"):
                self.end(stream, "read" if job is not None and job.state == "done" else "parked")
                return False
            if job.state == "leased" and job.worker != self.name:
                self.end(stream, "read by another worker")
                return False
            if now - stream.quiet_since > HOLD_SECONDS:
                self.end(stream, f"its job not read here within {HOLD_SECONDS:g} s")
                return False
        if not self.store.lease_stream(
            stream.series_instance_uid, self.name, now, now + STREAM_LEASE_SECONDS
        ):
            self.end(stream, "lease lost")
            return False
        return record.state == "receiving"

    # -- scoring ----------------------------------------------------------------

    def read(self, stream: Stream) -> CTSeries | None:
        """The slices received so far, in order (headers only); ``None`` while unreadable."""
        paths = tuple(self.store.instance_paths(stream.series_instance_uid))
        if paths == stream.paths:
            return stream.series
        series = self.config.series
        try:
            stream.series = read_series(
                paths,
                max_tilt_deg=series.max_tilt_degrees,
                preferred_kernels=series.preferred_kernels,
                max_gap_mm=series.max_gap_mm,
                headers=stream.headers,
                quiet=True,
            )
        except (ImagingError, StorageUnavailable, OSError):
            stream.series = None  # not (yet) readable as a series: the read at completion says why
        stream.paths = paths
        for gone in set(stream.headers) - set(paths):  # replaced by a changed re-send
            del stream.headers[gone]
        return stream.series

    def advance(
        self,
        stream: Stream,
        give_way: Callable[[], bool] = lambda: False,
    ) -> int:
        """Score the slices of ``stream`` not scored in their current place; how many were.

        Stops between batches when ``give_way()`` (a job waits for the model, or
        the worker stops); the next pass goes on.
        """
        series = self.read(stream)
        if series is None or not series.slices:
            return 0
        classifier = self.classifier
        sigs = signatures(series, classifier.context)
        todo = [i for i, sig in enumerate(sigs) if sig not in stream.digests]
        todo = [i for i in todo if sigs[i] not in stream.failed]
        scored = 0
        for start, end in runs(todo, classifier.batch_size):
            # A job on the model holds the lock for its whole read: this pass stops
            # rather than wait for it (the leases are renewed meanwhile); the next goes on.
            if give_way() or self.lock.locked():
                break
            try:
                _, images = classifier.prepare_run(series, start, end)
                keys = [input_digest(image) for image in images]
                if not self.lock.acquire(timeout=LOCK_WAIT_SECONDS):
                    break
                try:
                    classifier.outputs(images, stream.cache, keys=keys)
                finally:
                    self.lock.release()
            except Exception as exc:  # the read at completion fails with its reason
                stream.failed.update(sigs[start:end])
                log.warning(
                    "stream.slices_not_scored",
                    series_instance_uid=stream.series_instance_uid,
                    n=end - start,
                    error=redact(f"{type(exc).__name__}: {exc}")[:300],
                )
                continue
            stream.digests.update(zip(sigs[start:end], keys, strict=True))
            scored += end - start
        current = set(sigs)
        if len(stream.digests) > len(current) or stream.failed - current:
            # Slices re-sent or re-placed: their old outputs are of no use any more.
            stream.digests = {s: d for s, d in stream.digests.items() if s in current}
            stream.failed &= current
            stream.cache.retain(stream.digests.values())
        stream.scored += scored
        return scored

    def rows(self, stream: Stream) -> list[SliceRow] | None:
        """Each slice's CNN outputs in order, or ``None`` while one is not scored."""
        if stream.series is None:
            return None
        rows = []
        for sig in signatures(stream.series, self.classifier.context):
            key = stream.digests.get(sig)
            row = None if key is None else stream.cache.peek(key)
            if row is None:
                return None
            rows.append(row)
        return rows

    # -- early alerts -----------------------------------------------------------

    def alert_early(self, stream: Stream, now: float) -> list[Any]:
        """Record the preliminary alerts the slices so far call for; returns the new ones."""
        if not self.early_targets or stream.paths == stream.early_checked:
            return []
        series, rows = stream.series, self.rows(stream)
        if series is None or rows is None:
            return []
        stream.early_checked = stream.paths
        uid = stream.series_instance_uid
        record = self.store.series(uid)
        if record is None or record.state != "receiving":
            return []  # complete: its final alert decides
        version = record.version + 1
        targets = [t for t in self.early_targets if (version, t.name) not in stream.preliminary]
        if not targets:
            return []
        from ich_node.delivery.outbox import prepare_preliminary_alerts
        from ich_node.results.common import source_header

        findings = replace(self.classifier.findings_of(series, rows), version=version)
        alerts = prepare_preliminary_alerts(
            self.store,
            self.config.storage.dir,
            targets,
            job_id=job_id_for(uid, version),
            version=version,
            findings=findings,
            min_slices=self.config.series.early_min_slices,
            header=source_header(series),
            hu_of=lambda i: load_hu(series.slices[i].path, series.slices[i].frame_number),
            last_received_at=self.store.last_received_at(uid, now) or now,
            now=time.time(),
            mode=self.config.node.mode,
        )
        for alert in alerts:
            stream.preliminary.add((version, alert.target))
        if alerts:
            log.info(
                "stream.preliminary_alerts",
                series_instance_uid=uid,
                version=version,
                n_slices=len(series.slices),
                targets=[a.target for a in alerts],
                positive=[list(a.positive_labels) for a in alerts],
            )
        return alerts

    # -- the thread -------------------------------------------------------------

    def run_once(self, now: float, give_way: Callable[[], bool] = lambda: False) -> int:
        """One pass: keep or end the streams, take new ones, score, alert; slices scored."""
        scored = 0
        for stream in self.streams.all():
            try:
                if not self.keep(stream, now):
                    continue
                scored += self.advance(stream, give_way)
                self.alert_early(stream, now)
            except Exception as exc:  # a database hiccup: the next pass tries again
                log.error(
                    "stream.pass_failed",
                    series_instance_uid=stream.series_instance_uid,
                    error=redact(f"{type(exc).__name__}: {exc}")[:300],
                )
        try:
            self.take(now)
        except Exception as exc:
            log.error("stream.take_failed", worker=self.name, error=type(exc).__name__)
        return scored

    def run(
        self,
        stop: threading.Event,
        jobs_waiting: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        """The stream thread: :meth:`run_once` every ``poll_seconds`` until ``stop``.

        Gives way to the job pipeline: a batch is started only while no job waits
        for the model (``jobs_waiting``). At the stop, every stream ends (the
        series are read at completion, by whichever worker runs then).
        """

        def give_way() -> bool:
            return stop.is_set() or jobs_waiting()

        try:
            while not stop.is_set():
                scored = self.run_once(clock(), give_way)
                if not scored:
                    stop.wait(poll_seconds)
        finally:
            for stream in self.streams.all():
                self.end(stream, "worker stopping")
