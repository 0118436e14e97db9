"""``report.html``: the audit report as one self-contained page.

Tables and plots of :func:`ich_node.audit.report.build_report`'s dict: ROC curves,
calibration, and the monthly drift, drawn with matplotlib (its object API,
:class:`matplotlib.figure.Figure`: no pyplot state, no display) and embedded as
PNG data URIs, so the file opens anywhere, offline, and can be archived as it is.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from ich_node.labels import LABELS


def duration_text(value: float | None) -> str:
    """Seconds in words: ``42.0 s``, ``3.5 min``, ``1.2 h`` (negative: later)."""
    if value is None:
        return "n/a"
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value >= 3600:
        return f"{sign}{value / 3600:.1f} h"
    if value >= 60:
        return f"{sign}{value / 60:.1f} min"
    return f"{sign}{value:.1f} s"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.notice { background: #fff4d6; border: 1px solid #e0b84c; padding: 0.6em 0.8em; }
.flag { background: #fde2e1; border: 1px solid #d9534f; padding: 0.4em 0.8em; margin: 0.3em 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
img { max-width: 100%; } .small { color: #666; font-size: 0.85em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _pct(p: dict[str, Any] | None) -> str:
    if not p or p.get("value") is None:
        return "n/a"
    interval = f"{100 * p['low']:.1f}&ndash;{100 * p['high']:.1f}"
    return f"{100 * p['value']:.1f}% <span class=small>({interval})</span>"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def roc_plot(report: dict[str, Any]) -> str:
    """ROC curves of every label with truth; the operating points marked."""
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbb", linewidth=1, linestyle="--")
    for label, m in report["labels"].items():
        roc = m["roc"]
        if not roc["fpr"]:
            continue
        auc = m["auc"]["value"]
        ax.plot(roc["fpr"], roc["tpr"], linewidth=1.6, label=f"{label} (AUC {auc:.3f})")
        op = m["operating_point"]
        if op["threshold"] is not None and op["specificity"]["value"] is not None:
            ax.plot(
                1 - op["specificity"]["value"],
                op["sensitivity"]["value"],
                "o",
                markersize=4,
                color=ax.lines[-1].get_color(),
            )
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (dots: operating point for the target sensitivity)", fontsize=9)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def calibration_plot(report: dict[str, Any]) -> str:
    """Observed rate against mean predicted probability, per label (bins with cases)."""
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbb", linewidth=1, linestyle="--")
    for label, m in report["labels"].items():
        rows = [b for b in m["calibration"] if b["n"]]
        if not rows:
            continue
        x = [b["mean_predicted"] for b in rows]
        y = [b["observed"]["value"] for b in rows]
        lo = [b["observed"]["value"] - b["observed"]["low"] for b in rows]
        hi = [b["observed"]["high"] - b["observed"]["value"] for b in rows]
        ax.errorbar(
            x, y, yerr=[lo, hi], marker="o", markersize=3, linewidth=1, capsize=2, label=label
        )
    ax.set_xlabel("mean predicted probability (10 bins)")
    ax.set_ylabel("observed rate (Wilson 95%)")
    ax.set_title("Calibration", fontsize=9)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def drift_plot(report: dict[str, Any]) -> str:
    """Per month: the positive rate (with its interval), the PSI, the median times."""
    from ich_node.audit.stats import PSI_SHIFT, PSI_WATCH

    months = report["drift"]["months"]
    fig = _figure(10.5, 3.4)
    if not months:
        fig.text(0.5, 0.5, "no series read in the window", ha="center")
        return _png(fig)
    names = [m["month"] for m in months]
    x = list(range(len(names)))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    rate = [m["positive_rate"]["value"] or 0.0 for m in months]
    lo = [r - (m["positive_rate"]["low"] or 0.0) for r, m in zip(rate, months, strict=True)]
    hi = [(m["positive_rate"]["high"] or 0.0) - r for r, m in zip(rate, months, strict=True)]
    ax1.errorbar(x, rate, yerr=[lo, hi], marker="o", capsize=3)
    ax1.set_title("positive rate (any), Wilson 95%", fontsize=9)
    ax1.set_ylim(0, 1)
    values = [(m["psi"] or {}).get("psi", 0.0) for m in months]
    colors = [
        "#d9534f" if v > PSI_SHIFT else "#f0ad4e" if v > PSI_WATCH else "#5cb85c" for v in values
    ]
    ax2.bar(x, values, color=colors)
    ax2.axhline(PSI_WATCH, color="#f0ad4e", linestyle="--", linewidth=1)
    ax2.axhline(PSI_SHIFT, color="#d9534f", linestyle="--", linewidth=1)
    ax2.set_title(f"PSI of any-probability vs {names[0]}", fontsize=9)
    result = [m["median_arrival_to_result_s"] for m in months]
    alert = [m["median_arrival_to_alert_s"] for m in months]
    ax3.plot(
        x,
        [v if v is not None else float("nan") for v in result],
        marker="o",
        label="arrival to result",
    )
    ax3.plot(
        x,
        [v if v is not None else float("nan") for v in alert],
        marker="s",
        label="arrival to alert",
    )
    ax3.set_title("median seconds", fontsize=9)
    ax3.legend(fontsize=7)
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=45, fontsize=7)
    fig.tight_layout()
    return _png(fig)


def render_html(report: dict[str, Any]) -> str:
    """The page (UTF-8 text) for ``report`` (:func:`ich_node.audit.report.build_report`)."""
    out: list[str] = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<title>ich-node audit</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>ich-node audit: the node's answers against the radiologists' reads</h1>",
        f"<p class=notice>{_e(report['notice'])}</p>",
    ]
    w = report["window"]
    out.append(
        f"<p class=small>Generated {_e(report['generated_at'])} by ich-node "
        f"{_e(report['ich_node_version'])}. Window: {_e(w['since'] or 'start')} to "
        f"{_e(w['until'] or 'now')} ({_e(w['time'])}). Node mode(s) in the window: "
        f"{_e(', '.join(report['modes']) or 'none')}.</p>"
    )
    for flag in report["drift"]["flags"]:
        out.append(f"<p class=flag>Drift ({_e(flag['flag'])}): {_e(flag['text'])}</p>")

    out.append(
        "<h2>Model and thresholds in use</h2><table><tr><th class=l>model</th>"
        "<th class=l>version</th><th class=l>weights SHA-256</th><th>series</th></tr>"
    )
    for m in report["models"]:
        out.append(
            f"<tr><td class=l>{_e(m['name'])}</td><td class=l>{_e(m['version'])}</td>"
            f"<td class=l>{_e(m['sha256'][:16])}&hellip;</td><td>{m['n_series']}</td></tr>"
        )
    out.append(
        "</table><table><tr><th class=l>source</th>"
        + "".join(f"<th>{_e(label)}</th>" for label in LABELS)
        + "<th>series</th></tr>"
    )
    for g in report["thresholds_in_use"]:
        cells = "".join(
            f"<td>{g['thresholds'].get(label, float('nan')):.3f}"
            f"{'*' if g['sources'].get(label) == 'site' else ''}</td>"
            for label in LABELS
        )
        out.append(
            f"<tr><td class=l>{_e(g['source_text'])}</td>{cells}<td>{g['n_series']}</td></tr>"
        )
    out.append(
        "</table><p class=small>* set by the site (model.thresholds); others the "
        "model bundle's.</p>"
    )

    f = report["reads_file"]
    node = report["node"]
    out.append(
        "<h2>Reads and matching</h2>"
        f"<p>{f['rows']} rows in {_e(f['path'])}: {f['matched']} matched to the node's "
        f"results, {f['unmatched']['count']} unmatched, {f['invalid']['count']} invalid, "
        f"{f['duplicates']['count']} duplicate. The node read {node['series_read']} series "
        f"in {node['studies_read']} studies in the window; "
        f"{node['studies_without_a_read_in_the_file']} of those studies have no row in "
        "the file.</p>"
    )
    rejected = (
        [("unmatched", r) for r in f["unmatched"]["rows"]]
        + [("invalid", r) for r in f["invalid"]["rows"]]
        + [("duplicate", r) for r in f["duplicates"]["rows"]]
    )
    if rejected:
        out.append(
            "<table><tr><th>line</th><th class=l>study</th><th class=l>not used</th>"
            "<th class=l>why</th></tr>"
        )
        for kind, r in rejected:
            out.append(
                f"<tr><td>{r['line']}</td><td class=l>{_e(r['key'])}</td>"
                f"<td class=l>{kind}</td><td class=l>{_e(r['reason'])}</td></tr>"
            )
        out.append("</table>")

    out.append(
        "<h2>Accuracy at the thresholds in use</h2><table><tr><th class=l>label</th><th>n</th>"
        "<th>TP</th><th>FP</th><th>TN</th><th>FN</th><th>prevalence</th><th>sensitivity</th>"
        "<th>specificity</th><th>PPV</th><th>NPV</th><th>AUC (DeLong 95%)</th><th>Brier</th></tr>"
    )
    for label, m in report["labels"].items():
        c = m["confusion"]
        auc = m["auc"]
        auc_text = _num(auc["value"]) + (
            ""
            if auc["low"] is None
            else " <span class=small>(classes separated: DeLong gives no width)</span>"
            if auc["degenerate"]
            else f" <span class=small>({auc['low']:.3f}&ndash;{auc['high']:.3f})</span>"
        )
        out.append(
            f"<tr><td class=l>{_e(label)}</td><td>{m['n']}</td><td>{c['tp']}</td>"
            f"<td>{c['fp']}</td><td>{c['tn']}</td><td>{c['fn']}</td>"
            f"<td>{_pct(m['prevalence'])}</td><td>{_pct(m['sensitivity'])}</td>"
            f"<td>{_pct(m['specificity'])}</td><td>{_pct(m['ppv'])}</td>"
            f"<td>{_pct(m['npv'])}</td><td>{auc_text}</td><td>{_num(m['brier'])}</td></tr>"
        )
    out.append("</table>")

    target = report["target_sensitivity"]
    out.append(
        f"<h2>Operating point for sensitivity &ge; {target:g}</h2><table><tr>"
        "<th class=l>label</th><th>threshold (bootstrap 95%)</th><th>sensitivity</th>"
        "<th>specificity</th><th>specificity (bootstrap 95%)</th></tr>"
    )
    for label, m in report["labels"].items():
        op = m["operating_point"]
        if op["threshold"] is None:
            out.append(
                f"<tr><td class=l>{_e(label)}</td><td colspan=4>needs positive and "
                "negative studies</td></tr>"
            )
            continue
        ti, si = op["threshold_interval"], op["specificity_interval"]
        out.append(
            f"<tr><td class=l>{_e(label)}</td><td>{op['threshold']:.3f} "
            f"<span class=small>({ti[0]:.3f}&ndash;{ti[1]:.3f})</span></td>"
            f"<td>{_pct(op['sensitivity'])}</td><td>{_pct(op['specificity'])}</td>"
            f"<td>{100 * si[0]:.1f}&ndash;{100 * si[1]:.1f}%</td></tr>"
        )
    out.append("</table>")
    out.append(f"<div>{roc_plot(report)} {calibration_plot(report)}</div>")

    out.append("<h2>Calibration</h2>")
    for label, m in report["labels"].items():
        rows = [b for b in m["calibration"] if b["n"]]
        if not rows:
            continue
        out.append(
            f"<table><tr><th class=l>{_e(label)}: bin</th><th>n</th>"
            "<th>mean predicted</th><th>observed</th></tr>"
        )
        for b in rows:
            out.append(
                f"<tr><td class=l>{b['low']:.1f}&ndash;{b['high']:.1f}</td><td>{b['n']}</td>"
                f"<td>{_num(b['mean_predicted'])}</td><td>{_pct(b['observed'])}</td></tr>"
            )
        out.append("</table>")

    drift = report["drift"]
    out.append(
        "<h2>Drift per month</h2><table><tr><th class=l>month</th><th>series</th>"
        "<th>positive rate (any)</th><th>Fisher p vs first</th><th>PSI</th>"
        "<th>notes or incomplete coverage</th><th>median arrival&rarr;result</th>"
        "<th>median arrival&rarr;alert</th></tr>"
    )
    for m in drift["months"]:
        p = m["psi"]
        psi_text = "n/a" if p is None else f"{p['psi']:.3f} ({_e(p['flag'])})"
        fisher = m["positive_rate_fisher_p"]
        out.append(
            f"<tr><td class=l>{_e(m['month'])}{' (few)' if m['few'] else ''}</td>"
            f"<td>{m['n_series']}</td><td>{_pct(m['positive_rate'])}</td>"
            f"<td>{'&ndash;' if fisher is None else f'{fisher:.3g}'}</td><td>{psi_text}</td>"
            f"<td>{_pct(m['notes_or_incomplete'])}</td>"
            f"<td>{_num(m['median_arrival_to_result_s'], 1)} s</td>"
            f"<td>{_num(m['median_arrival_to_alert_s'], 1)} s</td></tr>"
        )
    out.append(f"</table><p class=small>{_e(drift['psi_rule'])}.</p>")
    out.append(drift_plot(report))

    ttn = report["time_to_notification"]
    out.append("<h2>Time to notification against the signed report</h2>")
    out.append(
        f"<p>{ttn['studies_with_report_time']} matched studies have a report_time; "
        f"{ttn['node_positive_not_notified']} of those the node found positive were read "
        "live and no notification target accepted an alert for them (not timed).</p>"
    )
    out.append(
        "<table><tr><th class=l>studies</th><th>n</th><th>median lead</th>"
        "<th>quartiles</th><th>alert before the report</th><th class=l>alert time</th></tr>"
    )
    for name, key in (
        ("found positive by the node", "node_positive"),
        ("true positives", "true_positive"),
    ):
        s = ttn[key]
        if not s["n"]:
            out.append(f"<tr><td class=l>{name}</td><td>0</td><td colspan=4></td></tr>")
            continue
        out.append(
            f"<tr><td class=l>{name}</td><td>{s['n']}</td>"
            f"<td>{duration_text(s['median_lead_s'])}</td>"
            f"<td>{duration_text(s['q1_lead_s'])}&ndash;{duration_text(s['q3_lead_s'])}</td>"
            f"<td>{_pct(s['earlier'])}</td><td class=l>{_e(', '.join(s['kinds']))}</td></tr>"
        )
    out.append("</table>")

    out.append("<h2>Methods</h2><table>")
    for name, text in report["methods"].items():
        out.append(f"<tr><td class=l>{_e(name)}</td><td class=l>{_e(text)}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"
