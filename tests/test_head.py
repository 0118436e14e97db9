"""The head region (ich_node.imaging.head): the patient without table and head holder."""

from __future__ import annotations

import numpy as np
import pytest

from ich_node.imaging import head_mask
from training.phantom import (
    AIR,
    BONE,
    CSF_VENTRICLE,
    DIPLOE,
    EXTRA_AXIAL,
    SCALP,
    SUPPORT,
    make_volume,
)

#: Tissue codes inside the skull, where a bleed can be.
INTRACRANIAL = tuple(range(4, EXTRA_AXIAL + 1))


def _distance_mm(mask: np.ndarray, spacing: float) -> np.ndarray:
    """(S, H, W) in-plane distance (mm) of every pixel to ``mask`` of its slice."""
    from scipy import ndimage

    return np.stack([ndimage.distance_transform_edt(~m) * spacing for m in mask])


@pytest.mark.parametrize(("matrix", "tilt"), [(512, 0.0), (256, 18.5)])
def test_a_phantom_on_its_holder_and_table(matrix: int, tilt: float) -> None:
    vol = make_volume(
        np.random.default_rng(4),
        subtypes=("subdural", "intraparenchymal"),
        n_slices=12,
        matrix=matrix,
        tilt_deg=tilt,
        support=True,
    )
    support = vol.tissue == SUPPORT
    # The phantom really lies on something: cradle on every slice, table in the image.
    assert (support.sum(axis=(1, 2)) > 100).all()
    assert (vol.hu >= 150).any(axis=2).any(axis=0)[-matrix // 10 :].any()  # table rows
    mask = head_mask(vol.hu, vol.pixel_spacing_mm)
    assert mask.shape == vol.hu.shape and mask.dtype == bool
    assert not (mask & support).any()
    # Everything inside the skull, and the skull, is head; so is almost all the scalp.
    inside = np.isin(vol.tissue, (*INTRACRANIAL, BONE, DIPLOE))
    assert mask[inside].all()
    assert mask[vol.tissue == SCALP].mean() > 0.98
    for blood in vol.masks.values():
        assert mask[blood].all()
    assert not mask[(vol.tissue == AIR) & (vol.hu < -500)].any()


def test_a_head_lying_on_its_holder_without_a_cushion() -> None:
    """The holder touches the scalp: it is still not head, contact included."""
    vol = make_volume(
        np.random.default_rng(5),
        subtypes=("epidural",),
        n_slices=12,
        matrix=256,
        support=True,
        support_gap_mm=0.0,
    )
    support = vol.tissue == SUPPORT
    patient = (vol.tissue != AIR) & ~support
    distance = _distance_mm(patient, vol.pixel_spacing_mm)
    assert (support & (distance < vol.pixel_spacing_mm * 1.5)).sum() > 500  # they touch
    mask = head_mask(vol.hu, vol.pixel_spacing_mm)
    assert not (mask & support).any()
    assert mask[np.isin(vol.tissue, (*INTRACRANIAL, BONE, DIPLOE))].all()
    assert mask[vol.tissue == SCALP].mean() > 0.97  # less only the contact's rim


def test_a_holder_touching_the_ear_is_not_head() -> None:
    """A thin dense strip beside the head that an ear (soft tissue) touches, as on the GE series."""
    hu = np.full((6, 128, 128), -1000.0, np.float32)
    yy, xx = np.ogrid[:128, :128]
    head = (yy - 64) ** 2 / 45**2 + (xx - 60) ** 2 / 38**2 < 1
    skull = head & ((yy - 64) ** 2 / 40**2 + (xx - 60) ** 2 / 33**2 >= 1)
    hu[:, head] = 40.0
    hu[:, skull & ((yy - 64) ** 2 / 42**2 + (xx - 60) ** 2 / 35**2 < 1)] = 1200.0
    hu[:, 55:75, 98:112] = 30.0  # the ear: out from the scalp to the strip
    hu[:, 20:110, 112:115] = 350.0  # the holder strip, 3 px (3 mm at 1 mm pixels)
    mask = head_mask(hu, 1.0)
    assert not mask[:, :, 112:].any()
    assert mask[:, head].all()


def test_bone_under_a_thin_scalp_stays_head() -> None:
    """The largest dense piece of a slice is never a support, even where it reaches the air."""
    hu = np.full((4, 128, 128), -1000.0, np.float32)
    yy, xx = np.ogrid[:128, :128]
    r2 = (yy - 64) ** 2 + (xx - 64) ** 2
    hu[:, r2 < 50**2] = 1200.0  # skull, with no scalp at all
    hu[:, r2 < 44**2] = 35.0  # brain
    mask = head_mask(hu, 1.0)
    assert mask[:, r2 < 50**2].all()


def test_the_head_is_the_largest_body_even_where_a_slice_shows_more_of_something_else() -> None:
    """At the vertex a slice holds a small cap of head beside a thick support: 3-D decides."""
    vol = make_volume(np.random.default_rng(6), n_slices=12, matrix=256, support=True)
    hu = vol.hu.astype(np.float32)
    patient = (vol.tissue != AIR) & (vol.tissue != SUPPORT)
    # A thick block (a headrest pad, 22 mm: no opening removes it) in the corner of
    # every slice, and the top slice cut down to a cap of 10 mm radius.
    hu[:, :25, :25] = 100.0
    block = np.zeros(hu.shape, bool)
    block[:, :25, :25] = True
    top = len(hu) - 1
    rows, columns = np.nonzero(patient[top])
    yy, xx = np.ogrid[: hu.shape[1], : hu.shape[2]]
    radius = 10.0 / vol.pixel_spacing_mm
    cap = patient[top] & ((yy - rows.mean()) ** 2 + (xx - columns.mean()) ** 2 < radius**2)
    hu[top][patient[top] & ~cap] = -1000.0
    assert 0 < cap.sum() < block[top].sum()
    mask = head_mask(hu, vol.pixel_spacing_mm)
    assert mask[top][cap].all() and not mask[block].any()


def test_one_slice_nothing_and_bad_input() -> None:
    hu = np.full((64, 64), -1000.0, np.float32)
    assert not head_mask(hu).any()  # air only
    hu[16:48, 16:48] = 40.0
    hu[2:62, 60:62] = 300.0  # a thin strip apart: a holder
    mask = head_mask(hu, (1.0, 1.0))
    assert mask[20:44, 20:44].all() and not mask[:, 56:].any()
    assert not head_mask(np.full((3, 32, 32), np.nan, np.float32)).any()
    with pytest.raises(ValueError, match="hu must have shape"):
        head_mask(np.zeros(5))
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        head_mask(hu, 0.0)
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        head_mask(hu, (0.5, float("nan")))


def test_the_support_leaves_head_and_noise_as_they_were() -> None:
    """support=True adds the holder and table only: the same seed gives the same head."""
    plain = make_volume(np.random.default_rng(9), subtypes=("subdural",), n_slices=6, matrix=128)
    held = make_volume(
        np.random.default_rng(9), subtypes=("subdural",), n_slices=6, matrix=128, support=True
    )
    near = _distance_mm(held.tissue == SUPPORT, held.pixel_spacing_mm) < 2 * held.pixel_spacing_mm
    assert np.array_equal(plain.hu[~near], held.hu[~near])
    assert np.array_equal(plain.tissue[held.tissue != SUPPORT], held.tissue[held.tissue != SUPPORT])
    assert (held.tissue == SUPPORT).any() and not (plain.tissue == SUPPORT).any()
    assert (held.tissue == CSF_VENTRICLE).sum() == (plain.tissue == CSF_VENTRICLE).sum()


@pytest.mark.parametrize("shape", [(1, 7, 9), (5, 16, 12), (3, 40, 33)])
def test_the_in_plane_steps_equal_scipy_ndimage(shape: tuple[int, int, int]) -> None:
    """OpenCV over stacked slices gives scipy.ndimage's filters and labels exactly:
    the same values, zeros outside each slice, labels numbered in the same raster
    order, nothing reaching from one slice into the next."""
    from scipy import ndimage

    from ich_node.imaging.head import (
        _IN_PLANE_4,
        _IN_PLANE_8,
        _components,
        _dilate,
        _erode,
        _in_plane,
    )

    rng = np.random.default_rng(sum(shape))
    for density in (0.2, 0.5, 0.8):
        grid = rng.random(shape) < density
        grid[:, 0, :] |= density > 0.5  # pieces on the edges, where the slices meet
        as_u8 = grid.view(np.uint8)
        for ky, kx in ((1, 1), (3, 3), (5, 3), (7, 7)):
            assert np.array_equal(
                _in_plane(_erode, as_u8, ky, kx),
                ndimage.minimum_filter(as_u8, size=(1, ky, kx), mode="constant"),
            )
            assert np.array_equal(
                _in_plane(_dilate, as_u8, ky, kx),
                ndimage.maximum_filter(as_u8, size=(1, ky, kx), mode="constant"),
            )
        for connectivity, structure in ((4, _IN_PLANE_4), (8, _IN_PLANE_8)):
            want, n_want = ndimage.label(grid, structure=structure)
            got, n_got, where, areas = _components(grid, connectivity)
            assert n_got == n_want
            assert np.array_equal(got, want)
            assert where is not None and areas is not None
            assert where.tolist() == [box[0].start for box in ndimage.find_objects(want)]
            assert areas.tolist() == np.bincount(want.ravel(), minlength=n_want + 1)[1:].tolist()


@pytest.mark.parametrize(
    "shape, fy, fx, rows, columns",
    [((3, 5, 4), 2, 2, 10, 8), ((2, 7, 6), 3, 2, 19, 11), ((4, 9, 9), 1, 1, 9, 9),
     ((2, 4, 5), 4, 3, 13, 15), ((300, 256, 4), 2, 1, 511, 4)],
)  # fmt: skip
def test_grid_samples_go_back_to_full_resolution_block_by_block(
    shape: tuple[int, int, int], fy: int, fx: int, rows: int, columns: int
) -> None:
    """_full (OpenCV's exact nearest resize over the stacked slices) puts each grid
    sample on its f x f block, cropped to the image, nothing spilling into the next
    slice; a stack taller than 32767 rows included."""
    from ich_node.imaging.head import _full

    grid = np.random.default_rng(fy * 10 + fx).random(shape) < 0.5
    want = np.broadcast_to(grid[:, :, None, :, None], (*shape[:2], fy, shape[2], fx))
    want = want.reshape(shape[0], shape[1] * fy, shape[2] * fx)[:, :rows, :columns]
    got = _full(grid, fy, fx, rows, columns)
    assert got.dtype == bool and got.shape == (shape[0], rows, columns)
    assert np.array_equal(got, want)
