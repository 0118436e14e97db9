"""``ich-node audit``: the reads CSV, the join to the results ledger, the report.

The ledger rows are written through the store (``record_read``, as the job's
completion does) on both store backends; the truth and the node's answers are
known in the test, and every count and metric is recomputed here with numpy.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from ich_node.audit.reads import read_reads
from ich_node.audit.report import Window, build_report
from ich_node.labels import LABELS
from ich_node.queue.interface import JobRecord, SeriesRead
from ich_node.queue.layout import StorageLayout
from ich_node.queue.store import Store

OpenStore = Callable[[Path], Store]
Z = 1.959963984540054
JAN = dt.datetime(2026, 1, 10, 8, 0, tzinfo=dt.UTC).timestamp()
FEB = dt.datetime(2026, 2, 10, 8, 0, tzinfo=dt.UTC).timestamp()


def _read(i: int, p_any: float, at: float, *, threshold: float = 0.5, **kw: Any) -> SeriesRead:
    probs = dict.fromkeys(LABELS, 0.01) | {"any": p_any, "subdural": kw.pop("p_sdh", 0.01)}
    positive = tuple(
        label for label in LABELS if probs[label] >= threshold and probs["any"] >= threshold
    )
    values: dict[str, Any] = {
        "job_id": f"job{i:04d}", "study_instance_uid": f"1.2.826.0.1.{i}",
        "series_instance_uid": f"1.2.826.0.1.{i}.1", "accession_number": f"ACC{i:04d}",
        "version": 1, "content_fingerprint": "f" * 64, "n_instances": 30,
        "model_name": "ich test", "model_version": "1.0", "model_sha256": "ab" * 32,
        "thresholds": dict.fromkeys(LABELS, threshold), "probabilities": probs,
        "positive_labels": positive, "coverage_complete": True, "n_notes": 0,
        "first_received_at": at, "completed_at": at + 35.0, "read_at": at + 40.0,
        "result_at": at + 38.0, "mode": "shadow",
        "threshold_sources": dict.fromkeys(LABELS, "bundle") | {"any": "site"},
    }  # fmt: skip
    return SeriesRead(**(values | kw))


def _record(store: Store, reads: list[SeriesRead]) -> None:
    """Write ledger rows as the job's completion does (``Store.record_read``)."""
    with store.transaction() as db:
        for r in reads:
            job = JobRecord(r.job_id, r.series_instance_uid, r.version, "done", 1, 0.0, None,
                            None, "", r.completed_at or 0.0, r.read_at or 0.0,
                            cause="first read")  # fmt: skip
            store.record_read(db, job, r, r.read_at or 0.0)


def _csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    lines = [",".join(columns)]
    lines += [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_file_rows_not_used_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "reads.csv"
    path.write_text(
        "Accession_Number,study_instance_uid,ich,subdural,report_time\n"
        "A1,,1,1,2026-01-10T09:00:00+01:00\n"
        ",1.2.3,0,,\n"
        "A2,,maybe,0,\n"  # not 0/1
        ",,1,0,\n"  # no key
        "A1,,0,0,\n"  # the same study again
        "A3,,1,,2026-01-10T09:00:00\n"  # a naive time: read in --report-zone
        "A4,,1,,yesterday\n"
        "\n"
    )
    reads = read_reads(path, "Asia/Tokyo")
    assert reads.n_rows == 7 and reads.labels == ("any", "subdural")
    assert [r.key for r in reads.rows] == ["A1", "1.2.3", "A3"]
    assert reads.rows[0].labels == {"any": True, "subdural": True}
    assert reads.rows[1].labels == {"any": False}  # subdural not recorded for that study
    assert reads.rows[0].report_time == dt.datetime(2026, 1, 10, 8, tzinfo=dt.UTC).timestamp()
    assert reads.rows[2].report_time == dt.datetime(2026, 1, 10, 0, tzinfo=dt.UTC).timestamp()
    assert [(r.line, r.key) for r in reads.invalid] == [(4, "A2"), (5, ""), (8, "A4")]
    assert "not 0 or 1" in reads.invalid[0].reason
    assert [(r.line, r.key, r.reason) for r in reads.duplicates] == [
        (6, "A1", "the same study as line 2")
    ]


def _wilson(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre, half = p + Z * Z / (2 * n), Z * np.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return (centre - half) / (1 + Z * Z / n), (centre + half) / (1 + Z * Z / n)


def test_report_metrics_against_numpy(tmp_path: Path, open_store: OpenStore) -> None:
    rng = np.random.default_rng(42)
    n = 120
    truth = rng.random(n) < 0.3
    sdh = truth & (rng.random(n) < 0.5)
    p_any = np.clip(np.where(truth, rng.beta(6, 2, n), rng.beta(2, 6, n)), 0, 1).round(4)
    p_sdh = np.clip(np.where(sdh, rng.beta(5, 2, n), rng.beta(2, 5, n)), 0, 1).round(4)
    ledger = [_read(i, float(p_any[i]), JAN + 60 * i, p_sdh=float(p_sdh[i])) for i in range(n)]
    # A second, later version of study 0's series answers instead of the first.
    ledger.append(_read(0, 0.02, JAN, version=2, job_id="job0000v2", p_sdh=0.01))
    p_any[0], p_sdh[0] = 0.02, 0.01
    # Read by the node, but not in the reads file; and in the file, never read.
    ledger.append(_read(900, 0.9, JAN + 7200))
    store = open_store(tmp_path / "node")
    _record(store, ledger)
    rows = [
        {"accession_number": f"ACC{i:04d}" if i % 2 else "",
         "study_instance_uid": "" if i % 2 else f"1.2.826.0.1.{i}",
         "ich": int(truth[i]), "subdural": int(sdh[i])}
        for i in range(n)
    ] + [{"accession_number": "NEVER-READ", "ich": 1, "subdural": 0}]  # fmt: skip
    path = _csv(tmp_path / "reads.csv", rows,
                ["accession_number", "study_instance_uid", "ich", "subdural"])  # fmt: skip
    report = build_report(read_reads(path), store.reads(), target_sensitivity=0.9)

    f = report["reads_file"]
    assert (f["rows"], f["matched"]) == (n + 1, n)
    assert f["unmatched"]["rows"] == [
        {"line": n + 2, "key": "NEVER-READ", "reason": "no read by the node"}
    ]
    assert report["node"] == {"series_read": n + 1, "studies_read": n + 1,
                              "studies_without_a_read_in_the_file": 1}  # fmt: skip
    assert report["thresholds_in_use"][0]["sources"]["any"] == "site"
    assert report["thresholds_in_use"][0]["source"] == "bundle+site"
    assert report["modes"] == ["shadow"]

    from sklearn.metrics import roc_auc_score  # only to double the numpy check of the AUC

    for label, y, score in (("any", truth, p_any), ("subdural", sdh, p_sdh)):
        m = report["labels"][label]
        decided = (score >= 0.5) & (p_any >= 0.5)
        tp = int(np.sum(y & decided))
        fp = int(np.sum(~y & decided))
        tn = int(np.sum(~y & ~decided))
        fn = int(np.sum(y & ~decided))
        assert m["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
        for name, (k, d) in {"prevalence": (tp + fn, n), "sensitivity": (tp, tp + fn),
                             "specificity": (tn, tn + fp), "ppv": (tp, tp + fp),
                             "npv": (tn, tn + fn)}.items():  # fmt: skip
            assert (m[name]["k"], m[name]["n"]) == (k, d)
            assert m[name]["value"] == pytest.approx(k / d)
            assert (m[name]["low"], m[name]["high"]) == pytest.approx(_wilson(k, d))
        pairs = (score[y][:, None] > score[~y][None, :]) + 0.5 * (
            score[y][:, None] == score[~y][None, :]
        )
        assert m["auc"]["value"] == pytest.approx(pairs.mean())
        assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, score))
        v10, v01 = pairs.mean(axis=1), pairs.mean(axis=0)
        var = v10.var(ddof=1) / y.sum() + v01.var(ddof=1) / (~y).sum()
        assert m["auc"]["low"] == pytest.approx(max(0, pairs.mean() - Z * np.sqrt(var)))
        assert m["auc"]["high"] == pytest.approx(min(1, pairs.mean() + Z * np.sqrt(var)))
        counts = np.histogram(score, bins=np.linspace(0, 1, 11))[0]
        assert [b["n"] for b in m["calibration"]] == list(counts)
        op = m["operating_point"]
        threshold = np.sort(score[y])[::-1][int(np.ceil(0.9 * y.sum())) - 1]
        assert op["threshold"] == pytest.approx(threshold)
        assert op["specificity"]["k"] == int(np.sum(score[~y] < threshold))
        assert op["sensitivity"]["value"] >= 0.9


def test_window_keeps_what_arrived_in_it(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path / "node")
    _record(store, [_read(1, 0.9, JAN), _read(2, 0.1, FEB)])
    rows = [{"accession_number": "ACC0001", "ich": 1}, {"accession_number": "ACC0002", "ich": 0}]
    path = _csv(tmp_path / "reads.csv", rows, ["accession_number", "ich"])
    report = build_report(read_reads(path), store.reads(),
                          window=Window.of_dates("2026-02-01", "2026-02-28"))  # fmt: skip
    assert report["reads_file"]["matched"] == 1
    assert report["reads_file"]["unmatched"]["rows"] == [
        {"line": 2, "key": "ACC0001", "reason": "read by the node outside the window"}
    ]
    assert [m["month"] for m in report["drift"]["months"]] == ["2026-02"]


def test_drift_between_two_months_is_flagged(tmp_path: Path, open_store: OpenStore) -> None:
    """Scores from two distributions in two months: the second month is flagged."""
    rng = np.random.default_rng(7)
    jan = rng.beta(2, 8, 150)
    feb = rng.beta(5, 3, 150)
    ledger = [_read(i, float(p), JAN + 600 * i) for i, p in enumerate(jan)]
    ledger += [_read(1000 + i, float(p), FEB + 600 * i) for i, p in enumerate(feb)]
    store = open_store(tmp_path / "node")
    _record(store, ledger)
    path = _csv(tmp_path / "reads.csv", [], ["accession_number", "ich"])
    drift = build_report(read_reads(path), store.reads())["drift"]
    jan_row, feb_row = drift["months"]
    assert (jan_row["month"], feb_row["month"]) == ("2026-01", "2026-02")
    assert jan_row["psi"]["psi"] == pytest.approx(0.0) and jan_row["psi"]["flag"] == "stable"
    assert feb_row["psi"]["flag"] == "shift" and feb_row["psi"]["psi"] > 0.25
    (flag,) = drift["flags"]
    assert flag["month"] == "2026-02" and flag["flag"] == "shift"
    # The positive rate, recomputed, and its Fisher test against January.
    k_jan, k_feb = int(np.sum(jan >= 0.5)), int(np.sum(feb >= 0.5))
    assert jan_row["positive_rate"]["k"] == k_jan and feb_row["positive_rate"]["k"] == k_feb
    from scipy.stats import fisher_exact

    p = fisher_exact([[k_feb, 150 - k_feb], [k_jan, 150 - k_jan]]).pvalue
    assert feb_row["positive_rate_fisher_p"] == pytest.approx(p)
    assert feb_row["median_arrival_to_result_s"] == pytest.approx(38.0)


def test_drift_not_flagged_for_one_distribution(tmp_path: Path, open_store: OpenStore) -> None:
    # PSI's sampling noise is about (bins - 1) (1/n1 + 1/n2): 0.018 with 1000 a month.
    rng = np.random.default_rng(9)
    scores = rng.beta(2, 8, 2000)
    ledger = [_read(i, float(p), (JAN if i < 1000 else FEB) + 60 * (i % 1000))
              for i, p in enumerate(scores)]  # fmt: skip
    store = open_store(tmp_path / "node")
    _record(store, ledger)
    path = _csv(tmp_path / "reads.csv", [], ["accession_number", "ich"])
    drift = build_report(read_reads(path), store.reads())["drift"]
    assert drift["flags"] == [] and drift["months"][1]["psi"]["flag"] == "stable"


def test_time_to_notification_against_the_report(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path / "node")
    ledger = [
        _read(1, 0.9, JAN, first_alert_at=JAN + 50.0),  # alerted: accepted 50 s after arrival
        _read(2, 0.9, JAN + 100),  # positive in shadow: result known at +38 s
        _read(3, 0.1, JAN + 200),  # negative: no alert
        _read(4, 0.8, JAN + 300),  # positive, but a false positive
        _read(5, 0.9, JAN + 400, mode="live"),  # live, no alert accepted: not timed
    ]
    _record(store, ledger)
    rows = [
        {"accession_number": "ACC0001", "ich": 1, "report_time": _iso(JAN + 3600)},
        {"accession_number": "ACC0002", "ich": 1, "report_time": _iso(JAN + 100 + 1800)},
        {"accession_number": "ACC0003", "ich": 0, "report_time": _iso(JAN + 900)},
        {"accession_number": "ACC0004", "ich": 0, "report_time": _iso(JAN + 300 + 20)},
        {"accession_number": "ACC0005", "ich": 1, "report_time": _iso(JAN + 4000)},
    ]
    path = _csv(tmp_path / "reads.csv", rows, ["accession_number", "ich", "report_time"])
    ttn = build_report(read_reads(path), store.reads())["time_to_notification"]
    leads = [3600 - 50.0, 1800 - 38.0, 20 - 38.0]
    assert ttn["studies_with_report_time"] == 5
    assert ttn["node_positive_not_notified"] == 1
    assert ttn["node_positive"]["n"] == 3
    assert ttn["node_positive"]["median_lead_s"] == pytest.approx(np.median(leads))
    assert ttn["node_positive"]["earlier"]["k"] == 2
    assert ttn["node_positive"]["kinds"] == ["alert accepted", "result known"]
    assert ttn["true_positive"]["n"] == 2
    assert ttn["true_positive"]["median_lead_s"] == pytest.approx(np.median(leads[:2]))


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat()


def test_command_writes_the_report_and_the_latest_copy(tmp_path: Path) -> None:
    """``ich-node audit`` on an embedded store: files, the latest copy, the summary."""
    storage = tmp_path / "node"
    store = Store.open(storage)
    rng = np.random.default_rng(1)
    truth = rng.random(40) < 0.4
    scores = np.where(truth, rng.beta(6, 2, 40), rng.beta(2, 6, 40))
    _record(store, [_read(i, float(scores[i]), JAN + 3600 * 24 * (i % 2) * 31)
                    for i in range(40)])  # fmt: skip
    store.close()
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"storage": {"dir": str(storage)}}))
    rows = [{"accession_number": f"ACC{i:04d}", "ich": int(truth[i])} for i in range(40)]
    rows.append({"accession_number": "MISSING-1", "ich": 0})
    reads = _csv(tmp_path / "reads.csv", rows, ["accession_number", "ich"])
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-m", "ich_node.cli", "audit", "--config", str(config), "--reads",
         str(reads), "--out", str(out), "--target-sensitivity", "0.9"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("ich-node audit (AI result for triage support, not a diagnosis.")
    assert any(line.startswith("reads file: 41 rows, 40 matched, 1 unmatched") for line in lines)
    assert "  unmatched line 42: MISSING-1 (no read by the node)" in lines
    assert any(line.startswith("any ") for line in lines)
    assert any(line.startswith("operating point any (sensitivity >= 0.9)") for line in lines)
    assert len(lines) <= 40  # one screen
    report = json.loads((out / "report.json").read_text())
    latest = StorageLayout(storage).audit_latest
    assert (latest / "report.json").read_bytes() == (out / "report.json").read_bytes()
    assert (latest / "report.html").read_bytes() == (out / "report.html").read_bytes()
    assert report["labels"]["any"]["n"] == 40
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # ROC, calibration, drift
    assert "MISSING-1" in page and "not a diagnosis" in page
    assert not [p for p in latest.iterdir() if p.name.endswith(".tmp")]

    # The web console's Validation page shows this very report (the latest copy).
    from ich_node.config import NodeConfig, WebSection
    from ich_node.web.app import create_app
    from ich_node.web.users import add_user
    from tests.test_web import PASSWORD, VIEWER, _serve, login

    add_user(tmp_path / "users", VIEWER, "viewer", PASSWORD)
    web_config = NodeConfig.model_validate(
        {"storage": {"dir": str(storage)}, "web": {"users_file": str(tmp_path / "users")}}
    )
    assert isinstance(web_config.web, WebSection)
    app = create_app(web_config, secret=b"k" * 32)
    url, stop = _serve(app)
    try:
        with httpx.Client(base_url=url, follow_redirects=False, timeout=30) as client:
            login(client, VIEWER)
            page = client.get("/validation").text
            shown = client.get("/validation/report.json")
            html = client.get("/validation/report.html")
    finally:
        stop()
        app.state.web.console.close()
    assert 'id="report-written"' in page and 'src="/validation/report.html"' in page
    assert shown.status_code == 200 and shown.json() == report
    assert html.status_code == 200 and "MISSING-1" in html.text

    # Bad input: one line and exit 2; no store: exit 1.
    bad = subprocess.run(
        [sys.executable, "-m", "ich_node.cli", "audit", "--config", str(config), "--reads",
         str(tmp_path / "nope.csv"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "cannot read the reads file" in bad.stderr
    config.write_text(yaml.safe_dump({"storage": {"dir": str(tmp_path / "empty")}}))
    none = subprocess.run(
        [sys.executable, "-m", "ich_node.cli", "audit", "--config", str(config), "--reads",
         str(reads), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert none.returncode == 1 and "no node store" in none.stderr
    assert not (tmp_path / "empty" / "node.sqlite3").exists()  # the audit created nothing


def test_separated_classes_say_the_interval_has_no_width(
    tmp_path: Path, open_store: OpenStore
) -> None:
    from ich_node.audit.html import render_html
    from ich_node.audit.report import summary_lines

    store = open_store(tmp_path / "node")
    _record(store, [_read(i, p, JAN + 60 * i) for i, p in enumerate((0.9, 0.8, 0.1, 0.2))])
    rows = [{"accession_number": f"ACC{i:04d}", "ich": int(i < 2)} for i in range(4)]
    path = _csv(tmp_path / "reads.csv", rows, ["accession_number", "ich"])
    report = build_report(read_reads(path), store.reads())
    assert report["labels"]["any"]["auc"]["degenerate"] is True
    assert any(line.startswith("any ") and "1.000 (separated: no width)" in line
               for line in summary_lines(report))  # fmt: skip
    assert "classes separated: DeLong gives no width" in render_html(report)
