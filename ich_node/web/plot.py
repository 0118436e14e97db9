"""Per-slice probabilities as an SVG line plot, drawn on the server (no JavaScript).

One line per label over the slices in spatial order (inferior to superior, as
``findings.json`` lists them), the probability from 0 to 1 on the vertical
axis, each label's threshold as a dashed line of its colour. Colours come from
the Okabe-Ito palette, which stays distinguishable with colour-vision deficiencies.
"""

from __future__ import annotations

from html import escape
from typing import Final

from ich_node.labels import LABELS
from ich_node.results.findings import SeriesFindings

#: Okabe & Ito (2008) colours, one per label in :data:`LABELS` order.
COLOURS: Final = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#D55E00")
WIDTH: Final = 720
HEIGHT: Final = 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 175, 12, 36


def probability_svg(findings: SeriesFindings) -> str:
    """The plot as an ``<svg>`` element (a string safe to embed in HTML).

    Parameters
    ----------
    findings : SeriesFindings
        A read series; ``slices`` in spatial order, probabilities in [0, 1].
    """
    n = len(findings.slices)
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def x(i: int) -> float:
        return _LEFT + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(p: float) -> float:
        return _TOP + plot_h * (1.0 - min(1.0, max(0.0, p)))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="per-slice probability of each label, {n} slices">',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" '
        'stroke="#888"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        ty = y(tick)
        parts.append(
            f'<line x1="{_LEFT - 4}" y1="{ty:.1f}" x2="{_LEFT + plot_w}" y2="{ty:.1f}" '
            'stroke="#ddd"/>'
            f'<text x="{_LEFT - 6}" y="{ty + 4:.1f}" text-anchor="end" font-size="11">'
            f"{tick:.2f}</text>"
        )
    step = max(1, n // 10)
    for i in range(0, n, step):
        parts.append(
            f'<text x="{x(i):.1f}" y="{_TOP + plot_h + 14}" text-anchor="middle" '
            f'font-size="11">{i + 1}</text>'
        )
    parts.append(
        f'<text x="{_LEFT + plot_w / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle" '
        'font-size="11">slice (inferior to superior)</text>'
    )
    for k, (label, colour) in enumerate(zip(LABELS, COLOURS, strict=True)):
        threshold = findings.series[label].threshold
        ty = y(threshold)
        parts.append(
            f'<line x1="{_LEFT}" y1="{ty:.1f}" x2="{_LEFT + plot_w}" y2="{ty:.1f}" '
            f'stroke="{colour}" stroke-dasharray="4 4" stroke-width="1" opacity="0.6"/>'
        )
        points = " ".join(
            f"{x(i):.1f},{y(s.probabilities.get(label, 0.0)):.1f}"
            for i, s in enumerate(findings.slices)
        )
        width = 2.5 if label == "any" else 1.5
        if n > 1:
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="{width}" '
                f'points="{points}"><title>{escape(label)}</title></polyline>'
            )
        else:
            parts.append(f'<circle cx="{x(0):.1f}" cy="{y(0):.1f}" r="3" fill="{colour}"/>')
        ly = _TOP + 14 + 18 * k
        bold = ' font-weight="bold"' if findings.series[label].positive else ""
        parts.append(
            f'<line x1="{WIDTH - _RIGHT + 12}" y1="{ly - 4}" x2="{WIDTH - _RIGHT + 32}" '
            f'y2="{ly - 4}" stroke="{colour}" stroke-width="{width}"/>'
            f'<text x="{WIDTH - _RIGHT + 36}" y="{ly}" font-size="12"{bold}>'
            f"{escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
