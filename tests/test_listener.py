"""The listener with real associations on 127.0.0.1 (pynetdicom and DCMTK peers)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless
from pynetdicom import AE
from pynetdicom import _config as netconfig
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from ich_node.config import parse_config
from ich_node.listener import start_listener
from ich_node.spool import Spool
from ich_node.store import Store
from tests.conftest import dcmtk


def _node_config(port: int, tmp_path: Path, min_free_mb: int = 0) -> object:
    return parse_config(
        {
            "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": port},
            "callers": (
                {"ae_title": "MODALITY"},
                {"ae_title": "LOCAL_ONLY", "host": "127.0.0.1"},
                {"ae_title": "FAR_AWAY", "host": "10.255.255.1"},
            ),
            "storage": {"dir": str(tmp_path / "node"), "min_free_mb": min_free_mb},
        }
    )


@pytest.fixture
def listener(
    tmp_path: Path, free_port: int, request: pytest.FixtureRequest
) -> Iterator[tuple[ThreadedAssociationServer, Store, Path]]:
    min_free = int(getattr(request, "param", 0))
    config = _node_config(free_port, tmp_path, min_free)
    store = Store.open(config.storage.dir)  # type: ignore[attr-defined]
    spool = Spool(config.storage.dir, store, config.storage.min_free_mb)  # type: ignore[attr-defined]
    server = start_listener(config, spool)  # type: ignore[arg-type]
    yield server, store, spool.root
    server.shutdown()
    store.close()


def _associate(port: int, calling: str, contexts: list[tuple[str, str | None]]):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    for sop, syntax in contexts:
        if syntax is None:
            ae.add_requested_context(sop)
        else:
            ae.add_requested_context(sop, syntax)
    return ae.associate("127.0.0.1", port, ae_title="ICH_NODE")


def test_unknown_or_wrong_host_caller_is_rejected_with_reason_0x03(
    free_port: int, listener
) -> None:  # type: ignore[no-untyped-def]
    for calling in ("STRANGER", "FAR_AWAY"):
        assoc = _associate(free_port, calling, [(Verification, None)])
        assert assoc.is_rejected, calling
        rj = assoc.acceptor.primitive
        # rejected-permanent, service-user, calling AE title not recognised (PS3.8 9.3.4)
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    for calling in ("MODALITY", "LOCAL_ONLY", "ICH_NODE"):
        assoc = _associate(free_port, calling, [(Verification, None)])
        assert assoc.is_established, calling
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


def test_dcmtk_storescu_series_is_spooled_once(free_port: int, listener, phantom_series) -> None:  # type: ignore[no-untyped-def]
    _, store, root = listener
    cmd = [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "ICH_NODE", "127.0.0.1", str(free_port)]
    files = [str(p) for p in phantom_series.paths]
    for _ in range(2):  # the second time: the same SOP Instance UIDs, idempotent
        run = subprocess.run([*cmd, *files], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
    assert store.n_instances() == len(files)
    series = store.series(phantom_series.series_instance_uid)
    assert series is not None and series.n_instances == len(files) and series.modality == "CT"
    spooled = sorted(root.rglob("*.dcm"))
    assert len(spooled) == len(files)
    assert not list(root.rglob("*.tmp"))
    original = pydicom.dcmread(phantom_series.paths[0])
    copy = pydicom.dcmread(store.instance_paths(phantom_series.series_instance_uid)[0])
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in phantom_series.paths}
    assert copy.PixelData == pydicom.dcmread(by_uid[copy.SOPInstanceUID]).PixelData
    assert original.file_meta.TransferSyntaxUID == copy.file_meta.TransferSyntaxUID


def test_compressed_instance_is_spooled_as_received(
    free_port: int, listener, phantom_series, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    _, store, _ = listener
    ds = pydicom.dcmread(phantom_series.paths[0])
    ds.compress(RLELossless)
    path = tmp_path / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    assoc = _associate(free_port, "MODALITY", [(CTImageStorage, RLELossless)])
    assert assoc.is_established
    assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    (stored,) = store.instance_paths(phantom_series.series_instance_uid)
    copy = pydicom.dcmread(stored)
    assert copy.file_meta.TransferSyntaxUID == RLELossless
    assert (copy.pixel_array == ds.pixel_array).all()


def test_corrupt_dataset_gets_0xC210_and_listener_keeps_serving(
    free_port: int, listener, phantom_series, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    _, store, root = listener
    good = phantom_series.paths[0].read_bytes()
    header = pydicom.dcmread(phantom_series.paths[0], stop_before_pixels=True)
    meta_end = 132 + 12 + int(header.file_meta.FileMetaInformationGroupLength)
    corrupt = tmp_path / "corrupt.dcm"
    # Valid file meta, then a dataset whose first element claims more bytes than exist.
    corrupt.write_bytes(good[:meta_end] + b"\x08\x00\x16\x00UI\xff\x7f" + b"1.2" * 3)
    # Send the bytes as they are (pynetdicom would otherwise decode the file first).
    monkeypatch.setattr(netconfig, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = _associate(free_port, "MODALITY", [(CTImageStorage, None)])
    assert assoc.is_established
    status = assoc.send_c_store(corrupt)
    assert status.Status == 0xC210
    assert assoc.send_c_store(phantom_series.paths[1]).Status == 0x0000
    assoc.release()
    assert store.n_instances() == 1
    assert len(list(root.rglob("*.dcm"))) == 1
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "ICH_NODE", "127.0.0.1", str(free_port)],
        capture_output=True,
        timeout=30,
    )
    assert echo.returncode == 0


@pytest.mark.parametrize("listener", [10**9], indirect=True)
def test_low_disk_space_gets_0xA700_and_leaves_no_file(
    free_port: int, listener, phantom_series
) -> None:  # type: ignore[no-untyped-def]
    _, store, root = listener
    assoc = _associate(free_port, "MODALITY", [(CTImageStorage, None)])
    assert assoc.is_established
    assert assoc.send_c_store(phantom_series.paths[0]).Status == 0xA700
    assoc.release()
    assert store.n_instances() == 0
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_listener_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import ich_node.service, ich_node.listener, ich_node.ops, "
        "ich_node.sender, ich_node.assemble, ich_node.worker; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    started = time.monotonic()
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    assert time.monotonic() - started < 120


def test_max_associations_is_honoured(tmp_path: Path, free_port: int) -> None:
    config = parse_config(
        {
            "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port,
                     "max_associations": 1},
            "callers": ({"ae_title": "MODALITY"},),
            "storage": {"dir": str(tmp_path / "node"), "min_free_mb": 0},
        }
    )  # fmt: skip
    store = Store.open(config.storage.dir)
    server = start_listener(config, Spool(config.storage.dir, store, 0))
    try:
        first = _associate(free_port, "MODALITY", [(Verification, None)])
        assert first.is_established
        second = _associate(free_port, "MODALITY", [(Verification, None)])
        assert second.is_rejected
        # rejected-transient, service-provider (presentation), local limit exceeded
        rj = second.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        first.release()
    finally:
        server.shutdown()
        store.close()
