"""`make demo`: phantoms -> a small trained model -> predictions -> the node on the network.

1. Generates synthetic head-CT studies (training set and held-back set).
2. Trains the small demo model (cached while its bundle verifies).
3. ``ich-node predict`` on the held-back studies, printed against the truth.
4. The network path: starts ``ich-node serve`` and a receiving PACS (a pynetdicom
   storage SCP run by this script), sends held-back studies with DCMTK ``storescu``
   (pynetdicom when DCMTK is absent), waits until the SR and heatmaps arrive back at
   the PACS and prints them.

Everything happens under ``demo/`` (ignored by git); delete it to start over. The
demo model is trained on synthetic phantoms and every output it produces says so.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
TRAIN = DEMO / "train"
HOLDOUT = DEMO / "holdout"
MODEL = DEMO / "model"
RESULTS = DEMO / "results"
LABELS = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


def run(*args: str) -> None:
    print("$", " ".join(args[1:] if args[0] == sys.executable else args), flush=True)
    subprocess.run(args, check=True, cwd=REPO)


def ich_train(*args: str) -> None:
    run(sys.executable, "-m", "training.cli", *args)


def ich_node(*args: str) -> None:
    run(sys.executable, "-m", "ich_node.cli", *args)


def bundle_ok(path: Path) -> bool:
    if not path.is_file():
        return False
    from ich_node.bundle import BundleError, load_bundle

    try:
        load_bundle(path)
    except BundleError as exc:
        print(f"cached model is not usable ({exc}); training again")
        return False
    return True


def truth_by_series(folder: Path) -> dict[str, dict[str, int]]:
    with open(folder / "phantom_truth.csv", newline="") as handle:
        return {
            row["series_instance_uid"]: {label: int(row[label]) for label in LABELS}
            for row in csv.DictReader(handle)
        }


def report() -> int:
    truth = truth_by_series(HOLDOUT)
    rows = []
    correct = total = 0
    for uid, labels in truth.items():
        path = RESULTS / uid / "findings.json"
        if not path.is_file():
            rows.append((uid, "missing", "", ""))
            continue
        findings = json.loads(path.read_text())
        predicted = {label for label in LABELS if findings["series"][label]["positive"]}
        actual = {label for label in LABELS if labels[label]}
        total += 1
        correct += predicted == actual
        p_any = findings["series"]["any"]["probability"]
        rows.append(
            (
                "..." + uid[-12:],
                ", ".join(sorted(actual - {"any"})) or "none",
                ", ".join(sorted(predicted - {"any"})) or "none",
                f"{p_any:.2f}",
            )
        )
    print()
    print("Held-back phantom studies: truth against the demo model")
    header = ("series", "truth (subtypes)", "predicted (subtypes)", "p(any)")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(f"\n{correct}/{total} series with exactly the right set of labels.")
    print(f"Findings, SR and heatmaps (with PNG previews) are in {RESULTS}/<SeriesInstanceUID>/.")
    print("DEMO model trained on synthetic phantoms.")
    print("AI result for triage support, not a diagnosis.")
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Pacs:
    """A minimal receiving PACS: a pynetdicom storage SCP that keeps what it gets."""

    def __init__(self, folder: Path, ae_title: str = "DEMO_PACS") -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.folder = folder
        self.port = _free_port()
        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: object) -> int:
        ds = event.dataset  # type: ignore[attr-defined]
        ds.file_meta = event.file_meta  # type: ignore[attr-defined]
        ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        with self._lock:
            self.received.append(ds)
        return 0x0000

    def of_study(self, study_uid: str, modality: str) -> list[pydicom.Dataset]:
        with self._lock:
            return [
                ds
                for ds in self.received
                if ds.StudyInstanceUID == study_uid and ds.Modality == modality
            ]

    def stop(self) -> None:
        self._server.shutdown()


def send_study(folder: Path, port: int) -> None:
    """C-STORE a folder of DICOM files to the node, as a modality or PACS would."""
    storescu = Path("/usr/bin/storescu")
    if storescu.is_file():
        run(str(storescu), "-aet", "DEMO_CT", "-aec", "ICH_NODE", "+sd", "+r",
            "127.0.0.1", str(port), str(folder))  # fmt: skip
        return
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    print(f"(DCMTK not installed: sending {folder} with pynetdicom)")
    ae = AE(ae_title="DEMO_CT")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    for path in sorted(folder.glob("*.dcm")):
        status = assoc.send_c_store(pydicom.dcmread(path))
        if getattr(status, "Status", None) != 0:
            raise RuntimeError(f"C-STORE of {path.name} failed: {status}")
    assoc.release()


def network_demo(bundle: Path) -> int:
    """Serve the node, send studies to it, and wait for its results at the PACS."""
    net = DEMO / "network"
    shutil.rmtree(net, ignore_errors=True)
    net.mkdir(parents=True)
    pacs = Pacs(net / "pacs")
    node_port = _free_port()
    config = net / "node.yaml"
    config.write_text(
        json.dumps(
            {
                "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": node_port},
                "callers": [{"ae_title": "DEMO_CT", "host": "127.0.0.1"}],
                "destinations": [
                    {"name": "demo-pacs", "ae_title": "DEMO_PACS",
                     "host": "127.0.0.1", "port": pacs.port}
                ],
                "series": {"stable_seconds": 2.0},
                "model": {"bundle": str(bundle), "device": "auto"},
                "storage": {"dir": str(net / "node"), "min_free_mb": 50},
                "logging": {"format": "json", "level": "INFO"},
            },
            indent=2,
        )
    )  # fmt: skip  (JSON is valid YAML)
    log = open(net / "node.log", "w")  # noqa: SIM115 - open for the node's lifetime
    print(f"\nStarting the node: ich-node serve --config {config} (log: {net / 'node.log'})")
    node = subprocess.Popen(
        [sys.executable, "-m", "ich_node.cli", "serve", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(
            [sys.executable, "-m", "ich_node.cli", "health", "--config", str(config)],
            capture_output=True, check=False,
        ).returncode:  # fmt: skip
            if node.poll() is not None or time.monotonic() > deadline:
                print("the node did not become healthy; see", net / "node.log")
                return 1
            time.sleep(1)
        truth = truth_by_series(HOLDOUT)
        # One study with a bleed (the one with most subtypes) and one without.
        positive = max(truth, key=lambda uid: sum(truth[uid].values()))
        negative = next(uid for uid, labels in truth.items() if not labels["any"])
        studies: dict[str, str] = {}
        for path in sorted((HOLDOUT / "images").glob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.SeriesInstanceUID in (positive, negative):
                studies[ds.SeriesInstanceUID] = ds.StudyInstanceUID
        send = net / "send"
        for path in sorted((HOLDOUT / "images").glob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.SeriesInstanceUID in studies:
                (send / ds.SeriesInstanceUID).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, send / ds.SeriesInstanceUID / path.name)
        start = time.monotonic()
        for series_uid in studies:
            print(f"Sending study ...{studies[series_uid][-12:]} to the node")
            send_study(send / series_uid, node_port)
        print("Waiting for the SR and heatmaps to arrive at the demo PACS...")
        deadline = time.monotonic() + 600
        while not all(pacs.of_study(s, "SR") for s in studies.values()):
            if node.poll() is not None or time.monotonic() > deadline:
                print("results did not arrive in time; see", net / "node.log")
                return 1
            time.sleep(0.5)
        time.sleep(1.0)  # let the heatmap association finish
        print(f"Results arrived {time.monotonic() - start:.0f} s after sending "
              "(including the 2 s quiet period that closes a series).\n")  # fmt: skip
        for series_uid, study_uid in studies.items():
            (sr,) = pacs.of_study(study_uid, "SR")[:1]
            heatmaps = pacs.of_study(study_uid, "OT") + pacs.of_study(study_uid, "SC")
            truth_labels = [k for k, v in truth[series_uid].items() if v and k != "any"]
            print(f"Study ...{study_uid[-12:]}  truth: {', '.join(truth_labels) or 'none'}")
            print(f"  SR: {sr.SeriesDescription!s}; {len(heatmaps)} heatmap image(s) received")
            for text in _sr_summary(sr):
                print("  SR summary: " + text)
        print(f"\nThe PACS's copies are in {pacs.folder}")
        return 0
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        pacs.stop()
        log.close()


def _sr_summary(sr: pydicom.Dataset) -> list[str]:
    """The SR's plain-text summary: its TEXT items named "Comment" (DCM 121106)."""
    found: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence", [None])[0]
            if item.get("ValueType") == "TEXT" and name is not None and name.CodeValue == "121106":
                found.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.get("ContentSequence", []))
    return found


def main() -> int:
    start = time.monotonic()
    DEMO.mkdir(exist_ok=True)
    if not (TRAIN / "stage_2_train.csv").is_file():
        ich_train("phantom", "--out", str(TRAIN), "--studies", "40", "--seed", "1")
    if not (HOLDOUT / "phantom_truth.csv").is_file():
        ich_train("phantom", "--out", str(HOLDOUT), "--studies", "8", "--seed", "2")
    bundle = MODEL / "model.safetensors"
    if not bundle_ok(bundle):
        ich_train(
            "fit",
            "--config", str(REPO / "config" / "train_demo.yaml"),
            "--images", str(TRAIN / "images"),
            "--labels", str(TRAIN / "stage_2_train.csv"),
            "--out", str(MODEL),
        )  # fmt: skip
    else:
        print(f"using the cached demo model {bundle} (delete demo/ to train again)")
    ich_node("predict", "--bundle", str(bundle), "--out", str(RESULTS), str(HOLDOUT / "images"))
    code = report()
    code = network_demo(bundle) or code
    print(f"demo finished in {time.monotonic() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
