"""The listener against hostile peers (issue 20), with raw sockets on 127.0.0.1.

Each attack is bounded in count and time; no test asserts a wall-clock figure
beyond generous deadlines (the negotiation deadline plus a few seconds). These
tests also fail if a pynetdicom upgrade changes the extension points that
``ich_node.ingest.guard`` uses (the DUL's ``recv(6)`` then ``recv(length)``,
``make_server(server_class=...)``, ``request_handler``, EVT_REQUESTED rejects).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from ich_node.config import NodeConfig, parse_config
from ich_node.ingest.guard import (
    LOG_INTERVAL_S,
    Connection,
    Guard,
    GuardedServer,
    GuardLimits,
)
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool
from ich_node.metrics import Metrics
from ich_node.queue.store import Store
from tests import test_security
from tests.conftest import dcmtk

DEADLINE = 3.0  # node.negotiation_timeout in these tests (default 10 s)
SLACK = 6.0  # "a few seconds" on top of it, generous on two busy cores
IMPLICIT_LE = "1.2.840.10008.1.2"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"
REFUSED = "ich_node_associations_refused_total"
pki = test_security.pki  # the module-scoped test PKI (CA, server and client certificates)


# -- raw PDUs (PS3.8 9.3) ----------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(
    calling: bytes = b"MODALITY",
    called: bytes = b"ICH_NODE",
    contexts: tuple[tuple[int, str], ...] = ((1, Verification),),
) -> bytes:
    """An A-ASSOCIATE-RQ PDU, with context IDs exactly as given (even ones too)."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
    body += _item(0x10, APP_CONTEXT.encode())
    for context_id, abstract in contexts:
        sub = _item(0x30, abstract.encode()) + _item(0x40, IMPLICIT_LE.encode())
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">L", 16382)) + _item(0x52, b"1.2.3.4"))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


def first_reply(sock: socket.socket, timeout: float = 10.0) -> int | None:
    """The PDU type the listener answers with, or None when it just closed."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(6)
    except (ConnectionResetError, TimeoutError):
        return None
    return data[0] if data else None


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the listener closes ``sock`` within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            if not sock.recv(4096):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def dcmtk_echo(port: int, *extra: str, timeout: float = 30.0) -> int:
    run = subprocess.run(
        [dcmtk("echoscu"), *extra, "-to", "20", "-ta", "20",
         "-aet", "MODALITY", "-aec", "ICH_NODE", "127.0.0.1", str(port)],
        capture_output=True, timeout=timeout,
    )  # fmt: skip
    return run.returncode


def pynetdicom_echo(port: int, calling: str = "MODALITY", source: str = "127.0.0.1") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 20
    return ae.associate("127.0.0.1", port, ae_title="ICH_NODE", bind_address=(source, 0))


def eventually(what: str, check: Callable[[], bool], within: float) -> float:
    """Poll ``check`` until true; the seconds it took (fails after ``within``)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, f"{what} not within {within} s"
        time.sleep(0.1)
    return time.monotonic() - started


def refused(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value(REFUSED, {"reason": reason}) or 0.0


# -- a listener ---------------------------------------------------------------------


def _config(tmp_path: Path, port: int, **node: Any) -> NodeConfig:
    return parse_config(
        {
            "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": port,
                     "negotiation_timeout": DEADLINE, **node},
            "callers": ({"ae_title": "MODALITY"}, {"ae_title": "FAR_AWAY", "host": "10.255.255.1"}),
            "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 0},
        }
    )  # fmt: skip


Start = Callable[..., tuple[GuardedServer, Metrics]]


@pytest.fixture
def listen(tmp_path: Path, free_port: int) -> Iterator[Start]:
    """Start a listener on ``free_port`` with the given ``node`` settings."""
    started: list[tuple[GuardedServer, Store]] = []

    def start(**node: Any) -> tuple[GuardedServer, Metrics]:
        config = _config(tmp_path, free_port, **node)
        store = Store.open(config.storage.dir)
        metrics = Metrics()
        server = start_listener(config, Spool(config.storage.dir, store, 0), metrics=metrics)
        started.append((server, store))
        return server, metrics

    yield start
    for server, store in started:
        server.shutdown()
        store.close()


# -- TLS: the handshake is not in the accept loop --------------------------------------


def test_idle_tls_connections_do_not_block_a_dcmtk_tls_echo(
    listen: Start, free_port: int, pki: Path
) -> None:
    tls = {
        "cert": str(pki / "server.crt"),
        "key": str(pki / "server.key"),
        "ca": str(pki / "ca.crt"),
    }
    _, metrics = listen(tls=tls)
    idle = connect(free_port)  # sends nothing
    half = connect(free_port)  # half a ClientHello
    half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(16)))
    try:
        # Before: every TLS echo failed while one such connection was held.
        assert dcmtk_echo(free_port, "+tla", "+cf", str(pki / "ca.crt")) == 0
        # Both are shut down by the negotiation deadline, counted by reason.
        assert closed_by_peer(idle, DEADLINE + SLACK)
        assert closed_by_peer(half, DEADLINE + SLACK)
        eventually("the count", lambda: refused(metrics, "negotiation_timeout") == 2, SLACK)
    finally:
        idle.close()
        half.close()


# -- slow drip: a fixed deadline, pending connections apart from associations ----------


def _drip(port: int, n: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """``n`` peers that send an A-ASSOCIATE-RQ header and then one byte now and then."""
    socks = []
    rq = associate_rq()
    for _ in range(n):
        sock = connect(port, source)
        sock.sendall(rq[:7])
        socks.append(sock)
    return socks


def test_slow_drip_peers_neither_hold_association_slots_nor_outlive_the_deadline(
    listen: Start, free_port: int
) -> None:
    _, metrics = listen(max_associations=4)
    drips = _drip(free_port, 4)
    try:
        for k in range(2):  # a byte each, as a slow-drip peer does, before the echo
            for sock in drips:
                sock.sendall(associate_rq()[7 + k : 8 + k])
        # Before: 17 of 17 legitimate echoes were refused ("local limit exceeded").
        assert dcmtk_echo(free_port) == 0
        # Dripping on does not extend the deadline: a total time, not an idle time.
        started = time.monotonic()
        open_ = list(drips)
        while open_ and time.monotonic() - started < DEADLINE + SLACK:
            for sock in list(open_):
                try:
                    sock.sendall(b"\x00")
                except OSError:
                    open_.remove(sock)
            time.sleep(0.3)
        assert not open_, f"{len(open_)} slow-drip peers still connected"
        assert refused(metrics, "negotiation_timeout") == 4
        assert dcmtk_echo(free_port) == 0
    finally:
        for sock in drips:
            sock.close()


def test_pending_limit_per_host_leaves_other_hosts_and_later_callers_in(
    listen: Start, free_port: int
) -> None:
    _, metrics = listen(max_associations=4, max_pending_per_host=2)
    drips = _drip(free_port, 2)
    try:
        # Another address is not held up by this one's pending connections.
        other = pynetdicom_echo(free_port, source="127.0.0.2")
        assert other.is_established
        assert other.send_c_echo().Status == 0x0000
        other.release()
        # The same address gets in again by the deadline (its drippers are cut).
        took = eventually("an echo from the dripping host", lambda: dcmtk_echo(free_port) == 0,
                          DEADLINE + SLACK)  # fmt: skip
        assert took < DEADLINE + SLACK
        assert refused(metrics, "negotiation_timeout") == 2
    finally:
        for sock in drips:
            sock.close()


# -- pending slots shared fairly: networks and known callers -----------------------------


def _silent(port: int, sources: list[str], each: int) -> list[socket.socket]:
    """``each`` connections from every address in ``sources`` that never send a byte."""
    socks = []
    for source in sources:
        for _ in range(each):
            socks.append(connect(port, source))
    return socks


def test_silent_connections_from_four_addresses_of_one_network_leave_a_known_caller_in(
    listen: Start, free_port: int
) -> None:
    # Long enough that the silent connections hold their slots through every echo.
    server, metrics = listen(negotiation_timeout=60)  # max_pending 32, 8 per host
    known = pynetdicom_echo(free_port)  # 127.0.0.1 has associated: a known caller
    assert known.is_established
    known.release()
    # 32 silent connections from 4 addresses of 127.0.0.0/24, 8 each (the per-host limit).
    socks = _silent(free_port, [f"127.0.0.{i}" for i in range(2, 6)], 8)
    try:
        eventually(
            "the refusals", lambda: refused(metrics, "too_many_pending_from_network") == 16, SLACK
        )
        assert sum(server.guard.counts()) == 16
        # Before: 32 pending filled every slot, and a caller got through 9 times in 30.
        assert all(dcmtk_echo(free_port) == 0 for _ in range(10))
        # A caller from another network, never seen, gets a slot too.
        other = pynetdicom_echo(free_port, source="127.0.1.7")
        assert other.is_established
        other.release()
        assert refused(metrics, "too_many_pending") == 0
    finally:
        for sock in socks:
            sock.close()


def test_silent_connections_from_many_networks_leave_the_reserve_to_known_callers(
    listen: Start, free_port: int
) -> None:
    server, metrics = listen(negotiation_timeout=60)  # reserve: a quarter of 32
    known = pynetdicom_echo(free_port)
    assert known.is_established
    known.release()
    # Four networks, eight each: 24 slots are all an unknown peer may take.
    socks = _silent(free_port, [f"127.0.{n}.1" for n in range(11, 15)], 8)
    try:
        eventually("the refusals", lambda: refused(metrics, "too_many_pending") == 8, SLACK)
        assert sum(server.guard.counts()) == 24
        assert all(dcmtk_echo(free_port) == 0 for _ in range(5))  # known: in the reserve
        stranger = pynetdicom_echo(free_port, source="127.0.20.1")  # unknown: refused
        assert not stranger.is_established
    finally:
        for sock in socks:
            sock.close()


def test_the_network_of_an_address() -> None:
    from ich_node.ingest.guard import network_of

    assert network_of("192.0.2.77") == "192.0.2.0/24"
    assert network_of("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert network_of("fe80::1%eth0") == "fe80::/64"
    assert network_of("not an address") == "not an address"


# -- garbage connections free their slot when they close ---------------------------------


def test_garbage_connections_that_closed_free_their_slots_at_once(
    listen: Start, free_port: int
) -> None:
    server, metrics = listen()  # max_associations 8
    for i in range(16):
        sock = connect(free_port)
        if i % 4 == 0:
            sock.sendall(bytes([(0x00, 0x08, 0x41, 0xFF)[i // 4]]) + b"junk junk")  # no PDU type
        elif i % 4 == 1:
            sock.sendall(associate_rq(calling=b" " * 16))  # a blank calling AE title
        elif i % 4 == 2:
            sock.sendall(b"\x01\x00\x00\x00\x00\x04junk")  # an RQ too short to decode
        sock.close()  # (i % 4 == 3: nothing at all)
    # Before: the slots stayed taken ~30 s; 1 of 24 echoes got through.
    assert dcmtk_echo(free_port) == 0
    eventually("the connections' threads to end",
               lambda: len(server.active_associations) == 0, SLACK)  # fmt: skip
    assert server.guard.counts() == (0, 0)
    assert refused(metrics, "malformed_pdu") >= 8
    assert refused(metrics, "closed_before_request") >= 4


# -- oversized PDUs: checked at the header, memory bounded -------------------------------

_SERVE = """
import json, sys, time
from ich_node.config import parse_config
from ich_node.ingest.listener import start_listener
from ich_node.log import configure_logging
from ich_node.ingest.spool import Spool
from ich_node.queue.store import Store
configure_logging("json", "INFO")  # to stderr
config = parse_config(json.loads(sys.argv[1]))
store = Store.open(config.storage.dir)
start_listener(config, Spool(config.storage.dir, store, 0))
print("ready", flush=True)
time.sleep(600)
"""


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _flood(sock: socket.socket, total: int) -> int:
    """Send up to ``total`` bytes; how many went before the listener closed."""
    chunk = bytes(1 << 20)
    sent = 0
    sock.settimeout(20)
    try:
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    return sent


def test_oversized_pdus_are_aborted_at_the_header_and_rss_stays_bounded(
    tmp_path: Path, free_port: int
) -> None:
    config = {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port},
        "callers": [{"ae_title": "MODALITY"}],
        "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 0},
    }
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, json.dumps(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": repo}, cwd=repo)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        before = _rss_mb(proc.pid)
        # 1. Before any association: a header claiming 1 GB, then 200 MB.
        sock = connect(free_port)
        sock.sendall(struct.pack(">BBL", 0x01, 0, 2**30))
        assert first_reply(sock) == 0x07  # A-ABORT, sent on the header alone
        sent = _flood(sock, 200 << 20)
        sock.close()
        # 2. Inside an association: a P-DATA-TF claiming 1 GB, then 200 MB.
        sock = connect(free_port)
        sock.sendall(associate_rq())
        assert first_reply(sock) == 0x02  # A-ASSOCIATE-AC
        sock.recv(1 << 16)  # rest of the AC
        sock.sendall(struct.pack(">BBL", 0x04, 0, 2**30))
        assert first_reply(sock) == 0x07
        sent += _flood(sock, 200 << 20)
        sock.close()
        grew = _rss_mb(proc.pid) - before
        # Before: 300 MB in one P-DATA took the listener from 78 to 1,196 MB.
        assert grew < 100, f"listener RSS grew by {grew:.0f} MB ({sent >> 20} MB sent)"
        assert dcmtk_echo(free_port) == 0
    finally:
        proc.kill()
        proc.wait(10)


def test_a_dataset_larger_than_max_dataset_mb_is_aborted(
    listen: Start, free_port: int, phantom_series: Any, tmp_path: Path
) -> None:
    """A real C-STORE (pynetdicom SCU, 16 KB PDUs) whose dataset passes the limit."""
    _, metrics = listen(max_dataset_mb=1)
    small = phantom_series.paths[0]  # 256 x 256: about 130 KB
    big = pydicom.dcmread(small)
    big.Rows = big.Columns = 1024  # 2 MB of pixel data
    big.PixelData = bytes(1024 * 1024 * 2)
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", free_port, ae_title="ICH_NODE")
    assert assoc.is_established
    assert assoc.send_c_store(small).Status == 0x0000  # under the limit: stored
    status = assoc.send_c_store(path)
    assert "Status" not in status  # no answer: the association was aborted
    # A-ABORT and the connection closed: the SCU's association ends.
    eventually("the SCU to see the abort", lambda: not assoc.is_established, SLACK)
    assert refused(metrics, "dataset_too_large") == 1


@pytest.mark.parametrize(
    "pdv",
    [
        struct.pack(">LBB", 6, 3, 0x03) + bytes(4),  # context 3 was not proposed
        struct.pack(">LBB", 6, 2, 0x03) + bytes(4),  # an even context ID
        struct.pack(">LBB", 1, 1, 0x03),  # an item length below 2
        struct.pack(">LBB", 600, 1, 0x03) + bytes(4),  # an item longer than the PDU
    ],
    ids=["unknown-context", "even-context", "short-item", "overlong-item"],
)
def test_malformed_pdata_in_an_association_is_aborted(
    listen: Start, free_port: int, pdv: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    _, metrics = listen()
    sock = connect(free_port)
    try:
        sock.sendall(associate_rq())
        assert first_reply(sock) == 0x02
        sock.recv(1 << 16)
        sock.sendall(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
        assert first_reply(sock) == 0x07
        eventually("the count", lambda: refused(metrics, "malformed_pdu") == 1, SLACK)
    finally:
        sock.close()
    assert dcmtk_echo(free_port) == 0
    assert "Traceback" not in capfd.readouterr().err


def test_a_peer_resetting_mid_pdu_logs_one_line_without_traceback(
    listen: Start, free_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    listen()
    sock = connect(free_port)
    sock.sendall(associate_rq())
    assert first_reply(sock) == 0x02
    sock.recv(1 << 16)
    sock.sendall(struct.pack(">BBL", 0x04, 0, 1000) + bytes(10))
    time.sleep(0.3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST: pynetdicom's DUL logs the failed read with LOGGER.exception
    eventually("the DUL's line", lambda: any("entire PDU" in r.getMessage()
                                             for r in caplog.records), SLACK)  # fmt: skip
    records = [r for r in caplog.records if r.name.startswith("pynetdicom")]
    assert records and all(r.exc_info is None for r in records)
    assert dcmtk_echo(free_port) == 0


# -- malformed requests: RJ or A-ABORT, a log line, never a traceback -----------------------


@pytest.mark.parametrize(
    "rq",
    [
        associate_rq(contexts=((2, Verification),)),  # even ID (PS3.8 9.3.2.2: odd)
        associate_rq(contexts=((0, Verification),)),
        associate_rq(contexts=((1, Verification), (1, Verification))),  # duplicate ID
        associate_rq(calling=b" " * 16),
    ],
    ids=["even-context-id", "context-id-0", "duplicate-context-id", "blank-calling-ae"],
)
def test_malformed_request_gets_reject_or_abort_and_no_traceback(
    listen: Start, free_port: int, rq: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    _, metrics = listen()
    sock = connect(free_port)
    with structlog.testing.capture_logs() as logs:
        sock.sendall(rq)
        # Before: an even ID killed the protocol thread; the client got nothing.
        assert first_reply(sock) in (0x03, 0x07)
        sock.close()
        eventually("the count", lambda: refused(metrics, "malformed_pdu") == 1, SLACK)
    lines = [e for e in logs if e["event"] == "association.refused"]
    assert [e["reason"] for e in lines] == ["malformed_pdu"]
    assert lines[0]["peer"].startswith("127.0.0.1:")
    assert dcmtk_echo(free_port) == 0
    assert "Traceback" not in capfd.readouterr().err


# -- every refusal visible (issue 19, point 5) ----------------------------------------------


def test_each_refused_association_logs_one_line_and_counts_its_reason(
    listen: Start, free_port: int
) -> None:
    _, metrics = listen(max_associations=1)
    held = pynetdicom_echo(free_port, source="127.0.0.9")
    assert held.is_established
    tries = {
        "calling_ae_not_recognised": ("STRANGER", Verification, "127.0.0.2"),
        "calling_ae_wrong_host": ("FAR_AWAY", Verification, "127.0.0.3"),
        "no_acceptable_context": ("MODALITY", MRImageStorage, "127.0.0.4"),
        "too_many_associations": ("MODALITY", Verification, "127.0.0.5"),
    }
    expected_rj = {
        "calling_ae_not_recognised": (1, 1, 3),
        "calling_ae_wrong_host": (1, 1, 3),
        "no_acceptable_context": (1, 1, 1),
        "too_many_associations": (2, 3, 2),
    }
    with structlog.testing.capture_logs() as logs:
        for reason, (calling, sop, source) in tries.items():
            ae = AE(ae_title=calling)
            ae.add_requested_context(sop)
            assoc = ae.associate("127.0.0.1", free_port, ae_title="ICH_NODE",
                                 bind_address=(source, 0))  # fmt: skip
            assert assoc.is_rejected, reason
            rj = assoc.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == expected_rj[reason]
    held.release()
    lines = [e for e in logs if e["event"] == "association.refused"]
    assert len(lines) == len(tries)
    for line, (reason, (calling, _, source)) in zip(lines, tries.items(), strict=True):
        assert line["reason"] == reason
        assert line["calling_ae"] == calling
        assert line["peer"].startswith(f"{source}:")
        assert refused(metrics, reason) == 1


def test_a_connection_whose_thread_never_ran_is_dropped_after_twice_the_deadline() -> None:
    now = [0.0]
    guard = Guard(GuardLimits(1, 1, 1, DEADLINE, 16382, 2**20), clock=lambda: now[0])
    with socket.socket() as sock:
        conn = guard.open(sock, ("10.1.2.3", 1))
        assert conn is not None and guard.counts() == (1, 0)
        assert guard.open(sock, ("10.1.2.4", 1)) is None  # max_pending 1
        now[0] = DEADLINE  # shut down (and refused) at the deadline
        assert guard.run_once() == 1 and guard.counts() == (1, 0)
        now[0] = 2 * DEADLINE  # no thread ever closed it: dropped
        guard.run_once()
        assert guard.counts() == (0, 0)
        assert guard.open(sock, ("10.1.2.4", 1)) is not None


def test_refusals_are_logged_once_per_peer_and_reason_per_minute_and_all_counted() -> None:
    now = [1000.0]
    metrics = Metrics()
    limits = GuardLimits(1, 4, 2, DEADLINE, 16382, 2**20)
    guard = Guard(limits, metrics, clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        for i in range(5):
            guard.refuse(Connection("10.1.2.3", 40000 + i, 0.0, socket.socket()), "malformed_pdu")
        guard.refuse(Connection("10.9.9.9", 40100, 0.0, socket.socket()), "malformed_pdu")
        # Another reason from the same peer a moment later: its own line, not hidden.
        now[0] += 49
        guard.refuse(Connection("10.1.2.3", 40200, 0.0, socket.socket()), "pdu_too_large")
        now[0] += LOG_INTERVAL_S
        guard.refuse(Connection("10.1.2.3", 40300, 0.0, socket.socket()), "malformed_pdu")
    lines = [(e["peer"].split(":")[0], e["reason"], e["not_logged_since_last"]) for e in logs]
    assert lines == [
        ("10.1.2.3", "malformed_pdu", 0),
        ("10.9.9.9", "malformed_pdu", 0),
        ("10.1.2.3", "pdu_too_large", 0),
        ("10.1.2.3", "malformed_pdu", 4),
    ]
    assert refused(metrics, "malformed_pdu") == 7
    assert refused(metrics, "pdu_too_large") == 1
