"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a temp folder.

The server runs as a non-root user (``nobody`` when the tests run as root, else
the current user), listens on 127.0.0.1 on a free port and is stopped at the end.
Tests that need it skip cleanly when PostgreSQL is not installed
(``apt-get install postgresql``). ``fsync=off``: a test cluster lives only as
long as the test run; the node's durability does not depend on this setting.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def pg_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries (newest version), or ``None``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


def _version(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


@dataclass
class Cluster:
    """A running cluster: ``url(db)`` gives a libpq URL for one database."""

    folder: Path
    port: int
    user: str
    bin: Path
    as_user: list[str]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=120, check=False
        )

    def create_database(self, name: str) -> str:
        """Create database ``name`` (owned by the cluster's user); its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def require_password(self, role: str) -> None:
        """Make ``role`` log in over TCP with its password (scram-sha-256); others stay trusted.

        The line goes first in pg_hba.conf (the first match wins), then the server
        reloads its configuration.
        """
        hba = self.folder / "data" / "pg_hba.conf"
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        done = self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "reload")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl reload failed: {done.stderr.strip()}")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def kill(self) -> None:
        """Stop the server at once (the database going away); :meth:`start` brings it back."""
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"
        )

    def start(self) -> None:
        data, log = self.folder / "data", self.folder / "server.log"
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off "
            "-c max_connections=200"
        )
        done = self._run(
            str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()} {_tail(log)}")


def _tail(path: Path) -> str:
    try:
        return path.read_text()[-2000:]
    except OSError:
        return ""


def start_cluster(port: int) -> Cluster:
    """initdb a cluster in a new temp folder and start it on ``port``.

    Raises
    ------
    FileNotFoundError
        When PostgreSQL's binaries are not installed.
    RuntimeError
        When initdb or the server fails (its log in the message).
    """
    binary = pg_bin()
    if binary is None:
        raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="ich-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        owner = pwd.getpwnam("nobody")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    folder.chmod(0o700)
    cluster = Cluster(folder, port, "ich", binary, as_user)
    done = cluster._run(
        str(binary / "initdb"), "-D", str(folder / "data"), "-U", "ich", "--auth=trust",
        "-E", "UTF8", "--no-sync",
    )  # fmt: skip
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {done.stderr.strip()}")
    cluster.start()
    return cluster
