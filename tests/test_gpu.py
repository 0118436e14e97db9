"""What only a CUDA device can show: bf16 training, compiled bf16 inference, the worker on a GPU.

Marked ``gpu`` and skipped without CUDA (CI has none). ``scripts/gpu_check.sh``
runs them on a GPU machine together with the GPU benchmarks. The same code paths
with ``device="cpu"`` are covered by the rest of the suite; these check that
nothing is CPU-only (a tensor left on the host, a dtype autocast does not handle).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def test_fit_with_bf16_and_channels_last_on_cuda(tmp_path: Path) -> None:
    """A short run learns, in bf16 autocast and channels-last, and exports a bundle."""
    from ich_node.model.bundle import load_bundle
    from training.phantom import write_dataset
    from training.settings import resolve
    from training.train import fit

    write_dataset(tmp_path / "data", 12, seed=3, n_slices=8, matrix=128)
    settings = resolve(
        None,
        images=tmp_path / "data" / "images",
        labels=tmp_path / "data" / "stage_2_train.csv",
        out=tmp_path / "run",
        arch="resnet18",
        image_size=128,
        epochs=3,
        batch_size=16,
        device="cuda",
        amp=True,
        channels_last=True,
        workers=2,
        progress=False,
    )
    result = fit(settings, say=lambda _m: None)
    assert result.bundle_path is not None
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) and r["train_slices_per_s"] > 0 for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    bundle = load_bundle(result.bundle_path)  # saved from the GPU, loads anywhere
    assert bundle.card.training["device"] == "cuda" and bundle.card.training["amp"] is True


def test_compiled_bf16_classifier_on_cuda_matches_eager(tiny_bundle: Path, tmp_path: Path) -> None:
    from ich_node.imaging import read_series
    from ich_node.model.bundle import load_bundle
    from ich_node.model.inference import Classifier
    from training.phantom import write_series

    phantom = write_series(tmp_path / "s", seed=4, subtypes=("subdural",), n_slices=7, matrix=128)
    series = read_series(list(phantom.paths))
    eager = Classifier(load_bundle(tiny_bundle), device="cuda", batch_size=4)
    compiled = Classifier(load_bundle(tiny_bundle), device="cuda", batch_size=4, compile=True)
    assert eager.precision == compiled.precision == "bf16"  # auto on CUDA
    compiled.warmup()
    a, b = eager.predict_series(series), compiled.predict_series(series)  # 4 + 3 (padded)
    np.testing.assert_allclose(
        a.findings.slice_probabilities(), b.findings.slice_probabilities(), atol=0.02
    )
    assert a.cams is not None and b.cams is not None
    np.testing.assert_allclose(a.cams, b.cams, atol=0.05 * float(np.abs(a.cams).max()))


def test_worker_pipeline_on_cuda_gives_the_cpu_findings(tiny_bundle: Path, tmp_path: Path) -> None:
    """Worker.run on the GPU: every job done, probabilities within bf16 of the CPU's."""
    from benchmarks.common import queue_series
    from ich_node.config import parse_config
    from ich_node.imaging import read_series
    from ich_node.model.bundle import load_bundle
    from ich_node.model.inference import Classifier
    from ich_node.queue.layout import results_dir
    from ich_node.queue.store import Store
    from ich_node.service.worker import Worker
    from training.phantom import write_series

    config = parse_config({"storage": {"dir": str(tmp_path / "node")}})
    store = Store.open(config.storage.dir)
    phantoms = [
        write_series(tmp_path / f"s{i}", seed=20 + i, subtypes=s, n_slices=12, matrix=256)
        for i, s in enumerate([("subdural",), (), ("intraparenchymal",)])
    ]
    jobs = [queue_series(store, p.paths, time.time() - 10 + i) for i, p in enumerate(phantoms)]
    gpu = Classifier(load_bundle(tiny_bundle), device="cuda", batch_size=8)
    worker = Worker(config, "gpu-0", store, gpu)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
            store.job(j.job_id).state != "done"  # type: ignore[union-attr]
            for j in jobs
        ):
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(60)
    cpu = Classifier(load_bundle(tiny_bundle), device="cpu")
    for job, phantom in zip(jobs, phantoms, strict=True):
        assert store.job(job.job_id).state == "done"  # type: ignore[union-attr]
        folder = results_dir(config.storage.dir, job.job_id)
        got = json.loads((folder / "findings.json").read_text())
        want = cpu.predict_series(read_series(list(phantom.paths))).findings
        for g, w in zip(got["slices"], want.slices, strict=True):
            assert g["sop_instance_uid"] == w.sop_instance_uid
            assert g["probabilities"] == pytest.approx(w.probabilities, abs=0.05)
        assert list((folder / "outbox").rglob("*.dcm"))
