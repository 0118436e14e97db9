"""Alerts end to end through the worker and the sender, to real servers on 127.0.0.1.

A phantom study is read by a real worker (a random model whose thresholds make it
positive or negative); the alerts are recorded before the heatmaps and the SR; the
sender delivers them to python-hl7's MLLP server, an HTTPS server that checks the
signature, and aiosmtpd. Exactly once per target per series version, also when
a target is down, refuses, or the sending process is SIGKILLed mid-request.
The tests run on both store backends (SQLite, PostgreSQL), the same tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from benchmarks.common import free_port, queue_series, random_bundle
from ich_node.config import NodeConfig, parse_config
from ich_node.delivery.alerts import ALERT_PREFIX, alert_key, read_alert
from ich_node.delivery.outbox import prepare_alerts
from ich_node.delivery.sender import Sender
from ich_node.labels import LABELS
from ich_node.log import configure_logging
from ich_node.metrics import Metrics
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.layout import results_dir
from ich_node.queue.store import Store
from ich_node.results.findings import LabelFinding, SeriesFindings
from ich_node.service.ops import collect_status
from ich_node.service.worker import Worker
from tests.alert_servers import (
    CertAuthority,
    MLLPServer,
    SMTPServer,
    WebhookServer,
    make_ca,
    wait_for,
)
from training.phantom import PhantomSeries, write_series

OpenStore = Callable[[Path], Store]
Section = Callable[[Path], Any]  # conftest's storage_section: the test's backend

SECRET = b"s3cret-hmac-key"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    root = tmp_path_factory.mktemp("alert_phantom")
    return write_series(root / "s", seed=11, subtypes=("subdural",), n_slices=10, matrix=128)


def _classifier(tmp: Path, threshold: float) -> Classifier:
    # Random weights give probabilities near 0.5: a threshold of 0.01 makes every
    # label positive, 0.99 none, so the test knows the answer the model gives.
    path = random_bundle(
        tmp / f"t{threshold}.safetensors",
        name="alert test model",
        version="2.1.0",
        thresholds=dict.fromkeys(LABELS, threshold),
    )
    return Classifier(load_bundle(path), device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def positive(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    return _classifier(tmp_path_factory.mktemp("pos"), 0.01)


@pytest.fixture(scope="module")
def negative(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    return _classifier(tmp_path_factory.mktemp("neg"), 0.99)


@dataclasses.dataclass
class Receivers:
    mllp: MLLPServer
    hook: WebhookServer
    smtp: SMTPServer


@pytest.fixture
def receivers(ca: CertAuthority, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receivers]:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca))  # SMTP STARTTLS trusts the test CA
    r = Receivers(MLLPServer("AA"), WebhookServer(ca, SECRET), SMTPServer(ca))
    yield r
    r.mllp.close()
    r.hook.close()
    r.smtp.close()


def _config(
    storage: Section, tmp_path: Path, r: Receivers | None, ca: CertAuthority, *,
    when: str = "positive", hook_url: str | None = None, hl7_port: int | None = None, max_attempts: int = 5,
) -> NodeConfig:  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET + b"\n")
    creds = tmp_path / "smtp.creds"
    creds.write_text("node\ns3cret\n")
    targets: list[dict[str, Any]] = [
        {"name": "ris", "kind": "hl7", "host": "127.0.0.1",
         "port": hl7_port or (r.mllp.port if r else free_port()),
         "receiving_application": "RIS", "receiving_facility": "HOSP", "when": when,
         "timeout_seconds": 3.0},
        {"name": "oncall", "kind": "webhook", "url": hook_url or (r.hook.url if r else ""),
         "secret_file": str(secret), "ca_file": str(ca.ca), "when": when,
         "timeout_seconds": 3.0},
    ]  # fmt: skip
    if r is not None:
        targets.append(
            {
                "name": "neuro",
                "kind": "email",
                "host": "127.0.0.1",
                "port": r.smtp.port,
                "credentials_file": str(creds),
                "from": "ich@x.org",
                "to": ["neuro@x.org"],
                "when": when,
                "timeout_seconds": 5.0,
            }
        )
    return parse_config(
        {
            "storage": {
                "dir": str(tmp_path / "node"),
                "database": storage(tmp_path / "node").database,
            },
            "queue": {"lease_seconds": 60.0, "max_attempts": 2, "retry_base_seconds": 0.1},
            "sender": {
                "max_attempts": max_attempts,
                "backoff_base_seconds": 0.2,
                "backoff_max_seconds": 0.4,
                "timeout_seconds": 5.0,
            },
            "notifications": targets,
        }
    )


def _read(
    open_store: OpenStore, config: NodeConfig, classifier: Classifier, study: PhantomSeries
) -> tuple[Store, str]:
    store = open_store(config.storage.dir)
    job = queue_series(store, study.paths, time.time() - 5)
    outcome = Worker(config, "w0", store, classifier).run_once(time.time())
    assert outcome is not None and outcome.state == "done", outcome
    return store, job.job_id


def _sender(config: NodeConfig, store: Store, metrics: Metrics | None = None) -> Sender:
    return Sender(store, (), config.sender, config.storage.dir, "ICH_NODE", metrics,
                  targets=config.notifications)  # fmt: skip


def _drain(sender: Sender, store: Store, job_id: str, timeout: float = 30.0) -> None:
    """Run the alert sender until no alert of the job is pending or retrying (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sender.run_once(time.time(), alerts=True)
        rows = [d for d in store.deliveries(job_id) if d.destination.startswith(ALERT_PREFIX)]
        if rows and all(d.state in ("done", "parked") for d in rows):
            return
        time.sleep(0.1)
    raise AssertionError(f"alerts not settled: {store.deliveries(job_id)}")


def test_positive_study_one_alert_per_target_with_the_right_content(
    tmp_path: Path, storage_section: Section, open_store: OpenStore, study: PhantomSeries,
    positive: Classifier, receivers: Receivers, ca: CertAuthority, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    configure_logging("json", "INFO")
    config = _config(storage_section, tmp_path, receivers, ca)
    store, job_id = _read(open_store, config, positive, study)
    header = pydicom.dcmread(study.paths[0], stop_before_pixels=True)

    # Recorded in the model stage, before the heatmaps and the SR were written.
    alerts = store.alerts(job_id)
    assert sorted(a.target for a in alerts) == ["neuro", "oncall", "ris"]
    job = store.job(job_id)
    assert job is not None and all(a.created_at <= job.updated_at for a in alerts)
    sr_written = min(p.stat().st_mtime for p in (results_dir(config.storage.dir, job_id)
                                                  / "outbox").rglob("*.dcm"))  # fmt: skip
    record = config.storage.dir / "alerts" / job_id / "ris.json"
    assert record.stat().st_mtime <= sr_written

    metrics = Metrics(store)
    sender = _sender(config, store, metrics)
    _drain(sender, store, job_id)
    sender.run_once(time.time() + 3600, alerts=True)  # nothing is sent twice
    assert [a.accepted_at is not None for a in store.alerts(job_id)] == [True] * 3

    # HL7: one ORU^R01, parsed back.
    (oru,) = receivers.mllp.messages
    assert str(oru.segment("MSH")(10)) == alert_key(job_id, "ris")
    assert oru.extract_field("PID", 1, 3, 1, 1) == str(header.PatientID)
    assert str(oru.segment("ORC")(2)) == str(header.AccessionNumber)
    assert oru.extract_field("ORC", 1, 7, 1, 6) == "S" and str(oru.segment("OBR")(25)) == "F"
    codes = {str(o(3)(1)(1)): float(str(o(5))) for o in oru.segments("OBX")[1:]}
    assert set(codes) == {"1386000", "EDH", "274100004", "IVH", "21454007", "35486000"}
    findings = json.loads((results_dir(config.storage.dir, job_id) / "findings.json").read_text())
    assert codes["35486000"] == pytest.approx(findings["series"]["subdural"]["probability"],
                                              abs=1e-4)  # fmt: skip
    assert "alert test model 2.1.0" in str(oru.segment("NTE")(3))

    # Webhook: one signed POST, no patient data.
    (body,) = receivers.hook.bodies()
    assert receivers.hook.bad_signatures == 0
    assert body["idempotency_key"] == alert_key(job_id, "oncall")
    assert body["series_instance_uid"] == str(header.SeriesInstanceUID)
    assert body["accession_number"] == str(header.AccessionNumber)
    assert body["model"]["version"] == "2.1.0" and body["model"]["demo"] is True
    assert body["supersedes"] is None and "patient" not in body
    raw = receivers.hook.received[0][1].decode()

    # Email: one, PHI-free subject, key image attached.
    (mail,) = receivers.smtp.messages
    assert "positive" in str(mail["Subject"])
    assert len(list(mail.iter_attachments())) == 1

    phi = [str(header.PatientName), str(header.PatientID), str(header.PatientBirthDate)]
    phi += [part for part in str(header.PatientName).split("^") if len(part) > 5]
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    for value in phi:
        assert value not in raw and value not in str(mail["Subject"]) and value not in text

    # Time to notification is exported, and each log line is free of patient data.
    samples = {s.name: s.value for m in metrics.registry.collect() for s in m.samples
               if s.labels.get("target") == "ris"}  # fmt: skip
    assert samples["ich_node_time_to_notification_seconds_count"] == 1
    logs = capsys.readouterr()
    lines = (logs.out + logs.err).splitlines()
    assert any('"alert.finished"' in line and "time_to_notification_s" in line for line in lines)
    for value in phi:
        assert not [line for line in lines if value in line], value


def test_negative_study_no_alert_unless_always(
    tmp_path: Path, storage_section: Section, open_store: OpenStore, study: PhantomSeries,
    negative: Classifier, receivers: Receivers, ca: CertAuthority,
) -> None:  # fmt: skip
    config = _config(storage_section, tmp_path / "a", receivers, ca)
    store, job_id = _read(open_store, config, negative, study)
    assert store.alerts(job_id) == []
    _sender(config, store).run_once(time.time())
    assert receivers.mllp.messages == [] and receivers.hook.received == []

    always = _config(storage_section, tmp_path / "b", receivers, ca, when="always")
    store, job_id = _read(open_store, always, negative, study)
    sender = _sender(always, store)
    _drain(sender, store, job_id)
    (oru,) = receivers.mllp.messages
    assert oru.extract_field("ORC", 1, 7, 1, 6) == "R"  # routine priority on a negative
    (body,) = receivers.hook.bodies()
    assert body["positive"] is False and body["positive_labels"] == []
    assert len(receivers.smtp.messages) == 1


def test_target_down_then_up_is_delivered_once(
    tmp_path: Path,
    storage_section: Section,
    open_store: OpenStore,
    study: PhantomSeries,
    positive: Classifier,
    ca: CertAuthority,
) -> None:
    port = free_port()
    config = _config(storage_section, tmp_path, None, ca, hook_url=f"https://127.0.0.1:{port}/h")
    store, job_id = _read(open_store, config, positive, study)
    sender = _sender(config, store)
    sender.run_once(time.time(), alerts=True)
    states = {d.destination: d for d in store.deliveries(job_id)}
    assert states["alert:oncall"].state == "retry" and states["alert:ris"].state == "retry"
    assert "ConnectionRefused" in states["alert:oncall"].reason
    hook, mllp = WebhookServer(ca, SECRET, port=port), MLLPServer("AA")
    try:
        config = _config(storage_section, tmp_path, None, ca, hook_url=hook.url, hl7_port=mllp.port)
        _drain(_sender(config, store), store, job_id)
        assert len(hook.received) == 1 and len(mllp.messages) == 1
        assert {d.state for d in store.deliveries(job_id)} == {"done"}
    finally:
        hook.close()
        mllp.close()


def test_a_target_that_hangs_does_not_hold_back_the_others(
    tmp_path: Path,
    study: PhantomSeries,
    positive: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    """The RIS accepts the connection and answers only after 4 s: the other
    targets' alerts are accepted meanwhile, not after it (one pass, in parallel)."""
    slow, fast = MLLPServer("slow", delay=4.0), MLLPServer("AA")
    try:
        targets = [
            {"name": name, "kind": "hl7", "host": "127.0.0.1", "port": port,
             "receiving_application": "RIS", "receiving_facility": "HOSP",
             "timeout_seconds": 10.0}
            for name, port in (("a-slow-ris", slow.port), ("b-fast-ris", fast.port))
        ]  # fmt: skip
        config = parse_config(
            {
                "storage": {
                    "dir": str(tmp_path / "node"),
                    "database": storage_section(tmp_path / "node").database,
                },
                "queue": {"lease_seconds": 60.0, "max_attempts": 2},
                "sender": {"max_attempts": 3, "timeout_seconds": 10.0},
                "notifications": targets,
            }
        )
        store, job_id = _read(open_store, config, positive, study)
        outcomes = _sender(config, store).run_once(time.time(), alerts=True)
        assert sorted(o.state for o in outcomes) == ["done", "done"]
        accepted = {a.target: a.accepted_at for a in store.alerts(job_id)}
        assert None not in accepted.values()
        # Sent one after the other, the fast target (second in the pass) would be
        # accepted only after the slow one's ACK.
        assert accepted["b-fast-ris"] < accepted["a-slow-ris"]  # type: ignore[operator]
        assert len(slow.messages) == 1 and len(fast.messages) == 1
    finally:
        slow.close()
        fast.close()


def test_hl7_ar_is_parked_with_the_ack_text_and_resend_delivers(
    tmp_path: Path,
    storage_section: Section,
    open_store: OpenStore,
    study: PhantomSeries,
    positive: Classifier,
    ca: CertAuthority,
) -> None:
    mllp = MLLPServer("AR", text="Order ACC not found in RIS")
    hook = WebhookServer(ca, SECRET)
    try:
        config = _config(storage_section, tmp_path, None, ca, hook_url=hook.url, hl7_port=mllp.port)
        store, job_id = _read(open_store, config, positive, study)
        sender = _sender(config, store)
        _drain(sender, store, job_id)
        ris = next(d for d in store.deliveries(job_id) if d.destination == "alert:ris")
        assert ris.state == "parked" and ris.attempts == 1  # an AR (reject) is not retried
        assert "AR" in ris.reason and "Order ACC not found in RIS" in ris.reason
        report = collect_status(store, time.time())
        assert report["deliveries"]["parked"] == 1
        assert report["alerts"]["states"] == {"parked": 1, "done": 1}
        assert any(f["destination"] == "alert:ris" for f in report["recent_failures"])
        # The admin fixes the RIS and resends: the same message (same control ID) again.
        mllp.mode = "AA"
        result = subprocess.run(
            [sys.executable, "-m", "ich_node.service.cli", "resend", "--config", str(_yaml(tmp_path, config)),
             job_id], capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        _drain(sender, store, job_id)
        assert [str(m.segment("MSH")(10)) for m in mllp.messages] == [alert_key(job_id, "ris")] * 2
        assert len(hook.received) == 1
    finally:
        mllp.close()
        hook.close()


def _yaml(tmp_path: Path, config: NodeConfig) -> Path:
    import yaml

    path = tmp_path / "node.yaml"
    data = {"storage": {"dir": str(config.storage.dir), "database": config.storage.database},
            "notifications": [t.model_dump(mode="json", by_alias=True)
                              for t in config.notifications]}  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return path


# A sending process as serve runs it: it beats under its name, which holds its claims.
_SEND_LOOP = """
import os, sys, time
from ich_node.config import load_config
from ich_node.delivery.sender import Sender
from ich_node.queue.backend import open_store
config = load_config(sys.argv[1])
store = open_store(config.storage)
sender = Sender(store, (), config.sender, config.storage.dir, "ICH_NODE",
                targets=config.notifications, holder="sender-child")
while True:
    store.heartbeat("sender-child", os.getpid(), time.time())
    sender.run_once(time.time(), alerts=True)
    time.sleep(0.1)
"""


def test_sigkill_between_record_and_ack_no_duplicate_key(
    tmp_path: Path,
    storage_section: Section,
    open_store: OpenStore,
    study: PhantomSeries,
    positive: Classifier,
    ca: CertAuthority,
) -> None:
    """The sending process dies after the target got the alert, before it answered."""
    hook = WebhookServer(ca, SECRET)
    mllp = MLLPServer("AA")
    try:
        config = _config(storage_section, tmp_path, None, ca, hook_url=hook.url, hl7_port=mllp.port)
        store, job_id = _read(open_store, config, positive, study)
        hook.delay = 5.0  # the answer comes after the kill
        mllp.mode, mllp.delay = "slow", 5.0
        child = subprocess.Popen(
            [sys.executable, "-c", _SEND_LOOP, str(_yaml(tmp_path, config))],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:  # killed as soon as a target holds the alert and has not answered yet
            assert wait_for(lambda: hook.arrived or mllp.messages, timeout=60)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        in_flight = "alert:oncall" if hook.arrived else "alert:ris"
        states = {d.destination: d.state for d in store.deliveries(job_id)}
        assert states[in_flight] == "pending"  # sent, never recorded as done
        hook.delay, mllp.mode = 0.0, "AA"
        # Another sender takes it over: on a shared store (PostgreSQL) once the dead
        # holder's heartbeat is stale (HEARTBEAT_STALE_SECONDS, 15 s), hence the bound.
        _drain(_sender(config, store), store, job_id, timeout=60.0)
        keys = [h["Idempotency-Key"] for h, _ in hook.arrived]
        assert set(keys) == {alert_key(job_id, "oncall")}
        assert len({raw for _, raw in hook.arrived}) == 1  # the same body, byte for byte
        controls = [str(m.segment("MSH")(10)) for m in mllp.messages]
        assert set(controls) == {alert_key(job_id, "ris")}
        # What was in flight at the kill arrived twice with one key, the rest once
        # (alerts go out side by side: both targets may have been in flight).
        assert 2 in (len(keys), len(controls)) and {len(keys), len(controls)} <= {1, 2}
        assert {d.state for d in store.deliveries(job_id)} == {"done"}
    finally:
        hook.close()
        mllp.close()


def _findings(base: SeriesFindings, positive: bool) -> SeriesFindings:
    series = {k: LabelFinding(v.probability, positive, v.threshold) for k, v in base.series.items()}
    return dataclasses.replace(base, series=series)


def test_later_version_that_changes_the_answer_sends_a_correction(
    tmp_path: Path,
    storage_section: Section,
    open_store: OpenStore,
    study: PhantomSeries,
    positive: Classifier,
    ca: CertAuthority,
    receivers: Receivers,
) -> None:
    config = _config(storage_section, tmp_path, receivers, ca)
    store, job_id = _read(open_store, config, positive, study)
    first = store.alerts(job_id)
    header = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
    base, _ = read_alert(config.storage.dir, job_id, "oncall")
    prediction = positive.predict_series(__import__("ich_node.imaging", fromlist=["x"])
                                         .read_series(list(study.paths)))  # fmt: skip

    def version(n: int, is_positive: bool) -> list[Any]:
        return prepare_alerts(
            store, config.storage.dir, config.notifications, job_id=f"{job_id}-v{n}",
            version=n, created_at=time.time(),
            findings=_findings(prediction.findings, is_positive), header=header, hu_of=None,
            now=time.time(),
        )  # fmt: skip

    assert version(2, True) == []  # same answer: no second alert
    corrections = version(3, False)  # negative now: a correction, even for `when: positive`
    assert {a.status for a in corrections} == {"C"}
    by_target = {a.target: a for a in corrections}
    assert by_target["oncall"].supersedes == next(a.key for a in first if a.target == "oncall")
    assert by_target["oncall"].positive is False
    assert version(3, False) == []  # the same job again (a crash and re-run): nothing new
    assert base.positive is True

    # Sent to the real receivers and parsed back: the first alert, then its correction.
    sender = _sender(config, store)
    for job in (job_id, f"{job_id}-v3"):
        _drain(sender, store, job)
    first_key = next(a.key for a in first if a.target == "oncall")
    bodies = {b["idempotency_key"]: b for b in receivers.hook.bodies()}
    correction = bodies[by_target["oncall"].key]
    assert correction["supersedes"] == first_key and bodies[first_key]["supersedes"] is None
    assert correction["positive"] is False
    # One pass sends the due alerts side by side: the two may arrive in either order.
    by_status = {str(m.segment("OBR")[25]): m for m in receivers.mllp.messages}
    assert sorted(by_status) == ["C", "F"] and len(receivers.mllp.messages) == 2  # OBR-25
    corrected = by_status["C"]
    assert {str(obx[11]) for obx in corrected.segments("OBX")} == {"C"}  # OBX-11
