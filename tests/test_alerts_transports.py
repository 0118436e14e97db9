"""Alert messages and their transports, against real servers on 127.0.0.1."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import hl7
import numpy as np
import pydicom
import pytest
from PIL import Image

from ich_node.config import EmailTarget, HL7Target, WebhookTarget, parse_config
from ich_node.delivery import email as email_alert
from ich_node.delivery import hl7 as hl7_alert
from ich_node.delivery import webhook
from ich_node.delivery.alerts import (
    Alert,
    AlertFailed,
    Previous,
    alert_key,
    decide,
    key_image_png,
    make_alert,
)
from ich_node.delivery.outbox import alert_phi
from ich_node.labels import LABEL_NAMES, LABELS
from ich_node.log import handling_phi
from ich_node.results.findings import LabelFinding, ModelInfo, SeriesFindings, SliceFinding
from ich_node.results.sr import FINDING_CODES
from tests.alert_servers import CertAuthority, MLLPServer, SMTPServer, WebhookServer, make_ca

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-778899"
BIRTH_DATE = "19500101"
SECRET = b"webhook-secret-123"


def _findings(positive: dict[str, float]) -> SeriesFindings:
    probs = {label: positive.get(label, 0.02) for label in LABELS}
    series = {label: LabelFinding(p, p >= 0.5, 0.5) for label, p in probs.items()}
    slices = tuple(
        SliceFinding(f"1.2.3.4.{i}", float(i * 5), {k: v * (i == 3) for k, v in probs.items()})
        for i in range(6)
    )
    return SeriesFindings(
        "1.2.826.0.1.3680043.8.498.1",
        "1.2.826.0.1.3680043.8.498.2",
        ModelInfo("ich-test", "1.0.0", "resnet18", "ab" * 32, True),
        series,
        slices,
    )


def _header() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC123"
    return ds


def _alert(target: HL7Target | WebhookTarget | EmailTarget, **kw: object) -> Alert:
    findings = _findings(kw.pop("probs", {"any": 0.97, "subdural": 0.91}))  # type: ignore[arg-type]
    args = {"status": "F", "supersedes": None} | kw
    return make_alert(
        findings,
        _header(),
        target,
        job_id="job-1",
        version=1,
        result_time=1_800_000_000.0,
        last_received_at=1_799_999_990.0,
        **args,  # type: ignore[arg-type]
    )


def _hl7_target(port: int, **kw: object) -> HL7Target:
    data = {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": port,
            "sending_facility": "NEURO", "receiving_application": "RIS",
            "receiving_facility": "HOSP", "timeout_seconds": 2.0} | kw  # fmt: skip
    target = parse_config({"notifications": [data]}).notifications[0]
    assert isinstance(target, HL7Target)
    return target


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return make_ca(tmp_path_factory.mktemp("ca"))


# -- decisions -------------------------------------------------------------------


def test_decide_one_alert_per_answer_and_corrections() -> None:
    target = _hl7_target(1)
    always = _hl7_target(1, when="always")
    assert decide(target, ("any", "subdural"), None) == "F"
    assert decide(target, (), None) is None
    assert decide(always, (), None) == "F"
    same = Previous("k1", ("any", "subdural"))
    assert decide(target, ("any", "subdural"), same) is None
    assert decide(target, ("any",), same) == "C"
    assert decide(target, (), same) == "C"  # positive, then negative: a correction


def test_labels_choose_what_fires() -> None:
    sdh_only = _hl7_target(1, labels=["epidural"])
    alert = _alert(sdh_only)
    assert alert.positive is False and alert.positive_labels == ()
    assert alert.key == alert_key("job-1", "ris")
    assert Alert.from_json(alert.to_json()) == alert


# -- HL7 -------------------------------------------------------------------------


def test_oru_content_parsed_back() -> None:
    target = _hl7_target(1)
    message = hl7_alert.build_oru(_alert(target), target)
    again = hl7.parse(str(message))  # what a RIS parses
    msh = again.segment("MSH")
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(12)) == "2.5.1"
    assert [str(msh(i)) for i in (3, 4, 5, 6)] == ["ICH_NODE", "NEURO", "RIS", "HOSP"]
    assert str(msh(10)) == alert_key("job-1", "ris") and str(msh(18)) == "UNICODE UTF-8"
    pid = again.segment("PID")
    assert str(pid(3)(1)(1)) == PATIENT_ID and str(pid(3)(1)(4)) == "HOSP"
    assert str(pid(5)) == PATIENT_NAME and str(pid(7)) == BIRTH_DATE
    orc, obr = again.segment("ORC"), again.segment("OBR")
    assert str(orc(2)) == "ACC123" and str(obr(2)) == "ACC123" and str(obr(3)) == "ACC123"
    assert str(orc(7)(1)(6)) == "S" and str(obr(27)(1)(6)) == "S"
    assert str(again.segment("TQ1")(9)) == "S"
    assert str(obr(25)) == "F"
    obx = again.segments("OBX")
    assert str(obx[0](5)) == "1.2.826.0.1.3680043.8.498.1"
    by_code = {str(o(3)(1)(1)): o for o in obx[1:]}
    assert len(by_code) == 6
    sdh = by_code["35486000"]  # SNOMED CT subdural hemorrhage, as in the SR
    assert str(sdh(3)(1)(3)) == "SCT" and float(str(sdh(5))) == pytest.approx(0.91)
    assert str(sdh(8)) == "A" and str(sdh(11)) == "F"
    assert str(by_code["EDH"](8)) == "N"
    # The text people read names the project's label (as the SR summary and the
    # tables do), while the code stays SNOMED CT's: 274100004 means "Cerebral hemorrhage".
    for o in obx[1:]:
        code, text, scheme = (str(o(3)(1)(k)) for k in (1, 2, 3))
        label = next(f.label for f in _alert(target).findings if f.code_value == code)
        assert (code, scheme) == (
            FINDING_CODES[label].value,
            FINDING_CODES[label].scheme_designator,
        )
        assert text == LABEL_NAMES[label] and (label == "any" or label in text.lower())
    assert str(by_code["274100004"](3)(1)(2)) == "Intraparenchymal hemorrhage"
    nte = str(again.segment("NTE")(3))
    assert "not a diagnosis" in nte and "ich-test 1.0.0" in nte


def test_oru_negative_routine_and_correction() -> None:
    target = _hl7_target(1, priority_positive="A")
    pos = hl7.parse(str(hl7_alert.build_oru(_alert(target), target)))
    assert str(pos.segment("ORC")(7)(1)(6)) == "A"
    neg = _alert(target, probs={}, status="C", supersedes="f" * 32)
    message = hl7.parse(str(hl7_alert.build_oru(neg, target)))
    assert str(message.segment("OBR")(25)) == "C"
    assert str(message.segment("ORC")(7)(1)(6)) == "R"
    assert all(str(o(11)) == "C" for o in message.segments("OBX"))


def test_hl7_escapes_delimiters_in_source_values() -> None:
    target = _hl7_target(1)
    header = _header()
    header.AccessionNumber = "A|B^C"
    alert = make_alert(_findings({"any": 0.9}), header, target, job_id="j", version=1,
                       status="F", supersedes=None, result_time=0.0, last_received_at=0.0)  # fmt: skip
    message = hl7.parse(str(hl7_alert.build_oru(alert, target)))
    assert message.unescape(str(message.segment("ORC")(2))) == "A|B^C"


def test_mllp_aa_is_delivered() -> None:
    server = MLLPServer("AA")
    try:
        target = _hl7_target(server.port)
        assert hl7_alert.send_oru(_alert(target), target) == "AA"
        assert len(server.messages) == 1
        assert str(server.messages[0].segment("PID")(3)(1)(1)) == PATIENT_ID
    finally:
        server.close()


def test_mllp_ar_is_parked_with_the_scrubbed_ack_text() -> None:
    """HL7 v2.5.1 AR (reject): permanent, parked with MSA-3, the patient's values replaced."""
    server = MLLPServer("AR", text=f"Unknown accession for {PATIENT_NAME.replace('^', ' ')}")
    try:
        target = _hl7_target(server.port)
        alert = _alert(target)
        with handling_phi(alert_phi(alert)), pytest.raises(AlertFailed) as info:
            hl7_alert.send_oru(alert, target)
        assert info.value.permanent
        assert "AR" in str(info.value) and "Unknown accession" in info.value.recorded
        assert "Unknown accession" not in str(info.value)  # the log line: no peer text
        assert "Doe" not in info.value.recorded and "<PatientName>" in info.value.recorded
    finally:
        server.close()


def test_mllp_ae_and_timeout_and_refused_are_retried(free_port: int) -> None:
    """AE (an error while processing) is retried, as are no answer and no listener."""
    for server in (MLLPServer("AE"), MLLPServer("slow", delay=3.0)):
        try:
            target = _hl7_target(server.port, timeout_seconds=1.0)
            with pytest.raises(AlertFailed) as info:
                hl7_alert.send_oru(_alert(target), target)
            assert not info.value.permanent
        finally:
            server.close()
    with pytest.raises(AlertFailed) as info:
        hl7_alert.send_oru(_alert(_hl7_target(free_port)), _hl7_target(free_port))
    assert not info.value.permanent


# -- webhook ---------------------------------------------------------------------


def _webhook_target(
    tmp_path: Path, url: str, ca: CertAuthority | None, **kw: object
) -> WebhookTarget:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    data = {"name": "pager", "kind": "webhook", "url": url, "secret_file": str(secret),
            "timeout_seconds": 3.0} | kw  # fmt: skip
    if ca is not None:
        data["ca_file"] = str(ca.ca)
    target = parse_config({"notifications": [data]}).notifications[0]
    assert isinstance(target, WebhookTarget)
    return target


def test_webhook_signed_verified_and_without_phi(tmp_path: Path, ca: CertAuthority) -> None:
    server = WebhookServer(ca, SECRET)
    try:
        target = _webhook_target(tmp_path, server.url, ca)
        alert = _alert(target, status="C", supersedes="e" * 32)
        assert webhook.post(alert, target) == 200
        assert server.bad_signatures == 0 and len(server.received) == 1
        headers, raw = server.received[0]
        assert headers["Idempotency-Key"] == alert.key
        body = json.loads(raw)
        assert body["idempotency_key"] == alert.key and body["supersedes"] == "e" * 32
        assert body["accession_number"] == "ACC123" and body["positive"] is True
        assert body["study_instance_uid"] == alert.study_instance_uid
        assert body["model"] == {"name": "ich-test", "version": "1.0.0", "demo": True}
        assert "not a diagnosis" in body["notice"]
        probs = {f["label"]: f["probability"] for f in body["findings"]}
        assert probs["subdural"] == pytest.approx(0.91)
        text = raw.decode()
        for phi in ("Doe", "Jane", PATIENT_ID, BIRTH_DATE):
            assert phi not in text
    finally:
        server.close()


def test_webhook_include_patient(tmp_path: Path, ca: CertAuthority) -> None:
    server = WebhookServer(ca, SECRET)
    try:
        target = _webhook_target(tmp_path, server.url, ca, include_patient=True)
        webhook.post(_alert(target), target)
        patient = server.bodies()[0]["patient"]
        assert (patient["id"], patient["name"], patient["birth_date"]) == (
            PATIENT_ID, PATIENT_NAME, BIRTH_DATE)  # fmt: skip
    finally:
        server.close()


def test_webhook_tls_is_verified_and_errors_classified(tmp_path: Path, ca: CertAuthority) -> None:
    server = WebhookServer(ca, SECRET)
    try:
        untrusted = _webhook_target(tmp_path, server.url, None)  # the test CA not trusted
        with pytest.raises(AlertFailed) as info:
            webhook.post(_alert(untrusted), untrusted)
        assert not info.value.permanent and "SSL" in str(info.value)
        assert server.received == []
        target = _webhook_target(tmp_path, server.url, ca)
        server.status = 503
        with pytest.raises(AlertFailed) as info:
            webhook.post(_alert(target), target)
        assert not info.value.permanent
        server.status = 400
        with pytest.raises(AlertFailed) as info:
            webhook.post(_alert(target), target)
        assert info.value.permanent and "HTTP 400" in str(info.value)
        server.status = 302  # not followed: a GET without the body would "deliver" nothing
        with pytest.raises(AlertFailed) as info:
            webhook.post(_alert(target), target)
        assert info.value.permanent and "HTTP 302" in str(info.value)
        wrong = tmp_path / "wrong"
        wrong.write_text("other secret")
        bad = target.model_copy(update={"secret_file": wrong})
        server.status = 200
        with pytest.raises(AlertFailed) as info:  # the server refuses the signature
            webhook.post(_alert(bad), bad)
        assert server.bad_signatures == 1 and info.value.permanent
    finally:
        server.close()


def test_webhook_retry_after_is_read_in_both_forms(tmp_path: Path, ca: CertAuthority) -> None:
    """429 and 503 with Retry-After (RFC 9110 10.2.3, RFC 6585): delay-seconds or an
    HTTP-date, given to the sender as ``retry_after``; none when absent or unreadable."""
    import email.utils
    import time

    server = WebhookServer(ca, SECRET)
    try:
        target = _webhook_target(tmp_path, server.url, ca)
        server.status, server.headers = 429, {"Retry-After": "120"}
        with pytest.raises(AlertFailed) as info:
            webhook.post(_alert(target), target)
        assert not info.value.permanent and info.value.retry_after == 120.0
        assert "HTTP 429, Retry-After 120 s" in str(info.value)
        later = email.utils.formatdate(time.time() + 90, usegmt=True)
        server.status, server.headers = 503, {"Retry-After": later}
        with pytest.raises(AlertFailed) as info:
            webhook.post(_alert(target), target)
        assert info.value.retry_after is not None and 80.0 < info.value.retry_after <= 90.0
        server.headers = {"Retry-After": "soon"}
        with pytest.raises(AlertFailed) as info:
            webhook.post(_alert(target), target)
        assert info.value.retry_after is None and not info.value.permanent
    finally:
        server.close()
    assert webhook.retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0) == 0.0
    assert webhook.retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert webhook.retry_after(" 0 ") == 0.0 and webhook.retry_after("-5") is None


# -- email -----------------------------------------------------------------------


def test_email_starttls_login_and_content(
    tmp_path: Path, ca: CertAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca))  # the system trust, for this test's CA
    server = SMTPServer(ca)
    try:
        creds = tmp_path / "creds"
        creds.write_text("node\ns3cret\n")
        target = parse_config({"notifications": [{
            "name": "mail", "kind": "email", "host": "127.0.0.1", "port": server.port,
            "credentials_file": str(creds), "from": "ich@x.org", "to": ["a@x.org", "b@x.org"],
            "timeout_seconds": 5.0}]}).notifications[0]  # fmt: skip
        assert isinstance(target, EmailTarget)
        hu = np.full((64, 64), -1000, np.float32)
        hu[16:48, 16:48] = 40.0
        png = key_image_png(hu, ["AI result for triage support, not a diagnosis."])
        alert = _alert(target)
        assert email_alert.send_email(alert, target, png) == 0
        assert server.logins == ["node"] and len(server.messages) == 1
        message = server.messages[0]
        subject = str(message["Subject"])
        assert "positive" in subject
        for phi in ("Doe", "Jane", PATIENT_ID, BIRTH_DATE, "ACC123"):
            assert phi not in subject
        assert str(message["Message-ID"]) == f"<{alert.key}@ich-node>"
        text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "not a diagnosis" in text and "subdural: p=0.91" in text
        assert "ich-test 1.0.0" in text
        for phi in ("Doe", "Jane", PATIENT_ID, BIRTH_DATE):
            assert phi not in text
        (attachment,) = list(message.iter_attachments())
        image = Image.open(io.BytesIO(attachment.get_content()))
        assert image.format == "PNG" and max(image.size) == 256
        # The notice is burned in: yellow text pixels in the top rows.
        rgb = np.asarray(image.convert("RGB"))
        assert ((rgb[:20, :, 0] > 200) & (rgb[:20, :, 2] < 80)).any()
    finally:
        server.close()


def test_email_server_down_is_retried(tmp_path: Path, free_port: int) -> None:
    data = {"name": "mail", "kind": "email", "host": "127.0.0.1", "port": free_port,
            "from": "ich@x.org", "to": ["a@x.org"], "timeout_seconds": 2.0}  # fmt: skip
    target = parse_config({"notifications": [data]}).notifications[0]
    assert isinstance(target, EmailTarget)
    with pytest.raises(AlertFailed) as info:
        email_alert.send_email(_alert(target), target, None)
    assert not info.value.permanent
    missing = target.model_copy(update={"credentials_file": tmp_path / "absent"})
    with pytest.raises(AlertFailed) as info:
        email_alert.send_email(_alert(missing), missing, None)
    assert info.value.permanent and "credentials_file" in str(info.value)


def test_delivery_imports_no_torch() -> None:
    """The sender (serving process) imports delivery/: it must not pull in torch."""
    code = (
        "import sys\n"
        "import ich_node.delivery.alerts, ich_node.delivery.hl7\n"
        "import ich_node.delivery.webhook, ich_node.delivery.email\n"
        "bad = ['torch', 'torchvision', 'pytorch_grad_cam', 'ich_node.model.networks',\n"
        "       'ich_node.model.inference', 'ich_node.model.explain']\n"
        "print(sorted(m for m in bad if m in sys.modules))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert run.stdout.strip() == "[]", run.stdout + run.stderr


def test_ack_charset_follows_msh18_and_falls_back_to_latin1() -> None:
    """MSH-18 names the charset (HL7 table 0211); empty: UTF-8 when valid, else ISO 8859-1;
    a UTF-8 byte order mark means UTF-8."""
    ack = "MSH|^~\\&|RIS|H|N|N|20260101||ACK|1|P|2.5.1||||||{}\rMSA|AE|k|Preis {}\r"
    cases = [
        (ack.format("8859/15", "10 €").encode("iso8859-15"), "10 €", "iso8859-15"),
        (ack.format("", "10 €").encode("utf-8"), "10 €", "utf-8"),
        (ack.format("", "10 é").encode("iso8859-1"), "10 é", "iso8859-1"),
        (ack.format("UNICODE UTF-8", "10 é").encode("iso8859-1"), "10 é", "iso8859-1"),
        (ack.format("NO-SUCH-SET", "10 é").encode("iso8859-1"), "10 é", "iso8859-1"),
        # A UTF-8 byte order mark before MSH: UTF-8, whatever MSH-18 says; not in the ID.
        (ack.format("", "10 €").encode("utf-8-sig"), "10 €", "utf-8"),
        (ack.format("8859/1", "10 é").encode("utf-8-sig"), "10 é", "utf-8"),
        (b"\x0b" + ack.format("", "10 é").encode("utf-8-sig"), "10 é", "utf-8"),
    ]
    for raw, text, codec in cases:
        for end in (b"\r", b"\n", b"\r\n", b"\n\r", b"\r\r\n"):
            message, used = hl7_alert.decode_ack(raw.replace(b"\r", end))
            assert used == codec
            assert str(message.segment("MSA")(3)) == f"Preis {text}"
            assert str(message.segment("MSA")(1)) == "AE"
