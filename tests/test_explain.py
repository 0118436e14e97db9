"""Grad-CAM: which slices are explained, the maps' shape and range, both architectures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ich_node.imaging import read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import Bundle, ModelCard, load_bundle
from ich_node.model.explain import explain, slices_to_explain
from ich_node.model.inference import Classifier
from ich_node.model.networks import build_model


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from training.phantom import write_series

    out = tmp_path_factory.mktemp("explain-phantom")
    return write_series(out, seed=5, subtypes=("subdural",), n_slices=8, matrix=128)


def _classifier(bundle: Bundle, thresholds: dict[str, float]) -> Classifier:
    card = replace(bundle.card, thresholds=thresholds)
    return Classifier(Bundle(bundle.path, card, bundle.model), device="cpu", batch_size=3)


def test_positive_slices_are_explained_in_batches(tiny_bundle: Path, phantom: Any) -> None:
    thresholds = {label: 1.01 for label in LABELS} | {"any": 0.0, "subdural": 0.0}
    classifier = _classifier(load_bundle(tiny_bundle), thresholds)
    prediction = classifier.predict_series(read_series(list(phantom.paths)))
    explanations = explain(prediction, classifier)
    assert [e.index for e in explanations] == list(range(8))  # 3 batches of <= 3
    for e in explanations:
        assert e.labels == ("subdural",)
        assert e.cam.shape == (64, 64) and e.cam.dtype == np.float32
        assert e.cam.min() >= 0.0 and e.cam.max() <= 1.0
        assert e.cam.max() > 0.5  # pytorch-grad-cam scales each map to [0, 1]
    assert all(p.grad is None for p in classifier.model.parameters())


def test_negative_series_explains_top_slices_only_when_asked(
    tiny_bundle: Path, phantom: Any
) -> None:
    classifier = _classifier(load_bundle(tiny_bundle), dict.fromkeys(LABELS, 1.01))
    prediction = classifier.predict_series(read_series(list(phantom.paths)))
    assert explain(prediction, classifier) == ()
    top = explain(prediction, classifier, negative_top_slices=2)
    p_any = prediction.findings.slice_probabilities()[:, 0]
    assert sorted(e.index for e in top) == sorted(np.argsort(-p_any)[:2].tolist())
    assert all(e.labels == ("any",) for e in top)


def test_any_only_slices_and_several_subtypes(tiny_bundle: Path, phantom: Any) -> None:
    classifier = _classifier(
        load_bundle(tiny_bundle),
        {label: 1.01 for label in LABELS} | {"any": 0.0, "epidural": 0.0, "subdural": 0.0},
    )
    prediction = classifier.predict_series(read_series(list(phantom.paths)))
    wanted = slices_to_explain(prediction.findings)
    assert all(labels == ("epidural", "subdural") for _, labels in wanted)
    explanations = explain(prediction, classifier)
    assert all(e.cam.shape == (64, 64) for e in explanations)
    with pytest.raises(ValueError, match="negative_top_slices"):
        slices_to_explain(prediction.findings, -1)


def test_resnext101_target_layer(phantom: Any) -> None:
    torch.manual_seed(0)
    model = build_model("resnext101_32x8d").eval()
    card = ModelCard(name="resnext test", version="0", arch="resnext101_32x8d", input_size=64)
    bundle = Bundle(path=Path("in-memory"), card=card, model=model)
    classifier = _classifier(bundle, dict.fromkeys(LABELS, 0.0))
    series = read_series(list(phantom.paths[:2]))
    prediction = classifier.predict_series(series)
    explanations = explain(prediction, classifier)
    assert [e.index for e in explanations] == [0, 1]
    assert all(e.cam.shape == (64, 64) for e in explanations)


def _correlations(a: tuple[Any, ...], b: tuple[Any, ...]) -> list[float]:
    assert [e.index for e in a] == [e.index for e in b]
    assert [e.labels for e in a] == [e.labels for e in b]
    return [
        float(np.corrcoef(x.cam.ravel(), y.cam.ravel())[0, 1]) for x, y in zip(a, b, strict=True)
    ]


def _fit_briefly(model: torch.nn.Module, images: np.ndarray, steps: int) -> None:
    """A few optimiser steps on phantom slices: weights no longer at initialisation."""
    x = torch.from_numpy(images)
    y = (x[:, 0].mean(dim=(1, 2)) > x[:, 0].mean()).float()[:, None].repeat(1, len(LABELS))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("arch", "trained"),
    [("resnet18", False), ("resnet18", True), ("resnext101_32x8d", False)],
)
def test_cam_shortcut_equals_pytorch_grad_cam(phantom: Any, arch: str, trained: bool) -> None:
    """The CAM of the inference pass and pytorch-grad-cam agree (correlation > 0.999)."""
    torch.manual_seed(0)
    model = build_model(arch)
    # 128 px: a 4x4 last stage (at 64 px, 2x2 maps are often all zero after the ReLU).
    card = ModelCard(name="cam test", version="0", arch=arch, input_size=128)
    # Every slice explained for the sum of the five subtypes' logits.
    classifier = _classifier(
        Bundle(Path("in-memory"), card, model.eval()), dict.fromkeys(LABELS, 0.0)
    )
    classifier.precision = "fp32"
    series = read_series(list(phantom.paths))
    if trained:
        _fit_briefly(model, classifier.prepare(series)[1], steps=8)
    prediction = classifier.predict_series(series)
    assert prediction.cams is not None and prediction.cams.shape == (8, len(LABELS), 4, 4)
    shortcut = explain(prediction, classifier)  # auto: the CAM shortcut
    reference = explain(prediction, classifier, method="gradcam")
    assert len(shortcut) == 8 and all(e.labels == LABELS[1:] for e in shortcut)
    assert min(_correlations(shortcut, reference)) > 0.999
    for s, r in zip(shortcut, reference, strict=True):
        assert s.cam.shape == r.cam.shape == (128, 128) and s.cam.dtype == np.float32
        assert s.cam.max() > 0.5  # not a constant map: the correlation means something
        np.testing.assert_allclose(s.cam, r.cam, atol=0.02)
    # A prediction without CAMs gets them from one forward pass of the explained slices.
    again = explain(replace(prediction, cams=None), classifier, method="cam")
    for s, a in zip(shortcut, again, strict=True):
        np.testing.assert_allclose(s.cam, a.cam, atol=1e-5)


def test_head_without_shortcut_falls_back_to_pytorch_grad_cam(phantom: Any) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18")
    model.backbone.fc = torch.nn.Sequential(  # type: ignore[assignment]
        torch.nn.Linear(512, 16), torch.nn.ReLU(), torch.nn.Linear(16, len(LABELS))
    )
    card = ModelCard(name="mlp head", version="0", arch="resnet18", input_size=64)
    thresholds = {label: 1.01 for label in LABELS} | {"any": 0.0, "subdural": 0.0}
    classifier = _classifier(Bundle(Path("in-memory"), card, model.eval()), thresholds)
    prediction = classifier.predict_series(read_series(list(phantom.paths[:3])))
    assert prediction.cams is None and not classifier.computes_cams
    auto = explain(prediction, classifier)
    reference = explain(prediction, classifier, method="gradcam")
    assert [e.index for e in auto] == [0, 1, 2]
    for a, r in zip(auto, reference, strict=True):
        np.testing.assert_array_equal(a.cam, r.cam)
    with pytest.raises(ValueError, match="global average pooling"):
        explain(prediction, classifier, method="cam")
    with pytest.raises(ValueError, match="method must be"):
        explain(prediction, classifier, method="lime")  # type: ignore[arg-type]
