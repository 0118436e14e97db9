"""The demo model, trained in CI: it must really learn, and its heatmaps must point at the bleed.

These tests fail when learning breaks (labels, loss, preprocessing or export) and when
the heatmaps stop showing where the model looks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ich_node.imaging import read_series
from ich_node.model.bundle import load_bundle
from ich_node.model.explain import explain
from ich_node.model.inference import Classifier
from ich_node.results.common import cam_to_source
from training.metrics import roc_auc
from training.phantom import write_series

#: Held-out studies (seeds the training set never used), each subtype once.
HELD_OUT = [
    (101, ("subdural",)),
    (102, ("epidural",)),
    (103, ("intraparenchymal",)),
    (104, ("intraventricular",)),
    (105, ("subarachnoid",)),
    (106, ()),
    (107, ()),
    (108, ()),
]


@pytest.fixture(scope="module")
def held_out(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    classifier = Classifier(load_bundle(demo_bundle), device="cpu")
    root = tmp_path_factory.mktemp("held_out")
    out = []
    for seed, subtypes in HELD_OUT:
        phantom = write_series(root / str(seed), seed=seed, subtypes=subtypes, n_slices=28)
        out.append((phantom, classifier.predict_series(read_series(list(phantom.paths)))))
    return [classifier, out]


def test_validation_auc_clearly_beats_chance(demo_bundle: Path) -> None:
    card = load_bundle(demo_bundle).card
    auc = card.metrics["validation"]["images"]["roc_auc"]["any"]
    assert auc > 0.8, f"demo preset: validation AUC(any) per image {auc}"
    assert card.demo and card.split["unit"] == "patient"


def test_held_out_studies_are_told_apart(held_out: list) -> None:
    _, pairs = held_out
    truth = np.concatenate([p.volume.slice_labels()[:, 0] for p, _ in pairs])
    probs = np.concatenate([pred.findings.slice_probabilities()[:, 0] for _, pred in pairs])
    assert roc_auc(truth, probs) > 0.8
    # Study level: every bleeding study scores above every normal one.
    bleeding = [pred.findings.series["any"].probability for p, pred in pairs if p.volume.subtypes]
    normal = [pred.findings.series["any"].probability for p, pred in pairs if not p.volume.subtypes]
    assert min(bleeding) > max(normal)


def test_hottest_region_overlaps_the_bleed(held_out: list) -> None:
    """On most explained slices that hold blood, the hottest 5% of the head touches it."""
    classifier, pairs = held_out
    hits: list[bool] = []
    for phantom, prediction in pairs:
        if not phantom.volume.subtypes:
            continue
        blood = np.any(list(phantom.volume.masks.values()), axis=0)  # (S, H, W)
        for e in explain(prediction, classifier):
            mask = blood[e.index]
            if not mask.any():
                continue
            cam = cam_to_source(e.cam, *mask.shape)
            head = prediction.hu[e.index] > -300
            hot = head & (cam >= np.quantile(cam[head], 0.95))
            grown = mask.copy()
            for _ in range(8):  # 8 px (3.6 mm): the map is 32x coarser than the slice
                grown |= np.roll(grown, 1, 0) | np.roll(grown, -1, 0)
                grown |= np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
            hits.append(bool((hot & grown).any()))
    assert len(hits) >= 10, f"only {len(hits)} explained slices with blood"
    assert np.mean(hits) > 0.6, f"hottest region on the bleed in {sum(hits)}/{len(hits)} slices"
