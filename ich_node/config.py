"""The node's YAML configuration: read and validated once, at start.

Every key, its type and its default live here and in ``config/node.yaml``, which
documents them for admins. The key names are the admin-facing interface: never
rename one. Loading returns typed, frozen objects; an unknown key, a wrong type
or a bad value raises :class:`ConfigError` with the key path and the value.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names key and value."""


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2: AE is 16 characters at most, no backslash or control characters,
    # and leading/trailing spaces are not significant.
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title must not be empty")
    if len(stripped) > 16:
        raise ValueError(f"an AE title has at most 16 characters, this one has {len(stripped)}")
    if "\\" in stripped or any(ord(c) < 32 or ord(c) > 126 for c in stripped):
        raise ValueError("an AE title holds printable ASCII characters only, no backslash")
    return stripped


def _check_pattern(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from exc
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Pattern = Annotated[str, AfterValidator(_check_pattern)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    # strict: "8" is not an int and 1 is not a string; extra="forbid": typos fail loudly.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_T = TypeVar("_T", bound=BaseModel)


def _path(value: Any) -> Any:
    return Path(value) if isinstance(value, str) else value


class ServerTLS(_Section):
    """``node.tls``: DICOM TLS on the listener (PS3.15 B.1, TLS secure transport)."""

    cert: Path  # the node's certificate (PEM), chain included
    key: Path  # its private key (PEM)
    ca: Path | None = None  # CA certificates (PEM) that sign the callers' certificates
    require_client_cert: bool = False  # reject callers without a certificate signed by `ca`

    @field_validator("cert", "key", "ca", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return _path(value)

    @model_validator(mode="after")
    def _ca_for_clients(self) -> ServerTLS:
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs `ca` (the CA of the callers' certificates)")
        return self


class ClientTLS(_Section):
    """``destinations[].tls``: TLS to one destination."""

    ca: Path  # CA certificates (PEM) that sign the destination's certificate
    cert: Path | None = None  # the node's client certificate, when the destination asks
    key: Path | None = None
    check_hostname: bool = True  # the certificate must name `host`

    @field_validator("ca", "cert", "key", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return _path(value)

    @model_validator(mode="after")
    def _pair(self) -> ClientTLS:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both `cert` and `key` for a client certificate, or neither")
        return self


class NodeSection(_Section):
    """``node``: how the node presents itself on the network."""

    ae_title: AETitle = "ICH_NODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 8
    max_pending: Annotated[int, Field(ge=1, le=10000)] = 32
    max_pending_per_host: Annotated[int, Field(ge=1, le=10000)] = 8
    # None: twice max_pending_per_host. Counts one /24 (IPv4) or /64 (IPv6) network.
    max_pending_per_network: Annotated[int, Field(ge=1, le=10000)] | None = None
    # None: a quarter of max_pending. Pending slots only known callers may take.
    pending_reserve: Annotated[int, Field(ge=0, le=10000)] | None = None
    # Refuse a request whose called AE title is not ae_title (A-ASSOCIATE-RJ 1/1/7).
    require_called_ae: bool = False
    negotiation_timeout: Annotated[float, Field(ge=1, le=300)] = 10.0
    max_dataset_mb: Annotated[int, Field(ge=1, le=65536)] = 1024
    # Maximum PDU length the listener advertises and accepts (PS3.8 D.1), KiB: a
    # sender splits each image into PDUs of at most this; fewer PDUs, less work per image.
    max_pdu_kb: Annotated[int, Field(ge=4, le=16384)] = 256
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    worker_max_crashes: Annotated[int, Field(ge=1, le=1000)] = 5
    tls: ServerTLS | None = None
    # live: results and alerts go to every destination and notification target;
    # shadow: the node reads and records as usual but sends only to the targets that
    # set `shadow: true` (a silent local validation, docs/validation.md).
    mode: Literal["live", "shadow"] = "live"

    # The zone results are dated in when the source study names none (its
    # TimezoneOffsetFromUTC wins): an IANA name; None = the system's zone.
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(
                    f"{value!r} is not an IANA time zone name (e.g. Europe/Berlin, Asia/Tokyo)"
                ) from exc
        return value

    def zone(self) -> zoneinfo.ZoneInfo | None:
        """``timezone`` as a zone; ``None`` for the system's."""
        return None if self.timezone is None else zoneinfo.ZoneInfo(self.timezone)

    @model_validator(mode="after")
    def _reserve_below_total(self) -> NodeSection:
        if self.pending_reserve is not None and self.pending_reserve >= self.max_pending:
            raise ValueError(
                f"pending_reserve ({self.pending_reserve}) must be less than max_pending "
                f"({self.max_pending}): the rest is what callers not yet known can use"
            )
        return self


class Caller(_Section):
    """One entry of ``callers``: a modality or PACS allowed to send to the node."""

    ae_title: AETitle
    host: str | None = None


#: ``destinations[i].sr_sop_class``: which SR class the SR goes in (``auto``: the
#: richest the destination accepts, Comprehensive 3D SR first).
SrSopClass = Literal["auto", "comprehensive3d", "comprehensive", "enhanced"]


class Destination(_Section):
    """One entry of ``destinations``: where results are sent.

    ``kind: dicom`` (default) sends by C-STORE (``ae_title``, ``host``, ``port``,
    optional ``tls``); ``kind: dicomweb`` by STOW-RS (PS3.18 10.5) to ``url`` (the
    DICOMweb service root, e.g. ``https://pacs/dicom-web``), with a bearer token
    from ``token_file`` or a user and password (two lines) from
    ``credentials_file``, and ``ca_file`` to trust besides the system's CAs.
    """

    #: How an entry is written, for config errors (which keys are required depends on `kind`).
    ENTRY_FORM: ClassVar[str] = (
        "a mapping of name, ae_title, host, port (required for kind: dicom, the default) and "
        "tls, sr_sop_class, shadow (optional), or of name, kind: dicomweb, url (required) and "
        "token_file or credentials_file, ca_file, sr_sop_class, shadow (optional)"
    )

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: Literal["dicom", "dicomweb"] = "dicom"
    ae_title: AETitle | None = None
    host: Annotated[str, Field(min_length=1)] | None = None
    port: Port | None = None
    tls: ClientTLS | None = None
    # Also sent to in shadow mode (node.mode: shadow), e.g. a research PACS.
    shadow: bool = False
    sr_sop_class: SrSopClass = "auto"
    url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")] | None = None
    token_file: Path | None = None
    credentials_file: Path | None = None
    ca_file: Path | None = None

    @field_validator("token_file", "credentials_file", "ca_file", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return _path(value)

    @model_validator(mode="after")
    def _by_kind(self) -> Destination:
        if self.kind == "dicom":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"destination {self.name!r} (kind: dicom) needs {', '.join(missing)}"
                )
            extra = [k for k in ("url", "token_file", "credentials_file", "ca_file")
                     if getattr(self, k) is not None]  # fmt: skip
            if extra:
                raise ValueError(
                    f"destination {self.name!r}: {', '.join(extra)} belong to kind: dicomweb"
                )
        else:
            if self.url is None:
                raise ValueError(f"destination {self.name!r} (kind: dicomweb) needs url")
            if self.token_file is not None and self.credentials_file is not None:
                raise ValueError(
                    f"destination {self.name!r}: give token_file (bearer) or "
                    "credentials_file (basic), not both"
                )
            extra = [k for k in ("ae_title", "host", "port", "tls") if getattr(self, k) is not None]
            if extra:
                raise ValueError(
                    f"destination {self.name!r}: {', '.join(extra)} belong to kind: dicom "
                    "(a dicomweb destination has url, token_file/credentials_file, ca_file)"
                )
        return self


def sr_classes_needed(destinations: tuple[Destination, ...] | list[Destination]) -> tuple[str, ...]:
    """The SR classes besides Comprehensive 3D SR that the destinations may need.

    ``auto`` may fall back to Comprehensive SR, then Enhanced SR; a forced class needs
    only itself. The worker encodes the SR in each (``results.build``).
    """
    needed: list[str] = []
    for d in destinations:
        wanted = ["comprehensive", "enhanced"] if d.sr_sop_class == "auto" else [d.sr_sop_class]
        needed += [c for c in wanted if c != "comprehensive3d" and c not in needed]
    return tuple(c for c in ("comprehensive", "enhanced") if c in needed)


class SeriesSection(_Section):
    """``series``: when a series is complete and which series are read."""

    stable_seconds: Annotated[float, Field(ge=0, le=86400)] = 30.0
    # Versions of one series the node reads at most (late instances, changed re-sends).
    max_versions: Annotated[int, Field(ge=1, le=1000)] = 5
    # A series re-sent after retention purged its images, with the content its last
    # read answered: read again (true) or not (false: no new read, no new SR).
    reread_identical: bool = False
    min_slices: Annotated[int, Field(ge=1)] = 10
    max_tilt_degrees: Annotated[float, Field(ge=0, le=45)] = 30.0
    # A hole between slices larger than this: coverage incomplete, said in the results.
    max_gap_mm: Annotated[float, Field(gt=0, le=1000)] = 12.0
    # ConvolutionKernel substrings, most preferred first: which reconstruction is read.
    preferred_kernels: tuple[str, ...] = (
        "BRAIN", "STANDARD", "STD", "SOFT", "H31", "H30", "J30", "J40", "H40", "HR38",
        "HR40", "BR36", "BR38", "FC21", "FC26", "FC2", "UB", "UC",
    )  # fmt: skip
    modalities: tuple[str, ...] = ("CT",)
    # Empty pattern lists accept everything: real head CTs often lack BodyPartExamined.
    body_part_patterns: tuple[Pattern, ...] = ()
    study_description_patterns: tuple[Pattern, ...] = ()
    series_description_patterns: tuple[Pattern, ...] = ()
    exclude_description_patterns: tuple[Pattern, ...] = (
        r"(?i)\b(scout|localizer|topogram|surview|dose report)\b",
    )
    # Read slices while the series arrives (a worker scores each as it is spooled);
    # at completion only what needs the whole series is left. false: read at completion.
    streaming: bool = True
    # Positive slices in a row (spatial order, slices received so far) that make a
    # series still arriving positive for an `early: true` notification target.
    early_min_slices: Annotated[int, Field(ge=1, le=100)] = 2


#: The model's labels (RSNA 2019 names), in its order: what ``model.thresholds`` and a
#: notification target's ``labels`` may name.
AlertLabel = Literal[
    "any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"
]


class ModelSection(_Section):
    """``model``: the bundle the worker serves and where it runs."""

    bundle: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    decode_threads: Annotated[int, Field(ge=0, le=64)] = 0
    tta: bool = False
    # The site's operating point: label -> threshold, overriding the bundle's for the
    # labels named (the others keep the bundle's). Empty: the bundle's thresholds.
    thresholds: dict[AlertLabel, Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=dict)

    @field_validator("bundle", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return Path(value) if isinstance(value, str) else value


class ResultsSection(_Section):
    """``results``: which DICOM objects the node sends back."""

    heatmaps: Literal["positive", "all", "none"] = "positive"
    negative_top_slices: Annotated[int, Field(ge=0, le=50)] = 0
    parametric_map: bool = False
    # A Key Object Selection document ("Of Interest", PS3.3 A.35.4) listing the
    # positive slices, sent with the SR.
    key_objects: bool = False


def _one_or_many(value: Any) -> Any:
    # `labels: any` reads as well as `labels: [any]`.
    return (value,) if isinstance(value, str) else value


class _Target(_Section):
    """What every entry of ``notifications`` has: a name, when it fires, on which labels."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    # positive: only a series positive for one of `labels`; always: every series read.
    when: Literal["positive", "always"] = "positive"
    labels: Annotated[tuple[AlertLabel, ...], Field(min_length=1)] = ("any",)
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    # Also told in shadow mode (node.mode: shadow), e.g. the validation team's inbox.
    shadow: bool = False
    # Also a preliminary alert while the series arrives, as soon as the slices so far
    # are positive (series.early_min_slices in a row); the final or a correction follows.
    early: bool = False

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        return _one_or_many(value)


#: HL7 v2 ``HD`` values (MSH-3..6): no HL7 delimiters.
HL7Name = Annotated[str, Field(min_length=1, max_length=180, pattern=r"^[^|^~\\&\r\n]+$")]


class HL7Target(_Target):
    """``notifications[]`` with ``kind: hl7``: an ORU^R01 (v2.5.1) over MLLP to a RIS."""

    kind: Literal["hl7"]
    host: Annotated[str, Field(min_length=1)]
    port: Port
    sending_application: HL7Name = "ICH_NODE"
    sending_facility: HL7Name = "ICH_NODE"
    # Required: the RIS's own names for itself, which it checks on every message.
    receiving_application: Annotated[
        HL7Name, Field(description="MSH-5: the receiving application, as the RIS names it")
    ]
    receiving_facility: Annotated[
        HL7Name, Field(description="MSH-6: the receiving facility, as the RIS names it")
    ]
    # ORC-7/OBR-27 priority of a positive result (HL7 table 0027: S = STAT, A = ASAP).
    priority_positive: Literal["S", "A", "R", "P", "C", "T"] = "S"


class WebhookTarget(_Target):
    """``notifications[]`` with ``kind: webhook``: a signed HTTPS POST of JSON."""

    kind: Literal["webhook"]
    url: Annotated[str, Field(pattern=r"^https://[^\s/]+(/\S*)?$")]
    secret_file: Path  # the HMAC-SHA256 key (the file's bytes, trailing newline removed)
    ca_file: Path | None = None  # an extra CA (PEM) to trust besides the system's
    include_patient: bool = False

    @field_validator("secret_file", "ca_file", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return _path(value)


class EmailTarget(_Target):
    """``notifications[]`` with ``kind: email``: SMTP with STARTTLS (RFC 3207).

    A login (``credentials_file``) needs ``starttls: true``: the sender has no
    implicit TLS (SMTPS), so a login without STARTTLS would be sent in clear.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    kind: Literal["email"]
    host: Annotated[str, Field(min_length=1)]
    port: Port = 587
    starttls: bool = True
    # Two lines: user name, then password. None: no login.
    credentials_file: Path | None = None
    from_: Annotated[str, Field(alias="from", pattern=r"^[^@\s<>]+@[^@\s<>]+$")]
    to: Annotated[
        tuple[Annotated[str, Field(pattern=r"^[^@\s<>]+@[^@\s<>]+$")], ...], Field(min_length=1)
    ]
    attach_key_image: bool = True

    @field_validator("credentials_file", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return _path(value)

    @field_validator("to", mode="before")
    @classmethod
    def _to(cls, value: Any) -> Any:
        return _one_or_many(value)

    @model_validator(mode="after")
    def _login_encrypted(self) -> EmailTarget:
        # smtplib logs in over whatever the connection is: without STARTTLS (the only
        # TLS this sender speaks; no implicit-TLS SMTPS) the password would cross in clear.
        if self.credentials_file is not None and not self.starttls:
            raise ValueError(
                f"target {self.name!r}: starttls: false with credentials_file would send "
                "the SMTP login unencrypted; set starttls: true, or drop credentials_file "
                "for a relay that needs no login"
            )
        return self


#: One entry of ``notifications``, told apart by ``kind``.
NotificationTarget = Annotated[HL7Target | WebhookTarget | EmailTarget, Field(discriminator="kind")]


class QueueSection(_Section):
    """``queue``: leases and retries of reading jobs."""

    lease_seconds: Annotated[float, Field(gt=0)] = 600.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    retry_base_seconds: Annotated[float, Field(ge=0)] = 10.0


class SenderSection(_Section):
    """``sender``: delivery of results to the destinations."""

    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 8
    backoff_base_seconds: Annotated[float, Field(ge=0)] = 5.0
    backoff_max_seconds: Annotated[float, Field(ge=0)] = 600.0
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0


class StorageSection(_Section):
    """``storage``: the spool, the store (embedded SQLite or PostgreSQL) and the outbox.

    ``database`` is ``None`` for the embedded SQLite store in ``dir``, or a
    ``postgresql://USER@HOST:PORT/DB`` URL (libpq URI, RFC 3986) for a store that
    several hosts share. A password never sits in the YAML: it comes from
    ``database_password_file`` (a file holding it on its first line) or from libpq's
    usual means (``PGPASSWORD``, ``~/.pgpass``, client certificates). ``node_id``
    names this node in a shared database (default: the host name); each node's
    recovery touches only the leases its own id holds.
    """

    dir: Path = Path("/var/lib/ich-node")
    keep_hours: Annotated[float, Field(gt=0)] = 168.0
    # The results ledger (one row per series version read, no images, no patient
    # name/ID/birth date), kept for `ich-node audit` long after the images.
    keep_results_days: Annotated[float, Field(gt=0)] = 730.0
    min_free_mb: Annotated[int, Field(ge=0)] = 1024
    database: str | None = None
    database_password_file: Path | None = None
    database_pool_size: Annotated[int, Field(ge=1, le=100)] = 4
    node_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{0,64}$")] = ""

    @field_validator("dir", "database_password_file", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return Path(value) if isinstance(value, str) else value

    @field_validator("database")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("storage.database is a postgresql://USER@HOST:PORT/DB URL or null")
        if parts.password is not None:
            raise ValueError(
                "storage.database must not hold a password: name a file in "
                "storage.database_password_file or use libpq's ~/.pgpass / PGPASSWORD"
            )
        if not parts.path.strip("/"):
            raise ValueError("storage.database names no database (postgresql://USER@HOST:PORT/DB)")
        return value


class HealthSection(_Section):
    """``health``: what ``ich-node health`` calls unhealthy beyond the listener and workers."""

    # A delivery (to a destination or an alert target) parked longer than this fails
    # health, naming it: results or alerts are not reaching someone.
    max_parked_seconds: Annotated[float, Field(gt=0)] = 3600.0


class LoggingSection(_Section):
    """``logging``: structlog output."""

    format: Literal["json", "console"] = "json"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class MetricsSection(_Section):
    """``metrics``: the Prometheus endpoint of the serving process."""

    address: Annotated[str, Field(pattern=r"^[^\s:]*:[0-9]{1,5}$")] | None = None


class WebTLS(_Section):
    """``web.tls``: HTTPS for the web console (certificate and key files, PEM)."""

    cert: Path  # the console's certificate (PEM), chain included
    key: Path  # its private key (PEM)

    @field_validator("cert", "key", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return _path(value)


class WebSection(_Section):
    """``web``: the web console (``ich-node web``), a process apart from ``serve``."""

    address: Annotated[str, Field(pattern=r"^[^\s:]*:[0-9]{1,5}$")] = "127.0.0.1:8090"
    tls: WebTLS | None = None
    # name:role:argon2-hash lines, written by `ich-node web-user add`; required by `web`.
    users_file: Path | None = None
    # A file of random bytes that signs session cookies (sessions then outlive a restart
    # of the console); null: a new random key at each start.
    secret_file: Path | None = None
    # A session ends after this many minutes without a page, and 12 hours after login.
    session_minutes: Annotated[float, Field(gt=0, le=720)] = 30.0
    # Patient name, ID and birth date on the pages (logged-in users only, never logged).
    show_patient: bool = False
    # Failed logins allowed per user name within login_window_minutes (4x per address).
    login_max_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    login_window_minutes: Annotated[float, Field(gt=0, le=1440)] = 15.0
    page_size: Annotated[int, Field(ge=5, le=500)] = 50

    @field_validator("users_file", "secret_file", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return _path(value)


class NodeConfig(_Section):
    """The whole configuration file; each part of the node receives its own section."""

    node: NodeSection = NodeSection()
    callers: tuple[Caller, ...] = ()
    destinations: tuple[Destination, ...] = ()
    series: SeriesSection = SeriesSection()
    model: ModelSection = ModelSection()
    results: ResultsSection = ResultsSection()
    queue: QueueSection = QueueSection()
    sender: SenderSection = SenderSection()
    storage: StorageSection = StorageSection()
    health: HealthSection = HealthSection()
    logging: LoggingSection = LoggingSection()
    metrics: MetricsSection = MetricsSection()
    web: WebSection = WebSection()
    # Alerts to a RIS/worklist (HL7), a chat/pager gateway (webhook) or people (email).
    notifications: tuple[NotificationTarget, ...] = ()

    @field_validator("notifications")
    @classmethod
    def _unique_targets(
        cls, value: tuple[NotificationTarget, ...]
    ) -> tuple[NotificationTarget, ...]:
        names = [t.name for t in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"notification target name {name!r} is used more than once")
        return value

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"destination name {name!r} is used more than once")
        return value


def _strip(annotation: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X``; ``X | None`` -> ``X``."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _strip(args[0])
    return annotation


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    """The section classes an annotation allows (several for a union of kinds)."""
    annotation = _strip(annotation)
    if get_origin(annotation) in (Union, UnionType):
        return [m for a in get_args(annotation) for m in _models_of(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _kind(model: type[BaseModel]) -> str:
    """The ``kind`` value of one class of a discriminated union (``Literal["hl7"]``)."""
    return str(get_args(_strip(model.model_fields["kind"].annotation))[0])


def _key(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    return field.alias or name


def _entry_form(item: Any) -> str:
    """How one entry of a list is written, from its section class(es): 'a mapping of ...'."""
    models = _models_of(item)
    if not models:
        return "a single value"
    if len(models) > 1:  # told apart by `kind`
        kinds = [_kind(m) for m in models]
        return f"a mapping of name, kind ({', '.join(kinds)}) and that kind's keys"
    model = models[0]
    written = getattr(model, "ENTRY_FORM", None)  # keys required by another key's value
    if isinstance(written, str):
        return written
    required = [_key(model, n) for n, f in model.model_fields.items() if f.is_required()]
    optional = [_key(model, n) for n, f in model.model_fields.items() if not f.is_required()]
    form = f"a mapping of {', '.join(required)} (required)"
    return form + (f" and {', '.join(optional)} (optional)" if optional else "")


_Sent = TypeVar("_Sent", Destination, NotificationTarget)


def sent_in_mode(targets: Sequence[_Sent], mode: Literal["live", "shadow"]) -> tuple[_Sent, ...]:
    """The destinations or notification targets that are sent to in ``mode`` (``node.mode``).

    ``live``: all of them; ``shadow``: only those with ``shadow: true``. Applied where
    deliveries and alerts are created (the worker's completion,
    :func:`ich_node.delivery.outbox.prepare_alerts`), so that nothing is queued
    that will never be sent.
    """
    return tuple(targets) if mode == "live" else tuple(t for t in targets if t.shadow)


def mode_fields(config: NodeConfig) -> dict[str, object]:
    """``node.mode`` and, in shadow mode, the targets still sent to (for logs and status).

    Names only: the destinations and notification targets with ``shadow: true``.
    """
    fields: dict[str, object] = {"mode": config.node.mode}
    if config.node.mode == "shadow":
        fields["shadow_destinations"] = [
            d.name for d in sent_in_mode(config.destinations, "shadow")
        ]
        fields["shadow_notifications"] = [
            t.name for t in sent_in_mode(config.notifications, "shadow")
        ]
    return fields


def _item(annotation: Any) -> Any:
    """The entry type of a ``tuple[X, ...]`` annotation (None for anything else)."""
    stripped = _strip(annotation)
    return get_args(stripped)[0] if get_origin(stripped) is tuple else None


def _walk(loc: tuple[Any, ...]) -> tuple[str, Any]:
    """The key path as written in YAML and the annotation found at ``loc``.

    A discriminated union puts the kind in the location (``notifications.0.hl7.x``);
    it is shown as ``notifications[0] (kind: hl7).x``.
    """
    path = ""
    annotation: Any = NodeConfig
    for part in loc:
        annotation = _strip(annotation) if annotation is not None else None
        if isinstance(part, int):
            path += f"[{part}]"
            args = get_args(annotation) if get_origin(annotation) is tuple else ()
            annotation = args[0] if args else None
            continue
        models = _models_of(annotation) if annotation is not None else []
        if len(models) > 1:  # the kind of a union entry
            path += f" (kind: {part})"
            annotation = next((m for m in models if _kind(m) == part), None)
            continue
        path += f".{part}" if path else str(part)
        model = models[0] if models else None
        fields = model.model_fields if model is not None else {}
        name = next((n for n, f in fields.items() if n == part or f.alias == part), None)
        annotation = fields[name].annotation if name is not None else None
    return path or "(top level)", annotation


def _describe(error: dict[str, Any]) -> str:
    """One line per validation error: the key path as written, what is wrong, the value."""
    loc = tuple(error["loc"])
    path, annotation = _walk(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key (value {error['input']!r}); see config/node.yaml for the keys"
    if kind == "missing":
        models = _models_of(_walk(loc[:-1])[1])
        field = models[0].model_fields.get(str(loc[-1])) if len(models) == 1 else None
        why = f" ({field.description})" if field is not None and field.description else ""
        return f"{path}: required key is missing{why}"
    if kind == "tuple_type":  # one value or a mapping where a list belongs
        form = _entry_form(_item(annotation))
        got = error["input"]
        return f"{path}: must be a list, one `- ` line per entry, each {form}; got {got!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if loc and isinstance(loc[-1], int):  # an entry of a list
            form = _entry_form(_item(_walk(loc[:-1])[1]))
            return f"{path}: each entry must be {form}; got {error['input']!r}"
        return (
            f"{path}: must be a section (a mapping of its keys, config/node.yaml); "
            f"got {error['input']!r}"
        )
    return f"{path}: {error['msg']} (got {error['input']!r})"


def parse_config(data: Any, *, source: str = "<config>") -> NodeConfig:
    """Validate an already-parsed YAML document.

    Parameters
    ----------
    data
        The mapping read from YAML (``None`` for an empty file gives the defaults).
    source
        Where it came from, for the error message.

    Raises
    ------
    ConfigError
        Naming each offending key path and its value.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {data!r}")
    # YAML lists arrive as lists; the frozen model keeps tuples (strict mode accepts only
    # tuples for them), so convert before validating.
    try:
        return NodeConfig.model_validate(_lists_to_tuples(data))
    except ValidationError as exc:
        lines = [_describe(dict(err)) for err in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def load_config(path: Path | str) -> NodeConfig:
    """Read and validate a YAML configuration file.

    Relative paths in ``model.bundle`` and ``storage.dir`` are resolved against the
    file's folder, so a config works from any working directory.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    config = parse_config(data, source=str(path))
    base = path.resolve().parent
    updates: dict[str, Any] = {}
    if config.model.bundle is not None and not config.model.bundle.is_absolute():
        updates["model"] = config.model.model_copy(update={"bundle": base / config.model.bundle})
    if not config.storage.dir.is_absolute():
        updates["storage"] = config.storage.model_copy(update={"dir": base / config.storage.dir})
    if config.node.tls is not None:
        updates["node"] = config.node.model_copy(
            update={"tls": _resolve_paths(config.node.tls, base, ("cert", "key", "ca"))}
        )
    if config.destinations:
        updates["destinations"] = tuple(
            _resolve_paths(
                d
                if d.tls is None
                else d.model_copy(
                    update={"tls": _resolve_paths(d.tls, base, ("ca", "cert", "key"))}
                ),
                base,
                ("token_file", "credentials_file", "ca_file"),
            )
            for d in config.destinations
        )
    if config.web != WebSection():
        web = _resolve_paths(config.web, base, ("users_file", "secret_file"))
        if web.tls is not None:
            web = web.model_copy(update={"tls": _resolve_paths(web.tls, base, ("cert", "key"))})
        updates["web"] = web
    if config.notifications:
        updates["notifications"] = tuple(
            _resolve_paths(t, base, ("secret_file", "ca_file"))
            if isinstance(t, WebhookTarget)
            else _resolve_paths(t, base, ("credentials_file",))
            if isinstance(t, EmailTarget)
            else t
            for t in config.notifications
        )
    return config.model_copy(update=updates) if updates else config


def _resolve_paths(section: _T, base: Path, keys: tuple[str, ...]) -> _T:
    updates = {}
    for key in keys:
        value = getattr(section, key)
        if isinstance(value, Path) and not value.is_absolute():
            updates[key] = base / value
    return section.model_copy(update=updates) if updates else section
