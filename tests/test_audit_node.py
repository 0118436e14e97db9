"""A silent local validation, end to end: ``serve`` in shadow mode, then ``ich-node audit``.

Phantom studies with and without a bleed (the truth is known: the phantom drew it)
are sent to a node in shadow mode over DICOM. DCMTK storescp plays the PACS and
a research PACS (``shadow: true``); python-hl7's MLLP server the RIS and the
validation team's interface engine (``shadow: true``). Nothing reaches the PACS
or the RIS; the node reads every study and keeps it in its results ledger. A
reads CSV with the truth then goes through ``ich-node audit``, and every count
and metric of its report is recomputed here with numpy from the findings.json
files the node wrote (another path than the ledger the audit reads).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.common import random_bundle
from benchmarks.end_to_end import Destination, Node, _send
from ich_node.imaging import read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.layout import StorageLayout, results_dir
from ich_node.queue.store import Store
from tests.alert_servers import MLLPServer, wait_for
from training.phantom import PhantomSeries, write_series

Z = 1.959963984540054
#: The phantom studies: (seed, subtypes drawn). Three with a bleed, three without.
STUDIES = ((31, ("subdural",)), (32, ()), (33, ("intraparenchymal",)), (34, ()),
           (35, ("subdural", "epidural")), (36, ()))  # fmt: skip


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[PhantomSeries, set[str]]]:
    root = tmp_path_factory.mktemp("audit_studies")
    return [
        (write_series(root / str(seed), seed=seed, subtypes=kinds, n_slices=10, matrix=128),
         set(kinds))
        for seed, kinds in STUDIES
    ]  # fmt: skip


@pytest.fixture
def shadow_node(
    tmp_path: Path, studies: list[tuple[PhantomSeries, set[str]]]
) -> Iterator[dict[str, Any]]:
    bundle = random_bundle(tmp_path / "m.safetensors", name="shadow audit model")
    # The site's `any` threshold in the widest gap between the probabilities the model
    # gives these studies (read offline here, as the worker will), leaving 2 to 4 of
    # them positive: a mixed answer, far from any rounding difference.
    classifier = Classifier(load_bundle(bundle), device="cpu", batch_size=8)
    p_any = sorted(
        classifier.predict_series(read_series(list(s.paths))).findings.series["any"].probability
        for s, _ in studies
    )
    cut = max((2, 3, 4), key=lambda n: p_any[-n] - p_any[-n - 1])  # n studies positive
    site_any = float((p_any[-cut] + p_any[-cut - 1]) / 2)
    pacs, research = Destination(tmp_path / "pacs"), Destination(tmp_path / "research")
    ris, validation = MLLPServer("AA"), MLLPServer("AA")
    config = {
        "node": {"mode": "shadow"},
        "series": {"stable_seconds": 0.5, "min_slices": 8},
        "model": {"bundle": str(bundle), "device": "cpu", "batch_size": 8,
                  "thresholds": {"any": site_any}},
        "results": {"heatmaps": "none"},
        "sender": {"backoff_base_seconds": 0.2, "backoff_max_seconds": 0.5},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            {"name": "research", "ae_title": "PACS", "host": "127.0.0.1", "port": research.port,
             "shadow": True},
        ],
        "notifications": [
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port,
             "receiving_application": "RIS", "receiving_facility": "HOSP"},
            {"name": "validation", "kind": "hl7", "host": "127.0.0.1", "port": validation.port,
             "receiving_application": "VAL", "receiving_facility": "HOSP", "shadow": True},
        ],
    }  # fmt: skip
    node = Node(tmp_path, config)
    yield {"node": node, "pacs": pacs, "research": research, "ris": ris,
           "validation": validation, "site_any": site_any, "n_positive": cut}  # fmt: skip
    node.stop()
    for peer in (pacs, research):
        peer.process.terminate()
        peer.process.wait(10)
    ris.close()
    validation.close()


def _wilson(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre, half = p + Z * Z / (2 * n), Z * np.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return (centre - half) / (1 + Z * Z / n), (centre + half) / (1 + Z * Z / n)


def test_shadow_node_then_audit(
    tmp_path: Path,
    studies: list[tuple[PhantomSeries, set[str]]],
    shadow_node: dict[str, Any],
) -> None:
    node, research = shadow_node["node"], shadow_node["research"]
    for series, _ in studies:
        _send(list(series.paths), node.port, nodelay=True, calling="MODALITY")
    storage = tmp_path / "node"
    store = Store.open(storage)

    def settled() -> bool:
        jobs = store.jobs()
        rows = store.deliveries()
        return (
            len(jobs) == len(studies)
            and all(j.state == "done" for j in jobs)
            and bool(rows)
            and all(d.state == "done" for d in rows)
        )

    assert wait_for(settled, 300), node.log_path.read_text()[-3000:]
    jobs = {j.series_instance_uid: j for j in store.jobs()}

    # Shadow mode: nothing reached the PACS or the RIS; the shadow targets got theirs.
    assert list(shadow_node["pacs"].folder.iterdir()) == []
    assert shadow_node["ris"].messages == []
    for series, _ in studies:
        assert "SR" in research.modalities(series.study_instance_uid)
    destinations = {d.destination for d in store.deliveries()}
    assert destinations <= {"research", "alert:validation"} and "research" in destinations
    (started,) = node.events("serve.started")
    assert started["mode"] == "shadow"

    # What the node answered, read back from each study's findings.json.
    findings = {
        uid: json.loads((results_dir(storage, job.job_id) / "findings.json").read_text())
        for uid, job in jobs.items()
    }
    site_any = shadow_node["site_any"]
    for f in findings.values():  # the site's threshold decided `any`, and says so
        assert f["series"]["any"]["threshold"] == pytest.approx(site_any)
        assert f["series"]["any"]["threshold_source"] == "site"
        assert f["thresholds_source"] == "bundle+site"
    n_positive = shadow_node["n_positive"]
    assert sum(f["series"]["any"]["positive"] for f in findings.values()) == n_positive
    assert len(shadow_node["validation"].messages) == n_positive  # one per positive study

    # The radiologists' reads: the phantoms' truth, signed an hour after now.
    report_at = time.time() + 3600.0
    reads = tmp_path / "reads.csv"
    with open(reads, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["accession_number", "study_instance_uid", "ich", "subdural",
                         "report_time"])  # fmt: skip
        for i, (series, kinds) in enumerate(studies):  # by accession, or by Study UID
            writer.writerow([_accession(series) if i % 2 else "",
                             "" if i % 2 else series.study_instance_uid, int(bool(kinds)),
                             int("subdural" in kinds),
                             dt.datetime.fromtimestamp(report_at, dt.UTC).isoformat()])  # fmt: skip
        writer.writerow(["NOT-SENT-1", "", 1, 0, ""])
    out = tmp_path / "audit"
    run = subprocess.run(
        [sys.executable, "-m", "ich_node.cli", "audit", "--config", str(node.config_path),
         "--reads", str(reads), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "report.json").read_text())
    assert run.stdout.startswith("ich-node audit")
    assert "unmatched line 8: NOT-SENT-1 (no read by the node)" in run.stdout

    # Every count and metric, recomputed with numpy from findings.json and the truth.
    f = report["reads_file"]
    assert (f["rows"], f["matched"], f["unmatched"]["count"]) == (7, 6, 1)
    assert report["modes"] == ["shadow"]
    assert report["thresholds_in_use"][0]["thresholds"]["any"] == pytest.approx(site_any)
    assert report["thresholds_in_use"][0]["sources"]["any"] == "site"
    for label in ("any", "subdural"):
        y = np.array([bool(k) if label == "any" else label in k for _, k in studies])
        score = np.array(
            [findings[s.series_instance_uid]["series"][label]["probability"] for s, _ in studies]
        )
        decided = np.array(
            [findings[s.series_instance_uid]["series"][label]["positive"] for s, _ in studies]
        )
        m = report["labels"][label]
        tp, fp = int(np.sum(y & decided)), int(np.sum(~y & decided))
        tn, fn = int(np.sum(~y & ~decided)), int(np.sum(y & ~decided))
        assert m["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
        for name, (k, d) in {"prevalence": (tp + fn, 6), "sensitivity": (tp, tp + fn),
                             "specificity": (tn, tn + fp), "ppv": (tp, tp + fp),
                             "npv": (tn, tn + fn)}.items():  # fmt: skip
            assert (m[name]["k"], m[name]["n"]) == (k, d)
            if d:
                assert m[name]["value"] == pytest.approx(k / d)
                assert (m[name]["low"], m[name]["high"]) == pytest.approx(_wilson(k, d))
            else:
                assert m[name]["value"] is None
        pos, neg = score[y], score[~y]
        pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        assert m["auc"]["value"] == pytest.approx(pairs.mean())
        assert sum(b["n"] for b in m["calibration"]) == 6

    # Time to notification: the report's time minus the alert the validation target got.
    reads_by_series = {r.series_instance_uid: r for r in store.reads()}
    alerted = [r.first_alert_at for r in reads_by_series.values() if r.first_alert_at]
    assert len(alerted) == n_positive
    every = report["time_to_notification"]["node_positive"]
    assert every["n"] == n_positive and every["kinds"] == ["alert accepted"]
    assert every["median_lead_s"] == pytest.approx(
        float(np.median([report_at - t for t in alerted]))
    )
    for r in reads_by_series.values():
        assert r.mode == "shadow" and r.result_at is not None
        assert r.first_received_at <= r.result_at <= r.read_at  # type: ignore[operator]
    store.close()
    latest = StorageLayout(storage).audit_latest
    assert (latest / "report.json").read_bytes() == (out / "report.json").read_bytes()
    assert set(LABELS) >= set(report["labels"])


def _accession(series: PhantomSeries) -> str:
    import pydicom

    return str(pydicom.dcmread(series.paths[0], stop_before_pixels=True).AccessionNumber)
