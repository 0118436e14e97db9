"""DICOM TLS (PS3.15 B.1 "TLS Secure Transport Connection Profile") for pynetdicom.

The listener gets a server context from ``node.tls``; each destination with a
``tls`` section gets a client context. Both require TLS 1.2 or later and
certificate verification (the server verifies callers' certificates when
``require_client_cert`` is set; the client always verifies the destination).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ich_node.config import ClientTLS, ServerTLS


class TLSFileError(ValueError):
    """A TLS file that cannot be used; ``key`` names its configuration key, ``path`` the file."""

    def __init__(self, key: str, path: Path, problem: str) -> None:
        super().__init__(f"{key}: {path}: {problem}")
        self.key = key
        self.path = path
        self.problem = problem


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _load_pair(context: ssl.SSLContext, cert: Path, key: Path, prefix: str) -> None:
    """Load a certificate (chain) and its key into ``context``, naming the file at fault.

    Raises
    ------
    TLSFileError
        ``<prefix>.cert`` when the certificate cannot be read or parsed,
        ``<prefix>.key`` when the key cannot be read or parsed or does not match it.
    """
    for name, path in (("cert", cert), ("key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TLSFileError(f"{prefix}.{name}", path, f"cannot be read: {_why(exc)}") from exc
    try:  # the certificates alone, parsed as they would be as trust anchors
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert))
    except (OSError, ValueError) as exc:
        raise TLSFileError(f"{prefix}.cert", cert, f"not a PEM certificate: {_why(exc)}") from exc
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ValueError) as exc:
        mismatch = isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH"
        why = (
            f"does not match {prefix}.cert ({cert})"
            if mismatch
            else (f"not a usable PEM private key: {_why(exc)}")
        )
        raise TLSFileError(f"{prefix}.key", key, why) from exc


def _load_ca(context: ssl.SSLContext, ca: Path, key: str) -> None:
    try:
        with open(ca, "rb"):
            pass
    except OSError as exc:
        raise TLSFileError(key, ca, f"cannot be read: {_why(exc)}") from exc
    try:
        context.load_verify_locations(cafile=str(ca))
    except (OSError, ValueError) as exc:
        why = f"cannot be loaded as PEM CA certificates: {_why(exc)}"
        raise TLSFileError(key, ca, why) from exc


def server_context(config: ServerTLS) -> ssl.SSLContext:
    """The listener's TLS context.

    Raises
    ------
    TLSFileError
        When a certificate or key file cannot be loaded, or the key does not
        match the certificate (the message names the key, ``node.tls.*``, and the file).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(context, config.cert, config.key, "node.tls")
    if config.ca is not None:
        _load_ca(context, config.ca, "node.tls.ca")
    # CERT_OPTIONAL verifies a certificate the caller sends; CERT_REQUIRED also
    # refuses a caller that sends none.
    if config.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif config.ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(config: ClientTLS, name: str = "destination", key: str = "") -> ssl.SSLContext:
    """A context to reach one destination; verifies its certificate against ``ca``.

    ``key`` is the configuration key of ``config`` named in errors (default
    ``destinations[<name>].tls``).

    Raises
    ------
    TLSFileError
        When a file cannot be loaded (the message names its key and the file).
    """
    prefix = key or f"destinations[{name}].tls"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = config.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_ca(context, config.ca, f"{prefix}.ca")
    if config.cert is not None and config.key is not None:
        _load_pair(context, config.cert, config.key, prefix)
    return context
