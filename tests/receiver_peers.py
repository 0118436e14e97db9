"""Peers and fixtures for the receiver tests (issue #24) and scripts/receiver_situations.py.

Only APIs that existed before issue #24 are used here, so that the script can load
this file by path and measure an older checkout with the very same peers.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import hl7

from benchmarks.common import free_port
from ich_node.config import Destination, QueueSection
from ich_node.queue.backend import job_queue
from ich_node.queue.jobs import job_id_for
from ich_node.queue.layout import outbox_files, results_dir
from ich_node.queue.store import InstanceRecord, Store

STORESCP = "/usr/bin/storescp"  # DCMTK's (the venv's bin has pynetdicom's of that name)


def job_with_results(
    storage: Path, template: Path, destinations: list[str], series: str = "1.2.3.4"
) -> str:
    """A done job whose results folder is a copy of ``template``, one delivery per name."""
    store = Store.open(storage)
    queue = job_queue(store, QueueSection())
    store.add_instance(
        InstanceRecord(f"{series}.1", "1.2", "1.2", series, "CT", "", "", "", None), storage, 1, 0.0
    )
    job = store.queue_series(series, 1, job_id_for, now=time.time())
    shutil.copytree(template, results_dir(storage, job.job_id))
    leased = queue.lease("w", now=time.time())
    assert leased is not None
    n = len(outbox_files(storage, job.job_id))
    queue.complete(leased, destinations, n, now=time.time())
    store.close()
    return job.job_id


class Storescp:
    """DCMTK's storescp on 127.0.0.1 with extra options; files land in ``folder``."""

    def __init__(self, folder: Path, *options: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [STORESCP, "-aet", "PACS", *options, "-od", str(folder), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("storescp did not start")

    def destination(self, **kw: Any) -> Destination:
        return Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=self.port, **kw)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def restricted_profile(tmp_path: Path, classes: list[str]) -> list[str]:
    """``-xf`` options: a storescp profile that accepts only ``classes`` (DCMTK names)."""
    contexts = "\n".join(f"PresentationContext{i} = {c}\\Uncompressed"
                         for i, c in enumerate(classes, start=1))  # fmt: skip
    cfg = tmp_path / "storescp.cfg"
    cfg.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n\n"
        f"[[PresentationContexts]]\n[Restricted]\n{contexts}\n\n"
        "[[Profiles]]\n[Default]\nPresentationContexts = Restricted\n"
    )
    return ["-xf", str(cfg), "Default"]


class HungPeer:
    """Accepts TCP connections and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def ack_dialect(end: str, encoding: str, msh18: str, text: str, control: str | None = None) -> Any:
    def make(message: hl7.Message) -> bytes:
        key = control if control is not None else str(message.segment("MSH")(10))
        msh = "MSH|^~\\&|RIS|HOSP|ICH_NODE|ICH_NODE|20261206120000||ACK^R01^ACK|A1|P|2.5.1"
        if msh18:
            msh += "|" * 6 + msh18
        return (msh + end + f"MSA|AA|{key}|{text}" + end).encode(encoding)

    return make
