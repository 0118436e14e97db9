"""HL7 v2.5.1 ORU^R01 alerts to a RIS or worklist, over MLLP (python-hl7).

The message is built and the ACK parsed with the ``hl7`` package, and MLLP
framing is its asyncio stream pair (:func:`hl7.mllp.open_hl7_connection`), which
reads a whole block however the bytes arrive; nothing here frames or splits by
hand. Segments (HL7 v2.5.1 ch. 7, ORU_R01):

- ``MSH`` sending/receiving application and facility from the config; MSH-10
  (message control ID) is the alert's idempotency key; MSH-18 ``UNICODE UTF-8``;
- ``PID`` the patient identifiers of the source (PID-3 ID^^^issuer, PID-5, -7, -8);
- ``ORC``/``OBR`` the AccessionNumber as placer and filler order number, the
  priority (ORC-7/OBR-27 TQ component 6, and TQ1-9): ``priority_positive`` on a
  positive result, R otherwise; OBR-25 result status F, or C for a correction;
- ``NTE`` the notice ("AI result for triage support, not a diagnosis") with model
  name and version;
- ``OBX`` the Study Instance UID, then one per label, coded as in the SR (SNOMED CT
  where certain), with the label's name as the text people read (OBX-3.2,
  :data:`ich_node.labels.LABEL_NAMES`: "Intraparenchymal hemorrhage" for SNOMED CT
  274100004, whose meaning is "Cerebral hemorrhage"), value type NM, the probability,
  abnormal flag A when positive.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import hl7
from hl7.mllp import open_hl7_connection

from ich_node.config import HL7Target
from ich_node.delivery.alerts import Alert, AlertFailed
from ich_node.labels import LABEL_NAMES

#: DICOM code for the Study Instance UID observation (PS3.16 CID 7010 / IHE RAD-28).
STUDY_UID_CODE: Final = ("110180", "Study Instance UID", "DCM")
#: The universal service of OBR-4: LOINC CT Head (as the SR's procedure code).
SERVICE_CODE: Final = ("24725-4", "CT Head", "LN")

_ESC: Final = hl7.parse("MSH|^~\\&|")


def _hl7_time(epoch: float) -> str:
    return time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(epoch))


def _field(*components: str) -> str:
    """One field of escaped components (``^``-separated)."""
    return "^".join(_ESC.escape(c) for c in components).rstrip("^")


def _pn(name: str) -> str:
    # DICOM PN components (family^given^middle^prefix^suffix) map one to one onto
    # HL7 XPN's first five; each component is escaped on its own.
    return _field(*name.split("=")[0].split("^")[:5])


def _segment(name: str, *fields: str) -> str:
    return "|".join((name, *fields))


def build_oru(alert: Alert, target: HL7Target) -> hl7.Message:
    """The ORU^R01 (v2.5.1) of an alert, parsed back into an :class:`hl7.Message`."""
    now = _hl7_time(alert.result_time)
    priority = target.priority_positive if alert.positive else "R"
    tq = "^^^^^" + priority
    accession = _field(alert.accession_number)
    patient = alert.patient
    segments = [
        "MSH|^~\\&|"
        + "|".join(
            (
                _field(target.sending_application),
                _field(target.sending_facility),
                _field(target.receiving_application),
                _field(target.receiving_facility),
                now,
                "",
                "ORU^R01^ORU_R01",
                alert.key,
                "P",
                "2.5.1",
                *([""] * 5),  # MSH-13..17
                "UNICODE UTF-8",  # MSH-18 (HL7 table 0211): names keep their accents
            )
        ),
        _segment(
            "PID",
            "1",
            "",
            _field(patient.id, "", "", patient.issuer),
            "",
            _pn(patient.name),
            "",
            _field(patient.birth_date),
            _field(patient.sex),
        ),
        _segment("ORC", "RE", accession, accession, "", "CM", "", tq),
        _segment(
            "OBR",
            "1",
            accession,
            accession,
            _field(*SERVICE_CODE),
            "",
            "",
            now,
            *([""] * 14),  # OBR-8..21
            now,  # OBR-22 results report/status change
            "",
            "",  # OBR-24 diagnostic service section
            alert.status,  # OBR-25 result status
            "",
            tq,  # OBR-27 quantity/timing: priority
        ),
        _segment("TQ1", "1", *([""] * 7), priority),
        _segment(
            "NTE",
            "1",
            "L",
            _field(f"{alert.notice} Model: {alert.model_name} {alert.model_version}."),
        ),
        _segment(
            "OBX",
            "1",
            "ST",
            _field(*STUDY_UID_CODE),
            "",
            _field(alert.study_instance_uid),
            *([""] * 5),
            alert.status,
        ),
    ]
    for i, f in enumerate(alert.findings, start=2):
        segments.append(
            _segment(
                "OBX",
                str(i),
                "NM",
                # CWE: code, the text a RIS shows (the label, as in the SR's summary
                # and the tables), coding system.
                _field(f.code_value, LABEL_NAMES.get(f.label, f.meaning), f.coding_scheme),
                "",
                f"{f.probability:.4f}",
                _field("{probability}", "probability", "UCUM"),
                "",
                "A" if f.positive else "N",
                "",
                "",
                alert.status,  # OBX-11 observation result status
                "",
                "",
                now,  # OBX-14 date/time of the observation
            )
        )
    return hl7.parse("\r".join(segments))


def _field_of(message: hl7.Message, segment: str, index: int) -> str:
    """Field ``index`` of the first ``segment``, unescaped; "" when absent."""
    try:
        return str(message.unescape(str(message.segment(segment)(index))))
    except (KeyError, IndexError):
        return ""


async def _exchange(message: hl7.Message, host: str, port: int, timeout: float) -> hl7.Message:
    reader, writer = await asyncio.wait_for(
        open_hl7_connection(host, port, encoding="utf-8"), timeout
    )
    try:
        writer.writemessage(message)
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), timeout)
    finally:
        writer.close()


def send_oru(alert: Alert, target: HL7Target) -> str:
    """Send the ORU^R01 over MLLP and wait for its ACK; returns the ACK code (AA or CA).

    Raises
    ------
    AlertFailed
        No connection, no ACK within ``timeout_seconds`` (retried); ``AR``/``CR``
        (a reject: the receiver could not take it now, retried); ``AE``/``CE``
        (an error in the message: ``permanent``, parked with the ACK's text).
    """
    message = build_oru(alert, target)
    try:
        ack = asyncio.run(_exchange(message, target.host, target.port, target.timeout_seconds))
    except TimeoutError:
        raise AlertFailed(
            f"no ACK from {target.name} within {target.timeout_seconds:g} s"
        ) from None
    except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
        raise AlertFailed(f"MLLP to {target.name}: {type(exc).__name__}: {exc}") from None
    code, control = _field_of(ack, "MSA", 1), _field_of(ack, "MSA", 2)
    if not code:
        raise AlertFailed(f"{target.name} answered without an MSA segment")
    # MSA-3 (text message; deprecated in 2.5.1 but still sent) or ERR-8 (user message).
    text = _field_of(ack, "MSA", 3) or _field_of(ack, "ERR", 8)
    if control != alert.key:
        raise AlertFailed(f"{target.name} acknowledged control ID {control!r}, not this message")
    if code in ("AA", "CA"):
        return code
    raise AlertFailed(
        f"{target.name} answered {code}", permanent=code in ("AE", "CE"), detail=text[:400]
    )
