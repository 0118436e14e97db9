"""Alert records: what a notification target is told about one series version.

An :class:`Alert` is made in the worker as soon as the probabilities are known
(before heatmaps and the SR), written to ``<storage.dir>/alerts/<job_id>/`` with
fsync, and recorded in the store in the same step as its delivery row; the
sender then sends it (see :mod:`ich_node.delivery.sender`). Each alert carries an
idempotency key, derived from the job (series + version) and the target, that
every message repeats (HL7 MSH-10, the webhook's ``Idempotency-Key``, the
email's Message-ID): a receiver that sees a key twice has seen one alert.

Patient identifiers travel in the record only for the targets that send them
(HL7 PID; a webhook with ``include_patient: true``); they never reach a log.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pydicom
from PIL import Image

from ich_node.config import EmailTarget, NotificationTarget
from ich_node.durable import fsync_dir
from ich_node.labels import LABELS
from ich_node.queue import interface
from ich_node.queue.layout import StorageLayout, plain_name
from ich_node.results.findings import THRESHOLD_SOURCE_TEXT, SeriesFindings
from ich_node.results.sr import FINDING_CODES

#: The prefix that tells an alert's delivery row from a DICOM destination's (the
#: store's, which dates a version's first DICOM delivery apart from its alerts).
ALERT_PREFIX: Final = interface.ALERT_PREFIX
#: Longest side of the email's key image, pixels.
KEY_IMAGE_SIZE: Final = 256

#: HL7 result status (table 0123): F final, C a correction, P preliminary (an early
#: alert while the series was still arriving; ``notifications[].early``).
ResultStatus = Literal["F", "C", "P"]
PRELIMINARY_SUFFIX: Final = interface.PRELIMINARY_SUFFIX
job_of_record = interface.job_of_record


@dataclass(frozen=True, slots=True)
class AlertFinding:
    """One label of an alert, coded as in the SR (:data:`ich_node.results.sr.FINDING_CODES`)."""

    label: str
    code_value: str
    coding_scheme: str  # "SCT" (SNOMED CT) or the private "99ICH"
    meaning: str
    probability: float  # series-level, in [0, 1]
    threshold: float
    positive: bool
    # bundle: the model card's threshold; site: model.thresholds of the configuration.
    # Added later: records written before it read as "bundle".
    threshold_source: str = "bundle"


@dataclass(frozen=True, slots=True)
class Patient:
    """Patient identifiers copied from the source header (PS3.3 C.7.1.1); may be empty."""

    name: str = ""  # DICOM PN, components separated by "^"
    id: str = ""
    issuer: str = ""  # IssuerOfPatientID
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # M | F | O | ""


@dataclass(frozen=True, slots=True)
class KeySlice:
    """The most suspicious slice (highest ``any`` probability)."""

    sop_instance_uid: str
    index: int  # 0-based, series order (inferior to superior)
    probability: float


@dataclass(frozen=True, slots=True)
class Alert:
    """What one target is told about one series version.

    Attributes
    ----------
    key : str
        Idempotency key: the same for every attempt and resend of this alert.
    status : {"F", "C", "P"}
        ``F`` final result; ``C`` a correction of the alert named by ``supersedes``
        (also the final that withdraws a preliminary); ``P`` preliminary: sent while
        the series was still arriving, on the ``n_slices`` received so far.
    positive : bool
        The series is positive for one of the target's labels.
    result_time : float
        When the probabilities were known, seconds since the epoch.
    last_received_at : float
        When the node received the last instance of this version (seconds since
        the epoch): time-to-notification runs from here to the target's acceptance.
    """

    key: str
    target: str
    kind: str
    job_id: str
    study_instance_uid: str
    series_instance_uid: str
    version: int
    accession_number: str
    positive: bool
    positive_labels: tuple[str, ...]
    findings: tuple[AlertFinding, ...]
    model_name: str
    model_version: str
    demo: bool
    notice: str
    result_time: float
    last_received_at: float
    status: ResultStatus = "F"
    supersedes: str | None = None
    patient: Patient = Patient()
    key_slice: KeySlice | None = None
    n_slices: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Alert:
        raw: dict[str, Any] = json.loads(data)
        raw["positive_labels"] = tuple(raw["positive_labels"])
        raw["findings"] = tuple(AlertFinding(**f) for f in raw["findings"])
        raw["patient"] = Patient(**raw["patient"])
        raw["key_slice"] = None if raw["key_slice"] is None else KeySlice(**raw["key_slice"])
        return cls(**raw)


def preliminary_job_id(job_id: str) -> str:
    """The id a preliminary alert of ``job_id``'s series version is recorded under."""
    return job_id + PRELIMINARY_SUFFIX


def preliminary_text(alert: Alert) -> str:
    """What a preliminary alert says about itself (HL7 NTE, webhook ``note``, email)."""
    return (
        f"PRELIMINARY: based on the {alert.n_slices} slices received so far; the series "
        "was still arriving. The final result follows and may withdraw this alert."
    )


def alert_key(job_id: str, target: str) -> str:
    """The idempotency key of ``job_id``'s alert to ``target``: 32 hex digits, stable."""
    return hashlib.sha256(f"{job_id}\0{target}".encode()).hexdigest()[:32]


def answer(findings: SeriesFindings, target: NotificationTarget) -> tuple[str, ...]:
    """The positive labels ``target`` watches, in :data:`LABELS` order (empty: negative)."""
    return watched_labels(findings.positive_labels, target)


def watched_labels(positive: Sequence[str], target: NotificationTarget) -> tuple[str, ...]:
    """Of ``positive`` labels, those ``target`` watches, in :data:`LABELS` order."""
    watched = LABELS if "any" in target.labels else target.labels
    return tuple(label for label in LABELS if label in positive and label in watched)


@dataclass(frozen=True, slots=True)
class Previous:
    """The latest earlier alert of this series to this target."""

    key: str
    positive_labels: tuple[str, ...]


def decide(
    target: NotificationTarget, labels: tuple[str, ...], previous: Previous | None
) -> ResultStatus | None:
    """Whether this version alerts ``target``, and with which result status.

    - no earlier alert: ``F`` when the series is positive for the target's labels
      (or ``when: always``), else ``None``;
    - an earlier alert with the same answer: ``None`` (one alert per answer);
    - an earlier alert with another answer: ``C``, a correction, also when the new
      answer is negative.
    """
    if previous is None:
        return "F" if labels or target.when == "always" else None
    return None if labels == previous.positive_labels else "C"


def early_labels(findings: SeriesFindings, min_slices: int) -> tuple[str, ...]:
    """Labels a series still arriving is positive for: the early rule.

    A label is positive when ``min_slices`` slices in a row (spatial order, among
    the slices received so far) reach its threshold (the thresholds of
    ``findings``: the bundle's or the site's). As in the final read, a subtype
    counts only when ``any`` is positive too. Returns them in :data:`LABELS` order.
    """
    if min_slices < 1:
        raise ValueError(f"min_slices must be at least 1, got {min_slices!r}")

    def runs(label: str) -> bool:
        threshold, run = findings.series[label].threshold, 0
        for s in findings.slices:
            run = run + 1 if s.probabilities[label] >= threshold else 0
            if run >= min_slices:
                return True
        return False

    positive = {label for label in LABELS if runs(label)}
    if "any" not in positive:
        return ()
    return tuple(label for label in LABELS if label in positive)


def make_alert(
    findings: SeriesFindings,
    header: pydicom.Dataset,
    target: NotificationTarget,
    *,
    job_id: str,
    version: int,
    status: ResultStatus,
    supersedes: str | None,
    result_time: float,
    last_received_at: float,
) -> Alert:
    """The alert to ``target`` for one read series.

    ``header`` is the source's first header (:func:`ich_node.results.common.source_header`):
    accession number and patient identifiers come from it.
    """
    labels = answer(findings, target)
    rows = []
    for label in LABELS:
        code = FINDING_CODES[label]
        f = findings.series[label]
        rows.append(
            AlertFinding(
                label,
                str(code.value),
                str(code.scheme_designator),
                str(code.meaning),
                round(float(f.probability), 4),
                float(f.threshold),
                bool(f.positive),
                str(f.threshold_source),
            )
        )
    key_slice = None
    if findings.slices:
        probs = [s.probabilities["any"] for s in findings.slices]
        index = int(np.argmax(probs))
        key_slice = KeySlice(
            findings.slices[index].sop_instance_uid, index, round(float(probs[index]), 4)
        )
    patient = Patient(
        name=str(header.get("PatientName", "") or ""),
        id=str(header.get("PatientID", "") or ""),
        issuer=str(header.get("IssuerOfPatientID", "") or ""),
        birth_date=str(header.get("PatientBirthDate", "") or ""),
        sex=str(header.get("PatientSex", "") or ""),
    )
    return Alert(
        key=alert_key(job_id, target.name),
        target=target.name,
        kind=target.kind,
        job_id=job_id,
        study_instance_uid=findings.study_instance_uid,
        series_instance_uid=findings.series_instance_uid,
        version=version,
        accession_number=str(header.get("AccessionNumber", "") or ""),
        positive=bool(labels),
        positive_labels=labels,
        findings=tuple(rows),
        model_name=findings.model.name,
        model_version=findings.model.version,
        demo=findings.model.demo,
        notice=findings.notice,
        result_time=result_time,
        last_received_at=last_received_at,
        status=status,
        supersedes=supersedes,
        patient=patient,
        key_slice=key_slice,
        n_slices=findings.n_slices,
    )


def findings_text(alert: Alert) -> list[str]:
    """Plain-text lines of an alert's findings (no patient data)."""
    head = (
        "Suspected intracranial hemorrhage: " + ", ".join(alert.positive_labels)
        if alert.positive
        else "No intracranial hemorrhage found by the AI"
    )
    lines = [head]
    for f in alert.findings:
        mark = "POSITIVE" if f.positive else "negative"
        lines.append(
            f"  {f.label}: p={f.probability:.2f} "
            f"(threshold {f.threshold:.2f}, {THRESHOLD_SOURCE_TEXT[f.threshold_source]}) {mark}"
        )
    return lines


def thresholds_line(alert: Alert) -> str:
    """The thresholds in use and their source, in one line (HL7 NTE, email)."""
    sources = {f.threshold_source for f in alert.findings}
    if len(sources) == 1:
        (source,) = sources
        listed = ", ".join(f"{f.label} {f.threshold:.2f}" for f in alert.findings)
        return f"Thresholds: {listed} ({THRESHOLD_SOURCE_TEXT[source]})."
    listed = ", ".join(
        f"{f.label} {f.threshold:.2f} ({f.threshold_source})" for f in alert.findings
    )
    return f"Thresholds: {listed}; site = site configuration (model.thresholds)."


def key_image_png(hu: np.ndarray, lines: Sequence[str]) -> bytes:
    """A small PNG of one slice in the brain window with ``lines`` burned in.

    Parameters
    ----------
    hu : numpy.ndarray
        (rows, columns) float32 HU of the slice.
    lines : sequence of str
        Text burned in at the top (the notice, the model, the finding).

    Returns
    -------
    bytes
        A PNG file, longest side :data:`KEY_IMAGE_SIZE` pixels, RGB.
    """
    from ich_node.results.sc import render_overlay

    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"hu must be (rows, columns), got shape {hu.shape}")
    rows, columns = hu.shape
    scale = KEY_IMAGE_SIZE / max(rows, columns)
    small = Image.fromarray(hu).resize(
        (max(1, round(columns * scale)), max(1, round(rows * scale))), Image.Resampling.BILINEAR
    )
    # Text drawn on the small image, so that it stays readable after the resize.
    rgb = render_overlay(np.asarray(small, dtype=np.float32), list(lines))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def alerts_dir(storage_dir: Path, job_id: str) -> Path:
    """Where the alert records of ``job_id`` are kept."""
    return StorageLayout(Path(storage_dir)).alerts_dir(job_id)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # O_NOFOLLOW: a link planted under the temp name is never written through.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_alert(storage_dir: Path, alert: Alert, key_image: bytes | None = None) -> Path:
    """Write an alert record (and its key image) durably; returns the record's path.

    Written with fsync and rename before the delivery row is committed: a row
    always has its record.
    """
    layout = StorageLayout(Path(storage_dir))
    folder = layout.alerts_dir(alert.job_id)
    target = plain_name(alert.target, "target name")
    if layout.alerts.exists() or layout.alerts.is_symlink():
        layout.own_dir(layout.alerts)  # never written through a planted link
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    layout.own_dir(folder)
    if key_image is not None:
        _write_durably(folder / f"{target}.png", key_image)
    path = folder / f"{target}.json"
    _write_durably(path, alert.to_json())
    fsync_dir(folder)
    fsync_dir(folder.parent)
    return path


def read_alert(storage_dir: Path, job_id: str, target: str) -> tuple[Alert, bytes | None]:
    """The recorded alert of ``job_id`` to ``target`` and its key image (or ``None``).

    Raises
    ------
    FileNotFoundError
        When the record is gone.
    OutsideStorage
        When the job id or target (from the store) is not a plain name, or the
        record leads outside ``storage.dir`` (a symbolic link): nothing is read.
    """
    layout = StorageLayout(Path(storage_dir))
    folder = layout.alerts_dir(job_id)
    name = plain_name(target, "target name")
    record = layout.confine(folder / f"{name}.json", layout.alerts, read=True)
    alert = Alert.from_json(record.read_bytes())
    png = layout.confine(folder / f"{name}.png", layout.alerts, read=True)
    return alert, (png.read_bytes() if png.is_file() else None)


def wants_key_image(target: NotificationTarget) -> bool:
    return isinstance(target, EmailTarget) and target.attach_key_image


class AlertFailed(RuntimeError):
    """A target did not accept an alert.

    ``permanent`` failures (an HL7 AR or CR, an HTTP 4xx) are parked at once: sending
    the same message again cannot change the answer. Others are retried, not before
    ``retry_after`` seconds when the peer asked for that (HTTP Retry-After).
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        detail: str = "",
        retry_after: float | None = None,
    ) -> None:
        # `message` is what logs say (no text from the peer, which may quote patient
        # data); `detail` is the peer's own text, kept with the parked delivery;
        # `retry_after` the seconds the peer asked to wait (HTTP Retry-After).
        super().__init__(message)
        self.permanent = permanent
        self.detail = detail
        self.retry_after = retry_after

    @property
    def recorded(self) -> str:
        """The reason recorded in the store: the message and the peer's text."""
        return f"{self} ({self.detail})" if self.detail else str(self)
