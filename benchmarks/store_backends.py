"""Store backends compared: embedded SQLite and PostgreSQL, the node's own store code.

    python benchmarks/store_backends.py                      # a throwaway PostgreSQL cluster
    python benchmarks/store_backends.py --database postgresql://ich@db:5432/bench
    python benchmarks/store_backends.py --quick              # CI smoke run

Three figures per backend, each process with its own store (as the node's
processes have):

*jobs/s*: N queued jobs, 1, 2 and 4 worker processes that lease, mark the
model stage and complete each job (a no-op model: the queue alone is measured).
*lease-to-start*: an idle worker waits for work the way the node's worker does
(SQLite: polls every 0.05 s; PostgreSQL: LISTEN, woken by NOTIFY, 1 s at most);
a job is queued every 0.1 s; the time from the job's commit to its lease.
*ingest files/s*: 1 and 2 listener processes save small instances through the
node's :class:`ich_node.ingest.spool.Spool` (write, fsync, rename, record), one
series each. SQLite is one host's store: it gets the 2-process row too, on one
machine, for comparison.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Budget, load_average, print_row, write_json
from ich_node.config import QueueSection, StorageSection
from ich_node.queue.backend import job_queue, open_store, wait_for_jobs
from ich_node.queue.interface import InstanceRecord
from ich_node.queue.jobs import job_id_for

CT = "1.2.840.10008.5.1.4.1.1.2"


def _record(series: str, i: int) -> InstanceRecord:
    return InstanceRecord(f"{series}.{i}", CT, "1.2", series, "CT", "HEAD", "", "")


def _queue_jobs(storage: StorageSection, n: int, prefix: str) -> None:
    store = open_store(storage)
    now = time.time()
    for i in range(n):
        series = f"{prefix}.{i}"
        store.add_instance(_record(series, 1), Path(storage.dir) / f"{i}.dcm", 1, now)
        store.queue_series(series, 1, job_id_for, now)
    store.close()


def _worker(storage: StorageSection, name: str, start: Any, done: Any) -> None:
    store = open_store(storage)
    queue = job_queue(store, QueueSection(lease_seconds=600))
    start.wait()
    n = 0
    while (job := queue.lease(name, time.time())) is not None:
        queue.set_stage(job, "model", time.time())
        queue.complete(job, ["pacs"], 1, time.time())
        n += 1
    done.put(n)
    store.close()


def jobs_per_second(storage: StorageSection, n_jobs: int, n_workers: int, tag: str) -> float:
    _queue_jobs(storage, n_jobs, f"9.{tag}")
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(storage, f"w{i}", start, done)) for i in range(n_workers)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0 + 0.5 * n_workers)  # every process opened its store
    began = time.perf_counter()
    start.set()
    total = sum(done.get(timeout=600) for _ in procs)
    seconds = time.perf_counter() - began
    for p in procs:
        p.join(30)
    assert total == n_jobs, (total, n_jobs)
    return n_jobs / seconds


def _idle_worker(storage: StorageSection, poll: float, n: int, ready: Any, out: Any) -> None:
    store = open_store(storage)
    queue = job_queue(store, QueueSection(lease_seconds=600))
    waits: list[float] = []
    if storage.database is not None:
        wait_for_jobs(store, 0.0)  # LISTEN before the first job
    ready.set()
    while len(waits) < n:
        job = queue.lease("idle", time.time())
        if job is None:
            wait_for_jobs(store, poll)
            continue
        waits.append(time.time() - job.created_at)
        queue.complete(job, [], 0, time.time())
    out.put(waits)
    store.close()


def lease_latency(storage: StorageSection, n: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    poll = 1.0 if storage.database is not None else 0.05  # the node's own waits
    proc = ctx.Process(target=_idle_worker, args=(storage, poll, n, ready, out))
    proc.start()
    ready.wait(60)
    store = open_store(storage)
    for i in range(n):
        time.sleep(0.1)
        series = f"8.{i}"
        now = time.time()
        store.add_instance(_record(series, 1), Path(storage.dir) / f"l{i}.dcm", 1, now)
        store.queue_series(series, 1, job_id_for, now)
    waits: list[float] = out.get(timeout=120)
    proc.join(30)
    store.close()
    return waits


def _listener(storage: StorageSection, series: str, n: int, start: Any, out: Any) -> None:
    from ich_node.ingest.spool import Spool

    store = open_store(storage)
    if storage.database is not None:
        store.place_store_id()  # type: ignore[attr-defined]  # as serve does at start
    spool = Spool(storage.dir, store, 0)
    data = b"\0" * 16_384  # the spool writes bytes as received; the store path is measured
    start.wait()
    began = time.perf_counter()
    for i in range(n):
        spool.save(data, _record(series, i), time.time())
    out.put(time.perf_counter() - began)
    store.close()


def ingest_files_per_second(storage: StorageSection, n_files: int, n_listeners: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    stamp = int(time.time() * 1000) % 100000
    procs = [
        ctx.Process(target=_listener, args=(storage, f"7.{stamp}.{i}", n_files, start, out))
        for i in range(n_listeners)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0 + 0.5 * n_listeners)
    began = time.perf_counter()
    start.set()
    for _ in procs:
        out.get(timeout=600)
    seconds = time.perf_counter() - began
    for p in procs:
        p.join(30)
    return n_files * n_listeners / seconds


COLUMNS = ["backend", "measure", "value", "runs"]


def run(
    storage: StorageSection, name: str, args: argparse.Namespace, budget: Budget
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print_row(COLUMNS, row)

    def fits(what: str) -> bool:
        if budget.allows(0.0):
            return True
        print(f"(budget: {name} {what} skipped)", flush=True)
        return False

    for k in args.workers:
        if not fits(f"jobs/s with {k} workers"):
            continue
        rates = [
            jobs_per_second(storage, args.jobs, k, f"{k}{r}{int(time.time()) % 10000}")
            for r in range(args.repeat)
        ]
        emit(
            {
                "backend": name,
                "measure": f"jobs/s, {k} workers",
                "value": round(statistics.median(rates), 1),
                "runs": [round(r, 1) for r in rates],
            }
        )
    if fits("lease latency"):
        waits = sorted(lease_latency(storage, args.latency_jobs))
        emit(
            {
                "backend": name,
                "measure": "lease-to-start median (ms)",
                "value": round(1000 * statistics.median(waits), 1),
            }
        )
        emit(
            {
                "backend": name,
                "measure": "lease-to-start max (ms)",
                "value": round(1000 * waits[-1], 1),
            }
        )
    for k in (1, 2):
        if not fits(f"ingest with {k} listeners"):
            continue
        rates = [ingest_files_per_second(storage, args.files, k) for _ in range(args.repeat)]
        emit(
            {
                "backend": name,
                "measure": f"ingest files/s, {k} listeners",
                "value": round(statistics.median(rates)),
                "runs": [round(r) for r in rates],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database", default=None, help="postgresql:// URL (default: a temp cluster)")
    p.add_argument("--jobs", type=int, default=400)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--latency-jobs", type=int, default=20)
    p.add_argument("--files", type=int, default=300, help="files per listener")
    p.add_argument("--repeat", type=int, default=3, help="runs per throughput row (median shown)")
    p.add_argument("--quick", action="store_true", help="few jobs and files: a smoke run")
    p.add_argument("--budget", type=float, default=1800.0, help="seconds for all rows")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.workers, args.latency_jobs, args.files = 40, [1, 2], 5, 30
        args.repeat = 1
    cluster = None
    database = args.database
    if database is None:
        from benchmarks.common import free_port
        from tests.pg_cluster import pg_bin, start_cluster

        if pg_bin() is not None:
            cluster = start_cluster(free_port())
            database = cluster.create_database("bench")
        else:
            print("PostgreSQL is not installed (apt-get install postgresql): SQLite only")
    load_before = load_average()
    budget = Budget(args.budget)
    print(f"load {load_before} at start", flush=True)
    print_row(COLUMNS, None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = run(StorageSection(dir=Path(tmp) / "sqlite"), "sqlite", args, budget)
            if database is not None:
                pg = StorageSection(dir=Path(tmp) / "pg", database=database)
                rows += run(pg, "postgresql", args, budget)
    finally:
        if cluster is not None:
            cluster.stop()
    print(f"load {load_average()} at the end")
    write_json(
        args.json,
        "store_backends" + ("_quick" if args.quick else ""),
        {"rows": rows, "load_average_before": load_before, "args": vars(args) | {"json": None}},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
