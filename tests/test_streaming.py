"""The streaming read (series.streaming): slices scored while their series arrives.

A real store (both backends), real phantom files recorded one at a time as the
listener records them, a real (random) model. The stream stage is driven pass by
pass (:meth:`StreamStage.run_once`); the series is then completed as the assembler
does and the worker reads it. Each test compares the worker's ``findings.json``
with the same series read from scratch by the same classifier, and checks that
the CNN's outputs of the streamed slices were used at completion.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch

from ich_node.config import NodeConfig, parse_config
from ich_node.imaging import context_channels, read_series
from ich_node.ingest.spool import instance_record
from ich_node.labels import LABELS
from ich_node.model.bundle import ModelCard, load_bundle, save_bundle
from ich_node.model.inference import Classifier
from ich_node.model.networks import SequenceStage, build_model
from ich_node.queue.jobs import STREAM_AFFINITY_SECONDS, job_id_for
from ich_node.queue.layout import StorageLayout, path_part, results_dir
from ich_node.queue.store import Store
from ich_node.service.stream_stage import STREAM_LEASE_SECONDS, StreamStage, runs, signatures
from ich_node.service.worker import Worker
from training.phantom import PhantomSeries, write_series

OpenStore = Callable[[Path], Store]
Section = Callable[[Path], Any]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[PhantomSeries]:
    root = tmp_path_factory.mktemp("stream_phantoms")
    return [
        write_series(root / "a", seed=71, subtypes=("subdural",), n_slices=8, matrix=96),
        write_series(root / "b", seed=72, subtypes=(), n_slices=8, matrix=96),
    ]


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path) -> Classifier:
    return Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def context_classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    """A two-stage bundle with 2.5D slice context (one neighbour on each side)."""
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=context_channels((0, 1, 2), 1))
    stage = SequenceStage(512, hidden=16)
    with torch.no_grad():  # a non-zero head: a fresh one returns the CNN's logits
        stage.head.weight.normal_(0, 0.5)
        stage.head.bias.normal_(0, 0.5)
    card = ModelCard(name="stream context model", version="0", arch="resnet18", input_size=64,
                     demo=True, training_data="none: random weights", context=1)  # fmt: skip
    path = tmp_path_factory.mktemp("context") / "model.safetensors"
    save_bundle(path, model, card, stage.eval())
    return Classifier(load_bundle(path), device="cpu", batch_size=3)


class Clock:
    """Seconds since the epoch that move one second a call (each pass is a second later)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _config(tmp_path: Path, storage: Section, **series: Any) -> NodeConfig:
    return parse_config(
        {
            "storage": {
                "dir": str(tmp_path / "node"),
                "database": storage(tmp_path / "node").database,
            },
            "series": {"min_slices": 4, **series},
            "results": {"heatmaps": "none"},
        }
    )


def receive(store: Store, path: Path, now: float | None = None) -> str:
    """Spool one file and record it as the listener does; returns its SeriesInstanceUID."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    record = instance_record(ds, ds.SOPClassUID, ds.SOPInstanceUID)
    folder = StorageLayout(store.storage_dir).spool / path_part(record.study_instance_uid)
    folder = folder / path_part(record.series_instance_uid)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    spooled = Path(shutil.copy2(path, folder / path.name))
    store.add_instance(record, spooled, spooled.stat().st_size,
                       time.time() if now is None else now, digest=path.name)  # fmt: skip
    return str(ds.SeriesInstanceUID)


def complete(worker: Worker, uid: str) -> dict[str, Any]:
    """Queue the series as the assembler does, let the worker read it; its findings."""
    record = worker.store.series(uid)
    assert record is not None
    job = worker.store.queue_series(uid, record.n_instances, job_id_for, time.time())
    outcome = worker.run_once(time.time())
    assert outcome is not None and outcome.state == "done", outcome
    return dict(json.loads((results_dir(worker.config.storage.dir, job.job_id) /
                            "findings.json").read_text()))  # fmt: skip


def assert_equal_to_scratch(findings: dict[str, Any], paths: Sequence[Path], clf: Any) -> None:
    alone = clf.predict_series(read_series(list(paths))).findings
    assert [s["sop_instance_uid"] for s in findings["slices"]] == [
        s.sop_instance_uid for s in alone.slices
    ]
    for got, want in zip(findings["slices"], alone.slices, strict=True):
        assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-6, rel=0)
    for label in LABELS:
        assert findings["series"][label]["probability"] == pytest.approx(
            alone.series[label].probability, abs=1e-6, rel=0
        )
        assert findings["series"][label]["positive"] == alone.series[label].positive


def _order(kind: str, studies: list[PhantomSeries]) -> list[Path]:
    a, b = list(studies[0].paths), list(studies[1].paths)
    if kind == "in order":
        return a
    if kind == "reverse":
        return a[::-1]
    # interleaved with another series, each out of order
    mixed: list[Path] = []
    for x, y in zip(a[1::2] + a[::2], b[::-1], strict=True):
        mixed += [x, y]
    return mixed


@pytest.mark.parametrize("kind", ["in order", "reverse", "interleaved"])
def test_streamed_read_equals_the_read_from_scratch(
    kind: str,
    tmp_path: Path,
    studies: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    worker = Worker(config, "w0", store, classifier)
    assert worker.streamer is not None
    uids: list[str] = []
    clock = Clock()
    for path in _order(kind, studies):
        uid = receive(store, path)
        uids += [uid] if uid not in uids else []
        worker.streamer.run_once(clock())
    while worker.streamer.run_once(clock()):  # the last slices
        pass
    for uid, study in zip(uids, studies if kind == "interleaved" else studies[:1], strict=True):
        stream = worker.streams.get(uid)
        assert stream is not None and stream.scored == len(study.paths)
        cache = worker.streams.cache(uid)
        assert cache is not None
        findings = complete(worker, uid)
        # At completion the CNN ran on no slice: every one came from the stream.
        assert cache.hits == len(study.paths) and cache.misses == len(study.paths)
        assert_equal_to_scratch(findings, study.paths, classifier)


def test_slices_get_their_context_again_when_neighbours_arrive_later(
    tmp_path: Path,
    studies: list[PhantomSeries],
    context_classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    """2.5D: a slice scored with a missing neighbour (edge replicated) is scored again."""
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    worker = Worker(config, "w0", store, context_classifier)
    assert worker.streamer is not None
    paths = list(studies[0].paths)
    order = paths[::2] + paths[1::2]  # every other slice first: each one's neighbours later
    clock = Clock()
    for path in order:
        uid = receive(store, path)
        worker.streamer.run_once(clock())
    while worker.streamer.run_once(clock()):
        pass
    stream = worker.streams.get(uid)
    assert stream is not None
    # Each slice of the first half was scored alone; the second half re-scored them all.
    assert stream.scored > len(paths) + len(paths) // 2
    assert len(stream.cache) == len(paths)  # the outdated outputs were let go
    findings = complete(worker, uid)
    assert stream.cache.hits == len(paths)
    assert_equal_to_scratch(findings, paths, context_classifier)


def test_a_resent_slice_replaces_the_one_scored_before(
    tmp_path: Path,
    studies: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    import numpy as np

    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    worker = Worker(config, "w0", store, classifier)
    assert worker.streamer is not None
    paths = list(studies[0].paths)
    clock = Clock()
    for path in paths:
        uid = receive(store, path)
        worker.streamer.run_once(clock())
    while worker.streamer.run_once(clock()):
        pass
    # The modality sends slice 3 again with other pixels (a changed re-send).
    ds = pydicom.dcmread(paths[3])
    pixels = ds.pixel_array.copy()
    pixels[: len(pixels) // 2] = np.flipud(pixels[len(pixels) // 2 :][: len(pixels) // 2])
    ds.PixelData = pixels.tobytes()
    changed = tmp_path / "resent.dcm"
    ds.save_as(changed, enforce_file_format=True)
    receive(store, changed)
    worker.streamer.run_once(clock())
    stream = worker.streams.get(uid)
    assert stream is not None and stream.scored == len(paths) + 1
    assert len(stream.cache) == len(paths)
    final = store.instance_paths(uid)
    assert [p.name for p in final] == sorted(p.name for p in [changed, *paths[:3], *paths[4:]])
    findings = complete(worker, uid)
    assert stream.cache.hits == len(paths)
    assert_equal_to_scratch(findings, final, classifier)


def test_a_late_instance_after_completion_is_streamed_into_a_new_version(
    tmp_path: Path,
    studies: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    worker = Worker(config, "w0", store, classifier)
    assert worker.streamer is not None
    paths = list(studies[0].paths)
    clock = Clock()
    for path in paths[:6]:
        uid = receive(store, path)
        worker.streamer.run_once(clock())
    while worker.streamer.run_once(clock()):
        pass
    first = complete(worker, uid)
    assert first["version"] == 1 and len(first["slices"]) == 6
    worker.streamer.run_once(clock())  # its job is done: the stream ends
    assert worker.streams.get(uid) is None and store.streams() == []
    for path in paths[6:]:  # late instances: the series receives again
        receive(store, path)
        worker.streamer.run_once(clock())
    while worker.streamer.run_once(clock()):
        pass
    stream = worker.streams.get(uid)
    assert stream is not None and stream.series is not None
    assert len(stream.series.slices) == len(paths)
    second = complete(worker, uid)
    assert second["version"] == 2
    assert stream.cache.hits == len(paths)  # every slice of version 2 from the stream
    assert_equal_to_scratch(second, paths, classifier)


def test_one_worker_streams_a_series_and_its_job_waits_for_it(
    tmp_path: Path,
    studies: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    """The in-progress lease has one holder; its job is left to it, then to anyone."""
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    other = open_store(config.storage.dir)  # the second worker's own connection
    first = StreamStage(config, "w1", store, classifier, _streams(), _lock())
    second = StreamStage(config, "w2", other, classifier, _streams(), _lock())
    now = time.time()
    for path in studies[0].paths[:4]:
        uid = receive(store, path, now)
    first.run_once(now)
    second.run_once(now)
    assert first.streams.get(uid) is not None and second.streams.get(uid) is None
    assert [(s.series_instance_uid, s.worker) for s in store.streams()] == [(uid, "w1")]
    # w1 stops renewing (it died): once its lease ends, w2 takes the series over.
    later = now + STREAM_LEASE_SECONDS + 1
    second._taken_at = float("-inf")
    second.run_once(later)
    assert second.streams.get(uid) is not None
    assert [s.worker for s in other.streams()] == ["w2"]
    # Complete: the job is left to w2 (its stream holds the outputs) for a while.
    job = store.queue_series(uid, 4, job_id_for, later)
    queue = Worker(config, "w1", store, classifier).queue
    assert queue.lease("w1", later + 1) is None
    taken = queue.lease("w1", later + STREAM_AFFINITY_SECONDS + 1)
    assert taken is not None and taken.job_id == job.job_id


def test_a_dead_workers_streams_are_released_with_its_jobs(
    tmp_path: Path,
    studies: list[PhantomSeries],
    classifier: Classifier,
    open_store: OpenStore,
    storage_section: Section,
) -> None:
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    stage = StreamStage(config, "worker-0", store, classifier, _streams(), _lock())
    for path in studies[0].paths[:3]:
        receive(store, path)
    stage.run_once(time.time())
    assert [s.worker for s in store.streams()] == ["worker-0"]
    Worker(config, "x", store, classifier).queue.release_worker("worker-0", "died", time.time())
    assert store.streams() == []


def test_runs_and_signatures() -> None:
    assert list(runs([0, 1, 2, 5, 6, 9], 2)) == [(0, 2), (2, 3), (5, 7), (9, 10)]
    assert list(runs([], 4)) == []

    class S:
        def __init__(self, n: int) -> None:
            self.slices = [type("Slice", (), {"path": Path(f"{i}"), "frame_number": None})()
                           for i in range(n)]  # fmt: skip

    sigs = signatures(S(3), 1)  # type: ignore[arg-type]
    assert sigs[0] == (("0", None), ("0", None), ("1", None))  # the end replicates
    assert sigs[2] == (("1", None), ("2", None), ("2", None))
    assert signatures(S(3), 0)[1] == (("1", None),)  # type: ignore[arg-type]


def _streams() -> Any:
    from ich_node.service.stream_stage import Streams

    return Streams()


def _lock() -> Any:
    import threading

    return threading.Lock()
