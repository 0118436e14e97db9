"""The AI result as a DICOM Structured Report: TID 1500 in the IHE AI Results shape.

One Comprehensive 3D SR (PS3.3 A.35.13) per series, built with highdicom::

    Imaging Measurement Report (TID 1500)
      Language, Observer Context: device "ich-node" (TID 1004), Procedure: CT head
      Imaging Measurements
        Measurement Group (TID 1501), one per label (any + five subtypes)
          Tracking Identifier / UID, Finding: <hemorrhage code>
          Algorithm Name / Version / Parameters (TID 4019)
          Probability (DCM 122157) = p {probability}
          <hemorrhage code> = Present | Absent
          Source image (one per slice the finding rests on; positive findings only)
      Qualitative Evaluations
        Comment: plain-text summary ("AI triage result, not a diagnosis. ...")

The probabilities and the Present/Absent values are those of
:class:`ich_node.results.findings.SeriesFindings`, the very object ``findings.json`` is
written from. Codes and their sources are listed in ``docs/results.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Final

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ich_node.card import ModelCard
from ich_node.imaging import CTSeries
from ich_node.labels import LABELS
from ich_node.results.common import MANUFACTURER, contributing_equipment
from ich_node.results.findings import THRESHOLD_SOURCE_TEXT, SeriesFindings, Thresholds

SERIES_DESCRIPTION: Final = "ICH AI results"

#: The SR classes that can hold this report (TID 1500 without 3D coordinates),
#: richest first: Comprehensive 3D SR (PS3.3 A.35.13), Comprehensive SR (A.35.3),
#: Enhanced SR (A.35.2). ``destinations[i].sr_sop_class`` names them.
SR_CLASSES: Final[dict[str, str]] = {
    "comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
    "enhanced": "1.2.840.10008.5.1.4.1.1.88.22",
}
_SR_TYPES: Final = {
    "comprehensive3d": hd.sr.Comprehensive3DSR,
    "comprehensive": hd.sr.ComprehensiveSR,
    "enhanced": hd.sr.EnhancedSR,
}

#: Finding codes per label. SNOMED CT where the concept ID is certain; the private
#: scheme 99ICH (PS3.16 8.1: "99" prefix) where it is not (see docs/results.md).
FINDING_CODES: Final[dict[str, Code]] = {
    "any": Code("1386000", "SCT", "Intracranial hemorrhage"),
    "epidural": Code("EDH", "99ICH", "Epidural hemorrhage"),
    "intraparenchymal": Code("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": Code("IVH", "99ICH", "Intraventricular hemorrhage"),
    "subarachnoid": Code("21454007", "SCT", "Subarachnoid hemorrhage"),
    "subdural": Code("35486000", "SCT", "Subdural hemorrhage"),
}
PRESENT: Final = Code("52101004", "SCT", "Present")
ABSENT: Final = Code("2667000", "SCT", "Absent")
PROBABILITY: Final = Code("122157", "DCM", "Probability")
#: UCUM annotation: a dimensionless probability in [0, 1].
PROBABILITY_UNIT: Final = Code("{probability}", "UCUM", "probability")
#: LOINC 24725-4 "CT Head" (PS3.16 CID 100 lists LOINC procedure codes).
PROCEDURE_CT_HEAD: Final = Code("24725-4", "LN", "CT Head")
QUALITATIVE_EVALUATIONS: Final = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT: Final = Code("121106", "DCM", "Comment")

#: PS3.16 8.1: a private coding scheme is identified in the Coding Scheme
#: Identification Sequence (0008,0110) of the SOP Common module.
_PRIVATE_SCHEME = CodingSchemeIdentificationItem(
    designator="99ICH",
    name="ich-node private codes",
    responsible_organization="ich-node project",
)


def _ranges(indices: Sequence[int]) -> list[str]:
    """1-based slice numbers as compact ranges: [11, 12, 13, 15] -> ['12-14', '16']."""
    numbers = sorted(i + 1 for i in indices)
    parts: list[str] = []
    start = prev = None
    for n in [*numbers, None]:
        if start is None:
            start = prev = n
            continue
        if n is not None and prev is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = n
    return parts


def slices_phrase(indices: Sequence[int]) -> str:
    """Slice indices in words, 1-based: 'slice 12', 'slices 12-14', 'slices 3, 5-7 and 9'."""
    parts = _ranges(indices)
    word = "slice" if len(indices) == 1 else "slices"
    listed = parts[0] if len(parts) < 2 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    return f"{word} {listed}"


def _count(n: int, noun: str) -> str:
    """'1 gap', '0 gaps', '3 images'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary_text(findings: SeriesFindings, card: ModelCard) -> str:
    """The plain-text summary a radiologist reads in any viewer.

    Slice numbers count from 1 in the series' spatial order (inferior to superior);
    the text says so, because the source's InstanceNumbers may count otherwise.
    """
    head = f"AI triage result, not a diagnosis. Model {card.name} {card.version}."
    if findings.series["any"].positive:
        parts = []
        subtypes = [label for label in LABELS[1:] if findings.series[label].positive]
        for label in subtypes or ["any"]:
            name = "hemorrhage (type unspecified)" if label == "any" else label
            p = findings.series[label].probability
            where = slices_phrase(findings.positive_slices(label))
            parts.append(f"{name} (p={p:.2f}) on {where}")
        body = (
            "Suspected intracranial hemorrhage: "
            + "; ".join(parts)
            + f" (slices numbered 1-{findings.n_slices} inferior to superior)."
        )
    else:
        p = findings.series["any"].probability
        t = findings.series["any"].threshold
        body = f"No hemorrhage detected (highest p={p:.2f}, threshold {t:.2f})."
    text = f"{head} {body}{reading_text(findings)} {thresholds_text(findings)}"
    if "sequence" in findings.model.stages:
        text += " Per-slice CNN followed by a sequence model over the series."
    if findings.model.tta:
        text += (
            " Test-time augmentation: each image and its left-right mirror were "
            "classified and averaged."
        )
    if card.demo:
        text += " DEMO model trained on synthetic data - not for clinical use."
    return text


def thresholds_text(findings: SeriesFindings) -> str:
    """The thresholds in use and where they came from, in one sentence.

    E.g. "Thresholds: any 0.50, epidural 0.50, ... (model bundle)." or, with the
    site's operating point for some labels, each value followed by its source.
    """
    values = findings.thresholds
    if values.source != "bundle+site":
        listed = ", ".join(f"{label} {values.values[label]:.2f}" for label in LABELS)
        return f"Thresholds: {listed} ({THRESHOLD_SOURCE_TEXT[values.source]})."
    listed = ", ".join(
        f"{label} {values.values[label]:.2f} ({values.sources[label]})" for label in LABELS
    )
    return f"Thresholds: {listed}; site = site configuration (model.thresholds)."


def reading_text(findings: SeriesFindings) -> str:
    """What the reading of the series did, in words: coverage, images left out, notes.

    The same facts as ``coverage``, ``dropped`` and ``notes`` of ``findings.json``;
    empty when findings carry none (hand-built findings).
    """
    parts: list[str] = []
    cov = findings.coverage
    if cov is not None:
        spacing = (
            ""
            if cov.median_spacing_mm is None
            else f", median spacing {cov.median_spacing_mm:g} mm"
        )
        parts.append(
            f"Read {_count(findings.n_slices, 'slice')} from {cov.z_min_mm:.1f} to "
            f"{cov.z_max_mm:.1f} mm{spacing}, largest gap {cov.largest_gap_mm:g} mm, "
            f"{_count(cov.n_gaps, 'gap')}."
        )
    if findings.dropped:
        shown = "; ".join(f"{d.sop_instance_uid or '?'}: {d.reason}" for d in findings.dropped[:5])
        more = f" (and {len(findings.dropped) - 5} more)" if len(findings.dropped) > 5 else ""
        parts.append(f"{_count(len(findings.dropped), 'image')} left out: {shown}{more}.")
    parts.extend(n if n.endswith(".") else f"{n}." for n in findings.notes)
    return "".join(f" {p}" for p in parts)


def fits_class(sr: pydicom.Dataset, sop_class: str) -> bool:
    """Whether the content tree of ``sr`` fits the IOD of ``sop_class`` (:data:`SR_CLASSES`).

    What tells the three IODs apart is their content: SCOORD3D only in
    Comprehensive 3D SR (PS3.3 A.35.13), and no by-reference relationships in
    Enhanced SR (A.35.2.3.1); their modules are the same (the SR Document General
    and Content modules, C.17.2, C.17.3). These are the checks highdicom's
    ComprehensiveSR and EnhancedSR make on their content.
    """
    if sop_class not in SR_CLASSES:
        raise ValueError(f"sop_class must be one of {sorted(SR_CLASSES)}, got {sop_class!r}")
    for item in content_items(sr.get("ContentSequence", [])):
        if item.get("ValueType") == "SCOORD3D" and sop_class != "comprehensive3d":
            return False
        if "ReferencedContentItemIdentifier" in item and sop_class == "enhanced":
            return False
    return True


def content_items(items: Sequence[pydicom.Dataset]) -> Iterator[pydicom.Dataset]:
    """Every content item of a tree, depth first: ``items`` (a Content Sequence) and
    their descendants (PS3.3 C.17.3)."""
    for item in items:
        yield item
        yield from content_items(item.get("ContentSequence", []))


@contextlib.contextmanager
def relabelled(sr: pydicom.Dataset, sop_class: str, sop_instance_uid: str) -> Iterator[None]:
    """``sr`` as an instance of ``sop_class`` with ``sop_instance_uid`` while the block runs.

    The same highdicom-encoded report in another SR class (checked with
    :func:`fits_class`), without a copy: encoding it again with highdicom's
    ComprehensiveSR and EnhancedSR constructors tripled the SR's cost (1.86 s
    against 0.62 s for a positive 28-slice series, most of it deep copies of the
    content tree; docs/performance.md). Not thread-safe: the one dataset is
    changed in place and restored.

    Raises
    ------
    ValueError
        When the content does not fit ``sop_class``.
    """
    if not fits_class(sr, sop_class):
        raise ValueError(f"this SR's content does not fit {sop_class} (PS3.3 A.35)")
    meta = sr.get("file_meta")
    before = (sr.SOPClassUID, sr.SOPInstanceUID)
    before_meta = None
    if meta is not None and "MediaStorageSOPClassUID" in meta:
        before_meta = (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID)
    try:
        sr.SOPClassUID, sr.SOPInstanceUID = SR_CLASSES[sop_class], sop_instance_uid
        if before_meta is not None:
            meta.MediaStorageSOPClassUID = SR_CLASSES[sop_class]
            meta.MediaStorageSOPInstanceUID = sop_instance_uid
        yield
    finally:
        sr.SOPClassUID, sr.SOPInstanceUID = before
        if before_meta is not None:
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = before_meta


def algorithm_identification(
    card: ModelCard, thresholds: Thresholds | None = None
) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the model's name, version and the parameters that shape its output.

    ``thresholds``: those in use (the site's ``model.thresholds`` may replace the
    bundle's); ``None``: the bundle's. Their source is a parameter of its own.
    """
    thresholds = thresholds or Thresholds.resolve(card.thresholds)
    parameters = [
        f"architecture={card.arch}",
        f"input_size={card.input_size}",
        "windows=" + ";".join(f"{w.name}:{w.center:g}/{w.width:g}" for w in card.windows),
        "thresholds=" + ";".join(f"{label}:{thresholds.values[label]:g}" for label in LABELS),
        "thresholds_source="
        + (
            thresholds.source
            if thresholds.source != "bundle+site"
            else ";".join(f"{label}:{thresholds.sources[label]}" for label in LABELS)
        ),
        f"weights_sha256={card.sha256}",
        "stages=" + "+".join(card.stages),
        f"slice_context={card.context}",
    ]
    if card.demo:
        parameters.append("demo=true (trained on synthetic phantoms)")
    return hd.sr.AlgorithmIdentification(
        name=card.name[:64], version=card.version[:64], parameters=parameters
    )


def measurement_groups(
    findings: SeriesFindings,
    series: CTSeries,
    card: ModelCard,
    *,
    tracking_uids: Sequence[str],
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 group per label, in :data:`LABELS` order."""
    if len(tracking_uids) != len(LABELS):
        raise ValueError(f"tracking_uids must hold {len(LABELS)} UIDs, got {len(tracking_uids)}")
    algorithm = algorithm_identification(card, findings.thresholds)
    groups = []
    for label, uid in zip(LABELS, tracking_uids, strict=True):
        result = findings.series[label]
        code = FINDING_CODES[label]
        sources = None
        if result.positive:
            # One reference per source image; frames of a multi-frame image by number.
            frames: dict[tuple[str, str], list[int]] = {}
            for i in findings.positive_slices(label):
                src = series.slices[i]
                numbers = frames.setdefault((src.sop_class_uid, src.sop_instance_uid), [])
                if src.frame_number is not None:
                    numbers.append(src.frame_number)
            sources = [
                hd.sr.SourceImageForMeasurementGroup(
                    referenced_sop_class_uid=sop_class,
                    referenced_sop_instance_uid=sop_uid,
                    referenced_frame_numbers=numbers or None,
                )
                for (sop_class, sop_uid), numbers in frames.items()
            ]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=f"ICH AI {label}"),
                finding_type=code,
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=PROBABILITY,
                        value=result.probability,
                        unit=PROBABILITY_UNIT,
                    )
                ],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=code, value=PRESENT if result.positive else ABSENT
                    )
                ],
                source_images=sources,
            )
        )
    return groups


#: Content Sequence (0040,A730).
_CONTENT_SEQUENCE: Final = 0x0040A730
_REFERENCE_TYPES: Final = frozenset({"IMAGE", "COMPOSITE"})


def referenced_instances(items: Sequence[pydicom.Dataset]) -> set[str]:
    """The SOP Instance UIDs that IMAGE and COMPOSITE content items of a tree reference.

    ``items``: content items (a Content Sequence), searched with their descendants
    (PS3.3 C.17.3, Referenced SOP Sequence of C.18.3 and C.18.4).
    """
    return {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in content_items(items)
        if item.get("ValueType") in _REFERENCE_TYPES
    }


def _document(
    sr_type: type[hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR],
    root: pydicom.Dataset,
    *,
    evidence: list[pydicom.Dataset],
    **kwargs: object,
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR:
    """highdicom's SR document around the content tree ``root``, without copying the tree.

    highdicom's SR constructor (highdicom 0.28, ``highdicom.sr.sop._SR``) deep-copies
    the content tree and parses the copy again for its ``content`` view, then walks
    the tree twice for the images it references, to check that each is in
    ``evidence``; the document's Content Sequence is the tree itself. For a 40-slice
    positive series that is about 80 ms of the SR's 0.16 s, for a tree highdicom
    built a moment before (docs/performance.md). Here the constructor gets the root
    container without its items (its concept name, template and continuity), the tree
    is then set as the constructor sets it, the ``content`` view is the tree itself,
    and the evidence check is made on the UIDs of :func:`referenced_instances`. The
    dataset is the one highdicom builds from the whole tree, byte for byte
    (``tests/test_sr.py`` compares them).

    Raises
    ------
    TypeError
        When ``root`` is not a highdicom container content item (TID 1500's root).
    ValueError
        When the tree references an instance that is not in ``evidence`` (the
        message is highdicom's).
    """
    if not isinstance(root, hd.sr.ContainerContentItem):
        raise TypeError(f"the root must be a ContainerContentItem, got {type(root).__name__}")
    missing = referenced_instances(root.ContentSequence) - {e.SOPInstanceUID for e in evidence}
    if missing:
        raise ValueError(
            "No evidence was provided for the following SOP instances, which are "
            f'referenced in the document content: "{", ".join(sorted(missing))}"'
        )
    outline = pydicom.Dataset()
    for element in root:
        if element.tag != _CONTENT_SEQUENCE:
            outline.add(element)
    outline.ContentSequence = []  # the constructor's search needs the element
    document = sr_type(evidence=evidence, content=outline, **kwargs)  # type: ignore[arg-type]
    document[_CONTENT_SEQUENCE] = root[_CONTENT_SEQUENCE]
    document._content = hd.sr.ContentSequence([root], is_root=True)
    return document


def build_sr(
    findings: SeriesFindings,
    series: CTSeries,
    card: ModelCard,
    evidence: Sequence[pydicom.Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    device_uid: str,
    tracking_uids: Sequence[str],
    series_number: int = 9900,
    previous_versions: Sequence[pydicom.Dataset] = (),
    sop_class: str = "comprehensive3d",
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR:
    """Build the SR of one series.

    The same content tree in any of :data:`SR_CLASSES`: the report holds no 3D
    coordinates, so highdicom encodes it in Comprehensive SR and Enhanced SR as
    well, for a PACS that does not take Comprehensive 3D SR.

    Parameters
    ----------
    findings : SeriesFindings
        The numbers reported (also written to ``findings.json``).
    series : CTSeries
        The source series (slice SOP Class/Instance UIDs, spatial order).
    card : ModelCard
        The model.
    evidence : sequence of pydicom.Dataset
        Every instance the SR rests on or points to, first the source slices
        (whose first item gives the patient and study attributes, and should hold
        nothing else of the patient), then heatmaps and the parametric map. All go
        to the Current Requested Procedure Evidence Sequence (PS3.3 C.17.2.2).
    series_instance_uid, sop_instance_uid : str
        New UIDs of the SR.
    device_uid : str
        Device Observer UID (TID 1004) of this node and model.
    tracking_uids : sequence of str
        One Tracking Unique Identifier per label.
    series_number : int
        SeriesNumber (0020,0011).
    previous_versions : sequence of pydicom.Dataset
        SRs this one supersedes (their Study, Series, SOP Class and SOP Instance
        UIDs): the Predecessor Documents Sequence (PS3.3 C.17.2).
    sop_class : {"comprehensive3d", "comprehensive", "enhanced"}
        The SR class (:data:`SR_CLASSES`).

    Raises
    ------
    ValueError
        For another ``sop_class``, or when ``evidence`` is empty.
    """
    if sop_class not in _SR_TYPES:
        raise ValueError(f"sop_class must be one of {sorted(_SR_TYPES)}, got {sop_class!r}")
    if not evidence:
        raise ValueError("evidence must hold at least the source slices")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid,
        name=MANUFACTURER,
        manufacturer_name=f"{MANUFACTURER} project",
        model_name=card.name[:64],
        serial_number=card.version[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=PROCEDURE_CT_HEAD,
        imaging_measurements=measurement_groups(
            findings, series, card, tracking_uids=tracking_uids
        ),
    )
    # TID 1500 row 12: "Qualitative Evaluations" container; its TEXT item is the
    # summary any viewer shows, even one that does not understand TID 1501.
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT,
                value=summary_text(findings, card),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    report[0].ContentSequence.append(evaluations)
    return _document(
        _SR_TYPES[sop_class],
        report[0],
        evidence=list(evidence),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # an AI triage result is never the final report
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=card.name[:64],
        software_versions=card.version[:64],
        coding_schemes=[_PRIVATE_SCHEME],
        contributing_equipment=[contributing_equipment(card)],
        previous_versions=list(previous_versions) or None,
    )
