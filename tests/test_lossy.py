"""Lossy sources are said: a note in findings.json, a sentence in the SR text, and
LossyImageCompression "01" (with method and ratio when known) on the SR and every
heatmap (PS3.3 C.7.6.1.1.5). Sources compressed in code with DCMTK and pydicom; end
to end through a real listener, worker and sender on both store backends."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000

from ich_node.imaging import read_series
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.backend import open_store
from ich_node.queue.layout import results_dir
from tests.conftest import dcmtk
from tests.pipeline import Pacs, Pipeline, derived, node_config
from training.phantom import PhantomSeries, write_series


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    root = tmp_path_factory.mktemp("lossy_study")
    return write_series(root / "s", seed=51, subtypes=("subdural",), n_slices=10, matrix=64)


def eight_bit(paths: list[Path], out: Path) -> list[Path]:
    """The same head stored in 8 bits (HU = 16 v - 1024), as an 8-bit JPEG needs."""

    def to_8(i: int, ds: pydicom.Dataset) -> None:
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ds.PixelData = np.clip(np.round((hu + 1024) / 16), 0, 255).astype(np.uint8).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleSlope, ds.RescaleIntercept = "16", "-1024"

    return derived(paths, out, to_8)


def dcmtk_each(tool: str, args: list[str], paths: list[Path], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        subprocess.run([dcmtk(tool), *args, str(p), str(out / p.name)], check=True)
    return [out / p.name for p in paths]


def jpeg_baseline(paths: list[Path], out: Path) -> list[Path]:
    return dcmtk_each("dcmcjpeg", ["+eb"], eight_bit(paths, out / "8bit"), out / "jpeg")


def test_lossy_sources_of_each_kind_are_recognised_and_lossless_ones_are_not(
    study: PhantomSeries, tmp_path: Path
) -> None:
    paths = list(study.paths)
    # JPEG baseline 8-bit (DCMTK writes the flag, the method and the ratio).
    jpeg = read_series(jpeg_baseline(paths, tmp_path / "b"))
    assert jpeg.lossy is not None and jpeg.lossy.methods == ("ISO_10918_1",)
    assert "JPEG Baseline" in jpeg.lossy.transfer_syntax
    assert all(s.lossy is not None and s.lossy.ratios for s in jpeg.slices)
    (note,) = [n for n in jpeg.notes if n.kind == "lossy_compression"]
    assert "10 of 10 image(s)" in note.text and "ISO_10918_1" in note.text

    # JPEG 2000 at 30:1 without the flag: the transfer syntax says it.
    def j2k_30(i: int, ds: pydicom.Dataset) -> None:
        ds.compress(JPEG2000, j2k_cr=[30], generate_instance_uid=False)
        for keyword in ("LossyImageCompression", "LossyImageCompressionRatio",
                        "LossyImageCompressionMethod"):  # fmt: skip
            if keyword in ds:
                delattr(ds, keyword)

    j2k = read_series(derived(paths, tmp_path / "j2k", j2k_30))
    assert j2k.lossy is not None and j2k.lossy.methods == ("ISO_15444_1",)

    # JPEG-LS near-lossless.
    near = read_series(dcmtk_each("dcmcjpls", ["--encode-nearlossless"], paths, tmp_path / "nl"))
    assert near.lossy is not None and near.lossy.methods == ("ISO_14495_1",)

    # Decompressed before it came (a lossless syntax), but the header says "01".
    def was_lossy(i: int, ds: pydicom.Dataset) -> None:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = "12.5"

    flagged = read_series(derived(paths, tmp_path / "flag", was_lossy))
    assert flagged.lossy is not None and flagged.lossy.ratios == ("12.5",)
    assert flagged.lossy.transfer_syntax == ""

    # Lossless: as sent, RLE, JPEG-LS lossless, JPEG lossless: nothing said.
    for series in (
        read_series(paths),
        read_series(dcmtk_each("dcmcrle", [], paths, tmp_path / "rle")),
        read_series(dcmtk_each("dcmcjpls", ["--encode-lossless"], paths, tmp_path / "ll")),
        read_series(dcmtk_each("dcmcjpeg", ["+e1"], paths, tmp_path / "jl")),
    ):
        assert series.lossy is None
        assert not [n for n in series.notes if n.kind == "lossy_compression"]


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path) -> Classifier:
    return Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=10)


def test_a_jpeg_baseline_source_says_so_in_findings_sr_and_every_heatmap(
    tmp_path: Path,
    storage_section: Callable[[Path], Any],
    classifier: Classifier,
    study: PhantomSeries,
) -> None:
    files = jpeg_baseline(list(study.paths), tmp_path / "src")
    pacs = Pacs(tmp_path / "pacs")
    pacs.start()
    database = storage_section(tmp_path / "node").database
    config = node_config(tmp_path, database, pacs, results={"heatmaps": "all"})
    store = open_store(config.storage)
    if database is not None:
        store.place_store_id()  # type: ignore[attr-defined]
    node = Pipeline(config, store, classifier, pacs)
    try:
        node.send(files, "-xy")  # proposed and sent as JPEG Baseline (Process 1)
        node.drain()
        (job,) = store.jobs()
        folder = results_dir(config.storage.dir, job.job_id)
        findings = json.loads((folder / "findings.json").read_text())
        received = pacs.received()
    finally:
        node.close()
        store.close()
        pacs.stop()
    spooled_syntax = pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID
    assert spooled_syntax == pydicom.uid.JPEGBaseline8Bit
    notes = [n for n in findings["notes"] if "lossy-compressed" in n]
    assert len(notes) == 1 and "ISO_10918_1" in notes[0]

    sr = next(ds for ds in received if ds.Modality == "SR")
    heatmaps = [ds for ds in received if ds.Modality == "OT"]
    assert len(heatmaps) == 10
    text = " ".join(
        str(item.TextValue)
        for group in sr.ContentSequence
        for item in group.get("ContentSequence", [])
        if item.ValueType == "TEXT"
    )
    assert "lossy-compressed before they reached the node" in text
    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    for ds in [sr, *heatmaps]:
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    for ds in heatmaps:  # each keeps its own source slice's ratio
        source = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert str(ds.LossyImageCompressionRatio) == str(source.LossyImageCompressionRatio)
    for ds in (sr, heatmaps[0]):
        path = tmp_path / f"check_{ds.Modality}.dcm"
        ds.save_as(path)
        run = subprocess.run([dcmtk("dciodvfy"), str(path)], capture_output=True, text=True)
        errors = [x for x in (run.stdout + run.stderr).splitlines() if x.startswith("Error")]
        assert errors == [], errors
