"""Series assembly: when a series is complete, and whether the node reads it.

A series is complete ``series.stable_seconds`` after its last instance (the
quiet period). Before its first read it may end earlier, when every image of a
count that describes the *whole series* has come: NumberOfSeriesRelatedInstances
when present, or ImagesInAcquisition only when every received instance carries
one AcquisitionNumber (PS3.3 C.7.6.1 defines it per acquisition: a series of 21
acquisitions counts each one), and only when the count is at least
``series.min_slices``. After a read, late instances and changed re-sends
(see :mod:`ich_node.ingest.spool`) start the quiet period again and one new version is
read once it is quiet, never one per instance; at most ``series.max_versions``
versions are read (the series is then ``capped``, its later instances stored but
not read). A re-send that only repeats what the last read answered is not read
again (:meth:`Assembler.compare_with_last_read`): the same images re-encoded in
another transfer syntax, or the whole series re-sent after retention purged its
images (then ``series.reread_identical: true`` asks for a fresh read). The
selection rules of the ``series`` section then decide: modality, optional
patterns on body part and descriptions, exclusion patterns on the series
description, then the headers themselves (:func:`ich_node.imaging.read_series`:
axial within the tilt tolerance, localizers dropped) and the slice count. A
series the node does not read is recorded as ``skipped`` with the reason. An
instance arriving after a series was read puts it back to ``receiving``; the next
read queues a new version (a new job, a new set of results, an SR naming the
previous one).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import structlog

from ich_node.config import SeriesSection
from ich_node.imaging import ImagingError, StorageUnavailable, read_series
from ich_node.imaging.identity import content_identity, fingerprint
from ich_node.imaging.records import one_line
from ich_node.log import handling_phi, phi_values_of_file, redact
from ich_node.metrics import Metrics
from ich_node.queue.backend import StorageWatch
from ich_node.queue.interface import InstanceStore, SeriesQueue, SeriesRecord

log = structlog.get_logger(__name__)

#: Seconds between tries of a series one of whose spooled files cannot be read
#: (:class:`ich_node.imaging.StorageUnavailable`), and how long it is tried before
#: it is skipped with that reason.
STORAGE_RETRY_SECONDS: Final = 5.0
STORAGE_GIVE_UP_SECONDS: Final = 600.0
#: Seconds of decoding per assembly pass to compare re-sent instances with what was
#: read (:meth:`Assembler.compare_with_last_read`); the rest waits for the next pass,
#: so a big re-sent series never holds up the decisions on others.
IDENTITY_BUDGET_SECONDS: Final = 1.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What the assembler did with one complete series."""

    series_instance_uid: str
    queued: bool
    job_id: str | None
    version: int
    reason: str  # why it was skipped or not read again; empty when queued
    deferred: bool = False  # neither: decided on a later pass (storage, a read in progress)
    identical: bool = False  # not read again: the same content as the last read


@dataclass(frozen=True, slots=True)
class Comparison:
    """How a series that was read before compares with its last read (see
    :meth:`Assembler.compare_with_last_read`)."""

    outcome: Literal["identical", "changed", "wait"]
    version: int  # the version compared with (0: none)
    detail: str = ""


def _search(patterns: tuple[str, ...], value: str) -> bool:
    return any(re.search(p, value) for p in patterns)


def select_headers(record: SeriesRecord, config: SeriesSection) -> str | None:
    """Why the recorded header fields rule the series out, or ``None``."""
    if record.modality.upper() not in {m.upper() for m in config.modalities}:
        return f"modality {record.modality or '(none)'!r} is not in series.modalities"
    # An empty BodyPartExamined passes: many real head CTs lack it.
    if (
        config.body_part_patterns
        and record.body_part
        and not _search(config.body_part_patterns, record.body_part)
    ):
        return f"body part {record.body_part!r} matches no series.body_part_patterns"
    if config.study_description_patterns and not _search(
        config.study_description_patterns, record.study_description
    ):
        return "study description matches no series.study_description_patterns"
    if config.series_description_patterns and not _search(
        config.series_description_patterns, record.series_description
    ):
        return "series description matches no series.series_description_patterns"
    if _search(config.exclude_description_patterns, record.series_description):
        return "series description matches series.exclude_description_patterns"
    return None


class Assembler:
    """Decide complete series and queue their jobs.

    Parameters
    ----------
    store : InstanceStore
        Instances and series.
    config : SeriesSection
        ``series`` section.
    metrics : Metrics, optional
        Series decisions are counted there.
    queue : SeriesQueue, optional
        Where complete series are queued; by default a
        :class:`ich_node.queue.jobs.JobQueue` on ``store`` (which must then be a
        :class:`ich_node.queue.store.Store`).

    Raises
    ------
    TypeError
        When ``queue`` is omitted and ``store`` is not a :class:`ich_node.queue.store.Store`.
    """

    def __init__(
        self,
        store: InstanceStore,
        config: SeriesSection,
        metrics: Metrics | None = None,
        *,
        queue: SeriesQueue | None = None,
    ) -> None:
        if queue is None:
            from ich_node.config import QueueSection
            from ich_node.queue.jobs import JobQueue
            from ich_node.queue.store import Store

            if not isinstance(store, Store):
                raise TypeError(f"queue is required with a store of type {type(store).__name__}")
            queue = JobQueue(store, QueueSection())
        self.store = store
        self.queue = queue
        self.config = config
        self.metrics = metrics
        # Series waiting for their storage: uid -> (first failure, next try), seconds.
        self._storage_waits: dict[str, tuple[float, float]] = {}
        self._storage = StorageWatch(
            store, "series.storage_not_mounted", action="no series decided until it is"
        )
        # End of this pass's decoding for re-send comparisons (perf_counter time).
        self._identity_deadline = 0.0

    def is_complete(self, record: SeriesRecord, now: float) -> bool:
        """Whether ``record`` is complete at ``now`` (see the module's rules)."""
        never_read = record.version == 0 and record.n_read == 0
        expected = record.expected
        # A count below series.min_slices cannot be a whole head series the node
        # reads: the first images of a series of one-image acquisitions say
        # ImagesInAcquisition 1 under one AcquisitionNumber.
        if (
            never_read
            and expected is not None
            and expected >= self.config.min_slices
            and record.n_instances >= expected
        ):
            return True
        return now - record.last_at >= self.config.stable_seconds

    def cap(self, record: SeriesRecord) -> Decision:
        """Record that a series at ``series.max_versions`` is not read again."""
        uid, limit = record.series_instance_uid, self.config.max_versions
        reason = (
            f"series.max_versions ({limit}) reached: "
            f"{record.n_instances - record.n_read + record.n_replaced} later instances "
            "stored, not read"
        )
        self.store.skip_series(
            uid, record.n_instances, reason, seen_last_at=record.last_at, state="capped"
        )
        log.warning(
            "series.max_versions_reached",
            series_instance_uid=uid,
            versions=record.version,
            instances=record.n_instances,
        )
        return Decision(uid, False, None, record.version, reason)

    def decide(self, record: SeriesRecord, now: float) -> Decision:
        """Read the headers of a complete series and queue it or skip it."""
        # While the headers are read, the patient's values are scrubbed from every
        # message (library warnings quote them; log.redact replaces registered values
        # only). Read raw from the first, middle and last file, as the worker does.
        paths = self.store.instance_paths(record.series_instance_uid)
        values: dict[str, str] = {}
        for path in {paths[0], paths[len(paths) // 2], paths[-1]} if paths else ():
            values |= phi_values_of_file(path)
        with handling_phi(values):
            return self._decide(record, now)

    def compare_with_last_read(self, record: SeriesRecord) -> Comparison:
        """Whether a re-sent series holds the content its last read answered.

        Compared only when nothing was added since that read: instances re-sent
        with other bytes (``n_replaced``), or the series re-sent after retention
        purged its images (``purged_at``). Late instances are new content: not
        compared. The last read is the results ledger's row of the latest version
        (:class:`ich_node.queue.interface.SeriesRead`); while that version is still
        being read, the answer is ``wait``; when it was parked (no answer), ``changed``.

        Equal when the instances' digests as received give the version's bytes
        fingerprint (nothing decoded), else when their content identities
        (:func:`ich_node.imaging.identity.content_identity`: decoded HU and the
        clinically relevant attributes; kept per instance once computed) give its
        content fingerprint. Decoding stops at this pass's share of
        :data:`IDENTITY_BUDGET_SECONDS` (``wait``; the next pass goes on).
        """
        uid = record.series_instance_uid
        purged = record.purged_at is not None
        if record.version < 1 or not (
            purged or (record.n_replaced > 0 and record.n_instances <= record.n_read)
        ):
            return Comparison("changed", 0, "new instances")
        job = self.store.latest_job(uid)
        if job is None:
            return Comparison("changed", 0, "no earlier read")
        if job.state in ("queued", "leased", "retry"):
            return Comparison("wait", job.version, f"version {job.version} is being read")
        last = self.store.latest_read(uid)
        if job.state != "done" or last is None or last.version != job.version:
            return Comparison("changed", job.version, f"version {job.version} gave no answer")
        current = self.store.instance_identities(uid)
        if len(current) != last.n_instances:
            return Comparison(
                "changed", last.version, f"{len(current)} instances, {last.n_instances} read"
            )
        digests = [i.digest for i in current]
        if (
            last.bytes_fingerprint
            and all(digests)
            and fingerprint(digests) == last.bytes_fingerprint
        ):
            return Comparison("identical", last.version, "the same bytes")
        computed: dict[Path, str] = {}
        missing = [i.path for i in current if not i.content_id]
        try:
            for path in missing:
                if time.perf_counter() > self._identity_deadline:
                    break
                computed[path] = content_identity(path)
        except (ImagingError, StorageUnavailable) as exc:
            # Not comparable (a file gone, or not DICOM): read it, the read says why.
            return Comparison("changed", last.version, type(exc).__name__)
        finally:
            self.store.set_content_ids(computed)  # kept: the next pass goes on from here
        if len(computed) < len(missing):
            return Comparison(
                "wait", last.version, f"{len(missing) - len(computed)} instances to compare"
            )
        ids = [i.content_id or computed[i.path] for i in current]
        if fingerprint(ids) == last.content_fingerprint:
            return Comparison("identical", last.version, "the same content decoded")
        return Comparison("changed", last.version, "other content")

    def _decide(self, record: SeriesRecord, now: float) -> Decision:
        uid = record.series_instance_uid
        n = record.n_instances
        if record.version >= self.config.max_versions:
            return self.cap(record)
        cause: str | None = None
        comparison = self.compare_with_last_read(record)
        if comparison.outcome == "wait":
            return Decision(uid, False, None, record.version, comparison.detail, deferred=True)
        if comparison.outcome == "identical":
            purged = record.purged_at is not None
            if purged and self.config.reread_identical:
                cause = (
                    "re-sent after its images were purged, the same content as version "
                    f"{comparison.version}: read again (series.reread_identical)"
                )
            else:
                what = "re-sent after its images were purged" if purged else "re-sent"
                same = (
                    f"{what}, the same content as version {comparison.version} "
                    f"({comparison.detail}): answered already, not read again"
                )
                self.store.settle_series(uid, n, same, seen_last_at=record.last_at)
                log.info(
                    "series.resend_identical",
                    series_instance_uid=uid,
                    instances=n,
                    version=comparison.version,
                    purged=purged,
                    compared=comparison.detail,
                )
                return Decision(uid, False, None, record.version, same, identical=True)
        reason = select_headers(record, self.config)
        if reason is None:
            try:
                series = read_series(
                    self.store.instance_paths(uid),
                    max_tilt_deg=self.config.max_tilt_degrees,
                    preferred_kernels=self.config.preferred_kernels,  # the stack the worker reads
                )
            except StorageUnavailable as exc:
                # The storage's fault, not the series': never decided on part of it.
                first, _ = self._storage_waits.get(uid, (now, now))
                if now - first < STORAGE_GIVE_UP_SECONDS:
                    self._storage_waits[uid] = (first, now + STORAGE_RETRY_SECONDS)
                    log.error(
                        "series.storage_unavailable",
                        series_instance_uid=uid,
                        error=redact(one_line(str(exc), 300)),
                        action=f"tried again in {STORAGE_RETRY_SECONDS:g} s",
                    )
                    return Decision(
                        uid, False, None, record.version, "waiting for the storage", deferred=True
                    )
                reason = redact(
                    f"a spooled file could not be read for {STORAGE_GIVE_UP_SECONDS:g} s: {exc}"
                )[:500]
            except ImagingError as exc:  # reasons name attributes, never values (redact)
                reason = redact(f"not readable as an axial CT series: {exc}")
            except Exception as exc:  # a reader bug must not leave the series undecided
                reason = redact(f"not readable as an axial CT series: {type(exc).__name__}: {exc}")[
                    :500
                ]
            else:
                if len(series.slices) < self.config.min_slices:
                    reason = (
                        f"{len(series.slices)} usable axial slices, "
                        f"series.min_slices is {self.config.min_slices}"
                    )
        self._storage_waits.pop(uid, None)
        if reason is not None:
            self.store.skip_series(uid, n, reason, seen_last_at=record.last_at)
            log.info("series.skipped", series_instance_uid=uid, instances=n, reason=reason)
            return Decision(uid, False, None, record.version, reason)
        job = self.queue.enqueue_series(uid, n, now, seen_last_at=record.last_at, cause=cause)
        log.info(
            "series.queued",
            series_instance_uid=uid,
            instances=n,
            version=job.version,
            job_id=job.job_id,
            cause=job.cause,
        )
        return Decision(uid, True, job.job_id, job.version, "")

    def run_once(self, now: float) -> list[Decision]:
        """One pass: decide every series that is complete at ``now``."""
        decisions: list[Decision] = []
        if not self._storage.ready():  # a shared storage.dir that is not mounted here
            return decisions
        self._identity_deadline = time.perf_counter() + IDENTITY_BUDGET_SECONDS
        for record in self.store.receiving_series():
            if not self.is_complete(record, now):
                continue
            waiting = self._storage_waits.get(record.series_instance_uid)
            if waiting is not None and now < waiting[1]:
                continue
            try:
                decision = self.decide(record, now)
                decisions.append(decision)
                if self.metrics is not None and not decision.deferred:
                    label = (
                        "queued"
                        if decision.queued
                        else "identical"
                        if decision.identical
                        else "skipped"
                    )
                    self.metrics.series.labels(label).inc()
            except Exception as exc:  # log and go on; the series stays receiving
                log.error(
                    "series.assemble_failed",
                    series_instance_uid=record.series_instance_uid,
                    error=type(exc).__name__,
                )
        return decisions
