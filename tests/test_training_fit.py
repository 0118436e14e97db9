"""training.train: learning on phantoms, resume, DDP equivalence, CLI fit + evaluate."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from training.settings import FitSettings, resolve
from training.train import DistInfo, fit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 phantom studies of exactly 8 slices at 128 px: 128 images.

    With ``val_fraction=0.375`` and seed 0, 6 patients (48 images, 14 with
    hemorrhage) validate and 80 images train (a multiple of 2 ranks x batch 4).
    """
    from training.phantom import write_dataset

    root = tmp_path_factory.mktemp("fitdata")
    write_dataset(root, 16, seed=13, n_slices=8, matrix=128)
    return root


def _settings(data: Path, out: Path, **kw: object) -> FitSettings:
    base: dict[str, object] = {
        "images": data / "images",
        "labels": data / "stage_2_train.csv",
        "out": out,
        "arch": "resnet18",
        "image_size": 48,
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_epochs": 0.5,
        "val_fraction": 0.375,
        "workers": 0,
        "progress": False,
        "seed": 0,
    }
    base.update(kw)
    return resolve(None, **base)


def _params(path: Path, buffers: bool = True) -> dict[str, torch.Tensor]:
    state = load_file(str(path))
    if buffers:
        return state
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def test_default_preset_equals_builtin_defaults() -> None:
    preset = yaml.safe_load((REPO / "config" / "train_default.yaml").read_text())
    assert preset == FitSettings().to_dict()
    resolve(REPO / "config" / "train_demo.yaml")  # valid keys and values


def test_fit_learns_phantom_hemorrhage(phantom_data: Path, tmp_path: Path) -> None:
    """A short CPU run must learn: training-split AUC(any) near 1, validation above chance.

    80 training images are too few to generalise well (the demo preset,
    tested in test_demo_model.py, reaches validation AUC(any) > 0.9); this fast variant checks that
    labels, loss, optimiser and export fit together: a broken loop stays near 0.5.
    """
    from ich_node.imaging import DEFAULT_WINDOWS
    from training.data import SliceDataset, build_index, split_by_patient
    from training.metrics import roc_auc
    from training.train import predict

    settings = _settings(
        phantom_data, tmp_path / "run", image_size=64, epochs=10, batch_size=16, lr=2e-3,
        rotate_deg=0.0, scale=0.0, translate=0.0,
    )  # fmt: skip
    result = fit(settings, say=lambda _m: None)
    assert result.bundle_path is not None and result.card is not None
    bundle = load_bundle(result.bundle_path)
    index = build_index(phantom_data / "images", phantom_data / "stage_2_train.csv")
    split = split_by_patient(index, val_fraction=settings.val_fraction, seed=settings.seed)
    train_set = SliceDataset([index.records[i] for i in split.train], DEFAULT_WINDOWS, 64)
    idx, probs = predict(bundle.model, train_set, torch.device("cpu"), settings, DistInfo())
    truth = np.asarray([train_set.records[i].labels[0] for i in idx])
    assert roc_auc(truth, probs[:, 0]) > 0.9, "the model cannot even fit its training split"
    val_auc = result.card.metrics["validation"]["images"]["roc_auc"]["any"]
    assert val_auc > 0.5, f"validation AUC(any) {val_auc} is not above chance"
    assert result.metrics[-1]["train_loss"] < 0.8 * result.metrics[0]["train_loss"]
    assert bundle.card.demo and "synthetic phantoms" in bundle.card.training_data
    assert bundle.card.split["unit"] == "patient"
    assert set(bundle.card.thresholds) == set(LABELS)
    assert bundle.card.training["arch"] == "resnet18" and bundle.card.input_size == 64
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, 11))
    for row in map(json.loads, lines):  # throughput, as the guide's GPU table records it
        assert row["train_slices_per_s"] == round(row["train_images"] / row["train_s"], 1)
        assert 0 < row["train_s"] <= row["time_s"]
    written = yaml.safe_load((tmp_path / "run" / "settings.yaml").read_text())
    assert written["batch_size"] == 16 and written["epochs"] == 10
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 10


def test_resume_continues_where_it_stopped(phantom_data: Path, tmp_path: Path) -> None:
    said: list[str] = []
    full = fit(_settings(phantom_data, tmp_path / "full"), say=said.append)
    # After the first of the two epochs: an estimate of the rest, from its time.
    first = next(i for i, m in enumerate(said) if m.startswith("epoch 1/2"))
    assert said[first + 1].startswith("estimate: the remaining 1 epoch take at most about ")
    assert not any(m.startswith("estimate:") for m in said[first + 2 :])
    part = fit(_settings(phantom_data, tmp_path / "part", stop_after_epochs=1), say=lambda _m: None)
    assert part.bundle_path is None
    assert torch.load(part.checkpoint_path, weights_only=True)["epoch"] == 1
    rest = fit(
        _settings(phantom_data, tmp_path / "part", resume=part.checkpoint_path),
        say=lambda _m: None,
    )
    assert [m["epoch"] for m in rest.metrics] == [2]
    assert rest.metrics[0]["train_loss"] == pytest.approx(full.metrics[1]["train_loss"], rel=1e-5)
    a, b = _params(full.bundle_path), _params(rest.bundle_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert full.card.thresholds == pytest.approx(rest.card.thresholds, abs=1e-4)
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        fit(_settings(phantom_data, tmp_path / "x", resume=part.checkpoint_path, lr=0.1))


def _ddp_worker(rank: int, world: int, port: int, settings: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        fit(FitSettings(**settings), dist=DistInfo(rank, world, rank), say=lambda _m: None)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_with_accumulation(
    phantom_data: Path, tmp_path: Path
) -> None:
    """2 gloo ranks x batch 4 == 1 process x batch 4 x 2 accumulation steps.

    Parameters must agree; BatchNorm running statistics are not compared (DDP
    keeps rank 0's, one process averages both micro-batches into them).
    """
    import torch.multiprocessing as mp

    common = {"optimizer": "sgd", "lr": 0.01, "batch_size": 4, "epochs": 1, "warmup_epochs": 0.0}
    one = _settings(phantom_data, tmp_path / "one", accum_steps=2, **common)
    two = _settings(phantom_data, tmp_path / "two", **common)
    torch.set_num_threads(1)
    try:
        result = fit(one, say=lambda _m: None)
    finally:
        torch.set_num_threads(2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, two.to_dict()), nprocs=2, start_method="spawn")
    a = _params(result.bundle_path, buffers=False)
    b = _params(tmp_path / "two" / "model.safetensors", buffers=False)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    loss_one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text())["train_loss"]
    loss_two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text())["train_loss"]
    assert loss_one == pytest.approx(loss_two, rel=1e-4)
    moved = max(float((a[k] - v).abs().max()) for k, v in _initial_params().items())
    assert moved > 1e-3  # the runs really trained


def _initial_params() -> dict[str, torch.Tensor]:
    from ich_node.model.networks import build_model

    torch.manual_seed(0)
    state = build_model("resnet18").state_dict()
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def test_cli_fit_then_evaluate(phantom_data: Path, tmp_path: Path, capsys) -> None:
    from training.cli import main

    out = tmp_path / "cli"
    rc = main([
        "fit", "--images", str(phantom_data / "images"),
        "--labels", str(phantom_data / "stage_2_train.csv"), "--arch", "resnet18",
        "--image-size", "48", "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--out", str(out), "--val-fraction", "0.375", "--no-progress", "--version", "9.9.9",
    ])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "random weights" in text and "--pretrained" in text
    for name in ("model.safetensors", "settings.yaml", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).is_file(), name
    split = json.loads((out / "split.json").read_text())
    studies = tmp_path / "val_studies.txt"
    studies.write_text("\n".join(split["val_studies"]) + "\n")
    report_path = tmp_path / "report" / "REPORT.json"
    rc = main([
        "evaluate", "--bundle", str(out / "model.safetensors"),
        "--images", str(phantom_data / "images"),
        "--labels", str(phantom_data / "stage_2_train.csv"),
        "--out", str(report_path), "--studies", str(studies), "--cache-dir", str(out / "cache"),
    ])  # fmt: skip
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["bundle"]["version"] == "9.9.9"
    assert report["data"]["n_studies"] == len(split["val_studies"]) == 6
    assert report["data"]["n_images"] == 48
    # The card's validation metrics came from the same (cached) images, the same way.
    card = load_bundle(out / "model.safetensors").card
    for level in ("images", "studies"):
        assert report[level]["weighted_log_loss"] == pytest.approx(
            card.metrics["validation"][level]["weighted_log_loss"], rel=1e-4
        )
        assert report[level]["f1"]["macro"] == pytest.approx(
            card.metrics["validation"][level]["f1"]["macro"]
        )
    md = report_path.with_suffix(".md").read_text()
    assert "| f1 | macro |" in md and "published ResNeXt-101" in md
    assert np.isfinite(report["images"]["accuracy"])


def test_remaining_estimate_wording() -> None:
    from training.train import remaining_estimate

    assert "the remaining 11 epochs take at most about 3 min " in remaining_estimate(14.0, 11)
    assert "the remaining 1 epoch take at most about 40 s " in remaining_estimate(40.0, 1)
    assert "about 51 min" in remaining_estimate(279.0, 11)
