"""Helpers shared by the benchmarks: timing, machine description, tables and JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                 if line.startswith("model name")]  # fmt: skip
        info["cpu"] = names[0] if names else info["cpu"]
        info["cpu_bf16"] = "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Shortest wall time of ``repeats`` calls (after the caller warmed up)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def paired_ratio(rounds: list[dict[str, float]], top: str, bottom: str) -> float:
    """The median over rounds of ``rounds[k][bottom] / rounds[k][top]``: the two
    measured back to back, in the same state of the machine (on this 2-core VM a
    core's speed changes by up to 3x for seconds at a time, docs/performance.md), so
    that one lucky round of either side does not set the ratio of the bests."""
    return float(statistics.median(r[bottom] / r[top] for r in rounds))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with the given columns."""

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


class Budget:
    """The seconds a benchmark's ``--budget`` leaves: it stops cleanly when they are spent.

    Each benchmark asks :meth:`left` before a measurement and skips (saying so)
    what no longer fits; nothing is killed half-way.
    """

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f"budget must be > 0 seconds, got {seconds!r}")
        self.seconds = seconds
        self.started = time.monotonic()

    def left(self) -> float:
        """Seconds left (negative once spent)."""
        return self.seconds - (time.monotonic() - self.started)

    def allows(self, estimate: float = 0.0) -> bool:
        """Whether a step expected to take ``estimate`` seconds still fits."""
        return self.left() > estimate


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_row(columns: Sequence[str], row: dict[str, Any] | None) -> None:
    """Print one Markdown table row the moment it is measured (``None``: the header)."""
    if row is None:
        print("| " + " | ".join(columns) + " |", flush=True)
        print("|" + "---|" * len(columns), flush=True)
    else:
        print("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |", flush=True)


def write_json(path: Path | None, name: str, payload: dict[str, Any]) -> None:
    """Write results as JSON (default ``benchmarks/results/<name>.json``)."""
    path = path or Path(__file__).resolve().parent / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "load_average": load_average(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


# ------------------------------------------------------------------ processes and peers


def load_average() -> float:
    """The 1-minute load average (other work on the machine skews the figures)."""
    return round(os.getloadavg()[0], 2)


def random_bundle(
    path: Path, *, name: str, arch: str = "resnet18", input_size: int = 64, **card: Any
) -> Path:
    """A bundle of a randomly initialised ``arch`` (seed 0), labelled a demo model.

    For tests, benchmarks and checks: ``card`` holds further :class:`ModelCard`
    fields (``version``, ``thresholds``, ``training_data``).
    """
    import torch

    from ich_node.model.bundle import ModelCard, save_bundle
    from ich_node.model.networks import build_model

    torch.manual_seed(0)
    fields: dict[str, Any] = {"version": "0", "training_data": "none: random weights", **card}
    model_card = ModelCard(name=name, arch=arch, input_size=input_size, demo=True, **fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(path, build_model(arch), model_card)
    return path


def queue_series(store: Any, paths: Sequence[Path], now: float) -> Any:
    """Record the files of one series in the node's store, as the listener would, and
    queue version 1 of it: the job a worker then leases (a ``JobRecord``).

    Files outside the store's ``storage.dir/spool`` are copied in first (the node reads
    only what lies there); files already in it are recorded where they are.
    """
    import shutil

    import pydicom

    from ich_node.ingest.spool import instance_record
    from ich_node.queue.jobs import job_id_for
    from ich_node.queue.layout import StorageLayout, path_part

    spool = StorageLayout(store.storage_dir).spool
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        record = instance_record(ds, ds.SOPClassUID, ds.SOPInstanceUID)
        if spool.resolve() not in Path(path).resolve().parents:
            folder = spool / path_part(record.study_instance_uid)
            folder = folder / path_part(record.series_instance_uid)
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = Path(shutil.copy2(path, folder / Path(path).name))
        store.add_instance(record, path, path.stat().st_size, now)
        uid = str(ds.SeriesInstanceUID)
    return store.queue_series(uid, 1, job_id_for, now)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk(tool: str) -> str:
    """DCMTK's ``tool`` from the system folders (the venv's pynetdicom apps share names)."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        candidate = Path(folder) / tool
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"DCMTK {tool} not found in /usr/bin or /usr/local/bin")


def nodelay_env() -> dict[str, str]:
    """Environment for DCMTK tools: ``TCP_NODELAY=1`` (no delayed-ACK stalls per PDU)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    """Poll ``predicate`` every ``every`` s until truthy; ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def serve_argv(config_path: Path) -> list[str]:
    """The command line of a node serving ``config_path`` in a child process."""
    import sys

    return [
        sys.executable,
        "-c",
        "import sys; from ich_node.config import load_config; "
        "from ich_node.service.serve import serve; sys.exit(serve(load_config(sys.argv[1])))",
        str(config_path),
    ]


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB, from ``/proc/<pid>/status`` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from ``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def storescu(
    port: int, files: Sequence[Path], *, called: str, calling: str = "MODALITY"
) -> subprocess.Popen[bytes]:
    """DCMTK ``storescu`` sending ``files`` in one association, with ``TCP_NODELAY=1``."""
    return subprocess.Popen(
        [dcmtk("storescu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        env=nodelay_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def send(port: int, groups: Sequence[Sequence[Path]], *, called: str) -> float:
    """Send each group in its own concurrent association; seconds until all acknowledged."""
    started = time.perf_counter()
    procs = [storescu(port, g, called=called) for g in groups if g]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {err.decode()[-500:]}")
    return time.perf_counter() - started


def stop(process: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def restamp_series(
    src: Sequence[Path], out_dir: Path, key: str, *, drop_count: bool = False
) -> list[Path]:
    """Copies of a series with new Study, Series and SOP Instance UIDs derived from ``key``.

    Pixel data and geometry are untouched; each ``key`` gives another study.
    ``drop_count`` removes ImagesInAcquisition, so the node waits for the quiet period.
    """
    import pydicom
    from pydicom.uid import generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    study = generate_uid(entropy_srcs=[key, "study"])
    series = generate_uid(entropy_srcs=[key, "series"])
    paths = []
    for n, path in enumerate(src):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        sop = generate_uid(entropy_srcs=[key, str(n)])
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        if drop_count and "ImagesInAcquisition" in ds:
            del ds.ImagesInAcquisition
        target = out_dir / f"{n:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    return paths


class MLLPReceiver:
    """A RIS stand-in: python-hl7's asyncio MLLP server in a thread on 127.0.0.1.

    Keeps (perf_counter() at arrival, message) of each HL7 message and answers AA
    (for the alerts benchmark and the demo).
    """

    def __init__(self) -> None:
        import asyncio
        import threading

        from hl7.mllp import start_hl7_server

        self.arrived: list[tuple[float, Any]] = []
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = asyncio.run_coroutine_threadsafe(
            start_hl7_server(self._client, "127.0.0.1", 0, encoding="utf-8"), self.loop
        ).result(10)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: Any, writer: Any) -> None:
        import asyncio

        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.arrived.append((time.perf_counter(), message))
                writer.writemessage(message.create_ack("AA"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def of_study(self, accession: str) -> list[float]:
        return [t for t, m in self.arrived if str(m.segment("ORC")(2)) == accession]

    def close(self) -> None:
        import asyncio

        async def shutdown() -> None:
            # In the loop's thread: asyncio servers are not thread-safe, and closing
            # from another thread raced a connection ending in the loop (both woke
            # the server's waiters: TypeError in asyncio's Server._wakeup).
            self.server.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
