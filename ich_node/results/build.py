"""Everything sent back to the PACS for one series: SR, heatmaps, parametric map.

:func:`build_results` renders the heatmap series and encodes the TID 1500 SR and
the parametric map from one :class:`~ich_node.results.findings.ExplainedSeries`:
the same :class:`SeriesFindings` object that ``findings.json`` is written from and
the Grad-CAM maps the model stage made (:func:`ich_node.explain.explain_series`),
so the outputs always agree. Encoding is pure data -> DICOM: this package imports
no torch, no model and no network code (``tests/test_results.py`` checks).

UIDs are derived (PS3.5 B.2, ``2.25.<hash>``) from the source series' instances,
the model's weights checksum and the options: running the same model on the same
images again gives the same UIDs, so a job re-run after a crash replaces its
earlier outputs in the PACS instead of duplicating them.
"""

from __future__ import annotations

import hashlib
import io
import os
import traceback
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import BrokenExecutor, CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import pydicom
import structlog
from pydicom.uid import RE_VALID_UID, ParametricMapStorage, SecondaryCaptureImageStorage

from ich_node.card import ModelCard
from ich_node.durable import fsync_dir, write_atomic
from ich_node.imaging import CTSeries, CTSlice
from ich_node.imaging.records import LossyCompression
from ich_node.labels import LABELS
from ich_node.results.common import (
    CopiedAttributes,
    apply_study,
    mark_lossy,
    output_time,
    stamp_output_time,
    study_attributes,
)
from ich_node.results.findings import ExplainedSeries, OutputTime, SeriesFindings
from ich_node.results.ko import build_key_objects
from ich_node.results.pm import build_parametric_map
from ich_node.results.sc import (
    HeatmapImage,
    PixelTemplate,
    build_heatmap_series,
    heatmap_indices,
    pixel_templates,
    png_bytes,
    render_heatmaps,
    series_head_mask,
    set_heatmap_pixels,
)
from ich_node.results.sr import build_sr, fits_class, relabelled

if TYPE_CHECKING:
    from ich_node.results.reports import ReportProcess

log = structlog.get_logger(__name__)

#: Namespace of the name-based UUIDs behind the output UIDs (fixed forever).
_UID_NAMESPACE: Final = uuid.UUID("5d4cbd6e-2f57-4a3c-9b1e-1c2f0a7e4e11")


class ResultsSkipped(Exception):
    """DICOM results cannot be built for this series; ``reason`` says why.

    Parameters
    ----------
    reason : str
        Why, for logs and the job record (never contains patient data).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ResultsError(Exception):
    """Encoding failed in a way a retry cannot change: the job is parked at once.

    :func:`build_results` is a pure function of its inputs, so an error inside it
    comes back on every attempt. ``reason`` names the exception type and where it
    was raised, never its message (which may quote a header value).

    Parameters
    ----------
    reason : str
        Why, for the log and the job record.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @classmethod
    def from_exception(cls, exc: BaseException) -> ResultsError:
        return cls(f"results could not be encoded: {failure_reason(exc)} (a retry gives the same)")


def failure_reason(exc: BaseException) -> str:
    """One line naming an exception's type and the code that raised it, never its message.

    Messages of pydicom, highdicom and numpy may quote the value they reject
    (PHI, when it comes from a header); the type and place are enough to act on.
    """
    if isinstance(exc, ResultsError | ResultsSkipped):
        return exc.reason
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    where = f"{Path(last.filename).parent.name}/{Path(last.filename).name}:{last.lineno}"
    return f"{type(exc).__name__} in {last.name} ({where})"


@dataclass(frozen=True, slots=True)
class ResultOptions:
    """What to build besides the SR.

    Attributes
    ----------
    heatmaps : {"positive", "all", "none"}
        ``positive``: a heatmap image per explained slice; ``all``: one per slice
        (overlay only where explained); ``none``: no heatmap series.
    negative_top_slices : int
        For a negative series, explain this many slices with the highest ``any``
        probability (0: none).
    parametric_map : bool
        Also encode the Grad-CAM values as a Parametric Map (float32, one frame per
        explained slice).
    """

    heatmaps: Literal["positive", "all", "none"] = "positive"
    negative_top_slices: int = 0
    parametric_map: bool = False
    key_objects: bool = False  # a KOS "Of Interest" of the positive slices (results/ko.py)
    # Other SR classes to encode the same report in (sr.SR_CLASSES keys), for
    # destinations that do not take Comprehensive 3D SR (the sender picks one).
    sr_classes: tuple[str, ...] = ()

    @property
    def needs_explanations(self) -> bool:
        """Whether any output asked for draws Grad-CAM maps."""
        return self.heatmaps != "none" or self.parametric_map

    def __post_init__(self) -> None:
        if self.heatmaps not in ("positive", "all", "none"):
            raise ValueError(f"heatmaps must be 'positive', 'all' or 'none', got {self.heatmaps!r}")
        if not isinstance(self.negative_top_slices, int) or self.negative_top_slices < 0:
            raise ValueError(
                f"negative_top_slices must be an int >= 0, got {self.negative_top_slices!r}"
            )


@dataclass(frozen=True, slots=True)
class ResultSet:
    """The DICOM outputs of one series, and PNG previews of the heatmaps.

    Attributes
    ----------
    sr : pydicom.Dataset
        Comprehensive 3D SR (TID 1500).
    heatmaps : tuple of pydicom.Dataset
        Secondary Capture images in spatial order; InstanceNumber is the slice's
        number (1 = most inferior), as the SR counts.
    parametric_map : pydicom.Dataset or None
        Grad-CAM Parametric Map when asked for and there was something to explain.
    previews : tuple of (str, bytes)
        (file name, PNG bytes), one per heatmap, same order and number.
    """

    sr: pydicom.Dataset
    heatmaps: tuple[pydicom.Dataset, ...]
    parametric_map: pydicom.Dataset | None
    previews: tuple[tuple[str, bytes], ...] = field(default=())
    key_objects: pydicom.Dataset | None = None  # KOS "Of Interest" when asked and positive
    # The other SR classes asked for (ResultOptions.sr_classes) that the report fits:
    # (class name, SOP Instance UID of the SR in that class).
    sr_alternatives: tuple[tuple[str, str], ...] = field(default=())

    def datasets(self) -> tuple[pydicom.Dataset, ...]:
        """All instances in sending order: referenced images first, the SR, then the KOS."""
        pm = (self.parametric_map,) if self.parametric_map is not None else ()
        ko = (self.key_objects,) if self.key_objects is not None else ()
        return (*self.heatmaps, *pm, self.sr, *ko)


def _valid_uid(uid: str) -> bool:
    return bool(uid) and len(uid) <= 64 and RE_VALID_UID.match(uid) is not None


def check_source(series: CTSeries) -> None:
    """Raise :class:`ResultsSkipped` when the source cannot be referenced in DICOM."""
    if not series.uids_valid:
        raise ResultsSkipped(
            "the source's Study, Series or SOP Instance UIDs are not valid DICOM UIDs "
            "(PS3.5 9.1), as in RSNA's anonymised research files; outputs in the same "
            "study could not reference them"
        )
    uids = [series.study_instance_uid, series.series_instance_uid]
    uids += [s.sop_instance_uid for s in series.slices]
    uids += [s.sop_class_uid for s in series.slices]
    bad = [u for u in uids if not _valid_uid(u)]
    if bad:
        raise ResultsSkipped(f"{len(bad)} source UIDs are not valid DICOM UIDs (PS3.5 9.1)")
    if not series.slices:
        raise ResultsSkipped("the series has no slices")


def source_evidence(series: CTSeries, study: pydicom.Dataset) -> list[pydicom.Dataset]:
    """One reference dataset per source slice, the first also holding ``study``.

    highdicom copies the patient and study modules from the first evidence item,
    so it is built from :data:`ich_node.results.common.STUDY_KEYWORDS` only.
    """
    gaps = series.slice_spacing_mm
    # The thickness a frame of the parametric map stands for: the slice spacing.
    thickness = float(sorted(gaps)[len(gaps) // 2]) if gaps else 1.0
    out = []
    for i, s in enumerate(series.slices):
        ds = pydicom.Dataset()
        if i == 0:
            ds.update(study)
        ds.StudyInstanceUID = series.study_instance_uid
        ds.SeriesInstanceUID = series.series_instance_uid
        ds.SOPClassUID = s.sop_class_uid
        ds.SOPInstanceUID = s.sop_instance_uid
        ds.Modality = "CT"
        # Geometry, for the parametric map's frame references.
        ds.Rows, ds.Columns = s.rows, s.columns
        if _valid_uid(series.frame_of_reference_uid or ""):
            ds.FrameOfReferenceUID = series.frame_of_reference_uid
        ds.ImagePositionPatient = list(s.image_position)
        ds.ImageOrientationPatient = list(s.image_orientation)
        ds.PixelSpacing = list(s.pixel_spacing)
        ds.SliceThickness = round(thickness, 4)
        out.append(ds)
    return out


class _Uids:
    """Derived UIDs: the same inputs always give the same UIDs."""

    def __init__(self, series: CTSeries, card: ModelCard, options: ResultOptions, version: int = 1):
        digest = hashlib.sha256()
        for s in series.slices:
            digest.update(s.sop_instance_uid.encode())
        self._key = [
            "ich-node results v1",
            series.series_instance_uid,
            digest.hexdigest(),
            card.sha256,
            repr(options),
        ]
        if version > 1:  # a re-read of the same slices is a new document, not the old one
            self._key.append(f"series version {version}")

    def __call__(self, *role: object) -> str:
        return name_uid(*self._key, *map(str, role))


def name_uid(*parts: str) -> str:
    """A ``2.25.<UUID>`` UID (PS3.5 B.2) from a name-based (SHA-1, version 5) UUID.

    pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and returns
    a random UUID, so the name-based UUID is made here.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0).join(parts)).int}"


def build_results(
    inputs: ExplainedSeries,
    card: ModelCard,
    options: ResultOptions = ResultOptions(),
    *,
    version: int = 1,
    previous_sr: pydicom.Dataset | None = None,
    when: OutputTime | None = None,
    render: Callable[[ExplainedSeries], ExplainedSeries] | None = None,
    previews: bool = True,
    reports: ReportProcess | None = None,
    out_dir: Path | None = None,
) -> ResultSet:
    """Build the SR, the heatmap series and (optionally) the parametric map.

    Parameters
    ----------
    inputs : ExplainedSeries
        From :func:`ich_node.explain.explain_series`: findings, HU, Grad-CAM maps
        (empty when ``options.needs_explanations`` is false) and the source header.
    card : ModelCard
        The model that made the findings (named in every output).
    options : ResultOptions
        What to build besides the SR.
    version : int
        Which read of the series this is (part of the derived UIDs from 2 on).
    previous_sr : pydicom.Dataset, optional
        Study, Series, SOP Class and SOP Instance UIDs of the SR this one
        supersedes; it goes to the Predecessor Documents Sequence (PS3.3 C.17.2).
    when : OutputTime, optional
        When the outputs are made and in which zone (their content, creation and
        series dates and times, and TimezoneOffsetFromUTC); by default now, in the
        source's zone when it has TimezoneOffsetFromUTC, else the system's
        (:func:`ich_node.results.common.output_time`).
    render : callable, optional
        ``inputs`` -> ``inputs`` with its heatmap images and head region (the
        worker passes :func:`ich_node.model.heatmaps.with_heatmap_images`), called
        in this thread while the SR is encoded in another, so that drawing the
        pixels and encoding the report overlap. ``None``: ``inputs`` has them.
    previews : bool
        Also encode the PNG previews (``ResultSet.previews``). The worker leaves
        them for after the job is handed to the senders (:func:`write_previews`).
    reports : ReportProcess, optional
        Encode the SR and the key objects in this process
        (:mod:`ich_node.results.reports`) while this thread draws and encodes the
        images; ``None``, or a process that is gone: in a thread of this process.
        The outputs are the same bytes either way.
    out_dir : pathlib.Path, optional
        Also write the results there, as ``write_results(results, out_dir,
        in_temp_folder=True)`` would (the worker's temporary results folder: each
        file fsynced under its name, the folders once at the end), each heatmap as
        soon as it is encoded, while the SR is still being encoded.

    Returns
    -------
    ResultSet

    Raises
    ------
    ResultsSkipped
        When the source cannot be referenced in DICOM (invalid UIDs).
    ResultsError
        When encoding fails otherwise: the same inputs would fail again.
    """
    try:
        when = output_time(inputs.header) if when is None else when
        return _build(
            inputs,
            card,
            options,
            version=version,
            previous_sr=previous_sr,
            when=when,
            render=render,
            previews=previews,
            reports=reports,
            out_dir=None if out_dir is None else Path(out_dir),
        )
    except (ResultsSkipped, MemoryError):
        raise
    except Exception as exc:
        log.error(
            "results.failed",
            series_uid=inputs.series.series_instance_uid,
            reason=failure_reason(exc),
        )
        raise ResultsError.from_exception(exc) from exc


def _build(
    inputs: ExplainedSeries,
    card: ModelCard,
    options: ResultOptions,
    *,
    version: int,
    previous_sr: pydicom.Dataset | None,
    when: OutputTime,
    render: Callable[[ExplainedSeries], ExplainedSeries] | None,
    previews: bool,
    reports: ReportProcess | None,
    out_dir: Path | None,
) -> ResultSet:
    series = inputs.series
    check_source(series)
    uid = _Uids(series, card, options, version)
    study = study_attributes(
        inputs.header, series.study_instance_uid, series_uid=series.series_instance_uid
    )
    evidence = source_evidence(series, study.plain)
    # Every value read once here (pydicom converts raw values on first access, in
    # place): the threads below then only read the copied attributes.
    for _ in (*study.exact, *study.plain):
        pass
    # Three things run side by side: the SR (and its other classes and the KOS) in
    # the report process (``reports``) or a thread of its own, from the findings and
    # the outputs' UIDs, which are known before any pixel is drawn; in this thread
    # meanwhile, the heatmap pixels and the head region when ``render`` is given
    # (numpy, OpenCV and torch release the GIL for most of it) and then the
    # parametric map; the heatmaps' Secondary Capture images in threads, a share of
    # the images each: built with blank pixels while the pixels are drawn, then the
    # text burned in, the pixels set, the PNG previews and the files.
    indices = heatmap_indices(inputs, options.heatmaps)
    heatmap_series = uid("heatmap series")
    heatmap_uids = {i: uid("heatmap", i) for i in indices}
    pm_ref = _planned_parametric_map(inputs, options, uid)
    report_args = (
        inputs.findings,
        series,
        card,
        options,
        uid,
        evidence,
        heatmap_series,
        heatmap_uids,
        pm_ref,
        previous_sr,
        study,
        when,
    )
    elsewhere = None if reports is None else reports.submit(encode_reports_part10, *report_args)
    with ThreadPoolExecutor(1, thread_name_prefix="sr") as thread:
        reporting = None if elsewhere is not None else thread.submit(_encode_reports, *report_args)
        try:
            encoded, parametric_map = _encode_images(
                inputs,
                card,
                options,
                study,
                evidence,
                heatmap_series,
                heatmap_uids,
                pm_ref,
                previews=previews,
                when=when,
                out_dir=out_dir,
                render=render,
            )
        finally:  # the SR's error, if any, is raised by result() below
            wait([f for f in (elsewhere, reporting) if f is not None])
        if elsewhere is not None:
            try:
                sr, alternatives, key_objects = _read_reports(elsewhere.result())
            except Exception as exc:
                # Encoded here instead: the process died (it is let go), or the inputs
                # or the bytes did not travel. An error of the encoding itself comes
                # back here too, and is then the job's error.
                assert reports is not None
                if isinstance(exc, BrokenExecutor | CancelledError):
                    reports.lost(exc)
                else:
                    log.warning("results.report_process_failed", error=type(exc).__name__)
                sr, alternatives, key_objects = _encode_reports(*report_args)
        else:
            assert reporting is not None
            sr, alternatives, key_objects = reporting.result()
    heatmaps = tuple(ds for ds, _ in encoded)
    pngs = tuple(preview for _, preview in encoded if preview is not None)
    if parametric_map is not None:
        _finish(parametric_map, study, when, series.lossy)
    log.info(
        "results.built",
        series_uid=series.series_instance_uid,
        positive=list(inputs.findings.positive_labels),
        heatmaps=len(heatmaps),
        parametric_map=parametric_map is not None,
        key_objects=key_objects is not None,
    )
    results = ResultSet(
        sr=sr,
        heatmaps=heatmaps,
        parametric_map=parametric_map,
        previews=pngs,
        key_objects=key_objects,
        sr_alternatives=alternatives,
    )
    if out_dir is not None:  # the rest: the map, the SR, the key objects; the folders
        folder = out_dir / "heatmaps"
        early = {path for ds, png in encoded for path, _ in _heatmap_files(folder, ds, png)}
        _write_files(results, out_dir, in_temp_folder=True, written=early)
    return results


def _planned_parametric_map(
    inputs: ExplainedSeries, options: ResultOptions, uid: _Uids
) -> pydicom.Dataset | None:
    """The parametric map's identifying UIDs when one will be built, else ``None``.

    Decided before anything is encoded, so that the SR (encoded meanwhile) can name
    the map in its evidence (PS3.3 C.17.2.2) by these UIDs alone.
    """
    series = inputs.series
    if not (options.parametric_map and inputs.explanations):
        return None
    if any(s.frame_number is not None for s in series.slices):
        # highdicom's Parametric Map takes one multi-frame source with its functional
        # groups, which the evidence references do not carry: not built (SR and
        # heatmaps still reference the frames).
        log.info("results.parametric_map_skipped", reason="multi-frame source image")
        return None
    frame_uid = series.frame_of_reference_uid or ""
    if not _valid_uid(frame_uid):
        # The map's frames are placed in the source's frame of reference (Type 1 in
        # the Frame of Reference module): without a valid one there is no map, and
        # the SR and heatmaps go out as usual.
        log.warning(
            "results.value_dropped",
            series_uid=series.series_instance_uid,
            keyword="FrameOfReferenceUID",
            reason="absent" if not frame_uid else "not a valid UI value",
            action="parametric map left out",
        )
        return None
    ref = pydicom.Dataset()
    ref.StudyInstanceUID = series.study_instance_uid
    ref.SeriesInstanceUID = uid("parametric map series")
    ref.SOPClassUID = ParametricMapStorage
    ref.SOPInstanceUID = uid("parametric map")
    return ref


def _encode_images(
    inputs: ExplainedSeries,
    card: ModelCard,
    options: ResultOptions,
    study: CopiedAttributes,
    evidence: list[pydicom.Dataset],
    heatmap_series: str,
    heatmap_uids: dict[int, str],
    pm_ref: pydicom.Dataset | None,
    *,
    previews: bool,
    when: OutputTime,
    out_dir: Path | None,
    render: Callable[[ExplainedSeries], ExplainedSeries] | None = None,
) -> tuple[list[tuple[pydicom.Dataset, tuple[str, bytes] | None]], pydicom.Dataset | None]:
    """The heatmap images (with their previews) in threads, and the parametric map here.

    The Secondary Capture images are built (highdicom) in threads with blank pixels:
    for images of :data:`AHEAD_MIN_PIXELS` and more from the start, while this
    thread draws the pixels (``render``: the head region and the heatmaps; numpy,
    OpenCV and torch release the GIL for most of it), for smaller ones after; then,
    a share of the images per thread, the text is burned in and each image's pixels
    are set (:func:`ich_node.results.sc.set_heatmap_pixels`).

    Returns (Secondary Capture dataset, (file name, PNG bytes) or None) in
    InstanceNumber order, each finished (:func:`_finish`), and the parametric map
    (or None, not finished). With ``out_dir``, each image's files are written
    there (fsynced under their names) as soon as it is encoded.
    """
    series = inputs.series
    if out_dir is not None and heatmap_uids:
        (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    indices = list(heatmap_uids)
    workers = min(encode_workers(), max(1, len(indices)))
    shares = [indices[k::workers] for k in range(workers)] if indices else []
    labels = {e.index: e.labels for e in inputs.explanations}
    first = series.slices[0] if series.slices else None  # (one series, one matrix)
    rows, columns = (first.rows, first.columns) if first is not None else (0, 0)

    def blank_share(share: list[int]) -> tuple[tuple[pydicom.Dataset, PixelTemplate | None], ...]:
        """The share's images with all but their pixels: what does not wait for them.
        Each with its file serialised around its blank pixels when it is written
        here (:func:`ich_node.results.sc.pixel_templates`)."""
        pixels = np.zeros((rows, columns, 3), np.uint8)  # read only, by highdicom
        blank = [HeatmapImage(index=i, rgb=pixels, labels=labels.get(i, ())) for i in share]

        def finish(ds: pydicom.Dataset, source: CTSlice) -> None:
            # A heatmap keeps its own source slice's compression (PS3.3 C.7.6.1.1.5:
            # derived images copy the source's method and ratio).
            own = source.lossy
            _finish(ds, study, when, own if own is not None else series.lossy)

        datasets = build_heatmap_series(
            series,
            blank,
            card,
            study.plain,
            series_instance_uid=heatmap_series,
            sop_instance_uids=[heatmap_uids[i] for i in share],
            finish=finish,
        )
        templates = pixel_templates(datasets) if out_dir is not None else [None] * len(datasets)
        return tuple(zip(datasets, templates, strict=True))

    def encode_share(
        drawn: ExplainedSeries,
        share: list[int],
        blanks: Future[tuple[tuple[pydicom.Dataset, PixelTemplate | None], ...]],
    ) -> list[tuple[pydicom.Dataset, tuple[str, bytes] | None]]:
        images = render_heatmaps(drawn, card, which=options.heatmaps, indices=share)
        built = blanks.result()
        datasets = [ds for ds, _ in built]
        for ds, image in zip(datasets, images, strict=True):
            set_heatmap_pixels(ds, image.rgb)
        # Named by InstanceNumber, the slice's number in the SR's numbering.
        pngs = [
            (f"{image.index + 1}.png", png_bytes(image.rgb)) if previews else None
            for image in images
        ]
        if out_dir is not None:  # written now, while the SR may still be encoding
            for (ds, template), image, preview in zip(built, images, pngs, strict=True):
                for path, data in _heatmap_files(out_dir / "heatmaps", ds, preview):
                    if data is ds and template is not None:  # serialised already
                        _write_durable(path, template.chunks(np.ascontiguousarray(image.rgb)))
                    else:
                        _write_durable(path, data)
        return list(zip(datasets, pngs, strict=True))

    parametric_map = None
    drawing = render if render is not None and (indices or pm_ref is not None) else None
    with ThreadPoolExecutor(workers, thread_name_prefix="encode") as pool:

        def start_blanks() -> list[
            Future[tuple[tuple[pydicom.Dataset, PixelTemplate | None], ...]]
        ]:
            return [pool.submit(blank_share, share) for share in shares]

        # Large images are built while their pixels are drawn (AHEAD_MIN_PIXELS).
        ahead = drawing is not None and rows * columns >= AHEAD_MIN_PIXELS
        blanks = start_blanks() if ahead else []
        if drawing is not None:
            inputs = drawing(inputs)
        if not ahead:
            blanks = start_blanks()
        encoding = [
            pool.submit(encode_share, inputs, share, blank)
            for share, blank in zip(shares, blanks, strict=True)
        ]
        if pm_ref is not None:
            # The head region (map values stay inside it, as the heatmaps' colour
            # does): the one found when the heatmaps were rendered, else found here.
            head = inputs.head if inputs.head is not None else series_head_mask(inputs)
            parametric_map = build_parametric_map(
                series,
                inputs.explanations,
                card,
                evidence,
                series_instance_uid=str(pm_ref.SeriesInstanceUID),
                sop_instance_uid=str(pm_ref.SOPInstanceUID),
                head=head,
            )
        encoded = sorted(
            (pair for f in encoding for pair in f.result()), key=lambda p: int(p[0].InstanceNumber)
        )
    return encoded, parametric_map


def _finish(
    ds: pydicom.Dataset,
    study: CopiedAttributes,
    when: OutputTime,
    lossy: LossyCompression | None,
    *,
    images: bool = True,
) -> None:
    """The attributes every output gets once it is built."""
    # The exact source values and their character set (see common.py).
    apply_study(ds, study)
    # Made now, in the study's zone (or node.timezone), the zone named.
    stamp_output_time(ds, when)
    # From lossy-compressed images: the images and the SR say so (not the KOS, a
    # list of references), with the method and ratio.
    if images:
        mark_lossy(ds, lossy)
    # General Series module: SeriesDate/Time are optional, but PACS and viewers
    # (Orthanc Explorer among them) group and sort series by them.
    if "SeriesDate" not in ds and "ContentDate" in ds:
        ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime


def _encode_reports(
    findings: SeriesFindings,
    series: CTSeries,
    card: ModelCard,
    options: ResultOptions,
    uid: _Uids,
    evidence: list[pydicom.Dataset],
    heatmap_series: str,
    heatmap_uids: dict[int, str],
    pm_ref: pydicom.Dataset | None,
    previous_sr: pydicom.Dataset | None,
    study: CopiedAttributes,
    when: OutputTime,
) -> tuple[pydicom.Dataset, tuple[tuple[str, str], ...], pydicom.Dataset | None]:
    """The SR (and which other classes it fits) and the key objects, finished.

    Needs only the UIDs of the heatmaps and of the parametric map, not their pixels.
    """
    # The heatmaps as the SR's evidence: their identifying UIDs (PS3.3 C.17.2.2).
    heatmap_refs = []
    for index, sop_uid in heatmap_uids.items():
        ref = pydicom.Dataset()
        ref.StudyInstanceUID = series.study_instance_uid
        ref.SeriesInstanceUID = heatmap_series
        ref.SOPClassUID = SecondaryCaptureImageStorage
        ref.SOPInstanceUID = sop_uid
        ref.InstanceNumber = index + 1
        heatmap_refs.append(ref)
    pm = [pm_ref] if pm_ref is not None else []
    sr = build_sr(
        findings,
        series,
        card,
        [*evidence, *heatmap_refs, *pm],
        series_instance_uid=uid("sr series"),
        sop_instance_uid=uid("sr"),
        device_uid=name_uid("ich-node device", card.name, card.version, card.sha256),
        tracking_uids=[uid("tracking", label) for label in LABELS],
        previous_versions=() if previous_sr is None else (previous_sr,),
    )
    # The same report in the other SR classes asked for, each with its own SOP
    # Instance UID (an instance's UID names one class); written by write_sr_alternatives.
    alternatives = tuple(
        (name, uid("sr", name))
        for name in options.sr_classes
        if name != "comprehensive3d" and fits_class(sr, name)
    )
    key_objects = None
    if options.key_objects:
        key_objects = build_key_objects(
            findings,
            card,
            evidence,
            series_instance_uid=uid("key object series"),
            sop_instance_uid=uid("key objects"),
            device_uid=name_uid("ich-node device", card.name, card.version, card.sha256),
        )
        if key_objects is not None:
            _finish(key_objects, study, when, None, images=False)
    # The SR rests on the images: it says when they were lossy-compressed.
    _finish(sr, study, when, series.lossy)
    return sr, alternatives, key_objects


def _part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode_reports_part10(
    *args: Any,
) -> tuple[bytes, tuple[tuple[str, str], ...], bytes | None]:
    """:func:`_encode_reports` in the report process: the SR and KOS as Part 10 bytes.

    Parameters are :func:`_encode_reports`' (plain records and small datasets,
    pickled to the process); the pixels never travel.
    """
    sr, alternatives, key_objects = _encode_reports(*args)
    return _part10(sr), alternatives, None if key_objects is None else _part10(key_objects)


def _read_reports(
    encoded: tuple[bytes, tuple[tuple[str, str], ...], bytes | None],
) -> tuple[pydicom.Dataset, tuple[tuple[str, str], ...], pydicom.Dataset | None]:
    """The report process's bytes read back as datasets (writing them again gives
    the same bytes: pydicom keeps the encoded values)."""
    sr, alternatives, key_objects = encoded
    read = pydicom.dcmread(io.BytesIO(sr))
    return (
        read,
        alternatives,
        None if key_objects is None else pydicom.dcmread(io.BytesIO(key_objects)),
    )


def _write_atomic(path: Path, data: bytes | pydicom.Dataset) -> None:
    if isinstance(data, bytes):
        write_atomic(path, data)
    else:
        write_atomic(path, lambda handle: data.save_as(handle, enforce_file_format=True))


#: Images of at least this many pixels (256 x 256) have their Secondary Capture
#: images built while their pixels are drawn: drawing them is long numeric work that
#: leaves the GIL free. Smaller ones are drawn first: there the drawing is mostly
#: torch's dispatch, which then waited for the GIL behind the builders (128 px:
#: 0.275 of before drawn first, 0.295-0.308 built ahead; 512 px: 0.308-0.333 and
#: 0.283-0.318; docs/performance.md).
AHEAD_MIN_PIXELS: Final[int] = 256 * 256


def encode_workers() -> int:
    """Threads that encode and write one job's results: the cores, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _write_durable(
    path: Path, data: bytes | pydicom.Dataset | tuple[bytes | memoryview, ...]
) -> None:
    """Write a new file and fsync it (no temporary name: the folder it is in is not
    visible under its final name yet; its entry is made durable by the folder's fsync).
    ``data``: the bytes, a dataset to serialise, or pieces written one after another."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        if isinstance(data, bytes):
            handle.write(data)
        elif isinstance(data, tuple):
            for piece in data:
                handle.write(piece)
        else:
            data.save_as(handle, enforce_file_format=True)
        handle.flush()
        os.fsync(handle.fileno())


def write_results(results: ResultSet, out_dir: Path, *, in_temp_folder: bool = False) -> list[Path]:
    """Write the results as files, durably, several side by side.

    Layout: ``out_dir/sr.dcm``, ``out_dir/heatmaps/<n>.dcm`` with ``<n>.png``
    previews (n = InstanceNumber; when ``results`` holds them, else
    :func:`write_previews` writes them later), ``out_dir/parametric_map.dcm``,
    ``out_dir/key_objects.dcm``.

    Parameters
    ----------
    results : ResultSet
        What to write.
    out_dir : pathlib.Path
        The folder (made if needed).
    in_temp_folder : bool
        ``out_dir`` lies in a folder that is renamed into place only after this
        returns (the worker's results folder): each file is then written and
        fsynced under its own name and each folder fsynced once at the end, half
        the fsyncs of a temporary name per file. Otherwise each file is written
        atomically (temporary file, fsync, rename, folder fsync).

    Returns
    -------
    list of pathlib.Path
        The files written, in that order.
    """
    return _write_files(results, Path(out_dir), in_temp_folder=in_temp_folder)


def _heatmap_files(
    folder: Path, ds: pydicom.Dataset, preview: tuple[str, bytes] | None
) -> list[tuple[Path, bytes | pydicom.Dataset]]:
    """A heatmap's file (named by InstanceNumber, the SR's numbering) and its preview."""
    files: list[tuple[Path, bytes | pydicom.Dataset]] = [
        (folder / f"{int(ds.InstanceNumber)}.dcm", ds)
    ]
    if preview is not None:
        files.append((folder / preview[0], preview[1]))
    return files


def _write_files(
    results: ResultSet,
    out_dir: Path,
    *,
    in_temp_folder: bool,
    written: Collection[Path] = (),
) -> list[Path]:
    """:func:`write_results`, leaving out the files in ``written`` (already there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[tuple[Path, bytes | pydicom.Dataset]] = []
    folders = [out_dir]
    if results.heatmaps:
        folder = out_dir / "heatmaps"
        folder.mkdir(exist_ok=True)
        folders.append(folder)
        # The previews when they were encoded (build_results(previews=True)), one per image.
        pngs: list[tuple[str, bytes] | None] = (
            list(results.previews) if results.previews else [None] * len(results.heatmaps)
        )
        for ds, preview in zip(results.heatmaps, pngs, strict=True):
            files += _heatmap_files(folder, ds, preview)
    if results.parametric_map is not None:
        files.append((out_dir / "parametric_map.dcm", results.parametric_map))
    files.append((out_dir / "sr.dcm", results.sr))
    if results.key_objects is not None:
        files.append((out_dir / "key_objects.dcm", results.key_objects))
    write = _write_durable if in_temp_folder else _write_atomic
    todo = [(path, data) for path, data in files if path not in written]
    # Serialising, PNG bytes and fsync release the GIL for much of their time.
    with ThreadPoolExecutor(encode_workers(), thread_name_prefix="write") as pool:
        for done in [pool.submit(write, path, data) for path, data in todo]:
            done.result()
    if in_temp_folder:
        for folder in folders:
            fsync_dir(folder)
    return [path for path, _ in files]


def preview_png(ds: pydicom.Dataset) -> bytes:
    """The PNG preview of one heatmap: its Secondary Capture pixels, as they are sent.

    Parameters
    ----------
    ds : pydicom.Dataset
        A heatmap image of :attr:`ResultSet.heatmaps` (RGB, 8 bits, interleaved,
        uncompressed, as :func:`ich_node.results.sc.build_heatmap_series` encodes).

    Returns
    -------
    bytes
        PNG file bytes of the (Rows, Columns, 3) uint8 image.
    """
    rgb = np.frombuffer(ds.PixelData, dtype=np.uint8)[: ds.Rows * ds.Columns * 3]
    return png_bytes(rgb.reshape(int(ds.Rows), int(ds.Columns), 3))


def write_previews(results: ResultSet, out_dir: Path) -> list[Path]:
    """Write the heatmaps' PNG previews as ``out_dir/heatmaps/<n>.png``, each atomically.

    For results built with ``previews=False``: the worker writes them after the
    job is handed to the senders, so that the PNG encoding (~8 ms an image at
    512x512) does not delay the SR. The bytes are those :func:`build_results` would
    have made (the same pixels, the same encoder). Previews already present are
    left as they are.

    Parameters
    ----------
    results : ResultSet
        Its heatmaps (Secondary Capture images).
    out_dir : pathlib.Path
        The outbox folder that holds ``heatmaps/``.

    Returns
    -------
    list of pathlib.Path
        The previews written, in InstanceNumber order.

    Raises
    ------
    OSError
        When a preview cannot be written (the ones before it stay).
    """
    folder = Path(out_dir) / "heatmaps"
    named = [(folder / f"{int(ds.InstanceNumber)}.png", ds) for ds in results.heatmaps]
    todo = [(path, ds) for path, ds in named if not path.exists()]
    if not todo:
        return []

    def write(path: Path, ds: pydicom.Dataset) -> None:
        _write_atomic(path, preview_png(ds))

    # zlib and the file writes release the GIL.
    with ThreadPoolExecutor(min(encode_workers(), len(todo)), thread_name_prefix="preview") as pool:
        for done in [pool.submit(write, path, ds) for path, ds in todo]:
            done.result()
    return [path for path, _ in todo]


def write_sr_alternatives(results: ResultSet, out_dir: Path) -> list[Path]:
    """Write the SR in its other classes as ``out_dir/<class>.dcm`` (``sr.SR_CLASSES`` keys).

    Kept beside the outbox, not in it: the sender sends one of them in place of
    ``sr.dcm`` to a destination that does not take Comprehensive 3D SR.
    """
    written: list[Path] = []
    if not results.sr_alternatives:
        return written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, sop_instance_uid in results.sr_alternatives:
        path = out_dir / f"{name}.dcm"
        with relabelled(results.sr, name, sop_instance_uid):
            _write_atomic(path, results.sr)
        written.append(path)
    return written
