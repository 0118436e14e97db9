"""check-config predicts serve (#30 items 1-2): each failure an admin makes exits 2 from
both ``check-config`` and ``serve``, with one line naming the key and the file, no
traceback, and nothing changed. The shipped config/node.yaml does not pass.

``serve`` and ``check-config`` run as child processes, as systemd runs them
(``ExecStartPre=check-config``, ``RestartPreventExitStatus=2``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import common
from tests import test_security

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
pki = test_security.pki  # the module-scoped test PKI (CA, server and client certificates)


def _config(tmp_path: Path, bundle: Path, **sections: dict[str, Any]) -> Path:
    data: dict[str, Any] = {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": common.free_port()},
        "callers": [{"ae_title": "MODALITY"}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        "model": {"bundle": str(bundle), "device": "cpu"},
        "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 0},
        "logging": {"format": "json"},
    }
    for key, value in sections.items():
        data[key] = value if not isinstance(value, dict) else {**data.get(key, {}), **value}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ich_node.service.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        check=False,
    )


def _check_config(path: Path, *flags: str) -> str:
    """check-config's one line (exit 2), checked: no traceback, nothing on stdout."""
    run = _cli("check-config", *flags, str(path))
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr and run.stdout == ""
    lines = [line for line in run.stderr.splitlines() if "warning:" not in line]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"ich-node: {path}: "), lines[0]
    return lines[0]


def _serve(path: Path, *flags: str) -> dict[str, Any]:
    """serve's one error line (exit 2), checked: every line JSON, no traceback."""
    run = _cli("serve", "--config", str(path), *flags)
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr
    events = [json.loads(line) for line in run.stderr.splitlines() if line.strip()]
    errors = [e for e in events if e.get("level") == "error"]
    assert len(errors) == 1, errors
    assert not {"serve.started", "listener.started"} & {e["event"] for e in events}
    return errors[0]


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A storage.dir nobody may write: immutable (root, chattr +i) or mode 0500."""
    folder = tmp_path / "node"
    folder.mkdir()
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(folder)]).returncode != 0:
            pytest.skip("root, and this file system has no immutable flag (chattr +i)")
        yield folder
        subprocess.run([chattr, "-i", str(folder)], check=True)
    else:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)


def test_an_unwritable_storage_dir_exits_2_from_check_config_and_serve(
    tmp_path: Path, tiny_bundle: Path, unwritable: Path
) -> None:
    path = _config(tmp_path, tiny_bundle)
    line = _check_config(path)
    assert f"storage.dir: {unwritable}: not writable" in line
    error = _serve(path)
    assert error["event"] == "serve.config_error"
    assert error["key"] == "storage.dir" and error["path"] == str(unwritable)
    assert error["error"].startswith("not writable")
    assert list(unwritable.iterdir()) == []  # no lock file, no probe left


@pytest.mark.parametrize("fault", ["missing key", "key of another certificate", "not a cert"])
def test_tls_files_that_do_not_load_or_match_exit_2_naming_the_file(
    tmp_path: Path, tiny_bundle: Path, pki: Path, fault: str
) -> None:
    tls = {"cert": str(pki / "server.crt"), "key": str(pki / "server.key")}
    key, at_fault = "node.tls.key", pki / "server.key"
    if fault == "missing key":
        tls["key"] = str(tmp_path / "absent.key")
        at_fault, why = tmp_path / "absent.key", "cannot be read"
    elif fault == "key of another certificate":
        tls["key"] = str(pki / "client.key")
        at_fault, why = pki / "client.key", f"does not match node.tls.cert ({pki / 'server.crt'})"
    else:
        tls["cert"] = str(pki / "server.key")  # a key where the certificate goes
        key, at_fault, why = "node.tls.cert", pki / "server.key", "not a PEM certificate"
    path = _config(tmp_path, tiny_bundle, node={"tls": tls})
    line = _check_config(path)
    assert f"{key}: {at_fault}: {why}" in line, line
    error = _serve(path)
    assert (error["key"], error["path"]) == (key, str(at_fault))
    assert error["error"].startswith(why)
    assert not (tmp_path / "node").exists()  # checked before anything is made


def test_a_destinations_tls_file_is_named_by_its_index(
    tmp_path: Path, tiny_bundle: Path, pki: Path
) -> None:
    destination = {
        "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9,
        "tls": {"ca": str(tmp_path / "absent-ca.crt")},
    }  # fmt: skip
    path = _config(tmp_path, tiny_bundle, destinations=[destination])
    line = _check_config(path)
    assert f"destinations[0].tls.ca: {tmp_path / 'absent-ca.crt'}: cannot be read" in line


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2_from_check_config_and_serve_without_a_crash_loop(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    path = _config(tmp_path, tiny_bundle, model={"device": "cuda"})
    line = _check_config(path)
    assert "model.device: is 'cuda' but no CUDA device is available" in line
    error = _serve(path)  # one line, before any worker starts (before: 5 crashes in 28 s)
    assert error["event"] == "serve.config_error" and error["key"] == "model.device"
    assert "no CUDA device is available" in error["error"]
    assert not (tmp_path / "node").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="needs a machine without CUDA")
def test_a_worker_that_cannot_use_the_device_stops_serve_with_exit_2(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    # What the host check cannot see (a GPU torch cannot use, a driver that does not
    # match): the first worker says so. The serving process is told a GPU is there
    # (the host check replaced, nothing else); the worker's torch finds none.
    path = _config(tmp_path, tiny_bundle, model={"device": "cuda"})
    code = (
        "import sys; from ich_node.service import preflight; "
        "preflight._gpu_present = lambda: True; "
        "from ich_node.service.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, "serve", "--config", str(path)],
        capture_output=True, text=True, timeout=240, env=ENV, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    events = [json.loads(line) for line in run.stderr.splitlines() if line.strip()]
    names = [e["event"] for e in events]
    assert names.count("worker.started") == 1  # not restarted: it cannot help
    (bad,) = [e for e in events if e["event"] == "worker.bad_device"]
    assert bad["key"] == "model.device" and "no CUDA device" in bad["error"]
    (error,) = [e for e in events if e["event"] == "serve.config_error"]
    assert error["key"] == "model.device" and error["path"] == str(tiny_bundle)
    assert "serve.started" not in names and "listener.started" not in names


def test_the_shipped_config_does_not_pass(tmp_path: Path) -> None:
    shipped = REPO / "config" / "node.yaml"
    line = _check_config(shipped)
    assert "callers: no caller may send images" in line
    # serve says the same (its storage.dir, /var/lib/ich-node, is not touched first).
    copy = tmp_path / "node.yaml"
    data = yaml.safe_load(shipped.read_text())
    data["storage"]["dir"] = str(tmp_path / "node")
    data["logging"] = {"format": "json"}
    copy.write_text(yaml.safe_dump(data))
    error = _serve(copy)
    assert error["key"] == "callers"
    # With a caller, the next thing missing is named, and so on.
    data["callers"] = [{"ae_title": "PACS"}]
    copy.write_text(yaml.safe_dump(data))
    assert "destinations: no destination and no notification target" in _check_config(copy)
    data["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104}]
    copy.write_text(yaml.safe_dump(data))
    assert "model.bundle: not set" in _check_config(copy)
    assert not (tmp_path / "node").exists()


def test_alerts_only_and_listener_only_pass_with_a_warning(
    tmp_path: Path, tiny_bundle: Path, pg_url: str
) -> None:
    secret = tmp_path / "hook.key"
    secret.write_text("k3y\n")
    hook = {"name": "pager", "kind": "webhook", "url": "https://gw.example/h",
            "secret_file": str(secret)}  # fmt: skip
    path = _config(tmp_path, tiny_bundle, destinations=[], notifications=[hook])
    run = _cli("check-config", str(path))
    assert run.returncode == 0, run.stderr
    assert "warning: destinations: none; results go to no PACS" in run.stderr
    path = _config(tmp_path, tiny_bundle, destinations=[], storage={"database": pg_url})
    run = _cli("check-config", "--role", "listener", str(path))
    assert run.returncode == 0, run.stderr
    assert "warning: destinations: none; a listener sends nothing" in run.stderr
    assert "OK for --role listener" in run.stdout


def test_check_config_changes_nothing_and_finds_a_running_node(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    from ich_node.service.serve import lock_storage

    path = _config(tmp_path, tiny_bundle)
    run = _cli("check-config", str(path))
    assert run.returncode == 0, run.stderr
    assert "verified, loads on model.device cpu" in run.stdout
    assert not (tmp_path / "node").exists()  # serve creates it; check-config does not
    (tmp_path / "node").mkdir()
    fd = lock_storage(tmp_path / "node")  # a node holds the storage
    try:
        line = _check_config(path)
        assert f"storage.dir: {tmp_path / 'node'}: in use by node pid {os.getpid()}" in line
    finally:
        os.close(fd)
    run = _cli("check-config", str(path))
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "node").iterdir()) == ["node.lock"]


def test_check_config_opens_a_postgresql_store_as_it_is(
    tmp_path: Path, tiny_bundle: Path, pg_url: str
) -> None:
    import psycopg

    from ich_node.config import StorageSection
    from ich_node.queue import postgres
    from ich_node.queue.backend import open_store

    path = _config(tmp_path, tiny_bundle, storage={"database": pg_url})
    for role in ("listener", "all"):
        run = _cli("check-config", "--role", role, str(path))
        assert run.returncode == 0, run.stderr
    with psycopg.connect(pg_url) as conn:  # an empty database stays empty
        assert (
            conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
            == 0
        )
    open_store(StorageSection(dir=tmp_path / "node", database=pg_url)).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ich_schema_migrations VALUES (%s, 0)", (postgres.SCHEMA_VERSION + 1,)
        )
    line = _check_config(path, "--role", "listener")
    assert "storage.database: the database's schema is version" in line
    assert "upgrade ich-node" in line
    # A database that does not answer: exit 1 (a restart may cure it), one line.
    down = _config(tmp_path, tiny_bundle,
                   storage={"database": f"postgresql://ich@127.0.0.1:{common.free_port()}/x"})  # fmt: skip
    run = _cli("check-config", "--role", "listener", str(down))
    assert run.returncode == 1, run.stderr
    assert "storage.database" in run.stderr and "Traceback" not in run.stderr
