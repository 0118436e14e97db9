"""One structlog configuration for the node, its workers and the CLI, and PHI scrubbing.

JSON lines by default (what log shippers expect), a readable console renderer on
request. Python ``warnings`` and the standard-library loggers of the libraries
(pydicom, highdicom, pynetdicom, torch) go through the same renderer, so in JSON
every line is JSON.

No patient name, ID or birth date reaches a log line, a stored reason or a
status output. Library messages quote the values they complain about (pydicom:
``Invalid value for VR DA: '1901-02-03'``; highdicom: ``The string "DOE" is
unlikely to represent the intended person name``), and peers quote them too (an
HL7 ACK's MSA-3, an HTTP error body, an SMTP reply). The values of the datasets
and alerts being handled are registered (:func:`handling_phi`,
:func:`phi_values`) and :func:`redact` replaces each wherever it appears, quoted
or not, by the name of its attribute (``<PatientName>``). Only registered values
are replaced: charset names (``'utf-8'``), SOP class names, modalities
(``'MR'``), configuration values (``'cuda'``) and status texts stay readable.
:func:`redact` runs on every field of every event (a structlog processor) and on
failure reasons and peers' answers before they are stored. Messages of other
libraries get a second net (:func:`library_text`): a quoted value that names
nothing the node knows (an attribute, a VR, a UID or its name, a charset, a path)
is replaced, since libraries also quote header values outside any job.

Library warnings repeat (pydicom warns once per file about RSNA's ``ID_...``
UIDs: 1.5 million lines over the RSNA set). Each kind (logger and message with
values and numbers blanked) is shown once per scope (a job in the node, a run of
``ich-train fit``, else the process, where the 10th, 100th, ... occurrence is
shown again with its count) and counted: :func:`warning_counts` gives the counts
of a scope for its summary line and metrics.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Final

import structlog

#: What replaces a removed value.
REDACTED: Final = "<redacted>"
#: Attributes whose values are PHI the node may meet in headers (PS3.15 E.1-1, the
#: patient identity part): registered and scrubbed while their dataset is handled.
PHI_KEYWORDS: Final = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "IssuerOfPatientID",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MilitaryRank",
    "MedicalRecordLocator",
    "AccessionNumber",
    "ReferringPhysicianName",
)
#: Loggers of this project: their events are scrubbed but not summarised.
OWN_LOGGERS: Final = ("ich_node", "training", "benchmarks", "scripts", "__main__")
#: The context key that names the current job (bound by :func:`job_context`).
SCOPE_KEY: Final = "job_id"

_NUMBER = re.compile(r"\d+(\.\d+)?")
# A quoted value: '...', "..." or b'...', not an apostrophe inside a word.
_QUOTED = re.compile(r"""(?<![A-Za-z0-9])(b?)(['"])([^'"\n]*?)\2(?![A-Za-z0-9])""")
_TAG = re.compile(r"^\(?[0-9A-Fa-f]{4},? ?[0-9A-Fa-f]{4}\)?$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+){3,}$")
_VR = re.compile(r"^[A-Z][A-Z]$")
_DIGITS = re.compile(r"\D")
#: Person name components (PS3.5 6.2, PN): family, given, middle, prefix, suffix. The
#: prefix and suffix ("Mr", "Dr", "Jr") identify no one and would hide words such as
#: the modality 'MR' wherever they appear: only the first three are registered.
_NAME_PARTS: Final = 3


class PhiRegistry:
    """Values of the datasets being handled, removed from every message (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, dict[str, str]] = {}
        self._next = 0
        self._pattern: re.Pattern[str] | None = None
        self._names: dict[str, str] = {}

    def hold(self, values: Mapping[str, str] | Iterable[str]) -> int:
        """Register ``values`` until :meth:`release` with the returned token.

        A mapping gives each value's attribute keyword: the value is then replaced
        by ``<Keyword>`` (a reason names the attribute); plain values by ``<redacted>``.
        """
        named = values if isinstance(values, Mapping) else dict.fromkeys(values, "redacted")
        kept = {v: k for v, k in named.items() if len(v.strip()) >= 2}
        with self._lock:
            self._next += 1
            self._held[self._next] = kept
            self._pattern = None
            return self._next

    def release(self, token: int) -> None:
        with self._lock:
            self._held.pop(token, None)
            self._pattern = None

    def pattern(self) -> re.Pattern[str] | None:
        """One regular expression for all held values (longest first), or None."""
        with self._lock:
            if self._pattern is None:
                self._names = {v.lower(): k for vs in self._held.values() for v, k in vs.items()}
                values = sorted(self._names, key=len, reverse=True)
                if values:
                    alternatives = "|".join(re.escape(v) for v in values)
                    self._pattern = re.compile(
                        rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE
                    )
            return self._pattern

    def name_of(self, value: str) -> str:
        """``<Keyword>`` of a held value (``<redacted>`` when unknown)."""
        return f"<{self._names.get(value.lower(), 'redacted')}>"


PHI = PhiRegistry()


def _kept(value: str) -> bool:
    """A quoted text in a library message that names something, not a header value:
    an attribute keyword or tag, a VR, a UID or a UID's name (SOP classes, transfer
    syntaxes), a charset, an absolute path, a value already replaced."""
    if value == "" or _TAG.match(value) or _UID.match(value) or value.startswith("/"):
        return True
    if value.startswith("<") and value.endswith(">"):  # already replaced: <PatientName>
        return True
    import codecs

    from pydicom.datadict import tag_for_keyword
    from pydicom.uid import UID_dictionary
    from pydicom.valuerep import VR

    if _VR.match(value):
        return value in VR.__members__
    if value in _UID_NAMES or value in UID_dictionary:
        return True
    try:
        codecs.lookup(value)
        return True
    except LookupError:
        pass
    return value.isidentifier() and value[0].isupper() and tag_for_keyword(value) is not None


def _uid_names() -> frozenset[str]:
    from pydicom.uid import UID_dictionary

    return frozenset(str(entry[0]) for entry in UID_dictionary.values())


_UID_NAMES: Final = _uid_names()


def library_text(text: str) -> str:
    """A library's message fit for the log: :func:`redact`, then every quoted value that
    does not name something (:func:`_kept`) replaced by ``'<redacted>'``.

    Libraries quote header values they complain about (pydicom's ``Invalid value for
    VR DA: '1901-02-03'``), also outside a job where nothing is registered; their
    quoted names ('CT Image Storage', 'utf-8', 'PatientBirthDate') stay.
    """

    def _sub(match: re.Match[str]) -> str:
        prefix, quote, value = match.groups()
        return match.group(0) if _kept(value) else f"{prefix}{quote}{REDACTED}{quote}"

    return _QUOTED.sub(_sub, redact(text))


def redact(text: str) -> str:
    """``text`` with each registered PHI value replaced by ``<Keyword>`` of its attribute.

    Only values registered with :func:`handling_phi` (or :data:`PHI`) are replaced,
    quoted or not, in any case, as whole words; everything else stays as it is.
    """
    pattern = PHI.pattern()
    if pattern is None:
        return text
    return pattern.sub(lambda m: PHI.name_of(m.group(0)), text)


def scrub_peer_text(text: str, limit: int = 200) -> str:
    """What a peer said (an ACK's text, an HTTP body, an SMTP reply), fit to be recorded.

    Control characters become spaces, runs of white space one space, registered PHI
    values are replaced (:func:`redact`) and the result is cut to ``limit``
    characters (an ellipsis marks a cut). Cut after scrubbing, so that a value is
    never half-kept at the end.
    """
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    clean = redact(flat)
    return clean if len(clean) <= limit else clean[: max(limit - 1, 0)] + "\u2026"


def _text(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bytes):
        decoded = {value.decode("latin-1"), value.decode("utf-8", "replace")}
        return [d.strip(" \x00") for d in decoded]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [t for v in value for t in _text(v)]
    return [str(value).strip(" \x00")]


def phi_values(dataset: Any) -> dict[str, str]:
    """The PHI strings of a pydicom dataset (raw, without validating them), in every form
    a message may quote (the whole value, each name component and group, a date's
    digits), each with the keyword of its attribute.
    """
    import pydicom.datadict

    found: dict[str, str] = {}
    for keyword in PHI_KEYWORDS:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if tag is None:
            continue
        try:
            element = dataset.get_item(tag)  # raw: no conversion, no validation warning
        except Exception:
            continue
        if element is None:
            continue
        for text in _text(element.value):
            if not text:
                continue
            forms = {text}
            for group in text.split("="):  # PN groups: alphabetic=ideographic=phonetic
                parts = group.split("^")
                if keyword.endswith("Name"):
                    parts = parts[:_NAME_PARTS]
                forms |= {" ".join(p for p in parts if p).strip()}
                forms |= {part.strip() for part in parts for part in part.split("\\")}
            digits = _DIGITS.sub("", text)
            if keyword == "PatientBirthDate" and len(digits) == 8:
                forms |= {digits, f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"}
            for form in forms:
                if form:
                    found.setdefault(form, keyword)
    return found


def phi_values_of_file(path: Path | str) -> dict[str, str]:
    """:func:`phi_values` of one DICOM file's header (empty when it cannot be read)."""
    import pydicom

    tags = [pydicom.datadict.tag_for_keyword(k) for k in PHI_KEYWORDS]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(
                path, stop_before_pixels=True, force=True, specific_tags=[t for t in tags if t]
            )
    except Exception:
        return {}
    return phi_values(dataset)


@contextlib.contextmanager
def handling_phi(values: Mapping[str, str] | Iterable[str]) -> Iterator[None]:
    """Scrub ``values`` from every message while the block runs (any thread)."""
    token = PHI.hold(values)
    try:
        yield
    finally:
        PHI.release(token)


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Bind ``job_id`` to this thread's log context: library warnings count for this job."""
    with structlog.contextvars.bound_contextvars(**{SCOPE_KEY: job_id}):
        yield


# ----------------------------------------------------------------- summarising


class _WarningCounts:
    """Occurrences of each kind of library message, per scope (job id, run, or process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str | None, Counter[str]] = {}

    def add(self, scope: str | None, kind: str) -> int:
        with self._lock:
            counter = self._counts.setdefault(scope, Counter())
            counter[kind] += 1
            return counter[kind]

    def take(self, scope: str | None) -> dict[str, int]:
        with self._lock:
            return dict(self._counts.pop(scope, Counter()))

    def peek(self, scope: str | None) -> dict[str, int]:
        with self._lock:
            return dict(self._counts.get(scope, Counter()))


_COUNTS = _WarningCounts()


def warning_counts(scope: str | None, *, clear: bool = True) -> dict[str, int]:
    """Library messages of each kind seen in ``scope`` (a job id; None: the process)."""
    return _COUNTS.take(scope) if clear else _COUNTS.peek(scope)


def _kind(name: str, message: str) -> str:
    return f"{name.split('.')[0]}: {_NUMBER.sub('N', library_text(message))}"[:200]


def _shown_again(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


class _LibraryFilter(logging.Filter):
    """Scrub and summarise records of other libraries' loggers (warnings included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(OWN_LOGGERS):
            return True
        # pydicom's warn_and_log logs *and* warns the same text: keep the warning.
        if record.name.startswith("pydicom") and record.funcName == "warn_and_log":
            return False
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not kill logging
            message = str(record.msg)
        record.msg, record.args = library_text(message), ()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg += f" ({type(exc).__name__}: {library_text(str(exc))})"
            record.exc_info, record.exc_text = None, None
        if record.levelno < logging.WARNING:
            return True
        scope = structlog.contextvars.get_contextvars().get(SCOPE_KEY)
        n = _COUNTS.add(scope, _kind(record.name, message))
        # Once per job; in the process scope again at the 10th, 100th... occurrence.
        show = n == 1 if scope is not None else _shown_again(n)
        if show and n > 1:
            record.msg += f" (seen {n} times)"
        return show


def _showwarning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` replacement: a log record of the warning's library."""
    origin = Path(filename).parts
    library = next(
        (p for p in origin if p in ("pydicom", "highdicom", "pynetdicom", "torch", "torchvision")),
        "py.warnings",
    )
    logging.getLogger(library).warning("%s: %s", category.__name__, message)


def scrub_event(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: :func:`redact` every string in the event (nested ones too)."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return redact(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    for key, value in list(event_dict.items()):
        if key not in ("timestamp", "level", "logger"):
            event_dict[key] = clean(value)
    return event_dict


_SHARED_PROCESSORS: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, as logging's own
    last-resort handler does: a process that replaces ``sys.stderr`` after logging was
    configured (a daemon wrapper, a test runner capturing output) never has a record
    written to a closed stream, which logging would report with a traceback."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:
        return sys.stderr


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Configure structlog, the standard library logging and ``warnings`` for this process.

    Parameters
    ----------
    fmt
        ``json`` (one JSON object per line) or ``console``.
    level
        ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.

    Raises
    ------
    ValueError
        For another ``fmt``.
    """
    if fmt not in ("json", "console"):
        raise ValueError(f"fmt must be 'json' or 'console', got {fmt!r}")
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED_PROCESSORS,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            scrub_event,
            renderer,
        ],
    )
    handler = _CurrentStderr()
    handler.setFormatter(formatter)
    handler.addFilter(_LibraryFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at DEBUG and dumps datasets (with PHI) at some levels:
    # keep it at WARNING unless the node itself is debugging.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # highdicom says at INFO which modules it copies from the source: noise per job.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
    # dicomweb-client logs each request's headers at DEBUG: a bearer token among them.
    logging.getLogger("dicomweb_client").setLevel(max(logging.INFO, root.level))
    # Warnings become log records (scrubbed, counted); every occurrence reaches the
    # filter, which shows each kind once per scope.
    warnings.showwarning = _showwarning
    warnings.filterwarnings("always", category=UserWarning)
