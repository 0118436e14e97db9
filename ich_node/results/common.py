"""What every output shares: the copied patient and study attributes, the equipment.

Text and VR hygiene (:func:`study_attributes`): every output declares the source's
Specific Character Set (0008,0005) and carries each copied value exactly as the
source has it. Each copied value is first checked against its VR (PS3.5 6.2), its
enumerated values and the declared character set; one that fails is sent empty
when the attribute is Type 2 and left out when it is Type 3, and the log names
the keyword, never the value (it may be PHI). So no value in a source header can
stop the results.

Also the geometry that maps a model-input-sized map back onto a source slice,
used by the heatmap images (:mod:`ich_node.results.sc`) and the parametric map
(:mod:`ich_node.results.pm`).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import highdicom as hd
import numpy as np
import pydicom
import structlog
from PIL import Image
from pydicom import config as pydicom_config
from pydicom.charset import decode_bytes, encode_string, python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code
from pydicom.valuerep import PersonName, validate_value

from ich_node.card import ModelCard
from ich_node.imaging import CTSeries
from ich_node.imaging.files import read_dataset
from ich_node.imaging.records import LossyCompression
from ich_node.results.findings import OutputTime

MANUFACTURER: Final = "ich-node"
#: PS3.16 CID 7005 "Contributing Equipment Purposes of Reference": DCM 109103.
PROCESSING_ALGORITHM: Final = Code("109103", "DCM", "Processing Algorithm")

#: The patient and study attributes copied from the source into every output
#: (Patient and General Study modules, PS3.3 C.7.1.1 and C.7.2.1); nothing else of
#: the patient is copied.
STUDY_KEYWORDS: Final[tuple[str, ...]] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
#: Equipment of the source, kept so the SR's Contributing Equipment names the scanner.
EQUIPMENT_KEYWORDS: Final[tuple[str, ...]] = ("Manufacturer", "ManufacturerModelName")
#: Type of each copied attribute in the outputs (PS3.3 C.7.1.1, C.7.2.1): an invalid
#: Type 2 value is sent empty, an invalid Type 3 value is left out. StudyInstanceUID
#: (Type 1) is checked with the other source UIDs and is never copied invalid.
COPIED_TYPE: Final[dict[str, int]] = {
    **dict.fromkeys(STUDY_KEYWORDS, 2),
    "StudyInstanceUID": 1,
    **dict.fromkeys(EQUIPMENT_KEYWORDS, 3),
}
#: Enumerated values (PS3.3 C.7.1.1: Patient's Sex is M, F or O).
ENUMERATED: Final[dict[str, frozenset[str]]] = {"PatientSex": frozenset({"M", "F", "O"})}

log = structlog.get_logger(__name__)


def _fix_pydicom_iso_ir_58() -> None:
    """Make pydicom read and write ISO 2022 IR 58 with its escape sequence (PS3.5 J.3).

    pydicom 3.0 counts ``iso_ir_58`` among the codecs that handle their own ISO
    2022 escape sequences, but Python's (GB2312, EUC-CN) does not: pydicom writes
    GB2312 bytes without ``ESC $ ) A`` and reads the escape back as text. Treated
    like the other ISO 2022 sets, pydicom adds and strips the escape itself.
    Applied only while the codec cannot read the escape.
    """
    import pydicom.charset as charset

    if (
        "iso_ir_58" in charset.handled_encodings
        and b"\x1b$)A\xd5\xc5".decode("iso_ir_58") != "\u5f20"
    ):
        charset.handled_encodings = tuple(e for e in charset.handled_encodings if e != "iso_ir_58")  # type: ignore[assignment]


_fix_pydicom_iso_ir_58()

_ASCII_VRS: Final = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
_TEXT_VRS: Final = frozenset({"ST", "LT", "UT"})  # may hold CR, LF, FF, TAB and backslash
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


#: TimezoneOffsetFromUTC (0008,0201): "&ZZXX", & being + or - (PS3.3 C.12.1, SOP Common).
_UTC_OFFSET: Final = re.compile(r"^([+-])(\d{2})(\d{2})$")
#: The dates and times an output gets when it is made (the node's, not the source's):
#: SOP Common, General Image/Content, SC Image, General Series.
OUTPUT_DATE_TIMES: Final[tuple[tuple[str, str], ...]] = (
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("ContentDate", "ContentTime"),
    ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ("SeriesDate", "SeriesTime"),
)


def source_utc_offset(header: pydicom.Dataset) -> datetime.timezone | None:
    """The source's TimezoneOffsetFromUTC (0008,0201) as a fixed zone; ``None`` when
    absent or not a valid offset (-12:00 to +14:00, PS3.3 C.12.1, SOP Common)."""
    match = _UTC_OFFSET.match(str(header.get("TimezoneOffsetFromUTC", "") or "").strip())
    if match is None or int(match[3]) >= 60:
        return None
    delta = datetime.timedelta(hours=int(match[2]), minutes=int(match[3]))
    delta = -delta if match[1] == "-" else delta
    if not datetime.timedelta(hours=-12) <= delta <= datetime.timedelta(hours=14):
        return None
    return datetime.timezone(delta)


def output_time(
    header: pydicom.Dataset,
    node_zone: datetime.tzinfo | None = None,
    node_zone_name: str = "",
    now: datetime.datetime | None = None,
) -> OutputTime:
    """When outputs made ``now`` say they were made, and in which zone.

    The source study's zone when its header has TimezoneOffsetFromUTC; else
    ``node_zone`` (``node.timezone``); else the system's zone.

    Parameters
    ----------
    header : pydicom.Dataset
        The source's first header.
    node_zone : datetime.tzinfo, optional
        The configured ``node.timezone`` (``zoneinfo.ZoneInfo``), named ``node_zone_name``.
    now : datetime.datetime, optional
        Timezone-aware; the current time by default.
    """
    utc = (now or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC)
    offset = source_utc_offset(header)
    if offset is not None:
        return OutputTime(utc.astimezone(offset), "source")
    if node_zone is not None:
        return OutputTime(utc.astimezone(node_zone), "node.timezone", node_zone_name)
    local = utc.astimezone()
    return OutputTime(local, "system", local.tzname() or "")


def stamp_output_time(ds: pydicom.Dataset, time: OutputTime) -> None:
    """Write the output's own dates and times (:data:`OUTPUT_DATE_TIMES`) as ``time``.

    Each pair present in ``ds`` (made by highdicom with the process's clock) is
    replaced, and each ContributionDateTime of the Contributing Equipment;
    TimezoneOffsetFromUTC (0008,0201) names the zone, which also applies to the
    dates and times copied from the source (PS3.3 C.12.1, SOP Common).
    """
    when = time.when
    for date_keyword, time_keyword in OUTPUT_DATE_TIMES:
        if date_keyword in ds:
            setattr(ds, date_keyword, when.strftime("%Y%m%d"))
            setattr(ds, time_keyword, when.strftime("%H%M%S.%f"))
    # When ich-node and highdicom contributed (PS3.3 C.12.1.1.7): now, a DT with its
    # offset (the source's acquisition equipment item carries no time).
    for item in ds.get("ContributingEquipmentSequence", ()):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f%z")
    ds.TimezoneOffsetFromUTC = when.strftime("%z")


def mark_lossy(ds: pydicom.Dataset, lossy: LossyCompression | None) -> None:
    """Say on an output that its source images were lossy-compressed (PS3.3 C.7.6.1.1.5).

    An image derived from lossy-compressed images keeps LossyImageCompression
    "01", with the method(s) and ratio(s) copied when known; the SR says it too,
    since its findings rest on those images. Nothing is set for a lossless source.
    """
    if lossy is None:
        return
    ds.LossyImageCompression = "01"
    if lossy.methods:
        ds.LossyImageCompressionMethod = list(lossy.methods)
        if lossy.ratios:
            ds.LossyImageCompressionRatio = list(lossy.ratios)


def contributing_equipment(card: ModelCard) -> hd.ContributingEquipment:
    """ich-node and its model as the processing algorithm (PS3.3 C.12.1.1.7)."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=PROCESSING_ALGORITHM,
        manufacturer_model_name=card.name[:64],
        software_versions=card.version[:64],
        contribution_description=f"Grad-CAM of {card.display_name}"[:1024],
    )


def cam_to_source(cam: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Map a model-input-sized cam back onto the source slice's pixel grid.

    Undoes :func:`ich_node.imaging.resize`: the slice was centred in a
    ``max(rows, columns)`` square, then resized to the model input size.

    Parameters
    ----------
    cam : numpy.ndarray
        (size, size) float32 in [0, 1].
    rows, columns : int
        Source matrix.

    Returns
    -------
    numpy.ndarray
        (rows, columns) float32 in [0, 1].
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2 or cam.shape[0] != cam.shape[1]:
        raise ValueError(f"cam must have shape (size, size), got {cam.shape}")
    side = max(rows, columns)
    square = np.asarray(Image.fromarray(cam).resize((side, side), Image.Resampling.BILINEAR))
    top, left = (side - rows) // 2, (side - columns) // 2
    return np.clip(square[top : top + rows, left : left + columns], 0.0, 1.0).astype(np.float32)


def source_header(series: CTSeries) -> pydicom.Dataset:
    """The first slice's header, without pixel data (what the outputs copy from).

    Read by :func:`ich_node.imaging.files.read_dataset`, the reader the series was
    read with, so a file the imaging stage accepted (a bare data set without file
    meta, PS3.10 7.1 not followed) is accepted here too.

    Raises
    ------
    ich_node.imaging.files.ImagingError
        When the file is no longer readable DICOM.
    ich_node.imaging.files.StorageUnavailable
        When the operating system cannot read it.
    ValueError
        When the series has no slices.
    """
    if not series.slices:
        raise ValueError("series has no slices")
    return read_dataset(series.slices[0].path, pixels=False)


def character_set(header: pydicom.Dataset) -> tuple[str, ...] | None:
    """The source's Specific Character Set terms, or None when pydicom cannot decode them.

    ``()`` means none declared: the default repertoire (ISO-IR 6, ASCII). A
    declared term pydicom does not know (a typo, a private term) gives ``None``.
    """
    tag = tag_for_keyword("SpecificCharacterSet")
    if tag is None or tag not in header:
        return ()
    value, _ = _decode(header.get_item(tag).value, ["ascii"], "CS")
    if value is None:
        return None
    if isinstance(value, str):
        terms = tuple(t.strip() for t in value.split("\\"))
    else:  # already parsed: a MultiValue of terms
        terms = tuple(str(t).strip() for t in value)
    if not any(terms):
        return ()
    if not all(t in python_encoding for t in terms):
        return None
    return terms


#: VRs whose bytes depend on the character set (PS3.5 6.1.2.3).
_CHARSET_VRS: Final = frozenset({"PN", "SH", "LO", "ST", "LT", "UT", "UC"})


def _decode(value: Any, encodings: Sequence[str], vr: str) -> tuple[Any, Any]:
    """(decoded value to check, value to carry) of one element's value.

    Raw bytes (an element as read from a file) are decoded with ``encodings``;
    for the VRs whose bytes depend on the character set, the value carried is the
    source's bytes themselves (a PN as a PersonName holding them), so the outputs
    hold them unchanged. Undecodable bytes decode to ``None`` (ASCII VRs) or with
    U+FFFD (pydicom's substitute, which :func:`invalid_reason` rejects).
    """
    if not isinstance(value, bytes | bytearray):
        return value, value  # already a value (an element set in code or accessed before)
    raw = bytes(value)
    if vr == "PN":
        name = PersonName(raw, encodings=list(encodings))
        return str(name).rstrip(" \x00"), name
    if vr not in _CHARSET_VRS:
        try:
            text = raw.decode("ascii").strip(" \x00")
        except UnicodeDecodeError:
            return None, None
        return text, text
    # Undecodable bytes: pydicom warns (without the value) and substitutes U+FFFD.
    text = decode_bytes(raw, list(encodings), {0x5C}).rstrip(" \x00")
    if "\ufffd" not in text and encode_string(text, list(encodings)) == raw.rstrip(b" \x00"):
        return text, text  # pydicom writes the very same bytes from the text
    return text, raw


def _python_encodings(terms: tuple[str, ...]) -> list[str]:
    """Python codecs of the declared terms, as pydicom reads and writes them."""
    if not terms:
        return ["ascii"]
    return [python_encoding[t] for t in terms]


def invalid_reason(
    keyword: str, value: Any, terms: tuple[str, ...] | None, *, from_bytes: bool = False
) -> str | None:
    """Why ``value`` may not be copied as ``keyword``, or None when it may.

    Parameters
    ----------
    keyword : str
        A DICOM keyword (its VR comes from the data dictionary).
    value : str or PersonName
        The decoded value (empty is always valid).
    terms : tuple of str or None
        The declared character set (see :func:`character_set`).
    from_bytes : bool
        The value was decoded from the source's bytes and is carried as those
        bytes; otherwise it must come back unchanged from the character set.

    Returns
    -------
    str or None
        A reason that names the rule broken (PS3.5 6.2), never the value.
    """
    vr = dictionary_VR(keyword)
    if value is None:
        return "undecodable bytes"
    if isinstance(value, MultiValue | list | tuple):
        return "more than one value"
    text = str(value)
    if text == "":
        return None
    if "\ufffd" in text:  # what pydicom puts where bytes did not decode
        return "bytes not valid in the declared character set"
    if keyword in ENUMERATED and text not in ENUMERATED[keyword]:
        return "not one of its enumerated values"
    try:
        validate_value(vr, text, pydicom_config.RAISE)
    except (ValueError, TypeError) as exc:
        return "longer than its VR allows" if "length" in str(exc) else f"not a valid {vr} value"
    if vr == "DA":
        try:
            datetime.datetime.strptime(text, "%Y%m%d")
        except ValueError:
            return "not a valid DA value"
    if vr in _TEXT_VRS:
        if _TEXT_CONTROL.search(text):
            return "control characters"
    elif _CONTROL.search(text) or "\\" in text:
        return "control characters or a backslash"
    if vr == "PN":
        groups = text.split("=")
        if len(groups) > 3 or any(g.count("^") > 4 for g in groups):
            return "more than 3 groups or 5 components"
    if vr in _ASCII_VRS:
        return None if text.isascii() else "characters outside its VR's repertoire"
    if terms is None or all(t in ("", "ISO_IR 6", "ISO 2022 IR 6") for t in terms):
        # Default repertoire, declared or not (or an unknown set, not declared in the
        # outputs): ASCII only, though pydicom would read such bytes as Latin-1.
        return None if text.isascii() else "characters outside the declared character set"
    if from_bytes:
        return None  # decoded without substitutes: its bytes are carried as they are
    # The value must come back unchanged from the declared character set.
    encodings = _python_encodings(terms)
    try:
        if vr == "PN":
            raw = PersonName(text).encode(encodings)
            back = str(PersonName(raw, encodings=encodings))
        else:
            raw = encode_string(text, encodings)
            back = decode_bytes(raw, encodings, {0x5C})
    except (UnicodeError, ValueError, LookupError):
        return "characters outside the declared character set"
    return None if back == text else "characters outside the declared character set"


@dataclass(frozen=True, slots=True)
class CopiedAttributes:
    """The source's patient, study and equipment attributes, checked.

    Attributes
    ----------
    exact : pydicom.Dataset
        What the outputs carry (:func:`apply_study`): the source's
        SpecificCharacterSet and each valid value as the source's bytes.
    plain : pydicom.Dataset
        What highdicom is given to build the objects with: no character set, the
        names blank (highdicom warns quoting a name it doubts), other text only
        where it is plain ASCII. :func:`apply_study` replaces it afterwards.
    dropped : tuple of str
        Keywords whose value was invalid (sent empty or left out).
    """

    exact: pydicom.Dataset
    plain: pydicom.Dataset
    dropped: tuple[str, ...]


def study_attributes(
    header: pydicom.Dataset, study_instance_uid: str, *, series_uid: str = ""
) -> CopiedAttributes:
    """The patient and study attributes of the source, checked and ready to copy.

    :data:`STUDY_KEYWORDS` are Type 2: present, empty when absent or invalid;
    :data:`EQUIPMENT_KEYWORDS` are Type 3: left out when invalid. The source's
    SpecificCharacterSet is kept when pydicom can decode it. Values are decoded
    from the header's raw bytes, so pydicom never parses (nor warns quoting) a
    value before it is checked. Each dropped value is logged once by keyword
    (``results.value_dropped``), never by value.

    Parameters
    ----------
    header : pydicom.Dataset
        The first source slice's header (see :func:`source_header`).
    study_instance_uid : str
        The series' Study Instance UID (already checked, PS3.5 9.1).
    series_uid : str
        For the log line only.
    """
    terms = character_set(header)
    if terms is None:
        log.warning(
            "results.charset_unknown",
            series_uid=series_uid,
            keyword="SpecificCharacterSet",
            action="outputs declare none; only plain-ASCII values are copied",
        )
    encodings = _python_encodings(terms or ())
    exact, plain = pydicom.Dataset(), pydicom.Dataset()
    if terms:
        exact.SpecificCharacterSet = list(terms) if len(terms) > 1 else terms[0]
    dropped: list[str] = []
    for keyword in (*STUDY_KEYWORDS, *EQUIPMENT_KEYWORDS):
        if keyword == "StudyInstanceUID":
            continue
        tag = tag_for_keyword(keyword)
        assert tag is not None
        vr = dictionary_VR(keyword)
        element = header.get_item(tag) if tag in header else None
        text, carried = "", ""
        if element is not None and element.value not in (None, b"", ""):
            text, carried = _decode(element.value, encodings, vr)
        raw = element is not None and isinstance(element.value, bytes | bytearray)
        reason = invalid_reason(keyword, text, terms, from_bytes=raw)
        if reason is not None:
            dropped.append(keyword)
            log.warning(
                "results.value_dropped",
                series_uid=series_uid,
                keyword=keyword,
                reason=reason,
                action="sent empty" if COPIED_TYPE[keyword] == 2 else "left out",
            )
            text, carried = "", ""
        if COPIED_TYPE[keyword] == 3 and text == "":
            continue
        setattr(exact, keyword, carried)
        simple = "" if vr == "PN" or not str(text).isascii() else str(text)
        if simple or COPIED_TYPE[keyword] == 2:
            setattr(plain, keyword, simple)
    exact.StudyInstanceUID = plain.StudyInstanceUID = study_instance_uid
    return CopiedAttributes(exact=exact, plain=plain, dropped=tuple(dropped))


def apply_study(ds: pydicom.Dataset, study: CopiedAttributes) -> None:
    """Put the checked patient and study attributes and the character set on an output.

    highdicom builds each object from ``study.plain``; the outputs get the
    source's exact values here, after construction.
    """
    for keyword in STUDY_KEYWORDS:
        if keyword in study.exact:
            setattr(ds, keyword, study.exact[keyword].value)
    if "SpecificCharacterSet" in study.exact:
        ds.SpecificCharacterSet = study.exact.SpecificCharacterSet
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
