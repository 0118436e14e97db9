"""Email alerts: SMTP (stdlib ``smtplib``) with STARTTLS and credentials from a file.

The subject carries no patient data (no name, ID, birth date or accession
number): only the answer and a short reference. The body gives the findings,
the notice, model name and version and the UIDs; a small PNG of the most
suspicious slice, with the notice burned in, is attached when
``attach_key_image`` is true. The Message-ID is derived from the idempotency key.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from email.message import EmailMessage
from email.utils import formatdate

from ich_node.config import EmailTarget
from ich_node.delivery.alerts import Alert, AlertFailed, findings_text, preliminary_text
from ich_node.delivery.deadline import Deadline
from ich_node.log import scrub_peer_text


def subject(alert: Alert) -> str:
    """The subject line: answer and reference only, never patient data."""
    head = {"C": "CORRECTED ", "P": "Preliminary "}.get(alert.status, "")
    answer = "positive" if alert.positive else "negative"
    return f"{head}ICH AI triage alert: {answer} (ref {alert.key[:8]})"


def build_message(alert: Alert, target: EmailTarget, key_image: bytes | None) -> EmailMessage:
    """The email of an alert (RFC 5322), with the key image when given and wanted."""
    message = EmailMessage()
    message["Subject"] = subject(alert)
    message["From"] = target.from_
    message["To"] = ", ".join(target.to)
    message["Date"] = formatdate(alert.result_time, usegmt=True)
    message["Message-ID"] = f"<{alert.key}@ich-node>"
    lines = [alert.notice, "", *findings_text(alert), ""]
    if alert.status == "P":
        lines += [preliminary_text(alert), ""]
    if alert.status == "C":
        lines += [f"This corrects the alert with reference {(alert.supersedes or '')[:8]}.", ""]
    lines += [
        f"Model: {alert.model_name} {alert.model_version}" + (" (DEMO)" if alert.demo else ""),
        f"Result time: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(alert.result_time))}",
        f"Accession number: {alert.accession_number or '(none)'}",
        f"Study Instance UID: {alert.study_instance_uid}",
        f"Series Instance UID: {alert.series_instance_uid} (version {alert.version})",
        f"Idempotency key: {alert.key}",
    ]
    if alert.key_slice is not None:
        lines.append(
            f"Key image: slice {alert.key_slice.index + 1} of {alert.n_slices} "
            f"(any p={alert.key_slice.probability:.2f})"
        )
    message.set_content("\n".join(lines) + "\n")
    if key_image is not None and target.attach_key_image:
        message.add_attachment(key_image, maintype="image", subtype="png", filename="key-image.png")
    return message


def read_credentials(target: EmailTarget) -> tuple[str, str] | None:
    """(user, password) from ``credentials_file`` (two lines), or ``None`` without one.

    Raises
    ------
    AlertFailed
        When the file cannot be read or lacks two lines (permanent until fixed).
    """
    if target.credentials_file is None:
        return None
    try:
        lines = target.credentials_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AlertFailed(
            f"credentials_file of {target.name} unreadable: {exc.strerror}", permanent=True
        ) from None
    if len(lines) < 2 or not lines[0]:
        raise AlertFailed(
            f"credentials_file of {target.name} needs the user on line 1, the password on line 2",
            permanent=True,
        )
    return lines[0], lines[1]


class _SMTP(smtplib.SMTP):
    """``smtplib.SMTP`` whose sockets the attempt's :class:`Deadline` can cut.

    smtplib's timeout bounds each read: a server that sends a ``220-`` continuation
    line every two seconds would hold it forever. The socket is handed to the
    deadline as soon as it is connected, before the greeting is read.
    """

    def __init__(self, deadline: Deadline) -> None:
        super().__init__(timeout=deadline.op_timeout(deadline.seconds))
        self.deadline = deadline

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        self.deadline.check()
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        return self.deadline.watch(sock)


def _reply(exc: smtplib.SMTPResponseException) -> str:
    text = exc.smtp_error
    return scrub_peer_text(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


def send_email(
    alert: Alert, target: EmailTarget, key_image: bytes | None, deadline: Deadline | None = None
) -> int:
    """Send the alert's email to every address of ``to``; returns how many were refused.

    Some recipients refused and others accepted: delivered (sending again would
    reach the others twice); the count is logged. The whole session (connect,
    greeting, STARTTLS, login, message) ends within ``timeout_seconds``.

    Raises
    ------
    AlertFailed
        No connection, TLS failure, the deadline or a 4xx answer (retried); failed
        login or a 5xx refusal of the message or of every recipient
        (``permanent``). The server's reply text is kept, scrubbed and cut.
    """
    message = build_message(alert, target, key_image)
    credentials = read_credentials(target)
    own = deadline is None
    deadline = deadline or Deadline(target.timeout_seconds)
    try:
        with _SMTP(deadline) as smtp:
            smtp._host = target.host  # type: ignore[attr-defined]  # STARTTLS checks the name
            smtp.connect(target.host, target.port)
            if target.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if credentials is not None:
                smtp.login(*credentials)
            refused = smtp.send_message(message)
    except smtplib.SMTPAuthenticationError as exc:
        message_ = f"{target.name} refused the login ({exc.smtp_code})"
        raise AlertFailed(message_, permanent=True, detail=_reply(exc)) from None
    except smtplib.SMTPRecipientsRefused as exc:
        codes = sorted({code for code, _ in exc.recipients.values()})
        raise AlertFailed(
            f"{target.name} refused every recipient ({codes})",
            permanent=all(c >= 500 for c in codes),
        ) from None
    except smtplib.SMTPResponseException as exc:
        raise AlertFailed(
            f"{target.name} answered {exc.smtp_code}",
            permanent=exc.smtp_code >= 500,
            detail=_reply(exc),
        ) from None
    except (smtplib.SMTPException, OSError) as exc:
        if deadline.cut:
            raise AlertFailed(f"SMTP to {target.name}: {deadline.reason()}") from None
        raise AlertFailed(f"SMTP to {target.name}: {type(exc).__name__}: {exc}") from None
    finally:
        if own:
            deadline.close()
    return len(refused)
