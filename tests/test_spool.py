"""Instance identity in the spool, through real associations (DCMTK storescu) on 127.0.0.1.

An instance is its series plus its SOP Instance UID; its content is the digest of
the data set as received. The inputs are phantom series and files derived from
them in code (a second series that reuses the UIDs, a changed re-send). The tests
run on both store backends (SQLite, PostgreSQL), the same tests, but recovery.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from prometheus_client import generate_latest
from pydicom.uid import generate_uid
from pynetdicom.transport import ThreadedAssociationServer

from ich_node.config import parse_config
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool, content_digest
from ich_node.metrics import Metrics
from ich_node.queue.store import Store
from tests.conftest import dcmtk


@pytest.fixture
def node(
    tmp_path: Path,
    free_port: int,
    open_store: Callable[[Path], Store],
    storage_section: Callable[[Path], object],
) -> Iterator[tuple[int, Store, Spool, Metrics]]:
    """A listener on 127.0.0.1 spooling into a store on the test's backend."""
    database = storage_section(tmp_path / "node").database  # type: ignore[attr-defined]
    config = parse_config(
        {
            "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port},
            "callers": ({"ae_title": "MODALITY"}, {"ae_title": "ARCHIVE"}),
            "storage": {"dir": str(tmp_path / "node"), "database": database, "min_free_mb": 0},
        }
    )
    store = open_store(config.storage.dir)
    spool = Spool(config.storage.dir, store, 0)
    metrics = Metrics(store)
    server: ThreadedAssociationServer = start_listener(config, spool, metrics=metrics)
    yield free_port, store, spool, metrics
    server.shutdown()


def storescu(port: int, files: list[Path], calling: str = "MODALITY") -> None:
    """Send ``files`` in one association with DCMTK; every C-STORE must get Success."""
    run = subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", "ICH_NODE", "127.0.0.1", str(port)]
        + [str(p) for p in files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def derive(paths: list[Path], out: Path, **changes: object) -> list[Path]:
    """Copies of ``paths`` with the attributes in ``changes`` set (UIDs kept otherwise)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        target = out / path.name
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def test_same_sop_uids_in_another_series_are_stored_with_that_series(
    node, phantom_series, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    port, store, _spool, metrics = node
    series_a = list(phantom_series.paths)
    uid_b = generate_uid(entropy_srcs=["series B", phantom_series.series_instance_uid])
    series_b = derive(series_a, tmp_path / "b", SeriesInstanceUID=uid_b, SeriesNumber=2)
    storescu(port, series_a)
    storescu(port, series_b)
    a = store.series(phantom_series.series_instance_uid)
    b = store.series(uid_b)
    assert a is not None and b is not None
    assert a.n_instances == b.n_instances == len(series_a)
    assert store.n_instances() == 2 * len(series_a)
    files_b = store.instance_paths(uid_b)
    assert len(files_b) == len(series_a)
    assert {str(pydicom.dcmread(p).SeriesInstanceUID) for p in files_b} == {uid_b}
    assert store.reread_counts().sop_uid_reused == 2 * len(series_a)
    text = generate_latest(metrics.registry).decode()
    assert f"ich_node_sop_uid_reused_instances {2.0 * len(series_a)}" in text
    stored = float(2 * len(series_a))
    assert f'ich_node_instances_received_total{{outcome="stored"}} {stored}' in text


def test_identical_resend_from_another_caller_is_idempotent(node, phantom_series) -> None:  # type: ignore[no-untyped-def]
    port, store, spool, metrics = node
    files = list(phantom_series.paths)
    storescu(port, files)
    before = sorted(spool.root.rglob("*.dcm"))
    record = store.series(phantom_series.series_instance_uid)
    assert record is not None
    # The file meta differs (Source AE Title): the data set, hence the instance, does not.
    storescu(port, files, calling="ARCHIVE")
    after = store.series(phantom_series.series_instance_uid)
    assert after is not None
    assert (after.n_instances, after.n_replaced, after.last_at) == (len(files), 0, record.last_at)
    assert sorted(spool.root.rglob("*.dcm")) == before
    text = generate_latest(metrics.registry).decode()
    assert f'ich_node_instances_received_total{{outcome="duplicate"}} {float(len(files))}' in text


def test_changed_resend_replaces_the_older_copy(node, phantom_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, store, spool, _ = node
    files = list(phantom_series.paths)
    storescu(port, files)
    uid = phantom_series.series_instance_uid
    old = store.instance_paths(uid)
    (changed,) = derive(files[:1], tmp_path / "fixed", SeriesDescription="AX BRAIN CORRECTED")
    storescu(port, [changed])
    record = store.series(uid)
    assert record is not None and record.n_instances == len(files) and record.n_replaced == 1
    new = store.instance_paths(uid)
    assert len(new) == len(files) and len(set(new) - set(old)) == 1
    (fresh,) = set(new) - set(old)
    assert pydicom.dcmread(fresh).SeriesDescription == "AX BRAIN CORRECTED"
    assert content_digest(fresh.read_bytes())[:16] in fresh.name
    # The older copy is gone from the disk, not only from the store.
    assert sorted(spool.root.rglob("*.dcm")) == sorted(new)


# SQLite only: Spool.recover runs only in the embedded mode; in a shared storage.dir
# (PostgreSQL) other listeners write the spool meanwhile and serve does not call it.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_recover_removes_an_unrecorded_replacement(node, phantom_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A crash after the changed copy's rename but before its row: no Success was sent."""
    port, store, spool, _ = node
    files = list(phantom_series.paths)
    storescu(port, files)
    (changed,) = derive(files[:1], tmp_path / "fixed", SeriesDescription="CHANGED")
    data = changed.read_bytes()
    record_paths = store.instance_paths(phantom_series.series_instance_uid)
    target = record_paths[0].with_name(f"x.{content_digest(data)[:16]}.dcm")
    target.write_bytes(data)
    recovered = spool.recover()
    assert recovered.unrecorded_files == 1 and not target.exists()
    assert store.instance_paths(phantom_series.series_instance_uid) == record_paths
