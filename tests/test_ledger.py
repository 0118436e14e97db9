"""The results ledger (``series_reads``): one row per series version read, kept beyond
retention, written with the job's completion. Both store backends, the same tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import queue_series
from ich_node.config import QueueSection, parse_config
from ich_node.imaging.identity import content_identity, fingerprint
from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.backend import job_queue
from ich_node.queue.interface import AlertRecord, InstanceRecord, SeriesRead
from ich_node.queue.jobs import job_id_for
from ich_node.queue.store import Store
from ich_node.service.worker import Worker
from training.phantom import write_series

OpenStore = Callable[[Path], Store]


def _row(job_id: str, series: str = "1.2.3", **kw: Any) -> SeriesRead:
    values: dict[str, Any] = {
        "job_id": job_id,
        "study_instance_uid": "1.2",
        "series_instance_uid": series,
        "accession_number": "ACC1",
        "version": 1,
        "content_fingerprint": "f" * 64,
        "n_instances": 2,
        "model_name": "m",
        "model_version": "1.0",
        "model_sha256": "a" * 64,
        "thresholds": dict.fromkeys(LABELS, 0.5),
        "probabilities": {label: 0.25 for label in LABELS} | {"any": 0.9, "subdural": 0.8},
        "positive_labels": ("any", "subdural"),
        "coverage_complete": True,
        "n_notes": 1,
        "sr_series_instance_uid": "1.2.9",
        "sr_sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34",
        "sr_sop_instance_uid": "1.2.9.1",
    }
    return SeriesRead(**(values | kw))


def _add(store: Store, sop: str, now: float, series: str = "1.2.3") -> None:
    record = InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", "1.2", series, "CT", "", "", "")
    store.add_instance(record, Path(f"/spool/{sop}.dcm"), 1, now, digest=sop)


def test_completion_writes_the_ledger_row_with_its_times(
    tmp_path: Path, open_store: OpenStore
) -> None:
    store = open_store(tmp_path)
    queue = job_queue(store, QueueSection(lease_seconds=10.0))
    _add(store, "1.2.3.1", now=100.0)
    _add(store, "1.2.3.2", now=103.0)
    job = store.queue_series("1.2.3", 2, job_id_for, 110.0)
    leased = queue.lease("w", 111.0)
    assert leased is not None
    # The alert reaches its target before the job completes (alerts go first).
    store.record_alerts(
        [AlertRecord(job.job_id, "ris", "1.2.3", 1, "k", "F", None, ("any",), 103.0, 112.0)],
        "alert:",
        112.0,
    )
    store.alert_accepted(job.job_id, "ris", 112.5)
    queue.complete(leased, ["pacs"], 3, 120.0, sr=_row(job.job_id).sr, read=_row(job.job_id))

    (row,) = store.reads("1.2.3")
    assert row.job_id == job.job_id and row.version == 1 and row.cause == "first read"
    assert row.first_received_at == 100.0  # the first instance of the version
    assert row.completed_at == 110.0  # the series version was complete and queued
    assert row.read_at == 120.0
    assert row.first_alert_at == 112.5
    assert row.first_delivery_at is None
    assert row.positive_labels == ("any", "subdural") and row.coverage_complete is True
    assert row.probabilities["any"] == 0.9 and row.thresholds == dict.fromkeys(LABELS, 0.5)
    assert row.sr is not None and row.sr.sop_instance_uid == "1.2.9.1"
    assert row.sr.study_instance_uid == "1.2"

    # An alert delivery done is not the results' delivery; the PACS accepting all is.
    store.finish_delivery(job.job_id, "alert:ris", "done", "", 0.0, 121.0)
    assert store.reads("1.2.3")[0].first_delivery_at is None
    store.finish_delivery(job.job_id, "pacs", "retry", "refused", 130.0, 122.0)
    assert store.reads("1.2.3")[0].first_delivery_at is None
    store.finish_delivery(job.job_id, "pacs", "done", "", 0.0, 131.0)
    store.finish_delivery(job.job_id, "pacs", "done", "", 0.0, 140.0)  # a resend later
    assert store.reads("1.2.3")[0].first_delivery_at == 131.0


def test_rows_outlive_retention_and_are_found_by_study_and_accession(
    tmp_path: Path, open_store: OpenStore
) -> None:
    store = open_store(tmp_path)
    queue = job_queue(store, QueueSection(lease_seconds=10.0))
    for series, accession in (("1.2.3", "ACC1"), ("1.2.4", "ACC1"), ("1.2.5", "ACC2")):
        _add(store, series + ".1", now=1.0, series=series)
        job = store.queue_series(series, 1, job_id_for, 2.0)
        leased = queue.lease("w", 3.0)
        assert leased is not None and leased.job_id == job.job_id
        read = _row(job.job_id, series, accession_number=accession, positive_labels=())
        queue.complete(leased, [], 0, 4.0, read=read)
    for series in ("1.2.3", "1.2.4", "1.2.5"):
        store.purge_series(series)
    assert [r.series_instance_uid for r in store.reads(accession_number="ACC1")] == [
        "1.2.3",
        "1.2.4",
    ]
    assert len(store.reads(study_instance_uid="1.2")) == 3
    latest = store.latest_read("1.2.5")
    assert latest is not None and latest.positive_labels == () and latest.sr is not None
    assert store.latest_read("9.9") is None


def test_a_read_by_the_worker_records_the_fingerprint_of_its_instances(
    tmp_path: Path, tiny_bundle: Path, open_store: OpenStore, storage_section: Any
) -> None:
    """The worker's fingerprint reuses the HU it decoded: equal to the files' own identities."""
    phantom = write_series(tmp_path / "s", seed=5, subtypes=("subdural",), n_slices=6, matrix=64)
    config = parse_config(
        {
            "storage": {
                "dir": str(tmp_path / "node"),
                "database": storage_section(tmp_path / "node").database,
            },
        }
    )
    store = open_store(config.storage.dir)
    job = queue_series(store, phantom.paths, time.time() - 5)
    classifier = Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=4)
    worker = Worker(config, "w0", store, classifier)
    outcome = worker.run_once(time.time())
    assert outcome is not None and outcome.state == "done", outcome

    (row,) = store.reads(phantom.series_instance_uid)
    assert row.job_id == job.job_id and row.n_instances == 6
    assert row.content_fingerprint == fingerprint(content_identity(p) for p in phantom.paths)
    assert row.accession_number.startswith("PH")
    assert row.model_name == "ich-node test model" and row.model_version == "0.0.0-test"
    assert set(row.probabilities) == set(LABELS) and set(row.thresholds) == set(LABELS)
    sr = store.job(job.job_id)
    assert sr is not None and row.sr_sop_instance_uid == sr.sr_sop_uid != ""
