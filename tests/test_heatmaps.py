"""Heatmap rendering: colour map, geometry of the cam on the source grid, burned-in text."""

from __future__ import annotations

import numpy as np
import pytest

from ich_node.results.common import cam_to_source
from ich_node.results.sc import render_overlay, turbo


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
