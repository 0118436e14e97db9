"""Alerts to receivers as hospitals run them (issue #24), real servers on 127.0.0.1.

- HL7 ACK dialects from python-hl7's MLLP server: segments ending in LF or CR LF, an
  ISO 8859-1 ACK without MSH-18, MSH-18 named: one ORU per series, recorded done;
  a wrong MSA-2 control ID is not a success.
- A refusal that quotes the patient (HL7 AR, HTTP 400 body, SMTP 550) never shows in
  the store, ``status`` or ``status --json``; its readable part does.
- A byte-a-second HTTPS webhook and an SMTP server that drips ``220-`` lines are cut
  at their target's ``timeout_seconds`` (the whole attempt), and an HL7 target beside
  them gets its alert at once.
- A database error between two claims (a test double for the error alone) strands
  no alert: each is sent within seconds, on both store backends.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from ich_node.config import NodeConfig, parse_config
from ich_node.delivery import email as email_alert
from ich_node.delivery import webhook
from ich_node.delivery.alerts import ALERT_PREFIX, AlertFailed, alert_key
from ich_node.delivery.outbox import prepare_alerts, send_alert
from ich_node.delivery.sender import Sender
from ich_node.labels import LABELS
from ich_node.queue.store import Store
from ich_node.results.findings import LabelFinding, ModelInfo, SeriesFindings, SliceFinding
from ich_node.service.ops import status
from tests.alert_servers import (
    CertAuthority,
    DripServer,
    MLLPServer,
    SMTPServer,
    WebhookServer,
    make_ca,
    wait_for,
)
from tests.receiver_peers import ack_dialect as _ack

SECRET = b"receiver-secret"
PATIENT = {"PatientName": "Qvist^Anna", "PatientID": "PID-4711", "PatientBirthDate": "19370405"}
NEEDLES = ("Qvist", "QVIST", "Anna", "ANNA", "PID-4711", "19370405")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return make_ca(tmp_path_factory.mktemp("ca"))


def _findings() -> SeriesFindings:
    probs = dict.fromkeys(LABELS, 0.02) | {"any": 0.97, "subdural": 0.9}
    series = {label: LabelFinding(p, p >= 0.5, 0.5) for label, p in probs.items()}
    slices = tuple(
        SliceFinding(f"1.2.3.4.{i}", float(i * 5), {k: v * (i == 2) for k, v in probs.items()})
        for i in range(4)
    )
    return SeriesFindings("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2",
                          ModelInfo("ich-test", "1.0.0", "resnet18", "ab" * 32, True),
                          series, slices)  # fmt: skip


def _header() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.AccessionNumber = "ACC-77"
    return ds


def _config(
    tmp_path: Path, targets: list[dict[str, Any]], database: str | None = None
) -> NodeConfig:
    return parse_config(
        {
            "storage": {"dir": str(tmp_path / "node"), "database": database},
            "sender": {"max_attempts": 5, "backoff_base_seconds": 0.2, "backoff_max_seconds": 0.4},
            "notifications": targets,
        }
    )


def _record(store: Store, config: NodeConfig, job_id: str = "job-1") -> None:
    """The alerts of one positive series version, as the worker records them."""
    now = time.time()
    prepare_alerts(store, config.storage.dir, config.notifications, job_id=job_id, version=1,
                   created_at=now, findings=_findings(), header=_header(), hu_of=None,
                   now=now)  # fmt: skip


def _hl7(name: str, port: int, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "hl7", "host": "127.0.0.1", "port": port,
            "receiving_application": "RIS", "receiving_facility": "HOSP",
            "timeout_seconds": 3.0} | kw  # fmt: skip


def _sender(config: NodeConfig, store: Any, holder: str = "") -> Sender:
    return Sender(store, (), config.sender, config.storage.dir, "ICH_NODE",
                  targets=config.notifications, holder=holder)  # fmt: skip


@pytest.mark.parametrize(
    ("end", "encoding", "msh18"),
    [("\n", "utf-8", ""), ("\r\n", "utf-8", ""), ("\r", "iso8859-1", ""),
     ("\r\n", "iso8859-1", "8859/1"), ("\n", "utf-8", "UNICODE UTF-8"),
     ("\r\n", "utf-8-sig", ""), ("\r", "utf-8-sig", "8859/1")],
    ids=["lf", "crlf", "latin1-without-msh18", "latin1-named", "utf8-named", "utf8-bom",
         "utf8-bom-misnamed"],
)  # fmt: skip
def test_ack_dialects_give_one_oru_recorded_delivered(
    tmp_path: Path, end: str, encoding: str, msh18: str
) -> None:
    mllp = MLLPServer(ack=_ack(end, encoding, msh18, "Reçu, traité"))
    try:
        config = _config(tmp_path, [_hl7("ris", mllp.port)])
        store = Store.open(config.storage.dir)
        _record(store, config)
        sender = _sender(config, store)
        for _ in range(3):  # later passes find nothing due: one ORU in all
            sender.run_once(time.time() + 5, alerts=True)
        (delivery,) = store.deliveries("job-1")
        assert delivery.state == "done" and delivery.attempts == 1, delivery
        assert len(mllp.messages) == 1
        store.close()
    finally:
        mllp.close()


def test_a_rate_limited_webhook_is_tried_again_after_its_retry_after(
    tmp_path: Path, ca: CertAuthority
) -> None:
    """A webhook answering 429 with Retry-After: 3 is not tried again before 3 s (the
    backoff alone would be 0.2 s), then gets the alert once; the wait is capped by
    sender.backoff_max_seconds."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    hook = WebhookServer(ca, SECRET)
    hook.status, hook.headers = 429, {"Retry-After": "3"}
    target = {"name": "oncall", "kind": "webhook", "url": hook.url, "secret_file": str(secret),
              "ca_file": str(ca.ca), "timeout_seconds": 5.0}  # fmt: skip
    try:
        config = _config(tmp_path, [target])
        config = config.model_copy(
            update={"sender": config.sender.model_copy(update={"backoff_max_seconds": 10.0})}
        )
        store = Store.open(config.storage.dir)
        _record(store, config)
        sender = _sender(config, store)
        start = time.time()
        sender.run_once(start, alerts=True)
        (delivery,) = store.deliveries("job-1")
        assert delivery.state == "retry" and "Retry-After 3 s" in delivery.reason
        assert delivery.next_at - start >= 3.0, delivery  # the pass's clock + 3 s
        hook.status, hook.headers = 200, {}
        sender.run_once(start + 2.0, alerts=True)  # not due yet: nothing sent
        assert len(hook.arrived) == 1
        sender.run_once(start + 3.5, alerts=True)
        (delivery,) = store.deliveries("job-1")
        assert delivery.state == "done" and delivery.attempts == 2
        assert len(hook.arrived) == 2 and len(hook.received) == 1
        store.close()
        # A wait longer than backoff_max_seconds is cut to it (another node, same study).
        second = config.storage.dir.parent / "second"
        config = config.model_copy(
            update={"storage": config.storage.model_copy(update={"dir": second})}
        )
        store = Store.open(second)
        _record(store, config)
        hook.status, hook.headers = 503, {"Retry-After": "3600"}
        _sender(config, store).run_once(start + 4.0, alerts=True)
        (late,) = store.deliveries("job-1")
        assert late.state == "retry" and late.next_at - (start + 4.0) == pytest.approx(10.0), late
        store.close()
    finally:
        hook.close()


def test_a_wrong_control_id_is_not_a_success(tmp_path: Path) -> None:
    mllp = MLLPServer(ack=_ack("\r", "ascii", "", "ok", control="SOMETHING-ELSE"))
    try:
        config = _config(tmp_path, [_hl7("ris", mllp.port)])
        store = Store.open(config.storage.dir)
        _record(store, config)
        (outcome,) = _sender(config, store).run_once(time.time(), alerts=True)
        assert outcome.state == "retry" and "control ID 'SOMETHING-ELSE'" in outcome.reason
        store.close()
    finally:
        mllp.close()


def test_a_refusal_quoting_the_patient_never_shows_in_the_store_or_status(
    tmp_path: Path, ca: CertAuthority, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca))  # STARTTLS trusts the test CA
    quote = "Patient QVIST, ANNA (PID-4711, born 19370405) has no open order ACC-77"
    mllp = MLLPServer("AR", text=quote)
    hook = WebhookServer(ca, SECRET)
    hook.status, hook.answer = 400, f"Bad request: {quote}".encode()
    smtp = SMTPServer(ca)
    smtp.handler.reply = f"550 {quote}"
    secret, creds = tmp_path / "secret", tmp_path / "creds"
    secret.write_bytes(SECRET)
    creds.write_text("node\ns3cret\n")
    try:
        config = _config(tmp_path, [
            _hl7("ris", mllp.port),
            {"name": "oncall", "kind": "webhook", "url": hook.url, "secret_file": str(secret),
             "ca_file": str(ca.ca)},
            {"name": "neuro", "kind": "email", "host": "127.0.0.1", "port": smtp.port,
             "credentials_file": str(creds), "from": "ich@x.org", "to": ["n@x.org"]},
        ])  # fmt: skip
        store = Store.open(config.storage.dir)
        _record(store, config)
        _sender(config, store).run_once(time.time(), alerts=True)
        reasons = {d.destination: d.reason for d in store.deliveries("job-1")}
        assert {d.state for d in store.deliveries("job-1")} == {"parked"}, reasons
        for reason in reasons.values():  # the readable part stays, the patient goes
            assert "has no open order" in reason and "<PatientName>" in reason, reasons
            assert "<PatientID>" in reason and "<AccessionNumber>" in reason, reasons
        store.close()
        with sqlite3.connect(config.storage.dir / "node.sqlite3") as db:
            dump = "\n".join(db.iterdump())
        capsys.readouterr()
        assert status(config, as_json=False) == 0
        text = capsys.readouterr()
        assert status(config, as_json=True) == 0
        as_json = capsys.readouterr()
        report = json.loads(as_json.out)
        assert any("has no open order" in f["reason"] for f in report["recent_failures"])
        for where, shown in (("the store", dump), ("status", text.out + text.err),
                             ("status --json", as_json.out + as_json.err)):  # fmt: skip
            found = [n for n in NEEDLES if n in shown]
            assert not found, f"{where} shows {found}"
    finally:
        mllp.close()
        hook.close()
        smtp.close()


def test_drips_are_cut_at_the_deadline_and_an_hl7_alert_goes_at_once(
    tmp_path: Path, ca: CertAuthority
) -> None:
    hook, mail, mllp = DripServer("https", ca), DripServer("smtp"), MLLPServer("AA")
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    try:
        config = _config(tmp_path, [
            _hl7("ris", mllp.port),
            {"name": "oncall", "kind": "webhook", "url": hook.url, "secret_file": str(secret),
             "ca_file": str(ca.ca), "timeout_seconds": 2.0},
            {"name": "neuro", "kind": "email", "host": "127.0.0.1", "port": mail.port,
             "starttls": False, "from": "ich@x.org", "to": ["n@x.org"],
             "timeout_seconds": 2.0},
        ])  # fmt: skip
        store = Store.open(config.storage.dir)
        _record(store, config)
        sender = _sender(config, store)
        started = time.time()
        sender.dispatch(started)
        assert wait_for(lambda: any(a.accepted_at for a in store.alerts("job-1")), 10)
        ris = next(a for a in store.alerts("job-1") if a.target == "ris")
        assert ris.accepted_at is not None and ris.accepted_at - ris.created_at < 5.0
        # The drips: each attempt ends at its 2 s deadline (bounded generously here).
        assert wait_for(lambda: all(d.state == "retry" for d in store.deliveries("job-1")
                                    if d.destination != "alert:ris"), 15)  # fmt: skip
        for d in store.deliveries("job-1"):
            if d.destination != "alert:ris":
                assert "deadline" in d.reason, d.reason
                assert d.updated_at - started < 8.0
        assert hook.arrived and mail.connections >= 1
        assert sender.stop(5.0)
        store.close()
    finally:
        hook.close()
        mail.close()
        mllp.close()


def test_transport_deadlines_hold_for_byte_a_second_peers(
    tmp_path: Path, ca: CertAuthority
) -> None:
    from ich_node.delivery.outbox import target_of

    hook, mail = DripServer("https", ca, interval=0.5), DripServer("smtp", interval=0.5)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    try:
        config = _config(tmp_path, [
            {"name": "oncall", "kind": "webhook", "url": hook.url, "secret_file": str(secret),
             "ca_file": str(ca.ca), "timeout_seconds": 1.5},
            {"name": "neuro", "kind": "email", "host": "127.0.0.1", "port": mail.port,
             "starttls": False, "from": "ich@x.org", "to": ["n@x.org"], "timeout_seconds": 1.5},
        ])  # fmt: skip
        store = Store.open(config.storage.dir)
        _record(store, config)
        for name in ("oncall", "neuro"):
            target = target_of(ALERT_PREFIX + name, config.notifications)
            t = time.monotonic()
            with pytest.raises(AlertFailed) as info:
                send_alert(config.storage.dir, target, "job-1")
            assert "deadline" in str(info.value) and not info.value.permanent
            assert time.monotonic() - t < 6.0  # 1.5 s, never the drip's whole length
        store.close()
    finally:
        hook.close()
        mail.close()
    assert webhook.post and email_alert.send_email  # the transports under test


class _FlakyStore:
    """The real store, whose ``method`` raises a database error on its ``nth`` call.

    A test double for the database error alone: every other call, and every peer, is real.
    """

    def __init__(self, store: Any, method: str, nth: int, error: type[Exception]) -> None:
        self._store, self._method, self._nth, self._error = store, method, nth, error
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if name != self._method:
            return real

        def flaky(*args: Any, **kw: Any) -> Any:
            self.calls += 1
            if self.calls == self._nth:
                raise self._error("injected: the database went away for a moment")
            return real(*args, **kw)

        return flaky


@pytest.mark.parametrize("method", ["claim_delivery", "finish_delivery"])
def test_an_error_between_claims_strands_no_alert(
    tmp_path: Path, open_store: Callable[[Path], Any], storage_section: Callable[..., Any],
    backend: str, method: str,
) -> None:  # fmt: skip
    servers = [MLLPServer("AA") for _ in range(3)]
    try:
        section = storage_section(tmp_path / "node")
        config = _config(tmp_path, [_hl7(f"ris{i}", s.port) for i, s in enumerate(servers)],
                         database=section.database)  # fmt: skip
        store = open_store(config.storage.dir)
        _record(store, config)
        error: type[Exception] = sqlite3.OperationalError
        if backend == "postgresql":
            import psycopg

            error = psycopg.OperationalError
        flaky = _FlakyStore(store, method, 2, error)
        store.heartbeat("serve-test", 1, time.time())
        sender = _sender(config, flaky, holder="serve-test")
        stop = threading.Event()

        def loop() -> None:  # as serve: dispatch every 0.2 s, beat meanwhile
            while not stop.is_set():
                store.heartbeat("serve-test", 1, time.time())
                sender.dispatch(time.time())
                stop.wait(0.2)

        started = time.monotonic()
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: {d.state for d in store.deliveries("job-1")} == {"done"}, 10)
        finally:
            stop.set()
            thread.join(5)
            sender.stop(5.0)
        assert time.monotonic() - started < 10.0
        assert flaky.calls >= 2  # the error happened
        for i, server in enumerate(servers):  # each alert arrived, always under its one key
            keys = {str(m.segment("MSH")(10)) for m in server.messages}
            assert keys == {alert_key("job-1", f"ris{i}")}
    finally:
        for server in servers:
            server.close()


def test_served_node_alerts_beside_drips_and_stops_within_its_bound(
    tmp_path: Path, ca: CertAuthority
) -> None:
    """serve with a byte-a-second webhook and a dripping SMTP server beside an HL7 RIS:
    the RIS has its alert within 5 s; SIGTERM with the drips in flight ends the node
    within 15 s; after the restart the webhook gets the alert under the same key."""
    from benchmarks.common import free_port, random_bundle
    from benchmarks.end_to_end import _send
    from tests.test_alerts_node import ServedNode
    from training.phantom import write_series

    bundle = random_bundle(tmp_path / "model.safetensors", name="drip test model",
                           thresholds=dict.fromkeys(LABELS, 0.01))  # fmt: skip
    hook, mail, mllp = DripServer("https", ca), DripServer("smtp"), MLLPServer("AA")
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    config = {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port(), "workers": 1},
        "callers": [{"ae_title": "MODALITY"}],
        "series": {"stable_seconds": 0.5, "min_slices": 8},
        "model": {"bundle": str(bundle), "device": "cpu", "batch_size": 8},
        "results": {"heatmaps": "none"},
        "sender": {"max_attempts": 50, "backoff_base_seconds": 0.2, "backoff_max_seconds": 0.5},
        "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 1},
        "notifications": [
            _hl7("ris", mllp.port),
            {"name": "oncall", "kind": "webhook", "url": hook.url, "secret_file": str(secret),
             "ca_file": str(ca.ca), "timeout_seconds": 5.0},
            {"name": "neuro", "kind": "email", "host": "127.0.0.1", "port": mail.port,
             "starttls": False, "from": "ich@x.org", "to": ["n@x.org"], "timeout_seconds": 5.0},
        ],
    }  # fmt: skip
    node = ServedNode(tmp_path, config)
    healthy: WebhookServer | None = None
    try:
        study = write_series(tmp_path / "study", seed=19, subtypes=("subdural",), n_slices=10,
                             matrix=128)  # fmt: skip
        node.start()
        _send(list(study.paths), node.port, nodelay=True, calling="MODALITY")
        assert wait_for(lambda: mllp.messages and hook.arrived and mail.connections, 240)
        store = node.store()
        assert wait_for(lambda: any(a.accepted_at for a in store.alerts()), 30)
        ris = next(a for a in store.alerts() if a.target == "ris")
        assert ris.accepted_at is not None and ris.accepted_at - ris.created_at < 5.0
        # The job is read and written (a worker holding a job gets its own 30 s to finish
        # it); the drips' attempts go on, each cut at its 5 s deadline and tried again.
        assert wait_for(lambda: [j.state for j in store.jobs()] == ["done"], 120)
        (job,) = store.jobs()
        seen = hook.connections
        assert wait_for(lambda: hook.connections > seen, 30)  # a new attempt in flight
        assert node.process is not None
        node.process.terminate()  # SIGTERM with the drips' attempts in flight
        t = time.monotonic()
        node.process.wait(60)
        stopped_in = time.monotonic() - t
        node.process = None
        assert stopped_in < 15.0, stopped_in  # SENDER_STOP_SECONDS and the rest (docs/admin.md)
        assert '"delivery.interrupted"' in node.log() or '"alert.finished"' in node.log()
        states = {d.destination: d for d in store.deliveries(job.job_id)}
        assert states["alert:ris"].state == "done"
        assert states["alert:oncall"].state in ("pending", "retry")  # never parked, never lost
        hook.close()
        healthy = WebhookServer(ca, SECRET, port=hook.port)
        node.start()
        assert wait_for(
            lambda: (
                {d.destination: d.state for d in store.deliveries(job.job_id)}["alert:oncall"]
                == "done"
            ),
            60,
        ), node.log()[-3000:]
        keys = {h["Idempotency-Key"] for h, _ in healthy.received}
        assert keys == {alert_key(job.job_id, "oncall")}
        assert f"Idempotency-Key: {alert_key(job.job_id, 'oncall')}".encode() in hook.arrived[0]
        assert [str(m.segment("MSH")(10)) for m in mllp.messages] == [alert_key(job.job_id, "ris")]
        store.close()
    finally:
        node.stop()
        hook.close()
        mail.close()
        mllp.close()
        if healthy is not None:
            healthy.close()
