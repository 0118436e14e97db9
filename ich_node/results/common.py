"""What every output shares: the copied patient and study attributes, the equipment.

Also the geometry that maps a model-input-sized map back onto a source slice,
used by the heatmap images (:mod:`ich_node.results.sc`) and the parametric map
(:mod:`ich_node.results.pm`).
"""

from __future__ import annotations

from typing import Final

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom.sr.coding import Code

from ich_node.card import ModelCard
from ich_node.imaging import CTSeries

MANUFACTURER: Final = "ich-node"
#: PS3.16 CID 7005 "Contributing Equipment Purposes of Reference": DCM 109103.
PROCESSING_ALGORITHM: Final = Code("109103", "DCM", "Processing Algorithm")

#: The patient and study attributes copied from the source into every output
#: (Patient and General Study modules, PS3.3 C.7.1.1 and C.7.2.1); nothing else of
#: the patient is copied.
STUDY_KEYWORDS: Final[tuple[str, ...]] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
#: Equipment of the source, kept so the SR's Contributing Equipment names the scanner.
EQUIPMENT_KEYWORDS: Final[tuple[str, ...]] = ("Manufacturer", "ManufacturerModelName")


def contributing_equipment(card: ModelCard) -> hd.ContributingEquipment:
    """ich-node and its model as the processing algorithm (PS3.3 C.12.1.1.7)."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=PROCESSING_ALGORITHM,
        manufacturer_model_name=card.name[:64],
        software_versions=card.version[:64],
        contribution_description=f"Grad-CAM of {card.display_name}"[:1024],
    )


def cam_to_source(cam: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Map a model-input-sized cam back onto the source slice's pixel grid.

    Undoes :func:`ich_node.imaging.resize`: the slice was centred in a
    ``max(rows, columns)`` square, then resized to the model input size.

    Parameters
    ----------
    cam : numpy.ndarray
        (size, size) float32 in [0, 1].
    rows, columns : int
        Source matrix.

    Returns
    -------
    numpy.ndarray
        (rows, columns) float32 in [0, 1].
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2 or cam.shape[0] != cam.shape[1]:
        raise ValueError(f"cam must have shape (size, size), got {cam.shape}")
    side = max(rows, columns)
    square = np.asarray(Image.fromarray(cam).resize((side, side), Image.Resampling.BILINEAR))
    top, left = (side - rows) // 2, (side - columns) // 2
    return np.clip(square[top : top + rows, left : left + columns], 0.0, 1.0).astype(np.float32)


def source_header(series: CTSeries) -> pydicom.Dataset:
    """The first slice's header, without pixel data (what the outputs copy from).

    Raises
    ------
    OSError, pydicom.errors.InvalidDicomError
        When the file can no longer be read.
    ValueError
        When the series has no slices.
    """
    if not series.slices:
        raise ValueError("series has no slices")
    return pydicom.dcmread(series.slices[0].path, stop_before_pixels=True)


def study_attributes(header: pydicom.Dataset, study_instance_uid: str) -> pydicom.Dataset:
    """The patient and study attributes (:data:`STUDY_KEYWORDS`) of the source.

    Absent Type 2 attributes stay empty; the equipment (:data:`EQUIPMENT_KEYWORDS`)
    is kept where present.
    """
    study = pydicom.Dataset()
    for keyword in STUDY_KEYWORDS:  # all Type 2 or 1: present, empty when unknown
        setattr(study, keyword, header.get(keyword, ""))
    for keyword in EQUIPMENT_KEYWORDS:
        if header.get(keyword):
            setattr(study, keyword, header.get(keyword))
    study.StudyInstanceUID = study_instance_uid
    return study
