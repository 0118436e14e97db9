"""The node's stages in the test's process, driven step by step, with real peers.

A real listener (pynetdicom) on 127.0.0.1 spools what DCMTK ``storescu`` sends into
a store on the test's backend; the test then runs the assembler, a worker (a real,
tiny model) and the sender (to a DCMTK ``storescp`` playing the PACS, and to any
alert receivers) pass by pass with :meth:`Pipeline.drain`, with time injected, so
that quiet periods and retention need no waiting.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from benchmarks.common import free_port
from ich_node.config import NodeConfig, parse_config
from ich_node.delivery.sender import Sender
from ich_node.ingest.assemble import Assembler
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool
from ich_node.queue.backend import job_queue
from ich_node.queue.store import Store
from ich_node.retention import Cleaner
from ich_node.service.worker import Worker
from tests.conftest import dcmtk

CALLER = "MODALITY"


@dataclass
class Pacs:
    """DCMTK ``storescp`` writing what it receives into ``folder``."""

    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "PACS", "-od", str(self.folder), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def received(self, modality: str | None = None) -> list[pydicom.Dataset]:
        files = sorted(p for p in self.folder.iterdir() if p.is_file())
        found = [pydicom.dcmread(p) for p in files]
        return [ds for ds in found if modality is None or ds.Modality == modality]


@dataclass
class Pipeline:
    """Listener, assembler, worker and sender of one node, run by the test."""

    config: NodeConfig
    store: Store
    classifier: Any
    pacs: Pacs
    server: Any = None
    clock_offset: float = 0.0  # seconds added to the wall clock (quiet periods, retention)

    def __post_init__(self) -> None:
        self.spool = Spool(self.config.storage.dir, self.store, 0)
        self.server = start_listener(self.config, self.spool)
        self.queue = job_queue(self.store, self.config.queue)
        self.assembler = Assembler(self.store, self.config.series, queue=self.queue)
        self.worker = Worker(self.config, "w0", self.store, self.classifier)
        self.sender = Sender(
            self.store,
            self.config.destinations,
            self.config.sender,
            self.config.storage.dir,
            self.config.node.ae_title,
            targets=self.config.notifications,
        )

    def now(self) -> float:
        return time.time() + self.clock_offset

    def send(self, files: Sequence[Path], *args: str) -> None:
        """C-STORE ``files`` with DCMTK storescu (``args``: e.g. ``-xi``); all must succeed."""
        run = subprocess.run(
            [dcmtk("storescu"), *args, "-aet", CALLER, "-aec", self.config.node.ae_title,
             "127.0.0.1", str(self.config.node.port), *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr

    def drain(self, timeout: float = 120.0) -> None:
        """Run the stages until nothing is left to do: series decided, jobs done, sent.

        Each pass jumps the clock past ``series.stable_seconds`` so that quiet
        series are complete at once.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.clock_offset += self.config.series.stable_seconds + 1.0
            decided = self.assembler.run_once(self.now())
            ran = self.worker.run_once(self.now())
            sent = self.sender.run_once(self.now())
            waiting = [d for d in decided if d.deferred]
            receiving = self.store.receiving_series()
            due = [d for d in self.store.deliveries() if d.state in ("pending", "retry")]
            if not decided and ran is None and not sent and not receiving and not due:
                return
            if waiting or due:
                time.sleep(0.05)
        raise AssertionError("the pipeline did not settle")

    def purge(self) -> None:
        """Retention removes every finished series' images and delivered results."""
        self.clock_offset += self.config.storage.keep_hours * 3600.0 + 60.0
        Cleaner(self.store, self.config.storage.dir, self.config.storage.keep_hours).run_once(
            self.now()
        )

    def close(self) -> None:
        self.server.shutdown()


def node_config(
    tmp_path: Path, database: str | None, pacs: Pacs, **sections: dict[str, Any]
) -> NodeConfig:
    """A node on 127.0.0.1 (ephemeral port) sending to ``pacs``; ``sections`` merged in."""
    data: dict[str, Any] = {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port()},
        "callers": [{"ae_title": CALLER}],
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
        ],
        "series": {"stable_seconds": 2.0, "min_slices": 8},
        "results": {"heatmaps": "positive"},
        "queue": {"lease_seconds": 120.0, "max_attempts": 3, "retry_base_seconds": 0.2},
        "sender": {"max_attempts": 20, "backoff_base_seconds": 0.1, "timeout_seconds": 10.0},
        "storage": {"dir": str(tmp_path / "node"), "database": database, "min_free_mb": 0},
    }
    for name, keys in sections.items():
        data[name] = {**data.get(name, {}), **keys} if isinstance(keys, dict) else keys
    return parse_config(data)


def reencoded(paths: Sequence[Path], out: Path, tool: str, *args: str) -> list[Path]:
    """``paths`` re-encoded by a DCMTK tool (``dcmconv +ti``, ``dcmcrle``...) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        target = out / path.name
        subprocess.run([dcmtk(tool), *args, str(path), str(target)], check=True)
        written.append(target)
    return written


def derived(
    paths: Sequence[Path], out: Path, each: Callable[[int, pydicom.Dataset], None]
) -> list[Path]:
    """Copies of ``paths`` changed in code by ``each(i, ds)``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        each(i, ds)
        target = out / path.name
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written
