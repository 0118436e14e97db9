"""Web console benchmark: how long the pages take as the store grows.

    python benchmarks/web.py              # stores of 1,000 and 5,000 read series
    python benchmarks/web.py --quick      # 50 series (CI)

Each store (SQLite, in a temporary ``storage.dir``) is filled through the store's own
interfaces as a node leaves it: every series has one instance, a version read, its
results-ledger row, a ``findings.json`` of 28 slices and one delivery (a tenth of them
parked). The console (``ich_node.web.app``) is served by uvicorn on 127.0.0.1 in a
thread and asked over HTTP, logged in: the Overview, the Series list (first request:
every ``findings.json`` read; then cached), a search by accession number (answered
from the ledger), the last page of the list, a series' version page and Problems.
Each row is the best of ``--repeats`` requests and is printed as soon as it is
measured; stores stop once ``--budget`` seconds are spent.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import free_port, load_average, table, write_json

COLUMNS = ("series", "page", "first ms", "best ms", "KiB")
PASSWORD = "benchmark-password"


def fill(storage: Path, n: int, now: float) -> list[tuple[str, str]]:
    """``n`` read series in a new store under ``storage``; (series UID, accession) each."""
    from ich_node.config import QueueSection
    from ich_node.labels import LABELS
    from ich_node.queue.interface import InstanceRecord, SeriesRead
    from ich_node.queue.jobs import JobQueue, job_id_for
    from ich_node.queue.layout import StorageLayout
    from ich_node.queue.store import Store
    from ich_node.results.findings import (
        LabelFinding,
        ModelInfo,
        SeriesFindings,
        SliceFinding,
        write_findings,
    )

    store = Store.open(storage)
    layout = StorageLayout(storage)
    queue = JobQueue(store, QueueSection())
    made = []
    for i in range(n):
        study, series = f"1.2.826.0.1.{i}", f"1.2.826.0.1.{i}.1"
        accession = f"ACC{i:08d}"
        record = InstanceRecord(
            f"{series}.1", "1.2.840.10008.5.1.4.1.1.2", study, series, "CT", "HEAD",
            "CT HEAD", "AXIAL", series_related_instances=1,
        )  # fmt: skip
        at = now - 3600 - (n - i)
        store.add_instance(record, layout.instance_file(study, series, f"{series}.1", "0" * 16),
                           1000, at)  # fmt: skip
        job = store.queue_series(series, 1, job_id_for, at)
        leased = queue.lease("worker-0", at)
        assert leased is not None and leased.job_id == job.job_id
        positive = i % 7 == 0
        p = 0.9 if positive else 0.05
        findings = SeriesFindings(
            study, series, ModelInfo("bench", "1", "resnet18", "0" * 64, demo=True),
            {label: LabelFinding(p, positive, 0.5) for label in LABELS},
            tuple(SliceFinding(f"{series}.{k}", 5.0 * k, dict.fromkeys(LABELS, p))
                  for k in range(28)),
        )  # fmt: skip
        write_findings(layout.results_dir(job.job_id) / "findings.json", findings)
        read = SeriesRead(
            job.job_id, study, series, accession, 1, "0" * 64, 1, "bench", "1", "0" * 64,
            dict.fromkeys(LABELS, 0.5), dict.fromkeys(LABELS, p),
            tuple(LABELS) if positive else (), True, 0, read_at=at,
        )  # fmt: skip
        queue.complete(leased, ["pacs"], 2, at, read=read)
        state = "parked" if i % 10 == 0 else "done"
        store.finish_delivery(job.job_id, "pacs", state, "refused" if state == "parked" else "",
                              at, at)  # fmt: skip
        made.append((series, accession))
    store.close()
    return made


def measure(n: int, repeats: int, root: Path) -> list[dict[str, Any]]:
    import httpx
    import uvicorn

    from ich_node.config import NodeConfig, StorageSection, WebSection
    from ich_node.web.app import create_app
    from ich_node.web.users import add_user

    storage = root / f"node{n}"
    made = fill(storage, n, time.time())
    add_user(root / "users", "bench", "admin", PASSWORD)
    config = NodeConfig(
        storage=StorageSection(dir=storage), web=WebSection(users_file=root / "users")
    )
    app = create_app(config, secret=b"b" * 32)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    rows = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)
            assert token is not None
            client.post("/login", data={"csrf": token.group(1), "name": "bench",
                                        "password": PASSWORD, "next": "/"})  # fmt: skip
            series, accession = made[n // 2]
            pages = (
                ("Series list", "/series"),
                ("Overview", "/"),
                ("search by accession", f"/series?q={accession}"),
                ("last page of the list", "/series?page=1000000"),
                ("series version", f"/series/{series}"),
                ("Problems", "/problems"),
            )
            for name, path in pages:
                times = []
                size = 0
                for _ in range(1 + repeats):
                    start = time.perf_counter()
                    answer = client.get(path)
                    times.append(time.perf_counter() - start)
                    assert answer.status_code == 200, (path, answer.status_code)
                    size = len(answer.content)
                row = {
                    "series": n,
                    "page": name,
                    "first ms": round(1000 * times[0], 1),
                    "best ms": round(1000 * min(times[1:]), 1),
                    "KiB": round(size / 1024, 1),
                }
                rows.append(row)
                print(table([row], COLUMNS).splitlines()[-1], flush=True)
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.web.console.close()
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one store of 50 series")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=900.0, help="seconds for all stores")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(args: argparse.Namespace) -> int:
    import logging

    import structlog

    # The console's audit lines (one per request) would bury the table; the logging
    # configuration is given back afterwards (the tests run this in their process).
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        sizes = [50] if args.quick else args.sizes
        rows: list[dict[str, Any]] = []
        start = time.monotonic()
        print(table([], COLUMNS), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            for n in sizes:
                if time.monotonic() - start > args.budget:
                    print(f"(budget of {args.budget:.0f} s spent: {n} series not measured)")
                    break
                rows += measure(n, args.repeats, Path(tmp))
    finally:
        structlog.configure(**saved)
    print(f"load average {load_average()}")
    write_json(args.json, "web_quick" if args.quick else "web", {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
