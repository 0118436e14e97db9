"""Early (preliminary) alerts: the rule, their records, the final that follows, the messages.

The rule and the records run on a real store (both backends); the messages go to
real receivers on 127.0.0.1 (python-hl7's MLLP server, an HTTPS webhook with the
test CA, an aiosmtpd server) and are parsed back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from ich_node.config import NotificationTarget, parse_config
from ich_node.delivery import email as email_alert
from ich_node.delivery import hl7 as hl7_alert
from ich_node.delivery import webhook
from ich_node.delivery.alerts import (
    alert_key,
    early_labels,
    preliminary_job_id,
    read_alert,
)
from ich_node.delivery.outbox import prepare_alerts, prepare_preliminary_alerts
from ich_node.labels import LABELS
from ich_node.queue.jobs import job_id_for
from ich_node.queue.store import InstanceRecord, Store
from ich_node.results.findings import ModelInfo, SeriesFindings, summarise
from tests.alert_servers import CertAuthority, MLLPServer, SMTPServer, WebhookServer, make_ca

OpenStore = Callable[[Path], Store]
UID = "1.2.826.0.1.3680043.8.498.77"
STUDY = "1.2.826.0.1.3680043.8.498.76"
SECRET = b"early-secret"


def _findings(any_: list[float], subdural: list[float] | None = None) -> SeriesFindings:
    """Findings of len(any_) slices; thresholds 0.5 (the bundle's or the site's)."""
    n = len(any_)
    probs = np.zeros((n, len(LABELS)), np.float32)
    probs[:, 0] = any_
    if subdural is not None:
        probs[:, LABELS.index("subdural")] = subdural
    return summarise(
        study_instance_uid=STUDY,
        series_instance_uid=UID,
        sop_instance_uids=tuple(f"{UID}.{i}" for i in range(n)),
        positions_mm=tuple(float(5 * i) for i in range(n)),
        probabilities=probs,
        thresholds=dict.fromkeys(LABELS, 0.5),
        model=ModelInfo("ich-test", "1.0.0", "resnet18", "ab" * 32, True),
    )


def _header() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-1"
    ds.AccessionNumber = "ACC9"
    return ds


def _targets(**extra: Any) -> tuple[NotificationTarget, ...]:
    base = {"kind": "hl7", "host": "127.0.0.1", "port": 1, "receiving_application": "RIS",
            "receiving_facility": "HOSP"}  # fmt: skip
    return parse_config({"notifications": [
        base | {"name": "ris", "early": True} | extra,
        base | {"name": "late"},  # not early: told only at completion
    ]}).notifications  # fmt: skip


def _series(store: Store, now: float) -> None:
    record = InstanceRecord(f"{UID}.0", "1.2.840.10008.5.1.4.1.1.2", STUDY, UID, "CT", "HEAD",
                            "", "")  # fmt: skip
    store.add_instance(record, Path("/nonexistent/0.dcm"), 1, now, digest="d0")


# -- the rule ----------------------------------------------------------------------


def test_early_rule_needs_positive_slices_in_a_row() -> None:
    two_apart = _findings([0.9, 0.1, 0.9, 0.1])
    assert early_labels(two_apart, 1) == ("any",)
    assert early_labels(two_apart, 2) == ()  # the series maximum says positive; the rule not
    assert two_apart.positive_labels == ("any",)
    assert early_labels(_findings([0.1, 0.8, 0.6, 0.2]), 2) == ("any",)
    assert early_labels(_findings([0.1, 0.8, 0.6, 0.7]), 3) == ("any",)
    # A subtype counts only with `any`, each by its own run.
    both = _findings([0.9, 0.9, 0.1], subdural=[0.1, 0.9, 0.9])
    assert early_labels(both, 2) == ("any", "subdural")
    assert early_labels(_findings([0.9, 0.1, 0.9], subdural=[0.9, 0.9, 0.9]), 2) == ()
    with pytest.raises(ValueError, match="min_slices"):
        early_labels(two_apart, 0)


# -- records: one preliminary, then the final or a correction ------------------------


def _preliminary(store: Store, tmp_path: Path, findings: SeriesFindings, now: float,
                 version: int = 1, targets: Any = None) -> list[Any]:  # fmt: skip
    return prepare_preliminary_alerts(
        store, tmp_path, targets or _targets(), job_id=job_id_for(UID, version), version=version,
        findings=findings, min_slices=2, header=_header(), hu_of=None, last_received_at=now,
        now=now,
    )  # fmt: skip


def _final(store: Store, tmp_path: Path, findings: SeriesFindings, now: float,
           version: int = 1) -> list[Any]:  # fmt: skip
    job = store.queue_series(UID, 1, job_id_for, now)
    assert job.version == version
    return prepare_alerts(
        store, tmp_path, _targets(), job_id=job.job_id, version=version, created_at=now,
        findings=findings, header=_header(), hu_of=None, now=now,
    )  # fmt: skip


def test_a_preliminary_then_the_final_with_the_same_answer(
    tmp_path: Path, open_store: OpenStore
) -> None:
    store = open_store(tmp_path / "node")
    now = 1_800_000_000.0
    _series(store, now)
    (early,) = _preliminary(store, tmp_path, _findings([0.1, 0.9, 0.9]), now)
    job_id = job_id_for(UID, 1)
    assert (early.target, early.status, early.n_slices) == ("ris", "P", 3)
    assert early.key == alert_key(preliminary_job_id(job_id), "ris")
    assert early.positive_labels == ("any",) and early.version == 1
    assert read_alert(tmp_path, preliminary_job_id(job_id), "ris")[0] == early
    # One preliminary per target and version, whatever the next slices say.
    assert _preliminary(store, tmp_path, _findings([0.1, 0.9, 0.9, 0.9]), now + 1) == []
    finals = _final(store, tmp_path, _findings([0.1, 0.9, 0.9, 0.95]), now + 2)
    assert {(a.target, a.status, a.supersedes) for a in finals} == {
        ("ris", "F", None),
        ("late", "F", None),
    }
    records = {(a.job_id, a.target): a.status for a in store.alerts()}
    assert records == {
        (preliminary_job_id(job_id), "ris"): "P",
        (job_id, "ris"): "F",
        (job_id, "late"): "F",
    }
    states = {d.destination for d in store.deliveries(preliminary_job_id(job_id))}
    assert states == {"alert:ris"}  # sent by the sender like any alert
    # The next version compares with the final, never with the preliminary.
    previous = store.previous_alert(UID, 2, "ris")
    assert previous is not None and previous.status == "F"


def test_a_preliminary_withdrawn_by_a_negative_final(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path / "node")
    now = 1_800_000_000.0
    _series(store, now)
    (early,) = _preliminary(store, tmp_path, _findings([0.9, 0.9]), now)
    finals = _final(store, tmp_path, _findings([0.4, 0.3, 0.1, 0.1]), now + 5)
    # `when: positive` targets hear nothing of a negative series, except the one that was
    # told it was positive: its correction withdraws the preliminary.
    (final,) = finals
    assert (final.target, final.status, final.supersedes) == ("ris", "C", early.key)
    assert final.positive is False


def test_no_preliminary_once_the_version_is_complete(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path / "node")
    now = 1_800_000_000.0
    _series(store, now)
    store.queue_series(UID, 1, job_id_for, now)  # the assembler was first
    assert _preliminary(store, tmp_path, _findings([0.9, 0.9]), now + 1) == []
    assert store.alerts() == []
    assert store.deliveries() == []


def test_no_preliminary_when_negative_not_early_or_already_told(
    tmp_path: Path, open_store: OpenStore
) -> None:
    store = open_store(tmp_path / "node")
    now = 1_800_000_000.0
    _series(store, now)
    assert _preliminary(store, tmp_path, _findings([0.9, 0.1, 0.9]), now) == []
    plain = _targets(early=False)
    assert _preliminary(store, tmp_path, _findings([0.9, 0.9]), now, targets=plain) == []
    # Version 1 was read positive (F): version 2, still arriving, says the same: no P.
    _final(store, tmp_path, _findings([0.9, 0.9]), now)
    _series_again = InstanceRecord(f"{UID}.1", "1.2.840.10008.5.1.4.1.1.2", STUDY, UID, "CT",
                                   "HEAD", "", "")  # fmt: skip
    store.add_instance(_series_again, Path("/nonexistent/1.dcm"), 1, now + 10, digest="d1")
    assert _preliminary(store, tmp_path, _findings([0.9, 0.9, 0.9]), now + 11, version=2) == []


def test_no_preliminary_when_another_series_of_the_study_told_the_same(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """Alerts go per study (accession): a second series adds no preliminary, unless new."""
    store = open_store(tmp_path / "node")
    now = 1_800_000_000.0
    _series(store, now)
    _final(store, tmp_path, _findings([0.9, 0.9]), now)  # series 1: positive for any
    other = dataclasses.replace(_findings([0.9, 0.9, 0.9]), series_instance_uid=UID + ".2")
    record = InstanceRecord(f"{UID}.2.0", "1.2.840.10008.5.1.4.1.1.2", STUDY, UID + ".2", "CT",
                            "HEAD", "", "")  # fmt: skip
    store.add_instance(record, Path("/nonexistent/2.dcm"), 1, now + 1, digest="d2")
    args = {"job_id": job_id_for(UID + ".2", 1), "version": 1, "min_slices": 2,
            "header": _header(), "hu_of": None, "last_received_at": now + 1}  # fmt: skip
    assert prepare_preliminary_alerts(store, tmp_path, _targets(), findings=other,
                                      now=now + 2, **args) == []  # fmt: skip
    # A subdural the study was not told of yet: preliminary, with the study's answer.
    grown = dataclasses.replace(
        _findings([0.9, 0.9, 0.9], subdural=[0.1, 0.8, 0.8]), series_instance_uid=UID + ".2"
    )
    (early,) = prepare_preliminary_alerts(store, tmp_path, _targets(), findings=grown,
                                          now=now + 3, **args)  # fmt: skip
    assert early.status == "P" and early.positive_labels == ("any", "subdural")


# -- the messages --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return make_ca(tmp_path_factory.mktemp("ca"))


def _alert_to(target: NotificationTarget) -> Any:
    from ich_node.delivery.alerts import make_alert

    findings = _findings([0.1, 0.9, 0.9])
    return make_alert(findings, _header(), target, job_id=preliminary_job_id("j1"), version=1,
                      status="P", supersedes=None, result_time=1_800_000_000.0,
                      last_received_at=1_799_999_999.0)  # fmt: skip


def test_hl7_preliminary_is_obr25_and_obx11_p_and_says_so() -> None:
    server = MLLPServer("AA")
    try:
        (hl7_target,) = [t for t in _targets(port=server.port) if t.name == "ris"]
        alert = _alert_to(hl7_target)
        assert hl7_alert.send_oru(alert, hl7_target) == "AA"  # type: ignore[arg-type]
        (message,) = server.messages
        assert str(message.segment("OBR")(25)) == "P"
        assert {str(obx(11)) for obx in message.segments("OBX")} == {"P"}
        notes = [message.unescape(str(n(3))) for n in message.segments("NTE")]
        assert len(notes) == 3 and "not a diagnosis" in notes[0] and "hreshold" in notes[1]
        assert "PRELIMINARY" in notes[2] and "3 slices" in notes[2]
        assert "still arriving" in notes[2] and "withdraw" in notes[2]
    finally:
        server.close()


def test_webhook_and_email_preliminary(tmp_path: Path, ca: CertAuthority,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    hook = WebhookServer(ca, SECRET)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca))
    smtp = SMTPServer(ca)
    try:
        secret = tmp_path / "secret"
        secret.write_bytes(SECRET)
        creds = tmp_path / "creds"
        creds.write_text("node\ns3cret\n")
        hook_target, mail_target = parse_config({"notifications": [
            {"name": "oncall", "kind": "webhook", "url": hook.url, "secret_file": str(secret),
             "ca_file": str(ca.ca), "early": True},
            {"name": "mail", "kind": "email", "host": "127.0.0.1", "port": smtp.port,
             "credentials_file": str(creds), "from": "ich@x.org", "to": "a@x.org",
             "early": True},
        ]}).notifications  # fmt: skip
        webhook.post(_alert_to(hook_target), hook_target)  # type: ignore[arg-type]
        (body,) = hook.bodies()
        assert body["status"] == "preliminary" and body["n_slices"] == 3
        assert "still arriving" in body["note"] and body["positive_labels"] == ["any"]
        email_alert.send_email(_alert_to(mail_target), mail_target, None)  # type: ignore[arg-type]
        (message,) = smtp.messages
        assert str(message["Subject"]).startswith("Preliminary ")
        text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "PRELIMINARY: based on the 3 slices received so far" in text
    finally:
        hook.close()
        smtp.close()
