"""The reading-job queue, in the node's SQLite store.

States: ``queued`` → ``leased`` (with an expiry) → ``done``; a failure goes to
``retry`` (exponential backoff) and, after ``queue.max_attempts`` attempts, to
``parked`` with the reason. A job is never deleted when taken: a worker that dies
leaves a lease that expires (or that the supervisor releases) and the job runs
again. Completing a job writes its outbox (one delivery per destination) in the
same transaction that marks it done, so results go out once per series version.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence

from ich_node.config import QueueSection
from ich_node.store import JobRecord, SrReference, Store


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

    def _backoff(self, attempts: int) -> float:
        return self.config.retry_base_seconds * 2.0 ** max(attempts - 1, 0)

    def lease(self, worker: str, now: float) -> JobRecord | None:
        """Take the oldest runnable job (queued, due retry, or expired lease)."""
        with self.store.transaction() as db:
            while True:
                row = db.execute(
                    """SELECT * FROM jobs WHERE (state IN ('queued', 'retry') AND not_before <= ?)
                        OR (state = 'leased' AND lease_until < ?)
                    ORDER BY created_at LIMIT 1""",
                    (now, now),
                ).fetchone()
                if row is None:
                    return None
                job = JobRecord(**dict(row))
                if job.attempts >= self.config.max_attempts:
                    # Only an expired lease gets here: the worker died on every attempt.
                    reason = job.reason or "lease expired on every attempt (worker died?)"
                    db.execute(
                        """UPDATE jobs SET state = 'parked', reason = ?, lease_until = NULL,
                            updated_at = ? WHERE job_id = ?""",
                        (f"after {job.attempts} attempts: {reason}", now, job.job_id),
                    )
                    continue
                db.execute(
                    """UPDATE jobs SET state = 'leased', attempts = attempts + 1,
                        lease_until = ?, worker = ?, updated_at = ? WHERE job_id = ?""",
                    (now + self.config.lease_seconds, worker, now, job.job_id),
                )
                leased = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job.job_id,))
                return JobRecord(**dict(leased.fetchone()))

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
    ) -> None:
        """Mark a leased job done and write its outbox, in one transaction.

        ``sr`` (the UIDs of the SR the job sends) is kept so that the next version
        of the series names it as its predecessor.

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
            for name in destinations if n_files else ():
                db.execute(
                    """INSERT OR IGNORE INTO deliveries (job_id, destination, state, next_at,
                        n_files, created_at, updated_at) VALUES (?, ?, 'pending', ?, ?, ?, ?)""",
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
                """UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0),
                    lease_until = NULL, not_before = ?, updated_at = ? WHERE job_id = ?""",
                (now, now, job.job_id),
            )

    def fail(self, job: JobRecord, reason: str, now: float) -> str:
        """Record a failed attempt: ``retry`` with backoff, or ``parked``; returns the state."""
        with self.store.transaction() as db:
            self._check_lease(db, job)
            if job.attempts >= self.config.max_attempts:
                state, reason = "parked", f"after {job.attempts} attempts: {reason}"
            else:
                state = "retry"
            db.execute(
                """UPDATE jobs SET state = ?, reason = ?, lease_until = NULL,
                    not_before = ?, updated_at = ? WHERE job_id = ?""",
                (state, reason, now + self._backoff(job.attempts), now, job.job_id),
            )
            return state

    def release_worker(self, worker: str, reason: str, now: float) -> list[str]:
        """Release the leases of a worker that is gone (the attempt still counts)."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT job_id, attempts FROM jobs WHERE state = 'leased' AND worker = ?",
                (worker,),
            ).fetchall()
            for row in rows:
                parked = row["attempts"] >= self.config.max_attempts
                db.execute(
                    """UPDATE jobs SET state = ?, reason = ?, lease_until = NULL,
                        not_before = ?, updated_at = ? WHERE job_id = ?""",
                    (
                        "parked" if parked else "retry",
                        f"after {row['attempts']} attempts: {reason}" if parked else reason,
                        now,
                        now,
                        row["job_id"],
                    ),
                )
            return [r["job_id"] for r in rows]

    def requeue(self, job_id: str, now: float) -> bool:
        """A parked job back to ``queued`` with fresh attempts (``resend``)."""
        with self.store.transaction() as db:
            cur = db.execute(
                """UPDATE jobs SET state = 'queued', attempts = 0, reason = '', not_before = ?,
                    updated_at = ? WHERE job_id = ? AND state = 'parked'""",
                (now, now, job_id),
            )
            return cur.rowcount > 0
