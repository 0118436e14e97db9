"""End-to-end benchmark: last image acknowledged -> all results accepted by the destination.

    python benchmarks/end_to_end.py            # 40 slices of 512x512; ResNeXt-101 at 512
                                               # and the demo's resnet18 at 128
    python benchmarks/end_to_end.py --quick    # 12 slices of 128x128, resnet18 at 64 (CI)

The node runs as in production (``serve`` in a subprocess with a temporary YAML
config: listener, assembler, one worker on the CPU or GPU, sender); DCMTK
``storescu`` (``TCP_NODELAY=1``) sends the study in one association and DCMTK
``storescp`` receives the results. The clock starts when ``storescu`` exits (its
last C-STORE-RSP came back) and stops when the destination holds the SR, which
the sender sends after every heatmap. A first study warms the worker (model
loaded, first batch run); the second one is measured.

Two ways a series is complete (``docs/admin.md``):

- *header count*: the phantom sets ImagesInAcquisition, so the series is queued
  as soon as its last image is spooled: no quiet period;
- *quiet period*: the same study without that attribute waits
  ``series.stable_seconds`` after its last image (30 s by default; this benchmark
  uses a short one and reports it separately: "minus quiet" is the node's own time).

Weights are random and the thresholds put every slice above ``any`` and
``subdural``: the worst case, a heatmap for every slice (40 Secondary Capture
images and the SR). The stage times are the worker's ``job.finished`` log line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Budget,
    dcmtk,
    free_port,
    load_average,
    nodelay_env,
    port_open,
    print_row,
    random_bundle,
    restamp_series,
    send,
    stop,
    wait_for,
    write_json,
)

NODE_AE = "ICH_NODE"
_SERVE = (
    "import sys; from ich_node.config import load_config; "
    "from ich_node.service.serve import serve; sys.exit(serve(load_config(sys.argv[1])))"
)


def resolve_peers(peers: str) -> str:
    """``auto``: DCMTK when installed, else pynetdicom (its ``storescp`` app, its SCU)."""
    if peers != "auto":
        return peers
    try:
        dcmtk("storescp")
        dcmtk("storescu")
    except FileNotFoundError:
        return "pynetdicom"
    return "dcmtk"


class Destination:
    """A ``storescp`` (DCMTK's, or pynetdicom's app) writing what it receives into ``folder``."""

    def __init__(self, folder: Path, peers: str = "dcmtk") -> None:
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        if peers == "dcmtk":
            argv = [dcmtk("storescp"), "-aet", "PACS", "-od", str(folder), str(self.port)]
        else:
            argv = [sys.executable, "-m", "pynetdicom", "storescp", "-q", "-aet", "PACS",
                    "-od", str(folder), str(self.port)]  # fmt: skip
        self.process = subprocess.Popen(
            argv,
            env=nodelay_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._seen: dict[Path, tuple[str, str]] = {}
        wait_for("storescp", lambda: port_open(self.port), 30)

    def modalities(self, study_uid: str) -> list[str]:
        """Modalities of the instances received for ``study_uid`` so far."""
        import pydicom

        for path in self.folder.iterdir():
            if path in self._seen or not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                self._seen[path] = (str(ds.StudyInstanceUID), str(ds.Modality))
            except Exception:  # still being written: read it next time
                continue
        return [m for study, m in self._seen.values() if study == study_uid]


class Node:
    """``serve`` in a subprocess, logging JSON lines to ``folder/node.log``."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        import yaml

        self.folder = folder
        self.port = free_port()
        config["node"] = {"ae_title": NODE_AE, "host": "127.0.0.1", "port": self.port,
                          "workers": 1, **config.get("node", {})}  # fmt: skip
        config.setdefault("callers", [{"ae_title": "MODALITY"}])
        config["storage"] = {"dir": str(folder / "node"), "min_free_mb": 1}
        config["logging"] = {"format": "json", "level": "INFO"}
        self.config_path = folder / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = folder / "node.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _SERVE, str(self.config_path)],
                cwd=Path(__file__).resolve().parents[1],
                stdout=log,
                stderr=log,
            )
        wait_for("the node's listener", lambda: self._alive() and port_open(self.port), 120)

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"node exited: {self.log_path.read_text()[-2000:]}")
        return True

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"{name}"' in line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def stop(self) -> None:
        stop(self.process, 60)


def make_bundle(path: Path, arch: str, size: int) -> Path:
    from ich_node.labels import LABELS

    thresholds = {label: 1.01 for label in LABELS} | {"any": 0.0, "subdural": 0.0}
    return random_bundle(
        path, name=f"benchmark {arch}", arch=arch, input_size=size, thresholds=thresholds
    )


def _send(files: list[Path], port: int, nodelay: bool, calling: str = "PACS") -> None:
    """The sender's C-STORE loop (:func:`ich_node.sender.send_files`), TCP_NODELAY optional."""
    import socket

    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, evt

    def _set_nodelay(event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title=NODE_AE)
    metas = [read_file_meta_info(f) for f in files]
    for sop_class, syntax in sorted(
        {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}
    ):
        ae.add_requested_context(sop_class, syntax)
    handlers = [(evt.EVT_CONN_OPEN, _set_nodelay)] if nodelay else []
    assoc = ae.associate("127.0.0.1", port, ae_title=calling, evt_handlers=handlers)
    assert assoc.is_established
    try:
        for path in files:
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()


def sender_rows(
    files: list[Path],
    tmp: Path,
    repeats: int = 3,
    peers: str = "dcmtk",
    budget: Budget | None = None,
) -> list[dict[str, Any]]:
    """Send a job's outbox to DCMTK storescp: the node's sender, and with TCP_NODELAY."""
    from ich_node.config import Destination as DestinationConfig
    from ich_node.delivery.sender import send_files

    rows = []
    where = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1"}
    variants = {
        "ich_node.sender.send_files (as is)": lambda port: send_files(
            files, DestinationConfig(**where, port=port), NODE_AE, 30.0
        ),
        "same loop, TCP_NODELAY off": lambda port: _send(files, port, nodelay=False),
        "same loop, TCP_NODELAY on": lambda port: _send(files, port, nodelay=True),
    }
    for name, fn in variants.items():
        best = float("inf")
        for _ in range(repeats):
            if budget is not None and not budget.allows(5.0):
                break
            pacs = Destination(Path(tempfile.mkdtemp(dir=tmp)), peers)
            try:
                t = time.perf_counter()
                fn(pacs.port)
                best = min(best, time.perf_counter() - t)
            finally:
                stop(pacs.process)
        if best < float("inf"):
            rows.append({"sender": name, "objects": len(files), "seconds": best,
                         "objects/s": len(files) / best})  # fmt: skip
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", nargs="+", default=None,
        help="ARCH:INPUT_SIZE, random weights (default: resnext101_32x8d:512, and on the "
        "CPU also resnet18:128)",
    )  # fmt: skip
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--matrix", type=int, default=512)
    p.add_argument("--stable-seconds", type=float, default=5.0, help="quiet period in the test")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16"), help="model.precision"
    )
    p.add_argument(
        "--peers", default="auto", choices=("auto", "dcmtk", "pynetdicom"),
        help="the PACS's storescu/storescp: DCMTK's, or pynetdicom's (auto: DCMTK if installed)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="12 slices of 128x128, resnet18 at 64")
    p.add_argument("--budget", type=float, default=0.0, help="seconds (0: 90 GPU, 1200 CPU)")
    p.add_argument("--json", type=Path, default=None)
    return p


COLUMNS = ["model", "completion", "seconds", "quiet s", "minus quiet", "read s", "infer s",
           "results s", "job s", "objects"]  # fmt: skip
SENDER_COLUMNS = ["sender", "objects", "seconds", "objects/s"]


def measure_study(
    node: Node, pacs: Destination, files: list[Path], study_uid: str, timeout: float,
    peers: str = "dcmtk",
) -> dict[str, Any]:  # fmt: skip
    """Send one study; seconds from the last acknowledgement to the SR at the destination."""
    if peers == "dcmtk":
        send(node.port, [files], called=NODE_AE)
    else:  # one association, TCP_NODELAY, as DCMTK's storescu with TCP_NODELAY=1
        _send(files, node.port, nodelay=True, calling="MODALITY")
    acked = time.perf_counter()
    wait_for("the SR at the destination", lambda: "SR" in pacs.modalities(study_uid), timeout)
    seconds = time.perf_counter() - acked
    received = pacs.modalities(study_uid)
    return {"seconds": seconds, "received": len(received), "heatmaps": received.count("OT")
            + received.count("SC")}  # fmt: skip


def run_model(
    args: argparse.Namespace, arch: str, size: int, tmp: Path, budget: Budget
) -> tuple[list[dict[str, Any]], list[Path]]:
    import pydicom

    from training.phantom import write_series

    folder = Path(tempfile.mkdtemp(dir=tmp))
    phantom = write_series(
        folder / "series", seed=21, subtypes=("subdural",), n_slices=args.slices,
        matrix=args.matrix,
    )  # fmt: skip
    bundle = make_bundle(folder / "model.safetensors", arch, size)
    pacs = Destination(folder / "pacs", args.peers)
    config = {
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": pacs.port}],
        "series": {"stable_seconds": args.stable_seconds, "min_slices": min(10, args.slices)},
        "model": {
            "bundle": str(bundle),
            "device": args.device,
            "batch_size": args.batch_size,
            "precision": args.precision,
        },
        "results": {"heatmaps": "positive"},
        "sender": {"max_attempts": 10, "backoff_base_seconds": 0.2, "backoff_max_seconds": 1.0,
                   "timeout_seconds": 30.0},
    }  # fmt: skip
    node = Node(folder, config)
    rows = []
    outbox: list[Path] = []
    try:
        timeout = 60.0 + 60.0 * args.slices * (size / 128) ** 2 / 10
        warm = restamp_series(phantom.paths, folder / "warm", "warm-up")
        warm_study = str(pydicom.dcmread(warm[0]).StudyInstanceUID)
        measure_study(
            node, pacs, warm, warm_study, min(timeout, max(1.0, budget.left())), args.peers
        )
        for variant, drop in (("header count", False), ("quiet period", True)):
            if not budget.allows(args.stable_seconds if drop else 1.0):
                print(f"(budget: {arch} at {size}, {variant} skipped)", flush=True)
                continue
            timeout = min(timeout, max(1.0, budget.left()))
            files = restamp_series(phantom.paths, folder / variant, variant, drop_count=drop)
            study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
            series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
            got = measure_study(node, pacs, files, study, timeout, args.peers)
            quiet = args.stable_seconds if drop else 0.0
            job = [e for e in node.events("job.finished") if e.get("series_instance_uid") == series]
            stages = job[-1] if job else {}
            if not outbox and stages:
                results = folder / "node" / "results" / str(stages["job_id"]) / "outbox"
                outbox = sorted(results.rglob("*.dcm"))
            rows.append(
                {
                    "model": f"{arch} at {size}",
                    "completion": variant,
                    "seconds": got["seconds"],
                    "quiet s": quiet,
                    "minus quiet": got["seconds"] - quiet,
                    "read s": stages.get("read_s"),
                    "infer s": stages.get("infer_s"),
                    "results s": stages.get("results_s"),
                    "job s": stages.get("total_s"),
                    "objects": got["received"],
                }
            )
            print_row(COLUMNS, rows[-1])
    finally:
        node.stop()
        stop(pacs.process)
    return rows, outbox


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.models, args.slices, args.matrix = ["resnet18:64"], 12, 128
        args.stable_seconds = 1.0
    gpu = args.device == "cuda"
    if args.models is None:
        args.models = ["resnext101_32x8d:512"] + ([] if gpu else ["resnet18:128"])
    budget = Budget(args.budget or (90.0 if gpu else 1200.0))
    args.peers = resolve_peers(args.peers)
    rows: list[dict[str, Any]] = []
    senders: list[dict[str, Any]] = []
    print(
        f"{args.slices} slices of {args.matrix}x{args.matrix}, one worker on {args.device}, "
        f"batch {args.batch_size}, precision {args.precision}, every slice explained, "
        f"load {load_average()} at start",
        flush=True,
    )
    print_row(COLUMNS, None)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            arch, size = spec.split(":")
            if not budget.allows(20.0):
                print(f"(budget: {spec} skipped, {budget.left():.0f} s left)", flush=True)
                continue
            try:
                got, outbox = run_model(args, arch, int(size), Path(tmp), budget)
            except TimeoutError as exc:  # the budget ran out while waiting for the SR
                print(f"({spec}: {exc})", flush=True)
                continue
            rows += got
            if outbox and not senders and budget.allows(10.0):
                # The sender's share, measured on a job's outbox.
                senders = sender_rows(
                    outbox, Path(tmp), repeats=1 if args.quick else 3, peers=args.peers,
                    budget=budget,
                )  # fmt: skip
                print_row(SENDER_COLUMNS, None)
                for row in senders:
                    print_row(SENDER_COLUMNS, row)
    print(f"load {load_average()} at the end")
    write_json(
        args.json, "end_to_end" + ("_quick" if args.quick else ""),
        {"slices": args.slices, "matrix": args.matrix, "stable_seconds": args.stable_seconds,
         "device": args.device, "batch_size": args.batch_size, "precision": args.precision,
         "peers": args.peers,
         "rows": rows,
         "sender": senders},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
