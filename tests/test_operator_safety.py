"""Operator safety with real processes: one node per storage, bad bundles, crash loops.

Each test starts ``ich-node serve`` (or ``check-config``) as a child process on
127.0.0.1 with a configuration written here, the way an admin would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import common
from ich_node.config import load_config
from ich_node.queue.store import Store
from ich_node.service.ops import echo
from tests.conftest import dcmtk
from tests.test_node_e2e import Node, wait_for

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _config(tmp_path: Path, bundle: Path | str, **sections: dict[str, Any]) -> Path:
    data: dict[str, Any] = {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": common.free_port()},
        "callers": [{"ae_title": "MODALITY"}],
        # Nobody listens there: results wait in the outbox (serve needs a destination).
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        "series": {"stable_seconds": 0.5, "min_slices": 8},
        "model": {"bundle": str(bundle), "device": "cpu", "batch_size": 8},
        "queue": {"retry_base_seconds": 0.2},
        "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 1},
        "logging": {"format": "json", "level": "INFO"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ich_node.service.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every stderr line of a ``format: json`` node parsed (fails on a non-JSON line)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _worker_pid(storage: Path) -> int:
    store = Store.open(storage)
    try:
        return store.heartbeats()["worker-0"][0]
    finally:
        store.close()


def test_second_serve_on_locked_storage_exits_2_and_touches_nothing(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    path = _config(tmp_path, tiny_bundle)
    first = Node(path, load_config(path))
    first.start()
    try:
        assert first.process is not None
        storage = first.config.storage.dir
        worker = wait_for("the worker's heartbeat", lambda: _worker_pid(storage))
        started = (tmp_path / "node.log").read_text()
        assert '"serve.demo_bundle"' in started  # the test bundle is a DEMO bundle: said
        assert '"serve.recovered"' not in started  # a first, clean start recovers nothing
        # The same config (same port), then the same storage on another port.
        other = tmp_path / "other"
        other.mkdir()
        data = yaml.safe_load(path.read_text())
        data["node"]["port"] = common.free_port()
        (other / "node.yaml").write_text(yaml.safe_dump(data))
        for config in (path, other / "node.yaml"):
            second = _cli("serve", "--config", str(config), timeout=120)
            assert second.returncode == 2, second.stderr
            lines = _json_lines(second.stderr)
            locked = [e for e in lines if e["event"] == "serve.storage_locked"]
            assert len(locked) == 1, second.stderr
            assert locked[0]["pid"] == first.process.pid
            assert str(storage) in locked[0]["error"]
            assert f"pid {first.process.pid}" in locked[0]["error"]
            # Touched nothing: no recovery, no worker started or killed.
            events = {e["event"] for e in lines}
            assert not events & {"serve.recovered", "worker.started", "worker.leftover_killed"}
        assert _worker_pid(storage) == worker
        os.kill(worker, 0)  # still alive
        assert echo(first.config, timeout=5)
        # Read-only commands and resend work beside the live node.
        status = _cli("status", "--config", str(path), "--json")
        assert status.returncode == 0, status.stderr
        assert "worker-0" in json.loads(status.stdout)["heartbeats"]
        health = _cli("health", "--config", str(path))
        assert health.returncode == 0, health.stdout
        resend = _cli("resend", "--config", str(path), "no-such-job")
        assert resend.returncode == 1 and "no job" in resend.stdout
        assert first.stop() == 0
    finally:
        if first.process is not None:
            first.kill()
    # The lock dies with its holder: the storage serves again after a SIGKILL.
    again = Node(path, load_config(path))
    again.start()
    again.kill()
    third = Node(path, load_config(path))
    third.start()
    assert third.stop() == 0


def _bad_bundles(tmp_path: Path, tiny_bundle: Path) -> dict[str, tuple[Path, str]]:
    """Files an admin may point ``model.bundle`` at, and what the message must say."""
    yaml_file = tmp_path / "looks_like_config.yaml"
    yaml_file.write_text("model:\n  arch: resnet18\n")
    truncated = tmp_path / "truncated.safetensors"
    data = tiny_bundle.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flipped.safetensors"
    mutable = bytearray(data)
    mutable[-100] ^= 0xFF
    flipped.write_bytes(bytes(mutable))
    return {
        "yaml": (yaml_file, "not a safetensors model bundle"),
        "missing": (tmp_path / "absent.safetensors", "no such"),
        "truncated": (truncated, "truncated"),
        "checksum": (flipped, "SHA-256"),
        "folder": (tmp_path, "not a file"),
    }


def test_check_config_refuses_bad_bundles_naming_the_key(tmp_path: Path, tiny_bundle: Path) -> None:
    for kind, (bundle, what) in _bad_bundles(tmp_path, tiny_bundle).items():
        result = _cli("check-config", str(_config(tmp_path, bundle)))
        assert result.returncode == 2, (kind, result.stdout, result.stderr)
        assert "model.bundle" in result.stderr, kind
        assert str(bundle) in result.stderr, kind
        assert what in result.stderr, (kind, result.stderr)
        assert "ich-train fit" in result.stderr, kind
        assert "Traceback" not in result.stderr, kind
    good = _cli("check-config", str(_config(tmp_path, tiny_bundle)))
    assert good.returncode == 0, good.stderr
    assert "verified" in good.stdout


def test_serve_refuses_bad_bundle_before_touching_storage(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    bundles = _bad_bundles(tmp_path, tiny_bundle)
    for kind in ("yaml", "missing", "truncated"):
        bundle, what = bundles[kind]
        path = _config(tmp_path, bundle)
        result = _cli("serve", "--config", str(path), timeout=120)
        assert result.returncode == 2, (kind, result.stderr)
        lines = _json_lines(result.stderr)
        bad = [e for e in lines if e["event"] == "serve.bad_bundle"]
        assert len(bad) == 1 and bad[0]["key"] == "model.bundle", result.stderr
        assert bad[0]["path"] == str(bundle) and what in bad[0]["error"], bad
        assert "ich-train fit" in bad[0]["help"]
        assert not (tmp_path / "node").exists(), kind  # storage untouched


def _card_says(bundle: Path, out: Path, **changes: Any) -> Path:
    """A copy of ``bundle`` whose model card differs (weights and checksum unchanged)."""
    import struct

    data = bundle.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    card = json.loads(header["__metadata__"]["ich_node.model_card"])
    card.update(changes)
    header["__metadata__"]["ich_node.model_card"] = json.dumps(card)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return out


def test_worker_that_cannot_load_the_model_stops_serve_before_it_listens(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    # The card passes the torch-free check; the weights do not fit its architecture,
    # which only the worker (building the network) can find.
    bundle = _card_says(tiny_bundle, tmp_path / "wrong_arch.safetensors", arch="resnet50")
    path = _config(tmp_path, bundle)
    port = load_config(path).node.port
    process = subprocess.Popen(
        [sys.executable, "-m", "ich_node.service.cli", "serve", "--config", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    listened = False
    while process.poll() is None:
        listened = listened or common.port_open(port)
        time.sleep(0.1)
    stderr = process.stderr.read() if process.stderr else ""
    assert process.returncode == 2, stderr
    assert not listened
    lines = _json_lines(stderr)
    events = [e["event"] for e in lines]
    assert "worker.bad_bundle" in events and "serve.bad_bundle" in events, events
    assert events.count("worker.started") == 1  # not restarted: it cannot help
    assert "Traceback" not in stderr


def _loading_workers(pid: int) -> set[int]:
    """The worker processes ``serve`` (``pid``) spawned (multiprocessing, spawn)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(c) for c in fh.read().split()]
    except OSError:
        return set()
    found = set()
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                if b"spawn_main" in fh.read():
                    found.add(child)
        except OSError:
            continue
    return found


def test_crash_loop_is_bounded_one_line_per_crash(tmp_path: Path, tiny_bundle: Path) -> None:
    # Each worker is SIGKILLed while it loads the model (as an OOM kill would): it is
    # restarted with a growing delay, then given up on, and serve exits 1 unready.
    path = _config(tmp_path, tiny_bundle, node={"worker_max_crashes": 3})
    process = subprocess.Popen(
        [sys.executable, "-m", "ich_node.service.cli", "serve", "--config", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    killed: set[int] = set()
    try:
        while process.poll() is None:
            for pid in _loading_workers(process.pid) - killed:
                os.kill(pid, 9)
                killed.add(pid)
            time.sleep(0.02)
        stderr = process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr
    lines = _json_lines(stderr)
    events = [e["event"] for e in lines]
    assert events.count("worker.died") == 3, events
    assert events.count("worker.gave_up") == 1 and "serve.no_worker" in events
    assert "serve.started" not in events
    died = [e for e in lines if e["event"] == "worker.died"]
    assert [e["crashes"] for e in died] == [1, 2, 3]
    assert all(e["exit"].startswith("killed by SIGKILL") for e in died)
    assert died[-1]["restart_in_s"] is None
    assert "Traceback" not in stderr


def test_health_fails_after_a_worker_keeps_dying(tmp_path: Path, tiny_bundle: Path) -> None:
    path = _config(tmp_path, tiny_bundle, node={"worker_max_crashes": 2})
    node = Node(path, load_config(path))
    node.start()
    try:
        storage = node.config.storage.dir
        for _ in range(2):
            pid = wait_for("a live worker", lambda: _worker_pid(storage))
            os.kill(pid, 9)
            wait_for(
                "the death to be seen",
                lambda p=pid: _worker_pid(storage) != p or "gave_up" in node.log(),
                timeout=120,
            )
        wait_for("the node to give up", lambda: "worker.gave_up" in node.log(), timeout=120)
        health = _cli("health", "--config", str(path))
        assert health.returncode == 1
        assert "worker-0: not restarted: 2 crashes in a row" in health.stdout
        assert "killed by SIGKILL" in health.stdout
        assert echo(node.config, timeout=5)  # the listener still takes images
        assert node.stop() == 0
    finally:
        if node.process is not None:
            node.kill()
    log = (tmp_path / "node.log").read_text()
    assert log.count('"worker.died"') == 2 and log.count('"worker.gave_up"') == 1


# ----------------------------------------------------------------- no PHI anywhere

#: Planted values: a single-component name (no ^), a multi-component one, IDs, a
#: valid birth date and one that is not a DA value (highdicom and pydicom quote both).
PLANTED = {
    "single": {
        "PatientName": "Zyxwvplanted",
        "PatientID": "PID-PLANTED-4711",
        "PatientBirthDate": "1901-02-03",
    },
    "multi": {
        "PatientName": "Qfamilyplant^Qgivenplant^Qmiddle",
        "PatientID": "ZZ98765432",
        "PatientBirthDate": "19370405",
    },
}
NEEDLES = (
    "Zyxwvplanted",
    "PID-PLANTED-4711",
    "1901-02-03",
    "19010203",
    "Qfamilyplant",
    "Qgivenplant",
    "Qmiddle",
    "ZZ98765432",
    "19370405",
    "1937-04-05",
)


def _planted_series(root: Path) -> list[list[Path]]:
    """Two phantom series whose headers carry the planted values (written raw)."""
    import warnings

    import pydicom

    from training.phantom import write_series

    groups = []
    for i, (name, values) in enumerate(PLANTED.items()):
        series = write_series(
            root / name, seed=40 + i, subtypes=("subdural",), n_slices=10, matrix=256
        )
        for path in series.paths:
            ds = pydicom.dcmread(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the invalid DA is planted on purpose
                for keyword, value in values.items():
                    setattr(ds, keyword, value)
                ds.OtherPatientIDs = values["PatientID"]
            ds.save_as(path)
        groups.append(list(series.paths))
    return groups


def _assert_clean(where: str, text: str) -> None:
    lower = text.lower()
    found = [n for n in NEEDLES if n.lower() in lower]
    assert not found, f"{where} shows planted PHI {found}"


def test_planted_phi_reaches_no_output(tmp_path: Path, tiny_bundle: Path) -> None:
    import urllib.request

    from tests.test_node_e2e import Pacs

    groups = _planted_series(tmp_path / "in")
    pacs = Pacs(common.free_port(), tmp_path / "pacs")
    pacs.start()
    metrics_port = common.free_port()
    path = _config(
        tmp_path,
        tiny_bundle,
        results={"heatmaps": "all"},
        metrics={"address": f"127.0.0.1:{metrics_port}"},
        queue={"max_attempts": 1},
    )
    data = yaml.safe_load(path.read_text())
    data["destinations"] = [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    ]
    path.write_text(yaml.safe_dump(data))
    node = Node(path, load_config(path))
    node.start()
    try:
        for files in groups:
            sent = subprocess.run(
                [
                    dcmtk("storescu"),
                    "-aet",
                    "MODALITY",
                    "-aec",
                    "ICH_NODE",
                    "127.0.0.1",
                    str(node.config.node.port),
                    *map(str, files),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sent.returncode == 0, sent.stderr

        def finished() -> bool:
            store = node.store()
            try:
                jobs = store.jobs()
                sent = all(d.state == "done" for d in store.deliveries())
                return sent and len(jobs) == 2 and all(j.state in ("done", "parked") for j in jobs)
            finally:
                store.close()

        wait_for("both jobs to end", finished, timeout=300)
        wait_for("the job summaries", lambda: node.log().count('"job.finished"') >= 2)
        status = _cli("status", "--config", str(path))
        status_json = _cli("status", "--config", str(path), "--json")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics_text = r.read().decode()
        assert node.stop() == 0
    finally:
        if node.process is not None:
            node.kill()
        pacs.stop()
    log = (tmp_path / "node.log").read_text()
    lines = _json_lines(log)  # format: json: every line is JSON (libraries' too)
    assert any(e["event"] == "job.finished" for e in lines)
    for where, text in (
        ("the node's log", log),
        ("status", status.stdout + status.stderr),
        ("status --json", status_json.stdout + status_json.stderr),
        ("metrics", metrics_text),
    ):
        _assert_clean(where, text)
    # A series whose job is done and delivered says so (not "queued").
    series = json.loads(status_json.stdout)["series"]
    assert "queued" not in series and series.get("delivered", 0) >= 1, series
    assert sum(series.values()) == 2
    assert "series: delivered" in status.stdout
    # The same files offline: predict's stdout and stderr.
    predicted = _cli(
        "predict",
        "--bundle",
        str(tiny_bundle),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--heatmaps",
        "all",
        str(tmp_path / "in"),
    )
    assert "Traceback" not in predicted.stderr
    _assert_clean("predict's stdout", predicted.stdout)
    _assert_clean("predict's stderr", predicted.stderr)
