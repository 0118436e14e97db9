"""Key Object Selection document: the positive slices, flagged "Of Interest".

A Key Object Selection (KOS, PS3.3 A.35.4) titled (113000, DCM, "Of Interest")
lists the source slices the model finds positive for ``any``; many PACS show it
as key images or as a marker on the worklist. Built with highdicom
(:class:`highdicom.ko.KeyObjectSelectionDocument`), observed by this node and
model as a device (TID 2010 / TID 1004), with the notice in its description.
Sent with the SR when ``results.key_objects`` is true.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from ich_node.card import ModelCard
from ich_node.results.common import MANUFACTURER, contributing_equipment
from ich_node.results.findings import SeriesFindings

#: SeriesNumber of the KOS (SR 9900, heatmaps 9901, parametric map 9902).
SERIES_NUMBER: Final = 9903
SERIES_DESCRIPTION: Final = "ICH AI key images"
#: Longest Key Object Description (0040,A160 is UT in TID 2010, kept short for viewers).
_MAX_DESCRIPTION: Final = 1024


def key_slices(findings: SeriesFindings) -> tuple[int, ...]:
    """Indices (series order) of the slices positive for ``any`` in a positive series."""
    if not findings.series["any"].positive:
        return ()
    return findings.positive_slices("any")


def build_key_objects(
    findings: SeriesFindings,
    card: ModelCard,
    evidence: Sequence[pydicom.Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    device_uid: str,
    series_number: int = SERIES_NUMBER,
) -> pydicom.Dataset | None:
    """The KOS of the positive slices, or ``None`` when no slice is positive.

    Parameters
    ----------
    evidence : sequence of pydicom.Dataset
        One reference per source slice, series order
        (:func:`ich_node.results.build.source_evidence`); the first holds the
        patient and study attributes, which highdicom copies.
    device_uid : str
        Device Observer UID (TID 1004), the SR's.

    Returns
    -------
    pydicom.Dataset or None
        Key Object Selection Document Storage (1.2.840.10008.5.1.4.1.1.88.59).
    """
    indices = key_slices(findings)
    if not indices:
        return None
    # One reference per SOP instance (a multi-frame source is referenced once).
    referenced: list[pydicom.Dataset] = []
    seen: set[str] = set()
    for i in indices:
        ref = evidence[i]
        if ref.SOPInstanceUID in seen:
            continue
        seen.add(str(ref.SOPInstanceUID))
        item = pydicom.Dataset()
        item.update(evidence[0] if not referenced else pydicom.Dataset())
        # Rows and Columns make highdicom reference an IMAGE (TID 2010), not a COMPOSITE.
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID",
                        "Modality", "Rows", "Columns"):  # fmt: skip
            setattr(item, keyword, ref.get(keyword))
        referenced.append(item)
    labels = ", ".join(findings.positive_labels) or "none"
    description = (
        f"{findings.notice} {card.name} {card.version}: {len(indices)} slices positive "
        f"for intracranial hemorrhage (series positive for {labels})."
    )[:_MAX_DESCRIPTION]
    device = hd.sr.DeviceObserverIdentifyingAttributes(  # as the SR names its observer
        uid=device_uid,
        name=MANUFACTURER,
        manufacturer_name=f"{MANUFACTURER} project",
        model_name=card.name[:64],
        serial_number=card.version[:64],
    )
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=referenced,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        ),
        description=description,
    )
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        contributing_equipment=[contributing_equipment(card)],
    )
    ko.SeriesDescription = SERIES_DESCRIPTION  # how PACS lists the series
    return ko
