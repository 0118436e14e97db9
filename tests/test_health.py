"""health tells the truth (#30 item 3): it fails, naming the part, while images are
refused for disk, while the store cannot be written, when no worker beats (a clean stop
removes the heartbeats at once) and when a delivery has been parked too long; ``--json``
gives the parts. ``status`` shows the refusals and the last reasons of skips. Both
store backends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from benchmarks import common
from ich_node.config import NodeConfig, QueueSection, parse_config
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool
from ich_node.queue.backend import job_queue
from ich_node.queue.jobs import job_id_for
from ich_node.queue.store import InstanceRecord, Store
from ich_node.service.ops import health, status

OpenStore = Callable[[Path], Store]


def _config(tmp_path: Path, storage_section: Callable[..., Any], **sections: Any) -> NodeConfig:
    section = storage_section(tmp_path / "node")
    data: dict[str, Any] = {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": common.free_port()},
        "callers": [{"ae_title": "MODALITY"}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        "storage": {"dir": str(tmp_path / "node"), "database": section.database,
                    "node_id": "h1", "min_free_mb": 0},
    }  # fmt: skip
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_config(data)


@pytest.fixture
def listening(
    tmp_path: Path, storage_section: Callable[..., Any], open_store: OpenStore
) -> Iterator[Callable[..., tuple[NodeConfig, Store, Any]]]:
    servers: list[Any] = []

    def start(**storage: Any) -> tuple[NodeConfig, Store, Any]:
        config = _config(tmp_path, storage_section, storage=storage)
        store = open_store(config.storage.dir)
        spool = Spool(config.storage.dir, store, config.storage.min_free_mb)
        server = start_listener(config, spool)
        servers.append(server)
        return config, store, server

    yield start
    for server in servers:
        server.shutdown()


def _json_in(out: str) -> Any:
    """The JSON document a command printed (log lines of the listener may come first)."""
    start = out.index("{") if out.startswith("{") else out.index("\n{") + 1
    return json.loads(out[start:])


def _parts(
    config: NodeConfig, role: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = health(config, role=role, as_json=True)
    report = _json_in(capsys.readouterr().out)
    assert report["ok"] is (code == 0)
    return code, {p["name"]: p for p in report["parts"]}


def test_health_fails_while_min_free_mb_is_not_met_and_status_shows_the_refusals(
    listening: Callable[..., tuple[NodeConfig, Store, Any]],
    capsys: pytest.CaptureFixture[str],
    phantom_series: Any,
) -> None:
    config, store, server = listening(min_free_mb=10**9)  # more than any disk here
    code, parts = _parts(config, "listener", capsys)
    assert code == 1
    assert parts["listener"]["ok"] and parts["store"]["ok"]  # it answers, it could write
    assert not parts["disk"]["ok"]
    assert "below storage.min_free_mb 1000000000" in parts["disk"]["detail"]
    assert "images are refused (0xA700)" in parts["disk"]["detail"]
    # The text form names the part too.
    assert health(config, role="listener") == 1
    assert "disk: FAIL: " in capsys.readouterr().out

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", config.node.port, ae_title="ICH_NODE")
    assert assoc.send_c_store(pydicom.dcmread(phantom_series.paths[0])).Status == 0xA700
    assoc.release()
    server.store_refusals.flush(store, time.time())  # as the serving loop does each pass
    assert status(config, as_json=False) == 0
    out = capsys.readouterr().out
    assert "refusals: disk_low 1" in out
    assert "disk_low: last" in out and "storage.min_free_mb not met" in out
    assert "below storage.min_free_mb" in out
    assert status(config, as_json=True) == 0
    report = _json_in(capsys.readouterr().out)
    assert report["refusals"]["disk_low"]["n"] == 1 and report["disk"]["accepting"] is False


def test_health_is_green_when_the_listener_can_take_images(
    listening: Callable[..., tuple[NodeConfig, Store, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _, _ = listening(min_free_mb=0)
    code, parts = _parts(config, "listener", capsys)
    assert code == 0, parts
    assert set(parts) >= {"listener", "disk", "store"}
    assert parts["store"]["detail"] == "writable"


def test_health_names_each_destination_parked_too_long(
    tmp_path: Path,
    storage_section: Callable[..., Any],
    open_store: OpenStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    queue = job_queue(store, QueueSection())
    now = time.time()
    prefix = "h1." if config.storage.database else ""
    store.heartbeat(f"{prefix}worker-0", os.getpid(), now)  # a worker beats
    store.add_instance(
        InstanceRecord("1.2.3.1", "1.2", "1.2", "1.2.3", "CT", "", "", ""),
        config.storage.dir / "spool" / "a.dcm", 1, now,
    )  # fmt: skip
    store.queue_series("1.2.3", 1, job_id_for, now)
    job = queue.lease("w", now)
    assert job is not None
    queue.complete(job, ["pacs"], 1, now)
    store.finish_delivery(
        job.job_id, "pacs", "parked", "after 8 attempts: refused", now, now - 7200
    )
    code, parts = _parts(config, "worker", capsys)
    assert code == 1
    assert parts["workers"]["ok"] and "workers alive: 1/1" in parts["workers"]["detail"]
    assert not parts["destinations"]["ok"]
    assert "pacs: 1 parked, the oldest 120 min" in parts["destinations"]["detail"]
    assert "health.max_parked_seconds 3600" in parts["destinations"]["detail"]
    # Parked for less than the configured time: not (yet) a failure.
    patient = config.model_copy(
        update={"health": config.health.model_copy(update={"max_parked_seconds": 10000.0})}
    )
    code, parts = _parts(patient, "worker", capsys)
    assert code == 0 and parts["destinations"]["ok"], parts


def test_health_fails_when_the_spool_cannot_be_written(
    tmp_path: Path, storage_section: Callable[..., Any], open_store: OpenStore,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    Spool(config.storage.dir, store, 0)  # makes spool/
    spool = config.storage.dir / "spool"
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(spool)]).returncode != 0:
            pytest.skip("root, and this file system has no immutable flag (chattr +i)")
        undo = [chattr, "-i", str(spool)]
    else:
        spool.chmod(0o500)
        undo = ["chmod", "700", str(spool)]
    try:
        code, parts = _parts(config, "listener", capsys)
    finally:
        subprocess.run(undo, check=True)
    assert code == 1
    assert not parts["store"]["ok"] and f"{spool} not writable" in parts["store"]["detail"]


def test_status_lists_the_last_skips_with_their_reasons(
    tmp_path: Path, storage_section: Callable[..., Any], open_store: OpenStore,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    config = _config(tmp_path, storage_section)
    store = open_store(config.storage.dir)
    for i, reason in enumerate(
        ("modality 'MR' is not in series.modalities", "2 slices, fewer than series.min_slices 10")
    ):
        uid = f"1.2.9.{i}"
        store.add_instance(
            InstanceRecord(f"{uid}.1", "1.2", "1.2", uid, "MR", "", "", ""),
            config.storage.dir / "spool" / f"{i}.dcm", 1, 100.0 + i,
        )  # fmt: skip
        store.skip_series(uid, 1, reason)
    assert status(config, as_json=False) == 0
    out = capsys.readouterr().out
    assert "recent skips: 2" in out
    assert "series 1.2.9.0 [skipped]: modality 'MR' is not in series.modalities" in out
    assert "series 1.2.9.1 [skipped]: 2 slices, fewer than series.min_slices 10" in out


def test_a_clean_stop_removes_the_heartbeats_at_once(
    tmp_path: Path,
    tiny_bundle: Path,
    storage_section: Callable[..., Any],
    open_store: OpenStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.test_node_e2e import Node

    config = _config(
        tmp_path,
        storage_section,
        storage={"min_free_mb": 1},
        model={"bundle": str(tiny_bundle), "device": "cpu"},
        logging={"format": "json"},
    )
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
    node = Node(path, config)
    node.start()
    try:
        store = open_store(config.storage.dir)
        prefix = "h1." if config.storage.database else ""
        common.wait_for(
            "the worker's heartbeat", lambda: f"{prefix}worker-0" in store.heartbeats(), 120
        )
        code, parts = _parts(config, "all", capsys)
        assert code == 0, parts
        assert node.stop() == 0
    finally:
        if node.process is not None:
            node.kill()
    # Before: "workers alive: 1/1" for about 15 s after a clean stop.
    assert not [n for n in store.heartbeats() if "worker" in n or n in ("node", "h1.all")]
    code, parts = _parts(config, "worker", capsys)
    assert code == 1 and "workers alive: 0/1" in parts["workers"]["detail"]
