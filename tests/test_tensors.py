"""The device preprocessing (ich_node.imaging.tensors) against the numpy reference and
across devices.

Every kind of stored data the rescale treats differently is built in code from a
phantom series: unsigned with an intercept (the phantom as written), signed,
a fractional slope and intercept (float64 arithmetic), the RSNA 12-bit wrap,
pixel padding with a range limit and sentinels below air, a missing rescale with
values that are HU, and a non-square matrix in a turned patient orientation. On
the CPU (CI) the torch path must give the numpy reference's HU to 1e-5 and its
model input to 1e-6; with CUDA (``-m gpu``) the GPU must give the CPU's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from ich_node.imaging import DEFAULT_WINDOWS, Window, read_series
from ich_node.imaging.decode import DecodePool
from ich_node.imaging.orientation import Reorientation
from ich_node.imaging.preprocess import series_reorientation
from ich_node.imaging.series import CTSeries, decode_slice
from ich_node.imaging.tensors import hu_counts, model_input, stored_to_hu
from tests.preprocess_reference import context_reference, hu_reference, preprocess_reference
from training.phantom import write_series

HU_TOLERANCE = 1e-5
IMAGE_TOLERANCE = 1e-6
WINDOWS = (*DEFAULT_WINDOWS, Window("stroke", 32, 8))  # a narrow window: steep ramps


def _as_is(ds: pydicom.Dataset, i: int) -> None:
    pass


def _signed(ds: pydicom.Dataset, i: int) -> None:
    hu = ds.pixel_array.astype(np.int32) - 1024  # the phantom stores HU + 1024
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
    ds.PixelData = hu.astype(np.int16).tobytes()
    ds.RescaleIntercept = "0"


def _fractional(ds: pydicom.Dataset, i: int) -> None:
    stored = ds.pixel_array.astype(np.int32) * 2 + (i % 2)  # slope 0.5: half-HU steps
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024.3"


def _rsna_wrap(ds: pydicom.Dataset, i: int) -> None:
    hu = ds.pixel_array.astype(np.int32) - 1024
    ds.PixelData = (hu & 0xFFF).astype(np.uint16).tobytes()  # 12-bit two's complement
    ds.BitsStored, ds.HighBit = 12, 11
    ds.RescaleIntercept = "0"


def _padding(ds: pydicom.Dataset, i: int) -> None:
    stored = ds.pixel_array.astype(np.int32)
    stored[:3, :] = 0  # padding range 0..10 (PixelPaddingRangeLimit)
    stored[3, :5] = 10
    stored[-2:, -4:] = 30  # HU -994 outside the range: kept
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.add_new("PixelPaddingValue", "US", 0)
    ds.add_new("PixelPaddingRangeLimit", "US", 10)
    if i == 0:
        ds.RescaleIntercept = "-3024"  # sentinels far below air: clamped to -1024


def _signed_padding_below_air(ds: pydicom.Dataset, i: int) -> None:
    _signed(ds, i)
    hu = np.frombuffer(ds.PixelData, dtype=np.int16).reshape(ds.Rows, ds.Columns).copy()
    hu[:4, :] = -2000  # padding far below air's stored value (-1024 with intercept 0)
    hu[4, :6] = -1500  # below air, not padding: clamped to air
    ds.PixelData = hu.tobytes()
    ds.add_new("PixelPaddingValue", "SS", -2000)


def _padding_range_across_air(ds: pydicom.Dataset, i: int) -> None:
    _signed(ds, i)
    hu = np.frombuffer(ds.PixelData, dtype=np.int16).reshape(ds.Rows, ds.Columns).copy()
    hu[:2, :] = -1100  # the range -1100..-1000 holds air's stored value, -1024
    hu[2, :8] = [-1000, -1024, -1050, -999, -3000, -1101, -900, -1000]
    ds.PixelData = hu.tobytes()
    ds.add_new("PixelPaddingValue", "SS", -1100)
    ds.add_new("PixelPaddingRangeLimit", "SS", -1000)


def _garbage_above_bits_stored(ds: pydicom.Dataset, i: int) -> None:
    stored = ds.pixel_array.astype(np.uint16)  # HU + 1024 in 12 bits
    rng = np.random.default_rng(i)
    stored |= (rng.integers(0, 16, stored.shape) << 12).astype(np.uint16)  # overlay junk
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = stored.tobytes()


def _signed_12_bits(ds: pydicom.Dataset, i: int) -> None:
    hu = ds.pixel_array.astype(np.int32) - 1024
    junk = np.random.default_rng(i).integers(0, 16, hu.shape) << 12
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 12, 11
    ds.PixelData = ((hu & 0xFFF) | junk).astype(np.uint16).tobytes()  # junk above bit 11
    ds.RescaleIntercept = "0"


def _rle(ds: pydicom.Dataset, i: int) -> None:
    from pydicom.uid import RLELossless

    ds.compress(RLELossless)  # decoded by pydicom's RLE handler, not read in place


def _missing_rescale(ds: pydicom.Dataset, i: int) -> None:
    _signed(ds, i)
    del ds.RescaleIntercept, ds.RescaleSlope


def _turned_non_square(ds: pydicom.Dataset, i: int) -> None:
    stored = ds.pixel_array[:, 8:-24]  # 96 x 64
    ds.Columns = stored.shape[1]
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.ImageOrientationPatient = [0, -1, 0, 1, 0, 0]  # rows along -y: transposed, flipped


KINDS: dict[str, Callable[[pydicom.Dataset, int], None]] = {
    "unsigned": _as_is,
    "signed": _signed,
    "fractional rescale": _fractional,
    "rsna 12-bit wrap": _rsna_wrap,
    "padding and sentinels": _padding,
    "signed, padding below air": _signed_padding_below_air,
    "padding range across air": _padding_range_across_air,
    "junk above BitsStored": _garbage_above_bits_stored,
    "signed 12-bit, junk above": _signed_12_bits,
    "missing rescale, HU values": _missing_rescale,
    "turned, non-square": _turned_non_square,
    "rle compressed": _rle,
}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CTSeries]:
    root = tmp_path_factory.mktemp("tensor_kinds")
    phantom = write_series(root / "src", seed=26, subtypes=("subdural",), n_slices=7, matrix=96)
    out: dict[str, CTSeries] = {}
    for name, change in KINDS.items():
        folder = root / name.replace(" ", "_").replace(",", "")
        folder.mkdir()
        paths = []
        for i, src in enumerate(phantom.paths):
            ds = pydicom.dcmread(src)
            change(ds, i)
            ds.save_as(folder / src.name)
            paths.append(folder / src.name)
        out[name] = read_series(paths)
    return out


def _reference(series: CTSeries, size: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    hu = np.stack([hu_reference(s) for s in series.slices])
    turned = series_reorientation(series).apply(hu)
    return hu, context_reference(preprocess_reference(turned, WINDOWS, size), context)


def _device_path(
    series: CTSeries, size: int, context: int, device: str, chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    decoded = [decode_slice(s) for s in series.slices]
    with torch.inference_mode():
        hu = stored_to_hu(decoded, device)
        images = model_input(
            hu, WINDOWS, size, turn=series_reorientation(series), context=context, chunk=chunk
        )
    return hu.cpu().numpy(), images.cpu().numpy()


@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_on_the_cpu_gives_the_numpy_reference(kinds: dict[str, CTSeries], kind: str) -> None:
    series = kinds[kind]
    want_hu, want_images = _reference(series, 48, context=1)
    got_hu, got_images = _device_path(series, 48, context=1, device="cpu", chunk=3)
    assert got_hu.dtype == np.float32 and got_images.dtype == np.float32
    np.testing.assert_allclose(got_hu, want_hu, rtol=0, atol=HU_TOLERANCE)
    np.testing.assert_allclose(got_images, want_images, rtol=0, atol=IMAGE_TOLERANCE)
    assert got_images.shape == (7, len(WINDOWS) + 2, 48, 48)


def test_the_kinds_are_what_they_say(kinds: dict[str, CTSeries]) -> None:
    """Each variant really takes its own branch (else the equality above proves little)."""
    first = {k: decode_slice(s.slices[0]) for k, s in kinds.items()}
    assert first["rsna 12-bit wrap"].transform.signed_bits == 12
    assert first["padding and sentinels"].padding == (0, 10)
    assert first["missing rescale, HU values"].transform.missing == (
        "RescaleIntercept",
        "RescaleSlope",
    )
    assert first["fractional rescale"].transform.slope == 0.5
    assert first["signed"].stored.dtype == np.int16
    assert first["junk above BitsStored"].unused_bits == (12, False)
    assert first["signed 12-bit, junk above"].unused_bits == (12, True)
    assert first["junk above BitsStored"].stored.max() >= 4096  # the junk is still there
    assert not series_reorientation(kinds["turned, non-square"]).identity
    plain = stored_to_hu([first["unsigned"]]).numpy()[0]
    wrapped = stored_to_hu([first["rsna 12-bit wrap"]]).numpy()[0]
    np.testing.assert_array_equal(wrapped, plain)  # the wrap undone: the same HU
    padded = stored_to_hu([first["padding and sentinels"]]).numpy()[0]
    assert (padded[:3] == -1024).all() and (padded[3, :5] == -1024).all()
    assert padded.min() == -1024.0
    below = stored_to_hu([first["signed, padding below air"]]).numpy()[0]
    assert first["signed, padding below air"].padding == (-2000, -2000)
    assert (below[:5, :6] == -1024).all() and below.min() == -1024.0
    across = stored_to_hu([first["padding range across air"]]).numpy()[0]
    assert first["padding range across air"].padding == (-1100, -1000)
    assert across[2, :8].tolist() == [-1024, -1024, -1024, -999, -1024, -1024, -900, -1024]
    # Unsigned values with 12 of 16 bits stored travel as int16, masked by the copy.
    from ich_node.imaging.tensors import _transfer_dtype

    assert _transfer_dtype([first["junk above BitsStored"]]) == np.int16
    assert _transfer_dtype([first["unsigned"]]) == np.int16  # the phantom: 12 of 16 bits
    full = replace(first["unsigned"], unused_bits=None)  # 16 of 16 bits: int32
    assert _transfer_dtype([full]) == np.int32
    np.testing.assert_array_equal(stored_to_hu([full]).numpy()[0], plain)


def test_uncompressed_slices_are_read_in_place_as_pydicom_decodes_them(
    kinds: dict[str, CTSeries],
) -> None:
    """The header read finds where an uncompressed image's values lie; decoding reads
    them there, and gives what pydicom's full decode gives (compressed: pydicom)."""
    from ich_node.imaging.pixels import decode_stored

    for kind, series in kinds.items():
        for s in series.slices:
            assert (s.native is None) == (kind == "rle compressed"), kind
            fast, slow = decode_slice(s), decode_stored(s.path, s.frame_number)
            np.testing.assert_array_equal(fast.stored, slow.stored)
            assert fast.stored.dtype == slow.stored.dtype
            assert replace(fast, stored=slow.stored) == slow, kind


def test_batches_and_chunks_do_not_change_the_result(kinds: dict[str, CTSeries]) -> None:
    series = kinds["fractional rescale"]
    whole = _device_path(series, 40, context=2, device="cpu", chunk=64)[1]
    chunked = _device_path(series, 40, context=2, device="cpu", chunk=2)[1]
    np.testing.assert_array_equal(whole, chunked)


def test_the_classifiers_batches_are_the_reference(
    kinds: dict[str, CTSeries], tmp_path: Path
) -> None:
    """Classifier.prepare (decode pool, batch borders with slice context) = the reference."""
    from ich_node.model.bundle import Bundle, ModelCard
    from ich_node.model.inference import Classifier
    from ich_node.model.networks import build_model

    torch.manual_seed(0)
    card = ModelCard(name="ctx", version="0", arch="resnet18", input_size=48, context=1)
    bundle = Bundle(Path("in-memory"), card, build_model("resnet18", in_channels=5).eval())
    series = kinds["turned, non-square"]
    for pool in ("thread", "process"):
        clf = Classifier(bundle, device="cpu", batch_size=3, decode_threads=2, decode_pool=pool)
        try:
            hu, images = clf.prepare(series)
        finally:
            clf.close()
        want_hu = np.stack([hu_reference(s) for s in series.slices])
        turned = series_reorientation(series).apply(want_hu)
        want = context_reference(preprocess_reference(turned, bundle.card.windows, 48), 1)
        np.testing.assert_allclose(hu, want_hu, rtol=0, atol=HU_TOLERANCE)
        np.testing.assert_allclose(images, want, rtol=0, atol=IMAGE_TOLERANCE)


def test_decode_pools_give_the_same_slices(kinds: dict[str, CTSeries]) -> None:
    series = kinds["rsna 12-bit wrap"]
    alone = [decode_slice(s) for s in series.slices]
    for kind in ("thread", "process"):
        with DecodePool(2, kind) as pool:
            got = pool.map(series.slices)
        for a, b in zip(alone, got, strict=True):
            np.testing.assert_array_equal(a.stored, b.stored)
            assert replace(a, stored=b.stored) == b


def test_a_process_pool_raises_the_slice_error_with_its_path(
    kinds: dict[str, CTSeries], tmp_path: Path
) -> None:
    from ich_node.imaging import ImagingError

    series = kinds["unsigned"]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(series.slices[2].path.read_bytes()[:-4000])  # pixel data cut short
    s = replace(series.slices[2], path=broken)
    with DecodePool(1, "process") as pool, pytest.raises(ImagingError) as caught:
        pool.submit(s).result()
    assert caught.value.path == broken and "broken.dcm" in str(caught.value)


def test_hu_counts_match_the_numpy_check(kinds: dict[str, CTSeries]) -> None:
    from ich_node.imaging.tensors import counts_record

    hu = stored_to_hu([decode_slice(s) for s in kinds["signed"].slices])
    counts = counts_record(hu_counts(hu[:3]) + hu_counts(hu[3:]))
    arr = hu.numpy()
    assert counts.voxels == arr.size
    assert counts.air == np.count_nonzero(arr <= -900)
    assert counts.brain == np.count_nonzero((arr >= 0) & (arr <= 100))
    assert counts.dense == np.count_nonzero(arr > 3000)


def test_orientation_turns_tensors_like_arrays() -> None:
    arr = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    for turn in (Reorientation(True, True, False), Reorientation(False, True, True)):
        got = turn.apply(torch.from_numpy(arr))
        np.testing.assert_array_equal(got.numpy(), turn.apply(arr))
        np.testing.assert_array_equal(turn.invert(got).numpy(), arr)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_gpu_gives_the_cpus_results(kinds: dict[str, CTSeries], kind: str) -> None:
    series = kinds[kind]
    cpu_hu, cpu_images = _device_path(series, 48, context=1, device="cpu")
    gpu_hu, gpu_images = _device_path(series, 48, context=1, device="cuda")
    np.testing.assert_allclose(gpu_hu, cpu_hu, rtol=0, atol=HU_TOLERANCE)
    np.testing.assert_allclose(gpu_images, cpu_images, rtol=0, atol=IMAGE_TOLERANCE)


@pytest.mark.parametrize(
    "side, size",
    [(512, 64), (512, 128), (512, 256), (128, 64), (96, 32), (21, 7), (15, 5), (4, 2), (512, 1)],
)
def test_integer_shrinks_are_torchs_antialiased_bilinear(side: int, size: int) -> None:
    """The row-sum shrink (even and odd factors, one-pixel outputs) is F.interpolate's filter."""
    import torch.nn.functional as F

    from ich_node.imaging.tensors import pad_and_resize

    images = torch.rand((3, 2, side, side), generator=torch.Generator().manual_seed(side + size))
    want = F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    got = pad_and_resize(images, size)
    assert got.shape == want.shape and got.is_contiguous()
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=IMAGE_TOLERANCE)
    # A slice's result does not depend on the slices beside it (the slice cache hashes it).
    np.testing.assert_array_equal(pad_and_resize(images[1:2], size).numpy(), got[1:2].numpy())


def test_sizes_that_are_not_a_multiple_use_interpolate_and_non_square_images_pad() -> None:
    import torch.nn.functional as F

    from ich_node.imaging.tensors import pad_and_resize

    images = torch.rand((2, 3, 300, 512), generator=torch.Generator().manual_seed(3))
    square = F.pad(images, (0, 0, 106, 106))  # centred in 512 x 512
    for size in (64, 100):  # a multiple of 512, and not
        want = F.interpolate(
            square, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        np.testing.assert_allclose(
            pad_and_resize(images, size).numpy(), want.numpy(), rtol=0, atol=IMAGE_TOLERANCE
        )


def test_hu_counts_per_slice_add_up_and_match_torchs_comparisons(
    kinds: dict[str, CTSeries],
) -> None:
    """The CPU counts (numpy's kernels) are the comparisons' exact counts, slice by slice."""
    hu = stored_to_hu([decode_slice(s) for s in kinds["fractional rescale"].slices])
    hu[0, :4, :4] = torch.tensor([-900.0, 0.0, 100.0, 3000.0])  # the limits themselves
    hu[0, 4, :3] = torch.tensor([3000.5, -900.25, 100.5])
    rows = hu_counts(hu, per_slice=True)
    assert rows.shape == (len(hu), 4) and rows.dtype == torch.int64
    for i, h in enumerate(hu):
        want = [
            h.numel(),
            int((h <= -900).sum()),
            int(((h >= 0) & (h <= 100)).sum()),
            int((h > 3000).sum()),
        ]
        assert rows[i].tolist() == want
    assert hu_counts(hu).tolist() == rows.sum(dim=0).tolist()
    assert hu_counts(hu[:0], per_slice=True).shape == (0, 4)


@pytest.mark.parametrize("shape, size", [((512, 512), 64), ((96, 96), 12), ((300, 512), 64),
                                         ((96, 96), 96), ((64, 64), 100)])  # fmt: skip
def test_model_input_is_the_windows_then_the_resize(shape: tuple[int, int], size: int) -> None:
    """model_input resizes the clipped HU and maps the windows after (the resize is
    linear, its weights sum to 1): the same as windowing first, to float32 rounding;
    and a slice's input does not depend on the slices beside it (the slice cache)."""
    from ich_node.imaging.tensors import apply_windows, pad_and_resize

    gen = torch.Generator().manual_seed(size)
    hu = torch.rand((5, *shape), generator=gen) * 4200 - 1100  # air to dense bone
    hu[:, : shape[0] // 4] = torch.randint(-40, 120, (5, shape[0] // 4, shape[1]), generator=gen)
    want = pad_and_resize(apply_windows(hu, WINDOWS), size).clamp_(0, 1)
    got = model_input(hu, WINDOWS, size, chunk=2)
    assert got.shape == want.shape == (5, len(WINDOWS), size, size)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=IMAGE_TOLERANCE)
    assert got.min() >= 0 and got.max() <= 1
    np.testing.assert_array_equal(model_input(hu[3:4], WINDOWS, size).numpy(), got[3:4].numpy())


def test_the_series_buffer_is_plain_memory() -> None:
    """empty_large: a writable, contiguous tensor of the shape asked for, in huge-page
    advised memory from 2 MiB on, that lives as long as its views."""
    from ich_node.imaging.tensors import empty_large

    big = empty_large((9, 256, 256))  # 2.25 MiB: mapped
    small = empty_large((2, 8, 8), torch.int16)
    assert big.shape == (9, 256, 256) and big.dtype == torch.float32 and big.is_contiguous()
    assert small.dtype == torch.int16 and small.shape == (2, 8, 8)
    view = big[3]
    del big
    view.fill_(7.0)  # the mapping outlives the tensor it was made for
    assert float(view.sum()) == 7.0 * 256 * 256


def test_a_free_series_buffer_is_used_again_and_a_held_one_never() -> None:
    """BufferMappings: a mapping comes back only when its last view (a numpy array
    too) is gone; a buffer taken meanwhile is other memory; kept mappings stay within
    their budget, the oldest let go first."""
    import gc

    from ich_node.imaging.tensors import BufferMappings

    mib = 1 << 20
    pool = BufferMappings(keep_bytes=16 * mib)
    first = torch.frombuffer(pool.buffer(4 * mib), dtype=torch.float32)
    address = first.data_ptr()
    held = first[1:].numpy()  # a numpy view keeps the mapping
    held[:] = 7.0
    del first
    gc.collect()
    assert pool.kept_bytes() == 0
    other = torch.frombuffer(pool.buffer(4 * mib), dtype=torch.float32)
    assert other.data_ptr() != address and pool.reused == 0
    other.fill_(1.0)
    assert float(held.min()) == float(held.max()) == 7.0  # untouched by the other buffer
    del held
    assert pool.kept_bytes() == 4 * mib
    again = torch.frombuffer(pool.buffer(3 * mib), dtype=torch.float32)  # fits in it
    assert again.data_ptr() == address and pool.reused == 1 and pool.kept_bytes() == 0
    assert again.numel() * 4 == 3 * mib
    bigger = pool.buffer(5 * mib)  # no kept mapping holds it: a new one
    assert pool.reused == 1 and len(bigger) == 5 * mib
    del again, other, bigger
    assert pool.kept_bytes() == 4 * mib + 4 * mib + 5 * mib

    small = BufferMappings(keep_bytes=6 * mib)
    a, b = small.buffer(4 * mib), small.buffer(4 * mib)
    del a
    del b  # over the budget with both: the older one is let go
    assert small.kept_bytes() == 4 * mib
    none = BufferMappings(keep_bytes=0)
    c = none.buffer(4 * mib)
    del c
    assert none.kept_bytes() == 0
