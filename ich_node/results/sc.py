"""Grad-CAM heatmaps as a Secondary Capture series a radiologist opens in any viewer.

Each image is the source slice at its own resolution in the brain window, with the
Grad-CAM map blended in (yellow to red) only where it is above :data:`CAM_FLOOR` and
inside the head (:func:`ich_node.imaging.head_mask`), a colour legend and burned-in
text: the suspected subtype(s) with their probability on that slice, the model's name
and version, and "AI result - not for diagnosis". Built with
highdicom's :class:`highdicom.sc.SCImage` (PS3.3 A.8.1 Secondary Capture Image IOD),
which writes the modules the IOD needs and validates pixel encodings.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from ich_node.card import ModelCard
from ich_node.imaging import CTSeries, CTSlice, Window, head_mask
from ich_node.results.common import MANUFACTURER, cam_to_source, contributing_equipment
from ich_node.results.findings import ExplainedSeries, SeriesFindings

#: The window the overlay's grey background is shown in.
BRAIN_WINDOW = Window("brain", 40, 80)
SERIES_DESCRIPTION = "ICH AI heatmaps"
NOT_FOR_DIAGNOSIS = "AI result - not for diagnosis"
DEMO_LINE = "DEMO - synthetic training data"

#: Map values below this floor are not coloured at all: there the heatmap is the
#: plain brain-window image. Each Grad-CAM map is scaled to [0, 1] over its slice, so
#: the floor keeps the colour to the upper half of what the model looked at.
CAM_FLOOR = 0.5
#: Opacity of the colour at the map's maximum; it rises linearly from 0 at the floor,
#: so the anatomy stays readable through all but the hottest spot.
ALPHA_MAX = 0.5
#: The part of the turbo scale used above the floor (yellow-green to red): no blue
#: or dark tints over the brain.
_TURBO_RANGE = (0.55, 0.92)


@dataclass(frozen=True, slots=True)
class HeatmapImage:
    """One rendered heatmap and the slice it was drawn on.

    Attributes
    ----------
    index : int
        Slice index in series order.
    rgb : numpy.ndarray
        (rows, columns, 3) uint8 RGB at the source slice's resolution.
    labels : tuple of str
        Labels explained on this slice (empty when no overlay was drawn).
    """

    index: int
    rgb: np.ndarray
    labels: tuple[str, ...]


def turbo(x: np.ndarray) -> np.ndarray:
    """Turbo-like colour map (Mikhailov's polynomial fit of Google's Turbo).

    Parameters
    ----------
    x : numpy.ndarray
        (...) float values in [0, 1] (clipped).

    Returns
    -------
    numpy.ndarray
        (..., 3) float32 RGB in [0, 1].
    """
    t = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    r = 0.13572138 + t * (
        4.61539260 + t * (-42.66032258 + t * (132.13108234 + t * (-152.94239396 + t * 59.28637943)))
    )
    g = 0.09140261 + t * (
        2.19418839 + t * (4.84296658 + t * (-14.18503333 + t * (4.27729857 + t * 2.82956604)))
    )
    b = 0.10667330 + t * (
        12.64194608 + t * (-60.58204836 + t * (110.36276771 + t * (-89.90310912 + t * 27.34824973)))
    )
    return np.clip(np.stack([r, g, b], axis=-1), 0.0, 1.0).astype(np.float32)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _wrap(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: int,
) -> list[str]:
    """Split ``text`` into lines no wider than ``width`` pixels."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    if current:
        lines.append(current)
    return lines


def _colour(level: np.ndarray) -> np.ndarray:
    """(...) level in [0, 1] above the floor -> (..., 3) float32 RGB, as in the legend."""
    low, high = _TURBO_RANGE
    return turbo(low + (high - low) * np.asarray(level))


def render_overlay(
    hu: np.ndarray,
    cam: np.ndarray | None,
    text: Sequence[str],
    *,
    head: np.ndarray | None = None,
) -> np.ndarray:
    """Draw one heatmap image.

    Parameters
    ----------
    hu : numpy.ndarray
        (rows, columns) float32 HU of the source slice.
    cam : numpy.ndarray or None
        (rows, columns) float32 in [0, 1] on the same grid (see
        :func:`cam_to_source`); None draws the brain window and text only.
    text : sequence of str
        Lines burned in at the top left (wrapped to the image width).
    head : numpy.ndarray, optional
        (rows, columns) bool, the head region of this slice
        (:func:`ich_node.imaging.head_mask` of the whole series, which tells the
        head from its holder best); colour is drawn only there. Default: the
        head mask of this slice alone, at 0.5 mm pixels.

    Returns
    -------
    numpy.ndarray
        (rows, columns, 3) uint8 RGB.
    """
    hu = np.asarray(hu, dtype=np.float32)
    rows, columns = hu.shape
    low = BRAIN_WINDOW.center - BRAIN_WINDOW.width / 2
    grey = np.clip((hu - low) / BRAIN_WINDOW.width, 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if cam is not None:
        if cam.shape != hu.shape:
            raise ValueError(f"cam shape {cam.shape} differs from the slice's {hu.shape}")
        if head is None:
            head = head_mask(hu)
        elif head.shape != hu.shape:
            raise ValueError(f"head shape {head.shape} differs from the slice's {hu.shape}")
        level = np.clip((cam - CAM_FLOOR) / (1.0 - CAM_FLOOR), 0.0, 1.0)
        # Colour only the head: the upsampled map spills into the air, the table and
        # the head holder, where it would suggest a finding outside the patient.
        alpha = ALPHA_MAX * level * (cam > CAM_FLOOR) * head
        rgb = (1.0 - alpha[..., None]) * rgb + alpha[..., None] * _colour(level)
    image = Image.fromarray(np.round(rgb * 255.0).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font_size = max(9, min(rows, columns) // 36)
    font = _font(font_size)
    margin = max(2, font_size // 3)
    # Colour legend: a vertical bar at the right edge, 1 at the top.
    bar_w = max(4, columns // 48)
    bar_h = rows // 3
    x0, y0 = columns - bar_w - margin, margin + font_size + 2
    ramp = _colour(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    image.paste(Image.fromarray(np.round(ramp * 255).astype(np.uint8)), (x0, y0))
    draw.rectangle((x0 - 1, y0 - 1, x0 + bar_w, y0 + bar_h), outline=(255, 255, 255))
    for label, y in (("high", y0 - font_size - 1), ("low", y0 + bar_h + 2)):
        w = draw.textlength(label, font=font)
        draw.text((columns - margin - w, y), label, fill=(255, 255, 255), font=font)
    # Burned-in text with a dark outline so it reads on any background.
    y = margin
    width = columns - bar_w - 3 * margin - int(draw.textlength("high", font=font))
    for line in text:
        for part in _wrap(draw, line, font, max(width, 40)):
            draw.text(
                (margin, y),
                part,
                fill=(255, 255, 0),
                font=font,
                stroke_width=1,
                stroke_fill=(0, 0, 0),
            )
            y += font_size + 2
    return np.asarray(image, dtype=np.uint8)


def slice_label(findings: SeriesFindings, index: int) -> str:
    """ "Slice 8 of 28 (inferior to superior), 35.0 mm along the normal" for ``index`` 7."""
    position = findings.slices[index].position_mm
    return (
        f"Slice {index + 1} of {findings.n_slices} (inferior to superior), "
        f"{position:.1f} mm along the normal"
    )


def slice_text(
    findings: SeriesFindings, card: ModelCard, index: int, labels: Sequence[str]
) -> list[str]:
    """The lines burned into the heatmap of slice ``index``.

    The first line names the slice as the SR's summary does: its number counted
    from 1 in the series' spatial order (inferior to superior, the numbering of
    "slices 8 and 11-28" in the SR) and its position along the slice normal in mm
    (``ImagePositionPatient`` · normal, also written as SliceLocation).
    """
    probabilities = findings.slices[index].probabilities
    if labels:
        found = ", ".join(f"{label} p={probabilities[label]:.2f}" for label in labels)
        head = f"Suspected: {found}"
    else:
        head = f"No positive label on this slice (any p={probabilities['any']:.2f})"
    lines = [slice_label(findings, index), head, f"{card.name} {card.version}", NOT_FOR_DIAGNOSIS]
    if card.demo:
        lines.append(DEMO_LINE)
    return lines


def series_head_mask(inputs: ExplainedSeries) -> np.ndarray:
    """The head region of every slice: :func:`ich_node.imaging.head_mask` of the series.

    Returns
    -------
    numpy.ndarray
        (S, rows, columns) bool, on ``inputs.hu``'s grid (the source slices' pixels,
        at the first slice's PixelSpacing).
    """
    spacing = inputs.series.slices[0].pixel_spacing if inputs.series.slices else (0.5, 0.5)
    return head_mask(inputs.hu, spacing)


def render_heatmaps(
    inputs: ExplainedSeries,
    card: ModelCard,
    *,
    which: str = "positive",
    head: np.ndarray | None = None,
) -> tuple[HeatmapImage, ...]:
    """Render the images of the heatmap series, in series order.

    Parameters
    ----------
    inputs : ExplainedSeries
        ``inputs.hu`` (S, rows, columns) float32 HU gives the background,
        ``inputs.explanations`` the maps (from :func:`ich_node.explain.explain`).
    card : ModelCard
        Names the model in the burned-in text.
    which : {"positive", "all", "none"}
        ``positive``: one image per explained slice; ``all``: one per slice
        (slices without an explanation get no overlay); ``none``: no images.
    head : numpy.ndarray, optional
        (S, rows, columns) bool head region of the series (:func:`series_head_mask`);
        computed here when not given and a slice has an overlay.
    """
    if which not in ("positive", "all", "none"):
        raise ValueError(f"which must be 'positive', 'all' or 'none', got {which!r}")
    if which == "none":
        return ()
    by_index = {e.index: e for e in inputs.explanations}
    if head is None and by_index:
        head = series_head_mask(inputs)
    indices = range(len(inputs.hu)) if which == "all" else sorted(by_index)
    out: list[HeatmapImage] = []
    for i in indices:
        hu = inputs.hu[i]
        e = by_index.get(i)
        cam = cam_to_source(e.cam, *hu.shape) if e is not None else None
        labels = e.labels if e is not None else ()
        text = slice_text(inputs.findings, card, i, labels)
        rgb = render_overlay(hu, cam, text, head=head[i] if head is not None else None)
        out.append(HeatmapImage(index=i, rgb=rgb, labels=labels))
    return tuple(out)


def _patient_orientation(src: CTSlice) -> tuple[str, str]:
    """PatientOrientation (0020,0020) letters of the row and column directions.

    PS3.3 C.7.6.1.1.1: the main (largest) component of each direction cosine.
    """
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    out = []
    for cosines in (src.image_orientation[:3], src.image_orientation[3:]):
        axis = int(np.argmax(np.abs(cosines)))
        out.append(letters[axis][0] if cosines[axis] > 0 else letters[axis][1])
    return out[0], out[1]


def build_heatmap_series(
    series: CTSeries,
    images: Sequence[HeatmapImage],
    card: ModelCard,
    study: pydicom.Dataset,
    *,
    series_instance_uid: str,
    sop_instance_uids: Sequence[str],
    series_number: int = 9901,
) -> tuple[pydicom.Dataset, ...]:
    """Encode rendered heatmaps as Secondary Capture images of the source study.

    Parameters
    ----------
    series : CTSeries
        The source slices (UIDs, pixel spacing, orientation).
    images : sequence of HeatmapImage
        From :func:`render_heatmaps`, in series order. InstanceNumber is the
        slice's number in the series (index + 1), the numbering the SR uses.
    card : ModelCard
        The model, named in Manufacturer's Model Name and Contributing Equipment.
    study : pydicom.Dataset
        The patient and study attributes to copy (and nothing else of the
        patient): PatientName, PatientID, PatientBirthDate, PatientSex,
        StudyInstanceUID, StudyDate, StudyTime, StudyID, AccessionNumber,
        ReferringPhysicianName.
    series_instance_uid : str
        New series UID.
    sop_instance_uids : sequence of str
        One new SOP Instance UID per image.
    series_number : int
        SeriesNumber (0020,0011).

    Returns
    -------
    tuple of pydicom.Dataset
        Secondary Capture Image Storage instances.
    """
    if len(sop_instance_uids) != len(images):
        raise ValueError(
            f"sop_instance_uids has {len(sop_instance_uids)} UIDs for {len(images)} images"
        )
    out: list[pydicom.Dataset] = []
    for image, uid in zip(images, sop_instance_uids, strict=True):
        src = series.slices[image.index]
        # The SR's numbering: slice i of the series (spatial order) is image i + 1.
        number = image.index + 1
        sc = hd.sc.SCImage(
            pixel_array=image.rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=str(study.StudyInstanceUID),
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=uid,
            instance_number=number,
            manufacturer=MANUFACTURER,
            patient_id=study.get("PatientID"),
            patient_name=study.get("PatientName"),
            patient_birth_date=study.get("PatientBirthDate"),
            patient_sex=study.get("PatientSex") or None,
            accession_number=study.get("AccessionNumber"),
            study_id=study.get("StudyID"),
            study_date=study.get("StudyDate") or None,
            study_time=study.get("StudyTime") or None,
            referring_physician_name=study.get("ReferringPhysicianName"),
            pixel_spacing=src.pixel_spacing,
            patient_orientation=_patient_orientation(src),
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name=card.name[:64],
            software_versions=card.version[:64],
            contributing_equipment=[contributing_equipment(card)],
        )
        # General Image (PS3.3 C.7.6.1): the text and colours are part of the pixels.
        sc.BurnedInAnnotation = "YES"
        # General Series (PS3.3 C.7.3.1): Laterality is Type 2C, required only for a
        # paired body part; naming the (unpaired) head says why it is absent.
        sc.BodyPartExamined = "HEAD"
        sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        sc.DerivationDescription = (
            f"Grad-CAM of {card.name} {card.version} on the brain window "
            f"(C{BRAIN_WINDOW.center:g}/W{BRAIN_WINDOW.width:g})"
        )[:1024]
        source = pydicom.Dataset()
        source.ReferencedSOPClassUID = src.sop_class_uid
        source.ReferencedSOPInstanceUID = src.sop_instance_uid
        if src.frame_number is not None:  # a frame of an Enhanced CT image (PS3.3 C.7.6.1.1.3)
            source.ReferencedFrameNumber = src.frame_number
        sc.SourceImageSequence = [source]
        # SC Image module (PS3.3 C.8.6.2): the source pixel spacing, so measuring works.
        sc.NominalScannedPixelSpacing = sc.PixelSpacing
        sc.PixelSpacingCalibrationType = "GEOMETRY"
        sc.PixelSpacingCalibrationDescription = "Pixel spacing of the source CT slice"
        sc.ImageComments = ", ".join(image.labels) if image.labels else "no overlay"
        # Image Plane's SliceLocation (PS3.3 C.7.6.2.1.2): the position along the
        # normal, as burned in; the Secondary Capture IOD has no Image Plane module,
        # so viewers that sort or show it find it here.
        sc.SliceLocation = round(src.position_mm, 3)
        out.append(sc)
    return tuple(out)


def png_bytes(rgb: np.ndarray) -> bytes:
    """(rows, columns, 3) uint8 RGB -> PNG file bytes (previews for non-DICOM users)."""
    buffer = io.BytesIO()
    # Fastest zlib level: previews are a convenience, and the default level made them
    # almost half of a study's results time (docs/performance.md).
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
