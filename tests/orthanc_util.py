"""A real Orthanc for tests and scripts: start it on loopback ports, talk REST to it.

Used by ``tests/test_orthanc.py`` and ``scripts/orthanc_screenshot.py``. Orthanc runs
from Debian's package (``apt-get install orthanc orthanc-webviewer``): the binary is
``/usr/sbin/Orthanc`` and the plugins are in ``/usr/share/orthanc/plugins``.
Nothing here is a stand-in: every call is an HTTP request to the running server.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
ROUTING_RULE = REPO / "config" / "orthanc" / "route-head-ct.lua"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
#: The modality name the shipped rule sends to (``ICH_NODE_MODALITY`` in the Lua file).
NODE_MODALITY = "ich-node"

T = TypeVar("T")


def orthanc_binary() -> str | None:
    """Path of the Orthanc server, or None when it is not installed."""
    for candidate in (Path("/usr/sbin/Orthanc"), Path("/usr/bin/Orthanc")):
        if candidate.is_file():
            return str(candidate)
    return shutil.which("Orthanc")


def find_plugin(name: str) -> Path | None:
    """Path of an Orthanc plugin library (``libOrthancWebViewer.so``...), or None."""
    for folder in PLUGIN_DIRS:
        path = folder / name
        if path.exists():
            return path
    return None


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.25) -> T:
    """Call ``probe`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Orthanc:
    """A running Orthanc process and a minimal REST client for it."""

    process: subprocess.Popen[bytes]
    aet: str
    http_port: int
    dicom_port: int
    workdir: Path
    log_path: Path
    auth: tuple[str, str] | None = None
    _log_file: Any = field(repr=False, default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = ""
    ) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.auth is not None:
            token = base64.b64encode(":".join(self.auth).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as response:
            data: bytes = response.read()
            return data

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        raw = self.request("POST", path, json.dumps(payload).encode(), "application/json")
        return json.loads(raw) if raw.strip() else None

    def upload(self, paths: Iterable[Path]) -> list[dict[str, Any]]:
        """``POST /instances`` each file; returns Orthanc's answers (ID, ParentStudy...)."""
        answers = []
        for path in paths:
            raw = self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")
            answers.append(json.loads(raw))
        return answers

    def study_id(self, study_instance_uid: str) -> str | None:
        """Orthanc's identifier of a study, by StudyInstanceUID (None when absent)."""
        # /tools/lookup takes the bare UID as its body, not JSON.
        found = json.loads(self.request("POST", "/tools/lookup", study_instance_uid.encode()))
        for item in found:
            if item["Type"] == "Study":
                return str(item["ID"])
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()


EXAMPLE_CONFIG = REPO / "config" / "orthanc" / "orthanc.json"


def read_orthanc_json(path: Path) -> dict[str, Any]:
    """An Orthanc JSON configuration; full-line ``//`` comments (which Orthanc allows) removed."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("//")]
    config: dict[str, Any] = json.loads("\n".join(lines))
    return config


def orthanc_config(
    workdir: Path,
    *,
    aet: str,
    http_port: int,
    dicom_port: int,
    modalities: dict[str, tuple[str, str, int]],
    lua_scripts: Sequence[Path] = (ROUTING_RULE,),
    stable_age: int = 2,
    plugins: Sequence[Path] = (),
) -> dict[str, Any]:
    """The shipped example ``config/orthanc/orthanc.json`` made fit for loopback tests.

    Storage goes to ``workdir``, the ports and AE title are the given ones, HTTP
    needs no login and listens on 127.0.0.1 only, and each modality keeps the
    example's permissions with its AE title, host and port replaced.
    """
    config = read_orthanc_json(EXAMPLE_CONFIG)
    template = next(iter(config["DicomModalities"].values()))
    config.update(
        {
            "StorageDirectory": str(workdir / "db"),
            "IndexDirectory": str(workdir / "db"),
            "StorageCompression": False,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "DicomAet": aet,
            "DicomPort": dicom_port,
            "DicomModalities": {
                name: {**template, "AET": a, "Host": host, "Port": port}
                for name, (a, host, port) in modalities.items()
            },
            "LuaScripts": [str(p) for p in lua_scripts],
            "StableAge": stable_age,
            "Plugins": [str(p) for p in plugins],
            "ConcurrentJobs": 2,
            "WebViewer": {"CachePath": str(workdir / "webviewer-cache"), "Threads": 2},
        }
    )
    return config


def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    http_port: int,
    dicom_port: int,
    modalities: dict[str, tuple[str, str, int]],
    lua_scripts: Sequence[Path] = (ROUTING_RULE,),
    stable_age: int = 2,
    plugins: Sequence[Path] = (),
    timeout: float = 60.0,
) -> Orthanc:
    """Write a configuration into ``workdir``, start Orthanc and wait until REST answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = orthanc_config(
        workdir,
        aet=aet,
        http_port=http_port,
        dicom_port=dicom_port,
        modalities=modalities,
        lua_scripts=lua_scripts,
        stable_age=stable_age,
        plugins=plugins,
    )
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    return launch_orthanc(
        config_path, workdir, aet=aet, http_port=http_port, dicom_port=dicom_port, timeout=timeout
    )


def launch_orthanc(
    config_path: Path,
    workdir: Path,
    *,
    aet: str,
    http_port: int,
    dicom_port: int,
    auth: tuple[str, str] | None = None,
    timeout: float = 60.0,
) -> Orthanc:
    """Start Orthanc on an existing configuration file and wait until REST answers."""
    binary = orthanc_binary()
    if binary is None:
        raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")
    log_path = workdir / "orthanc.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [binary, "--verbose", str(config_path)], stdout=log_file, stderr=subprocess.STDOUT
    )
    server = Orthanc(
        process, aet, http_port, dicom_port, workdir, log_path, auth=auth, _log_file=log_file
    )

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{server.log()[-3000:]}")
        try:
            return bool(server.get("/system"))
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    try:
        wait_for("Orthanc's REST API", ready, timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_orthanc(workdir: Path, **kwargs: Any) -> Iterator[Orthanc]:
    """``start_orthanc`` as a context manager that always stops the server."""
    server = start_orthanc(workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def write_variant(
    sources: Sequence[Path], out_dir: Path, edit: Callable[[pydicom.Dataset], None]
) -> list[Path]:
    """Copy a series with new Study/Series/SOP Instance UIDs and ``edit`` applied to each file.

    Makes the non-head and non-CT series of the routing tests from a phantom head CT.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for i, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        edit(ds)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        path = out_dir / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out
