"""What the console's pages show, read from the store and the folders under ``storage.dir``.

Everything here only reads: the store through its interfaces (SQLite or
PostgreSQL, :func:`ich_node.queue.backend.existing_store`), ``findings.json``,
the heatmap PNG previews and the SR of each job's results folder, the spool's
files for the headers of a series without results, the listeners' refusal files
and the latest audit report. Figures that ``ich-node status`` also prints come
from :mod:`ich_node.service.ops`, so the page and the CLI agree. The one write,
re-queueing a parked job, is :func:`ich_node.service.ops.requeue_parked`.

Header values (accession number, study date, patient name, ID and birth date)
are read from DICOM files while those exist: the store keeps UIDs, states and
times only, and retention (``storage.keep_hours``) deletes the files.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pydicom
import structlog

from ich_node.config import NodeConfig
from ich_node.ingest.refusals import PeerRefusals, read_refusals
from ich_node.log import redact
from ich_node.queue.backend import existing_store, is_shared
from ich_node.queue.interface import (
    HEARTBEAT_STALE_SECONDS,
    AlertRecord,
    DeliveryRecord,
    JobRecord,
    RefusalCount,
    SeriesRead,
    SeriesRecord,
    StoreUnusable,
)
from ich_node.queue.jobs import job_id_for
from ich_node.queue.layout import OutsideStorage, StorageLayout
from ich_node.queue.store import Store
from ich_node.results.findings import SeriesFindings, read_findings
from ich_node.service.ops import (
    Resent,
    collect_status,
    median,
    notification_times,
    percentile,
    requeue_parked,
    series_shown_states,
    shown_state,
)

log = structlog.get_logger(__name__)

#: Header files remembered (their values only), the least recently used forgotten first.
MAX_HEADERS: Final = 20000
#: The window of the Overview's recent figures.
RECENT_SECONDS: Final = 24 * 3600.0
_TAGS: Final = (
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
)


@dataclass(frozen=True, slots=True)
class StudyHeader:
    """Header values of a series' study, from one of its DICOM files (PS3.3 C.7.1.1, C.7.2.1).

    The patient fields are shown only with ``web.show_patient: true`` and never logged.
    """

    accession_number: str
    study_date: str  # DICOM DA, YYYYMMDD, or ""
    study_time: str
    patient_name: str
    patient_id: str
    patient_birth_date: str


@dataclass(frozen=True, slots=True)
class SeriesRow:
    """One line of the Series list: the series, its latest read and where it stands.

    The answer comes from ``findings.json`` while it is kept, else from the results
    ledger (``series_reads``), which outlives retention.
    """

    series: SeriesRecord
    state: str  # as `ich-node status` tells it (queued, reading, sending, delivered, parked, ...)
    job: JobRecord | None  # the latest version's job
    findings: SeriesFindings | None  # the latest findings, read only without a ledger row
    read: SeriesRead | None  # the latest version's ledger row
    header: StudyHeader | None

    @property
    def positive_labels(self) -> tuple[str, ...] | None:
        """The labels reported positive; ``None`` while the series has no answer."""
        if self.findings is not None:
            return self.findings.positive_labels
        return None if self.read is None else self.read.positive_labels

    @property
    def coverage_complete(self) -> bool | None:
        if self.findings is not None:
            return self.findings.coverage_complete
        return None if self.read is None else self.read.coverage_complete

    @property
    def accession_number(self) -> str:
        if self.header is not None and self.header.accession_number:
            return self.header.accession_number
        return "" if self.read is None else self.read.accession_number


@dataclass(frozen=True, slots=True)
class AlertView:
    """An alert to one target with its delivery row (destination ``alert:<target>``)."""

    target: str
    record: AlertRecord | None
    delivery: DeliveryRecord


@dataclass(frozen=True, slots=True)
class VersionView:
    """One read (version) of a series."""

    series: SeriesRecord
    state: str
    version: int
    versions: tuple[int, ...]
    job: JobRecord | None
    findings: SeriesFindings | None
    findings_error: str  # why a findings.json that exists could not be read
    read: SeriesRead | None  # the version's row of the results ledger (outlives retention)
    header: StudyHeader | None
    deliveries: tuple[DeliveryRecord, ...]  # to the DICOM destinations
    alerts: tuple[AlertView, ...]
    heatmaps: tuple[str, ...]  # PNG preview names, in slice order
    results_kept: bool  # the results folder is still there (retention removes it)


@dataclass(frozen=True, slots=True)
class Process:
    """A listener, sender or worker as its heartbeat shows it."""

    host: str  # node id on a shared store, "" on one host
    name: str
    pid: int
    age_s: float
    alive: bool


@dataclass(frozen=True, slots=True)
class Overview:
    """The Overview page."""

    mode: str
    shared: bool
    processes: tuple[Process, ...]
    status: dict[str, Any]  # ich_node.service.ops.collect_status (what `status --json` prints)
    disk_free_mb: float | None
    min_free_mb: int
    reads_24h: int
    positives_24h: int
    parked_24h: int
    ttn_median_24h: float | None
    ttn_p95_24h: float | None


@dataclass(frozen=True, slots=True)
class Problems:
    """The Problems page."""

    jobs: tuple[JobRecord, ...]  # parked or retrying reading jobs
    deliveries: tuple[DeliveryRecord, ...]  # parked or retrying deliveries and alerts
    resendable: frozenset[str]  # job ids with something parked
    refusals: tuple[tuple[str, float, tuple[PeerRefusals, ...]], ...]  # per listener
    #: What the node itself refused, by reason (C-STOREs while disk was low, paths
    #: outside storage.dir, ...): the store's counts, as ``status`` shows them.
    store_refusals: tuple[RefusalCount, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The latest ``ich-node audit`` report under ``<storage.dir>/audit/latest``."""

    html: Path | None
    json: Path | None
    written_at: float


class NoStore(RuntimeError):
    """The node's store cannot be opened: none yet (``exit_code`` 1) or unusable (2)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Console:
    """The console's reading side: the store (opened once, lazily) and the files.

    Parameters
    ----------
    config : NodeConfig
        The node's configuration (the same file ``serve`` reads).
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.layout = StorageLayout(Path(config.storage.dir))
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._headers: OrderedDict[str, StudyHeader | None] = OrderedDict()
        self._findings: dict[str, tuple[tuple[int, int], SeriesFindings | None, str]] = {}

    # -- the store ---------------------------------------------------------------------
    def store(self) -> Store:
        """The node's store; :class:`NoStore` while it does not exist."""
        with self._lock:
            if self._store is None:
                try:  # as the node left it: never created or migrated from here
                    self._store = existing_store(self.config.storage)
                except StoreUnusable as exc:
                    raise NoStore(str(exc), exc.exit_code) from None
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    @property
    def mode(self) -> str:
        """``node.mode``: ``live``, or ``shadow`` (read and recorded, sent only to targets
        marked ``shadow: true``)."""
        return self.config.node.mode

    # -- files -------------------------------------------------------------------------
    def _confined(self, path: Path, under: Path) -> Path | None:
        """``path`` when it is a file inside ``under`` that is not a symbolic link
        (:meth:`StorageLayout.confine`, the store's own path guard), else ``None``."""
        try:
            found = self.layout.confine(path, under, read=True)
        except (OutsideStorage, OSError):
            return None
        return found if found.is_file() else None

    def findings(self, job_id: str) -> tuple[SeriesFindings | None, str]:
        """A job's ``findings.json`` (cached while unchanged) and why it is unreadable."""
        results = self.layout.results
        path = self._confined(self.layout.results_dir(job_id) / "findings.json", results)
        try:
            if path is None:
                raise FileNotFoundError(job_id)
            st = path.stat()
        except OSError:
            self._findings.pop(job_id, None)
            return None, ""
        stamp = (st.st_mtime_ns, st.st_size)
        held = self._findings.get(job_id)
        if held is not None and held[0] == stamp:
            return held[1], held[2]
        try:
            found: SeriesFindings | None = read_findings(path)
            why = ""
        except (OSError, ValueError, KeyError, TypeError) as exc:
            found, why = None, f"findings.json unreadable ({type(exc).__name__})"
        if len(self._findings) > MAX_HEADERS:
            self._findings.clear()
        self._findings[job_id] = (stamp, found, why)
        return found, why

    def header(self, series: SeriesRecord, job: JobRecord | None) -> StudyHeader | None:
        """Study header values from the job's SR, else from a spooled image of the series."""
        candidates: list[tuple[Path, Path]] = []
        if job is not None:
            candidates.append((self.layout.outbox(job.job_id) / "sr.dcm", self.layout.results))
        with contextlib.suppress(Exception):  # the store answers on the next page
            paths = self.store().instance_paths(series.series_instance_uid)[:1]
            candidates += [(p, self.layout.spool) for p in paths]
        for path, under in candidates:
            key = str(path)
            with self._lock:
                if key in self._headers:
                    self._headers.move_to_end(key)
                    cached = self._headers[key]
                    if cached is not None:
                        return cached
                    continue
            found = self._read_header(path, under)
            with self._lock:
                self._headers[key] = found
                while len(self._headers) > MAX_HEADERS:
                    self._headers.popitem(last=False)
            if found is not None:
                return found
        return None

    def _read_header(self, path: Path, under: Path) -> StudyHeader | None:
        confined = self._confined(path, under)
        if confined is None:
            return None
        try:
            ds = pydicom.dcmread(confined, stop_before_pixels=True, specific_tags=list(_TAGS))
        except Exception:  # a damaged file: no header values, never an error page
            return None
        return StudyHeader(*(str(ds.get(k, "") or "") for k in _TAGS))

    def heatmap_names(self, job_id: str) -> tuple[str, ...]:
        folder = self.layout.outbox(job_id) / "heatmaps"
        if not folder.is_dir():
            return ()
        names = [p.name for p in folder.glob("*.png") if p.stem.isdigit()]
        return tuple(sorted(names, key=lambda n: int(n.split(".")[0])))

    def heatmap_path(self, job_id: str, name: str) -> Path | None:
        """The PNG preview ``name`` (``<n>.png``) of a job, or ``None``."""
        stem, _, ext = name.partition(".")
        if ext != "png" or not stem.isdigit():
            return None
        return self._confined(self.layout.outbox(job_id) / "heatmaps" / name, self.layout.results)

    # -- pages -------------------------------------------------------------------------
    def _latest_jobs(self, store: Store) -> dict[str, JobRecord]:
        latest: dict[str, JobRecord] = {}
        for job in store.jobs():
            held = latest.get(job.series_instance_uid)
            if held is None or job.version > held.version:
                latest[job.series_instance_uid] = job
        return latest

    def series_rows(self) -> list[SeriesRow]:
        """Every series, most recently received first, without header values yet."""
        store = self.store()
        states = series_shown_states(store)
        latest = self._latest_jobs(store)
        reads = {r.job_id: r for r in store.reads()}
        rows = []
        for series in store.series_list():
            uid = series.series_instance_uid
            job = latest.get(uid)
            read = reads.get(job.job_id) if job is not None else None
            # The ledger row has what the list shows; findings.json only for reads older
            # than the ledger (a file read per series costs most of the list's time).
            found = self.findings(job.job_id)[0] if job is not None and read is None else None
            rows.append(SeriesRow(series, states.get(uid, series.state), job, found, read, None))
        return rows

    def with_header(self, row: SeriesRow) -> SeriesRow:
        header = self.header(row.series, row.job)
        return SeriesRow(row.series, row.state, row.job, row.findings, row.read, header)

    def version(self, series_uid: str, version: int | None) -> VersionView | None:
        """One version of a series (the latest when ``version`` is ``None``)."""
        store = self.store()
        series = store.series(series_uid)
        if series is None:
            return None
        # A series' jobs are its versions' (job_id_for), at most series.max_versions.
        found_jobs = (store.job(job_id_for(series_uid, v)) for v in range(1, series.version + 1))
        jobs = {j.version: j for j in found_jobs if j is not None}
        versions = tuple(sorted(jobs))
        if version is None:
            version = versions[-1] if versions else series.version
        job = jobs.get(version)
        if job is None and versions:
            return None
        found, why = self.findings(job.job_id) if job is not None else (None, "")
        deliveries = tuple(store.deliveries(job.job_id)) if job is not None else ()
        records = {a.target: a for a in store.alerts(job.job_id)} if job is not None else {}
        alerts = tuple(
            AlertView(d.destination.removeprefix("alert:"), records.get(d.destination[6:]), d)
            for d in deliveries
            if d.destination.startswith("alert:")
        )
        last = jobs[versions[-1]] if versions else None
        sent = [d.state for d in store.deliveries(last.job_id)] if last is not None else []
        state = shown_state(series.state, last, sent)
        read = next((r for r in store.reads(series_uid) if r.version == version), None)
        return VersionView(
            series=series,
            state=state,
            version=version,
            versions=versions,
            job=job,
            findings=found,
            findings_error=why,
            read=read,
            header=self.header(series, job),
            deliveries=tuple(d for d in deliveries if not d.destination.startswith("alert:")),
            alerts=alerts,
            heatmaps=self.heatmap_names(job.job_id) if job is not None else (),
            results_kept=job is not None and self.layout.results_dir(job.job_id).is_dir(),
        )

    def overview(self, now: float) -> Overview:
        store = self.store()
        status = collect_status(store, now)
        shared = is_shared(self.config.storage)
        processes = []
        for name, (pid, at) in sorted(store.heartbeats().items()):
            host, _, short = name.rpartition(".") if shared else ("", "", name)
            age = now - at
            processes.append(Process(host, short, pid, age, age <= HEARTBEAT_STALE_SECONDS))
        try:
            free_mb: float | None = shutil.disk_usage(self.layout.root).free / 2**20
        except OSError:
            free_mb = None
        since = now - RECENT_SECONDS
        reads = [j for j in store.jobs("done") if j.updated_at >= since]
        ledger = {r.job_id: r for r in store.reads()}
        positives = 0
        for job in reads:
            if job.job_id in ledger:  # what the node answered, kept beyond retention
                positives += "any" in ledger[job.job_id].positive_labels
                continue
            found = self.findings(job.job_id)[0]
            positives += bool(found is not None and found.series["any"].positive)
        parked = {j.job_id for j in store.jobs("parked") if j.updated_at >= since}
        parked |= {
            d.job_id for d in store.deliveries() if d.state == "parked" and d.updated_at >= since
        }
        waits = notification_times(store, since)
        return Overview(
            mode=self.mode,
            shared=shared,
            processes=tuple(processes),
            status=status,
            disk_free_mb=free_mb,
            min_free_mb=self.config.storage.min_free_mb,
            reads_24h=len(reads),
            positives_24h=positives,
            parked_24h=len(parked),
            ttn_median_24h=median(waits),
            ttn_p95_24h=percentile(waits, 0.95),
        )

    def problems(self) -> Problems:
        store = self.store()
        jobs = tuple(j for j in store.jobs() if j.state in ("parked", "retry"))
        deliveries = tuple(d for d in store.deliveries() if d.state in ("parked", "retry"))
        resendable = frozenset(
            [j.job_id for j in jobs if j.state == "parked"]
            + [d.job_id for d in deliveries if d.state == "parked"]
        )
        refusals = tuple(
            (name, started, tuple(rows))
            for name, started, rows in read_refusals(self.layout.refusals)
        )
        return Problems(jobs, deliveries, resendable, refusals, tuple(store.refusals().values()))

    def resend(self, job_id: str, now: float) -> Resent | None:
        """Re-queue a parked job and its parked deliveries (``ich-node resend``)."""
        return requeue_parked(self.store(), self.config, job_id, now)

    def audit_report(self) -> AuditReport | None:
        folder = self.layout.audit_latest
        html, data = folder / "report.html", folder / "report.json"
        present = [p for p in (html, data) if p.is_file()]
        if not present:
            return None
        return AuditReport(
            html if html.is_file() else None,
            data if data.is_file() else None,
            max(p.stat().st_mtime for p in present),
        )


def reason(text: str) -> str:
    """A stored reason as shown (scrubbed once more, as ``status`` does)."""
    return redact(text)
