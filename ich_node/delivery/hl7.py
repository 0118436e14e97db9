"""HL7 v2.5.1 ORU^R01 alerts to a RIS or worklist, over MLLP (python-hl7).

The message is built and the ACK parsed with the ``hl7`` package, and MLLP
framing is its asyncio stream pair (:func:`hl7.mllp.open_hl7_connection`), which
reads a whole block however the bytes arrive. What python-hl7 could not do is
done here, before its parser runs (:func:`decode_ack`): decode the ACK by its
MSH-18 (its reader decodes with one fixed encoding, and a Latin-1 ACK without
MSH-18 raised ``UnicodeDecodeError``) and accept LF and CR LF segment ends (its
parser splits on CR only, so a Mirth-style ACK read as one MSH without MSA).
The whole exchange, connect included, has one deadline (``timeout_seconds``).
Segments (HL7 v2.5.1 ch. 7, ORU_R01):

- ``MSH`` sending/receiving application and facility from the config; MSH-10
  (message control ID) is the alert's idempotency key; MSH-18 ``UNICODE UTF-8``;
- ``PID`` the patient identifiers of the source (PID-3 ID^^^issuer, PID-5, -7, -8);
- ``ORC``/``OBR`` the AccessionNumber as placer and filler order number, the
  priority (ORC-7/OBR-27 TQ component 6, and TQ1-9): ``priority_positive`` on a
  positive result, R otherwise; OBR-25 result status F, C for a correction, P for
  a preliminary result (sent while the series was still arriving);
- ``NTE`` the notice ("AI result for triage support, not a diagnosis") with model
  name and version; a second ``NTE`` the thresholds in use and their source (the
  model bundle, or the site's ``model.thresholds``);
  a preliminary result's third NTE says how many slices it rests on and that
  the series was still arriving;
- ``OBX`` the Study Instance UID, then one per label, coded as in the SR (SNOMED CT
  where certain), with the label's name as the text people read (OBX-3.2,
  :data:`ich_node.labels.LABEL_NAMES`: "Intraparenchymal hemorrhage" for SNOMED CT
  274100004, whose meaning is "Cerebral hemorrhage"), value type NM, the probability,
  abnormal flag A when positive.
"""

from __future__ import annotations

import asyncio
import codecs
import re
import time
from typing import Final

import hl7
from hl7.mllp import open_hl7_connection

from ich_node.config import HL7Target
from ich_node.delivery.alerts import Alert, AlertFailed, preliminary_text, thresholds_line
from ich_node.delivery.deadline import Deadline
from ich_node.labels import LABEL_NAMES
from ich_node.log import scrub_peer_text

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
        # The operating point in use and its source (bundle or site configuration).
        _segment("NTE", "2", "L", _field(thresholds_line(alert))),
        *(
            [_segment("NTE", "3", "L", _field(preliminary_text(alert)))]
            if alert.status == "P"
            else []
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


#: HL7 table 0211 (character sets, MSH-18) -> Python codec. A name not listed is
#: tried as a codec name, then the ACK falls back to ISO 8859-1.
CHARSETS: Final = {
    "ASCII": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "UNICODE": "utf-8",
    "ISO IR87": "iso2022_jp",
    "KS X 1001": "euc_kr",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
}


def _msh18(block: bytes) -> str:
    """MSH-18 of a raw message, read from the bytes (ASCII) before decoding."""
    first = block.lstrip().split(b"\r")[0].split(b"\n")[0]
    if not first.startswith(b"MSH") or len(first) < 4:
        return ""
    fields = first.split(first[3:4])  # MSH-1, the field separator, is byte 4
    # fields[0] is "MSH", fields[1] MSH-2: MSH-n is fields[n - 1].
    return fields[17].decode("ascii", "replace").split("^")[0].strip() if len(fields) > 17 else ""


def decode_ack(block: bytes) -> tuple[hl7.Message, str]:
    """Parse an acknowledgement as RIS and engines send it; returns it and its charset.

    python-hl7's parser takes text whose segments end in CR only, and its MLLP reader
    decodes with one fixed encoding; neither copes with what receivers send. So the
    bytes are decoded by MSH-18 (HL7 table 0211), with ISO 8859-1 when MSH-18 names
    no known charset or the bytes are not valid in it (every byte is valid there);
    an empty MSH-18 is read as UTF-8 when the bytes are valid UTF-8 (ASCII is), else
    as ISO 8859-1; a UTF-8 byte order mark before MSH means UTF-8 and is dropped.
    Segments ending in CR, LF or CR LF all become CR, then :func:`hl7.parse` reads it.

    Raises
    ------
    hl7.exceptions.ParseException, ValueError
        When the text is no HL7 message.
    """
    # A UTF-8 byte order mark before MSH (engines on .NET and Windows send one): the
    # text is UTF-8 whatever MSH-18 says, and the mark is no part of the segment ID.
    bom = block.lstrip(b" \t\r\n\x0b").startswith(codecs.BOM_UTF8)
    if bom:
        block = block.lstrip(b" \t\r\n\x0b")[len(codecs.BOM_UTF8) :]
    named = _msh18(block)
    codec = "utf-8" if bom else CHARSETS.get(named.upper(), named) if named else "utf-8"
    try:
        text = block.decode(codec)
    except (LookupError, UnicodeDecodeError):
        codec = "iso8859-1"
        text = block.decode(codec)
    # Any mix of CR and LF ends a segment (CR, LF, CR LF, LF CR); blank lines and MLLP
    # framing bytes left by a sloppy sender are dropped.
    lines = (line.strip("\x00\x0b\x1c") for line in re.split(r"[\r\n]+", text))
    return hl7.parse("\r".join(line for line in lines if line.strip())), codec


async def _exchange(message: hl7.Message, target: HL7Target, deadline: Deadline) -> bytes:
    """Send ``message`` and return the raw ACK block; the whole within ``deadline``."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    # The node stopping, or the deadline's timer, cancels the exchange from its thread.
    deadline.on_cut(lambda: loop.call_soon_threadsafe(task.cancel))

    async def talk() -> bytes:
        reader, writer = await open_hl7_connection(target.host, target.port, encoding="utf-8")
        try:
            writer.writemessage(message)
            await writer.drain()
            block: bytes = await reader.readblock()
            return block
        finally:
            writer.close()

    return await asyncio.wait_for(talk(), deadline.left())


def send_oru(alert: Alert, target: HL7Target, deadline: Deadline | None = None) -> str:
    """Send the ORU^R01 over MLLP and wait for its ACK; returns the ACK code (AA or CA).

    HL7 v2.5.1 (2.9, table 0008): AA/CA accept; AE/CE (an error while processing)
    are retried; AR/CR (a reject: the message will not be taken as it is) are
    ``permanent`` and parked with the ACK's text (MSA-3, else ERR-8), scrubbed of
    the alert's patient values and cut (:func:`ich_node.log.scrub_peer_text`). An
    ACK whose MSA-2 names another control ID is not this message's: retried.

    Raises
    ------
    AlertFailed
        No connection, no ACK within ``timeout_seconds`` (the whole exchange),
        an unreadable ACK, a wrong control ID, AE/CE (retried); AR/CR (``permanent``).
    """
    message = build_oru(alert, target)
    own = deadline is None
    deadline = deadline or Deadline(target.timeout_seconds)
    try:
        block = asyncio.run(_exchange(message, target, deadline))
    except (TimeoutError, asyncio.CancelledError):
        if deadline.stopped:
            raise AlertFailed(f"MLLP to {target.name}: {deadline.reason()}") from None
        raise AlertFailed(
            f"no ACK from {target.name} within {target.timeout_seconds:g} s"
        ) from None
    except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
        raise AlertFailed(f"MLLP to {target.name}: {type(exc).__name__}: {exc}") from None
    finally:
        if own:
            deadline.close()
    try:
        ack, _ = decode_ack(block)
    except Exception as exc:  # python-hl7 raises several kinds on text that is no HL7
        raise AlertFailed(
            f"{target.name} answered with no readable HL7 ({type(exc).__name__})",
            detail=scrub_peer_text(block.decode("iso8859-1")),
        ) from None
    code, control = _field_of(ack, "MSA", 1).upper(), _field_of(ack, "MSA", 2)
    if not code:
        raise AlertFailed(f"{target.name} answered without an MSA segment")
    # MSA-3 (text message; deprecated in 2.5.1 but still sent) or ERR-8 (user message).
    text = scrub_peer_text(_field_of(ack, "MSA", 3) or _field_of(ack, "ERR", 8))
    if control != alert.key:
        raise AlertFailed(
            f"{target.name} acknowledged control ID {scrub_peer_text(control, 40)!r}, "
            "not this message"
        )
    if code in ("AA", "CA"):
        return code
    if code not in ("AE", "CE", "AR", "CR"):
        raise AlertFailed(f"{target.name} answered MSA-1 {scrub_peer_text(code, 8)!r}")
    reject = code in ("AR", "CR")
    raise AlertFailed(
        f"{target.name} answered {code} ({'reject' if reject else 'error'})",
        permanent=reject,
        detail=text,
    )
