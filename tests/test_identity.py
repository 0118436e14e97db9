"""Content identity (:mod:`ich_node.imaging.identity`): the same images in any transfer
syntax are the same content; other pixels or other relevant attributes are not."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from ich_node.imaging.identity import (
    IDENTITY_ATTRIBUTES,
    content_identity,
    fingerprint,
    version_identities,
)
from ich_node.imaging.pixels import load_hu
from ich_node.imaging.series import load_series_hu, read_series
from tests.conftest import dcmtk
from training.phantom import write_series

#: DCMTK re-encodings of the same images (tool, arguments before input and output).
REENCODINGS = {
    "implicit": ("dcmconv", ["+ti"]),
    "big_endian": ("dcmconv", ["+tb"]),
    "deflated": ("dcmconv", ["+td"]),
    "rle": ("dcmcrle", []),
    "jpeg_ls_lossless": ("dcmcjpls", ["--encode-lossless"]),
    "jpeg_lossless": ("dcmcjpeg", ["+e1"]),
}


def reencode(src: Path, dst: Path, how: str) -> Path:
    """``src`` re-encoded as ``how`` (a key of :data:`REENCODINGS`, or ``j2k`` by pydicom)."""
    if how == "j2k":
        ds = pydicom.dcmread(src)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(dst)
        return dst
    tool, args = REENCODINGS[how]
    subprocess.run([dcmtk(tool), *args, str(src), str(dst)], check=True, capture_output=True)
    return dst


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("identity")
    return list(write_series(root / "s", seed=11, n_slices=3, matrix=128).paths)


@pytest.mark.parametrize("how", [*REENCODINGS, "j2k"])
def test_the_same_images_in_another_transfer_syntax_have_the_same_identity(
    tmp_path: Path, series: list[Path], how: str
) -> None:
    copy = reencode(series[0], tmp_path / "copy.dcm", how)
    assert copy.read_bytes() != series[0].read_bytes()
    assert np.array_equal(load_hu(copy), load_hu(series[0]))
    assert content_identity(copy) == content_identity(series[0])


def test_other_pixels_or_other_relevant_attributes_are_other_content(
    tmp_path: Path, series: list[Path]
) -> None:
    base = content_identity(series[0])
    changed_pixel = pydicom.dcmread(series[0])
    arr = changed_pixel.pixel_array.copy()
    arr[64, 64] += 1  # one pixel, one HU
    changed_pixel.PixelData = arr.tobytes()
    changed_pixel.save_as(tmp_path / "pixel.dcm")
    assert content_identity(tmp_path / "pixel.dcm") != base

    for keyword, value in (
        ("PatientName", "OTHER^NAME"),
        ("ImagePositionPatient", [0.0, 0.0, 99.0]),
        ("SliceThickness", "2.5"),
        ("LossyImageCompression", "01"),
        ("TimezoneOffsetFromUTC", "+0900"),
    ):
        assert keyword in IDENTITY_ATTRIBUTES
        ds = pydicom.dcmread(series[0])
        setattr(ds, keyword, value)
        ds.save_as(tmp_path / f"{keyword}.dcm")
        assert content_identity(tmp_path / f"{keyword}.dcm") != base, keyword


def test_encoding_and_irrelevant_attributes_do_not_count(
    tmp_path: Path, series: list[Path]
) -> None:
    base = content_identity(series[0])
    ds = pydicom.dcmread(series[0])
    ds.WindowCenter = "400"  # a display hint
    ds.InstanceCreationDate = "20990101"  # when this copy was made
    ds.SliceThickness = f"{float(ds.SliceThickness):.3f}"  # "5" -> "5.000": the same number
    ds.add_new(0x00091010, "LO", "private note")
    # Stored as signed values with intercept 0: other bits, the same HU.
    stored = ds.pixel_array.astype(np.int32) - 1024
    ds.PixelRepresentation = 1
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.RescaleIntercept = "0"
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(tmp_path / "same.dcm")
    assert content_identity(tmp_path / "same.dcm") == base


def test_fingerprint_is_order_free_and_the_worker_reuses_decoded_slices(
    series: list[Path],
) -> None:
    ids = [content_identity(p) for p in series]
    assert fingerprint(ids) == fingerprint(reversed(ids))
    assert fingerprint(ids[:2]) != fingerprint(ids)
    ct = read_series(series)
    reused = version_identities(series, ct.slices, load_series_hu(ct))
    assert reused == dict(zip(series, ids, strict=True))
