"""Grad-CAM: which slices are explained, the maps' shape and range, both architectures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ich_node.bundle import Bundle, ModelCard, load_bundle
from ich_node.explain import explain, slices_to_explain
from ich_node.heatmaps import cam_to_source
from ich_node.imaging import read_series
from ich_node.inference import Classifier
from ich_node.labels import LABELS
from ich_node.model import build_model


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


@pytest.mark.slow
def test_trained_model_looks_at_the_lesion(tmp_path: Path) -> None:
    """Train a resnet18 briefly on phantoms; its hottest region should hit the bleed."""
    from ich_node.imaging import load_series_hu, preprocess_hu
    from training.phantom import write_series

    torch.manual_seed(0)
    card = ModelCard(name="overlap test", version="0", arch="resnet18", input_size=96, demo=True)
    images, targets = [], []
    for seed, subtypes in enumerate([("subdural",), (), ("intraparenchymal",), ()] * 2):
        ph = write_series(
            tmp_path / f"s{seed}", seed=seed, subtypes=subtypes, n_slices=10, matrix=96
        )
        hu = load_series_hu(read_series(list(ph.paths)))
        images.append(preprocess_hu(hu, card.windows, card.input_size))
        y = np.zeros((len(hu), len(LABELS)), np.float32)
        for j, label in enumerate(LABELS):
            masks = ph.volume.masks
            present = (
                np.any([m.any(axis=(1, 2)) for m in masks.values()], axis=0)
                if label == "any" and masks
                else masks[label].any(axis=(1, 2))
                if label in masks
                else np.zeros(len(hu), bool)
            )
            y[:, j] = present
        targets.append(y)
    x = torch.from_numpy(np.concatenate(images))
    y = torch.from_numpy(np.concatenate(targets))
    model = build_model("resnet18")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(12):
        for batch in torch.randperm(len(x)).split(16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    # Explain every slice for subdural: this checks where the model looks, not its calibration.
    explain_card = replace(
        card, thresholds={label: 1.01 for label in LABELS} | {"any": 0.0, "subdural": 0.0}
    )
    classifier = Classifier(
        Bundle(Path("in-memory"), explain_card, model), device="cpu", batch_size=8
    )
    test = write_series(tmp_path / "test", seed=99, subtypes=("subdural",), n_slices=10, matrix=96)
    prediction = classifier.predict_series(read_series(list(test.paths)))
    explanations = [e for e in explain(prediction, classifier) if "subdural" in e.labels]
    mask = test.volume.masks["subdural"]
    hits = []
    for e in explanations:
        if not mask[e.index].any():
            continue
        cam = cam_to_source(e.cam, *mask.shape[1:])
        hot = cam >= np.quantile(cam, 0.95)  # hottest 5% of the slice
        grown = mask[e.index]
        for _ in range(4):  # 4 px tolerance: the cam is 32x coarser than the input
            grown = grown | np.roll(grown, 1, 0) | np.roll(grown, -1, 0)
            grown = grown | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
        hits.append(bool((hot & grown).any()))
    assert hits, "the trained model found no positive subdural slice to explain"
    assert np.mean(hits) > 0.5, hits
