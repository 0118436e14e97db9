"""Heatmap rendering: colour map, geometry of the cam on the source grid, burned-in text."""

from __future__ import annotations

import numpy as np
import pytest

from ich_node.results.common import cam_to_source
from ich_node.results.sc import ALPHA_MAX, CAM_FLOOR, render_overlay, turbo


def test_turbo_runs_blue_to_red() -> None:
    ends = turbo(np.array([0.15, 0.95]))
    assert ends.shape == (2, 3) and ends.dtype == np.float32
    assert ends[0, 2] > ends[0, 0]  # low end is blue-ish
    assert ends[1, 0] > ends[1, 2]  # high end is red-ish


def test_cam_maps_back_onto_a_non_square_slice() -> None:
    # A 100x60 slice was centred in a 100x100 square before resizing to 50x50.
    cam = np.zeros((50, 50), np.float32)
    cam[10:15, 30:35] = 1.0  # square pixels 20-30 (rows), 60-70 (columns)
    out = cam_to_source(cam, 100, 60)
    assert out.shape == (100, 60) and out.dtype == np.float32
    row, col = np.unravel_index(np.argmax(out), out.shape)
    assert 20 <= row <= 30 and 40 <= col <= 50  # columns shift by the 20 px left pad
    with pytest.raises(ValueError, match="cam must have shape"):
        cam_to_source(np.zeros((4, 5), np.float32), 10, 10)


def test_overlay_colours_only_where_the_cam_is_strong() -> None:
    hu = np.full((128, 128), 40.0, np.float32)  # mid grey in the brain window
    cam = np.zeros((128, 128), np.float32)
    cam[80:110, 20:50] = 1.0
    plain = render_overlay(hu, None, [])
    hot = render_overlay(hu, cam, [])
    assert hot.shape == (128, 128, 3) and hot.dtype == np.uint8
    assert np.array_equal(hot[60:75, 20:50], plain[60:75, 20:50])  # cam 0: untouched
    patch = hot[85:105, 25:45].astype(int)
    assert np.ptp(patch, axis=-1).min() > 30  # coloured, no longer grey
    with pytest.raises(ValueError, match="cam shape"):
        render_overlay(hu, cam[:10], [])


def test_text_is_burned_in() -> None:
    hu = np.full((256, 256), -1000.0, np.float32)  # black
    blank = render_overlay(hu, None, [])
    text = render_overlay(hu, None, ["AI result - not for diagnosis"])
    changed = np.any(text != blank, axis=-1)
    rows = np.nonzero(changed.any(axis=1))[0]
    assert changed.sum() > 100 and rows.max() < 40  # text at the top left


def test_overlay_stays_inside_the_head() -> None:
    hu = np.full((128, 128), -1000.0, np.float32)  # air
    hu[32:96, 32:96] = 40.0  # the head
    cam = np.ones((128, 128), np.float32)  # a map that spills everywhere
    hot = render_overlay(hu, cam, [])
    plain = render_overlay(hu, None, [])
    assert np.array_equal(hot[100:128, 0:100], plain[100:128, 0:100])  # air stays black
    assert np.ptp(hot[40:90, 40:90].astype(int), axis=-1).min() > 30  # head coloured


def test_below_the_floor_the_overlay_is_the_plain_brain_window_image() -> None:
    """Rendered pixels: under CAM_FLOOR nothing is tinted; above it colour rises with the map."""
    rng = np.random.default_rng(0)
    hu = rng.uniform(0.0, 80.0, (192, 192)).astype(np.float32)  # brain-like texture
    cam = np.tile(np.linspace(0.0, 1.0, 192, dtype=np.float32), (192, 1))  # 0 left, 1 right
    text = ["Suspected: subdural p=0.91", "model 1.0", "AI result - not for diagnosis"]
    plain = render_overlay(hu, None, text).astype(int)
    hot = render_overlay(hu, cam, text).astype(int)
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
