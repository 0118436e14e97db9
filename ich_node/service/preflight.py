"""What ``serve`` will need, checked before it starts: ``check-config`` and ``serve`` share it.

``check-config`` is the systemd unit's ``ExecStartPre``: when it passes, ``serve``
must not fail on the configuration. So both run the same checks, in this order,
and stop at the first problem, which names the configuration key and the file or
folder at fault in one line (exit 2; 1 only for a database that does not answer
now, which a restart may cure):

1. a role other than ``all`` needs ``storage.database``;
2. someone may send (``callers``, roles ``all`` and ``listener``) and results go
   somewhere (``destinations``; with none but ``notifications`` a warning: alerts
   only; role ``listener`` sends nothing, a warning only);
3. ``model.bundle`` is set, and with ``model.device: cuda`` the host shows an
   NVIDIA GPU (its device files or the driver's GPU list; roles ``all`` and
   ``worker``);
4. ``storage.dir`` is usable: a folder this process can write (a probe file is
   created and removed; a folder that does not exist yet must be creatable),
   ``spool/`` is not a link out of it, and on the embedded store its lock is free
   (taken and released at once, as a second ``serve`` would find it);
5. the TLS files: ``node.tls`` (roles that listen) and ``destinations[i].tls``
   (roles that send) load, and each key matches its certificate;
6. the notification targets' files (secret, CA, credentials; roles that send);
7. the model bundle's header, checksum and architecture (no torch).

Only ``check-config`` goes on with what needs torch, which the serving process
never imports: 8. ``model.device`` is available (``cuda`` needs CUDA), and 9.
the bundle loads onto it. ``serve`` learns what step 3 cannot see (a GPU torch
cannot use, too little memory) from its first worker, which exits with
:data:`ich_node.service.spawn.WORKER_EXIT_BAD_DEVICE` or the bad bundle code;
``serve`` then exits 2 naming the key, before it listens. And
``check-config`` opens the store as it is (never creating or migrating it):
a schema newer than this code, a role without the privileges ``serve`` needs or
a wrong password are problems; an empty or older store is not (``serve``
creates or migrates it).

Nothing here changes anything: the probe file is removed, the lock released,
a missing ``storage.dir`` is not created. Warnings (a node that refuses images
for low disk, alerts only) are printed and do not fail.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ich_node.config import NodeConfig
from ich_node.queue.layout import DB_NAME, OutsideStorage, StorageLayout

#: The lock file ``serve`` takes in ``storage.dir`` (see ``service/serve.py``).
LOCK_NAME = "node.lock"


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason ``serve`` cannot start: the key, the file or folder, what is wrong.

    ``exit_code`` is 2 (fix the configuration or the files) or 1 (a database
    that does not answer now).
    """

    key: str
    path: str | None
    message: str
    exit_code: int = 2
    help: str | None = None  # what to do, when the message does not say it

    def line(self) -> str:
        """``<key>: <path>: <message> (<help>)``, one line."""
        where = f"{self.key}: {self.path}: " if self.path else f"{self.key}: "
        text = where + self.message + (f" ({self.help})" if self.help else "")
        return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class Report:
    """The first problem found (``None``: ``serve`` can start) and the warnings."""

    problem: Problem | None
    warnings: tuple[str, ...]


def check_static(config: NodeConfig, role: str, *, lock: bool = True) -> Report:
    """Checks 1-7 (see the module): no torch, nothing changed.

    ``lock``: whether to try ``storage.dir``'s lock (``serve`` takes it itself next,
    and says who holds it).
    """
    warnings: list[str] = []
    storage = _storage if lock else _storage_unlocked
    steps = (_roles, _parties, _bundle_set, _device_present, storage, _tls, _targets, _bundle_file)
    for step in steps:
        problem = step(config, role, warnings)
        if problem is not None:
            return Report(problem, tuple(warnings))
    return Report(None, tuple(warnings))


def check_all(config: NodeConfig, role: str) -> Report:
    """Everything ``check-config`` checks: :func:`check_static`, the store as it is,
    then (roles ``all`` and ``worker``) the device and the bundle on it (imports torch)."""
    report = check_static(config, role)
    if report.problem is not None:
        return report
    steps: list[Callable[[NodeConfig, str, list[str]], Problem | None]] = [_store]
    if role != "listener":
        steps.append(_device_and_bundle)
    warnings = list(report.warnings)
    for step in steps:
        problem = step(config, role, warnings)
        if problem is not None:
            return Report(problem, tuple(warnings))
    return Report(None, tuple(warnings))


# -- the checks, in order ------------------------------------------------------------


def _roles(config: NodeConfig, role: str, warnings: list[str]) -> Problem | None:
    if role != "all" and config.storage.database is None:
        return Problem(
            "storage.database",
            None,
            f"--role {role} needs a shared store; set storage.database to a postgresql:// "
            "URL (docs/deployment.md)",
        )
    return None


def _parties(config: NodeConfig, role: str, warnings: list[str]) -> Problem | None:
    if role != "worker" and not config.callers:
        return Problem(
            "callers",
            None,
            "no caller may send images (every association would be rejected): add the "
            "PACS's or modality's calling AE title under callers",
        )
    if config.destinations:
        return None
    if role == "listener":
        warnings.append(
            "destinations: none; a listener sends nothing (the worker hosts send results)"
        )
        return None
    if config.notifications:
        warnings.append(
            "destinations: none; results go to no PACS, only the alerts of notifications are sent"
        )
        return None
    return Problem(
        "destinations",
        None,
        "no destination and no notification target: results would go nowhere; add the "
        "PACS under destinations",
    )


def _bundle_set(config: NodeConfig, role: str, warnings: list[str]) -> Problem | None:
    if role != "listener" and config.model.bundle is None:
        return Problem("model.bundle", None, "not set: serve needs a model bundle")
    return None


def _gpu_present() -> bool:
    """Whether this host shows an NVIDIA GPU to processes (without torch or CUDA calls).

    Its device files (``/dev/nvidia0``...) or the driver's list of GPUs
    (``/proc/driver/nvidia/gpus``). Neither: ``cuda`` certainly cannot work; either:
    the worker, which loads the model, has the last word.
    """
    if any(Path("/dev").glob("nvidia[0-9]*")):
        return True
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return gpus.is_dir() and any(gpus.iterdir())
    except OSError:
        return False


def _device_present(config: NodeConfig, role: str, warnings: list[str]) -> Problem | None:
    if role != "listener" and config.model.device == "cuda" and not _gpu_present():
        return Problem(
            "model.device",
            None,
            "is 'cuda' but no CUDA device is available (no NVIDIA GPU or driver on this "
            "host): set model.device to cpu or auto, or run the worker on a GPU host",
        )
    return None


def _storage_unlocked(config: NodeConfig, role: str, warnings: list[str]) -> Problem | None:
    return _storage(config, role, warnings, lock=False)


def _storage(
    config: NodeConfig, role: str, warnings: list[str], *, lock: bool = True
) -> Problem | None:
    folder = Path(config.storage.dir)
    if not folder.exists():
        return _creatable(folder)
    if not folder.is_dir():
        return Problem("storage.dir", str(folder), "is not a folder")
    problem = _probe(folder)
    if problem is not None:
        return problem
    layout = StorageLayout(folder)
    for own in (layout.spool, layout.results, layout.alerts):
        if own.exists() or own.is_symlink():
            try:
                layout.own_dir(own)
            except OutsideStorage as exc:
                return Problem("storage.dir", str(own), f"{exc.why}: the node acts only inside it")
    if lock and config.storage.database is None:
        problem = _lock_free(folder)
        if problem is not None:
            return problem
    free = shutil.disk_usage(folder).free // 2**20
    if free < config.storage.min_free_mb:
        warnings.append(
            f"storage.min_free_mb: {folder} has {free} MiB free, less than "
            f"{config.storage.min_free_mb}: images are refused (0xA700) until space is freed"
        )
    return None


def _creatable(folder: Path) -> Problem | None:
    """A missing ``storage.dir``: ``serve`` creates it; its nearest existing parent must allow."""
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return Problem("storage.dir", str(folder), f"cannot be created: {parent} is not a folder")
    problem = _probe(parent)
    if problem is not None:
        why = f"cannot be created in {parent}: {problem.message}"
        return Problem("storage.dir", str(folder), why)
    return None


def _probe(folder: Path) -> Problem | None:
    """Create and remove a file in ``folder`` (what serve's lock and spool need)."""
    probe = folder / f".ich-node-probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        return Problem("storage.dir", str(folder), f"not writable: {exc.strerror or exc}")
    return None


def _lock_free(folder: Path) -> Problem | None:
    """The embedded store's lock: free now (taken and released at once), as serve needs it."""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None  # never taken: free (not created here)
    except OSError as exc:
        return Problem("storage.dir", str(path), f"the lock cannot be opened: {exc.strerror}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return Problem("storage.dir", str(path), f"the lock cannot be taken: {exc.strerror}")
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        who = f"node pid {holder}" if holder.isdigit() else "another process"
        return Problem(
            "storage.dir",
            str(folder),
            f"in use by {who} (lock {LOCK_NAME}); one node per storage: stop that node "
            "first, or give this one its own storage.dir",
        )
    finally:
        os.close(fd)  # releases the lock when it was taken
    return None


def _tls(config: NodeConfig, role: str, warnings: list[str]) -> Problem | None:
    from ich_node.tls import TLSFileError, client_context, server_context

    try:
        if role != "worker" and config.node.tls is not None:
            server_context(config.node.tls)
        if role != "listener":
            for i, destination in enumerate(config.destinations):
                if destination.tls is not None:
                    client_context(destination.tls, destination.name, f"destinations[{i}].tls")
    except TLSFileError as exc:
        return Problem(exc.key, str(exc.path), exc.problem)
    return None


def _targets(config: NodeConfig, role: str, warnings: list[str]) -> Problem | None:
    if role == "listener":
        return None
    from ich_node.delivery.outbox import check_targets

    # The notification targets' files, and those of kind: dicomweb destinations.
    problems = check_targets(config.notifications, config.destinations)
    if problems:  # "notifications[i] (name): <file's key> <path>: <why>"
        key, _, rest = problems[0].partition(": ")
        return Problem(key, None, rest)
    return None


def _bundle_file(config: NodeConfig, role: str, warnings: list[str]) -> Problem | None:
    if role == "listener" or config.model.bundle is None:
        return None
    from ich_node.model.bundle import BundleError, bundle_help, check_bundle

    try:
        card = check_bundle(config.model.bundle)
    except BundleError as exc:
        return Problem("model.bundle", str(config.model.bundle), str(exc), help=bundle_help(exc))
    if card.demo:
        warnings.append(f"model.bundle: {card.display_name}")
    return None


def _store(config: NodeConfig, role: str, warnings: list[str]) -> Problem | None:
    """The store as ``serve`` will open it, read only: nothing created or migrated."""
    storage = config.storage
    if storage.database is None:
        db = StorageLayout(Path(storage.dir)).db
        if not db.exists():
            return None  # serve creates it
        import sqlite3

        try:
            conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=5)
            try:
                conn.execute("SELECT name FROM sqlite_master").fetchall()
                conn.execute("BEGIN IMMEDIATE")  # serve must be able to write it
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return Problem("storage.dir", str(db), f"the store cannot be used: {exc}")
        return None
    from ich_node.queue.postgres import check_for_serve

    try:
        check_for_serve(storage)
    except Exception as exc:  # StoreUnusable: one line, its exit code
        code = getattr(exc, "exit_code", 2)
        return Problem("storage.database", None, str(exc).removeprefix("storage.database: "), code)
    return None


def _device_and_bundle(config: NodeConfig, role: str, warnings: list[str]) -> Problem | None:
    """``model.device`` available and the bundle loaded onto it, as a worker will (torch)."""
    from ich_node.model.bundle import BundleError, bundle_help, load_bundle
    from ich_node.model.inference import resolve_device

    assert config.model.bundle is not None  # checked before
    try:
        device = resolve_device(config.model.device)
    except ValueError as exc:
        return Problem("model.device", None, str(exc).removeprefix("model.device "))
    try:
        bundle = load_bundle(config.model.bundle)
    except BundleError as exc:
        return Problem("model.bundle", str(config.model.bundle), str(exc), help=bundle_help(exc))
    try:
        from ich_node.model.inference import Classifier

        Classifier(
            bundle,
            device=str(device),
            batch_size=config.model.batch_size,
            precision=config.model.precision,
            decode_threads=config.model.decode_threads,
            prefetch=False,
            thresholds={str(k): v for k, v in config.model.thresholds.items()},
        )
    except (RuntimeError, ValueError) as exc:  # out of device memory, an unusable precision
        return Problem(
            "model.device",
            str(config.model.bundle),
            f"the bundle cannot be loaded onto {device}: {' '.join(str(exc).split())[:300]}",
        )
    return None


__all__ = ["DB_NAME", "Problem", "Report", "check_all", "check_static"]
