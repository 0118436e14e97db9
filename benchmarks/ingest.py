"""Ingest benchmark: durable C-STORE into the node against pynetdicom's and DCMTK's storescp.

    python benchmarks/ingest.py                       # 98 phantom slices of 512x512, 5 rounds
    python benchmarks/ingest.py --files ../shared/real-ct --associations 1
    python benchmarks/ingest.py --ablation            # + what guard, digest and PDU size cost
    python benchmarks/ingest.py --quick               # 24 slices of 256x256, one round (CI)

Receivers, each started fresh (empty folder) for every run, **side by side**: one
round runs every receiver once, in turn, and rounds repeat, so each ratio compares
runs made under the same load (a shared machine's load moves between rounds):

- *ich-node listener + durable spool*: the node's pynetdicom listener with its guard
  (:func:`ich_node.ingest.listener.start_listener`), spool and SQLite store in a
  process of its own, logging configured as ``serve`` does, alone (no assembler,
  worker or sender): the ingest path. Success goes back only once each instance is
  written to a temporary file, fsync'ed, renamed, its folder fsync'ed and its row
  committed (``synchronous=FULL``; the folder's fsync and the commit side by side).
- *pynetdicom storescp*: ``python -m pynetdicom storescp -od DIR`` (writes, no fsync).
- *DCMTK storescp*: ``/usr/bin/storescp --fork -od DIR``, ``TCP_NODELAY=1`` (no fsync).

With ``--ablation``, node variants that each take one piece away, to find what it
costs (they are measurements, not configurations to run):

- *guard off*: pynetdicom's plain association server with the same handlers (no
  pending limits, deadlines or per-PDU checks, :mod:`ich_node.ingest.guard`);
- *digest on the ack path*: a new instance's SHA-256 computed before it is written,
  as before, instead of beside its write and fsync;
- *folder fsync, then commit*: the folder's fsync after the rename finishes before
  the row is committed, as before, instead of beside the commit;
- *max PDU 16 KiB*: ``node.max_pdu_kb: 16`` (pynetdicom's default), 32 PDUs per image.

Sender, the same for all: DCMTK ``storescu`` processes with ``TCP_NODELAY=1``; one
association carrying every file, then (``--associations``) eight concurrent ones
each carrying an eighth. The clock runs from starting the senders until the last
exits (the last C-STORE-RSP arrived). Also measured: the receiver process's CPU
time per file (user + system, from ``/proc``; not for DCMTK's forked children), a
figure the machine's load moves much less than wall time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
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
NODE = "ich-node listener + spool (fsync)"
PYNETDICOM = "pynetdicom storescp (no fsync)"

_LISTENER = """
import os, signal, sys, threading, time
from ich_node.config import load_config
from ich_node.ingest import listener
from ich_node.ingest.spool import Spool
from ich_node.log import configure_logging
from ich_node.queue.store import Store
config = load_config(sys.argv[1])
variant = sys.argv[2]
configure_logging(config.logging.format, config.logging.level)
store = Store.open(config.storage.dir)
spool = Spool(config.storage.dir, store, config.storage.min_free_mb)
if variant in ("digest on the ack path", "folder fsync, then commit"):
    from concurrent.futures import Future
    from ich_node.ingest.spool import content_digest
    inline = content_digest if variant == "digest on the ack path" else os.fsync
    pool = spool._helper
    class Inline:
        def submit(self, fn, *args):
            if fn is not inline:
                return pool.submit(fn, *args)
            done = Future()
            done.set_result(fn(*args))
            return done
    spool._helper = Inline()
if variant == "guard off":
    from pynetdicom import evt
    ae = listener.build_ae(config)
    server = ae.start_server((config.node.host, config.node.port), block=False, evt_handlers=[
        (evt.EVT_C_ECHO, listener.handle_echo),
        (evt.EVT_C_STORE, listener.handle_store, [spool, time.time, None]),
        (evt.EVT_CONN_OPEN, listener.set_nodelay)])
else:
    server = listener.start_listener(config, spool)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: done.set())
done.wait()
server.shutdown()
store.close()
"""

#: Node variants: name -> extra ``node`` keys (the listener script reads the name too).
NODE_VARIANTS: dict[str, dict[str, Any]] = {
    NODE: {},
    "node, guard off": {},
    "node, digest on the ack path": {},
    "node, folder fsync, then commit": {},
    "node, max PDU 16 KiB": {"max_pdu_kb": 16},
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slices", type=int, default=98)
    p.add_argument("--matrix", type=int, default=512)
    p.add_argument(
        "--files", type=Path, default=None, help="send the .dcm files under this folder instead"
    )
    p.add_argument("--associations", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=5, help="rounds of every receiver in turn")
    p.add_argument("--ablation", action="store_true", help="add the node variants (see above)")
    p.add_argument("--budget", type=float, default=1800.0,
                   help="seconds: no new round starts after this")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="24 slices of 256x256, one round")
    p.add_argument("--json", type=Path, default=None)
    return p


def node_starter(variant: str, node_keys: dict[str, Any]) -> Callable[..., Any]:
    """Start the node's listener, spool and store alone in a subprocess (one variant)."""

    def start(folder: Path, port: int) -> subprocess.Popen[bytes]:
        import yaml

        config = {
            "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port,
                     "max_associations": 16, **node_keys},
            "callers": [{"ae_title": "MODALITY"}],
            "storage": {"dir": str(folder / "node"), "min_free_mb": 1},
            "logging": {"format": "json", "level": "INFO"},
        }  # fmt: skip
        path = folder / "node.yaml"
        path.write_text(yaml.safe_dump(config))
        name = variant.removeprefix("node, ")
        return subprocess.Popen(
            [sys.executable, "-c", _LISTENER, str(path), name],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    return start


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


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (``/proc``), or None."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(
    start: Callable[[Path, int], subprocess.Popen[bytes]],
    files: list[Path],
    associations: int,
    tmp: Path,
    *,
    forks: bool = False,
) -> tuple[float, float | None]:
    """(seconds to send ``files`` in ``associations`` associations, receiver CPU seconds)."""
    folder = Path(tempfile.mkdtemp(dir=tmp))
    port = free_port()
    receiver = start(folder, port)
    try:
        wait_for("the receiver's port", lambda: port_open(port), 60)
        before = None if forks else cpu_seconds(receiver.pid)
        groups = [files[i::associations] for i in range(associations)]
        seconds = send(port, groups, called=NODE_AE)
        after = None if forks else cpu_seconds(receiver.pid)
        cpu = None if before is None or after is None else after - before
        return seconds, cpu
    finally:
        stop(receiver)


def input_files(args: argparse.Namespace, tmp: Path) -> list[Path]:
    if args.files is not None:
        import pydicom

        found = []
        for path in sorted(p for p in Path(args.files).rglob("*.dcm") if p.is_file()):
            try:  # storescu sends only files that name their SOP Class and Instance
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if ds.get("SOPClassUID") and ds.get("SOPInstanceUID") and "file_meta" in dir(ds):
                found.append(path)
        if not found:
            raise SystemExit(f"no sendable .dcm files under {args.files}")
        return found
    from training.phantom import write_series

    phantom = write_series(
        tmp / "series", seed=11, subtypes=("subdural",), n_slices=args.slices,
        matrix=args.matrix,
    )  # fmt: skip
    return list(phantom.paths)


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.slices, args.matrix, args.rounds = 24, 256, 1
    receivers: dict[str, tuple[Callable[..., Any], bool]] = {
        name: (node_starter(name, keys), False)
        for name, keys in NODE_VARIANTS.items()
        if name == NODE or args.ablation
    }
    receivers[PYNETDICOM] = (start_pynetdicom, False)
    receivers["DCMTK storescp, TCP_NODELAY=1 (no fsync)"] = (start_dcmtk, True)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = input_files(args, tmp)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"{len(files)} files, {megabytes:.1f} MB; rounds of every receiver in turn", flush=True
        )
        for round_no in range(1, args.rounds + 1):
            if round_no > 1 and time.monotonic() - started > args.budget:
                print(f"time budget ({args.budget:g} s) spent after {round_no - 1} rounds")
                break
            for n in args.associations:
                this_round: dict[str, float] = {}
                for name, (start, forks) in receivers.items():
                    seconds, cpu = one_run(start, files, n, tmp, forks=forks)
                    this_round[name] = seconds
                    run = {
                        "round": round_no, "receiver": name, "associations": n,
                        "files/s": len(files) / seconds, "seconds": seconds,
                        "cpu ms/file": None if cpu is None else 1000 * cpu / len(files),
                        "load": load_average(),
                    }  # fmt: skip
                    runs.append(run)
                for run in runs[-len(receivers) :]:  # paired with pynetdicom, same round
                    run["vs pynetdicom"] = this_round[PYNETDICOM] / run["seconds"]
                    cpu = run["cpu ms/file"]
                    print(
                        f"round {round_no}, {n} assoc.: {run['receiver']}: "
                        f"{run['files/s']:.1f} files/s, {run['vs pynetdicom']:.3f}x pynetdicom"
                        + ("" if cpu is None else f", {cpu:.2f} CPU ms/file"),
                        flush=True,
                    )
    rows: list[dict[str, Any]] = []
    for n in args.associations:
        for name in receivers:
            mine = [r for r in runs if r["receiver"] == name and r["associations"] == n]
            if not mine:
                continue
            cpus = [r["cpu ms/file"] for r in mine if r["cpu ms/file"] is not None]
            rows.append(
                {
                    "receiver": name, "associations": n,
                    "files/s": statistics.median(r["files/s"] for r in mine),
                    "MB/s": statistics.median(megabytes / r["seconds"] for r in mine),
                    "vs pynetdicom": statistics.median(r["vs pynetdicom"] for r in mine),
                    "all ratios": [round(r["vs pynetdicom"], 3) for r in mine],
                    "CPU ms/file": statistics.median(cpus) if cpus else None,
                }
            )  # fmt: skip
    print(
        f"\n{len(files)} files ({megabytes:.1f} MB), sender DCMTK storescu TCP_NODELAY=1, "
        f"medians of {len({r['round'] for r in runs})} alternating rounds, load {load_average()}"
    )
    shown = [{k: "-" if v is None else v for k, v in r.items()} for r in rows]
    print(
        table(
            shown,
            ["receiver", "associations", "files/s", "MB/s", "vs pynetdicom", "all ratios",
             "CPU ms/file"],
        )
    )  # fmt: skip
    write_json(
        args.json, "ingest" + ("_quick" if args.quick else ""),
        {"files": len(files), "megabytes": megabytes, "source": str(args.files or "phantom"),
         "matrix": None if args.files else args.matrix, "rounds": args.rounds,
         "rows": rows, "runs": runs},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
