"""Ingest benchmark: C-STORE files/s and MB/s of the node against two reference SCPs.

    python benchmarks/ingest.py            # 98 phantom slices of 512x512, best of 3
    python benchmarks/ingest.py --quick    # 24 slices of 256x256, one run (CI)

Receivers, each started fresh (empty folder) for every run:

- *ich-node listener + durable spool*: the node's pynetdicom listener
  (:func:`ich_node.ingest.listener.start_listener`) with its spool and SQLite store, in its
  own process, alone: no assembler, worker or sender competes for the CPU, so the
  figure is the ingest path itself. Each instance is written to a temporary file,
  fsync'ed, renamed, its folder fsync'ed and its row committed before Success.
- *pynetdicom storescp*: ``python -m pynetdicom storescp -od DIR`` (writes, no fsync).
- *DCMTK storescp*: ``/usr/bin/storescp --fork -od DIR`` with ``TCP_NODELAY=1``
  (writes, no fsync).

Sender, the same for all: DCMTK ``storescu`` processes with ``TCP_NODELAY=1``; one
association carrying every file, then eight concurrent associations each carrying
an eighth of them. The clock runs from starting the senders until the last one
exits, i.e. until the last C-STORE-RSP arrived.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    dcmtk,
    free_port,
    load_average,
    nodelay_env,
    port_open,
    send,
    stop,
    table,
    wait_for,
    write_json,
)

NODE_AE = "ICH_NODE"

_LISTENER = """
import signal, sys, threading
from ich_node.config import load_config
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool
from ich_node.queue.store import Store
config = load_config(sys.argv[1])
store = Store.open(config.storage.dir)
server = start_listener(config, Spool(config.storage.dir, store, config.storage.min_free_mb))
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: done.set())
done.wait()
server.shutdown()
store.close()
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slices", type=int, default=98)
    p.add_argument("--matrix", type=int, default=512)
    p.add_argument("--associations", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per row")
    p.add_argument("--quick", action="store_true", help="24 slices of 256x256, one run")
    p.add_argument("--json", type=Path, default=None)
    return p


def start_node_listener(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """The node's listener, spool and store alone, in a subprocess."""
    import yaml

    config = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port, "max_associations": 16},
        "callers": [{"ae_title": "MODALITY"}],
        "storage": {"dir": str(folder / "node"), "min_free_mb": 1},
        "logging": {"format": "json", "level": "WARNING"},
    }
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [sys.executable, "-c", _LISTENER, str(path)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_pynetdicom(folder: Path, port: int) -> subprocess.Popen[bytes]:
    out = folder / "received"
    out.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "pynetdicom", "storescp", "-aet", NODE_AE, "-od", str(out),
         "-q", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def start_dcmtk(folder: Path, port: int) -> subprocess.Popen[bytes]:
    out = folder / "received"
    out.mkdir()
    return subprocess.Popen(
        [dcmtk("storescp"), "--fork", "-aet", NODE_AE, "-od", str(out), str(port)],
        env=nodelay_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


RECEIVERS: dict[str, Callable[[Path, int], subprocess.Popen[bytes]]] = {
    "ich-node listener + spool (fsync)": start_node_listener,
    "pynetdicom storescp (no fsync)": start_pynetdicom,
    "DCMTK storescp, TCP_NODELAY=1 (no fsync)": start_dcmtk,
}


def received_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp")) - (
        1 if (folder / "node.yaml").exists() else 0
    )


def one_run(
    start: Callable[[Path, int], subprocess.Popen[bytes]],
    files: list[Path],
    associations: int,
    tmp: Path,
) -> float:
    """Seconds to send ``files`` in ``associations`` concurrent associations."""
    folder = Path(tempfile.mkdtemp(dir=tmp))
    port = free_port()
    receiver = start(folder, port)
    try:
        wait_for("the receiver's port", lambda: port_open(port), 60)
        groups = [files[i::associations] for i in range(associations)]
        return send(port, groups, called=NODE_AE)
    finally:
        stop(receiver)


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.slices, args.matrix, args.repeats = 24, 256, 1
    from training.phantom import write_series

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        phantom = write_series(
            tmp / "series", seed=11, subtypes=("subdural",), n_slices=args.slices,
            matrix=args.matrix,
        )  # fmt: skip
        files = list(phantom.paths)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        for name, start in RECEIVERS.items():
            for n in args.associations:
                times = [one_run(start, files, n, tmp) for _ in range(args.repeats)]
                best = min(times)
                rows.append(
                    {
                        "receiver": name,
                        "associations": n,
                        "files/s": len(files) / best,
                        "MB/s": megabytes / best,
                        "seconds": best,
                        "all runs s": [round(t, 3) for t in times],
                    }
                )
    for row in rows:
        ref = next(
            r for r in rows
            if r["receiver"].startswith("pynetdicom") and r["associations"] == row["associations"]
        )  # fmt: skip
        row["vs pynetdicom"] = row["files/s"] / ref["files/s"]
    print(
        f"\n{len(files)} files of {args.matrix}x{args.matrix} ({megabytes:.1f} MB), "
        f"sender DCMTK storescu TCP_NODELAY=1, best of {args.repeats}, load {load_average()}"
    )
    print(table(rows, ["receiver", "associations", "files/s", "MB/s", "vs pynetdicom"]))
    write_json(
        args.json, "ingest" + ("_quick" if args.quick else ""),
        {"files": len(files), "matrix": args.matrix, "megabytes": megabytes,
         "repeats": args.repeats, "rows": rows},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
