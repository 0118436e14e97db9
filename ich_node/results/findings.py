"""Findings of one series: the numbers every output (JSON, SR, heatmaps) is built from.

``findings.json`` is a stable interface (scripts and the SR depend on it)::

    {
      "study_instance_uid": "...", "series_instance_uid": "...", "n_slices": 32,
      "model": {"name", "version", "arch", "sha256", "demo", "stages", "tta"},
      "notice": "AI result for triage support, not a diagnosis. ...",
      "series": {"any": {"probability": 0.97, "positive": true, "threshold": 0.5,
                         "threshold_source": "bundle"}, ...},
      "thresholds_source": "bundle",
      "slices": [{"sop_instance_uid", "position_mm", "probabilities": {"any": ...}}, ...],
      "coverage": {"z_min_mm", "z_max_mm", "median_spacing_mm", "largest_gap_mm",
                   "n_gaps", "complete"},
      "dropped": [{"sop_instance_uid", "reason"}, ...],
      "notes": ["readable line", ...],
      "time": {"written": "2024-03-15T08:41:07+09:00", "utc_offset": "+09:00",
               "zone_from": "source", "zone_name": ""}
    }

A slice that is a frame of a multi-frame image also has ``frame_number`` (1-based).
``coverage``, ``dropped`` and ``notes`` come from the reading of the series
(:mod:`ich_node.imaging.records`): the images left out, each correction and
irregularity, and, for a negative result on a series whose coverage is incomplete
(a hole above ``series.max_gap_mm``), a note saying the result does not cover it.
``threshold_source`` says where each label's threshold came from: ``bundle`` (the
model card's, chosen on validation data) or ``site`` (``model.thresholds`` of the
node's configuration); ``thresholds_source`` sums them up (``bundle``, ``site`` or
``bundle+site``). Both were added later; findings without them read as ``bundle``.

Slices are in spatial order, inferior to superior. A series-level probability is the
maximum over slices (a bleed on any slice makes the series positive). A series is
positive for a label when that probability reaches the label's threshold; a subtype
is reported positive only when ``any`` is positive too.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pydicom

from ich_node.durable import write_atomic
from ich_node.imaging import CTSeries
from ich_node.imaging.records import Coverage, Dropped
from ich_node.labels import LABELS

NOTICE: Final = "AI result for triage support, not a diagnosis."

#: Where a threshold came from: the model bundle's card, or the site's configuration.
ThresholdSource = Literal["bundle", "site"]
#: How each source is said in the SR, the alerts and the audit.
THRESHOLD_SOURCE_TEXT: Final[dict[str, str]] = {
    "bundle": "model bundle",
    "site": "site configuration (model.thresholds)",
    "bundle+site": (
        "site configuration (model.thresholds) for some labels, model bundle for the rest"
    ),
}


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The per-label thresholds in use and where each came from.

    Attributes
    ----------
    values : dict of str to float
        Label -> threshold in (0, 1]; a label is positive when its series
        probability is at least its threshold.
    sources : dict of str to {"bundle", "site"}
        Label -> where its threshold came from.
    """

    values: dict[str, float]
    sources: dict[str, ThresholdSource]

    @classmethod
    def resolve(
        cls, bundle: Mapping[str, float], site: Mapping[str, float] | None = None
    ) -> Thresholds:
        """The bundle's thresholds, overridden by the site's (``model.thresholds``) per label.

        Raises
        ------
        ValueError
            When ``bundle`` lacks a label of :data:`LABELS`, or ``site`` names an
            unknown label or a value outside (0, 1].
        """
        site = dict(site or {})
        missing = [label for label in LABELS if label not in bundle]
        if missing:
            raise ValueError(f"bundle thresholds lack {missing}")
        for label, value in site.items():
            if label not in LABELS:
                raise ValueError(f"site thresholds: unknown label {label!r}")
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(f"site threshold of {label!r} must be in (0, 1], got {value!r}")
        values = {label: float(site.get(label, bundle[label])) for label in LABELS}
        sources: dict[str, ThresholdSource] = {
            label: "site" if label in site else "bundle" for label in LABELS
        }
        return cls(values, sources)

    @property
    def source(self) -> str:
        """``bundle``, ``site`` or ``bundle+site`` (some labels each)."""
        return summarise_sources(self.sources.values())


def summarise_sources(sources: Any) -> str:
    """``bundle``, ``site`` or ``bundle+site`` for a collection of per-label sources."""
    kinds = set(sources)
    if kinds <= {"bundle"}:
        return "bundle"
    return "site" if kinds == {"site"} else "bundle+site"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model that produced a finding.

    ``stages``: ``("cnn",)`` or ``("cnn", "sequence")`` (the bundle's stages that ran);
    ``tta``: probabilities averaged over the image and its left-right mirror.
    Both were added later; their defaults describe findings written before them.
    """

    name: str
    version: str
    arch: str
    sha256: str
    demo: bool
    stages: tuple[str, ...] = ("cnn",)
    tta: bool = False


@dataclass(frozen=True, slots=True)
class LabelFinding:
    """Series-level result for one label."""

    probability: float
    positive: bool
    threshold: float
    threshold_source: ThresholdSource = "bundle"


@dataclass(frozen=True, slots=True)
class SliceFinding:
    """Per-slice probabilities, keyed by label."""

    sop_instance_uid: str
    position_mm: float
    probabilities: dict[str, float]
    frame_number: int | None = None  # 1-based frame of a multi-frame source image


@dataclass(frozen=True, slots=True)
class OutputTime:
    """When the outputs of a read were made, and the time zone they are written in.

    Attributes
    ----------
    when : datetime.datetime
        Timezone-aware: the outputs' dates and times are ``when`` in its own zone,
        and its UTC offset is their TimezoneOffsetFromUTC (0008,0201).
    zone_from : {"source", "node.timezone", "system"}
        Whose zone: the source study's TimezoneOffsetFromUTC, the configured
        ``node.timezone``, or the system's.
    zone_name : str
        The IANA name of the zone (``node.timezone``, or the system's when known);
        empty for the source's fixed offset.
    """

    when: datetime.datetime
    zone_from: str
    zone_name: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "written": self.when.isoformat(timespec="seconds"),
            "utc_offset": self.when.strftime("%z")[:3] + ":" + self.when.strftime("%z")[3:],
            "zone_from": self.zone_from,
            "zone_name": self.zone_name,
        }

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> OutputTime:
        return cls(
            datetime.datetime.fromisoformat(data["written"]),
            str(data.get("zone_from", "")),
            str(data.get("zone_name", "")),
        )


@dataclass(frozen=True, slots=True)
class SeriesFindings:
    """Everything the classifier says about one series."""

    study_instance_uid: str
    series_instance_uid: str
    model: ModelInfo
    series: dict[str, LabelFinding]
    slices: tuple[SliceFinding, ...]
    coverage: Coverage | None = None
    coverage_complete: bool = True
    dropped: tuple[Dropped, ...] = ()
    notes: tuple[str, ...] = ()
    # Which read of the series this is (1, 2, ...): a later version supersedes the
    # earlier ones (late instances, a changed re-send; see docs/admin.md).
    version: int = 1
    # When the outputs were written and in which zone (findings.json "time").
    time: OutputTime | None = None

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    @property
    def positive_labels(self) -> tuple[str, ...]:
        return tuple(label for label in LABELS if self.series[label].positive)

    @property
    def thresholds(self) -> Thresholds:
        """The thresholds in use for this series and their sources."""
        return Thresholds(
            {label: self.series[label].threshold for label in LABELS},
            {label: self.series[label].threshold_source for label in LABELS},
        )

    @property
    def thresholds_source(self) -> str:
        """``bundle``, ``site`` or ``bundle+site`` (see :class:`Thresholds`)."""
        return self.thresholds.source

    @property
    def notice(self) -> str:
        if self.model.demo:
            return f"{NOTICE} DEMO model trained on synthetic data - not for clinical use."
        return NOTICE

    def slice_probabilities(self) -> np.ndarray:
        """(S, 6) float32 per-slice probabilities in :data:`LABELS` order."""
        return np.array(
            [[s.probabilities[label] for label in LABELS] for s in self.slices], dtype=np.float32
        ).reshape(len(self.slices), len(LABELS))

    def positive_slices(self, label: str) -> tuple[int, ...]:
        """Indices of slices whose probability for ``label`` reaches the threshold."""
        threshold = self.series[label].threshold
        return tuple(i for i, s in enumerate(self.slices) if s.probabilities[label] >= threshold)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "version": self.version,
            "n_slices": self.n_slices,
            "model": {
                "name": self.model.name,
                "version": self.model.version,
                "arch": self.model.arch,
                "sha256": self.model.sha256,
                "demo": self.model.demo,
                "stages": list(self.model.stages),
                "tta": self.model.tta,
            },
            "notice": self.notice,
            "series": {
                label: {
                    "probability": self.series[label].probability,
                    "positive": self.series[label].positive,
                    "threshold": self.series[label].threshold,
                    "threshold_source": self.series[label].threshold_source,
                }
                for label in LABELS
            },
            "thresholds_source": self.thresholds_source,
            "slices": [
                {
                    "sop_instance_uid": s.sop_instance_uid,
                    "position_mm": s.position_mm,
                    "probabilities": {label: s.probabilities[label] for label in LABELS},
                    **({} if s.frame_number is None else {"frame_number": s.frame_number}),
                }
                for s in self.slices
            ],
            "coverage": None
            if self.coverage is None
            else {**self.coverage.to_dict(), "complete": self.coverage_complete},
            "dropped": [d.to_dict() for d in self.dropped],
            "notes": list(self.notes),
            **({} if self.time is None else {"time": self.time.to_dict()}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesFindings:
        return cls(
            study_instance_uid=data["study_instance_uid"],
            series_instance_uid=data["series_instance_uid"],
            model=ModelInfo(
                **{k: v for k, v in data["model"].items() if k != "stages"},
                stages=tuple(data["model"].get("stages", ("cnn",))),
            ),
            series={label: LabelFinding(**data["series"][label]) for label in LABELS},
            slices=tuple(
                SliceFinding(
                    sop_instance_uid=s["sop_instance_uid"],
                    position_mm=float(s["position_mm"]),
                    probabilities={k: float(v) for k, v in s["probabilities"].items()},
                    frame_number=s.get("frame_number"),
                )
                for s in data["slices"]
            ),
            coverage=None if not data.get("coverage") else Coverage.from_dict(data["coverage"]),
            coverage_complete=bool((data.get("coverage") or {}).get("complete", True)),
            dropped=tuple(
                Dropped(d["sop_instance_uid"], None, d["reason"], d.get("frame_number"))
                for d in data.get("dropped", ())
            ),
            notes=tuple(str(n) for n in data.get("notes", ())),
            version=int(data.get("version", 1)),
            time=OutputTime.from_dict(data["time"]) if data.get("time") else None,
        )


def summarise(
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uids: tuple[str, ...],
    positions_mm: tuple[float, ...],
    probabilities: np.ndarray,
    thresholds: Mapping[str, float] | Thresholds,
    model: ModelInfo,
    source: CTSeries | None = None,
) -> SeriesFindings:
    """Build findings from (S, 6) float per-slice probabilities in :data:`LABELS` order.

    ``thresholds``: label -> threshold (all from the bundle), or a :class:`Thresholds`
    that also says which came from the site's configuration.

    ``source``, the series as read, gives the frame numbers, ``coverage``,
    ``dropped`` and ``notes`` (:mod:`ich_node.imaging.records`); a negative result
    on a series whose coverage is incomplete gets a note saying so.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(sop_instance_uids), len(LABELS)):
        raise ValueError(
            f"probabilities must have shape ({len(sop_instance_uids)}, {len(LABELS)}), "
            f"got {probabilities.shape}"
        )
    if not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.resolve(thresholds)
    series: dict[str, LabelFinding] = {}
    any_positive = False
    for j, label in enumerate(LABELS):
        # Rounded once, here, so JSON, SR and heatmaps all show the very same number.
        p = round(float(probabilities[:, j].max()), 6) if len(probabilities) else 0.0
        threshold = thresholds.values[label]
        positive = p >= threshold
        if label == "any":
            any_positive = positive
        else:
            # A subtype is reported only in a series positive for hemorrhage at all:
            # "no hemorrhage, but a subdural" would contradict itself.
            positive = positive and any_positive
        series[label] = LabelFinding(p, positive, threshold, thresholds.sources[label])
    slices = tuple(
        SliceFinding(
            sop_instance_uid=uid,
            position_mm=round(float(pos), 3),
            probabilities={label: round(float(row[j]), 6) for j, label in enumerate(LABELS)},
            frame_number=frame,
        )
        for uid, pos, row, frame in zip(
            sop_instance_uids,
            positions_mm,
            probabilities,
            [s.frame_number for s in source.slices] if source else [None] * len(positions_mm),
            strict=True,
        )
    )
    if source is None:
        return SeriesFindings(study_instance_uid, series_instance_uid, model, series, slices)
    notes = [n.text for n in source.notes]
    incomplete = source.coverage_incomplete
    if incomplete is not None:
        notes.append(f"Coverage incomplete: {incomplete}.")
        if not any_positive:
            notes.append(
                "Negative result on incomplete coverage: it says nothing about the part "
                "of the head that was not imaged."
            )
    return SeriesFindings(
        study_instance_uid,
        series_instance_uid,
        model,
        series,
        slices,
        coverage=source.coverage,
        coverage_complete=incomplete is None,
        dropped=source.dropped,
        notes=tuple(notes),
    )


def write_findings(path: Path, findings: SeriesFindings) -> None:
    """Write ``findings.json`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(findings.to_dict(), indent=2) + "\n").encode())


def read_findings(path: Path) -> SeriesFindings:
    """Read a ``findings.json`` written by :func:`write_findings`."""
    return SeriesFindings.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


@dataclass(frozen=True, slots=True)
class SliceExplanation:
    """The Grad-CAM map of one slice (made in the model stage, :mod:`ich_node.model.explain`).

    Attributes
    ----------
    index : int
        Slice index in series order (``series.slices``).
    labels : tuple of str
        The labels whose logits were explained (in :data:`LABELS` order).
    cam : numpy.ndarray
        (H, W) float32 in [0, 1] at the model input size; 1 is the region that
        raises the explained logits most.
    """

    index: int
    labels: tuple[str, ...]
    cam: np.ndarray


@dataclass(frozen=True, slots=True)
class ExplainedSeries:
    """Everything the results stage encodes for one series: plain data, no model.

    Made by the model stage (:func:`ich_node.explain.explain_series`) and handed
    to :func:`ich_node.results.build.build_results`.

    Attributes
    ----------
    series : CTSeries
        The source series (UIDs, geometry, spatial order).
    findings : SeriesFindings
        The numbers reported (also ``findings.json``).
    hu : numpy.ndarray
        (S, rows, columns) float32 HU of the slices, series order (heatmap background).
    explanations : tuple of SliceExplanation
        The explained slices, in slice order (empty when none were asked for).
    header : pydicom.Dataset
        The first source slice's header without pixel data: the patient, study and
        equipment attributes the outputs copy.
    overlays : dict of int to numpy.ndarray
        Slice index -> (rows, columns, 3) uint8 RGB: the heatmap image of that slice
        (brain window, map blended in where explained), rendered for the whole
        series at once on the model's device (:mod:`ich_node.model.heatmaps`); the
        results stage adds the legend and the text.
    head : numpy.ndarray or None
        (S, rows, columns) bool head region of the series
        (:func:`ich_node.imaging.head_mask`), found when the heatmaps were rendered:
        the heatmaps' colour and the parametric map's values stay inside it. None
        when not found (the results stage finds it if it needs it).
    """

    series: CTSeries
    findings: SeriesFindings
    hu: np.ndarray
    explanations: tuple[SliceExplanation, ...]
    header: pydicom.Dataset
    overlays: dict[int, np.ndarray] = field(default_factory=dict)
    head: np.ndarray | None = None
