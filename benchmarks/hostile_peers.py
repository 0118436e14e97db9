"""The hostile-peer attacks of issue 20, measured against a listener subprocess.

Run from this checkout; ``--code`` chooses the checkout whose listener is
measured (default: this one)::

    PYTHONPATH=. python benchmarks/hostile_peers.py [--code ../other] [--out results.json]

Each attack is short and bounded; figures are counts, RSS in MB and seconds.
The before/after table in ``docs/reliability.md`` comes from this script run
once against the code before the guard and once after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.test_hostile_peers import _SERVE, _flood, _rss_mb, associate_rq, first_reply

ECHOSCU = "/usr/bin/echoscu"
CODE = [str(Path(__file__).resolve().parents[1])]


def _echo(port: int, *extra: str, timeout: float = 15.0) -> bool:
    try:
        run = subprocess.run(
            [ECHOSCU, *extra, "-to", "10", "-ta", "10", "-aet", "MODALITY", "-aec", "ICH_NODE",
             "127.0.0.1", str(port)],
            capture_output=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return run.returncode == 0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pki(d: Path) -> None:
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=ca")  # fmt: skip
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=server")  # fmt: skip
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext")  # fmt: skip


class Node:
    def __init__(self, tmp: Path, **node: Any) -> None:
        self.port = _port()
        config = {
            "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": self.port, **node},
            "callers": [{"ae_title": "MODALITY"}],
            "storage": {"dir": str(tmp / f"node{self.port}"), "min_free_mb": 0},
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, json.dumps(config)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": CODE[0]}, cwd=CODE[0],
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"ready"

    def rss(self) -> float:
        return _rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def tls_idle(tmp: Path) -> dict[str, Any]:
    pki = tmp / "pki"
    pki.mkdir()
    _pki(pki)
    tls = {"cert": str(pki / "server.crt"), "key": str(pki / "server.key")}
    node = Node(tmp, tls=tls)
    idle = socket.create_connection(("127.0.0.1", node.port))
    ok = sum(_echo(node.port, "+tla", "+cf", str(pki / "ca.crt")) for _ in range(3))
    idle.close()
    node.stop()
    return {"tls_echo_ok": ok, "of": 3}


def slow_drip(tmp: Path) -> dict[str, Any]:
    node = Node(tmp, max_associations=4)
    rq = associate_rq()
    drips = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(4)]
    for s in drips:
        s.sendall(rq[:7])
    time.sleep(0.5)
    started, ok, tries, first_ok = time.monotonic(), 0, 0, None
    while time.monotonic() - started < 20:
        for s in drips:
            with contextlib.suppress(OSError):  # cut by the listener
                s.sendall(rq[7 + tries % 50 : 8 + tries % 50])
        tries += 1
        if _echo(node.port):
            ok += 1
            first_ok = first_ok or round(time.monotonic() - started, 1)
        time.sleep(1.0)
    for s in drips:
        s.close()
    node.stop()
    return {"echo_ok": ok, "of": tries, "first_ok_s": first_ok, "window_s": 20}


def garbage(tmp: Path) -> dict[str, Any]:
    node = Node(tmp)  # max_associations 8
    for _ in range(16):
        s = socket.create_connection(("127.0.0.1", node.port))
        s.sendall(os.urandom(10))
        s.close()
    time.sleep(0.5)
    ok = sum(_echo(node.port) for _ in range(3))
    node.stop()
    return {"echo_ok_right_after": ok, "of": 3}


def oversized(tmp: Path) -> dict[str, Any]:
    node = Node(tmp)
    before = node.rss()
    s = socket.create_connection(("127.0.0.1", node.port))
    s.sendall(struct.pack(">BBL", 0x01, 0, 2**30))
    s.settimeout(1)
    try:
        reply = s.recv(6)[:1].hex() or "closed"
    except TimeoutError:
        reply = "none"
    sent = _flood(s, 200 << 20)
    time.sleep(1)
    peak = node.rss()
    s.close()
    time.sleep(1)
    after = node.rss()
    node.stop()
    return {"reply_to_header": reply, "sent_mb": sent >> 20, "rss_before_mb": round(before),
            "rss_during_mb": round(peak), "rss_after_close_mb": round(after)}  # fmt: skip


def even_context(tmp: Path) -> dict[str, Any]:
    node = Node(tmp)
    s = socket.create_connection(("127.0.0.1", node.port))
    s.sendall(associate_rq(contexts=((2, "1.2.840.10008.1.1"),)))
    started = time.monotonic()
    reply = first_reply(s, timeout=15)
    waited = round(time.monotonic() - started, 1)
    s.close()
    node.stop()
    return {"reply": "none" if reply is None else f"0x{reply:02X}", "waited_s": waited}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, help="checkout whose listener is measured")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for all attacks")
    args = parser.parse_args()
    started = time.monotonic()
    if args.code:
        CODE[0] = str(args.code.resolve())
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for attack in (tls_idle, slow_drip, garbage, oversized, even_context):
            if time.monotonic() - started > args.budget:
                print(f"(budget: {attack.__name__} skipped)", flush=True)
                continue
            folder = Path(d) / attack.__name__
            folder.mkdir()
            results[attack.__name__] = attack(folder)
            print(attack.__name__, results[attack.__name__], flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
