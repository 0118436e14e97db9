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
import json
import ssl
import time
import urllib.error
import urllib.request
from typing import Any, Final

from ich_node.config import WebhookTarget
from ich_node.delivery.alerts import Alert, AlertFailed

SIGNATURE_HEADER: Final = "X-ICH-Signature"
#: Answers that say "try again later" (RFC 9110 408, RFC 6585 429).
_RETRY_STATUS: Final = (408, 425, 429)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would follow a 301/302 with a GET and no body, and a 2xx answer to that
    # GET would count as delivered: an alert lost. A 3xx is an error here instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def body(alert: Alert, *, include_patient: bool = False) -> dict[str, Any]:
    """The JSON document of an alert (keys stable; fields are only ever added)."""
    doc: dict[str, Any] = {
        "idempotency_key": alert.key,
        "supersedes": alert.supersedes,
        "status": "correction" if alert.status == "C" else "final",
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


def post(alert: Alert, target: WebhookTarget) -> int:
    """POST the alert; returns the HTTP status (2xx).

    Raises
    ------
    AlertFailed
        No connection, TLS failure, timeout or 5xx/408/425/429 (retried); a 3xx
        (redirects are not followed) or any other 4xx is ``permanent`` (parked
        with the status and the start of the answer).
    """
    raw = encode(alert, include_patient=target.include_patient)
    request = urllib.request.Request(
        target.url,
        data=raw,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "ich-node",
            SIGNATURE_HEADER: signature(read_secret(target), raw),
            "Idempotency-Key": alert.key,
        },
    )
    opener = urllib.request.build_opener(
        _NoRedirect, urllib.request.HTTPSHandler(context=tls_context(target))
    )
    try:
        with opener.open(request, timeout=target.timeout_seconds) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        text = exc.read(300).decode("utf-8", "replace") if exc.fp is not None else ""
        raise AlertFailed(
            f"{target.name} answered HTTP {exc.code}"
            + (
                " (redirects are not followed: set url to the final address)"
                if 300 <= exc.code < 400
                else ""
            ),
            permanent=300 <= exc.code < 500 and exc.code not in _RETRY_STATUS,
            detail=text,
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AlertFailed(f"POST to {target.name}: {type(reason).__name__}: {reason}") from None
