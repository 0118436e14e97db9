"""Classifier: batching with prefetch, precision, CAMs from the inference pass, compile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ich_node.imaging import read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import Bundle, ModelCard, load_bundle
from ich_node.model.inference import (
    Classifier,
    cam_head,
    resolve_device,
    resolve_precision,
)
from ich_node.model.networks import build_model


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from training.phantom import write_series

    out = tmp_path_factory.mktemp("inference-phantom")
    return write_series(out, seed=3, subtypes=("intraparenchymal",), n_slices=7, matrix=96)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def test_resolve_device_and_precision() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == "fp32"  # bf16 on a CPU is opt-in
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("fp16", cpu)


def test_series_in_batches_with_prefetch_matches_whole_series(
    tiny_bundle: Path, phantom: Any
) -> None:
    series = read_series(list(phantom.paths))
    bundle = load_bundle(tiny_bundle)
    whole = Classifier(bundle, device="cpu", batch_size=16, precision="fp32", prefetch=False)
    hu, images = whole.prepare(series)
    expected = whole.predict_images(images)
    for prefetch, threads in ((False, 0), (True, 1), (True, 3)):
        c = Classifier(
            bundle, device="cpu", batch_size=3, precision="fp32", prefetch=prefetch,
            decode_threads=threads,
        )  # fmt: skip
        prediction = c.predict_series(series)  # 3 batches: 3, 3, 1 slices
        np.testing.assert_array_equal(prediction.hu, hu)
        np.testing.assert_array_equal(prediction.images, images)
        np.testing.assert_allclose(
            prediction.findings.slice_probabilities(), expected, rtol=1e-4, atol=1e-5
        )
        assert prediction.cams is not None and prediction.cams.shape == (7, len(LABELS), 2, 2)


def test_on_the_cpu_preprocessing_and_forward_passes_take_turns(
    tiny_bundle: Path, phantom: Any
) -> None:
    """With a thread pool on the CPU, every slice of a series (under CPU_TURN_SLICES) is
    preprocessed before the first batch goes to the model: the pool's threads never
    run beside the forward passes (performance.md: both at once stalled the model)."""
    import threading
    import time

    from ich_node.imaging.tensors import CPU_CHUNK
    from ich_node.model.inference import CPU_TURN_SLICES

    series = read_series(list(phantom.paths))
    assert len(series.slices) < CPU_TURN_SLICES
    c = Classifier(
        load_bundle(tiny_bundle), device="cpu", batch_size=2, precision="fp32", decode_threads=2
    )
    ends: list[float] = []
    lock = threading.Lock()
    prepare = c._prepare_unit

    def timed(*args: Any) -> Any:
        out = prepare(*args)
        with lock:
            ends.append(time.perf_counter())
        return out

    c._prepare_unit = timed  # type: ignore[method-assign]
    batches = c.prepared_batches(series)
    first = next(batches)
    yielded = time.perf_counter()
    rest = list(batches)
    c.close()
    assert len(first.images) == 2 and sum(len(b.images) for b in rest) == len(series.slices) - 2
    units = -(-len(series.slices) // CPU_CHUNK)  # slices per pool task
    assert len(ends) == units and max(ends) <= yielded


def test_cams_average_to_the_logits(tiny_bundle: Path, phantom: Any) -> None:
    """GAP + linear: the spatial mean of a label's CAM plus its bias is its logit."""
    bundle = load_bundle(tiny_bundle)
    c = Classifier(bundle, device="cpu", batch_size=4, precision="fp32")
    assert c.computes_cams and cam_head(c.model) is c.model.backbone.fc
    prediction = c.predict_series(read_series(list(phantom.paths)))
    assert prediction.cams is not None
    bias = c.model.backbone.fc.bias.detach().numpy()
    from_cams = prediction.cams.mean(axis=(2, 3)) + bias
    logits = _logit(prediction.findings.slice_probabilities())
    np.testing.assert_allclose(from_cams, logits, rtol=1e-3, atol=1e-3)
    # The model's own forward gives the same probabilities as the CAM-returning pass.
    with torch.inference_mode():
        direct = torch.sigmoid(c.model(torch.from_numpy(prediction.images))).numpy()
    np.testing.assert_allclose(direct, prediction.findings.slice_probabilities(), atol=1e-5)


def test_head_without_the_shortcut_gives_no_cams(phantom: Any) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18")
    model.backbone.fc = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 6))  # type: ignore[assignment]
    card = ModelCard(name="mlp head", version="0", arch="resnet18", input_size=64)
    c = Classifier(Bundle(Path("in-memory"), card, model.eval()), device="cpu", batch_size=4)
    assert cam_head(c.model) is None and not c.computes_cams
    prediction = c.predict_series(read_series(list(phantom.paths)))
    assert prediction.cams is None
    assert prediction.findings.slice_probabilities().shape == (7, len(LABELS))


def test_bf16_agrees_with_fp32(tiny_bundle: Path, phantom: Any) -> None:
    series = read_series(list(phantom.paths))
    bundle = load_bundle(tiny_bundle)
    fp32 = Classifier(bundle, device="cpu", batch_size=4, precision="fp32", channels_last=False)
    bf16 = Classifier(bundle, device="cpu", batch_size=4, precision="bf16")
    assert bf16.channels_last and not fp32.channels_last
    a = fp32.predict_series(series).findings.slice_probabilities()
    b = bf16.predict_series(series).findings.slice_probabilities()
    # bf16 keeps 8 bits of mantissa: probabilities agree to about a percent.
    np.testing.assert_allclose(a, b, atol=0.03)


def test_validation(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(ValueError, match="batch_size"):
        Classifier(bundle, device="cpu", batch_size=0)
    with pytest.raises(ValueError, match="decode_threads"):
        Classifier(bundle, device="cpu", decode_threads=-1)
    c = Classifier(bundle, device="cpu", batch_size=2)
    with pytest.raises(ValueError, match=r"\(S, 3, H, W\)"):
        c.predict_images(np.zeros((2, 64, 64), np.float32))
    assert c.warmup() == 0.0  # nothing to warm on the CPU without compile


@pytest.mark.slow
def test_compiled_classifier_matches_eager(tiny_bundle: Path, phantom: Any) -> None:
    """torch.compile (inductor, CPU): one graph for every batch, same probabilities."""
    series = read_series(list(phantom.paths))
    bundle = load_bundle(tiny_bundle)
    eager = Classifier(bundle, device="cpu", batch_size=4, precision="fp32")
    compiled = Classifier(bundle, device="cpu", batch_size=4, precision="fp32", compile=True)
    assert compiled.warmup() > 0.0
    a = eager.predict_series(series)
    b = compiled.predict_series(series)  # 4 + 3 slices: the last batch is padded
    np.testing.assert_allclose(
        a.findings.slice_probabilities(), b.findings.slice_probabilities(), atol=1e-4
    )
    assert a.cams is not None and b.cams is not None
    np.testing.assert_allclose(a.cams, b.cams, rtol=1e-3, atol=1e-3)


def test_compiled_classifier_compiles_once_for_series_of_any_length(tmp_path: Path) -> None:
    """model.compile: series of 17, 40 and 63 slices (partial last batches of 1, 8, 15)
    run on the one graph the warm-up compiled (torch._dynamo's counters)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from benchmarks.common import random_bundle
    from training.phantom import write_series

    bundle = load_bundle(random_bundle(tmp_path / "m.safetensors", name="t", input_size=64))
    lengths = (17, 40, 63)
    series = [
        read_series(write_series(tmp_path / str(n), seed=n, n_slices=n, matrix=64).paths)
        for n in lengths
    ]
    torch._dynamo.reset()
    counters.clear()
    c = Classifier(
        bundle, device="cpu", batch_size=16, precision="fp32", compile=True,
        compile_backend="eager",  # dynamo's guards and recompiles without inductor's codegen
    )  # fmt: skip
    assert c.warmup() > 0.0
    assert counters["stats"]["unique_graphs"] == 1
    for n, s in zip(lengths, series, strict=True):
        prediction = c.predict_series(s)
        assert prediction.findings.slice_probabilities().shape == (n, len(LABELS))
        assert prediction.cams is not None and len(prediction.cams) == n  # padding dropped
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["frames"]["total"] == 1, dict(counters["frames"])


def test_a_series_buffer_used_again_never_changes_an_earlier_prediction(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """The series' HU buffer is used again only once the prediction holding it is gone:
    a prediction kept while others run keeps its HU, and one made in a used buffer has
    the HU of its own series (the reference reader's)."""
    import gc

    from ich_node.imaging import load_series_hu, tensors
    from training.phantom import write_series

    series = [
        read_series(list(write_series(tmp_path / f"s{k}", seed=k, n_slices=12, matrix=256).paths))
        for k in range(3)
    ]
    assert tensors.HUGE_PAGE_BYTES <= 12 * 256 * 256 * 4  # in a mapping, not torch.empty
    c = Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=4)
    try:
        kept = c.predict_series(series[0])
        hu_before = kept.hu.copy()
        reused = tensors._MAPPINGS.reused
        second = c.predict_series(series[1])
        np.testing.assert_array_equal(kept.hu, hu_before)  # not written over
        assert not np.shares_memory(kept.hu, second.hu)
        np.testing.assert_array_equal(second.hu, load_series_hu(series[1]))
        del kept, second
        gc.collect()
        third = c.predict_series(series[2])
        assert tensors._MAPPINGS.reused > reused  # a freed buffer was used again
        np.testing.assert_array_equal(third.hu, load_series_hu(series[2]))
    finally:
        c.close()
