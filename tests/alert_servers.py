"""Real alert receivers on 127.0.0.1 for the tests: MLLP, HTTPS and SMTP.

- :class:`MLLPServer`: python-hl7's asyncio MLLP server in a thread; answers each
  message with an ACK built by python-hl7 (AA, AE with a text, or after a delay).
- :class:`WebhookServer`: ``http.server`` behind TLS with a certificate signed by a
  CA made here (openssl); checks ``X-ICH-Signature`` against the shared secret.
- :class:`SMTPServer`: aiosmtpd with STARTTLS (same CA) and a login.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.server
import json
import logging
import shutil
import socket
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
        self.answer = b"ok"  # the body of every answer
        self.headers: dict[str, str] = {}  # more header fields of every answer
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
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(outer.answer)))
                for name, value in outer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(outer.answer)

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
        self.reply = "250 OK"  # what DATA is answered (a 5xx refuses the message)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        if self.reply.startswith("2"):
            self.sink.append(message)  # type: ignore[arg-type]
        return self.reply


class SMTPServer:
    """aiosmtpd on 127.0.0.1 with STARTTLS required and a login (``user``/``secret``)."""

    def __init__(
        self, ca: CertAuthority, user: str = "node", password: str = "s3cret", port: int = 0
    ) -> None:
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
        self.handler = _Collect(self.messages)
        self.controller = Controller(
            self.handler,
            hostname="127.0.0.1",
            port=port or free_port(),
            tls_context=context,
            require_starttls=True,
            authenticator=authenticator,
            auth_required=True,
        )
        self.controller.start()
        self.port = self.controller.port

    def close(self) -> None:
        self.controller.stop()


class DripServer:
    """A receiver that never finishes answering: one more piece every ``interval`` s.

    ``kind="https"``: TLS (the test CA), reads the request, then sends an HTTP answer
    one byte at a time. ``kind="smtp"``: plain TCP, sends ``220-`` continuation lines
    of the greeting, one at a time, and never the last line. ``connections`` counts
    the connections taken; ``arrived`` holds each HTTPS request's head.
    """

    def __init__(self, kind: str, ca: CertAuthority | None = None, interval: float = 1.0) -> None:
        self.kind = kind
        self.interval = interval
        self.connections = 0
        self.arrived: list[bytes] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}/hooks/ich"
        self.context = None
        if kind == "https":
            assert ca is not None
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(ca.cert, ca.key)
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        try:
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
                conn.settimeout(10)
                self.arrived.append(conn.recv(65536))
                pieces = (bytes([b]) for b in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" * 1000)
            else:
                pieces = (f"220-still greeting {i}\r\n".encode() for i in range(100000))
            for piece in pieces:
                if self.stopped.wait(self.interval):
                    return
                conn.sendall(piece)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):  # wakes the accept() (a close alone does not)
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    """Poll ``predicate`` until true (bounded); returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
