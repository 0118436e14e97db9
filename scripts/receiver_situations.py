"""Issue #24's receiver situations, tried on whatever ich-node is on PYTHONPATH.

Runs each situation against real peers on 127.0.0.1 (DCMTK storescp, a TCP peer
that never answers, a byte-a-second HTTPS server, an SMTP server that drips
``220-`` lines, python-hl7's MLLP server with ACK dialects) and prints one row per
situation as soon as it is measured. Only the APIs that existed before issue #24
are used (``Sender.run_once``, ``send_oru``, ``post``, ``send_email``), so the same
script measures a checkout from before the change (``--code``) and this one:

    PYTHONPATH=. python scripts/receiver_situations.py [--code CHECKOUT] --budget 600

The peers come from this repository's ``tests/alert_servers.py`` and
``tests/receiver_peers.py`` (loaded by path); ``ich_node`` from ``--code`` when given.

``--budget`` (seconds) bounds the whole run; a situation that would hold longer
than ``--cap`` seconds is stopped there and reported as such.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _load(name: str) -> Any:
    """One of this repository's test helper files, by path (not the checkout's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _row(name: str, outcome: str, seconds: float | None) -> None:
    shown = "" if seconds is None else f"{seconds:.1f}"
    print(f"| {name} | {outcome} | {shown} |", flush=True)


def _bounded(fn: Any, cap: float) -> tuple[str, float]:
    """Run ``fn`` in a thread for at most ``cap`` s: (its outcome, seconds)."""
    result: list[str] = []

    def run() -> None:
        try:
            result.append(str(fn()))
        except Exception as exc:
            result.append(f"{type(exc).__name__}: {exc}"[:160])

    t = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(cap)
    elapsed = time.monotonic() - t
    return (result[0] if result else f"still running after {cap:g} s"), elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=900.0)
    parser.add_argument("--cap", type=float, default=60.0)
    parser.add_argument("--code", type=Path, help="a checkout whose ich_node to measure")
    args = parser.parse_args(argv)
    if args.code is not None:
        sys.path.insert(0, str(args.code.resolve()))
    end = time.monotonic() + args.budget

    import pydicom

    from benchmarks.common import queue_series, random_bundle
    from ich_node.config import Destination, SenderSection, parse_config
    from ich_node.delivery import email as email_alert
    from ich_node.delivery import hl7 as hl7_alert
    from ich_node.delivery import webhook
    from ich_node.delivery.sender import Sender
    from ich_node.labels import LABELS
    from ich_node.model.bundle import load_bundle
    from ich_node.model.inference import Classifier
    from ich_node.queue.layout import results_dir
    from ich_node.queue.store import Store
    from ich_node.service.worker import Worker
    from training.phantom import write_series

    servers, peers = _load("alert_servers"), _load("receiver_peers")
    DripServer, MLLPServer, make_ca = servers.DripServer, servers.MLLPServer, servers.make_ca
    HungPeer, Storescp, _job = peers.HungPeer, peers.Storescp, peers.job_with_results
    _restricted, _ack = peers.restricted_profile, peers.ack_dialect
    import ich_node

    print(f"ich_node from {Path(ich_node.__file__).parent}", flush=True)

    def _hl7_target(port: int) -> Any:
        return parse_config({"notifications": [{
            "name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": port,
            "receiving_application": "RIS", "receiving_facility": "HOSP",
            "timeout_seconds": 5.0}]}).notifications[0]  # fmt: skip

    def _alert(target: Any) -> Any:
        return _make_alert(target)

    root = Path(tempfile.mkdtemp(prefix="receivers-"))
    print("| situation | outcome | seconds |\n| --- | --- | --- |", flush=True)
    try:
        # A real job's results (SR + a heatmap per slice), by this checkout's worker.
        study = write_series(root / "s", seed=11, subtypes=("subdural",), n_slices=10, matrix=128)
        bundle = random_bundle(root / "m.safetensors", name="situations", version="1.0.0",
                               thresholds=dict.fromkeys(LABELS, 0.01))  # fmt: skip
        config = parse_config({"storage": {"dir": str(root / "w")},
                               "destinations": [{"name": "pacs", "ae_title": "PACS",
                                                 "host": "127.0.0.1", "port": 1}],
                               "results": {"heatmaps": "all"}})  # fmt: skip
        store = Store.open(config.storage.dir)
        job = queue_series(store, study.paths, time.time() - 5)
        Worker(config, "w0", store, Classifier(load_bundle(bundle), device="cpu")).run_once(
            time.time()
        )
        store.close()
        template = results_dir(config.storage.dir, job.job_id)

        def deliver(tag: str, pacs: Any, *destinations: Destination) -> tuple[Any, Any]:
            storage = root / tag
            _job(storage, template, [d.name for d in destinations])
            store = Store.open(storage)
            sender = Sender(store, list(destinations), SenderSection(max_attempts=3,
                            timeout_seconds=10.0), storage, "ICH_NODE")  # fmt: skip
            return sender.run_once(time.time()), store

        for tag, options, label in (
            ("implicit", ("+xi",), "PACS accepting Implicit VR LE only (storescp +xi)"),
            ("no3d", tuple(_restricted(root, ["SecondaryCaptureImageStorage",
                                              "ComprehensiveSRStorage"])),
             "PACS without Comprehensive 3D SR (storescp -xf: SC + Comprehensive SR)"),
        ):  # fmt: skip
            if time.monotonic() > end:
                break
            pacs = Storescp(root / f"pacs-{tag}", *options)
            t = time.monotonic()
            try:
                outcomes, store = deliver(tag, pacs, pacs.destination())
            finally:
                pacs.stop()
            classes = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
                       for p in pacs.folder.iterdir()]  # fmt: skip
            srs = sum(c.startswith("1.2.840.10008.5.1.4.1.1.88.") for c in classes)
            state = outcomes[0].state if outcomes else "?"
            why = outcomes[0].reason[:90] if outcomes and outcomes[0].reason else ""
            _row(label, f"{state}; {len(classes)} objects, {srs} SR received. {why}",
                 time.monotonic() - t)  # fmt: skip
            store.close()

        if time.monotonic() < end:  # a hung destination beside a healthy one, 3 jobs
            hung, pacs = HungPeer(), Storescp(root / "pacs-healthy")
            storage = root / "hung"
            destinations = [Destination(name="hung", ae_title="HUNG", host="127.0.0.1",
                                        port=hung.port), pacs.destination()]  # fmt: skip
            store = Store.open(storage)
            sender = Sender(store, destinations, SenderSection(timeout_seconds=30.0), storage,
                            "ICH_NODE")  # fmt: skip
            stop = threading.Event()
            dispatch = getattr(sender, "dispatch", None)

            def loop() -> None:  # as serve's sender thread did / does
                while not stop.is_set():
                    if dispatch is not None:
                        dispatch(time.time())
                    else:
                        sender.run_once(time.time(), alerts=False)
                    stop.wait(0.2)

            threading.Thread(target=loop, daemon=True).start()
            delays = []
            jobs = []
            for i in range(3):
                jobs.append(_job(storage, template, ["hung", "pacs"], series=f"1.2.3.{i + 5}"))
                time.sleep(1.0)
            for job_id in jobs:
                finished = store.job(job_id).updated_at  # type: ignore[union-attr]
                limit = time.monotonic() + args.cap * 3
                row = None
                while time.monotonic() < limit:
                    row = {d.destination: d for d in store.deliveries(job_id)}["pacs"]
                    if row.state == "done":
                        break
                    time.sleep(0.2)
                delays.append("not delivered" if row is None or row.state != "done"
                              else f"{row.updated_at - finished:.1f} s")  # fmt: skip
            stop.set()
            if hasattr(sender, "stop"):
                sender.stop(5.0)
            hung.close()
            pacs.stop()
            _row("hung destination beside a healthy PACS: healthy PACS, each of 3 jobs, "
                 "job done -> delivered", ", ".join(delays), None)  # fmt: skip

        ca = make_ca(root / "ca")
        secret = root / "secret"
        secret.write_bytes(b"situations-secret")
        for kind in ("https", "smtp"):
            if time.monotonic() > end:
                break
            drip = DripServer(kind, ca, interval=1.0)
            target_data = (
                {"name": "oncall", "kind": "webhook", "url": drip.url, "secret_file": str(secret),
                 "ca_file": str(ca.ca), "timeout_seconds": 5.0}
                if kind == "https" else
                {"name": "neuro", "kind": "email", "host": "127.0.0.1", "port": drip.port,
                 "starttls": False, "from": "a@x.org", "to": ["b@x.org"], "timeout_seconds": 5.0}
            )  # fmt: skip
            target = parse_config({"notifications": [target_data]}).notifications[0]
            alert = _alert(target)
            fn = (
                (lambda a=alert, tg=target: webhook.post(a, tg))
                if kind == "https"
                else (lambda a=alert, tg=target: email_alert.send_email(a, tg, None))
            )
            outcome, seconds = _bounded(fn, args.cap)
            drip.close()
            label = ("webhook answering 1 byte/s, timeout_seconds 5" if kind == "https"
                     else "SMTP dripping 220- lines 1/s, timeout_seconds 5")  # fmt: skip
            _row(label, outcome[:120], seconds)

        for name, end_, encoding, msh18 in (
            ("AA ACK with LF segment ends", "\n", "utf-8", ""),
            ("AA ACK with CR LF segment ends", "\r\n", "utf-8", ""),
            ("AA ACK in ISO 8859-1, MSH-18 empty", "\r", "iso8859-1", ""),
        ):
            server = MLLPServer(ack=_ack(end_, encoding, msh18, "Reçu"))
            target = _hl7_target(server.port)
            outcome, seconds = _bounded(lambda s=server, t=target: hl7_alert.send_oru(_alert(t), t),
                                        args.cap)  # fmt: skip
            server.close()
            _row(name, outcome[:120], seconds)

        server = MLLPServer("AR", text="Patient DOE, JANE (PID-778899) has no open order")
        target = _hl7_target(server.port)
        outcome, seconds = _bounded(lambda: _recorded(hl7_alert, target), args.cap)
        server.close()
        _row("HL7 AR quoting the patient: text recorded with the delivery", outcome[:140], seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _recorded(hl7_alert: Any, target: Any) -> str:
    """What a refusal leaves for the store (the alert's patient values registered, as the
    sender does now; the code before #24 had no such registration)."""
    alert = _make_alert(target)
    try:
        from ich_node.delivery.outbox import alert_phi
        from ich_node.log import handling_phi

        with handling_phi(alert_phi(alert)):
            hl7_alert.send_oru(alert, target)
    except ImportError:
        try:
            hl7_alert.send_oru(alert, target)
        except Exception as exc:
            return str(getattr(exc, "recorded", exc))
    except Exception as exc:
        return str(getattr(exc, "recorded", exc))
    return "accepted"


def _make_alert(target: Any) -> Any:
    """A positive alert for a patient "Doe^Jane", ID PID-778899 (make_alert, as the worker)."""
    import pydicom

    from ich_node.delivery.alerts import make_alert
    from ich_node.labels import LABELS
    from ich_node.results.findings import LabelFinding, ModelInfo, SeriesFindings, SliceFinding

    probs = dict.fromkeys(LABELS, 0.02) | {"any": 0.97, "subdural": 0.9}
    findings = SeriesFindings(
        "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2",
        ModelInfo("situations", "1.0.0", "resnet18", "ab" * 32, True),
        {k: LabelFinding(p, p >= 0.5, 0.5) for k, p in probs.items()},
        tuple(SliceFinding(f"1.2.3.{i}", float(i), dict(probs)) for i in range(3)),
    )  # fmt: skip
    header = pydicom.Dataset()
    header.PatientName, header.PatientID, header.AccessionNumber = "Doe^Jane", "PID-778899", "A1"
    return make_alert(findings, header, target, job_id="job-1", version=1, status="F",
                      supersedes=None, result_time=time.time(),
                      last_received_at=time.time())  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
