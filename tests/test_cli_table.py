"""The findings table that ``predict`` (and the demo) print."""

from __future__ import annotations

from ich_node.labels import LABELS
from ich_node.results.findings import LabelFinding, ModelInfo, SeriesFindings, SliceFinding
from ich_node.service.cli import format_findings_table, short_uid

THRESHOLDS = {"any": 0.28, "epidural": 0.73, **{k: 0.5 for k in LABELS[2:]}}


def _findings(uid: str, p: dict[str, float]) -> SeriesFindings:
    series = {
        label: LabelFinding(
            p.get(label, 0.0), p.get(label, 0.0) >= THRESHOLDS[label], THRESHOLDS[label]
        )
        for label in LABELS
    }
    slices = tuple(
        SliceFinding(f"{uid}.{i}", float(i), dict.fromkeys(LABELS, 0.0)) for i in range(3)
    )
    return SeriesFindings("1.2.3", uid, ModelInfo("m", "1", "resnet18", "", True), series, slices)


def test_table_orders_by_uid_shortens_like_the_demo_and_shows_thresholds() -> None:
    b = "1.2.826.0.1.3680043.8.498.20000000000000000002"
    a = "1.2.826.0.1.3680043.8.498.10000000000000000001"
    text = format_findings_table([_findings(b, {"any": 0.30}), _findings(a, {"epidural": 0.72})])
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["series", "slices"]
    assert lines[1].split() == ["threshold", "0.28", "0.73", "0.50", "0.50", "0.50", "0.50"]
    assert lines[2].startswith(short_uid(a)) and lines[3].startswith(short_uid(b))
    assert short_uid(a) == "..." + a[-21:] and len(short_uid(a)) == 24
    assert "0.30*" in lines[3] and "0.72 " in lines[2]  # starred at its own threshold
