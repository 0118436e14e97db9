"""Alerts go per study (AccessionNumber, else StudyInstanceUID), not per series.

A study's answer for a target is the union of its series' latest answers: a second
series with the same answer sends nothing; a change of the study's answer sends a
correction. Decisions in code on a real store (both backends), then end to end: two
positive series of one accession sent side by side through a real listener, worker
and sender give one HL7 ORU (python-hl7's MLLP server) and one webhook POST.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from benchmarks.common import random_bundle
from ich_node.config import NodeConfig, QueueSection, parse_config
from ich_node.delivery.alerts import Alert
from ich_node.delivery.outbox import prepare_alerts
from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.backend import job_queue, open_store
from ich_node.queue.interface import InstanceRecord, SeriesRead
from ich_node.queue.jobs import job_id_for
from ich_node.queue.store import Store
from ich_node.results.findings import LabelFinding, ModelInfo, SeriesFindings
from tests.alert_servers import CertAuthority, MLLPServer, WebhookServer, make_ca
from tests.pipeline import Pacs, Pipeline, derived, node_config
from training.phantom import PhantomSeries, write_series

SECRET = b"study-alert-secret"
STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return make_ca(tmp_path_factory.mktemp("ca"))


def _targets(tmp_path: Path, hl7_port: int, hook_url: str, ca: CertAuthority) -> list[Any]:
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET + b"\n")
    return [
        {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": hl7_port,
         "receiving_application": "RIS", "receiving_facility": "HOSP", "timeout_seconds": 5.0},
        {"name": "oncall", "kind": "webhook", "url": hook_url, "secret_file": str(secret),
         "ca_file": str(ca.ca), "timeout_seconds": 5.0},
    ]  # fmt: skip


def _findings(series: str, positive: tuple[str, ...], study: str = STUDY) -> SeriesFindings:
    labels = set(positive) | ({"any"} if positive else set())
    return SeriesFindings(
        study_instance_uid=study,
        series_instance_uid=series,
        model=ModelInfo("m", "1.0", "resnet18", "a" * 64, demo=False),
        series={
            label: LabelFinding(0.9 if label in labels else 0.1, label in labels, 0.5)
            for label in LABELS
        },
        slices=(),
    )


class Study:
    """Reads of several series recorded as the worker does: alerts, then the ledger row."""

    def __init__(self, store: Store, config: NodeConfig) -> None:
        self.store = store
        self.config = config
        self.queue = job_queue(store, QueueSection(lease_seconds=60.0))
        self.now = 1000.0

    def read(
        self, series: str, positive: tuple[str, ...], accession: str = "ACC-1", study: str = STUDY
    ) -> list[Alert]:
        self.now += 10.0
        record = InstanceRecord(series + ".1", "1.2.840.10008.5.1.4.1.1.2", study, series, "CT",
                                "HEAD", "", "")  # fmt: skip
        if self.store.series(series) is None:
            self.store.add_instance(record, Path(f"/spool/{series}.dcm"), 1, self.now, "d")
        job = self.store.queue_series(series, 1, job_id_for, self.now)
        leased = self.queue.lease("w", self.now)
        assert leased is not None and leased.job_id == job.job_id
        findings = _findings(series, positive, study)
        header = pydicom.Dataset()
        header.AccessionNumber = accession
        header.PatientName = "DOE^JANE"
        alerts = prepare_alerts(
            self.store, self.config.storage.dir, self.config.notifications, job_id=job.job_id,
            version=job.version, created_at=job.created_at, findings=findings, header=header,
            hu_of=None, now=self.now,
        )  # fmt: skip
        read = SeriesRead(
            job.job_id, study, series, accession, job.version, "f", 1, "m", "1.0", "a" * 64,
            {k: v.threshold for k, v in findings.series.items()},
            {k: v.probability for k, v in findings.series.items()},
            findings.positive_labels, True, 0,
        )  # fmt: skip
        self.queue.complete(leased, [], 0, self.now + 1.0, read=read)
        return alerts


@pytest.fixture
def reads(
    tmp_path: Path, open_store: Callable[[Path], Store], storage_section: Any, ca: CertAuthority
) -> Study:
    config = parse_config(
        {
            "storage": {"dir": str(tmp_path / "node"),
                        "database": storage_section(tmp_path / "node").database},
            "notifications": _targets(tmp_path, 2575, "https://127.0.0.1:9/hook", ca),
        }
    )  # fmt: skip
    return Study(open_store(config.storage.dir), config)


def _statuses(alerts: list[Alert]) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {a.target: (a.status, a.positive_labels) for a in alerts}


def test_a_second_series_of_the_accession_alerts_only_when_the_studys_answer_changes(
    reads: Study,
) -> None:
    first = reads.read("1.1", ("subdural",))
    assert _statuses(first) == {t: ("F", ("any", "subdural")) for t in ("ris", "oncall")}
    assert reads.read("1.2", ("subdural",)) == []  # bone kernel: the same answer
    assert reads.read("1.3", ()) == []  # a negative series: the study is still positive
    assert reads.read("1.2", ()) == []  # a later version of 1.2, negative: still positive

    # A subtype found in one more series: the study's answer grows, a correction says all.
    grown = reads.read("1.3", ("subarachnoid",))
    assert _statuses(grown) == {
        t: ("C", ("any", "subarachnoid", "subdural")) for t in ("ris", "oncall")
    }
    assert {a.supersedes for a in grown} == {a.key for a in first}
    by_label = {f.label: f for f in grown[0].findings}
    assert by_label["subdural"].positive and by_label["subdural"].probability == 0.9

    # Every series now negative: a correction to negative.
    assert reads.read("1.1", ()) != []  # answer {any, subarachnoid}: changed
    negative = reads.read("1.3", ())
    assert _statuses(negative) == {t: ("C", ()) for t in ("ris", "oncall")}

    # Another accession is another study; no accession: the StudyInstanceUID.
    assert _statuses(reads.read("2.1", ("epidural",), accession="ACC-2"))["ris"][0] == "F"
    other = "1.2.826.0.1.3680043.8.498.2"
    assert _statuses(reads.read("3.1", ("epidural",), accession="", study=other))["ris"][0] == "F"
    assert reads.read("3.2", ("epidural",), accession="", study=other) == []
    sent = [a for a in reads.store.alerts()]
    assert len(sent) == 2 * 6  # F, C, C, C for ACC-1; F for ACC-2; F for the study


def test_two_series_decided_side_by_side_send_one_first_alert(reads: Study) -> None:
    """The decision is checked again in the recording transaction: the second decides again."""
    store = reads.store
    original = store.record_alerts
    raced: list[bool] = []

    def record_after_another(*args: Any, **kwargs: Any) -> int:
        if not raced:  # another worker records series 1.2's first alert just before
            raced.append(True)
            reads_again = Study(store, reads.config)
            reads_again.now = reads.now + 5.0
            assert len(reads_again.read("1.2", ("subdural",))) == 2
        return original(*args, **kwargs)

    store.record_alerts = record_after_another  # type: ignore[method-assign]
    assert reads.read("1.1", ("subdural",)) == []
    assert sorted((a.series_instance_uid, a.status) for a in store.alerts() if a.status) == [
        ("1.2", "F"),
        ("1.2", "F"),
    ]


@pytest.fixture
def receivers(ca: CertAuthority) -> Iterator[tuple[MLLPServer, WebhookServer]]:
    mllp, hook = MLLPServer("AA"), WebhookServer(ca, SECRET)
    yield mllp, hook
    mllp.close()
    hook.close()


@pytest.fixture(scope="module")
def positive_model(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    path = random_bundle(
        tmp_path_factory.mktemp("pos") / "m.safetensors",
        name="study alert test model",
        version="1.0.0",
        thresholds=dict.fromkeys(LABELS, 0.01),  # every label positive
    )
    return Classifier(load_bundle(path), device="cpu", batch_size=12)


@pytest.fixture(scope="module")
def accession_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomSeries, list[Path]]:
    root = tmp_path_factory.mktemp("accession")
    soft = write_series(root / "soft", seed=31, subtypes=("subdural",), n_slices=10, matrix=64)
    bone_uid = generate_uid(entropy_srcs=["bone", soft.series_instance_uid])

    def bone(i: int, ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID, ds.SeriesNumber = bone_uid, 3
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["bone", str(ds.SOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription, ds.ConvolutionKernel = "AX BONE", "BONE"

    return soft, derived(soft.paths, root / "bone", bone)


def test_two_positive_series_of_one_accession_give_one_hl7_and_one_webhook_alert(
    tmp_path: Path,
    storage_section: Any,
    ca: CertAuthority,
    receivers: tuple[MLLPServer, WebhookServer],
    positive_model: Classifier,
    accession_study: tuple[PhantomSeries, list[Path]],
) -> None:
    mllp, hook = receivers
    soft, bone = accession_study
    pacs = Pacs(tmp_path / "pacs")
    pacs.start()
    database = storage_section(tmp_path / "node").database
    config = node_config(
        tmp_path, database, pacs, notifications=_targets(tmp_path, mllp.port, hook.url, ca)
    )
    store = open_store(config.storage)
    if database is not None:
        store.place_store_id()  # type: ignore[attr-defined]
    node = Pipeline(config, store, positive_model, pacs)
    try:
        interleaved = [p for pair in zip(soft.paths, bone, strict=True) for p in pair]
        node.send(interleaved)  # side by side, in one association
        node.drain()
        assert len(pacs.received("SR")) == 2
    finally:
        node.close()
        pacs.stop()
    reads = store.reads(accession_number=str(pydicom.dcmread(bone[0]).AccessionNumber))
    assert sorted(r.series_instance_uid for r in reads) == sorted(
        [soft.series_instance_uid, str(pydicom.dcmread(bone[0]).SeriesInstanceUID)]
    )
    assert all(r.positive_labels for r in reads)  # both series positive
    (message,) = mllp.messages
    accession = str(pydicom.dcmread(soft.paths[0]).AccessionNumber)
    assert str(message.segment("ORC")[2]) == accession
    assert str(message.segment("OBR")[25]) == "F"
    (body,) = hook.bodies()
    assert body["accession_number"] == accession and body["status"] != "correction"
    store.close()
