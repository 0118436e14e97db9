"""`make demo`: phantoms -> a small trained model -> predictions -> the node on the network.

1. Generates synthetic head-CT studies (training set and held-back set).
2. Trains the small demo model (cached while its bundle verifies).
3. ``ich-node predict`` on the held-back studies, printed against the truth.
4. The network path: starts ``ich-node serve`` and a receiving PACS (a pynetdicom
   storage SCP run by this script), sends held-back studies with DCMTK ``storescu``
   (pynetdicom when DCMTK is absent), waits until the SR and heatmaps arrive back at
   the PACS and prints them, and prints the HL7 alerts (ORU^R01) that a RIS stand-in
   (python-hl7's MLLP server) received for the positive study: the preliminary one
   (result status P, sent while the series was still arriving: the node reads slices
   as they arrive) and the final, each with how long after the study was sent and
   before (or after) the study's SR reached the PACS it arrived.
5. The audit: the other held-back studies go through the node too, and
   ``ich-node audit`` compares the node's answers (its results ledger) with the
   phantoms' truth, written as a radiologists' reads CSV; it prints its summary and
   writes ``demo/network/audit/report.html`` (docs/validation.md).
6. Starts the web console (``ich-node web``) on the node's storage and prints its
   address, user and password (its Validation page shows the audit's report); it
   keeps running, like the demo's Orthanc, until ``make demo-stop``.

Everything happens under ``demo/`` (ignored by git); delete it to start over. The
demo model is trained on synthetic phantoms and every output it produces says so.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
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
sys.path.insert(0, str(REPO))  # tests.orthanc_util: the Orthanc launcher the tests use
DEMO = REPO / "demo"
TRAIN = DEMO / "train"
HOLDOUT = DEMO / "holdout"
MODEL = DEMO / "model"
RESULTS = DEMO / "results"
#: How often the demo looks for the results at the PACS (seconds).
POLL_SECONDS = 0.2
LABELS = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


def _shown(arg: str) -> str:
    """A path relative to the repository when it is inside it (a command one can paste)."""
    path = Path(arg)
    if path.is_absolute() and path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return arg


def run(*args: str) -> None:
    # Echoed as run, interpreter included: the line works when pasted in the repository.
    print("$", shlex.join(_shown(a) for a in args), flush=True)
    # Unbuffered: each epoch's line and the estimate show as they come, also through a pipe.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(args, check=True, cwd=REPO, env=env)


def ich_train(*args: str) -> None:
    run(sys.executable, "-m", "training.cli", *args)


def ich_node(*args: str) -> None:
    run(sys.executable, "-m", "ich_node.cli", *args)


def bundle_ok(path: Path) -> bool:
    if not path.is_file():
        return False
    from ich_node.model.bundle import BundleError, load_bundle

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
    from ich_node.service.cli import short_uid, table_order

    truth = truth_by_series(HOLDOUT)
    rows = []
    thresholds: dict[str, float] = {}
    correct = total = 0
    # predict's order (the whole UID), with the same shortened UIDs.
    for uid in sorted(truth, key=table_order):
        labels = truth[uid]
        path = RESULTS / uid / "findings.json"
        if not path.is_file():
            rows.append((short_uid(uid), "missing", "", ""))
            continue
        findings = json.loads(path.read_text())
        predicted = {label for label in LABELS if findings["series"][label]["positive"]}
        actual = {label for label in LABELS if labels[label]}
        total += 1
        correct += predicted == actual
        p_any = findings["series"]["any"]["probability"]
        thresholds = {label: findings["series"][label]["threshold"] for label in LABELS}
        rows.append(
            (
                short_uid(uid),
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
    if thresholds:
        print(
            "\nA label is predicted at or above its own threshold (chosen on validation "
            "data, stored in the bundle): "
            + ", ".join(f"{label} {value:.2f}" for label, value in thresholds.items())
        )
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

    ae_title = "DEMO_PACS"

    def __init__(self, folder: Path) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.folder = folder
        self.port = _free_port()
        self.received: list[pydicom.Dataset] = []
        # StudyInstanceUID -> time.perf_counter() when its first SR arrived.
        self._sr_at: dict[str, float] = {}
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: object) -> int:
        arrived = time.perf_counter()
        ds = event.dataset  # type: ignore[attr-defined]
        ds.file_meta = event.file_meta  # type: ignore[attr-defined]
        ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        with self._lock:
            self.received.append(ds)
            if ds.Modality == "SR":
                self._sr_at.setdefault(str(ds.StudyInstanceUID), arrived)
        return 0x0000

    def sr_arrival(self, study_uid: str) -> float | None:
        """``time.perf_counter()`` when the study's first SR arrived, or ``None`` yet."""
        with self._lock:
            return self._sr_at.get(study_uid)

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


class OrthancPacs:
    """Debian's Orthanc as the demo PACS, with the shipped head-CT routing rule.

    Studies are uploaded to Orthanc (as a scanner would store them); the rule in
    ``config/orthanc/route-head-ct.lua`` sends each stable head CT series to the
    node, and the node stores its results back into Orthanc. Orthanc keeps running
    after the demo so the results can be opened in its web viewer.
    """

    ae_title = "ORTHANC"

    def __init__(self, folder: Path, node_port: int) -> None:
        from tests.orthanc_util import NODE_MODALITY, find_plugin, free_ports, start_orthanc

        http = 8042 if _port_free(8042) else free_ports(1)[0]
        self.port = free_ports(1)[0]
        plugin = find_plugin("libOrthancWebViewer.so")
        self.server = start_orthanc(
            folder,
            aet=self.ae_title,
            http_port=http,
            dicom_port=self.port,
            modalities={NODE_MODALITY: ("ICH_NODE", "127.0.0.1", node_port)},
            stable_age=2,
            plugins=[plugin] if plugin else [],
        )
        self.viewer = plugin is not None
        self._sr_seen: dict[str, float] = {}

    def send(self, folder: Path) -> None:
        self.server.upload(sorted(folder.glob("*.dcm")))

    def _series(self, study_uid: str, modality: str) -> list[dict]:
        study = self.server.study_id(study_uid)
        if study is None:
            return []
        return [
            s
            for s in self.server.get(f"/studies/{study}/series")
            if s["MainDicomTags"].get("Modality") == modality
        ]

    def sr_arrival(self, study_uid: str) -> float | None:
        """``time.perf_counter()`` when this demo first saw the study's SR in Orthanc.

        Orthanc's own ReceptionDate has whole seconds only; the demo polls every
        ``POLL_SECONDS``, so this is at most that much after the SR arrived.
        """
        if study_uid not in self._sr_seen and self._series(study_uid, "SR"):
            self._sr_seen[study_uid] = time.perf_counter()
        return self._sr_seen.get(study_uid)

    def of_study(self, study_uid: str, modality: str) -> list[pydicom.Dataset]:
        from io import BytesIO

        out = []
        for series in self._series(study_uid, modality):
            for instance in series["Instances"]:
                raw = self.server.request("GET", f"/instances/{instance}/file")
                out.append(pydicom.dcmread(BytesIO(raw)))
        return out

    def where(self, study_uid: str) -> str:
        study = self.server.study_id(study_uid)
        lines = [f"  Orthanc Explorer: {self.server.url}/app/explorer.html#study?uuid={study}"]
        heatmaps = self._series(study_uid, "OT") + self._series(study_uid, "SC")
        lines += viewer_lines(self.server.url, [s["ID"] for s in heatmaps], self.viewer)
        return "\n".join(lines)

    def stop(self) -> None:
        pid = self.server.process.pid
        (DEMO / "orthanc.pid").write_text(f"{pid}\n")
        print(
            f"\nOrthanc keeps running at {self.server.url} (pid {pid}); `make demo-stop` stops it."
        )


#: Why a demo with Orthanc prints no web-viewer links.
NO_VIEWER = (
    "  (no web-viewer links: Orthanc's web viewer plugin is not installed; "
    "`apt-get install orthanc-webviewer` adds it. Orthanc Explorer above shows the "
    "heatmap images too.)"
)


def viewer_lines(url: str, series_ids: list[str], viewer: bool) -> list[str]:
    """One web-viewer link per heatmap series, or the line that says why there are none."""
    if not viewer:
        return [NO_VIEWER]
    return [
        f"  heatmaps in the web viewer: {url}/web-viewer/app/viewer.html?series={sid}"
        for sid in series_ids
    ]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


#: The console's preferred port (the next free one when taken).
WEB_PORT = 8090


def start_console(config: Path, folder: Path) -> tuple[str, str]:
    """Start ``ich-node web`` for the node of ``config`` (which names ``web.address`` and
    ``web.users_file``) with a user ``demo`` (admin) and a new random password.

    Returns the console's address and the password; the console keeps running
    (``demo/web.pid``) until :func:`stop_console`.
    """
    import secrets

    password = secrets.token_urlsafe(12)
    argv = [sys.executable, "-m", "ich_node.cli"]
    subprocess.run(
        [*argv, "web-user", "add", "demo", "--role", "admin", "--config", str(config),
         "--password-stdin"],
        input=password + "\n", text=True, check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    address = json.loads(config.read_text())["web"]["address"]
    log = open(folder / "web.log", "w")  # noqa: SIM115 - the console's log, kept open by it
    console = subprocess.Popen(
        [*argv, "web", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
        cwd=REPO, start_new_session=True,
    )  # fmt: skip
    log.close()
    (DEMO / "web.pid").write_text(str(console.pid))
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 60
    while _port_free(int(port)):
        if console.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the web console did not start; see {folder / 'web.log'}")
        time.sleep(0.2)
    return f"http://{host}:{port}/", password


def stop_console() -> str:
    """Stop the console an earlier demo left running; see :func:`_stop_recorded`."""
    return _stop_recorded(DEMO / "web.pid", "web console")


def _orthanc_installed() -> bool:
    return Path("/usr/sbin/Orthanc").is_file() or shutil.which("Orthanc") is not None


def network_demo(bundle: Path) -> int:
    """Serve the node, send it studies through a PACS, wait for the results there."""
    net = DEMO / "network"
    stop_orthanc()
    stop_console()
    shutil.rmtree(net, ignore_errors=True)
    net.mkdir(parents=True)
    node_port = _free_port()
    web_port = WEB_PORT if _port_free(WEB_PORT) else _free_port()
    pacs: Pacs | OrthancPacs
    if _orthanc_installed():
        print("\nOrthanc is installed: it is the demo PACS (the shipped rule routes head CTs).")
        pacs = OrthancPacs(net / "orthanc", node_port)
        if not pacs.viewer:
            print(NO_VIEWER.strip())
        caller = OrthancPacs.ae_title
    else:
        print("\nOrthanc is not installed: a built-in receiver plays the PACS "
              "(apt-get install orthanc orthanc-webviewer: results in a viewer).")  # fmt: skip
        pacs = Pacs(net / "pacs")
        caller = "DEMO_CT"
    # A RIS stand-in (python-hl7's MLLP server): the node's HL7 alert goes there.
    from benchmarks.common import MLLPReceiver

    ris = MLLPReceiver()
    config = net / "node.yaml"
    config.write_text(
        json.dumps(
            {
                "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": node_port},
                "callers": [{"ae_title": caller, "host": "127.0.0.1"}],
                "destinations": [
                    {
                        "name": "demo-pacs",
                        "ae_title": pacs.ae_title,
                        "host": "127.0.0.1",
                        "port": pacs.port,
                    }
                ],
                # A PACS that sends no image count: each series is complete this long
                # after its last image (the node's default is 30 s). The node reads the
                # slices while they arrive (series.streaming), so the RIS hears of the
                # bleed before that: a preliminary alert (early: true), then the final.
                "series": {"stable_seconds": 10.0},
                "model": {"bundle": str(bundle), "device": "auto"},
                "notifications": [
                    {
                        "name": "demo-ris",
                        "kind": "hl7",
                        "host": "127.0.0.1",
                        "port": ris.port,
                        "receiving_application": "DEMO_RIS",
                        "receiving_facility": "DEMO",
                        "early": True,
                    }
                ],
                "storage": {"dir": str(net / "node"), "min_free_mb": 50},
                "logging": {"format": "json", "level": "INFO"},
                "web": {
                    "address": f"127.0.0.1:{web_port}",
                    "users_file": str(net / "web-users"),
                    "show_patient": True,  # phantoms: synthetic names only
                },
            },
            indent=2,
        )
    )  # fmt: skip  (JSON is valid YAML)
    log = open(net / "node.log", "w")  # noqa: SIM115 - open for the node's lifetime
    argv = [sys.executable, "-m", "ich_node.cli", "serve", "--config", str(config)]
    print(f"Starting the node (log: {_shown(str(net / 'node.log'))}):")
    print("$", shlex.join(_shown(a) for a in argv), flush=True)
    node = subprocess.Popen(
        argv,
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
        send = net / "send"
        for path in sorted((HOLDOUT / "images").glob("*.dcm")):
            ds = pydicom.dcmread(path)
            (send / ds.SeriesInstanceUID).mkdir(parents=True, exist_ok=True)
            # As most PACS send them: no image count that covers the whole series, so
            # the node closes each series after its quiet period (series.stable_seconds).
            for keyword in ("ImagesInAcquisition", "NumberOfSeriesRelatedInstances"):
                if keyword in ds:
                    delattr(ds, keyword)
            ds.save_as(send / ds.SeriesInstanceUID / path.name, enforce_file_format=True)
            if ds.SeriesInstanceUID in (positive, negative):
                studies[ds.SeriesInstanceUID] = ds.StudyInstanceUID
        start = time.monotonic()
        sent_at: dict[str, float] = {}  # StudyInstanceUID -> perf_counter() when sent
        for series_uid in studies:
            print(f"Sending study ...{studies[series_uid][-12:]}")
            sent_at[studies[series_uid]] = time.perf_counter()
            if isinstance(pacs, OrthancPacs):
                pacs.send(send / series_uid)  # stored in Orthanc; its rule routes it
            else:
                send_study(send / series_uid, node_port)
        print("Waiting for the SR and heatmaps to arrive at the PACS...")
        deadline = time.monotonic() + 600
        while not all(pacs.sr_arrival(s) is not None for s in studies.values()):
            if node.poll() is not None or time.monotonic() > deadline:
                print("results did not arrive in time; see", net / "node.log")
                return 1
            time.sleep(POLL_SECONDS)
        time.sleep(2.0)  # let the heatmap association finish
        print(f"Results arrived {time.monotonic() - start:.0f} s after sending "
              "(including the quiet periods that close a series).\n")  # fmt: skip
        _print_alerts(ris, {s: pacs.sr_arrival(s) for s in studies.values()}, sent_at)
        for series_uid, study_uid in studies.items():
            (sr,) = pacs.of_study(study_uid, "SR")[:1]
            heatmaps = pacs.of_study(study_uid, "OT") + pacs.of_study(study_uid, "SC")
            truth_labels = [k for k, v in truth[series_uid].items() if v and k != "any"]
            print(f"Study ...{study_uid[-12:]}  truth: {', '.join(truth_labels) or 'none'}")
            print(f"  SR: {sr.SeriesDescription!s}; {len(heatmaps)} heatmap image(s) received")
            for text in _sr_summary(sr):
                print("  SR summary: " + text)
            if isinstance(pacs, OrthancPacs):
                print(pacs.where(study_uid))
        if isinstance(pacs, Pacs):
            print(f"\nThe PACS's copies are in {pacs.folder}")
        code = audit_demo(config, net, node, pacs, node_port, sent=set(studies))
        url, password = start_console(config, net)
        print(f"\nWeb console: {url}  (user demo, password {password}; the studies, their "
              "findings, heatmaps, deliveries and alerts, and the audit's report; it keeps "
              "running until `make demo-stop`)")  # fmt: skip
        return code
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        pacs.stop()
        ris.close()
        log.close()


def audit_demo(
    config: Path,
    net: Path,
    node: subprocess.Popen[bytes],
    pacs: Pacs | OrthancPacs,
    node_port: int,
    sent: set[str],
) -> int:
    """The other held-back studies through the node, then ``ich-node audit`` of them all.

    The phantoms' truth (``phantom_truth.csv``) becomes the radiologists' reads; the
    node's answers come from its results ledger. No report times are made up: the
    demo's reads have none, so the report's time-to-notification part stays empty.
    """
    from ich_node.config import load_config
    from ich_node.queue.backend import existing_store

    with open(HOLDOUT / "phantom_truth.csv", newline="") as handle:
        truth = list(csv.DictReader(handle))
    send = net / "send"
    rest = [row["series_instance_uid"] for row in truth if row["series_instance_uid"] not in sent]
    print(f"\nThe audit: sending the other {len(rest)} held-back studies, then comparing "
          "the node's answers with the phantoms' truth (docs/validation.md).")  # fmt: skip
    for series_uid in rest:
        if isinstance(pacs, OrthancPacs):
            pacs.send(send / series_uid)
        else:
            send_study(send / series_uid, node_port)
    wanted = {row["series_instance_uid"] for row in truth}
    deadline = time.monotonic() + 900
    storage = load_config(config).storage
    while True:
        store = existing_store(storage)
        try:
            read = {r.series_instance_uid for r in store.reads()}
        finally:
            store.close()
        if wanted <= read:
            break
        if node.poll() is not None or time.monotonic() > deadline:
            print("the node did not read every study in time; see", net / "node.log")
            return 1
        time.sleep(1.0)
    reads = net / "reads.csv"
    with open(reads, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["study_instance_uid", "ich", *LABELS[1:]])
        for row in truth:
            writer.writerow([row["study_instance_uid"], row["any"], *(row[k] for k in LABELS[1:])])
    ich_node("audit", "--config", str(config), "--reads", str(reads), "--out", str(net / "audit"))
    print(f"The report with its plots: {_shown(str(net / 'audit' / 'report.html'))}")
    return 0


def alert_lead(alert_at: float, sr_at: float | None) -> str:
    """When an alert reached the RIS relative to its study's SR at the PACS.

    Both times are ``time.perf_counter()`` seconds of this process (the RIS stand-in
    and the PACS record them on arrival).
    """
    if sr_at is None:
        return "its SR has not reached the PACS"
    lead = sr_at - alert_at
    if abs(lead) < 0.05:
        return "together with its SR"
    return f"{abs(lead):.1f} s {'before' if lead > 0 else 'after'} its SR reached the PACS"


#: What the demo says of each HL7 result status (OBR-25).
RESULT_STATUS = {
    "P": "P (preliminary: sent while the series was still arriving)",
    "F": "F (final)",
    "C": "C (correction)",
}


def _print_alerts(
    ris: object, sr_at: dict[str, float | None], sent_at: dict[str, float] | None = None
) -> None:
    """What the RIS received: for the positive study a preliminary and a final ORU^R01,
    none for the negative.

    ``sr_at``: StudyInstanceUID -> when its SR reached the PACS (see ``alert_lead``);
    ``sent_at``: when the demo began sending the study (``time.perf_counter()``).
    """
    arrived = getattr(ris, "arrived", [])
    print(f"Alerts at the demo RIS (HL7 ORU^R01 over MLLP): {len(arrived)}")
    for alert_at, message in arrived:
        # OBX-3 component 2 is the finding's name, OBX-5 the probability, OBX-8 A/N.
        rows = [
            (message.unescape(str(o(3))).split("^")[1], str(o(5)), str(o(8)))
            for o in message.segments("OBX")[1:]
        ]
        accession = message.extract_field("ORC", 1, 2)
        priority = message.extract_field("ORC", 1, 7, 1, 6)
        # OBX-1's value (OBX-5) is the Study Instance UID (ich_node.delivery.hl7).
        study_uid = str(message.segments("OBX")[0](5))
        status = message.extract_field("OBR", 1, 25)
        since = (sent_at or {}).get(study_uid)
        after = "" if since is None else f" ({alert_at - since:.1f} s after the study was sent)"
        print(f"  accession {accession}: priority {priority}, result status "
              f"{RESULT_STATUS.get(status, status)}; arrived "
              f"{alert_lead(alert_at, sr_at.get(study_uid))}{after}")  # fmt: skip
        for name, probability, flag in rows:
            print(f"    {name}: {probability}" + ("  <- flagged" if flag == "A" else ""))
        for note in message.segments("NTE"):
            print(f"  NTE: {message.unescape(str(note(3)))}")
    print(
        "  (a study the model reads as negative sends none: `when: positive`; the final\n"
        "   follows a preliminary, or a correction that withdraws it)"
    )
    print()


def _stop_recorded(pid_file: Path, what: str) -> str:
    """SIGTERM the process an earlier demo recorded in ``pid_file``.

    Returns ``"stopped"``, ``"gone"`` (the file named a process that had already
    ended) or ``"none"`` (no file); prints a line only for what it stopped.
    """
    if not pid_file.is_file():
        return "none"
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
        print(f"stopped the demo's {what} (pid {pid})")
        outcome = "stopped"
    except ProcessLookupError:
        outcome = "gone"
    pid_file.unlink()
    return outcome


def stop_orthanc() -> str:
    """Stop the Orthanc an earlier demo left running; see :func:`_stop_recorded`."""
    return _stop_recorded(DEMO / "orthanc.pid", "Orthanc")


def demo_stop() -> None:
    """``make demo-stop``: stop what the demo left running, or say nothing was."""
    outcomes = (stop_orthanc(), stop_console())
    if "stopped" not in outcomes:
        print("no Orthanc or web console of an earlier demo is running: nothing to stop")


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


#: Seconds per epoch of config/train_demo.yaml on this repository's 2 idle cores (AMD EPYC,
#: torch 2.14.1): 23-31 s, measured 6 December 2026 (docs/training.md).
IDLE_EPOCH_S = 25


def training_notice(preset: Path, load: float) -> str:
    """What to expect before the demo trains: epochs, the idle pace, the present load.

    The idle figure is the preset's own (measured on 2 idle cores, docs/training.md);
    ``ich-train fit`` prints an estimate for this machine after the first epoch.
    """
    import yaml

    epochs = int(yaml.safe_load(preset.read_text())["epochs"])
    cores = os.cpu_count() or 1
    busy = (
        f"; the load is {load:.1f} on {cores} cores now, so expect it to take longer"
        if load > cores
        else ""
    )
    return (
        f"Training the demo model: {epochs} epochs, about {IDLE_EPOCH_S} s each on 2 idle "
        f"cores (about {epochs * IDLE_EPOCH_S / 60:.0f} min){busy}. After the first epoch, "
        "training prints an estimate for this machine."
    )


def main() -> int:
    if sys.argv[1:] == ["stop"]:
        demo_stop()
        return 0
    start = time.monotonic()
    DEMO.mkdir(exist_ok=True)
    if not (TRAIN / "stage_2_train.csv").is_file():
        ich_train("phantom", "--out", str(TRAIN), "--studies", "40", "--seed", "1")
    if not (HOLDOUT / "phantom_truth.csv").is_file():
        ich_train("phantom", "--out", str(HOLDOUT), "--studies", "8", "--seed", "2")
    bundle = MODEL / "model.safetensors"
    if not bundle_ok(bundle):
        print(training_notice(REPO / "config" / "train_demo.yaml", os.getloadavg()[0]))
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
