"""Heatmap rendering: the batched device renderer (model stage), the map's geometry on
the source grid, the legend and burned-in text (results stage)."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from ich_node.card import ModelCard
from ich_node.imaging import head_mask, read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import Bundle, load_bundle
from ich_node.model.explain import explain_series
from ich_node.model.heatmaps import maps_to_source, render_overlays, with_heatmap_images
from ich_node.model.heatmaps import turbo as turbo_tensor
from ich_node.model.inference import Classifier
from ich_node.results.build import ResultOptions, write_results
from ich_node.results.build import build_results as encode
from ich_node.results.common import cam_to_source
from ich_node.results.findings import ExplainedSeries
from ich_node.results.sc import ALPHA_MAX, CAM_FLOOR, burn_in, render_overlay, slice_text, turbo
from tests.preprocess_reference import overlay_reference


def _overlay(hu: np.ndarray, cam: np.ndarray | None, text: list[str] | None = None) -> np.ndarray:
    """One image through the node's two stages: rendered on the device, then text."""
    (rgb,) = render_overlays(
        torch.from_numpy(hu)[None],
        None if cam is None else torch.from_numpy(cam)[None],
        [cam is not None],
    )
    return burn_in(rgb, text or [])


def test_turbo_runs_blue_to_red() -> None:
    ends = turbo(np.array([0.15, 0.95]))
    assert ends.shape == (2, 3) and ends.dtype == np.float32
    assert ends[0, 2] > ends[0, 0]  # low end is blue-ish
    assert ends[1, 0] > ends[1, 2]  # high end is red-ish
    x = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(turbo_tensor(torch.from_numpy(x)).numpy(), turbo(x), atol=1e-5)


def test_cam_maps_back_onto_a_non_square_slice() -> None:
    # A 100x60 slice was centred in a 100x100 square before resizing to 50x50.
    cam = np.zeros((50, 50), np.float32)
    cam[10:15, 30:35] = 1.0  # square pixels 20-30 (rows), 60-70 (columns)
    for out in (cam_to_source(cam, 100, 60), maps_to_source(torch.from_numpy(cam)[None], 100, 60)):
        out = np.asarray(out).reshape(100, 60)
        assert out.shape == (100, 60) and out.dtype == np.float32
        row, col = np.unravel_index(np.argmax(out), out.shape)
        assert 20 <= row <= 30 and 40 <= col <= 50  # columns shift by the 20 px left pad
    # The device path and the results stage's (PIL, for the parametric map) agree.
    np.testing.assert_allclose(
        maps_to_source(torch.from_numpy(cam)[None], 100, 60)[0].numpy(),
        cam_to_source(cam, 100, 60),
        atol=2e-3,
    )
    with pytest.raises(ValueError, match="cam must have shape"):
        cam_to_source(np.zeros((4, 5), np.float32), 10, 10)
    with pytest.raises(ValueError, match="maps must have shape"):
        maps_to_source(torch.zeros((1, 4, 5)), 10, 10)


def test_overlay_colours_only_where_the_cam_is_strong() -> None:
    hu = np.full((128, 128), 40.0, np.float32)  # mid grey in the brain window
    cam = np.zeros((128, 128), np.float32)
    cam[80:110, 20:50] = 1.0
    plain = _overlay(hu, None)
    hot = _overlay(hu, cam)
    assert hot.shape == (128, 128, 3) and hot.dtype == np.uint8
    assert np.array_equal(hot[60:75, 20:50], plain[60:75, 20:50])  # cam 0: untouched
    patch = hot[85:105, 25:45].astype(int)
    assert np.ptp(patch, axis=-1).min() > 30  # coloured, no longer grey
    with pytest.raises(ValueError, match="maps"):
        render_overlays(torch.from_numpy(hu)[None], None, [True])


def test_text_is_burned_in() -> None:
    hu = np.full((256, 256), -1000.0, np.float32)  # black
    blank = render_overlay(hu, [])
    text = render_overlay(hu, ["AI result - not for diagnosis"])
    changed = np.any(text != blank, axis=-1)
    rows = np.nonzero(changed.any(axis=1))[0]
    assert changed.sum() > 100 and rows.max() < 40  # text at the top left
    assert np.array_equal(_overlay(hu, None, ["AI result - not for diagnosis"]), text)


def test_overlay_stays_inside_the_head() -> None:
    hu = np.full((128, 128), -1000.0, np.float32)  # air
    hu[32:96, 32:96] = 40.0  # the head
    cam = np.ones((128, 128), np.float32)  # a map that spills everywhere
    hot = _overlay(hu, cam)
    plain = _overlay(hu, None)
    assert np.array_equal(hot[100:128, 0:100], plain[100:128, 0:100])  # air stays black
    assert np.ptp(hot[40:90, 40:90].astype(int), axis=-1).min() > 30  # head coloured


def test_below_the_floor_the_overlay_is_the_plain_brain_window_image() -> None:
    """Rendered pixels: under CAM_FLOOR nothing is tinted; above it colour rises with the map."""
    rng = np.random.default_rng(0)
    hu = rng.uniform(0.0, 80.0, (192, 192)).astype(np.float32)  # brain-like texture
    cam = np.tile(np.linspace(0.0, 1.0, 192, dtype=np.float32), (192, 1))  # 0 left, 1 right
    text = ["Suspected: subdural p=0.91", "model 1.0", "AI result - not for diagnosis"]
    plain = _overlay(hu, None, text).astype(int)
    hot = _overlay(hu, cam, text).astype(int)
    below = cam <= CAM_FLOOR
    assert below.any() and np.array_equal(hot[below], plain[below])
    # Above the floor: the further above, the further from the grey image.
    change = np.abs(hot - plain).sum(axis=-1)[100:180, :].mean(axis=0)  # below the text
    columns = np.nonzero(cam[0] > CAM_FLOOR)[0]
    steps = change[columns[::16]]
    assert np.all(np.diff(steps) > 0), steps
    # The anatomy stays readable at the hottest point: at most ALPHA_MAX of colour.
    grey = plain[150, -1, 0] / 255.0
    top = hot[150, -1] / 255.0
    assert np.all(np.abs(top - grey) <= ALPHA_MAX + 1 / 255)


def test_batched_rendering_gives_the_former_pixels() -> None:
    """A batch of slices rendered at once = each slice drawn alone by the former numpy
    code (one grey level of float32 rounding at most), explained or not."""
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1100.0, 200.0, (5, 96, 64)).astype(np.float32)
    maps = rng.uniform(0.0, 1.0, (3, 24, 24)).astype(np.float32)
    explained = [True, False, True, True, False]
    head = hu > -300.0
    got = render_overlays(
        torch.from_numpy(hu), torch.from_numpy(maps), explained, torch.from_numpy(head)
    )
    m = 0
    for i, has_map in enumerate(explained):
        cam = cam_to_source(maps[m], 96, 64) if has_map else None
        m += has_map
        want = overlay_reference(hu[i], cam, head[i])
        assert got[i].shape == (96, 64, 3) and got[i].dtype == np.uint8
        assert np.abs(got[i].astype(int) - want.astype(int)).max() <= 1, i


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_gpu_renders_the_cpus_pixels() -> None:
    rng = np.random.default_rng(2)
    hu = torch.from_numpy(rng.uniform(-1100.0, 200.0, (4, 512, 512)).astype(np.float32))
    maps = torch.from_numpy(rng.uniform(0.0, 1.0, (4, 64, 64)).astype(np.float32))
    head = hu > -300.0
    cpu = render_overlays(hu, maps, [True] * 4, head)
    gpu = render_overlays(hu.cuda(), maps.cuda(), [True] * 4, head.cuda())
    for a, b in zip(cpu, gpu, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


# ------------------------------------------------------- heatmaps inside the head


def _colour_outside(
    explained: ExplainedSeries, card: ModelCard, tmp_path: Path, *, parametric_map: bool = False
) -> tuple[dict[int, np.ndarray], np.ndarray, list[Path]]:
    """Encode with a map of 1 everywhere (the worst spill), read the SC pixels back.

    Returns the coloured pixels of each heatmap (those that differ from the same
    image rendered without a map, so text and legend do not count), the series'
    head mask and the files written.
    """
    size = card.input_size
    spill = tuple(replace(e, cam=np.ones((size, size), np.float32)) for e in explained.explanations)
    assert spill, "the test needs explained slices"
    # Rendered again with these maps, as the worker's results thread renders them.
    explained = with_heatmap_images(
        replace(explained, explanations=spill, overlays={}, head=None), "positive", "cpu"
    )
    results = encode(explained, card, ResultOptions(parametric_map=parametric_map))
    files = write_results(results, tmp_path)
    head = head_mask(explained.hu, explained.series.slices[0].pixel_spacing)
    coloured = {}
    for path in sorted((tmp_path / "heatmaps").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        i = int(ds.InstanceNumber) - 1
        e = next(e for e in spill if e.index == i)
        plain = render_overlay(explained.hu[i], slice_text(explained.findings, card, i, e.labels))
        coloured[i] = np.any(ds.pixel_array != plain, axis=-1)
    return coloured, head, files


def _explained(tiny_bundle: Path, paths: list[Path]) -> tuple[ExplainedSeries, ModelCard]:
    bundle = load_bundle(tiny_bundle)
    # Every slice positive for any: every slice gets a heatmap.
    card = dataclasses.replace(bundle.card, thresholds=dict.fromkeys(LABELS, 1.01) | {"any": 0.0})
    classifier = Classifier(Bundle(bundle.path, card, bundle.model), device="cpu", batch_size=8)
    prediction = classifier.predict_series(read_series(paths))
    return explain_series(prediction, classifier), card


def test_no_colour_on_the_table_or_head_holder_of_a_phantom(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from training.phantom import SUPPORT, write_series

    phantom = write_series(
        tmp_path / "src", seed=21, subtypes=("subdural",), n_slices=10, matrix=256, support=True
    )
    explained, card = _explained(tiny_bundle, list(phantom.paths))
    coloured, head, files = _colour_outside(explained, card, tmp_path / "out", parametric_map=True)
    tissue = phantom.volume.tissue
    assert len(coloured) == len(tissue)
    brain_seen = 0
    for i, colour in coloured.items():
        assert not (colour & ~head[i]).any(), f"slice {i + 1}: colour outside the head"
        assert not (colour & (tissue[i] == SUPPORT)).any(), f"slice {i + 1}: colour on the support"
        # Inside: every brain pixel below the text and the legend is coloured.
        brain = np.isin(tissue[i], (4, 5, 6, 7, 8, 9)) & (np.arange(256)[:, None] > 128)
        assert colour[brain].all()
        brain_seen += int(brain.sum() > 1000)
    assert brain_seen >= 6
    # The parametric map carries the map only inside the head too.
    pm = pydicom.dcmread(next(p for p in files if p.name == "parametric_map.dcm"))
    z_of = {round(s.image_position[2], 2): i for i, s in enumerate(explained.series.slices)}
    for frame, group in zip(pm.pixel_array, pm.PerFrameFunctionalGroupsSequence, strict=True):
        i = z_of[round(float(group.PlanePositionSequence[0].ImagePositionPatient[2]), 2)]
        assert np.array_equal(frame > 0, head[i]) and frame.max() == pytest.approx(1.0)


def test_heatmap_images_are_the_same_whichever_way_the_slices_are_taken(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """Consecutive slices (every slice of a series) reach the renderer as views of the
    series' HU and head region, others as copies, a read-only HU array as a copy: the
    images are the same each way, and the series' HU are left as they were."""
    import warnings

    from training.phantom import write_series

    phantom = write_series(tmp_path / "src", seed=5, subtypes=("subdural",), n_slices=6, matrix=64)
    explained, _ = _explained(tiny_bundle, list(phantom.paths))
    base = replace(explained, overlays={}, head=None)
    before = base.hu.copy()
    every = with_heatmap_images(base, "positive", "cpu")
    assert sorted(every.overlays) == list(range(6))
    chosen = tuple(e for e in base.explanations if e.index in (0, 2, 5))
    some = with_heatmap_images(replace(base, explanations=chosen), "positive", "cpu")
    assert sorted(some.overlays) == [0, 2, 5]
    frozen = base.hu.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a read-only array it shares
        read_only = with_heatmap_images(replace(base, hu=frozen), "positive", "cpu")
    for i in (0, 2, 5):
        assert np.array_equal(some.overlays[i], every.overlays[i]), i
    for i in range(6):
        assert np.array_equal(read_only.overlays[i], every.overlays[i]), i
    assert np.array_equal(base.hu, before)
    assert every.head is not None and np.array_equal(every.head, some.head)


def test_small_slices_are_drawn_on_one_thread_and_the_settings_come_back() -> None:
    """Below 256 x 256 pixels torch (this thread) and OpenCV draw sequentially; their
    thread settings are restored after, also after an error; larger slices keep them."""
    import cv2

    from ich_node.model.heatmaps import ONE_THREAD_BELOW_PIXELS, _drawing_threads

    before = (torch.get_num_threads(), cv2.getNumThreads())
    with _drawing_threads(128 * 128):
        small = (torch.get_num_threads(), cv2.getNumThreads())
    assert small == (1, 1)
    assert (torch.get_num_threads(), cv2.getNumThreads()) == before
    with pytest.raises(ValueError, match="drawing failed"), _drawing_threads(96 * 64):
        raise ValueError("drawing failed")
    assert (torch.get_num_threads(), cv2.getNumThreads()) == before
    with _drawing_threads(ONE_THREAD_BELOW_PIXELS):
        large = (torch.get_num_threads(), cv2.getNumThreads())
    assert large == before


def test_no_colour_outside_the_head_of_the_real_ge_series(
    real_ct: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    """The GE head CT lies in a head holder (two strips beside the head, about +350 HU)."""
    from scipy import ndimage

    folder = real_ct / "neurolabusc+dcm_qa_ct" / "In" / "GE"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    explained, card = _explained(tiny_bundle, sorted(folder.glob("*.dcm")))
    coloured, head, _ = _colour_outside(explained, card, tmp_path)
    assert len(coloured) == 28
    # Independent of the mask: the holder is what is dense (plastic and bone are above
    # +250 HU, skin and ears below) but apart from the head in the series' projection:
    # the two strips, which touch the ears on some slices.
    dense = explained.hu > 250
    labels, _ = ndimage.label(dense.max(axis=0))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    holder = dense & ((labels > 0) & (labels != sizes.argmax()))[None]
    assert (holder.sum(axis=(1, 2)) > 300).all()  # the strips are on every slice
    for i, colour in coloured.items():
        assert not (colour & ~head[i]).any(), f"slice {i + 1}: colour outside the head"
        assert not (colour & holder[i]).any(), f"slice {i + 1}: colour on the holder"
        assert colour[head[i]].mean() > 0.9  # the head itself is coloured


def test_the_cpus_blend_of_the_coloured_pixels_alone_equals_blending_every_pixel() -> None:
    """The CPU blends only the pixels that get colour (gathered and scattered by
    index); blending every pixel, as on a GPU, gives the same bytes, with maps on
    some slices of a chunk, on all, or on none."""
    from ich_node.model.heatmaps import BRAIN_WINDOW, _blend, _render

    rng = np.random.default_rng(3)
    hu = torch.from_numpy(rng.uniform(-1100.0, 200.0, (6, 80, 72)).astype(np.float32))
    head = hu > -300.0
    low = BRAIN_WINDOW.center - BRAIN_WINDOW.width / 2
    grey = ((hu - low) / BRAIN_WINDOW.width).clamp(0.0, 1.0)
    for explained in ([True] * 6, [False, True, False, True, True, False]):
        maps = torch.from_numpy(rng.uniform(0.0, 1.0, (sum(explained), 16, 16)).astype(np.float32))
        got = render_overlays(hu, maps, explained, head)
        cam = torch.zeros_like(hu)
        cam[torch.as_tensor(explained)] = maps_to_source(maps, 80, 72)
        every = _blend(grey, cam, (cam > CAM_FLOOR) & head)
        assert torch.equal(_render(hu, cam, head), every)
        assert all(np.array_equal(g, e) for g, e in zip(got, every.numpy(), strict=True))
    none = render_overlays(hu, None, [False] * 6)
    assert all(
        np.array_equal(n, e)
        for n, e in zip(none, _blend(grey, grey * 0, head).numpy(), strict=True)
    )
