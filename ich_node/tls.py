"""DICOM TLS (PS3.15 B.1 "TLS Secure Transport Connection Profile") for pynetdicom.

The listener gets a server context from ``node.tls``; each destination with a
``tls`` section gets a client context. Both require TLS 1.2 or later and
certificate verification (the server verifies callers' certificates when
``require_client_cert`` is set; the client always verifies the destination).
"""

from __future__ import annotations

import ssl

from ich_node.config import ClientTLS, ServerTLS


def server_context(config: ServerTLS) -> ssl.SSLContext:
    """The listener's TLS context.

    Raises
    ------
    ValueError
        When a certificate or key file cannot be loaded (the message names it).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(config.cert), keyfile=str(config.key))
        if config.ca is not None:
            context.load_verify_locations(cafile=str(config.ca))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"node.tls: cannot load {config.cert}, {config.key} or {config.ca}: {exc}"
        ) from exc
    # CERT_OPTIONAL verifies a certificate the caller sends; CERT_REQUIRED also
    # refuses a caller that sends none.
    if config.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif config.ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(config: ClientTLS, name: str = "destination") -> ssl.SSLContext:
    """A context to reach one destination; verifies its certificate against ``ca``.

    Raises
    ------
    ValueError
        When a file cannot be loaded (the message names the destination).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = config.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=str(config.ca))
        if config.cert is not None and config.key is not None:
            context.load_cert_chain(certfile=str(config.cert), keyfile=str(config.key))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"destination {name!r}: cannot load its tls files: {exc}") from exc
    return context
