"""Webhook alerts: an HTTPS POST of JSON, signed with HMAC-SHA256.

Fit for chat, pager and on-call gateways (see docs/admin.md, "Webhook"). TLS is
always verified (the system's CAs, plus ``ca_file`` when set). The signature
header is ``X-ICH-Signature: sha256=<hex HMAC-SHA256 of the raw body>`` with the
secret read from ``secret_file``; ``Idempotency-Key`` repeats the body's
``idempotency_key``. The body holds no patient name, ID or birth date unless the
target sets ``include_patient: true``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import socket
import ssl
import time
import urllib.parse
from typing import Any, Final

from ich_node.config import WebhookTarget
from ich_node.delivery.alerts import Alert, AlertFailed, preliminary_text
from ich_node.delivery.deadline import Deadline
from ich_node.delivery.waits import retry_after
from ich_node.log import scrub_peer_text

SIGNATURE_HEADER: Final = "X-ICH-Signature"
#: Answers that say "try again later" (RFC 9110 408, RFC 6585 429).
_RETRY_STATUS: Final = (408, 425, 429)
#: How much of an error answer's body is read (it is scrubbed and cut to 200 characters).
_BODY_BYTES: Final = 2048


def body(alert: Alert, *, include_patient: bool = False) -> dict[str, Any]:
    """The JSON document of an alert (keys stable; fields are only ever added)."""
    doc: dict[str, Any] = {
        "idempotency_key": alert.key,
        "supersedes": alert.supersedes,
        "status": {"C": "correction", "P": "preliminary"}.get(alert.status, "final"),
        "positive": alert.positive,
        "positive_labels": list(alert.positive_labels),
        "study_instance_uid": alert.study_instance_uid,
        "series_instance_uid": alert.series_instance_uid,
        "series_version": alert.version,
        "accession_number": alert.accession_number,
        "findings": [
            {
                "label": f.label,
                "code": {"value": f.code_value, "scheme": f.coding_scheme, "meaning": f.meaning},
                "probability": f.probability,
                "threshold": f.threshold,
                "threshold_source": f.threshold_source,
                "positive": f.positive,
            }
            for f in alert.findings
        ],
        "key_slice": None
        if alert.key_slice is None
        else {
            "sop_instance_uid": alert.key_slice.sop_instance_uid,
            "index": alert.key_slice.index,
            "probability": alert.key_slice.probability,
        },
        "model": {"name": alert.model_name, "version": alert.model_version, "demo": alert.demo},
        "notice": alert.notice,
        "result_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(alert.result_time)),
    }
    if alert.status == "P":  # said only by a preliminary: how little it rests on
        doc["n_slices"] = alert.n_slices
        doc["note"] = preliminary_text(alert)
    if include_patient:
        p = alert.patient
        doc["patient"] = {"name": p.name, "id": p.id, "issuer": p.issuer,
                          "birth_date": p.birth_date, "sex": p.sex}  # fmt: skip
    return doc


def encode(alert: Alert, *, include_patient: bool = False) -> bytes:
    """The raw body: compact JSON, keys sorted, UTF-8 (what the signature covers)."""
    return json.dumps(
        body(alert, include_patient=include_patient), sort_keys=True, separators=(",", ":")
    ).encode("utf-8")


def read_secret(target: WebhookTarget) -> bytes:
    """The HMAC key: the bytes of ``secret_file`` without a trailing newline.

    Raises
    ------
    AlertFailed
        When the file cannot be read or is empty (permanent until fixed; parked).
    """
    try:
        secret = target.secret_file.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise AlertFailed(
            f"secret_file of {target.name} unreadable: {exc.strerror}", permanent=True
        ) from None
    if not secret:
        raise AlertFailed(f"secret_file of {target.name} is empty", permanent=True)
    return secret


def signature(secret: bytes, raw: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret, raw, hashlib.sha256).hexdigest()


def tls_context(target: WebhookTarget) -> ssl.SSLContext:
    """A verifying client context: the system's CAs plus ``ca_file``."""
    context = ssl.create_default_context()
    if target.ca_file is not None:
        context.load_verify_locations(cafile=str(target.ca_file))
    return context


class _Connection(http.client.HTTPSConnection):
    """``http.client`` over a socket the attempt's :class:`Deadline` can cut."""

    def __init__(self, host: str, port: int | None, context: ssl.SSLContext, deadline: Deadline):
        super().__init__(host, port, timeout=deadline.op_timeout(deadline.seconds), context=context)
        self.deadline = deadline

        def create(address: Any, timeout: Any = None, source: Any = None) -> socket.socket:
            deadline.check()
            return deadline.watch(socket.create_connection(address, timeout, source))

        self._create_connection = create


def post(alert: Alert, target: WebhookTarget, deadline: Deadline | None = None) -> int:
    """POST the alert; returns the HTTP status (2xx).

    The whole exchange (connect, TLS, request, the answer's every byte) ends within
    ``timeout_seconds`` (:class:`~ich_node.delivery.deadline.Deadline`): a server that
    answers one byte a second is cut there. Redirects are not followed.

    Raises
    ------
    AlertFailed
        No connection, TLS failure, the deadline or 5xx/408/425/429 (retried, not
        before the answer's Retry-After when it has one: ``retry_after``); a 3xx
        or any other 4xx is ``permanent`` (parked with the status and the start of
        the answer, scrubbed of the alert's patient values).
    """
    raw = encode(alert, include_patient=target.include_patient)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "ich-node",
        SIGNATURE_HEADER: signature(read_secret(target), raw),
        "Idempotency-Key": alert.key,
    }
    url = urllib.parse.urlsplit(target.url)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    own = deadline is None
    deadline = deadline or Deadline(target.timeout_seconds)
    connection = _Connection(url.hostname or "", url.port, tls_context(target), deadline)
    try:
        connection.request("POST", path, body=raw, headers=headers)
        response = connection.getresponse()
        status = int(response.status)
        text = response.read(_BODY_BYTES) if not 200 <= status < 300 else b""
    except (OSError, http.client.HTTPException) as exc:
        if deadline.cut:
            raise AlertFailed(f"POST to {target.name}: {deadline.reason()}") from None
        raise AlertFailed(f"POST to {target.name}: {type(exc).__name__}: {exc}") from None
    finally:
        connection.close()
        if own:
            deadline.close()
    if 200 <= status < 300:
        return status
    charset = response.headers.get_content_charset() or "utf-8"
    permanent = 300 <= status < 500 and status not in _RETRY_STATUS
    wait = None if permanent else retry_after(response.headers.get("Retry-After"))
    raise AlertFailed(
        f"{target.name} answered HTTP {status}"
        + (
            " (redirects are not followed: set url to the final address)"
            if 300 <= status < 400
            else ""
        )
        + (f", Retry-After {wait:g} s" if wait is not None else ""),
        permanent=permanent,
        detail=scrub_peer_text(text.decode(charset, "replace")),
        retry_after=wait,
    )
