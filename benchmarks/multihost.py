"""Several hosts, one node: 2 listeners and 2 workers on one PostgreSQL database.

Each "host" is a ``ich-node serve --role listener|worker`` process with its own
configuration (own port, own ``storage.node_id``), all on one ``storage.dir`` and
one database. A pynetdicom SCU plays the modalities: some studies go to one
listener, others to the other, and some have their series split across both. A
pynetdicom SCP plays the PACS and records every object it receives. While a job
is on a worker of host ``w1``, that host is SIGKILLed (its serve process and its
worker process): its lease expires and ``w2`` reads the series. Once its studies
are sent, listener ``l2`` is SIGKILLed too and the last study goes to ``l1``
alone (whatever ``l2`` held, such as the cluster's assembly lock, must not stop
``l1``). Then:

- every series is read once: one job per series version, each ``done``;
- the PACS received exactly one SR per series (no SOP Instance UID twice);
- every acknowledged instance is recorded.

Run::

    .venv/bin/python benchmarks/multihost.py --database postgresql://ich@127.0.0.1:5432/ich
    .venv/bin/python -m pytest -q tests/test_multihost.py   # a throwaway cluster
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import free_port, random_bundle, wait_for  # noqa: E402
from benchmarks.faults import Feeder, node_config  # noqa: E402
from ich_node.config import StorageSection, load_config  # noqa: E402
from ich_node.queue.backend import open_store  # noqa: E402
from ich_node.service.ops import echo  # noqa: E402

#: SOP Class UID of the node's SR (Comprehensive 3D SR, PS3.4 B.5) and any SR.
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


class PacsSCP:
    """A pynetdicom C-STORE SCP that records (SOP Class, Study, SOP Instance) of each object."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        with self._lock:
            self.received.append(
                (str(ds.SOPClassUID), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
            )
        return 0x0000

    def start(self) -> None:
        ae = AE(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def srs(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return [r for r in self.received if r[0].startswith(SR_PREFIX)]


@dataclass
class Host:
    """One ``serve --role`` process with its own configuration file."""

    name: str
    role: str
    config_path: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    def start(self) -> None:
        self.log = self.config_path.parent / f"{self.name}.log"
        out = open(self.log, "ab")  # noqa: SIM115 (the child owns it)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = [
            sys.executable,
            "-m",
            "ich_node.service.cli",
            "serve",
            "--config",
            str(self.config_path),
        ]
        self.process = subprocess.Popen(
            [*argv, "--role", self.role], stdout=out, stderr=out, cwd=str(REPO), env=env
        )
        out.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def run_multihost(
    folder: Path,
    database: str,
    *,
    bundle: Path | None = None,
    studies: int = 10,
    split: int = 4,
    n_slices: int = 8,
    matrix: int = 64,
    timeout: float = 240.0,
) -> dict[str, Any]:
    """Run the scenario of the module docstring; the report lists ``violations``."""
    from training.phantom import write_series

    folder.mkdir(parents=True, exist_ok=True)
    bundle = bundle or random_bundle(folder / "model.ichb", name="multihost", version="0")
    series = [
        list(write_series(folder / f"study{i:02d}", seed=500 + i, n_slices=n_slices,
                          matrix=matrix).paths)
        for i in range(studies)
    ]  # fmt: skip
    pacs = PacsSCP(free_port())
    pacs.start()
    shared = folder / "shared"
    hosts: dict[str, Host] = {}
    ports: dict[str, int] = {}
    for name, role in (("l1", "listener"), ("l2", "listener"), ("w1", "worker"), ("w2", "worker")):
        data = node_config(
            folder / name,
            bundle,
            pacs.port,
            stable_seconds=2.0,
            extra={
                "storage": {"dir": str(shared), "database": database, "node_id": name},
                # A short lease: a dead host's job runs elsewhere within seconds.
                "queue": {"lease_seconds": 4.0, "max_attempts": 10, "retry_base_seconds": 0.2},
            },
        )
        ports[name] = int(data["node"]["port"])
        (folder / name).mkdir(parents=True, exist_ok=True)
        path = folder / name / "node.yaml"
        path.write_text(yaml.safe_dump(data))
        hosts[name] = Host(name, role, path)
    storage = StorageSection(dir=shared, database=database)
    started = time.monotonic()
    report: dict[str, Any] = {"studies": studies, "split_studies": split, "violations": []}
    store = None
    try:
        for host in hosts.values():
            host.start()
        store = open_store(storage)
        for name in ("l1", "l2"):
            config = load_config(hosts[name].config_path)
            wait_for(f"listener {name}", lambda c=config: echo(c, timeout=2), 60, every=0.2)

        def workers_ready() -> bool:
            beats = store.heartbeats()  # type: ignore[union-attr]
            return all(f"{w}.worker-0" in beats for w in ("w1", "w2"))

        wait_for("both workers", workers_ready, 120, every=0.2)
        # Studies 0..split-1: each series split across both listeners; the rest alternate;
        # the last one goes to l1 after l2 is gone.
        to_l1: list[list[Path]] = []
        to_l2: list[list[Path]] = []
        for i, files in enumerate(series[:-1]):
            if i < split:
                to_l1.append(files[0::2])
                to_l2.append(files[1::2])
            else:
                (to_l1 if i % 2 else to_l2).append(files)
        feeders = [
            Feeder(ports["l1"], to_l1, gap_seconds=0.1),
            Feeder(ports["l2"], to_l2, gap_seconds=0.1),
        ]
        for f in feeders:
            f.start()

        # SIGKILL host w1 while one of its workers holds a job.
        def w1_holds_a_job() -> bool:
            return any(
                (j.worker or "").startswith("w1.")
                for j in store.jobs("leased")  # type: ignore[union-attr]
            )

        try:
            wait_for("a job on w1", w1_holds_a_job, 120, every=0.01)
            worker_pid = store.heartbeats().get("w1.worker-0", (0, 0.0))[0]
            hosts["w1"].kill()
            if worker_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker_pid, signal.SIGKILL)
            report["killed"] = {"host": "w1", "worker_pid": worker_pid}
        except TimeoutError:
            report["violations"].append("w1 never held a job (nothing to kill)")
        for f in feeders:
            f.join(timeout)
        hosts["l2"].kill()
        report["listener_killed"] = "l2"
        last = Feeder(ports["l1"], [series[-1]], gap_seconds=0.1)
        last.start()
        last.join(timeout)
        feeders.append(last)

        def finished() -> bool:
            jobs = store.jobs()  # type: ignore[union-attr]
            return len(pacs.srs()) >= studies and all(j.state == "done" for j in jobs)

        try:
            wait_for("every series read and sent", finished, timeout, every=0.5)
        except TimeoutError as exc:
            report["violations"].append(str(exc))
        time.sleep(2.0)  # anything sent twice would arrive now
        jobs = store.jobs()
        per_version = Counter((j.series_instance_uid, j.version) for j in jobs)
        report["jobs"] = len(jobs)
        report["series"] = len({j.series_instance_uid for j in jobs})
        report["job_attempts"] = sorted(j.attempts for j in jobs)
        report["taken_over"] = [j.job_id for j in jobs if j.attempts > 1 or j.crash_returns]
        if report["series"] != studies:
            report["violations"].append(f"{report['series']} series read, {studies} sent")
        if any(n != 1 for n in per_version.values()) or any(j.version != 1 for j in jobs):
            report["violations"].append(f"a series was read more than once: {sorted(per_version)}")
        if any(j.state != "done" for j in jobs):
            report["violations"].append(f"jobs not done: {[(j.state, j.reason) for j in jobs]}")
        srs = pacs.srs()
        per_study = Counter(study for _, study, _ in srs)
        report["srs_received"] = len(srs)
        if len(per_study) != studies or any(n != 1 for n in per_study.values()):
            report["violations"].append(f"SRs per study at the PACS: {sorted(per_study.values())}")
        acked = set().union(*(f.acked for f in feeders))
        recorded = set(store.instance_files().values())
        report["acknowledged"] = len(acked)
        if acked - recorded:
            report["violations"].append(f"{len(acked - recorded)} acknowledged not recorded")
        # The streaming read (series.streaming, on by default): which workers scored
        # each series while it arrived, the split ones (both listeners) included.
        streamed: dict[str, set[str]] = {}
        for name in ("w1", "w2"):
            for line in hosts[name].log.read_text(errors="replace").splitlines():
                if '"stream.started"' in line:
                    with contextlib.suppress(json.JSONDecodeError):
                        uid = json.loads(line)["series_instance_uid"]
                        streamed.setdefault(uid, set()).add(name)
        split_uids = {
            str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            for files in series[:split]
        }
        report["streamed_series"] = len(streamed)
        report["split_series_streamed"] = len(split_uids & streamed.keys())
        report["hosts_seen"] = sorted(store.heartbeats())
        from ich_node.queue.interface import HEARTBEAT_STALE_SECONDS
        from ich_node.service.ops import health

        # health counts a worker alive while its last heartbeat is recent: wait until
        # the killed host's last one has aged past that, however fast the run went.
        def w1_stale() -> bool:
            beats = store.heartbeats()  # type: ignore[union-attr]
            now = time.time()
            return all(
                now - at > HEARTBEAT_STALE_SECONDS
                for name, (_, at) in beats.items()
                if name.startswith("w1.worker")
            )

        with contextlib.suppress(TimeoutError):
            wait_for("w1's heartbeat stale", w1_stale, HEARTBEAT_STALE_SECONDS + 15, every=0.5)
        report["health"] = {
            name: health(load_config(hosts[name].config_path), role=hosts[name].role)
            for name in ("l1", "w2", "w1")
        }  # 0: healthy; w1 was killed
        from ich_node.service.ops import collect_status

        report["status_heartbeats"] = sorted(collect_status(store, time.time())["heartbeats"])
    finally:
        for host in hosts.values():
            host.stop()
        if store is not None:
            store.close()
        pacs.stop()
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", required=True, help="postgresql://USER@HOST:PORT/DB")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/ich-multihost"))
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds to settle in")
    args = parser.parse_args(argv)
    report = run_multihost(args.folder, args.database, studies=args.studies, timeout=args.budget)
    print(json.dumps(report, indent=2))
    return 0 if not report["violations"] else 1


if __name__ == "__main__":
    sys.exit(main())
