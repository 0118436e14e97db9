"""Fault run: SIGKILL the node at random moments while studies stream in, then check.

The whole node runs as ``serve`` in a subprocess on 127.0.0.1. A pynetdicom SCU
in this process plays the PACS (it keeps, per instance, whether a C-STORE got
Success, and retries the others with backoff); a pynetdicom SCP plays the
destination and counts every SOP Instance UID it receives. The node is killed
with SIGKILL ``--kills`` times (its worker, orphaned, exits by itself) and
restarted each time. Then, once everything has settled:

1. every instance acknowledged with Success is recorded and its file present;
2. every series was read, and each version's results (the files of its job's
   outbox) reached the destination: the distinct SOP Instance UIDs received are
   exactly the union of the outboxes (nothing missing, nothing foreign);
   receptions of the same UID more than once are counted ("re-sent": a kill
   between the last C-STORE-RSP and the commit of ``done``, see docs/reliability.md);
3. no temporary file or folder is left, every spool file is recorded, every
   recorded file exists.

Run::

    .venv/bin/python benchmarks/faults.py --kills 30            # the full run
    .venv/bin/python -m pytest -m slow tests/test_reliability_crash.py
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import free_port, random_bundle, serve_argv, wait_for  # noqa: E402
from ich_node.config import NodeConfig, load_config  # noqa: E402
from ich_node.queue.layout import outbox_files  # noqa: E402
from ich_node.queue.store import Store  # noqa: E402
from ich_node.service.ops import echo  # noqa: E402

CALLER = "FAULTS"


# -- the destination ------------------------------------------------------------------


class RecordingSCP:
    """A pynetdicom C-STORE SCP that counts the SOP Instance UIDs it receives."""

    def __init__(self, port: int, ae_title: str = "PACS") -> None:
        self.port = port
        self.ae_title = ae_title
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.received[uid] += 1
        return 0x0000

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.received)


# -- the PACS ----------------------------------------------------------------------


class Feeder(threading.Thread):
    """Send studies one association each; resend what got no Success, with backoff."""

    def __init__(
        self,
        port: int,
        studies: list[list[Path]],
        *,
        called: str = "ICH_NODE",
        calling: str = CALLER,
        gap_seconds: float = 0.5,
        instance_delay: float = 0.0,
    ) -> None:
        super().__init__(name="feeder", daemon=True)
        self.port = port
        self.studies = studies
        self.called = called
        self.calling = calling
        self.gap_seconds = gap_seconds
        self.instance_delay = instance_delay
        self.acked: set[str] = set()
        self.in_association = False
        self.failures = 0
        self.uids = {
            p: str(read_file_meta_info(p).MediaStorageSOPInstanceUID)
            for study in studies
            for p in study
        }

    def _send_study(self, files: list[Path]) -> bool:
        todo = [p for p in files if self.uids[p] not in self.acked]
        if not todo:
            return True
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called)
        if not assoc.is_established:
            return False
        self.in_association = True
        try:
            for path in todo:
                status = assoc.send_c_store(path)
                if getattr(status, "Status", None) == 0x0000:
                    self.acked.add(self.uids[path])
                elif not assoc.is_established:
                    return False
                time.sleep(self.instance_delay)  # a scanner's pace: kills land mid-study
        except Exception:
            return False
        finally:
            self.in_association = False
            if assoc.is_established:
                assoc.release()
        return all(self.uids[p] in self.acked for p in files)

    def run(self) -> None:
        for files in self.studies:
            delay = 0.2
            while not self._send_study(files):
                self.failures += 1
                time.sleep(delay)
                delay = min(delay * 2, 2.0)  # the PACS retries with backoff
            time.sleep(self.gap_seconds)


# -- the node ---------------------------------------------------------------------


@dataclass
class NodeProcess:
    """``serve`` in a subprocess, logging into ``<folder>/node.log``."""

    config_path: Path
    config: NodeConfig
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @classmethod
    def write(cls, folder: Path, data: dict[str, Any]) -> NodeProcess:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "node.yaml"
        path.write_text(yaml.safe_dump(data))
        return cls(path, load_config(path))

    @property
    def log_path(self) -> Path:
        return self.config_path.parent / "node.log"

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.process = subprocess.Popen(
            serve_argv(self.config_path), stdout=log, stderr=log, cwd=str(REPO)
        )
        log.close()
        self.starts += 1

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}")
            return echo(self.config, timeout=2)

        wait_for("the listener", up, timeout, every=0.1)

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(90)
        self.process = None
        return code

    def store(self) -> Store:
        return Store.open(self.config.storage.dir)


def node_config(
    folder: Path,
    bundle: Path,
    destination_port: int,
    *,
    stable_seconds: float = 3.0,
    heatmaps: str = "none",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A node configuration for fault runs: attempts high enough that kills never park."""
    data: dict[str, Any] = {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port(), "workers": 1},
        "callers": [{"ae_title": CALLER}, {"ae_title": "MODALITY"}],
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": destination_port}
        ],
        "series": {"stable_seconds": stable_seconds, "min_slices": 4},
        "model": {"bundle": str(bundle), "device": "cpu", "batch_size": 16},
        "results": {"heatmaps": heatmaps},
        "queue": {"lease_seconds": 60.0, "max_attempts": 100, "retry_base_seconds": 0.2},
        "sender": {
            "max_attempts": 1000,
            "backoff_base_seconds": 0.2,
            "backoff_max_seconds": 1.0,
            "timeout_seconds": 10.0,
        },
        "storage": {"dir": str(folder / "node"), "min_free_mb": 1},
        "logging": {"format": "json", "level": "INFO"},
    }
    for section, values in (extra or {}).items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


def make_bundle(path: Path) -> Path:
    """A random resnet18 bundle at 64x64 input, as the tests use."""
    return random_bundle(path, name="ich-node fault-run model", version="0.0.0-faults")


def make_studies(folder: Path, n: int, n_slices: int, matrix: int, seed: int) -> list[list[Path]]:
    from training.phantom import write_series

    return [
        list(
            write_series(
                folder / f"study{i:03d}", seed=seed * 1000 + i, n_slices=n_slices, matrix=matrix
            ).paths
        )
        for i in range(n)
    ]


# -- checks -------------------------------------------------------------------------


def _activity(store: Store, feeder: Feeder) -> list[str]:
    """What the node was doing at a kill (approximate: read from the store)."""
    doing = []
    if feeder.in_association:
        doing.append("receiving")
    if store.jobs("leased"):
        doing.append("reading/encoding")
    if any(d.state in ("pending", "retry") for d in store.deliveries()):
        doing.append("sending")
    return doing or ["idle"]


def settled(store: Store) -> bool:
    jobs = store.counts("jobs")
    deliveries = store.counts("deliveries")
    series = store.counts("series")
    busy_jobs = sum(jobs.get(s, 0) for s in ("queued", "leased", "retry"))
    busy_deliveries = sum(deliveries.get(s, 0) for s in ("pending", "retry"))
    return not busy_jobs and not busy_deliveries and not series.get("receiving", 0)


def check(node: NodeProcess, feeder: Feeder, scp: RecordingSCP) -> dict[str, Any]:
    """The invariants of the module docstring; ``violations`` lists what broke."""
    violations: list[str] = []
    storage = node.config.storage.dir
    store = node.store()
    recorded = store.instance_files()
    recorded_uids = set(recorded.values())
    lost = feeder.acked - recorded_uids
    if lost:
        violations.append(f"{len(lost)} acknowledged instances are not in the store")
    missing = [p for p in recorded if not Path(p).is_file()]
    if missing:
        violations.append(f"{len(missing)} recorded files are missing")
    spool = storage / "spool"
    on_disk = [p for p in spool.rglob("*") if p.is_file()]
    temp = [p for p in on_disk if p.name.endswith(".tmp")]
    temp += [p for p in (storage / "results").glob(".*.tmp")]
    if temp:
        violations.append(f"{len(temp)} temporary files or folders left")
    unrecorded = [p for p in on_disk if str(p) not in recorded and not p.name.endswith(".tmp")]
    if unrecorded:
        violations.append(f"{len(unrecorded)} spool files are not recorded")
    series = store.counts("series")
    if series.get("receiving") or series.get("skipped"):
        violations.append(f"series not all read: {series}")
    jobs = store.jobs()
    not_done = [j for j in jobs if j.state != "done"]
    if not_done:
        violations.append(
            f"{len(not_done)} jobs not done: {[(j.state, j.reason) for j in not_done]}"
        )
    expected: set[str] = set()
    versions = 0
    for job in jobs:
        if job.state != "done":
            continue
        versions += 1
        deliveries = store.deliveries(job.job_id)
        if [d.state for d in deliveries] != ["done"]:
            violations.append(f"job {job.job_id}: deliveries {[d.state for d in deliveries]}")
        for path in outbox_files(storage, job.job_id):
            expected.add(str(read_file_meta_info(path).MediaStorageSOPInstanceUID))
    received = scp.snapshot()
    missing_results = expected - set(received)
    foreign = set(received) - expected
    if missing_results:
        violations.append(f"{len(missing_results)} result objects never reached the destination")
    if foreign:
        violations.append(f"{len(foreign)} objects received that no done job's outbox holds")
    resent = sum(n - 1 for uid, n in received.items() if n > 1)
    store.close()
    return {
        "acknowledged_instances": len(feeder.acked),
        "recorded_instances": len(recorded_uids),
        "series": series,
        "series_versions_done": versions,
        "result_objects_expected": len(expected),
        "result_objects_distinct_received": len(set(received) & expected),
        "result_objects_resent": resent,
        "violations": violations,
    }


@dataclass
class CrashReport:
    kills: int
    studies: int
    instances: int
    kill_activity: dict[str, int]
    feeder_retries: int
    wall_seconds: float
    checks: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.checks["violations"]


def run_crash(
    work: Path,
    bundle: Path,
    *,
    kills: int,
    studies: int,
    n_slices: int = 10,
    matrix: int = 128,
    seed: int = 0,
    gap: tuple[float, float] = (1.0, 6.0),
    settle_timeout: float = 300.0,
    budget_s: float | None = None,
) -> CrashReport:
    """Kill the node ``kills`` times while ``studies`` studies stream in; check everything.

    With ``budget_s``, kills stop once 60% of it is spent (each kill printed as it
    happens), and the rest is left to the node to settle.
    """
    rng = random.Random(seed)
    started = time.monotonic()
    all_studies = make_studies(work / "studies", studies, n_slices, matrix, seed)
    scp = RecordingSCP(free_port())
    scp.start()
    node = NodeProcess.write(work, node_config(work, bundle, scp.port))
    activity: Counter[str] = Counter()
    # Spread the studies over the kill period, so that kills also land mid-study.
    period = kills * (sum(gap) / 2 + 1.5)
    instance_delay = 0.1
    study_gap = max(period / max(studies, 1) - n_slices * instance_delay, 0.2)
    feeder = Feeder(
        node.config.node.port, all_studies, gap_seconds=study_gap, instance_delay=instance_delay
    )
    try:
        node.start()
        feeder.start()
        for n in range(kills):
            if budget_s is not None and time.monotonic() - started > 0.6 * budget_s:
                print(f"(budget: stopped after {n} kills)", flush=True)
                kills = n
                break
            time.sleep(rng.uniform(*gap))
            store = node.store()
            try:
                doing = _activity(store, feeder)
            finally:
                store.close()
            node.kill()
            activity.update(doing)
            print(f"kill {n + 1}: {', '.join(sorted(doing)) or 'idle'}", flush=True)
            time.sleep(rng.uniform(0.0, 0.5))
            node.start()
        if budget_s is not None:
            settle_timeout = max(30.0, budget_s - (time.monotonic() - started))
        feeder.join(settle_timeout)
        if feeder.is_alive():
            raise TimeoutError("the feeder did not get every instance acknowledged")
        store = node.store()
        try:
            # The last study's series completes when its header count is in; then read, send.
            wait_for("the node to settle", lambda: settled(store), settle_timeout, every=0.5)
        finally:
            store.close()
        code = node.stop()
        checks = check(node, feeder, scp)
        if code != 0:
            checks["violations"].append(f"serve exited with {code} after SIGTERM")
    finally:
        if node.process is not None:
            node.kill()
        scp.stop()
    return CrashReport(
        kills=kills,
        studies=studies,
        instances=sum(len(s) for s in all_studies),
        kill_activity=dict(activity),
        feeder_retries=feeder.failures,
        wall_seconds=round(time.monotonic() - started, 1),
        checks=checks,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the run")
    args = parser.parse_args(argv)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="ich-faults-"))
    bundle = make_bundle(work / "bundle" / "model.safetensors")
    report = run_crash(
        work / "run",
        bundle,
        kills=args.kills,
        studies=args.studies,
        n_slices=args.slices,
        matrix=args.matrix,
        seed=args.seed,
        budget_s=args.budget,
    )
    out = asdict(report) | {"ok": report.ok}
    text = json.dumps(out, indent=2, sort_keys=True)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
