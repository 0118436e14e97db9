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
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool
from ich_node.queue.store import Store
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
        "import sys; import ich_node.service.serve, ich_node.ingest.listener, ich_node.service.ops, "
        "ich_node.delivery.sender, ich_node.ingest.assemble, ich_node.service.worker; "
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


# (compressor command, storescu proposal flags, transfer syntax): DCMTK compresses, DCMTK sends.
_COMPRESSED = {
    "jpeg-lossless-sv1": (["dcmcjpeg", "+e1"], ["-xs"], "1.2.840.10008.1.2.4.70"),
    # storescu has no flag for process 14: a config profile proposes it (see _p14_profile).
    "jpeg-lossless-p14": (["dcmcjpeg", "+el"], ["-xf", "{cfg}", "P14"], "1.2.840.10008.1.2.4.57"),
    "jpeg-ls-lossless": (["dcmcjpls", "+el"], ["-xt"], "1.2.840.10008.1.2.4.80"),
    "rle": (["dcmcrle"], ["-xr"], "1.2.840.10008.1.2.5"),
    # DCMTK's free edition has no JPEG 2000 encoder: pydicom (openjpeg) compresses.
    "jpeg2000-lossless": (None, ["-xv"], "1.2.840.10008.1.2.4.90"),
}


_P14_PROFILE = """\
[[TransferSyntaxes]]
[P14]
TransferSyntax1 = 1.2.840.10008.1.2.4.57
[[PresentationContexts]]
[P14]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.2\\P14
[[Profiles]]
[P14]
PresentationContexts = P14
"""


@pytest.mark.parametrize("kind", sorted(_COMPRESSED))
def test_dcmtk_compressed_series_is_stored_as_received_and_read(
    kind: str, free_port: int, listener, phantom_series, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from ich_node.imaging import load_series_hu, read_series

    _, store, _ = listener
    compressor, propose, syntax = _COMPRESSED[kind]
    originals = list(phantom_series.paths)
    sent = []
    for i, path in enumerate(originals):
        out = tmp_path / f"{kind}-{i}.dcm"
        if compressor is None:
            ds = pydicom.dcmread(path)
            ds.compress(syntax)
            ds.save_as(out, enforce_file_format=True)
        else:
            run = subprocess.run([dcmtk(compressor[0]), *compressor[1:], str(path), str(out)],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
            assert run.returncode == 0, run.stderr
        sent.append(out)
    assert pydicom.dcmread(sent[0]).file_meta.TransferSyntaxUID == syntax
    cfg = tmp_path / "storescu.cfg"
    cfg.write_text(_P14_PROFILE)
    propose = [a.replace("{cfg}", str(cfg)) for a in propose]
    run = subprocess.run(
        [dcmtk("storescu"), *propose, "-aet", "MODALITY", "-aec", "ICH_NODE", "127.0.0.1",
         str(free_port), *map(str, sent)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    stored = store.instance_paths(phantom_series.series_instance_uid)
    assert len(stored) == len(sent)
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in sent}
    for path in stored:
        copy = pydicom.dcmread(path)
        assert copy.file_meta.TransferSyntaxUID == syntax  # stored as received
        assert copy.PixelData == pydicom.dcmread(by_uid[copy.SOPInstanceUID]).PixelData
    # What the worker does first: read the series and decode it to HU (lossless: equal).
    hu = load_series_hu(read_series(stored))
    expected = load_series_hu(read_series(originals))
    assert hu.shape == expected.shape and (hu == expected).all()


def test_low_free_space_answers_0xA700_then_recovers_by_itself(
    tmp_path: Path, free_port: int, phantom_series
) -> None:  # type: ignore[no-untyped-def]
    """The free-space probe is injected (no root needed for a tiny file system)."""
    config = _node_config(free_port, tmp_path, min_free_mb=100)
    free = {"bytes": 10 * 2**20}  # below storage.min_free_mb
    store = Store.open(config.storage.dir)  # type: ignore[attr-defined]
    spool = Spool(config.storage.dir, store, 100, free_space=lambda _: free["bytes"])  # type: ignore[attr-defined]
    server = start_listener(config, spool)  # type: ignore[arg-type]
    try:
        assoc = _associate(free_port, "MODALITY", [(CTImageStorage, None)])
        assert assoc.send_c_store(phantom_series.paths[0]).Status == 0xA700
        assert store.n_instances() == 0
        assert [p for p in spool.root.rglob("*") if p.is_file()] == []
        free["bytes"] = 10 * 2**30  # space is back: the same association goes on
        assert assoc.send_c_store(phantom_series.paths[0]).Status == 0x0000
        assert assoc.send_c_store(phantom_series.paths[1]).Status == 0x0000
        assoc.release()
        assert store.n_instances() == 2
        assert not list(spool.root.rglob("*.tmp"))
    finally:
        server.shutdown()
        store.close()
