"""The Grad-CAM values as a float Parametric Map (PS3.3 A.75), built with highdicom."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.coding import Code

from ich_node.card import ModelCard
from ich_node.imaging import CTSeries
from ich_node.results.common import MANUFACTURER, cam_to_source, contributing_equipment
from ich_node.results.findings import SliceExplanation


def build_parametric_map(
    series: CTSeries,
    explanations: Sequence[SliceExplanation],
    card: ModelCard,
    evidence: Sequence[pydicom.Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9902,
    head: np.ndarray | None = None,
) -> pydicom.Dataset:
    """The Grad-CAM values as a float Parametric Map (PS3.3 A.75), one frame per slice explained.

    Parameters
    ----------
    series : CTSeries
        The source slices' geometry.
    explanations : sequence of SliceExplanation
        Non-empty, in slice order.
    card : ModelCard
        The model.
    evidence : sequence of pydicom.Dataset
        Reference datasets of every source slice (see
        :func:`ich_node.results.build.source_evidence`), the first with the patient and
        study attributes.
    series_instance_uid, sop_instance_uid : str
        New UIDs.
    series_number : int
        SeriesNumber (0020,0011).
    head : numpy.ndarray, optional
        (S, rows, columns) bool head region of the series
        (:func:`ich_node.results.sc.series_head_mask`): values outside it are 0, as
        the heatmaps are not coloured there. None keeps every value.
    """
    if not explanations:
        raise ValueError("explanations must not be empty")
    slices = series.slices
    rows, columns = slices[0].rows, slices[0].columns
    frames = np.stack([cam_to_source(e.cam, rows, columns) for e in explanations]).astype(
        np.float32
    )  # (F, rows, columns) float32 in [0, 1]
    if head is not None:
        frames *= head[[e.index for e in explanations]]
    first = slices[explanations[0].index]
    spacing = series.slice_spacing_mm
    thickness = float(np.median(spacing)) if spacing else 1.0
    # The explained slices as source images; the rest of the series as further sources.
    explained = {e.index for e in explanations}
    sources = [evidence[0]] + [evidence[e.index] for e in explanations if e.index != 0]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="GRADCAM",
        lut_explanation=f"Grad-CAM of {card.name} {card.version}"[:64],
        unit=Code("1", "UCUM", "no units"),
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=frames,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=card.name[:64],
        software_versions=card.version[:64],
        device_serial_number=card.sha256[:16] or "unknown",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=first.pixel_spacing,
            slice_thickness=thickness,
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=first.image_orientation
        ),
        plane_positions=[
            hd.PlanePositionSequence(
                coordinate_system="PATIENT",
                image_position=slices[e.index].image_position,
            )
            for e in explanations
        ],
        content_label="GRADCAM",
        content_description=f"Grad-CAM of {card.name} {card.version}"[:64],
        series_description="ICH AI Grad-CAM map",
        contributing_equipment=[contributing_equipment(card)],
        further_source_images=[ev for i, ev in enumerate(evidence) if i not in explained and i],
    )
    pm.BodyPartExamined = "HEAD"  # unpaired: Laterality (Type 2C) is not required
    return pm
