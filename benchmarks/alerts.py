"""Time to notification, with and without the streaming read, in one run.

    python benchmarks/alerts.py                  # 40 slices of 512x512, the demo model on
                                                 # the CPU (demo/model; a random resnet18 at
                                                 # 128 when `make demo` has not run), 30 s quiet
    python benchmarks/alerts.py --device cuda    # the same on a GPU
    python benchmarks/alerts.py --quick          # 12 slices of 128x128, resnet18 at 64 (CI)

Two nodes run as in production (``serve`` in subprocesses), side by side: one with
``series.streaming: true`` and an HL7 target with ``early: true``, one with
``series.streaming: false``. Each study is sent to one, then to the other, as a
modality sends: one association, the images in spatial order, ``--pause`` seconds
apart, without ImagesInAcquisition, so each node waits ``series.stable_seconds``
(default 30 s, the node's default) after the last image. A RIS (python-hl7's MLLP
server, answering AA) and a PACS (a pynetdicom storage SCP) in this process record
when each message and object arrives. Per study and node:

- **positive ack -> early alert**: from the C-STORE response of the slice with
  which the slices so far became positive by the early rule (``early_min_slices``
  positive slices in a row, read off the final findings in arrival order) to the
  preliminary ORU^R01 (OBR-25 ``P``) at the RIS (streaming node only);
- **last ack -> final alert**: from the last C-STORE response to the final ORU^R01
  (``F``, or ``C`` when it corrects the preliminary);
- **last ack -> SR**: from the last C-STORE response to the SR at the PACS;
- the worker's ``infer`` seconds at completion and the slices it took from the
  stream; the largest difference of any slice probability between the two nodes'
  ``findings.json`` of the same images (target: <= 1e-6);
- the 1-minute load average when the row was measured (other work on the machine
  slows every figure).

Targets (issue 27, demo model, two CPU cores, 30 s quiet): last ack -> SR <= quiet
+ 2 s with streaming; positive ack -> early alert <= 3 s; findings equal to 1e-6.
Rows are printed as soon as measured; ``--budget-seconds`` stops starting studies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    MLLPReceiver,
    free_port,
    load_average,
    random_bundle,
    restamp_series,
    table,
    wait_for,
    write_json,
)
from benchmarks.end_to_end import NODE_AE, Node

REPO = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = REPO / "demo" / "model" / "model.safetensors"
MODES = ("streaming", "at completion")
COLUMNS = ["study", "mode", "slices", "quiet s", "positive ack -> early alert s",
           "last ack -> final alert s", "last ack -> SR s", "infer s at completion",
           "streamed slices", "max |dp| vs other mode", "load"]  # fmt: skip


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--matrix", type=int, default=512)
    p.add_argument("--studies", type=int, default=3, help="measured studies (after a warm-up)")
    p.add_argument("--stable-seconds", type=float, default=30.0)
    p.add_argument("--pause", type=float, default=0.1, help="seconds between two images sent")
    p.add_argument("--early-min-slices", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--bundle", type=Path, default=None, help="default: the demo model")
    p.add_argument("--budget-seconds", "--budget", type=float, default=3600.0)
    p.add_argument("--quick", action="store_true", help="12 slices of 128x128, resnet18 at 64")
    p.add_argument("--json", type=Path, default=None)
    return p


def _bundle(args: argparse.Namespace, folder: Path) -> tuple[Path, str]:
    from ich_node.labels import LABELS

    if args.bundle is not None:
        return args.bundle, str(args.bundle)
    if not args.quick and DEMO_BUNDLE.is_file():
        return DEMO_BUNDLE, "demo model"
    arch_size = ("resnet18", 64 if args.quick else 128)
    thresholds = {label: 1.01 for label in LABELS} | {"any": 0.0, "subdural": 0.0}
    path = random_bundle(
        folder / "model.safetensors",
        name="alerts benchmark",
        arch=arch_size[0],
        input_size=arch_size[1],
        thresholds=thresholds,
    )
    return path, f"random {arch_size[0]} at {arch_size[1]} (every slice positive)"


class Pacs:
    """A pynetdicom storage SCP that records when each SR of a study arrives."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port = free_port()
        self.sr_at: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on)]
        )

    def _on(self, event: Any) -> int:
        at = time.perf_counter()
        ds = event.dataset
        if str(getattr(ds, "Modality", "")) == "SR":
            with self._lock:
                self.sr_at.setdefault(str(ds.StudyInstanceUID), []).append(at)
        return 0x0000

    def first_sr(self, study_uid: str) -> float | None:
        with self._lock:
            times = self.sr_at.get(study_uid)
            return times[0] if times else None

    def stop(self) -> None:
        self._server.shutdown()


def send_paced(files: list[Path], port: int, pause: float) -> list[float]:
    """One association, each image ``pause`` s after the last one's response; the
    ``time.perf_counter()`` of each C-STORE response."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    metas = [read_file_meta_info(f) for f in files]
    for sop_class, syntax in sorted(
        {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}
    ):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    acks = []
    try:
        for i, path in enumerate(files):
            if i:
                time.sleep(pause)
            status = assoc.send_c_store(path)
            if getattr(status, "Status", None) != 0x0000:
                raise RuntimeError(f"C-STORE of {path.name} answered {status}")
            acks.append(time.perf_counter())
    finally:
        assoc.release()
    return acks


def became_positive(findings: dict[str, Any], order: list[str], min_slices: int) -> int | None:
    """Index in ``order`` (SOP UIDs as sent) of the slice with which the slices so far
    met the early rule, read off the final per-slice probabilities; ``None`` if never."""
    from ich_node.labels import LABELS

    by_uid = {s["sop_instance_uid"]: s for s in findings["slices"]}
    position = {s["sop_instance_uid"]: i for i, s in enumerate(findings["slices"])}
    thresholds = {label: findings["series"][label]["threshold"] for label in LABELS}
    for k in range(1, len(order) + 1):
        received = sorted(order[:k], key=lambda uid: position.get(uid, -1))
        run = 0
        for uid in received:
            run = run + 1 if by_uid[uid]["probabilities"]["any"] >= thresholds["any"] else 0
            if run >= min_slices:
                return k - 1
    return None


def _node_config(args: argparse.Namespace, bundle: Path, ris: MLLPReceiver, pacs: Pacs,
                 streaming: bool) -> dict[str, Any]:  # fmt: skip
    return {
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": pacs.port}],
        "series": {"stable_seconds": args.stable_seconds, "min_slices": min(10, args.slices),
                   "streaming": streaming, "early_min_slices": args.early_min_slices},
        "model": {"bundle": str(bundle), "device": args.device},
        "notifications": [{"name": "ris", "kind": "hl7", "host": "127.0.0.1",
                           "port": ris.port, "receiving_application": "RIS",
                           "receiving_facility": "HOSP", "when": "always",
                           "early": streaming}],
    }  # fmt: skip


def _messages(ris: MLLPReceiver, accession: str) -> list[tuple[float, str]]:
    """(arrival, OBR-25 result status) of each ORU^R01 about ``accession``."""
    return [
        (t, str(m.segment("OBR")(25)))
        for t, m in list(ris.arrived)
        if str(m.segment("ORC")(2)) == accession
    ]


def _findings(node: Node, series_uid: str) -> dict[str, Any] | None:
    from ich_node.queue.layout import results_dir
    from ich_node.queue.store import Store

    store = Store.open(node.folder / "node")
    try:
        jobs = [j for j in store.jobs() if j.series_instance_uid == series_uid]
    finally:
        store.close()
    if not jobs:
        return None
    path = results_dir(node.folder / "node", jobs[-1].job_id) / "findings.json"
    return dict(json.loads(path.read_text())) if path.is_file() else None


def measure(args: argparse.Namespace, n: int, mode: str, node: Node, source: list[Path],
            folder: Path, ris: MLLPReceiver, pacs: Pacs) -> dict[str, Any]:  # fmt: skip
    """Send one study to ``node`` and time what comes back."""
    import pydicom

    files = restamp_series(source, folder / f"s{n}-{mode.replace(' ', '-')}",
                           f"alerts {n} {mode}", drop_count=True)  # fmt: skip
    accession = f"B{n:03d}{'S' if mode == 'streaming' else 'C'}"
    order = []
    for path in files:  # one accession per study: the ORU names it
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = accession
        ds.save_as(path, enforce_file_format=True)
        order.append(str(ds.SOPInstanceUID))
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    load = load_average()
    acks = send_paced(files, node.port, args.pause)
    timeout = 120.0 + args.stable_seconds + 2.0 * args.slices * (args.matrix / 128) ** 2

    def finals() -> list[float]:
        return [t for t, status in _messages(ris, accession) if status != "P"]

    wait_for("the final alert", finals, timeout)
    wait_for("the SR", lambda: pacs.first_sr(study), timeout)
    early = [t for t, status in _messages(ris, accession) if status == "P"]
    findings = wait_for("findings.json", lambda: _findings(node, series), 30)
    job = [e for e in node.events("job.finished") if e.get("series_instance_uid") == series]
    k = became_positive(findings, order, args.early_min_slices)
    sr_at = pacs.first_sr(study)
    return {
        "study": n,
        "mode": mode,
        "slices": len(files),
        "quiet s": args.stable_seconds,
        "positive ack -> early alert s": None if not early or k is None else early[0] - acks[k],
        "positive slice (sent as)": None if k is None else k + 1,
        "last ack -> final alert s": finals()[0] - acks[-1],
        "last ack -> SR s": None if sr_at is None else sr_at - acks[-1],
        "infer s at completion": job[-1].get("infer_s") if job else None,
        "streamed slices": job[-1].get("streamed") if job else None,
        "load": load,
        "_probabilities": [sorted(s["probabilities"].items()) for s in findings["slices"]],
    }


def main(args: argparse.Namespace) -> int:
    from training.phantom import write_series

    if args.quick:
        args.slices, args.matrix, args.studies, args.stable_seconds = 12, 128, 1, 1.0
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        phantom = write_series(folder / "series", seed=31, subtypes=("subdural",),
                               n_slices=args.slices, matrix=args.matrix)  # fmt: skip
        bundle, model = _bundle(args, folder)
        ris, pacs = MLLPReceiver(), Pacs()
        nodes: dict[str, Node] = {}
        try:
            for mode in MODES:
                config = _node_config(args, bundle, ris, pacs, mode == "streaming")
                (folder / mode.replace(" ", "-")).mkdir()
                nodes[mode] = Node(folder / mode.replace(" ", "-"), config)
            print(
                f"{args.slices} slices of {args.matrix}x{args.matrix}, {model} on {args.device}, "
                f"stable_seconds {args.stable_seconds}, images {args.pause} s apart, "
                f"early_min_slices {args.early_min_slices}",
                flush=True,
            )
            print(table([], COLUMNS).splitlines()[0], flush=True)
            for n in range(args.studies + 1):  # study 0 warms each worker up
                if n and time.monotonic() - started > args.budget_seconds:
                    print(f"(budget of {args.budget_seconds:g} s spent: stopped)", flush=True)
                    break
                pair = {}
                for mode in MODES:
                    pair[mode] = measure(args, n, mode, nodes[mode], list(phantom.paths),
                                         folder, ris, pacs)  # fmt: skip
                a, b = (pair[m].pop("_probabilities") for m in MODES)
                diff = max(
                    abs(x[1] - y[1])
                    for ra, rb in zip(a, b, strict=True)
                    for x, y in zip(ra, rb, strict=True)
                )
                for mode in MODES:
                    pair[mode]["max |dp| vs other mode"] = diff
                    if n:
                        rows.append(pair[mode])
                        print(table([pair[mode]], COLUMNS).splitlines()[-1], flush=True)
        finally:
            for node in nodes.values():
                node.stop()
            pacs.stop()
            ris.close()
    if not rows:
        return 1
    summary = _summary(rows, args)
    print()
    print(table(rows, COLUMNS))
    for line in summary["lines"]:
        print(line)
    write_json(
        args.json, "alerts" + ("_quick" if args.quick else ""),
        {"slices": args.slices, "matrix": args.matrix, "stable_seconds": args.stable_seconds,
         "pause_s": args.pause, "early_min_slices": args.early_min_slices,
         "device": args.device, "model": model, "rows": rows,
         **{k: v for k, v in summary.items() if k != "lines"}},
    )  # fmt: skip
    return 0


def _summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def med(mode: str, column: str) -> float | None:
        values = [r[column] for r in rows if r["mode"] == mode and r[column] is not None]
        return statistics.median(values) if values else None

    quiet = args.stable_seconds
    out: dict[str, Any] = {
        "median_sr_s": {m: med(m, "last ack -> SR s") for m in MODES},
        "median_final_alert_s": {m: med(m, "last ack -> final alert s") for m in MODES},
        "median_early_alert_s": med("streaming", "positive ack -> early alert s"),
        "max_probability_difference": max(r["max |dp| vs other mode"] for r in rows),
    }
    sr, early, diff = (
        out["median_sr_s"]["streaming"],
        out["median_early_alert_s"],
        out["max_probability_difference"],
    )

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out["lines"] = [
        f"median last ack -> SR: {sr:.2f} s streaming, "
        f"{out['median_sr_s']['at completion']:.2f} s at completion; target <= "
        f"{quiet + 2:.1f} s (quiet + 2 s) with streaming: {verdict(sr <= quiet + 2)}",
        "median positive ack -> early alert: "
        + (
            "no early alert (no study positive by the early rule)"
            if early is None
            else f"{early:.2f} s; target <= 3 s: {verdict(early <= 3.0)}"
        ),
        f"largest probability difference streaming vs at completion: {diff:.2e}; "
        f"target <= 1e-6: {verdict(diff <= 1e-6)}",
        f"load average now {load_average()} (each row has its own)",
    ]
    return out


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
