"""The reading-job queue, in the node's SQLite store.

States: ``queued`` → ``leased`` (with an expiry) → ``done``; a failure goes to
``retry`` (exponential backoff) and, after ``queue.max_attempts`` attempts, to
``parked`` with the reason. A leased job's ``stage`` (``read``, ``model``,
``results``) says where it is in its worker's pipeline: when a worker dies, only
the job on the model is charged the attempt, the others go back to the queue.
A job is never deleted when taken: a worker that dies leaves a lease that
expires (or that the supervisor releases) and the job runs again. Completing a
job writes its outbox (one delivery per destination) in the same transaction
that marks it done, so results go out once per series version.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ich_node.config import QueueSection
from ich_node.queue.interface import (
    DeliveryStore,
    InstanceStore,
    JobStage,
    JobState,
    JobStore,
    SeriesQueue,
    SeriesRead,
    SrReference,
)
from ich_node.queue.store import JobRecord, Store

#: Seconds a new job is left to the worker that streamed its series (which holds
#: the slices' outputs, :mod:`ich_node.service.stream_stage`) before any worker
#: may take it.
STREAM_AFFINITY_SECONDS = 10.0
#: A runnable job not left to another worker's streaming read (SQL; parameters:
#: the leasing worker, ``now``, ``now - STREAM_AFFINITY_SECONDS``).
NOT_STREAMED_ELSEWHERE = """NOT EXISTS (SELECT 1 FROM streams s
    WHERE s.series_instance_uid = jobs.series_instance_uid AND s.worker != ?
    AND s.lease_until >= ? AND jobs.created_at > ?)"""


@dataclass(frozen=True, slots=True)
class Released:
    """What :meth:`JobQueue.release_worker` did with the leases of a worker that is gone."""

    charged: tuple[str, ...]  # job ids charged the attempt (retry or parked)
    given_back: tuple[str, ...]  # job ids back to queued, the attempt not counted
    parked: tuple[str, ...]  # of those charged or given back, the ones now parked

    def __len__(self) -> int:
        return len(self.charged) + len(self.given_back)


def job_id_for(series_instance_uid: str, version: int) -> str:
    """Deterministic job id of a series version (stable across restarts)."""
    digest = hashlib.sha256(f"{series_instance_uid}/{version}".encode()).hexdigest()
    return digest[:16]


class LeaseLost(RuntimeError):
    """The job's lease expired and another worker took it (or it was released)."""


class JobQueue:
    """Lease, complete and fail jobs.

    Parameters
    ----------
    store : Store
        The node's store.
    config : QueueSection
        ``queue`` section: lease length, attempts, retry backoff.
    """

    def __init__(self, store: Store, config: QueueSection) -> None:
        self.store = store
        self.config = config

    def enqueue_series(
        self,
        series_instance_uid: str,
        n_read: int,
        now: float,
        seen_last_at: float | None,
        cause: str | None = None,
    ) -> JobRecord:
        """Bump the series' version and queue its job (see :meth:`Store.queue_series`)."""
        return self.store.queue_series(
            series_instance_uid, n_read, job_id_for, now, seen_last_at=seen_last_at, cause=cause
        )

    def job(self, job_id: str) -> JobRecord | None:
        return self.store.job(job_id)

    def jobs(self, state: JobState | None = None) -> list[JobRecord]:
        return self.store.jobs(state)

    def previous_sr(self, series_instance_uid: str, version: int) -> SrReference | None:
        """The SR of the latest earlier version of a series that sent one."""
        return self.store.previous_sr(series_instance_uid, version)

    def reads(
        self,
        series_instance_uid: str | None = None,
        *,
        study_instance_uid: str | None = None,
        accession_number: str | None = None,
    ) -> list[SeriesRead]:
        """Rows of the results ledger (see :meth:`Store.reads`)."""
        return self.store.reads(
            series_instance_uid,
            study_instance_uid=study_instance_uid,
            accession_number=accession_number,
        )

    def _backoff(self, attempts: int) -> float:
        return self.config.retry_base_seconds * 2.0 ** max(attempts - 1, 0)

    def lease(self, worker: str, now: float) -> JobRecord | None:
        """Take the oldest runnable job (queued, due retry, or expired lease).

        A job whose series another live worker streamed is left to that worker for
        its first :data:`STREAM_AFFINITY_SECONDS` (it runs the CNN on nothing again).
        """
        with self.store.transaction() as db:
            while True:
                row = db.execute(
                    f"""SELECT * FROM jobs WHERE ((state IN ('queued', 'retry') AND not_before <= ?)
                        OR (state = 'leased' AND lease_until < ?))
                        AND {NOT_STREAMED_ELSEWHERE}
                    ORDER BY created_at LIMIT 1""",
                    (now, now, worker, now, now - STREAM_AFFINITY_SECONDS),
                ).fetchone()
                if row is None:
                    return None
                job = JobRecord(**dict(row))
                if self._park_if_exhausted(db, job, now):
                    continue
                db.execute(
                    """UPDATE jobs SET state = 'leased', attempts = attempts + 1, stage = 'read',
                        lease_until = ?, worker = ?, updated_at = ? WHERE job_id = ?""",
                    (now + self.config.lease_seconds, worker, now, job.job_id),
                )
                leased = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job.job_id,))
                return JobRecord(**dict(leased.fetchone()))

    def _park_if_exhausted(self, db: Any, job: JobRecord, now: float) -> bool:
        """Park a job found runnable that has used all its attempts; whether it did.

        Only an expired lease gets here: the worker died on every attempt. Both
        backends' :meth:`lease` call this (``db``: a ``sqlite3.Connection`` or the
        PostgreSQL store's cursor wrapper, both with ``?`` placeholders), so the
        policy and the reason are one.
        """
        if job.attempts < self.config.max_attempts:
            return False
        reason = job.reason or "lease expired on every attempt (worker died?)"
        db.execute(
            """UPDATE jobs SET state = 'parked', reason = ?, lease_until = NULL,
                updated_at = ? WHERE job_id = ?""",
            (f"after {job.attempts} attempts: {reason}", now, job.job_id),
        )
        return True

    def _check_lease(self, db: sqlite3.Connection, job: JobRecord) -> None:
        row = db.execute(
            "SELECT state, worker, attempts FROM jobs WHERE job_id = ?", (job.job_id,)
        ).fetchone()
        if (
            row is None
            or row["state"] != "leased"
            or row["worker"] != job.worker
            or row["attempts"] != job.attempts
        ):
            raise LeaseLost(f"job {job.job_id}: the lease of attempt {job.attempts} is gone")

    def complete(
        self,
        job: JobRecord,
        destinations: Sequence[str],
        n_files: int,
        now: float,
        sr: SrReference | None = None,
        read: SeriesRead | None = None,
    ) -> None:
        """Mark a leased job done and write its outbox, in one transaction.

        ``sr`` (the UIDs of the SR the job sends) is kept so that the next version
        of the series names it as its predecessor. ``read`` is the version's row of
        the results ledger (:class:`ich_node.queue.interface.SeriesRead`), written in
        the same transaction (:meth:`Store.record_read`).

        Raises
        ------
        LeaseLost
            When this worker's lease is no longer the job's current one.
        """
        with self.store.transaction() as db:
            self._check_lease(db, job)
            db.execute(
                """UPDATE jobs SET state = 'done', lease_until = NULL, reason = '', stage = '',
                    updated_at = ?, sr_study_uid = ?, sr_series_uid = ?, sr_sop_class_uid = ?,
                    sr_sop_uid = ? WHERE job_id = ?""",
                (
                    now,
                    *(
                        ("", "", "", "")
                        if sr is None
                        else (
                            sr.study_instance_uid,
                            sr.series_instance_uid,
                            sr.sop_class_uid,
                            sr.sop_instance_uid,
                        )
                    ),
                    job.job_id,
                ),
            )
            if read is not None:
                self.store.record_read(db, job, read, now)
            for name in destinations if n_files else ():
                db.execute(
                    """INSERT INTO deliveries (job_id, destination, state, next_at, n_files,
                        created_at, updated_at) VALUES (?, ?, 'pending', ?, ?, ?, ?)
                    ON CONFLICT DO NOTHING""",
                    (job.job_id, name, now, n_files, now, now),
                )

    def extend(self, job: JobRecord, now: float) -> float:
        """Push the lease of a job this worker still holds to ``now + lease_seconds``.

        A worker calls it while a long job runs, so that the lease only expires
        when the worker stops beating (dead or hung), not when a job is slow.

        Raises
        ------
        LeaseLost
            When the lease is no longer this worker's (released or taken over).
        """
        until = now + self.config.lease_seconds
        with self.store.transaction() as db:
            self._check_lease(db, job)
            db.execute(
                "UPDATE jobs SET lease_until = ?, updated_at = ? WHERE job_id = ?",
                (until, now, job.job_id),
            )
        return until

    def give_back(self, job: JobRecord, now: float) -> None:
        """Return a leased job that never ran to ``queued``, its attempt not counted.

        A worker that stops after leasing a job but before running it (the
        pipeline's read-ahead) gives it back, so that stops never use up attempts
        of jobs that did not run.

        Raises
        ------
        LeaseLost
            When the lease is no longer this worker's.
        """
        with self.store.transaction() as db:
            self._check_lease(db, job)
            db.execute(
                """UPDATE jobs SET state = 'queued',
                    attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,
                    lease_until = NULL, stage = '', not_before = ?, updated_at = ?
                WHERE job_id = ?""",
                (now, now, job.job_id),
            )

    def set_stage(self, job: JobRecord, stage: JobStage, now: float) -> None:
        """Record where a leased job is in the worker's pipeline (``model``, ``results``).

        When the worker dies, only the job on the model is charged the attempt
        (see :meth:`release_worker`).

        Raises
        ------
        LeaseLost
            When the lease is no longer this worker's.
        """
        with self.store.transaction() as db:
            self._check_lease(db, job)
            db.execute(
                "UPDATE jobs SET stage = ?, updated_at = ? WHERE job_id = ?",
                (stage, now, job.job_id),
            )

    def fail(self, job: JobRecord, reason: str, now: float, *, permanent: bool = False) -> str:
        """Record a failed attempt: ``retry`` with backoff, or ``parked``; returns the state.

        ``permanent``: no retry can fix this failure; the job is parked at once.
        """
        with self.store.transaction() as db:
            self._check_lease(db, job)
            if permanent:
                state, reason = "parked", f"not retried: {reason}"
            elif job.attempts >= self.config.max_attempts:
                state, reason = "parked", f"after {job.attempts} attempts: {reason}"
            else:
                state = "retry"
            db.execute(
                """UPDATE jobs SET state = ?, reason = ?, lease_until = NULL, stage = '',
                    not_before = ?, updated_at = ? WHERE job_id = ?""",
                (state, reason, now + self._backoff(job.attempts), now, job.job_id),
            )
            return state

    def release_worker(self, worker: str, reason: str, now: float) -> Released:
        """Release the leases of a worker that is gone; charge only the job that killed it.

        The job on the model when the worker died is charged the attempt (``retry``,
        or ``parked`` after ``queue.max_attempts``); when none was on the model, the
        one writing results is. Jobs only read ahead are given back to ``queued``
        without an attempt; one given back this way twice ``queue.max_attempts`` times
        is charged too (a decoder that kills the process while reading ahead), so no
        job can bring workers down for ever.
        """
        with self.store.transaction() as db:
            rows = db.execute(
                """SELECT job_id, attempts, stage, crash_returns FROM jobs
                WHERE state = 'leased' AND worker = ? ORDER BY created_at""",
                (worker,),
            ).fetchall()
            # Its streaming reads end with it (the series are read from the spool).
            db.execute("DELETE FROM streams WHERE worker = ?", (worker,))
            stages = {str(r["stage"]) for r in rows}
            guilty = "model" if "model" in stages else "results"
            charged: list[str] = []
            given_back: list[str] = []
            parked: list[str] = []
            for row in rows:
                job_id, attempts = str(row["job_id"]), int(row["attempts"])
                returns = int(row["crash_returns"]) + 1
                if row["stage"] == guilty or returns >= 2 * self.config.max_attempts:
                    charged.append(job_id)
                    where = "on the model" if row["stage"] == "model" else (
                        "writing its results" if row["stage"] == "results" else
                        f"read ahead ({returns} times)"
                    )  # fmt: skip
                    why = f"{reason} while this job was {where}"
                    if attempts >= self.config.max_attempts:
                        parked.append(job_id)
                        state, why = "parked", f"after {attempts} attempts: {why}"
                    else:
                        state = "retry"
                    db.execute(
                        """UPDATE jobs SET state = ?, reason = ?, lease_until = NULL,
                            stage = '', not_before = ?, updated_at = ? WHERE job_id = ?""",
                        (state, why, now, now, job_id),
                    )
                else:
                    given_back.append(job_id)
                    db.execute(
                        """UPDATE jobs SET state = 'queued',
                            attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,
                            crash_returns = ?, lease_until = NULL, stage = '', not_before = ?,
                            updated_at = ? WHERE job_id = ?""",
                        (returns, now, now, job_id),
                    )
            return Released(tuple(charged), tuple(given_back), tuple(parked))

    def requeue(self, job_id: str, now: float) -> bool:
        """A parked job back to ``queued`` with fresh attempts (``resend``)."""
        with self.store.transaction() as db:
            cur = db.execute(
                """UPDATE jobs SET state = 'queued', attempts = 0, reason = '', not_before = ?,
                    updated_at = ? WHERE job_id = ? AND state = 'parked'""",
                (now, now, job_id),
            )
            return cur.rowcount > 0


def _implements(
    store: Store, queue: JobQueue
) -> tuple[InstanceStore, DeliveryStore, JobStore, SeriesQueue]:
    """Checked by mypy: the SQLite store and queue implement the store interfaces."""
    return store, store, queue, queue
