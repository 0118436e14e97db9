"""Slice context (2.5D), the sequence stage, two-stage bundles and TTA in serving."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ich_node.imaging import add_slice_context, context_channels, read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import (
    CARD_KEY,
    SEQUENCE_PREFIX,
    BundleError,
    ModelCard,
    check_bundle,
    load_bundle,
    save_bundle,
    weights_sha256,
)
from ich_node.model.networks import ICHClassifier, SequenceStage, build_model, neighbour_differences


def _card(**kw: object) -> ModelCard:
    base: dict[str, object] = {
        "name": "ich-node test model", "version": "0", "arch": "resnet18", "input_size": 64,
        "demo": True, "training_data": "none: random weights",
    }  # fmt: skip
    base.update(kw)
    return ModelCard(**base)  # type: ignore[arg-type]


def _trained_like_sequence(dim: int, seed: int = 0) -> SequenceStage:
    """A sequence stage with a non-zero head (a fresh one returns the CNN's logits)."""
    torch.manual_seed(seed)
    stage = SequenceStage(dim, hidden=16)
    with torch.no_grad():
        stage.head.weight.normal_(0, 0.5)
        stage.head.bias.normal_(0, 0.5)
    return stage.eval()


def _two_stage_bundle(path: Path, context: int = 1) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=context_channels((0, 1, 2), context))
    save_bundle(path, model, _card(context=context), _trained_like_sequence(512))
    return path


# ------------------------------------------------------------------ 2.5D input


def test_add_slice_context_appends_brain_neighbours_and_replicates_edges() -> None:
    images = np.stack([np.full((3, 2, 2), s) + np.arange(3)[:, None, None] / 10
                       for s in range(4)]).astype(np.float32)  # fmt: skip  # s + c/10
    out = add_slice_context(images, 1)
    assert out.shape == (4, 5, 2, 2)
    np.testing.assert_array_equal(out[:, :3], images)
    assert out[:, 3, 0, 0].tolist() == [0, 0, 1, 2]  # brain window of s-1, first replicated
    assert out[:, 4, 0, 0].tolist() == [1, 2, 3, 3]  # brain window of s+1, last replicated
    two = add_slice_context(images, 2)
    assert two.shape == (4, 7, 2, 2)
    assert two[:, 5, 0, 0].tolist() == [0, 0, 0, 1] and two[:, 6, 0, 0].tolist() == [2, 3, 3, 3]
    assert add_slice_context(images, 0) is not None and add_slice_context(images, 0).shape[1] == 3
    single = add_slice_context(images[:1], 1)
    assert (single[0, 3] == single[0, 0]).all() and (single[0, 4] == single[0, 0]).all()
    with pytest.raises(ValueError):
        add_slice_context(images, -1)


def test_widened_first_conv_keeps_imagenet_filters(tmp_path: Path) -> None:
    """The RGB filters load unchanged up to 3/5; each new channel is their mean x 3/5."""
    torch.manual_seed(1)
    reference = build_model("resnet18").backbone.state_dict()
    weights = tmp_path / "imagenet.pth"
    torch.save(reference, weights)
    wide = build_model("resnet18", pretrained=weights, in_channels=5)
    w = wide.backbone.conv1.weight.detach()
    rgb = reference["conv1.weight"]
    assert w.shape == (64, 5, 7, 7)
    torch.testing.assert_close(w[:, :3], rgb * 3 / 5)
    torch.testing.assert_close(w[:, 3], rgb.mean(dim=1) * 3 / 5)
    torch.testing.assert_close(w[:, 4], rgb.mean(dim=1) * 3 / 5)
    torch.testing.assert_close(
        wide.backbone.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"]
    )
    # An input whose channels are all alike excites the stem as the RGB stem does.
    narrow = build_model("resnet18", pretrained=weights)
    x = torch.rand(1, 1, 32, 32)
    a = narrow.backbone.conv1(x.expand(1, 3, 32, 32) - 0.5)
    b = wide.backbone.conv1(x.expand(1, 5, 32, 32) - 0.5)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert wide.mean.shape == (1, 5, 1, 1) and float(wide.mean[0, 3]) == float(wide.mean[0, 0])


# ------------------------------------------------------------------ sequence stage


def test_neighbour_differences_at_the_ends() -> None:
    e = torch.arange(3, dtype=torch.float32).view(1, 3, 1)
    f = neighbour_differences(e)[0]
    assert f.tolist() == [[0, 0, -1], [1, 1, -1], [2, 1, 0]]


def test_fresh_sequence_stage_returns_cnn_logits_and_padding_is_inert() -> None:
    torch.manual_seed(0)
    fresh = SequenceStage(8, hidden=4).eval()
    emb, logits = torch.randn(2, 5, 8), torch.randn(2, 5, 6)
    torch.testing.assert_close(fresh(emb, logits), logits)
    stage = _trained_like_sequence(8)
    # a batch of two series of lengths 5 and 3 (zero-padded) = each series alone
    lengths = torch.tensor([5, 3])
    emb[1, 3:] = 0
    both = stage(emb, logits, lengths)
    alone = stage(emb[1:, :3], logits[1:, :3])
    torch.testing.assert_close(both[1, :3], alone[0])
    torch.testing.assert_close(both[1, 3:], logits[1, 3:])
    assert not torch.allclose(both[0], logits[0])


# ------------------------------------------------------------------ bundles


def test_two_stage_bundle_round_trip(tmp_path: Path) -> None:
    path = _two_stage_bundle(tmp_path / "two.safetensors")
    card = check_bundle(path)
    assert card.stages == ("cnn", "sequence") and card.has_sequence and card.context == 1
    assert card.sequence["embedding_dim"] == 512 and card.sequence["key_prefix"] == SEQUENCE_PREFIX
    keys = set(load_file(str(path)))
    assert any(k.startswith(SEQUENCE_PREFIX) for k in keys)
    assert (
        "backbone.conv1.weight" in keys
        and load_file(str(path))["backbone.conv1.weight"].shape[1] == 5
    )
    bundle = load_bundle(path)
    assert bundle.sequence is not None and bundle.model.in_channels == 5
    torch.testing.assert_close(bundle.sequence.head.weight, _trained_like_sequence(512).head.weight)


def test_a_card_naming_a_sequence_stage_the_file_lacks_is_refused(tmp_path: Path) -> None:
    model = build_model("resnet18")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    card = _card(stages=("cnn", "sequence"), sequence={"embedding_dim": 512, "hidden": 16})
    card = replace(card, sha256=weights_sha256(state))
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata={CARD_KEY: card.to_json()})
    with pytest.raises(BundleError, match="sequence stage"):
        load_bundle(path)
    card = replace(card, stages=("sequence",))
    save_file(state, str(path), metadata={CARD_KEY: card.to_json()})
    with pytest.raises(BundleError, match="unknown stages"):
        check_bundle(path)


def test_a_bundle_written_before_context_and_stages_still_loads(tmp_path: Path) -> None:
    """A card without the new fields (as older ich-node wrote them) is a one-stage CNN."""
    torch.manual_seed(0)
    model = build_model("resnet18")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    data = json.loads(replace(_card(), sha256=weights_sha256(state)).to_json())
    for key in ("context", "stages", "sequence"):
        del data[key]
    path = tmp_path / "old.safetensors"
    save_file(state, str(path), metadata={CARD_KEY: json.dumps(data)})
    head = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert "stages" not in head["__metadata__"][CARD_KEY]
    bundle = load_bundle(path)
    assert bundle.card.stages == ("cnn",) and bundle.card.context == 0
    assert bundle.sequence is None and bundle.model.in_channels == 3


# ------------------------------------------------------------------ serving


def test_classifier_runs_cnn_then_sequence_with_context(tmp_path: Path) -> None:
    """predict_series (node and predict) = CNN on 2.5D input, then the sequence stage.

    Batches of 4 slices: the context across batch borders must be the real
    neighbours, i.e. equal to building the input for the whole series at once.
    """
    from ich_node.imaging.preprocess import model_hu, preprocess_hu
    from ich_node.imaging.series import load_series_hu
    from ich_node.model.inference import Classifier
    from training.phantom import write_series

    ph = write_series(tmp_path / "s", seed=3, subtypes=("subdural",), n_slices=10, matrix=96)
    series = read_series(ph.paths)
    bundle = load_bundle(_two_stage_bundle(tmp_path / "two.safetensors"))
    clf = Classifier(bundle, device="cpu", batch_size=4)
    pred = clf.predict_series(series)
    whole = add_slice_context(
        preprocess_hu(model_hu(series, load_series_hu(series)), bundle.card.windows, 64), 1
    )
    np.testing.assert_allclose(pred.images, whole, atol=1e-6)
    with torch.no_grad():
        emb, logits = bundle.model.embed(torch.from_numpy(whole))
        expected = torch.sigmoid(bundle.sequence(emb[None], logits[None])[0]).numpy()  # type: ignore[misc]
        cnn = torch.sigmoid(logits).numpy()
    got = pred.findings.slice_probabilities()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert pred.cnn_probabilities is not None
    np.testing.assert_allclose(pred.cnn_probabilities, cnn, atol=1e-4)
    assert np.abs(got - cnn).max() > 1e-3  # the sequence stage did change something
    for j, label in enumerate(LABELS):
        assert pred.findings.series[label].probability == pytest.approx(float(got[:, j].max()))
    assert pred.cams is not None and pred.cams.shape[:2] == (10, 6)  # the CNN's CAMs
    d = pred.findings.to_dict()
    assert d["model"]["stages"] == ["cnn", "sequence"] and d["model"]["tta"] is False
    alone = Classifier(bundle, device="cpu", batch_size=4, sequence=False).predict_series(series)
    np.testing.assert_allclose(alone.findings.slice_probabilities(), cnn, atol=1e-4)
    assert alone.findings.to_dict()["model"]["stages"] == ["cnn"]


def test_tta_averages_the_mirror_and_is_recorded(tmp_path: Path, tiny_bundle: Path) -> None:
    from ich_node.model.inference import Classifier
    from ich_node.results.findings import SeriesFindings
    from ich_node.results.sr import summary_text
    from training.phantom import write_series

    ph = write_series(tmp_path / "s", seed=4, subtypes=("epidural",), n_slices=6, matrix=96)
    series = read_series(ph.paths)
    bundle = load_bundle(tiny_bundle)
    plain = Classifier(bundle, device="cpu", batch_size=8)
    tta = Classifier(bundle, device="cpu", batch_size=8, tta=True)
    pred = tta.predict_series(series)
    images = pred.images
    with torch.no_grad():
        a = bundle.model(torch.from_numpy(images))
        b = bundle.model(torch.from_numpy(images).flip(-1))
    expected = torch.sigmoid((a + b) / 2).numpy()
    np.testing.assert_allclose(pred.findings.slice_probabilities(), expected, atol=1e-4)
    no_tta = plain.predict_series(series)
    assert not np.allclose(no_tta.findings.slice_probabilities(), expected, atol=1e-5)
    assert pred.cams is not None and no_tta.cams is not None
    data = pred.findings.to_dict()
    assert data["model"]["tta"] is True
    again = SeriesFindings.from_dict(json.loads(json.dumps(data)))
    assert again.model.tta and again.model.stages == ("cnn",)
    text = summary_text(pred.findings, bundle.card)
    assert "Test-time augmentation" in text
    assert "Test-time augmentation" not in summary_text(no_tta.findings, bundle.card)
    # findings written before these fields existed still read, as one-stage, no TTA
    old = json.loads(json.dumps(no_tta.findings.to_dict()))
    del old["model"]["stages"], old["model"]["tta"]
    restored = SeriesFindings.from_dict(old)
    assert restored.model.stages == ("cnn",) and restored.model.tta is False


def test_model_rejects_images_of_the_wrong_channel_count(tiny_bundle: Path) -> None:
    from ich_node.model.inference import Classifier

    clf = Classifier(load_bundle(tiny_bundle), device="cpu")
    with pytest.raises(ValueError, match=r"\(S, 3, H, W\)"):
        clf.predict_images(np.zeros((1, 5, 64, 64), np.float32))
    assert ICHClassifier("resnet18", in_channels=5)(torch.zeros(1, 5, 64, 64)).shape == (1, 6)


def test_training_dataset_builds_the_same_context_as_the_node(tmp_path: Path) -> None:
    """SliceDataset(context=1) gives each slice exactly the node's 2.5D input."""
    from ich_node.imaging import DEFAULT_WINDOWS
    from ich_node.model.inference import Classifier
    from training.data import SliceDataset, build_index
    from training.phantom import write_dataset

    write_dataset(tmp_path / "d", 2, seed=4, n_slices=5, matrix=96)
    index = build_index(tmp_path / "d" / "images", tmp_path / "d" / "stage_2_train.csv")
    ds = SliceDataset(index.records, DEFAULT_WINDOWS, 64, context=1)
    bundle = load_bundle(_two_stage_bundle(tmp_path / "two.safetensors"))
    clf = Classifier(bundle, device="cpu", batch_size=2)
    for uid in sorted({r.series_uid for r in index.records}):
        rows = [i for i, r in enumerate(index.records) if r.series_uid == uid]
        series = read_series([index.records[i].path for i in rows])
        node = np.concatenate([b.images.numpy() for b in clf.prepared_batches(series)])
        train = np.stack([ds[i][0].numpy() for i in rows])  # type: ignore[index]
        assert train.shape == node.shape == (5, 5, 64, 64)
        np.testing.assert_allclose(train, node, atol=1e-6)


def test_predict_cli_with_a_two_stage_bundle_and_tta(tmp_path: Path) -> None:
    from ich_node.service.cli import main
    from training.phantom import write_series

    ph = write_series(tmp_path / "in", seed=6, subtypes=("subdural",), n_slices=6, matrix=96)
    bundle = _two_stage_bundle(tmp_path / "two.safetensors")
    argv = ["predict", "--bundle", str(bundle), "--out", str(tmp_path / "out"), "--tta"]
    assert main([*argv, str(tmp_path / "in")]) == 0
    data = json.loads((tmp_path / "out" / ph.series_instance_uid / "findings.json").read_text())
    assert data["model"]["stages"] == ["cnn", "sequence"] and data["model"]["tta"] is True
    assert len(data["slices"]) == 6


def test_the_node_worker_serves_a_two_stage_context_bundle_with_tta(tmp_path: Path) -> None:
    """The worker's pipeline (reader thread decodes batches with their neighbours, model
    thread runs CNN -> sequence) gives the findings of the series read alone."""
    import threading
    import time

    from benchmarks.common import queue_series
    from ich_node.config import parse_config
    from ich_node.model.inference import Classifier
    from ich_node.queue.layout import results_dir
    from ich_node.queue.store import Store
    from ich_node.service.worker import Worker
    from training.phantom import write_series

    ph = write_series(tmp_path / "s", seed=8, subtypes=("subdural",), n_slices=9, matrix=96)
    bundle = load_bundle(_two_stage_bundle(tmp_path / "two.safetensors"))
    classifier = Classifier(bundle, device="cpu", batch_size=4, tta=True)
    config = parse_config({"storage": {"dir": str(tmp_path / "node")}})
    store = Store.open(config.storage.dir)
    job = queue_series(store, ph.paths, time.time() - 10)
    worker = Worker(config, "w0", store, classifier, batches_ahead=1)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), kwargs={"poll_seconds": 0.02})
    runner.start()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and store.job(job.job_id).state not in (  # type: ignore[union-attr]
            "done", "retry", "parked",
        ):  # fmt: skip
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(120)
    assert store.job(job.job_id).state == "done"  # type: ignore[union-attr]
    findings = json.loads(
        (results_dir(config.storage.dir, job.job_id) / "findings.json").read_text()
    )
    assert findings["model"]["stages"] == ["cnn", "sequence"] and findings["model"]["tta"] is True
    alone = classifier.predict_series(read_series(list(ph.paths))).findings
    for got, want in zip(findings["slices"], alone.slices, strict=True):
        assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-5)
