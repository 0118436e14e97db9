"""How long a receiver asked the node to wait before trying again.

HTTP receivers (webhooks, DICOMweb archives) answer 429 or 503 with ``Retry-After``
(RFC 9110 10.2.3, RFC 6585 4); the sender waits at least that long before the next
attempt, at most ``sender.backoff_max_seconds``.
"""

from __future__ import annotations

import datetime
import email.utils
import time


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value (RFC 9110 10.2.3).

    Parameters
    ----------
    value : str or None
        The header: delay-seconds (``"120"``) or an HTTP-date
        (``"Wed, 21 Oct 2026 07:28:00 GMT"``).
    now : float, optional
        POSIX seconds the date is measured from; the current time by default.

    Returns
    -------
    float or None
        Seconds, at least 0; None when the header is absent or neither form.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT (RFC 9110 5.6.7)
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
