"""Alerts in the node's outbox: recorded before they are sent, sent by the sender.

:func:`prepare_alerts` runs in the worker as soon as a series' probabilities are
known: for each notification target it decides (:func:`~ich_node.delivery.alerts.decide`),
writes the alert record with fsync, then records the alerts and their delivery
rows (destination ``alert:<target>``) in one transaction. The sender's own
machinery (lease by state, retries with backoff, parking, ``ich-node resend``)
then delivers them like DICOM results, with :func:`send_alert`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Literal

import numpy as np
import pydicom

from ich_node.config import (
    Destination,
    EmailTarget,
    HL7Target,
    NotificationTarget,
    WebhookTarget,
    sent_in_mode,
)
from ich_node.delivery.alerts import (
    ALERT_PREFIX,
    Alert,
    AlertFailed,
    Previous,
    ResultStatus,
    alert_key,
    answer,
    decide,
    early_labels,
    key_image_png,
    make_alert,
    preliminary_job_id,
    read_alert,
    wants_key_image,
    watched_labels,
    write_alert,
)
from ich_node.delivery.deadline import Deadline
from ich_node.labels import LABELS
from ich_node.log import handling_phi, phi_values
from ich_node.queue.interface import AlertRecord, AlertsChanged
from ich_node.queue.store import Store
from ich_node.results.findings import SeriesFindings


def key_image_lines(alert: Alert) -> list[str]:
    """The text burned into the email's key image."""
    found = ", ".join(alert.positive_labels) or "no positive label"
    slice_ = alert.key_slice
    lines = [f"Suspected: {found}" + (f" (any p={slice_.probability:.2f})" if slice_ else "")]
    return [*lines, f"{alert.model_name} {alert.model_version}", alert.notice]


def study_key(header: pydicom.Dataset, study_instance_uid: str) -> str:
    """What alerts are per: the study's AccessionNumber, else its StudyInstanceUID."""
    accession = str(header.get("AccessionNumber", "") or "").strip()
    return f"accession:{accession}" if accession else f"study:{study_instance_uid}"


#: Times an alert decision is made again when another series of the study recorded
#: one meanwhile (series read side by side by several workers).
_DECIDE_ATTEMPTS: Final = 10


def _other_series(
    store: Store,
    key: str,
    findings: SeriesFindings,
    target: NotificationTarget,
    accession: str,
) -> list[tuple[tuple[str, ...], dict[str, float]]]:
    """The latest answer of each other series of the study for ``target``.

    (positive labels the target watches, probability per label where known) per
    series: its latest alert decision for the target (sent or not), or its latest
    read in the results ledger when that is newer (or the only one).
    """
    if accession:
        reads = store.reads(accession_number=accession)
    else:
        reads = [
            r
            for r in store.reads(study_instance_uid=findings.study_instance_uid)
            if not r.accession_number
        ]
    latest: dict[str, tuple[int, tuple[str, ...], dict[str, float]]] = {}
    for r in reads:  # oldest first: the latest version of each series wins
        if r.series_instance_uid != findings.series_instance_uid:
            latest[r.series_instance_uid] = (
                r.version, watched_labels(r.positive_labels, target), r.probabilities
            )  # fmt: skip
    for uid, decision in store.latest_alerts(key, target.name).items():
        known = latest.get(uid)
        if uid != findings.series_instance_uid and (known is None or decision.version > known[0]):
            latest[uid] = (decision.version, decision.positive_labels, {})  # being read
    return [(labels, probabilities) for _, labels, probabilities in latest.values()]


def study_answer(alert: Alert, others: list[tuple[tuple[str, ...], dict[str, float]]]) -> Alert:
    """``alert`` (one series') as its study's answer: the union of the series' answers.

    A label positive in another series of the study is positive in the alert, with
    the highest probability known for it among the study's series (a series whose
    read is still in progress and sent nothing has no probability recorded yet).
    """
    labels = set(alert.positive_labels)
    for other, _ in others:
        labels |= set(other)
    if labels == set(alert.positive_labels):
        return alert
    rows = []
    for f in alert.findings:
        if f.label in labels and not f.positive:
            best = max([f.probability] + [p.get(f.label, 0.0) for _, p in others])
            f = dataclasses.replace(f, probability=round(float(best), 4), positive=True)
        rows.append(f)
    union = tuple(label for label in LABELS if label in labels)
    return dataclasses.replace(alert, positive=True, positive_labels=union, findings=tuple(rows))


def prepare_alerts(
    store: Store,
    storage_dir: Path,
    targets: Sequence[NotificationTarget],
    *,
    job_id: str,
    version: int,
    created_at: float,
    findings: SeriesFindings,
    header: pydicom.Dataset,
    hu_of: Callable[[int], np.ndarray] | None,
    now: float,
    mode: Literal["live", "shadow"] = "live",
) -> list[Alert]:
    """Decide, write and record the alerts of one series version; returns the new ones.

    Alerts go **per study** (AccessionNumber, else StudyInstanceUID): the study's
    answer for a target is the union of the latest answers of its series (this
    version's, the others' from the results ledger). The first answer sends a
    first alert; a later series or version sends nothing while the study's answer
    stays the same, and a correction when it changes (:func:`decide`).

    Parameters
    ----------
    targets
        The configured notification targets; in ``mode`` ``shadow`` only those with
        ``shadow: true`` are told (:func:`ich_node.config.sent_in_mode`): the others
        get no record and no delivery row, so nothing waits to be sent.
    created_at
        When the job was queued: the version holds the instances received by then.
    header
        The source's first header (accession number, patient identifiers).
    hu_of
        Slice index -> (rows, columns) float32 HU, for the email key image.

    Raises
    ------
    OSError, sqlite3.Error
        When a record cannot be written: the job fails and runs again, so an
        alert is never sent unrecorded nor lost.
    """
    targets = sent_in_mode(targets, mode)
    if not targets:
        return []
    for _ in range(_DECIDE_ATTEMPTS):
        try:
            return _prepare(
                store, storage_dir, targets, job_id=job_id, version=version,
                created_at=created_at, findings=findings, header=header, hu_of=hu_of, now=now,
            )  # fmt: skip
        except AlertsChanged:  # another series of the study alerted meanwhile
            continue
    raise AlertsChanged(f"the study's alerts kept changing ({_DECIDE_ATTEMPTS} decisions)")


def _prepare(
    store: Store,
    storage_dir: Path,
    targets: Sequence[NotificationTarget],
    *,
    job_id: str,
    version: int,
    created_at: float,
    findings: SeriesFindings,
    header: pydicom.Dataset,
    hu_of: Callable[[int], np.ndarray] | None,
    now: float,
) -> list[Alert]:
    uid = findings.series_instance_uid
    key = study_key(header, findings.study_instance_uid)
    accession = str(header.get("AccessionNumber", "") or "").strip()
    done = store.decided_targets(job_id)  # decided by an earlier attempt
    # A preliminary alert of this version (sent while it arrived) is followed by its
    # final: F when the study's answer is the same, else C (which withdraws it).
    preliminary = {a.target: a for a in store.alerts(preliminary_job_id(job_id))}
    last = store.last_received_at(uid, created_at) or created_at
    records: list[AlertRecord] = []
    alerts: list[Alert] = []
    expected: dict[str, str | None] = {}
    for target in targets:
        if target.name in done:
            continue
        others = _other_series(store, key, findings, target, accession)
        labels = answer(findings, target)
        labels = tuple(
            label for label in LABELS if label in set(labels).union(*(o for o, _ in others))
        )
        prev = store.previous_study_alert(key, target.name, job_id)
        expected[target.name] = None if prev is None else prev.key
        if prev is None:  # alerts recorded before they were kept per study
            prev = store.previous_alert(uid, version, target.name)
        early = preliminary.get(target.name)
        status: ResultStatus | None
        if early is not None and prev is not None and prev.key == early.key:
            status = "F" if labels == early.positive_labels else "C"
        else:
            status = decide(
                target, labels, None if prev is None else Previous(prev.key, prev.positive_labels)
            )
        if status is None:  # kept: other series of the study learn this one's answer
            records.append(
                AlertRecord(
                    job_id, target.name, uid, version, alert_key(job_id, target.name), "",
                    None, labels, last, now, study_key=key,
                )
            )  # fmt: skip
            continue
        alert = make_alert(
            findings,
            header,
            target,
            job_id=job_id,
            version=version,
            status=status,
            supersedes=prev.key if (status == "C" and prev is not None) else None,
            result_time=now,
            last_received_at=last,
        )
        alert = _write_study_alert(storage_dir, alert, others, target, hu_of)
        records.append(
            AlertRecord(
                job_id, target.name, uid, version, alert.key, alert.status, alert.supersedes,
                alert.positive_labels, last, now, study_key=key,
            )
        )  # fmt: skip
        alerts.append(alert)
    store.record_alerts(records, ALERT_PREFIX, now, expected=expected)
    return alerts


def _write_study_alert(
    storage_dir: Path,
    alert: Alert,
    others: Sequence[tuple[tuple[str, ...], dict[str, float]]],
    target: NotificationTarget,
    hu_of: Callable[[int], np.ndarray] | None,
) -> Alert:
    """``alert`` with the study's answer (the other series' answers in ``others``),
    written with its key image when the target wants one; returns what was written.

    Raises
    ------
    OSError
        When the record cannot be written.
    """
    alert = study_answer(alert, [(o, p) for o, p in others if o])
    png = None
    if wants_key_image(target) and alert.key_slice is not None and hu_of is not None:
        png = key_image_png(hu_of(alert.key_slice.index), key_image_lines(alert))
    write_alert(storage_dir, alert, png)
    return alert


def prepare_preliminary_alerts(
    store: Store,
    storage_dir: Path,
    targets: Sequence[NotificationTarget],
    *,
    job_id: str,
    version: int,
    findings: SeriesFindings,
    min_slices: int,
    header: pydicom.Dataset,
    hu_of: Callable[[int], np.ndarray] | None,
    last_received_at: float,
    now: float,
    mode: Literal["live", "shadow"] = "live",
) -> list[Alert]:
    """Preliminary alerts of a series still arriving; returns the new ones.

    For each target with ``early: true`` (and told in ``mode``) that the slices
    received so far make positive for one of its ``labels``
    (:func:`~ich_node.delivery.alerts.early_labels`), an alert with status ``P`` is
    written and recorded under :func:`preliminary_job_id` of the job the version
    will have (``job_id``): at most one per target and series version. It carries
    the study's answer (as :func:`prepare_alerts`: with the other series' answers)
    and is sent only when that tells the target something new: not when its
    latest alert about the study already named these labels. Nothing is recorded
    once that job exists (the version is complete: its final alert decides). The
    findings' series-level ``positive`` flags are the early rule's.

    Parameters
    ----------
    findings
        The slices received so far (:meth:`ich_node.model.inference.Classifier.findings_of`).
    min_slices
        ``series.early_min_slices``.
    last_received_at
        When the last of those slices arrived (seconds since the epoch).

    Raises
    ------
    OSError, sqlite3.Error
        When a record cannot be written (the stream tries again on its next pass).
    """
    early = [t for t in sent_in_mode(targets, mode) if t.early]
    positive = early_labels(findings, min_slices) if early else ()
    if not positive:
        return []
    uid = findings.series_instance_uid
    record_id = preliminary_job_id(job_id)
    key = study_key(header, findings.study_instance_uid)
    accession = str(header.get("AccessionNumber", "") or "").strip()
    done = store.decided_targets(record_id)
    marked = dataclasses.replace(
        findings,
        series={
            label: dataclasses.replace(f, positive=label in positive)
            for label, f in findings.series.items()
        },
    )
    records: list[AlertRecord] = []
    alerts: list[Alert] = []
    expected: dict[str, str | None] = {}
    for target in early:
        own = answer(marked, target)
        if not own or target.name in done:
            continue
        others = _other_series(store, key, marked, target, accession)
        labels = tuple(
            label for label in LABELS if label in set(own).union(*(o for o, _ in others))
        )
        prev = store.previous_study_alert(key, target.name, record_id)
        expected[target.name] = None if prev is None else prev.key
        if prev is None:
            prev = store.previous_alert(uid, version, target.name)
        if prev is not None and set(labels) <= set(prev.positive_labels):
            continue  # the target was told this already
        alert = make_alert(
            marked,
            header,
            target,
            job_id=record_id,
            version=version,
            status="P",
            supersedes=None,
            result_time=now,
            last_received_at=last_received_at,
        )
        alert = _write_study_alert(storage_dir, alert, others, target, hu_of)
        records.append(
            AlertRecord(
                record_id, target.name, uid, version, alert.key, alert.status, None,
                alert.positive_labels, last_received_at, now, study_key=key,
            )
        )  # fmt: skip
        alerts.append(alert)
    if not records:
        return []
    # Recorded only while the version's job does not exist (one transaction with that
    # check): a final decided without this preliminary is never followed by it. Another
    # series' alert recorded meanwhile (AlertsChanged): the next pass decides again.
    with contextlib.suppress(AlertsChanged):
        if store.record_alerts(records, ALERT_PREFIX, now, expected=expected, unless_job=job_id):
            return alerts
    return []


def target_of(destination: str, targets: Sequence[NotificationTarget]) -> NotificationTarget:
    """The configured target of an alert delivery row (``alert:<name>``).

    Raises
    ------
    AlertFailed
        When no target of that name is configured any more (retried, then parked).
    """
    name = destination.removeprefix(ALERT_PREFIX)
    for target in targets:
        if target.name == name:
            return target
    raise AlertFailed(f"notification target {name!r} is not configured")


def alert_phi(alert: Alert) -> dict[str, str]:
    """The alert's patient values in every form a peer may quote (``log.phi_values``)."""
    ds = pydicom.Dataset()
    p = alert.patient
    for keyword, value in (
        ("PatientName", p.name), ("PatientID", p.id), ("IssuerOfPatientID", p.issuer),
        ("PatientBirthDate", p.birth_date), ("AccessionNumber", alert.accession_number),
    ):  # fmt: skip
        if value:
            ds.add_new(keyword, "LO", value)  # raw strings: no PN/DA validation
    return phi_values(ds)


def send_alert(
    storage_dir: Path, target: NotificationTarget, job_id: str, deadline: Deadline | None = None
) -> Alert:
    """Send the recorded alert of ``job_id`` to ``target``; returns it once accepted.

    While it is sent, the alert's patient values are registered (:data:`ich_node.log.PHI`):
    what the peer answers is scrubbed of them before it is kept or logged.

    Raises
    ------
    AlertFailed
        What the transport said (``permanent`` ones are parked at once).
    """
    try:
        alert, png = read_alert(storage_dir, job_id, target.name)
    except FileNotFoundError:
        raise AlertFailed(f"the alert record of {target.name} is gone", permanent=True) from None
    own = deadline is None
    deadline = deadline or Deadline(target.timeout_seconds)
    with handling_phi(alert_phi(alert)), contextlib.ExitStack() as stack:
        if own:
            stack.callback(deadline.close)
        if isinstance(target, HL7Target):
            from ich_node.delivery.hl7 import send_oru

            send_oru(alert, target, deadline)
        elif isinstance(target, WebhookTarget):
            from ich_node.delivery.webhook import post

            post(alert, target, deadline)
        elif isinstance(target, EmailTarget):
            from ich_node.delivery.email import send_email

            send_email(alert, target, png, deadline)
    return alert


def check_targets(
    targets: Sequence[NotificationTarget], destinations: Sequence[Destination] = ()
) -> list[str]:
    """Problems with the files the targets name, one line each (``notifications[i].key: ...``).

    Also the files of ``kind: dicomweb`` destinations (token, credentials, CA).

    Run by ``check-config`` and at ``serve``'s start, so that a secret or
    credentials file that cannot be used stops the node with its key named,
    instead of parking every alert later.
    """
    from ich_node.delivery.email import read_credentials
    from ich_node.delivery.webhook import read_secret, tls_context

    problems: list[str] = []
    for i, target in enumerate(targets):
        where = f"notifications[{i}] ({target.name})"
        try:
            if isinstance(target, WebhookTarget):
                read_secret(target)
                try:
                    tls_context(target)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    raise AlertFailed(f"ca_file {target.ca_file}: {exc}") from None
            elif isinstance(target, EmailTarget):
                read_credentials(target)
        except AlertFailed as exc:
            problems.append(f"{where}: {exc}")
    for i, destination in enumerate(destinations):
        if destination.kind != "dicomweb":
            continue
        from ich_node.delivery.dicomweb import StowError, check_destination

        try:
            check_destination(destination)
        except StowError as exc:
            problems.append(f"destinations[{i}] ({destination.name}): {exc}")
    return problems
