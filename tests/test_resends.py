"""Re-sends: the same content is answered once, whatever its transfer syntax, also after
retention purged it; a real change is read again. Real associations (DCMTK storescu to
the node's listener, the node's sender to DCMTK storescp), a real worker and tiny
model, on both store backends (the same tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from tests.pipeline import Pacs, Pipeline, derived, node_config, reencoded
from training.phantom import PhantomSeries, write_series


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    root = tmp_path_factory.mktemp("resend_study")
    return write_series(root / "s", seed=21, subtypes=("subdural",), n_slices=12, matrix=64)


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path) -> Classifier:
    return Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=12)


@pytest.fixture
def make_node(
    tmp_path: Path, classifier: Classifier, storage_section: Callable[[Path], Any]
) -> Iterator[Callable[..., Pipeline]]:
    made: list[Pipeline] = []
    pacs = Pacs(tmp_path / "pacs")
    pacs.start()

    def make(**sections: dict[str, Any]) -> Pipeline:
        from ich_node.queue.backend import open_store

        database = storage_section(tmp_path / "node").database
        config = node_config(tmp_path, database, pacs, **sections)
        store = open_store(config.storage)
        if database is not None:
            store.place_store_id()  # type: ignore[attr-defined]
        node = Pipeline(config, store, classifier, pacs)
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()
        node.store.close()
    pacs.stop()


def test_the_same_instances_in_implicit_vr_then_rle_give_one_read_and_one_sr(
    make_node: Callable[..., Pipeline], study: PhantomSeries, tmp_path: Path
) -> None:
    node = make_node()
    uid = study.series_instance_uid
    node.send(study.paths)
    node.drain()
    assert len(node.pacs.received("SR")) == 1

    implicit = reencoded(study.paths, tmp_path / "implicit", "dcmconv", "+ti")
    node.send(implicit, "-xi")  # proposed and sent as Implicit VR Little Endian
    node.drain()
    rle = reencoded(study.paths, tmp_path / "rle", "dcmcrle")
    node.send(rle, "-xr")  # RLE Lossless
    node.drain()
    spooled = {
        pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in node.store.instance_paths(uid)
    }
    assert spooled == {pydicom.uid.RLELossless}  # the node holds the last copy received

    assert [j.version for j in node.store.jobs()] == [1]
    assert len(node.pacs.received("SR")) == 1
    assert len(node.store.reads(uid)) == 1
    record = node.store.series(uid)
    assert record is not None and record.state == "queued" and record.version == 1
    assert "the same content as version 1" in record.reason
    assert node.store.reread_counts().changed_resends == 0


def test_a_resend_whose_pixels_or_relevant_attributes_differ_is_read_again(
    make_node: Callable[..., Pipeline], study: PhantomSeries, tmp_path: Path
) -> None:
    node = make_node()
    uid = study.series_instance_uid
    node.send(study.paths)
    node.drain()

    def one_pixel(i: int, ds: pydicom.Dataset) -> None:
        if i == 5:
            arr = ds.pixel_array.copy()
            arr[32, 32] += 40  # 40 HU on one pixel of one slice
            ds.PixelData = arr.tobytes()

    # Re-encoded too, so only the decoded comparison can tell.
    pixel_changed = derived(study.paths, tmp_path / "px", one_pixel)
    changed = reencoded(pixel_changed, tmp_path / "px_rle", "dcmcrle")
    node.send(changed, "-xr")
    node.drain()
    assert [j.version for j in node.store.jobs()] == [1, 2]
    assert node.store.jobs()[1].cause == "12 changed re-sends"

    def renamed(i: int, ds: pydicom.Dataset) -> None:
        ds.PatientName = "CORRECTED^NAME"

    node.send(
        reencoded(
            derived(pixel_changed, tmp_path / "pn", renamed), tmp_path / "pn_i", "dcmconv", "+ti"
        ),
        "-xi",
    )
    node.drain()
    assert [j.version for j in node.store.jobs()] == [1, 2, 3]
    srs = node.pacs.received("SR")
    assert len(srs) == 3
    assert [r.version for r in node.store.reads(uid)] == [1, 2, 3]


def test_an_identical_study_resent_after_its_purge_is_not_read_again(
    make_node: Callable[..., Pipeline], study: PhantomSeries, tmp_path: Path
) -> None:
    node = make_node()
    uid = study.series_instance_uid
    node.send(study.paths)
    node.drain()
    node.purge()
    record = node.store.series(uid)
    assert record is not None and record.state == "purged" and record.n_instances == 0

    for _ in range(3):  # the same bytes, three times; then re-encoded
        node.send(study.paths)
        node.drain()
        node.purge()
    node.send(reencoded(study.paths, tmp_path / "jls", "dcmcjpls", "--encode-lossless"), "-xt")
    node.drain()

    assert [j.version for j in node.store.jobs()] == [1]
    assert len(node.pacs.received("SR")) == 1
    record = node.store.series(uid)
    assert record is not None and record.state == "queued" and record.n_instances == 12
    assert "re-sent after its images were purged, the same content as version 1" in record.reason

    # A real change after the purge is still read.
    node.purge()

    def thicker(i: int, ds: pydicom.Dataset) -> None:
        ds.SliceThickness = "7"

    node.send(derived(study.paths, tmp_path / "thick", thicker))
    node.drain()
    jobs = node.store.jobs()
    assert [j.version for j in jobs] == [1, 2]
    assert jobs[1].cause == "12 instances re-sent after their images were purged"
    assert node.store.series(uid).state == "queued"  # type: ignore[union-attr]
    assert len(node.pacs.received("SR")) == 2


def test_reread_identical_reads_a_purged_study_again_and_its_sr_names_the_predecessor(
    make_node: Callable[..., Pipeline], study: PhantomSeries
) -> None:
    node = make_node(series={"reread_identical": True})
    uid = study.series_instance_uid
    node.send(study.paths)
    node.drain()
    (first,) = node.pacs.received("SR")
    node.purge()
    node.send(study.paths)
    node.drain()

    jobs = node.store.jobs()
    assert [j.version for j in jobs] == [1, 2]
    assert "read again (series.reread_identical)" in jobs[1].cause
    (second,) = [sr for sr in node.pacs.received("SR") if sr.SOPInstanceUID != first.SOPInstanceUID]
    (study_item,) = second.PredecessorDocumentsSequence
    (series_item,) = study_item.ReferencedSeriesSequence
    (sop_item,) = series_item.ReferencedSOPSequence
    assert sop_item.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert series_item.SeriesInstanceUID == first.SeriesInstanceUID
    reads = node.store.reads(uid)
    assert [r.version for r in reads] == [1, 2]
    assert reads[0].content_fingerprint == reads[1].content_fingerprint
