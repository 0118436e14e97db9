"""Commands that only read, read: ``status``, ``health`` and ``check-config`` never create
or migrate a store, and on a store they cannot use they exit with one line (2 for what
an admin must fix, 1 for "the node is not running"). ``serve`` exits 2 for a role
without the privileges it needs. Both store backends where both apply.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import common
from ich_node.config import load_config
from ich_node.queue.backend import open_store
from ich_node.service.cli import main

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
_ROLES = itertools.count(1)


def _write_config(tmp_path: Path, database: str | None, **storage: Any) -> Path:
    data = {
        "node": {"host": "127.0.0.1", "port": common.free_port()},
        "callers": [{"ae_title": "MODALITY"}],
        "storage": {"dir": str(tmp_path / "node"), "database": database, **storage},
        "logging": {"format": "json"},
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tables(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall()
    return [str(r[0]) for r in rows]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ich_node.service.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        check=False,
    )


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_status_and_health_on_an_empty_postgresql_database_leave_it_empty_and_exit_1(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_config(tmp_path, pg_url)
    assert main(["status", "--config", str(path)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "storage.database" in line and "no node store" in line
    assert main(["status", "--config", str(path), "--json"]) == 1
    assert main(["health", "--config", str(path), "--role", "listener"]) == 1
    assert main(["resend", "--config", str(path), "job"]) == 1
    capsys.readouterr()
    assert _tables(pg_url) == []  # nothing created, nothing migrated


def test_status_without_a_sqlite_store_creates_nothing_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_config(tmp_path, None)
    assert main(["status", "--config", str(path)]) == 1
    assert "no node store" in _one_line(capsys.readouterr().err)
    assert main(["health", "--config", str(path)]) == 1
    assert not (tmp_path / "node").exists()
    # An empty file where the store should be: no table is created in it.
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "node.sqlite3").touch()
    assert main(["status", "--config", str(path)]) == 1
    capsys.readouterr()
    assert (tmp_path / "node" / "node.sqlite3").stat().st_size == 0


@pytest.mark.parametrize("content", ["older", "not a database"])
def test_a_sqlite_store_this_code_cannot_use_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    path = _write_config(tmp_path, None)
    db = tmp_path / "node" / "node.sqlite3"
    db.parent.mkdir()
    if content == "older":  # a store from before jobs had stages
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE series (series_instance_uid TEXT PRIMARY KEY)")
            conn.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY)")
    else:
        db.write_bytes(b"this is not SQLite" * 100)
    before = db.read_bytes()
    assert main(["status", "--config", str(path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(db) in line and "storage.dir" in line
    assert ("older ich-node" in line) if content == "older" else ("cannot open" in line)
    assert db.read_bytes() == before


def test_a_newer_schema_gives_one_line_and_exit_2_from_every_command(
    tmp_path: Path, pg_url: str
) -> None:
    import psycopg

    from ich_node.queue import postgres

    path = _write_config(tmp_path, pg_url)
    open_store(load_config(path).storage).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ich_schema_migrations VALUES (%s, 0)", (postgres.SCHEMA_VERSION + 1,)
        )
    for args in (
        ["status", "--config", str(path)],
        ["health", "--config", str(path), "--role", "listener"],
        ["resend", "--config", str(path), "job"],
    ):
        run = _cli(*args)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        line = _one_line(run.stderr)
        assert "storage.database" in line and "upgrade ich-node" in line, line


def _role(pg_url: str, grants: str) -> str:
    """A new login role of the test cluster, granted ``grants``; the URL it connects with."""
    import psycopg

    name = f"r{os.getpid()}_{next(_ROLES)}"
    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN")
        conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {name}')
        conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {name}")
        if grants:
            conn.execute(grants.format(role=name))
    return pg_url.replace("//ich@", f"//{name}@", 1)


def _serve_listener(path: Path) -> int:
    import signal

    from ich_node.service.serve import serve

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return serve(load_config(path), role="listener")
    finally:
        for sig, handler in handlers.items():  # serve installs its own
            signal.signal(sig, handler)


def test_a_role_that_may_not_create_the_schema_exits_2_from_serve(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _role(pg_url, "")
    path = _write_config(tmp_path, url)
    assert _serve_listener(path) == 2
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if "serve.store_failed" in line]
    assert len(failed) == 1 and "CREATE" in failed[0] and "storage.database" in failed[0], err
    assert _tables(pg_url) == []


def test_roles_with_table_privileges_only_exit_2_from_serve_and_with_sequences_serve(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = _write_config(tmp_path, pg_url)
    open_store(load_config(owner).storage).close()  # the schema, made by its owner
    dml = "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
    for grants, missing in (
        (
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
            "lacks DELETE, INSERT, UPDATE on",
        ),
        (dml, "lacks USAGE on stage_times_id_seq"),  # nextval of stage_times' ids
    ):
        url = _role(pg_url, grants)
        folder = tmp_path / url.split("//")[1].split("@")[0]
        folder.mkdir()
        path = _write_config(folder, url)
        assert _serve_listener(path) == 2
        err = capsys.readouterr().err
        failed = [line for line in err.splitlines() if "serve.store_failed" in line]
        assert len(failed) == 1 and missing in failed[0], err
        assert "storage.database" in failed[0]
        # Reading is all status needs.
        assert main(["status", "--config", str(path)]) == 0
        capsys.readouterr()
    # Privileges on the tables and their sequences are all serve needs on a schema
    # already at this version: no CREATE.
    url = _role(pg_url, dml + "; GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    store = open_store(load_config(_write_config(tmp_path, url)).storage)
    try:
        store.heartbeat("probe", 1, 1.0)
        store.add_stage_times("job", {"read_s": 1.0}, 1.0)
    finally:
        store.close()


def test_a_changed_password_file_is_read_when_a_new_connection_opens(
    tmp_path: Path, pg_url: str, pg_cluster: Any
) -> None:
    import psycopg
    import structlog

    from ich_node.config import StorageSection

    open_store(StorageSection(dir=tmp_path / "node", database=pg_url)).close()  # by its owner
    url = _role(
        pg_url,
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; "
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
    )
    role = url.split("//")[1].split("@")[0]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {role} PASSWORD 'first-pw'")
    pg_cluster.require_password(role)
    secret = tmp_path / "db.pw"
    secret.write_text("first-pw\n")
    storage = StorageSection(dir=tmp_path / "node", database=url, database_password_file=secret)

    def rotate(new: str | None) -> None:
        """The admin changes the password (and its file), the server drops the sessions."""
        with psycopg.connect(pg_url, autocommit=True) as conn:
            if new is not None:
                conn.execute(f"ALTER ROLE {role} PASSWORD '{new}'")
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )

    store = open_store(storage)
    try:
        store.heartbeat("probe", 1, 1.0)
        rotate("second-pw")
        secret.write_text("second-pw\n")
        store.heartbeat("probe", 1, 2.0)  # a new pool connection, with the new password
        assert store.heartbeats()["probe"][1] == 2.0
        store.wait_for_jobs(0.1)  # the LISTEN connection too
        # The file unreadable for a moment: the password read before, and one warning.
        secret.unlink()
        rotate(None)
        with structlog.testing.capture_logs() as logs:
            store.heartbeat("probe", 1, 3.0)
        assert store.heartbeats()["probe"][1] == 3.0
        warned = [e for e in logs if e["event"] == "store.password_file_unreadable"]
        assert warned and warned[0]["key"] == "storage.database_password_file"
    finally:
        store.close()
    # A wrong password is a configuration to fix: exit 2, one line.
    secret.write_text("wrong\n")
    with pytest.raises(Exception) as info:
        open_store(storage)
    assert getattr(info.value, "exit_code", None) == 2, info.value
    assert "password authentication failed" in str(info.value)
