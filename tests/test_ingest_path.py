"""The acknowledgement path: what it does per image, through real associations.

A new instance's digest is computed beside its write and fsync (not before), and
still names its file and its row; the folder's fsync after the rename runs beside
the row's commit, and when it fails the C-STORE fails and nothing stays recorded;
the listener advertises ``node.max_pdu_kb`` as
its Maximum Length, so senders split an image into that many fewer PDUs. Both store
backends where a store is involved.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from ich_node.config import parse_config
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool, content_digest
from ich_node.queue.store import Store
from tests.test_spool import storescu


@pytest.fixture
def node(
    tmp_path: Path,
    free_port: int,
    open_store: Callable[[Path], Store],
    storage_section: Callable[[Path], Any],
) -> Iterator[tuple[int, Store, Spool]]:
    database = storage_section(tmp_path / "node").database
    config = parse_config(
        {
            "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port},
            "callers": [{"ae_title": "MODALITY"}],
            "storage": {"dir": str(tmp_path / "node"), "database": database, "min_free_mb": 0},
        }
    )
    store = open_store(config.storage.dir)
    spool = Spool(config.storage.dir, store, 0)
    server = start_listener(config, spool)
    yield free_port, store, spool
    server.shutdown()


def test_new_instances_are_named_and_recorded_by_the_digest_computed_beside_the_write(
    node: tuple[int, Store, Spool], phantom_series: Any
) -> None:
    port, store, spool = node
    paths = list(phantom_series.paths)
    computed: list[int] = []
    submit = spool._helper.submit

    def counted(fn: Any, arg: Any) -> Any:
        if fn is content_digest:
            computed.append(len(arg))
        return submit(fn, arg)

    spool._helper.submit = counted  # type: ignore[method-assign]
    storescu(port, paths)
    assert len(computed) == len(paths)  # every new instance hashed beside its write
    files = store.instance_paths(phantom_series.series_instance_uid)
    assert len(files) == len(paths)
    by_name = {p.name: p for p in files}
    for uid in phantom_series.sop_instance_uids:
        digest = store.instance_digest(phantom_series.series_instance_uid, uid)
        assert digest is not None and len(digest) == 64
        path = by_name[f"{uid}.{digest[:16]}.dcm"]
        assert content_digest(path.read_bytes()) == digest  # the data set as received
    assert not [p for p in files[0].parent.iterdir() if p.name.endswith(".tmp")]
    # A re-send of the same bytes: compared before anything is written, nothing new.
    computed.clear()
    storescu(port, paths)
    assert computed == [] and store.n_instances() == len(paths)
    assert sorted(store.instance_paths(phantom_series.series_instance_uid)) == sorted(files)


def test_a_folder_fsync_that_fails_beside_the_commit_fails_the_c_store_and_undoes_the_row(
    node: tuple[int, Store, Spool], phantom_series: Any
) -> None:
    """The row is committed while the folder's fsync runs; when that fsync fails
    (EIO), the instance is not acknowledged (0xA700), its row and file are taken
    back, and the sender's retry is written and recorded anew, not taken for a
    duplicate of the copy whose rename was never made durable."""
    port, store, spool = node
    path = phantom_series.paths[0]
    series, sop = phantom_series.series_instance_uid, phantom_series.sop_instance_uids[0]
    submit = spool._helper.submit
    folder_syncs: list[int] = []

    def failing_folder_fsync(fd: int) -> None:
        folder_syncs.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def faulty(fn: Any, arg: Any) -> Any:
        return submit(failing_folder_fsync if fn is os.fsync else fn, arg)

    spool._helper.submit = faulty  # type: ignore[method-assign]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert status.Status == 0xA700
    assert len(folder_syncs) == 1
    assert store.instance_digest(series, sop) is None and store.n_instances() == 0
    assert store.instance_paths(series) == []
    study = phantom_series.study_instance_uid
    folder = spool.layout.instance_file(study, series, sop, "").parent
    assert not folder.is_dir() or [p.name for p in folder.iterdir()] == []
    spool._helper.submit = submit  # type: ignore[method-assign]
    storescu(port, [path])  # the retry: Success, written and recorded
    (kept,) = store.instance_paths(series)
    assert kept.is_file() and store.n_instances() == 1
    assert content_digest(kept.read_bytes()) == store.instance_digest(series, sop)


@pytest.mark.parametrize("kb", [None, 16, 1024])
def test_the_listener_advertises_node_max_pdu_kb(tmp_path: Path, free_port: int, kb: int) -> None:
    node: dict[str, Any] = {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port}
    if kb is not None:
        node["max_pdu_kb"] = kb
    config = parse_config(
        {"node": node, "callers": [{"ae_title": "MODALITY"}],
         "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 0}}
    )  # fmt: skip
    store = Store.open(config.storage.dir)
    server = start_listener(config, Spool(config.storage.dir, store, 0))
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", free_port, ae_title="ICH_NODE")
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == (kb or 256) * 1024
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
        store.close()
