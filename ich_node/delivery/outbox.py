"""Alerts in the node's outbox: recorded before they are sent, sent by the sender.

:func:`prepare_alerts` runs in the worker as soon as a series' probabilities are
known: for each notification target it decides (:func:`~ich_node.delivery.alerts.decide`),
writes the alert record with fsync, then records the alerts and their delivery
rows (destination ``alert:<target>``) in one transaction. The sender's own
machinery (lease by state, retries with backoff, parking, ``ich-node resend``)
then delivers them like DICOM results, with :func:`send_alert`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom

from ich_node.config import EmailTarget, HL7Target, NotificationTarget, WebhookTarget
from ich_node.delivery.alerts import (
    ALERT_PREFIX,
    Alert,
    AlertFailed,
    Previous,
    answer,
    decide,
    key_image_png,
    make_alert,
    read_alert,
    wants_key_image,
    write_alert,
)
from ich_node.queue.interface import AlertRecord
from ich_node.queue.store import Store
from ich_node.results.findings import SeriesFindings


def key_image_lines(alert: Alert) -> list[str]:
    """The text burned into the email's key image."""
    found = ", ".join(alert.positive_labels) or "no positive label"
    slice_ = alert.key_slice
    lines = [f"Suspected: {found}" + (f" (any p={slice_.probability:.2f})" if slice_ else "")]
    return [*lines, f"{alert.model_name} {alert.model_version}", alert.notice]


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
) -> list[Alert]:
    """Decide, write and record the alerts of one series version; returns the new ones.

    Parameters
    ----------
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
    if not targets:
        return []
    uid = findings.series_instance_uid
    done = {a.target for a in store.alerts(job_id)}
    last = store.last_received_at(uid, created_at) or created_at
    records: list[AlertRecord] = []
    alerts: list[Alert] = []
    for target in targets:
        if target.name in done:  # recorded by an earlier attempt of this job
            continue
        labels = answer(findings, target)
        prev = store.previous_alert(uid, version, target.name)
        status = decide(
            target, labels, None if prev is None else Previous(prev.key, prev.positive_labels)
        )
        if status is None:
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
        png = None
        if wants_key_image(target) and alert.key_slice is not None and hu_of is not None:
            png = key_image_png(hu_of(alert.key_slice.index), key_image_lines(alert))
        write_alert(storage_dir, alert, png)
        records.append(
            AlertRecord(
                job_id, target.name, uid, version, alert.key, alert.status, alert.supersedes,
                alert.positive_labels, last, now,
            )
        )  # fmt: skip
        alerts.append(alert)
    store.record_alerts(records, ALERT_PREFIX, now)
    return alerts


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


def send_alert(storage_dir: Path, target: NotificationTarget, job_id: str) -> Alert:
    """Send the recorded alert of ``job_id`` to ``target``; returns it once accepted.

    Raises
    ------
    AlertFailed
        What the transport said (``permanent`` ones are parked at once).
    """
    try:
        alert, png = read_alert(storage_dir, job_id, target.name)
    except FileNotFoundError:
        raise AlertFailed(f"the alert record of {target.name} is gone", permanent=True) from None
    if isinstance(target, HL7Target):
        from ich_node.delivery.hl7 import send_oru

        send_oru(alert, target)
    elif isinstance(target, WebhookTarget):
        from ich_node.delivery.webhook import post

        post(alert, target)
    elif isinstance(target, EmailTarget):
        from ich_node.delivery.email import send_email

        send_email(alert, target, png)
    return alert


def check_targets(targets: Sequence[NotificationTarget]) -> list[str]:
    """Problems with the files the targets name, one line each (``notifications[i].key: ...``).

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
    return problems
