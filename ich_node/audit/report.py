"""``ich-node audit``: the node's answers against the radiologists' reads.

The node's answers come from the results ledger (``series_reads``: one row per
series version read, :class:`ich_node.queue.interface.SeriesRead`). A study's
answer is made of the latest version read of each of its series in the window:
its probability for a label is the highest of its series', and it is positive
for a label when one of its series was reported positive (at the thresholds in
use when that series was read). The reads CSV (:mod:`ich_node.audit.reads`)
gives the truth per study; rows are matched by accession number, else by Study
Instance UID.

What the report holds (``report.json``; ``report.html`` shows the same with
plots; :func:`summary_lines` a screen of it):

- the window, the models and the thresholds in use (with their source) seen in it;
- the reads file: rows, rows matched, and every row not used with its key and
  why (no read by the node, read outside the window, invalid, duplicate);
- per label with truth: prevalence, sensitivity, specificity, PPV, NPV with
  Wilson intervals; ROC AUC with DeLong's interval; the ROC curve; a calibration
  table and the Brier score; the operating point for the target sensitivity;
- drift per calendar month (UTC) over every series read in the window, truth or
  not: the positive rate (``any``), the population stability index of the
  ``any`` probabilities against the first month, the share read with notes or
  incomplete coverage, the median time from arrival to result and to alert;
- time to notification against ``report_time``: how much earlier the alert came
  (or, in shadow mode, would have come) than the signed report.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from ich_node import __version__
from ich_node.audit import stats
from ich_node.audit.html import duration_text
from ich_node.audit.reads import Reads, Truth
from ich_node.labels import LABELS
from ich_node.queue.interface import SeriesRead
from ich_node.results.findings import NOTICE, THRESHOLD_SOURCE_TEXT, summarise_sources

#: What every report says first.
AUDIT_NOTICE: Final = (
    f"{NOTICE} This audit compares the node's AI results with the radiologists' reads "
    "at this site; it is a quality record, not a clinical finding."
)
#: Fewer reads than this in a month: its PSI and rates are shown, marked as few.
FEW_READS: Final = 30


def arrival(read: SeriesRead) -> float:
    """When the version's images arrived (first instance), else when it was complete/read."""
    for value in (read.first_received_at, read.completed_at, read.read_at):
        if value is not None:
            return float(value)
    return 0.0


def notified(read: SeriesRead) -> tuple[float | None, str]:
    """When this read's alert was accepted, or when it would have gone; and which.

    ``alert accepted``: a notification target accepted its alert (``first_alert_at``);
    ``result known``: a positive read in shadow mode with no alert accepted (the node
    was told to send none): the result time (``result_at``, else ``read_at``) is when
    an alert would have gone. ``(None, "")`` otherwise: a negative read, or a live read
    whose alert no target accepted (none configured, or not delivered): nobody was
    told, and no would-be time stands in for it.
    """
    if read.first_alert_at is not None:
        return float(read.first_alert_at), "alert accepted"
    if "any" in read.positive_labels and read.mode == "shadow":
        when = read.result_at if read.result_at is not None else read.read_at
        if when is not None:
            return float(when), "result known"
    return None, ""


def month_of(epoch: float) -> str:
    """``YYYY-MM`` of a time, in UTC."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m")


def latest_per_series(reads: Iterable[SeriesRead]) -> list[SeriesRead]:
    """The highest version of each series among ``reads``, by arrival time."""
    latest: dict[str, SeriesRead] = {}
    for read in reads:
        held = latest.get(read.series_instance_uid)
        if held is None or read.version > held.version:
            latest[read.series_instance_uid] = read
    return sorted(latest.values(), key=lambda r: (arrival(r), r.series_instance_uid))


@dataclass(frozen=True, slots=True)
class StudyAnswer:
    """The node's answer for one study: its series' latest reads, taken together."""

    series: tuple[SeriesRead, ...]

    @property
    def arrival(self) -> float:
        return min(arrival(r) for r in self.series)

    def probability(self, label: str) -> float:
        """The highest series-level probability of ``label`` among the study's series."""
        return max(float(r.probabilities.get(label, 0.0)) for r in self.series)

    def positive(self, label: str) -> bool:
        """Whether one of the study's series was reported positive for ``label``."""
        return any(label in r.positive_labels for r in self.series)

    def notified(self) -> tuple[float | None, str]:
        """The study's first alert (accepted, else would-be): see :func:`notified`."""
        times = [(t, kind) for t, kind in map(notified, self.series) if t is not None]
        accepted = [t for t, kind in times if kind == "alert accepted"]
        if accepted:
            return min(accepted), "alert accepted"
        if times:
            return min(t for t, _ in times), "result known"
        return None, ""


@dataclass(frozen=True, slots=True)
class Window:
    """``--since`` / ``--until`` as epoch seconds (``until`` exclusive; ``None``: open)."""

    since: float | None = None
    until: float | None = None

    def holds(self, when: float) -> bool:
        return (self.since is None or when >= self.since) and (
            self.until is None or when < self.until
        )

    @classmethod
    def of_dates(cls, since: str | None, until: str | None) -> Window:
        """``YYYY-MM-DD`` dates (UTC): from the start of ``since`` to the end of ``until``.

        Raises
        ------
        ValueError
            When a date is not ``YYYY-MM-DD`` or ``until`` is before ``since``.
        """

        def day(text: str) -> float:
            return dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), dt.UTC).timestamp()

        start = day(since) if since else None
        end = day(until) + 86400.0 if until else None
        if start is not None and end is not None and end <= start:
            raise ValueError(f"--until {until} is before --since {since}")
        return cls(start, end)


@dataclass(frozen=True, slots=True)
class Joined:
    """The reads CSV joined to the node's answers."""

    matched: tuple[tuple[Truth, StudyAnswer], ...]
    unmatched: tuple[dict[str, Any], ...]  # {"line", "key", "reason"}
    studies_without_truth: int


def join(reads: Reads, ledger: Sequence[SeriesRead], window: Window) -> Joined:
    """Match each row of ``reads`` to the study it names among the reads in ``window``.

    A row names a study by accession number (all series carrying it), else by Study
    Instance UID. Rows with no read in the window are listed with the reason:
    read outside the window, or never read by the node.
    """
    inside = latest_per_series(r for r in ledger if window.holds(arrival(r)))
    by_accession: dict[str, list[SeriesRead]] = {}
    by_uid: dict[str, list[SeriesRead]] = {}
    for read in inside:
        if read.accession_number:
            by_accession.setdefault(read.accession_number, []).append(read)
        by_uid.setdefault(read.study_instance_uid, []).append(read)
    ever_accession = {r.accession_number for r in ledger if r.accession_number}
    ever_uid = {r.study_instance_uid for r in ledger}
    matched: list[tuple[Truth, StudyAnswer]] = []
    unmatched: list[dict[str, Any]] = []
    used: set[str] = set()
    for row in reads.rows:
        series = by_accession.get(row.accession_number) if row.accession_number else None
        if not series and row.study_instance_uid:
            series = by_uid.get(row.study_instance_uid)
        if series:
            matched.append((row, StudyAnswer(tuple(series))))
            used.update(r.series_instance_uid for r in series)
            continue
        seen = row.accession_number in ever_accession or row.study_instance_uid in ever_uid
        reason = "read by the node outside the window" if seen else "no read by the node"
        unmatched.append({"line": row.line, "key": row.key, "reason": reason})
    studies = {r.study_instance_uid for r in inside if r.series_instance_uid not in used}
    return Joined(tuple(matched), tuple(unmatched), len(studies))


def label_report(y: np.ndarray, score: np.ndarray, positive: np.ndarray, target: float) -> dict:
    """Every metric of one label: ``y`` (N,) truth, ``score`` (N,) probability, ``positive``
    (N,) the node's decision at the thresholds in use."""
    from sklearn.metrics import roc_curve

    confusion = stats.Confusion.of(y, positive)
    auc = stats.delong_auc(y, score)
    curve: dict[str, list[float]] = {"fpr": [], "tpr": [], "thresholds": []}
    if 0 < int(np.sum(y)) < len(y):
        fpr, tpr, thresholds = roc_curve(y.astype(int), score)
        curve = {
            "fpr": [float(v) for v in fpr],
            "tpr": [float(v) for v in tpr],
            # the first threshold is +inf ("nothing positive"): JSON has no inf
            "thresholds": [float(min(v, 1.0e300)) for v in thresholds],
        }
    return {
        "n": len(y),
        "confusion": {
            "tp": confusion.tp,
            "fp": confusion.fp,
            "tn": confusion.tn,
            "fn": confusion.fn,
        },
        **{name: p.to_dict() for name, p in confusion.metrics().items()},
        "auc": auc.to_dict(),
        "roc": curve,
        "calibration": [b.to_dict() for b in stats.calibration_table(y, score)],
        "brier": stats.brier(y, score),
        "operating_point": stats.operating_point(y, score, target).to_dict(),
    }


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def drift_report(series: Sequence[SeriesRead]) -> dict[str, Any]:
    """Per calendar month (UTC) over the series read: rates, PSI against the first month,
    notes/incomplete coverage, times; and the months flagged."""
    months: dict[str, list[SeriesRead]] = {}
    for read in series:
        months.setdefault(month_of(arrival(read)), []).append(read)
    names = sorted(months)
    rows: list[dict[str, Any]] = []
    flags: list[dict[str, Any]] = []
    reference = None
    first_positive = (0, 0)
    for name in names:
        reads = months[name]
        scores = np.array([float(r.probabilities.get("any", 0.0)) for r in reads])
        k = sum(1 for r in reads if "any" in r.positive_labels)
        if reference is None:
            reference, first_positive = scores, (k, len(reads))
        stability = stats.psi(reference, scores)
        noted = sum(1 for r in reads if r.n_notes > 0 or not r.coverage_complete)
        to_result = []
        for r in reads:
            end = r.result_at if r.result_at is not None else r.read_at
            if end is not None:
                to_result.append(end - arrival(r))
        alerts = [(t - arrival(r), kind) for r in reads for t, kind in [notified(r)] if t]
        row = {
            "month": name,
            "n_series": len(reads),
            "few": len(reads) < FEW_READS,
            "positive_rate": stats.wilson(k, len(reads)).to_dict(),
            "positive_rate_fisher_p": None
            if name == names[0]
            else stats.fisher_p(k, len(reads), *first_positive),
            "mean_any_probability": float(scores.mean()),
            "psi": None if stability is None else stability.to_dict(),
            "notes_or_incomplete": stats.wilson(noted, len(reads)).to_dict(),
            "with_notes": sum(1 for r in reads if r.n_notes > 0),
            "incomplete_coverage": sum(1 for r in reads if not r.coverage_complete),
            "median_arrival_to_result_s": _median(to_result),
            "median_arrival_to_alert_s": _median([t for t, _ in alerts]),
            "n_alerts": len(alerts),
            "alert_kinds": sorted({kind for _, kind in alerts}),
        }
        rows.append(row)
        # Flagged: a shift (PSI above stats.PSI_SHIFT) between months of FEW_READS or more;
        # "watch", and any month with fewer reads, show in the table only: PSI's sampling
        # noise alone is about 9 (1/n1 + 1/n2) with ten bins, and more with empty bins.
        enough = len(reads) >= FEW_READS and len(reference) >= FEW_READS
        if name != names[0] and stability is not None and stability.flag == "shift" and enough:
            flags.append(
                {
                    "month": name,
                    "kind": "score distribution",
                    "flag": stability.flag,
                    "psi": stability.psi,
                    "text": f"{name}: the any-probability distribution shifted against "
                    f"{names[0]} (PSI {stability.psi:.2f})",
                }
            )
    return {
        "reference_month": names[0] if names else None,
        "months": rows,
        "flags": flags,
        "psi_rule": f"stable <= {stats.PSI_WATCH}, watch <= {stats.PSI_SHIFT}, shift above; "
        "bins at the deciles of the first month's any-probabilities",
    }


def timing_report(matched: Sequence[tuple[Truth, StudyAnswer]]) -> dict[str, Any]:
    """How much earlier than the signed report the alert came (or would have come).

    Over the matched studies the node found positive (``any``) that have a
    ``report_time``; ``lead_s`` = report time - alert time (positive: earlier).
    Positive studies with no alert time (live reads whose alert no target accepted)
    are counted in ``node_positive_not_notified``.
    """

    def summary(leads: list[float], kinds: set[str]) -> dict[str, Any]:
        if not leads:
            return {"n": 0, "kinds": sorted(kinds)}
        q1, q3 = np.percentile(leads, [25, 75])
        return {
            "n": len(leads),
            "median_lead_s": float(np.median(leads)),
            "q1_lead_s": float(q1),
            "q3_lead_s": float(q3),
            "earlier": stats.wilson(sum(1 for v in leads if v > 0), len(leads)).to_dict(),
            "kinds": sorted(kinds),
        }

    every: list[float] = []
    true_pos: list[float] = []
    kinds: set[str] = set()
    with_report = not_notified = 0
    for truth, answer in matched:
        if truth.report_time is None:
            continue
        with_report += 1
        if not answer.positive("any"):
            continue
        when, kind = answer.notified()
        if when is None:
            not_notified += 1
            continue
        lead = truth.report_time - when
        every.append(lead)
        kinds.add(kind)
        if truth.labels.get("any"):
            true_pos.append(lead)
    return {
        "studies_with_report_time": with_report,
        "node_positive_not_notified": not_notified,
        "node_positive": summary(every, kinds),
        "true_positive": summary(true_pos, kinds),
    }


def _thresholds_in_use(series: Sequence[SeriesRead]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for read in series:
        sources = read.threshold_sources or dict.fromkeys(read.thresholds, "bundle")
        key = json.dumps([read.thresholds, sources], sort_keys=True)
        group = groups.setdefault(
            key,
            {
                "thresholds": {k: read.thresholds[k] for k in LABELS if k in read.thresholds},
                "sources": {k: sources.get(k, "bundle") for k in LABELS if k in read.thresholds},
                "source": summarise_sources(sources.values()),
                "n_series": 0,
                "model_version": read.model_version,
            },
        )
        group["n_series"] += 1
    for group in groups.values():
        group["source_text"] = THRESHOLD_SOURCE_TEXT[group["source"]]
    return sorted(groups.values(), key=lambda g: -g["n_series"])


def _models(series: Sequence[SeriesRead]) -> list[dict[str, Any]]:
    counts: dict[tuple[str, str, str], int] = {}
    for read in series:
        key = (read.model_name, read.model_version, read.model_sha256)
        counts[key] = counts.get(key, 0) + 1
    return [
        {"name": n, "version": v, "sha256": s, "n_series": c}
        for (n, v, s), c in sorted(counts.items(), key=lambda kv: -kv[1])
    ]


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def build_report(
    reads: Reads,
    ledger: Sequence[SeriesRead],
    *,
    window: Window = Window(),
    target_sensitivity: float = 0.95,
    reads_path: str = "",
    now: float | None = None,
) -> dict[str, Any]:
    """The whole audit as a JSON-ready dict (``report.json``; see the module's notes)."""
    now = time.time() if now is None else now
    joined = join(reads, ledger, window)
    inside = latest_per_series(r for r in ledger if window.holds(arrival(r)))
    labels: dict[str, Any] = {}
    for label in reads.labels:
        rows = [(t, a) for t, a in joined.matched if label in t.labels]
        y = np.array([t.labels[label] for t, _ in rows], dtype=bool)
        score = np.array([a.probability(label) for _, a in rows], dtype=np.float64)
        positive = np.array([a.positive(label) for _, a in rows], dtype=bool)
        labels[label] = label_report(y, score, positive, target_sensitivity)
    modes = sorted({r.mode for r in inside})
    return {
        "notice": AUDIT_NOTICE,
        "generated_at": _iso(now),
        "ich_node_version": __version__,
        "window": {
            "since": _iso(window.since),
            "until": _iso(window.until),
            "time": "arrival of the series' first image, UTC",
        },
        "target_sensitivity": target_sensitivity,
        "modes": modes,
        "models": _models(inside),
        "thresholds_in_use": _thresholds_in_use(inside),
        "reads_file": {
            "path": reads_path,
            "rows": reads.n_rows,
            "labels": list(reads.labels),
            "matched": len(joined.matched),
            "unmatched": {"count": len(joined.unmatched), "rows": list(joined.unmatched)},
            "invalid": {
                "count": len(reads.invalid),
                "rows": [{"line": r.line, "key": r.key, "reason": r.reason} for r in reads.invalid],
            },
            "duplicates": {
                "count": len(reads.duplicates),
                "rows": [
                    {"line": r.line, "key": r.key, "reason": r.reason} for r in reads.duplicates
                ],
            },
        },
        "node": {
            "series_read": len(inside),
            "studies_read": len({r.study_instance_uid for r in inside}),
            "studies_without_a_read_in_the_file": joined.studies_without_truth,
        },
        "labels": labels,
        "drift": drift_report(inside),
        "time_to_notification": timing_report(joined.matched),
        "methods": {
            "study_answer": "latest version of each series read in the window; a study's "
            "probability is its series' highest, positive when one series was reported "
            "positive at the thresholds in use",
            "proportions": "Wilson score interval, 95%, no continuity correction "
            "(scipy.stats.binomtest(...).proportion_ci(method='wilson'))",
            "auc": "scikit-learn roc_auc_score; DeLong variance (Sun & Xu 2014 midranks, "
            "scipy.stats.rankdata), 95% normal interval clipped to [0, 1]",
            "roc": "scikit-learn roc_curve",
            "calibration": "10 equal-width bins of the probability; observed rate with "
            "Wilson interval; Brier score (scikit-learn brier_score_loss)",
            "operating_point": f"highest threshold with sensitivity >= target; Wilson "
            f"intervals at it; percentile bootstrap ({stats.BOOTSTRAP_RESAMPLES} resamples, "
            "positives and negatives apart, seed 0) of the threshold and the specificity",
            "drift": "calendar months (UTC) of the series' arrival; population stability "
            "index of the any-probabilities against the first month (deciles of the first "
            "month); positive rate compared with the first month by Fisher's exact test "
            "(scipy.stats.fisher_exact)",
            "time_to_notification": "report_time minus the study's first alert accepted by "
            "a notification target, or, for a shadow-mode read that sent none, the time "
            "its positive result was known (when an alert would have gone); live reads "
            "whose alert no target accepted are counted apart, not timed",
        },
    }


def _pct(p: dict[str, Any]) -> str:
    if p["value"] is None:
        return "n/a"
    return f"{100 * p['value']:.1f}% ({100 * p['low']:.1f}-{100 * p['high']:.1f})"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One screen of the report: the figures an AI committee looks at first."""
    lines = [f"ich-node audit ({report['notice'].split('.')[0]}.)"]
    window = report["window"]
    lines.append(
        f"window: {window['since'] or 'start'} .. {window['until'] or 'now'}; "
        f"mode(s): {', '.join(report['modes']) or 'none'}"
    )
    for model in report["models"]:
        lines.append(f"model: {model['name']} {model['version']} ({model['n_series']} series)")
    for group in report["thresholds_in_use"]:
        values = ", ".join(f"{k} {v:.2f}" for k, v in group["thresholds"].items())
        lines.append(f"thresholds ({group['source_text']}): {values}")
    f = report["reads_file"]
    node = report["node"]
    lines.append(
        f"reads file: {f['rows']} rows, {f['matched']} matched, {f['unmatched']['count']} "
        f"unmatched, {f['invalid']['count']} invalid, {f['duplicates']['count']} duplicate; "
        f"node: {node['series_read']} series in {node['studies_read']} studies "
        f"({node['studies_without_a_read_in_the_file']} without a read in the file)"
    )
    for row in f["unmatched"]["rows"][:5]:
        lines.append(f"  unmatched line {row['line']}: {row['key']} ({row['reason']})")
    if f["unmatched"]["count"] > 5:
        lines.append(f"  ... and {f['unmatched']['count'] - 5} more (report.json)")
    lines.append(
        "label             n   prev   sensitivity          specificity          AUC (95% CI)"
    )
    for label, m in report["labels"].items():
        auc = m["auc"]
        auc_text = (
            "n/a"
            if auc["value"] is None
            else f"{auc['value']:.3f}"
            + (
                ""
                if auc["low"] is None
                else " (separated: no width)"
                if auc["degenerate"]
                else f" ({auc['low']:.3f}-{auc['high']:.3f})"
            )
        )
        prev = m["prevalence"]["value"]
        lines.append(
            f"{label:<16}{m['n']:>4} {'n/a' if prev is None else f'{100 * prev:4.1f}%':>6}  "
            f"{_pct(m['sensitivity']):<20} {_pct(m['specificity']):<20} {auc_text}"
        )
    target = report["target_sensitivity"]
    for label, m in report["labels"].items():
        op = m["operating_point"]
        if op["threshold"] is None:
            continue
        ti = op["threshold_interval"]
        lines.append(
            f"operating point {label} (sensitivity >= {target:g}): threshold "
            f"{op['threshold']:.3f} ({ti[0]:.3f}-{ti[1]:.3f}), specificity "
            f"{_pct(op['specificity'])}"
        )
    drift = report["drift"]
    if drift["months"]:
        parts = [
            f"{m['month']} n={m['n_series']} pos={_pct(m['positive_rate']).split(' ')[0]}"
            + ("" if m["psi"] is None else f" psi={m['psi']['psi']:.2f}")
            for m in drift["months"]
        ]
        lines.append("drift: " + "; ".join(parts))
    for flag in drift["flags"]:
        lines.append(f"DRIFT {flag['flag'].upper()}: {flag['text']}")
    ttn = report["time_to_notification"]["node_positive"]
    if ttn["n"]:
        lines.append(
            f"time to notification vs report ({', '.join(ttn['kinds'])}): median "
            f"{duration_text(ttn['median_lead_s'])} earlier over {ttn['n']} studies; earlier in "
            f"{_pct(ttn['earlier'])}"
        )
    return lines


def write_report(report: dict[str, Any], out: Path, latest: Path | None = None) -> list[Path]:
    """Write ``out/report.json`` and ``out/report.html``; copy both to ``latest`` atomically.

    Each file is written to a temporary name, fsynced and renamed
    (:func:`ich_node.durable.write_atomic`), so a reader of ``latest`` (the web
    console) sees the previous report or the new one, never a part.
    """
    from ich_node.audit.html import render_html
    from ich_node.durable import write_atomic

    data = (json.dumps(report, indent=2, sort_keys=False) + "\n").encode()
    html = render_html(report).encode()
    written = []
    for folder in (out, latest):
        if folder is None:
            continue
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, payload in (("report.json", data), ("report.html", html)):
            write_atomic(folder / name, payload)
            written.append(folder / name)
    return written


def run_audit(
    config: Any,
    reads_path: Path,
    out: Path,
    *,
    since: str | None = None,
    until: str | None = None,
    target_sensitivity: float = 0.95,
    report_zone: str | None = None,
) -> int:
    """``ich-node audit``: 0 with the report written; 2 for bad input; the store's code
    (1 or 2) when it cannot be opened. Opens the store read-only (never migrates it)."""
    from ich_node.audit.reads import ReadsError, read_reads
    from ich_node.queue.backend import existing_store
    from ich_node.queue.interface import StoreUnusable
    from ich_node.queue.layout import StorageLayout

    if not 0.0 < target_sensitivity <= 1.0:
        print(
            f"ich-node audit: --target-sensitivity must be in (0, 1], got {target_sensitivity}",
            file=sys.stderr,
        )
        return 2
    try:
        window = Window.of_dates(since, until)
        reads = read_reads(reads_path, report_zone)
    except (ValueError, ReadsError, KeyError) as exc:  # KeyError: an unknown --report-zone
        print(f"ich-node audit: {exc}", file=sys.stderr)
        return 2
    try:
        store = existing_store(config.storage)
    except StoreUnusable as exc:
        print(f"ich-node audit: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        ledger = store.reads()
    finally:
        store.close()
    report = build_report(
        reads,
        ledger,
        window=window,
        target_sensitivity=target_sensitivity,
        reads_path=str(reads_path),
    )
    write_report(report, out, StorageLayout(config.storage.dir).audit_latest)
    for line in summary_lines(report):
        print(line)
    print(
        f"report: {out / 'report.html'} and report.json (latest: "
        f"{StorageLayout(config.storage.dir).audit_latest})"
    )
    return 0
