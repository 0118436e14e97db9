"""Real alert receivers on 127.0.0.1 for the tests: MLLP, HTTPS and SMTP.

- :class:`MLLPServer`: python-hl7's asyncio MLLP server in a thread; answers each
  message with an ACK built by python-hl7 (AA, AE with a text, or after a delay).
- :class:`WebhookServer`: ``http.server`` behind TLS with a certificate signed by a
  CA made here (openssl); checks ``X-ICH-Signature`` against the shared secret.
- :class:`SMTPServer`: aiosmtpd with STARTTLS (same CA) and a login.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import logging
import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7.mllp import start_hl7_server

from benchmarks.common import free_port


@dataclass(frozen=True)
class CertAuthority:
    ca: Path  # PEM of the CA
    cert: Path  # server certificate for 127.0.0.1 / localhost
    key: Path


def make_ca(folder: Path) -> CertAuthority:
    """A self-signed CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=ich-node test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return CertAuthority(folder / "ca.pem", folder / "server.pem", folder / "server.key")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class MLLPServer:
    """``mode``: ``AA``, ``AE`` (with ``text``), ``AR``, or ``slow`` (AA after ``delay`` s).

    ``ack``, when set, makes the answer's bytes from the message (an ACK dialect:
    LF segment ends, Latin-1 text...); python-hl7's server frames them (MLLP).
    """

    mode: str = "AA"
    text: str = "Unknown accession"
    delay: float = 0.0
    messages: list[hl7.Message] = field(default_factory=list)
    port: int = 0
    ack: Any = None

    def __post_init__(self) -> None:
        self._loop = _LoopThread()
        self._server = self._loop.call(
            start_hl7_server(self._client, "127.0.0.1", 0, encoding="utf-8")
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.messages.append(message)
                if self.mode == "slow":
                    await asyncio.sleep(self.delay)
                if self.ack is not None:
                    writer.writeblock(self.ack(message))
                    await writer.drain()
                    continue
                code = "AA" if self.mode == "slow" else self.mode
                ack = message.create_ack(code)
                if code != "AA":
                    ack.segment("MSA").assign_field(self.text, 3)  # MSA-3 text message
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        self._loop.call(self._shutdown())
        self._loop.stop()


class WebhookServer:
    """HTTPS on 127.0.0.1; stores each request whose signature is right.

    ``status`` is what it answers (200 by default); a wrong signature gets 401.
    """

    def __init__(self, ca: CertAuthority, secret: bytes, port: int = 0) -> None:
        self.secret = secret
        self.status = 200
        self.delay = 0.0  # seconds before answering (the request is in `arrived` at once)
        self.arrived: list[tuple[dict[str, str], bytes]] = []
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.bad_signatures = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(outer.secret, raw, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(self.headers.get("X-ICH-Signature", ""), expected):
                    outer.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                outer.arrived.append((dict(self.headers), raw))
                if outer.delay:
                    time.sleep(outer.delay)
                if outer.status == 200:
                    outer.received.append((dict(self.headers), raw))
                self.send_response(outer.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # a request held by `delay` does not hold close
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(ca.cert, ca.key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}/hooks/ich"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for _, raw in self.received]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Collect:
    def __init__(self, sink: list[EmailMessage]) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        self.sink.append(message)  # type: ignore[arg-type]
        return "250 OK"


class SMTPServer:
    """aiosmtpd on 127.0.0.1 with STARTTLS required and a login (``user``/``secret``)."""

    def __init__(self, ca: CertAuthority, user: str = "node", password: str = "s3cret") -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self.messages: list[EmailMessage] = []
        self.logins: list[str] = []
        # aiosmtpd logs every connection at INFO from its own loop thread, which can
        # outlive the test that opened it; those lines are of no use to a test run.
        logging.getLogger("mail.log").setLevel(logging.WARNING)

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any):
            ok = isinstance(data, LoginPassword) and (
                data.login.decode(),
                data.password.decode(),
            ) == (user, password)
            if ok:
                self.logins.append(user)
            return AuthResult(success=ok)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(ca.cert, ca.key)
        self.controller = Controller(
            _Collect(self.messages),
            hostname="127.0.0.1",
            port=free_port(),
            tls_context=context,
            require_starttls=True,
            authenticator=authenticator,
            auth_required=True,
        )
        self.controller.start()
        self.port = self.controller.port

    def close(self) -> None:
        self.controller.stop()


def wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    """Poll ``predicate`` until true (bounded); returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
