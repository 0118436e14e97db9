"""Grad-CAM heatmaps as a Secondary Capture series a radiologist opens in any viewer.

Each image is the source slice at its own resolution in the brain window, with the
Grad-CAM map blended in (yellow to red) only where it is above :data:`CAM_FLOOR` and
inside the head (:func:`ich_node.imaging.head_mask`), a colour legend and burned-in
text: the suspected subtype(s) with their probability on that slice, the model's name
and version, and "AI result - not for diagnosis". The pixels of a series' images are
rendered together in the model stage (:mod:`ich_node.model.heatmaps`, on the model's
device); this module draws the legend and the text and encodes them. Built with
highdicom's :class:`highdicom.sc.SCImage` (PS3.3 A.8.1 Secondary Capture Image IOD),
which writes the modules the IOD needs and validates pixel encodings: one image per
geometry, the series' others copied from it (the same data sets, about a third of
the Python), and their files serialised by pydicom with the elements they share encoded
once (:func:`pixel_templates`).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, cast

import highdicom as hd
import numpy as np
import pydicom
import pydicom.uid
from PIL import Image, ImageDraw, ImageFont
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import VR

from ich_node.card import ModelCard
from ich_node.imaging import CTSeries, CTSlice, Window, head_mask
from ich_node.results.common import MANUFACTURER, contributing_equipment
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
TURBO_RANGE = (0.55, 0.92)
#: Mikhailov's degree-5 polynomial fit of Google's Turbo colour map: red, green and
#: blue coefficients, constant term first (:func:`turbo`; the model stage's batched
#: renderer, :mod:`ich_node.model.heatmaps`, evaluates the same polynomials).
TURBO_COEFFICIENTS: tuple[tuple[float, ...], ...] = (
    (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943),
    (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604),
    (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973),
)


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
    channels = []
    for coefficients in TURBO_COEFFICIENTS:
        value = np.full_like(t, coefficients[-1])
        for c in coefficients[-2::-1]:  # Horner
            value = value * t + c
        channels.append(value)
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


@functools.lru_cache(maxsize=1024)
def _wrapped(text: str, font_size: int, width: int) -> tuple[str, ...]:
    """:func:`_wrap` of a line, once per line, size and width (lines repeat per image)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return tuple(_wrap(draw, text, _font(font_size), width))


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
    low, high = TURBO_RANGE
    return turbo(low + (high - low) * np.asarray(level))


def brain_window_rgb(hu: np.ndarray) -> np.ndarray:
    """(rows, columns) HU -> (rows, columns, 3) uint8 grey in :data:`BRAIN_WINDOW`.

    For images without a map (the alerts' key image); heatmaps come rendered from
    the model stage (:func:`ich_node.model.heatmaps.render_overlays`).
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"hu must have shape (rows, columns), got {hu.shape}")
    low = BRAIN_WINDOW.center - BRAIN_WINDOW.width / 2
    grey = np.round(np.clip((hu - low) / BRAIN_WINDOW.width, 0.0, 1.0) * 255.0)
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)


@functools.lru_cache(maxsize=64)
def _legend_ramp(bar_h: int, bar_w: int) -> np.ndarray:
    """(bar_h, bar_w, 3) uint8 colour legend, 1 at the top (cached: one per image size)."""
    ramp = _colour(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    return np.round(ramp * 255).astype(np.uint8)


@functools.lru_cache(maxsize=1024)
def _text_layer(
    text: str, font_size: int, fill: tuple[int, int, int], stroke: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """One line of text rasterised once: ((h, w, 3) uint8 colour, (h, w) float32 alpha).

    Lines repeat from image to image (the model, the notice, "high", "low"); drawn
    once on a transparent canvas and composited, they cost a copy instead of a
    FreeType rendering per image.
    """
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    stroke_width = 1 if stroke else 0
    # Drawn at (1, 1): the outline may reach one pixel left of and above the origin;
    # the caller pastes the layer at (x - 1, y - 1).
    box = probe.textbbox((1, 1), text, font=font, stroke_width=stroke_width)
    width, height = math.ceil(box[2]) + 2, math.ceil(box[3]) + 2
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(
        (1, 1),
        text,
        fill=(*fill, 255),
        font=font,
        stroke_width=stroke_width,
        stroke_fill=(0, 0, 0, 255),
    )
    rgba = np.asarray(canvas)
    return np.ascontiguousarray(rgba[..., :3]), rgba[..., 3].astype(np.float32) / 255.0


def _paste(image: np.ndarray, layer: tuple[np.ndarray, np.ndarray] | None, x: int, y: int) -> None:
    """Alpha-composite a :func:`_text_layer` onto ``image`` (rows, columns, 3) at (x, y),
    clipped to the image."""
    if layer is None:
        return
    colour, alpha = layer
    dy, dx = max(0, -y), max(0, -x)  # rows and columns cut off at the top and left
    y, x = y + dy, x + dx
    h = min(alpha.shape[0] - dy, image.shape[0] - y)
    w = min(alpha.shape[1] - dx, image.shape[1] - x)
    if h <= 0 or w <= 0:
        return
    a = alpha[dy : dy + h, dx : dx + w, None]
    region = image[y : y + h, x : x + w].astype(np.float32)
    mixed = region * (1.0 - a) + colour[dy : dy + h, dx : dx + w] * a
    image[y : y + h, x : x + w] = np.round(mixed).astype(np.uint8)


def burn_in(rgb: np.ndarray, text: Sequence[str]) -> np.ndarray:
    """Draw the colour legend and burned-in text on a rendered image.

    Parameters
    ----------
    rgb : numpy.ndarray
        (rows, columns, 3) uint8 RGB: a slice in the brain window, with or without
        its map blended in (:func:`ich_node.model.heatmaps.render_overlays`).
    text : sequence of str
        Lines burned in at the top left (wrapped to the image width).

    Returns
    -------
    numpy.ndarray
        (rows, columns, 3) uint8 RGB, a new array.
    """
    image = np.array(rgb, dtype=np.uint8, copy=True)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"rgb must have shape (rows, columns, 3), got {image.shape}")
    rows, columns = image.shape[:2]
    font_size = max(9, min(rows, columns) // 36)
    font = _font(font_size)
    margin = max(2, font_size // 3)
    # Colour legend: a vertical bar at the right edge, 1 at the top, outlined in white.
    bar_w = max(4, columns // 48)
    bar_h = rows // 3
    x0, y0 = columns - bar_w - margin, margin + font_size + 2
    if bar_h > 0 and x0 > 0:
        image[y0 : y0 + bar_h, x0 : x0 + bar_w] = _legend_ramp(bar_h, bar_w)[: rows - y0]
        top, bottom = max(0, y0 - 1), min(rows - 1, y0 + bar_h)
        left, right = x0 - 1, min(columns - 1, x0 + bar_w)
        image[top, left : right + 1] = 255
        image[bottom, left : right + 1] = 255
        image[top : bottom + 1, left] = 255
        image[top : bottom + 1, right] = 255
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # text metrics only
    for label, y in (("high", y0 - font_size - 1), ("low", y0 + bar_h + 2)):
        x = int(columns - margin - draw.textlength(label, font=font))
        _paste(image, _text_layer(label, font_size, (255, 255, 255), False), x - 1, y - 1)
    # Burned-in text with a dark outline so it reads on any background.
    y = margin
    width = columns - bar_w - 3 * margin - int(draw.textlength("high", font=font))
    for line in text:
        for part in _wrapped(line, font_size, max(width, 40)):
            _paste(image, _text_layer(part, font_size, (255, 255, 0), True), margin - 1, y - 1)
            y += font_size + 2
    return image


def render_overlay(hu: np.ndarray, text: Sequence[str]) -> np.ndarray:
    """One slice in the brain window with the legend and ``text`` burned in, no map.

    Parameters
    ----------
    hu : numpy.ndarray
        (rows, columns) float32 HU.
    text : sequence of str
        Lines burned in at the top left.

    Returns
    -------
    numpy.ndarray
        (rows, columns, 3) uint8 RGB.
    """
    return burn_in(brain_window_rgb(hu), text)


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


def heatmap_indices(inputs: ExplainedSeries, which: str = "positive") -> list[int]:
    """The slices the heatmap series shows, in series order (see :func:`render_heatmaps`)."""
    if which not in ("positive", "all", "none"):
        raise ValueError(f"which must be 'positive', 'all' or 'none', got {which!r}")
    if which == "none":
        return []
    if which == "all":
        return list(range(len(inputs.hu)))
    return sorted(e.index for e in inputs.explanations)


def render_heatmaps(
    inputs: ExplainedSeries,
    card: ModelCard,
    *,
    which: str = "positive",
    indices: Sequence[int] | None = None,
) -> tuple[HeatmapImage, ...]:
    """The images of the heatmap series, in series order: rendered pixels plus text.

    Parameters
    ----------
    inputs : ExplainedSeries
        ``inputs.overlays`` holds each image's pixels, rendered in the model stage
        (:func:`ich_node.model.explain.explain_series`, the maps blended in on the
        model's device); ``inputs.explanations`` say which labels each shows.
    card : ModelCard
        Names the model in the burned-in text.
    which : {"positive", "all", "none"}
        ``positive``: one image per explained slice; ``all``: one per slice
        (slices without an explanation get no overlay); ``none``: no images.
    indices : sequence of int, optional
        Only these of the slices ``which`` names (a share of the work, when the
        images are drawn in parallel).

    Raises
    ------
    ValueError
        When an image to draw was not rendered by the model stage (asked for with
        another ``which``).
    """
    chosen = heatmap_indices(inputs, which)
    if indices is not None:
        wanted = set(indices)
        chosen = [i for i in chosen if i in wanted]
    by_index = {e.index: e for e in inputs.explanations}
    out: list[HeatmapImage] = []
    for i in chosen:
        e = by_index.get(i)
        labels = e.labels if e is not None else ()
        base = inputs.overlays.get(i)
        if base is None:
            raise ValueError(
                f"slice {i} has no rendered image: explain_series(heatmaps={which!r}) renders it"
            )
        rgb = burn_in(base, slice_text(inputs.findings, card, i, labels))
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
    finish: Callable[[pydicom.Dataset, CTSlice], None] | None = None,
) -> tuple[pydicom.Dataset, ...]:
    """Encode rendered heatmaps as Secondary Capture images of the source study.

    highdicom builds the first image of each geometry (pixel spacing, patient
    orientation, matrix and source compression); the series' other images of that
    geometry are copies of it with their own SOP Instance UID, Instance Number and
    pixels (:func:`_sibling`), the same data sets highdicom builds for them at about
    a third of the Python. Then each image gets its own source reference, comments
    and slice location.

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
    finish : callable, optional
        ``finish(image, source_slice)``: what the caller adds to every image (the
        study's exact values, the output time, the source's compression), applied
        to each image highdicom builds before it is copied, so that its copies
        have it too. It must depend on the source slice only through its
        compression (:attr:`CTSlice.lossy`).

    Returns
    -------
    tuple of pydicom.Dataset
        Secondary Capture Image Storage instances, each its own: no element,
        sequence or value list is shared between two of them.
    """
    if len(sop_instance_uids) != len(images):
        raise ValueError(
            f"sop_instance_uids has {len(sop_instance_uids)} UIDs for {len(images)} images"
        )
    equipment = contributing_equipment(card)
    built: dict[tuple[object, ...], pydicom.Dataset] = {}
    out: list[pydicom.Dataset] = []
    for image, uid in zip(images, sop_instance_uids, strict=True):
        src = series.slices[image.index]
        # The SR's numbering: slice i of the series (spatial order) is image i + 1.
        number = image.index + 1
        orientation = _patient_orientation(src)
        # What highdicom is given that is not the same for every image of the series.
        geometry = (src.pixel_spacing, orientation, image.rgb.shape, image.rgb.dtype.str, src.lossy)
        first = built.get(geometry)
        sc: pydicom.Dataset
        if first is None:
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
                patient_orientation=orientation,
                series_description=SERIES_DESCRIPTION,
                manufacturer_model_name=card.name[:64],
                software_versions=card.version[:64],
                contributing_equipment=[equipment],
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
            # SC Image module (PS3.3 C.8.6.2): the source pixel spacing, so measuring works.
            sc.NominalScannedPixelSpacing = sc.PixelSpacing
            sc.PixelSpacingCalibrationType = "GEOMETRY"
            sc.PixelSpacingCalibrationDescription = "Pixel spacing of the source CT slice"
            if finish is not None:
                finish(sc, src)
            built[geometry] = sc
        else:
            sc = _sibling(first, sop_instance_uid=uid, instance_number=number, rgb=image.rgb)
        source = pydicom.Dataset()
        source.ReferencedSOPClassUID = src.sop_class_uid
        source.ReferencedSOPInstanceUID = src.sop_instance_uid
        if src.frame_number is not None:  # a frame of an Enhanced CT image (PS3.3 C.7.6.1.1.3)
            source.ReferencedFrameNumber = src.frame_number
        sc.SourceImageSequence = [source]
        sc.ImageComments = ", ".join(image.labels) if image.labels else "no overlay"
        # Image Plane's SliceLocation (PS3.3 C.7.6.2.1.2): the position along the
        # normal, as burned in; the Secondary Capture IOD has no Image Plane module,
        # so viewers that sort or show it find it here.
        sc.SliceLocation = round(src.position_mm, 3)
        out.append(sc)
    return tuple(out)


def _detached(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``ds`` that shares no element, sequence or item with it: each
    element copied (its value, a string or a number, shared), each sequence and
    multi-valued value new. About a third of the cost of building the image again."""
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    for elem in ds:  # (a Dataset iterates over its elements, in tag order)
        copied = copy.copy(elem)
        if elem.VR == VR.SQ:
            copied.value = [_detached(item) for item in cast(Sequence[pydicom.Dataset], elem.value)]
        elif isinstance(elem.value, MultiValue):
            copied.value = list(elem.value)
        elements[elem.tag] = copied
    return pydicom.Dataset(elements)


def _sibling(
    first: pydicom.Dataset, *, sop_instance_uid: str, instance_number: int, rgb: np.ndarray
) -> pydicom.Dataset:
    """The Secondary Capture image highdicom builds for ``rgb`` when it built
    ``first`` for another image of the same geometry and series, copied from it.

    Everything highdicom writes is the same for both but the SOP Instance UID (also
    in the file meta), the Instance Number and the pixels, which are set here (Pixel
    Data as highdicom encodes (rows, columns, 3) uint8 RGB natively: the bytes in C
    order, PS3.3 C.7.6.3.1.3). ContentDate and ContentTime are ``first``'s, made a
    moment earlier. A test compares every element with highdicom's own image.
    """
    ds = _detached(first)
    ds.file_meta = FileMetaDataset(_detached(first.file_meta))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_instance_uid)
    ds.InstanceNumber = instance_number
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    return ds


def set_heatmap_pixels(ds: pydicom.Dataset, rgb: np.ndarray) -> None:
    """Put a heatmap's pixels into its Secondary Capture image, built before they were
    drawn (:func:`build_heatmap_series` with blank images of the same size).

    Pixel Data is then what highdicom writes for these pixels: the native encoding
    of (rows, columns, 3) uint8 RGB, pixel by pixel (PlanarConfiguration 0, PS3.3
    C.7.6.3.1.3). Nothing else of the image depends on the pixel values.

    Raises
    ------
    ValueError
        ``rgb`` is not (Rows, Columns, 3) uint8, or the image's transfer syntax is
        not native (its frames would need encoding).
    """
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        raise ValueError(f"{syntax.name}: only a native encoding takes the pixels as they are")
    want = (int(ds.Rows), int(ds.Columns), 3)
    if rgb.shape != want or rgb.dtype != np.uint8:
        raise ValueError(f"pixels are {rgb.shape} {rgb.dtype}; the image holds {want} uint8")
    ds.PixelData = rgb.tobytes()  # C order: highdicom's encode_frame, native


#: Transfer syntaxes whose Part 10 file holds Pixel Data's value as the bytes
#: themselves (no compression, no deflate, little endian): :func:`pixel_template`.
_VERBATIM_SYNTAXES: Final[frozenset[str]] = frozenset(
    {pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian}
)
_PIXEL_DATA: Final = Tag(0x7FE0, 0x0010)
_PLAIN_TYPES: Final = (str, int, bytes, pydicom.uid.UID)


@dataclass(frozen=True)
class PixelTemplate:
    """A heatmap image's Part 10 file, serialised before its pixels were drawn.

    Attributes
    ----------
    head : bytes
        The file up to Pixel Data's value (preamble, file meta, every element, Pixel
        Data's tag, VR and length).
    length : int
        The value's length, bytes: Rows x Columns x 3.
    tail : bytes
        What follows the value: its padding to an even length (PS3.5 7.1.1), or b"".
    """

    head: bytes
    length: int
    tail: bytes

    def chunks(self, rgb: np.ndarray) -> tuple[bytes, memoryview, bytes]:
        """The file of the image with ``rgb`` as its pixels: what pydicom writes for
        it (``save_as``, byte for byte), in three pieces to write one after another.

        Raises
        ------
        ValueError
            ``rgb`` is not C-contiguous uint8 of :attr:`length` bytes.
        """
        if rgb.dtype != np.uint8 or rgb.nbytes != self.length or not rgb.flags.c_contiguous:
            raise ValueError(
                f"pixels are {rgb.shape} {rgb.dtype}; {self.length} contiguous bytes needed"
            )
        return self.head, rgb.data.cast("B"), self.tail


def _verbatim_pixels(ds: pydicom.Dataset) -> bytes | None:
    """Pixel Data's value when the image's file holds it as these bytes, last: a
    transfer syntax that stores values verbatim (:data:`_VERBATIM_SYNTAXES`) and
    nothing after Pixel Data; None otherwise."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    pixels = ds.get("PixelData")
    if syntax not in _VERBATIM_SYNTAXES or not isinstance(pixels, bytes) or not pixels:
        return None
    if max(ds.keys()) != _PIXEL_DATA:  # (nothing after Pixel Data)
        return None
    return pixels


def pixel_template(ds: pydicom.Dataset) -> PixelTemplate | None:
    """:class:`PixelTemplate` of a heatmap image built with blank pixels, to be
    written once its pixels are drawn without serialising it again (pydicom's
    writer is 1.5 ms of Python per 512 x 512 image, which then no longer waits
    for the pixels: docs/performance.md).

    The file is written by pydicom (``save_as``, ``enforce_file_format``); only the
    Pixel Data value's bytes are later replaced by others of the same length, which
    is the file pydicom writes for the drawn pixels when Pixel Data is the data
    set's last element and the transfer syntax stores values verbatim (Implicit or
    Explicit VR Little Endian). Nothing else of the image depends on the pixel
    values. None otherwise (then write the finished dataset).
    """
    pixels = _verbatim_pixels(ds)
    if pixels is None:
        return None
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    blob = buffer.getvalue()
    length = len(pixels)
    tail = b"\x00" if length % 2 else b""
    end = len(blob) - len(tail)
    return PixelTemplate(head=blob[: end - length], length=length, tail=tail)


def _alike(a: DataElement | RawDataElement, b: DataElement | RawDataElement) -> bool:
    """Whether pydicom encodes ``a`` and ``b`` to the same bytes (in one transfer
    syntax and character set) because they hold the same values: the same tag, VR
    and length form, and values that are one object, or equal plain strings,
    integers or bytes (:func:`_same_value`), each value of a multi-valued element,
    each element of each sequence item."""
    if not isinstance(a, DataElement) or not isinstance(b, DataElement):
        return False
    if a.tag != b.tag or a.VR != b.VR or a.is_undefined_length != b.is_undefined_length:
        return False
    va, vb = a.value, b.value
    if a.VR == VR.SQ:
        return va is vb or (len(va) == len(vb) and all(map(_items_alike, va, vb)))
    if isinstance(va, MultiValue) and isinstance(vb, MultiValue):
        return len(va) == len(vb) and all(map(_same_value, va, vb))
    return _same_value(va, vb)


def _same_value(x: object, y: object) -> bool:
    """One object, or equal values of a type whose encoding is its value alone
    (str, int, bytes, UID). Equal values of other types are not enough: the decimal
    strings "0.50" and "0.5" are equal and written differently, so are a person's
    name read in two character sets, and 0.0 and -0.0."""
    return x is y or (type(x) is type(y) and type(x) in _PLAIN_TYPES and x == y)


def _items_alike(x: pydicom.Dataset, y: pydicom.Dataset) -> bool:
    tags = x.keys()  # (iterating a Dataset gives its elements, not its tags)
    return (
        getattr(x, "is_undefined_length_sequence_item", False)
        == getattr(y, "is_undefined_length_sequence_item", False)
        and tags == y.keys()
        and all(_alike(x.get_item(tag), y.get_item(tag)) for tag in tags)
    )


def _encoded(elem: DataElement, implicit: bool, encoding: str | list[str]) -> bytes:
    """One data element as pydicom's writer encodes it in a little endian data set."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_data_element(fp, elem, encoding)
    return fp.getvalue()


def pixel_templates(datasets: Sequence[pydicom.Dataset]) -> list[PixelTemplate | None]:
    """:func:`pixel_template` of each image of a series built together
    (:func:`build_heatmap_series`), the same bytes for a fraction of the Python.

    A data set is its elements' encodings one after another in tag order (PS3.5
    7.1), so each file here is assembled from the preamble, its File Meta
    Information (encoded for each image, as ``save_as`` does) and its elements, of
    which those that hold the very same values as the first image's (:func:`_alike`:
    all but the few each image has of its own) are encoded once. Each element is
    encoded by pydicom (:func:`pydicom.filewriter.write_data_element`), after its
    ambiguous VRs are resolved as ``save_as`` does. An image in another transfer
    syntax or character set than the first, or whose file meta does not name it,
    gets :func:`pixel_template`'s. For images built here, not read from files.
    """
    out: list[PixelTemplate | None] = []
    first: pydicom.Dataset | None = None
    shared: dict[BaseTag, tuple[DataElement, bytes]] = {}
    pixel_heads: dict[tuple[str, int, bool], bytes] = {}
    for ds in datasets:
        pixels = _verbatim_pixels(ds)
        preamble = getattr(ds, "preamble", None) or bytes(128)
        if (
            pixels is None
            or len(preamble) != 128
            or ds.file_meta.get("MediaStorageSOPClassUID") != ds.get("SOPClassUID")
            or ds.file_meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID")
        ):
            out.append(pixel_template(ds))
            continue
        meta, syntax = ds.file_meta, ds.file_meta.TransferSyntaxUID
        # The text's encoding follows from the character set's value alone.
        encoding = ds.get("SpecificCharacterSet", default_encoding)
        correct_ambiguous_vr(ds, True)  # as save_as does for a data set built in memory
        if first is None:
            first = ds
        elif syntax != first.file_meta.TransferSyntaxUID or encoding != first.get(
            "SpecificCharacterSet", default_encoding
        ):
            out.append(pixel_template(ds))
            continue
        implicit = syntax == pydicom.uid.ImplicitVRLittleEndian
        file = DicomBytesIO()
        file.is_little_endian, file.is_implicit_VR = True, False
        file.write(preamble)
        file.write(b"DICM")
        write_file_meta_info(file, copy.deepcopy(meta), enforce_standard=True)
        for tag in sorted(ds.keys(), key=int):  # (int: the tags' order, in C)
            if tag.element == 0 and tag.group > 6:  # no retired group lengths (PS3.5 7.2)
                continue
            if tag == _PIXEL_DATA:
                break
            elem = ds.get_item(tag)
            known = shared.get(tag)
            if known is not None and _alike(known[0], elem):
                file.write(known[1])
                continue
            data = _encoded(cast(DataElement, elem), implicit, encoding)
            if ds is first:
                shared[tag] = (cast(DataElement, elem), data)
            file.write(data)
        # Pixel Data's tag, VR and length: the same for values of one length.
        length, vr = len(pixels), ds.get_item(_PIXEL_DATA).VR
        tail = b"\x00" if length % 2 else b""
        if (vr, length, implicit) not in pixel_heads:
            blank = _encoded(DataElement(_PIXEL_DATA, vr, bytes(length)), implicit, encoding)
            pixel_heads[vr, length, implicit] = blank[: len(blank) - length - len(tail)]
        out.append(
            PixelTemplate(
                head=file.getvalue() + pixel_heads[vr, length, implicit], length=length, tail=tail
            )
        )
    return out


def png_bytes(rgb: np.ndarray) -> bytes:
    """(rows, columns, 3) uint8 RGB -> PNG file bytes (previews for non-DICOM users)."""
    buffer = io.BytesIO()
    # Fastest zlib level: previews are a convenience, and the default level made them
    # almost half of a study's results time (docs/performance.md).
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def warm_up() -> float:
    """Load what the encoders load on their first use, before any study needs it.

    highdicom reads its tables of the IODs' modules (a JSON file) the first time it
    builds an object: about 0.3 s of Python, and on a worker's first study the
    encode threads each paid it at once, beside the drawing (the results stage of
    that study took 1.5-2 s longer than the next one's; docs/performance.md). One
    throwaway 8x8 Secondary Capture image built here loads them; the image is not
    kept. Called when the worker and its report process start.

    Returns
    -------
    float
        Seconds it took.
    """
    started = time.perf_counter()
    hd.sc.SCImage(
        pixel_array=np.zeros((8, 8, 3), np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=pydicom.uid.generate_uid(),
        series_instance_uid=pydicom.uid.generate_uid(),
        sop_instance_uid=pydicom.uid.generate_uid(),
        series_number=1,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "P"),
    )
    return time.perf_counter() - started
