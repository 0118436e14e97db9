"""Shadow mode (``node.mode: shadow``): read and record everything, send nothing.

Except to the destinations and notification targets that set ``shadow: true``.
The filter sits where deliveries and alerts are created (the worker's completion,
``prepare_alerts``): the store holds no row for a target that will never be sent
to. Tested here with a real worker on both store backends; through ``serve`` with
real peers in ``tests/test_audit_node.py`` (which then audits that node).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import free_port, queue_series, random_bundle
from ich_node.config import Destination as DestinationConfig
from ich_node.config import parse_config, sent_in_mode
from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.layout import results_dir
from ich_node.queue.store import Store
from ich_node.service.worker import Worker
from training.phantom import PhantomSeries, write_series

OpenStore = Callable[[Path], Store]
Section = Callable[[Path], Any]


def test_sent_in_mode() -> None:
    a = DestinationConfig(name="pacs", ae_title="PACS", host="h", port=104)
    b = DestinationConfig(name="research", ae_title="RES", host="h", port=104, shadow=True)
    assert sent_in_mode((a, b), "live") == (a, b)
    assert sent_in_mode((a, b), "shadow") == (b,)
    assert parse_config({}).node.mode == "live"  # old configs keep sending


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    root = tmp_path_factory.mktemp("shadow_phantom")
    return write_series(root / "s", seed=23, subtypes=("subdural",), n_slices=10, matrix=128)


@pytest.fixture(scope="module")
def positive(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    # Random weights give probabilities near 0.5: at 0.01 every label is positive.
    path = random_bundle(tmp_path_factory.mktemp("b") / "m.safetensors", name="shadow model",
                         thresholds=dict.fromkeys(LABELS, 0.01))  # fmt: skip
    return Classifier(load_bundle(path), device="cpu", batch_size=8)


def _targets(*, shadow_target: bool) -> list[dict[str, Any]]:
    return [
        {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": free_port(),
         "receiving_application": "RIS", "receiving_facility": "HOSP"},
        {"name": "validation", "kind": "hl7", "host": "127.0.0.1", "port": free_port(),
         "receiving_application": "VAL", "receiving_facility": "HOSP", "shadow": shadow_target},
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["live", "shadow"])
def test_worker_queues_only_what_the_mode_sends(
    tmp_path: Path, storage_section: Section, open_store: OpenStore, study: PhantomSeries,
    positive: Classifier, mode: str,
) -> None:  # fmt: skip
    config = parse_config(
        {
            "node": {"mode": mode},
            "storage": {"dir": str(tmp_path / "node"),
                        "database": storage_section(tmp_path / "node").database},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()},
                {"name": "research", "ae_title": "RES", "host": "127.0.0.1", "port": free_port(),
                 "shadow": True},
            ],
            "notifications": _targets(shadow_target=True),
        }
    )  # fmt: skip
    store = open_store(config.storage.dir)
    job = queue_series(store, study.paths, time.time() - 5)
    outcome = Worker(config, "w0", store, positive).run_once(time.time())
    assert outcome is not None and outcome.state == "done", outcome
    rows = sorted(d.destination for d in store.deliveries(job.job_id))
    alerts = sorted(a.target for a in store.alerts(job.job_id))
    if mode == "live":
        assert rows == ["alert:ris", "alert:validation", "pacs", "research"]
        assert alerts == ["ris", "validation"]
    else:
        assert rows == ["alert:validation", "research"]
        assert alerts == ["validation"]
        # No record for a target never told (the alert records hold patient identifiers).
        assert not (config.storage.dir / "alerts" / job.job_id / "ris.json").exists()
    # Read and recorded as usual either way: the findings and the SR are made.
    folder = results_dir(config.storage.dir, job.job_id)
    assert json.loads((folder / "findings.json").read_text())["series"]["any"]["positive"]
    assert (folder / "outbox" / "sr.dcm").is_file()


def test_check_config_says_the_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_bundle: Path
) -> None:
    from ich_node.service.cli import main

    path = tmp_path / "node.yaml"
    path.write_text(
        json.dumps(
            {
                "node": {"mode": "shadow"},
                # check-config checks what serve needs: callers, a bundle, storage.
                "callers": [{"ae_title": "CT1"}],
                "model": {"bundle": str(tiny_bundle), "device": "cpu"},
                "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 0},
                "destinations": [{"name": "research", "ae_title": "RES", "host": "h",
                                  "port": 104, "shadow": True}],
            }
        )
    )  # fmt: skip
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mode: shadow (read and recorded, not sent; sent only to research: shadow: true)" in out
