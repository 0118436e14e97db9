"""Operations: ``ich-node status``, ``health`` and ``resend``.

They read (and for ``resend`` update) the node's store under ``storage.dir``;
they work whether the node is running or not. None of them creates or migrates
a store: on one they cannot use they print one line and exit 1 (no store yet,
an empty database, a database that does not answer) or 2 (a schema newer or
older than this code, a role without the privileges it needs, a file that
cannot be opened). ``health`` also opens a real
association to the listener (C-ECHO, calling AE = the node's own AE title, which
the listener accepts from the loopback address).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import ssl
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ich_node.config import NodeConfig, ServerTLS, mode_fields, sent_in_mode
from ich_node.log import redact
from ich_node.queue.backend import existing_store, is_shared, job_queue, storage_ready
from ich_node.queue.interface import HEARTBEAT_STALE_SECONDS, StoreUnusable
from ich_node.queue.layout import STORE_ID_NAME, StorageLayout
from ich_node.queue.store import JobRecord, Store

#: How many recent failures ``status`` lists.
RECENT_FAILURES: Final = 10
#: How many of the latest series not read ``status`` lists, with their reasons.
RECENT_SKIPS: Final = 5


def _open(config: NodeConfig, *, write: bool = False) -> Store | int:
    """The store as it is, or the exit code after one line on stderr saying why not."""
    try:
        return existing_store(config.storage, write=write)
    except StoreUnusable as exc:
        print(f"ich-node: {exc}", file=sys.stderr)
        return exc.exit_code


def mode_line(config: NodeConfig) -> str:
    """``node.mode`` in words, for ``status`` and ``health``."""
    if config.node.mode == "live":
        return "mode: live (results and alerts sent to every destination and target)"
    sent = [t.name for t in sent_in_mode(config.destinations, "shadow")] + [
        t.name for t in sent_in_mode(config.notifications, "shadow")
    ]
    return (
        "mode: shadow (read and recorded, not sent; sent only to "
        + (", ".join(sent) if sent else "no target")
        + ": shadow: true)"
    )


def shown_state(state: str, last: JobRecord | None, sent: Sequence[str]) -> str:
    """A series' state as ``status`` and the web console show it.

    The store keeps ``queued`` once a series has a job; here it becomes
    ``queued`` (job waiting or retrying), ``reading`` (leased), ``sending``
    (results made, deliveries pending), ``delivered`` or ``parked``. ``last`` is
    the series' latest job, ``sent`` the states of that job's deliveries.
    """
    if state != "queued" or last is None:
        return state
    if last.state == "leased":
        return "reading"
    if last.state == "parked":
        return "parked"
    if last.state == "done":
        if "parked" in sent:
            return "parked"
        return "delivered" if all(s == "done" for s in sent) else "sending"
    return state


def series_shown_states(store: Store) -> dict[str, str]:
    """The state of every series as :func:`shown_state` tells it, by SeriesInstanceUID."""
    latest: dict[str, JobRecord] = {}
    for job in store.jobs():
        held = latest.get(job.series_instance_uid)
        if held is None or job.version > held.version:
            latest[job.series_instance_uid] = job
    deliveries: dict[str, list[str]] = {}
    for d in store.deliveries():
        deliveries.setdefault(d.job_id, []).append(d.state)
    shown: dict[str, str] = {}
    for uid, state in store.series_states().items():
        last = latest.get(uid)
        shown[uid] = shown_state(state, last, deliveries.get(last.job_id, []) if last else [])
    return shown


def series_counts(store: Store) -> dict[str, int]:
    """Series per state, as :func:`series_shown_states` tells them."""
    counts: dict[str, int] = {}
    for shown in series_shown_states(store).values():
        counts[shown] = counts.get(shown, 0) + 1
    return counts


def notification_times(store: Store, since: float | None = None) -> list[float]:
    """Seconds from a series' last received instance to each alert's acceptance, sorted.

    Only accepted alerts; with ``since``, only those accepted at or after it.
    """
    return sorted(
        a.accepted_at - a.last_received_at
        for a in store.alerts()
        if a.accepted_at is not None
        and a.status != "P"  # a preliminary alert is timed apart (benchmarks/alerts.py)
        and (since is None or a.accepted_at >= since)
    )


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0 < q <= 1) of sorted ``values`` by nearest rank
    (the smallest value with at least ``q`` of them at or below it); ``None`` when empty."""
    if not values:
        return None
    return values[max(0, math.ceil(q * len(values)) - 1)]


def median(values: list[float]) -> float | None:
    """The median of ``values``: the middle one, or the mean of the two middle ones
    for an even count (7.0 s and 0.98 s give 3.99 s); ``None`` when empty."""
    return statistics.median(values) if values else None


def collect_status(store: Store, now: float) -> dict[str, Any]:
    """Counts per state, the oldest waiting job and recent failures."""
    waiting = [j for j in store.jobs() if j.state in ("queued", "retry", "leased")]
    oldest = min(waiting, key=lambda j: j.created_at) if waiting else None
    failures: list[dict[str, Any]] = []
    for job in store.jobs():
        if job.reason and job.state in ("retry", "parked"):
            failures.append(
                {
                    "kind": "job",
                    "job_id": job.job_id,
                    "state": job.state,
                    "reason": redact(job.reason),
                    "at": job.updated_at,
                }
            )
    for d in store.deliveries():
        if d.reason and d.state in ("retry", "parked"):
            failures.append(
                {
                    "kind": "delivery",
                    "job_id": d.job_id,
                    "destination": d.destination,
                    "state": d.state,
                    "reason": redact(d.reason),
                    "at": d.updated_at,
                }
            )
    failures.sort(key=lambda f: f["at"], reverse=True)
    reread = store.reread_counts()
    # Alerts are outbox rows named alert:<target> (ich_node.delivery): their own summary.
    alert_states: dict[str, int] = {}
    for d in store.deliveries():
        if d.destination.startswith("alert:"):
            alert_states[d.state] = alert_states.get(d.state, 0) + 1
    waits = notification_times(store)
    p95 = percentile(waits, 0.95)
    wait = median(waits)
    return {
        "alerts": {
            "states": alert_states,
            "median_time_to_notification_s": None if wait is None else round(wait, 2),
            "p95_time_to_notification_s": None if p95 is None else round(p95, 2),
        },
        "instances": store.n_instances(),
        "series": series_counts(store),
        "jobs": store.counts("jobs"),
        "deliveries": store.counts("deliveries"),
        "oldest_waiting_job": None
        if oldest is None
        else {
            "job_id": oldest.job_id,
            "state": oldest.state,
            "age_s": round(now - oldest.created_at, 1),
        },
        "recent_failures": failures[:RECENT_FAILURES],
        "series_read_again": {
            "series": reread.series,
            "late_instances": reread.late_instances,
            "changed_resends": reread.changed_resends,
        },
        "series_capped": reread.capped,
        "sop_uid_reused_instances": reread.sop_uid_reused,
        "heartbeats": {
            name: {"pid": pid, "age_s": round(now - at, 1)}
            for name, (pid, at) in sorted(store.heartbeats().items())
        },
        # What the node refused, by reason (images for low disk, invalid UIDs, paths
        # outside storage.dir), and the latest series it did not read, with why.
        "refusals": {
            reason: {"n": r.n, "last_age_s": round(now - r.last_at, 1), "last": r.detail}
            for reason, r in store.refusals().items()
        },
        "recent_skips": [
            {
                "series_instance_uid": uid,
                "state": state,
                "reason": redact(reason),
                "age_s": round(now - at, 1),
            }
            for uid, state, reason, at in store.skipped_series(RECENT_SKIPS)
        ],
    }


@dataclass(frozen=True, slots=True)
class Disk:
    """Free space where images are spooled, against ``storage.min_free_mb``."""

    free_mb: int | None  # None: storage.dir cannot be looked at
    min_free_mb: int
    error: str = ""

    @property
    def accepting(self) -> bool:
        return self.free_mb is not None and self.free_mb >= self.min_free_mb

    def describe(self) -> str:
        if self.free_mb is None:
            return f"cannot be looked at: {self.error}"
        if self.accepting:
            return f"{self.free_mb} MiB free (storage.min_free_mb {self.min_free_mb})"
        return (
            f"{self.free_mb} MiB free, below storage.min_free_mb {self.min_free_mb}: "
            "images are refused (0xA700) until space is freed"
        )


def disk(config: NodeConfig) -> Disk:
    """Free space on ``storage.dir`` now (what the listener checks at each C-STORE)."""
    try:
        free = shutil.disk_usage(config.storage.dir).free // 2**20
    except OSError as exc:
        return Disk(None, config.storage.min_free_mb, exc.strerror or type(exc).__name__)
    return Disk(int(free), config.storage.min_free_mb)


def status(config: NodeConfig, as_json: bool) -> int:
    """Print the node's state; 0, else 1 or 2 with one line (see the module)."""
    store = _open(config)
    if isinstance(store, int):
        return store
    try:
        report = collect_status(store, time.time())
    finally:
        store.close()
    report.update(mode_fields(config))
    room = disk(config)
    report["disk"] = {
        "free_mb": room.free_mb,
        "min_free_mb": room.min_free_mb,
        "accepting": room.accepting,
    }
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(mode_line(config))
    print(f"instances: {report['instances']}")
    for table in ("series", "jobs", "deliveries"):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(report[table].items())) or "none"
        print(f"{table}: {counts}")
    alerts = report["alerts"]
    if alerts["states"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(alerts["states"].items()))
        middle = alerts["median_time_to_notification_s"]
        waited = "none accepted yet" if middle is None else f"{middle} s"
        print(f"alerts: {counts} (median time to notification {waited})")
    oldest = report["oldest_waiting_job"]
    print(
        "oldest waiting job: "
        + (
            "none"
            if oldest is None
            else f"{oldest['job_id']} ({oldest['state']}, {oldest['age_s']} s)"
        )
    )
    again = report["series_read_again"]
    print(
        f"series read more than once: {again['series']} "
        f"(versions for late instances {again['late_instances']}, "
        f"for changed re-sends {again['changed_resends']})"
    )
    if report["series_capped"]:
        print(
            f"series at series.max_versions: {report['series_capped']} "
            "(later instances stored, not read)"
        )
    if report["sop_uid_reused_instances"]:
        print(
            f"instances whose SOP Instance UID is also in another series: "
            f"{report['sop_uid_reused_instances']} (each read with its own series)"
        )
    for name, beat in report["heartbeats"].items():
        print(f"heartbeat {name}: pid {beat['pid']}, {beat['age_s']} s ago")
    print(f"disk: {room.describe()}")
    refusals = report["refusals"]
    print(
        "refusals: " + (", ".join(f"{reason} {r['n']}" for reason, r in refusals.items()) or "none")
    )
    for reason, r in refusals.items():
        print(f"  {reason}: last {r['last_age_s']} s ago: {r['last']}")
    skips = report["recent_skips"]
    print(f"recent skips: {len(skips)}")
    for skip in skips:
        print(f"  series {skip['series_instance_uid']} [{skip['state']}]: {skip['reason']}")
    print(f"recent failures: {len(report['recent_failures'])}")
    for f in report["recent_failures"]:
        where = f" -> {f['destination']}" if f["kind"] == "delivery" else ""
        print(f"  {f['kind']} {f['job_id']}{where} [{f['state']}]: {f['reason']}")
    return 0


def echo(config: NodeConfig, timeout: float = 10.0) -> bool:
    """C-ECHO the node's own listener with its own AE title."""
    host = config.node.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    tls_args = None
    if config.node.tls is not None:
        # The name only goes into SNI: the host name is not checked (see below).
        tls_args = (_self_check_context(config.node.tls), "localhost")
    assoc = ae.associate(host, config.node.port, ae_title=config.node.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return False
    try:
        result = assoc.send_c_echo()
        return getattr(result, "Status", None) == 0x0000
    finally:
        assoc.release()


def _self_check_context(tls: ServerTLS) -> ssl.SSLContext:
    """A client context that trusts the node's own server certificate.

    ``health`` talks to its own listener on the loopback address, so the host name
    is not checked; the node's certificate itself is the trust anchor (partial
    chains allowed). When client certificates are required it presents the node's
    own certificate, which therefore must be signed by ``node.tls.ca``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cafile=str(tls.cert))
    if tls.require_client_cert:
        context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    return context


@dataclass(frozen=True, slots=True)
class HealthPart:
    """One thing ``health`` checks: its name, whether it is fine, what was found."""

    name: str
    ok: bool
    detail: str


def _writable(config: NodeConfig, store: Store | None) -> str:
    """Why images could not be stored now ('' when they could): the spool and the store."""
    spool = StorageLayout(config.storage.dir).spool
    folder = spool if spool.is_dir() else config.storage.dir
    probe = folder / f".ich-node-health.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{folder} not writable: {exc.strerror or exc}"
    if store is None:
        return "no store yet"
    try:
        store.probe_write()
    except Exception as exc:  # read-only file or role, database gone, disk full
        return f"the store cannot be written: {type(exc).__name__}: {exc}"[:300]
    return ""


def check_health(config: NodeConfig, role: str = "all") -> tuple[list[HealthPart], int | None]:
    """What ``health`` checks, part by part (see :func:`health`).

    Returns the parts and, when the store cannot be used by this code (a newer
    schema, missing privileges), its exit code (2) after one line on stderr.
    """
    from ich_node.service.serve import node_id, workers_state

    shared = is_shared(config.storage)
    prefix = f"{node_id(config)}." if shared else ""
    parts: list[HealthPart] = []
    listens, works = role != "worker", role != "listener"
    if listens:
        answered = echo(config)
        parts.append(
            HealthPart("listener", answered, "answers C-ECHO" if answered else "no C-ECHO answer")
        )
    opened = _open(config, write=listens)
    if opened == 2:
        return parts, 2  # said why: a store this node cannot use (schema, privileges)
    store = opened if isinstance(opened, Store) else None
    now = time.time()
    try:
        if listens:
            room = disk(config)
            parts.append(HealthPart("disk", room.accepting, room.describe()))
            why = _writable(config, store)
            parts.append(HealthPart("store", not why, why or "writable"))
        if store is not None and shared and not storage_ready(store):
            parts.append(
                HealthPart(
                    "storage",
                    False,
                    f"{config.storage.dir} not mounted ({STORE_ID_NAME} missing)",
                )
            )
        if works:
            beats = store.heartbeats() if store is not None else {}
            alive = sum(
                1
                for name, (_, at) in beats.items()
                if name.startswith(f"{prefix}worker-") and now - at <= HEARTBEAT_STALE_SECONDS
            )
            # The node's supervisor records workers it gave up on (rewritten at each start).
            gave_up = {
                n: str(w["gave_up"])
                for n, w in workers_state(config.storage.dir, prefix).items()
                if w.get("gave_up")
            }
            detail = f"workers alive: {alive}/{config.node.workers}"
            detail += "".join(f"; {n}: not restarted: {why}" for n, why in sorted(gave_up.items()))
            parts.append(
                HealthPart("workers", alive >= config.node.workers and not gave_up, detail)
            )
            limit = config.health.max_parked_seconds
            parked = store.parked_deliveries(now - limit) if store is not None else []
            by_destination: dict[str, list[float]] = {}
            for d in parked:
                by_destination.setdefault(d.destination, []).append(now - d.updated_at)
            if by_destination:
                detail = "; ".join(
                    f"{name}: {len(ages)} parked, the oldest {max(ages) / 60:.0f} min"
                    for name, ages in sorted(by_destination.items())
                )
                detail += f" (health.max_parked_seconds {limit:g}; `ich-node resend` once fixed)"
            else:
                detail = f"none parked longer than {limit:g} s"
            parts.append(HealthPart("destinations", not by_destination, detail))
        if shared and store is not None:  # every host's listeners and workers, for the admin
            for name, (pid, at) in sorted(store.heartbeats().items()):
                state = "alive" if now - at <= HEARTBEAT_STALE_SECONDS else "stale"
                beat = f"pid {pid}, {now - at:.1f} s ago ({state})"
                parts.append(HealthPart(f"heartbeat {name}", True, beat))
    finally:
        if store is not None:
            store.close()
    return parts, None


def health(config: NodeConfig, role: str = "all", as_json: bool = False) -> int:
    """0 when this node can do its job now, else 1 naming each failing part.

    The parts (``--role`` a multi-host node's ``serve --role``: ``listener`` the
    first three, ``worker`` the last two, ``all`` every one):

    - ``listener``: it answers a C-ECHO (calling AE = ``node.ae_title``);
    - ``disk``: ``storage.dir`` has at least ``storage.min_free_mb`` free (else
      every image is refused with 0xA700);
    - ``store``: a file can be created in the spool and a row written to the store
      (both removed again);
    - ``storage`` (PostgreSQL): this host sees the shared ``storage.dir``;
    - ``workers``: ``node.workers`` workers of this node beat in the last 15 s (a
      clean stop removes their heartbeats at once) and none was given up on
      (``node.worker_max_crashes``);
    - ``destinations``: no delivery to a destination or an alert target has been
      parked longer than ``health.max_parked_seconds``.

    ``as_json`` prints ``{"ok": ..., "parts": [{"name", "ok", "detail"}, ...]}``.
    2 (one line on stderr) for a store this code cannot use.
    """
    parts, code = check_health(config, role)
    ok = all(p.ok for p in parts)
    if as_json:
        print(
            json.dumps(
                {
                    "ok": ok,
                    "role": role,
                    "parts": [dataclasses.asdict(p) for p in parts],
                    **mode_fields(config),
                },
                indent=2,
            )
        )
    else:
        for part in parts:
            print(f"{part.name}: {'ok' if part.ok else 'FAIL'}: {part.detail}")
        print(mode_line(config))
    if code is not None:
        return code
    return 0 if ok else 1


@dataclass(frozen=True, slots=True)
class Resent:
    """What :func:`requeue_parked` did to one job."""

    job_id: str
    job_state: str  # the job's state before
    job_requeued: bool
    deliveries: int  # parked deliveries (results and alerts) re-queued

    @property
    def anything(self) -> bool:
        return self.job_requeued or self.deliveries > 0

    def describe(self) -> str:
        """One line for a person (``resend`` and the web console)."""
        if not self.anything:
            return f"job {self.job_id}: nothing parked (job {self.job_state})"
        return (
            f"job {self.job_id}: "
            + ("job re-queued; " if self.job_requeued else "")
            + f"{self.deliveries} deliveries re-queued; the running node sends them"
        )


def requeue_parked(store: Store, config: NodeConfig, job_id: str, now: float) -> Resent | None:
    """Re-queue a parked job and its parked deliveries; ``None`` when the job is unknown."""
    job = store.job(job_id)
    if job is None:
        return None
    job_requeued = job_queue(store, config.queue).requeue(job_id, now)
    n = store.requeue_deliveries(job_id, now)
    return Resent(job_id, job.state, job_requeued, n)


def resend(config: NodeConfig, job_id: str) -> int:
    """Re-queue a parked job and its parked deliveries; the running node does the rest.

    Returns 0 when something was re-queued, 1 when the job is unknown or nothing
    of it is parked.
    """
    store = _open(config, write=True)
    if isinstance(store, int):
        return store
    try:
        done = requeue_parked(store, config, job_id, time.time())
    finally:
        store.close()
    if done is None:
        print(f"no job {job_id!r}")
        return 1
    print(done.describe())
    return 0 if done.anything else 1
