"""Security: DICOM TLS (listener and sender), owner-only storage, no PHI in logs,
metrics or the store, and retention (``storage.keep_hours``)."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from benchmarks.faults import NodeProcess, RecordingSCP, free_port, node_config, wait_for
from ich_node.config import Destination, SenderSection, parse_config
from ich_node.delivery.sender import Sender
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool
from ich_node.queue.store import DB_NAME, Store
from ich_node.retention import Cleaner
from tests.conftest import dcmtk
from tests.test_sender import _job_with_outbox

PATIENT_NAME = "Zyxwvutsrq^Qponmlkj"
PATIENT_ID = "PIDSECRET4711"
BIRTH_DATE = "19230417"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "2", "-subj", "/CN=ich-node test CA", cwd=d)  # fmt: skip
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:modality")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    # A second CA that signed nothing we trust: its client certificate must be refused.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key",
             "-out", "rogue.crt", "-days", "2", "-subj", "/CN=rogue", cwd=d)  # fmt: skip
    return d


@pytest.fixture
def tls_listener(
    tmp_path: Path, free_port: int, pki: Path, request: pytest.FixtureRequest
) -> Iterator[Store]:
    require = bool(getattr(request, "param", False))
    config = parse_config(
        {
            "node": {
                "ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port,
                "tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key"),
                        "ca": str(pki / "ca.crt"), "require_client_cert": require},
            },
            "callers": ({"ae_title": "MODALITY"},),
            "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 0},
        }
    )  # fmt: skip
    store = Store.open(config.storage.dir)
    server = start_listener(config, Spool(config.storage.dir, store, 0))
    yield store
    server.shutdown()
    store.close()


def _scu(
    tool: str, port: int, *extra: str, files: list[Path] = ()
) -> subprocess.CompletedProcess[str]:  # type: ignore[assignment]
    return subprocess.run(
        [dcmtk(tool), *extra, "-aet", "MODALITY", "-aec", "ICH_NODE", "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("tls_listener", [True], indirect=True)
def test_tls_listener_requires_a_client_certificate_signed_by_the_ca(
    tls_listener: Store, free_port: int, pki: Path, phantom_series
) -> None:  # type: ignore[no-untyped-def]
    client = ("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))
    assert _scu("echoscu", free_port, *client).returncode == 0
    files = list(phantom_series.paths[:3])
    sent = _scu("storescu", free_port, *client, files=files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert tls_listener.n_instances() == 3
    # No certificate, a certificate from another CA, or plain TCP: no association.
    anonymous = _scu("echoscu", free_port, "+tla", "+cf", str(pki / "ca.crt"))
    rogue = _scu("echoscu", free_port, "+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"),
                 "+cf", str(pki / "ca.crt"))  # fmt: skip
    plain = _scu("storescu", free_port, files=files[:1])
    assert anonymous.returncode != 0 and rogue.returncode != 0 and plain.returncode != 0
    assert tls_listener.n_instances() == 3


def test_tls_listener_without_required_client_cert_verifies_the_server(
    tls_listener: Store, free_port: int, pki: Path
) -> None:
    # The caller verifies the node's certificate against the CA (DCMTK's default).
    assert _scu("echoscu", free_port, "+tla", "+cf", str(pki / "ca.crt")).returncode == 0
    untrusted = _scu("echoscu", free_port, "+tla", "+cf", str(pki / "rogue.crt"))
    assert untrusted.returncode != 0


def test_sender_delivers_over_tls_with_a_client_certificate(
    tmp_path: Path, pki: Path, phantom_series
) -> None:  # type: ignore[no-untyped-def]
    storage = tmp_path / "node"
    job_id = _job_with_outbox(Store.open, storage, phantom_series)  # TLS, not the store: SQLite
    port = free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    # storescp requires and verifies our certificate (+rv is its default with +tls).
    pacs = subprocess.Popen(
        [dcmtk("storescp"), "+tls", str(pki / "server.key"), str(pki / "server.crt"),
         "+cf", str(pki / "ca.crt"), "-aet", "PACS", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    tls = {"ca": str(pki / "ca.crt"), "cert": str(pki / "client.crt"),
           "key": str(pki / "client.key")}  # fmt: skip
    secure = Destination.model_validate(
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": tls}
    )
    store = Store.open(storage)
    try:
        sender = Sender(store, [secure], SenderSection(max_attempts=50), storage, "ICH_NODE")
        outcomes = sender.run_once(now=time.time())
        deadline = time.monotonic() + 30
        while outcomes and outcomes[0].state != "done" and time.monotonic() < deadline:
            time.sleep(0.3)  # storescp still starting
            outcomes = sender.run_once(now=time.time() + 10_000)
        assert [o.state for o in outcomes] == ["done"], outcomes
        assert len(list(received.iterdir())) == 3
        # The same destination without our client certificate is refused, and recorded.
        store.requeue_deliveries(job_id, 0.0)  # no-op: nothing parked
        plain = Destination.model_validate(
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
             "tls": {"ca": str(pki / "rogue.crt")}}
        )  # fmt: skip
        from ich_node.delivery.sender import DeliveryError, send_files
        from ich_node.queue.layout import outbox_files

        with pytest.raises((DeliveryError, OSError)):
            send_files(outbox_files(storage, job_id), plain, "ICH_NODE", 10.0)
    finally:
        pacs.terminate()
        pacs.wait(10)
        store.close()


def _plant_phi(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir()
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = BIRTH_DATE
        out.append(folder / path.name)
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def _modes(root: Path) -> set[tuple[str, int]]:
    return {
        ("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode))
        for p in [root, *root.rglob("*")]
        if not p.is_symlink()
    }


def test_no_phi_in_logs_metrics_or_store_owner_only_files_and_retention(
    tmp_path: Path, tiny_bundle: Path, phantom_series
) -> None:  # type: ignore[no-untyped-def]
    files = _plant_phi(list(phantom_series.paths), tmp_path / "phi")
    scp = RecordingSCP(free_port())
    scp.start()
    metrics_port = free_port()
    data = node_config(
        tmp_path, tiny_bundle, scp.port, stable_seconds=1.0, heatmaps="positive",
        extra={"metrics": {"address": f"127.0.0.1:{metrics_port}"},
               "logging": {"format": "json", "level": "DEBUG"}},
    )  # fmt: skip
    node = NodeProcess.write(tmp_path, data)
    try:
        node.start()
        sent = subprocess.run(
            [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "ICH_NODE", "127.0.0.1",
             str(node.config.node.port), *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        store = node.store()
        wait_for("the delivery", lambda: store.counts("deliveries").get("done"), 240)
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        def scrape() -> str | None:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            return text if 'ich_node_stage_seconds_count{stage="infer"}' in text else None

        metrics = wait_for("the stage timings in the metrics", scrape, 30)
        assert 'ich_node_instances_received_total{outcome="stored"} 16.0' in metrics
        assert 'ich_node_jobs{state="done"} 1.0' in metrics
        assert 'ich_node_series_decisions_total{outcome="queued"} 1.0' in metrics
        assert 'ich_node_stage_seconds_count{stage="send"} 1.0' in metrics
        assert node.stop() == 0
    finally:
        if node.process is not None:
            node.kill()
        scp.stop()
    storage = node.config.storage.dir
    # Owner-only: folders 0700, files 0600 (spool, results, the store and its WAL).
    modes = _modes(storage)
    assert modes <= {("dir", 0o700), ("file", 0o600)}, modes
    assert (storage / DB_NAME).exists()

    def dump() -> str:
        with sqlite3.connect(storage / DB_NAME) as db:
            return "\n".join(db.iterdump())

    log = node.log_path.read_text()
    assert json.loads(log.splitlines()[0])  # JSON lines
    for secret in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, BIRTH_DATE):
        assert secret not in log, f"{secret!r} in the node's log"
        assert secret not in metrics, f"{secret!r} in the metrics"
        assert secret not in dump(), f"{secret!r} in the store"
    # Each job attempt logs one summary line (no duplicated handlers in the worker).
    assert log.count('"job.finished"') == 1

    # Retention: nothing goes before keep_hours; everything delivered goes after.
    store = Store.open(storage)
    (job,) = store.jobs()
    cleaner = Cleaner(store, storage, node.config.storage.keep_hours)
    assert cleaner.run_once(time.time()).series == 0
    assert len(list((storage / "spool").rglob("*.dcm"))) == 16
    later = time.time() + node.config.storage.keep_hours * 3600 + 1
    cleaned = cleaner.run_once(later)
    assert (cleaned.series, cleaned.instance_files, cleaned.result_folders) == (1, 16, 1)
    assert [p for p in (storage / "spool").rglob("*") if p.is_file()] == []
    assert not (storage / "results" / job.job_id).exists()
    record = store.series(phantom_series.series_instance_uid)
    # The series row stays with its UIDs and times; its counts start again from zero
    # (they count what the node holds), and the results ledger keeps what was read.
    assert record is not None and record.state == "purged" and record.n_instances == 0
    (read,) = store.reads(phantom_series.series_instance_uid)
    assert read.job_id == job.job_id
    assert store.n_instances() == 0 and store.job(job.job_id).state == "done"  # type: ignore[union-attr]
    store.close()


@pytest.mark.parametrize("require", [False, True])
def test_health_echo_speaks_tls(tmp_path: Path, free_port: int, pki: Path, require: bool) -> None:
    """`ich-node health` reaches a TLS-only listener (with its own certificate when required)."""
    from ich_node.service.ops import echo

    config = parse_config(
        {
            "node": {
                "ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port,
                "tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key"),
                        "ca": str(pki / "ca.crt"), "require_client_cert": require},
            },
            "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 0},
        }
    )  # fmt: skip
    store = Store.open(config.storage.dir)
    server = start_listener(config, Spool(config.storage.dir, store, 0))
    try:
        assert echo(config, timeout=10) is True
        plain = config.model_copy(update={"node": config.node.model_copy(update={"tls": None})})
        assert echo(plain, timeout=5) is False
    finally:
        server.shutdown()
        store.close()
