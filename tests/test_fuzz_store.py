"""Hostile input on the C-STORE path, with hypothesis, over real associations.

Each example sends bytes derived from a valid CT file (truncated, bytes flipped,
elements rewritten with wrong values) through a pynetdicom SCU to the running
listener. The listener must answer a documented status (0x0000; 0xC000 for a UID
that can never be stored, 0xC210 for a data set it cannot read, 0xA700 when it
cannot make it durable; docs/admin.md), keep serving, and keep the spool and the
store in line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE
from pynetdicom import _config as netconfig
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from benchmarks.faults import free_port
from ich_node.config import parse_config
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool
from ich_node.queue.store import Store

EXAMPLES = int(os.environ.get("ICH_FUZZ_EXAMPLES", "40"))

#: The statuses docs/admin.md lists for a C-STORE (PS3.4 Annex B.2.3, and 0xC000).
DOCUMENTED = (0x0000, 0xC000, 0xC210, 0xA700)


@pytest.fixture(scope="module")
def target(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[int, Store, Path, bytes, int]]:
    from training.phantom import write_series

    folder = tmp_path_factory.mktemp("fuzz")
    series = write_series(folder / "src", seed=5, n_slices=2, matrix=64)
    port = free_port()
    config = parse_config({
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": port},
        "callers": ({"ae_title": "FUZZ"},),
        "storage": {"dir": str(folder / "node"), "min_free_mb": 0},
    })  # fmt: skip
    store = Store.open(config.storage.dir)
    spool = Spool(config.storage.dir, store, 0)
    server = start_listener(config, spool)
    good = Path(series.paths[0]).read_bytes()
    header = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    meta_end = 132 + 12 + int(header.file_meta.FileMetaInformationGroupLength)
    old = netconfig.STORE_SEND_CHUNKED_DATASET
    netconfig.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are
    yield port, store, spool.root, good, meta_end
    netconfig.STORE_SEND_CHUNKED_DATASET = old
    server.shutdown()
    store.close()


_mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 4000)),
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=20),
    ),
    st.tuples(st.just("insert"), st.integers(0, 600), st.binary(min_size=1, max_size=64)),
)


def _mutate(good: bytes, meta_end: int, mutation: tuple) -> bytes:  # type: ignore[type-arg]
    body = bytearray(good[meta_end:])
    kind = mutation[0]
    if kind == "truncate":
        body = body[: mutation[1]]
    elif kind == "flip":
        for offset, value in mutation[1]:
            if offset < len(body):
                body[offset] = value
    else:
        body[mutation[1] : mutation[1]] = mutation[2]
    return good[:meta_end] + bytes(body)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutation=_mutation)
def test_mutated_cstore_gets_a_documented_status(target, tmp_path_factory, mutation) -> None:  # type: ignore[no-untyped-def]
    port, store, root, good, meta_end = target
    path = tmp_path_factory.mktemp("case") / "case.dcm"
    path.write_bytes(_mutate(good, meta_end, mutation))
    ae = AE(ae_title="FUZZ")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        assert status.Status in DOCUMENTED, hex(status.Status)
        assert assoc.send_c_echo().Status == 0x0000  # the same association still works
    finally:
        assoc.release()
    # Every recorded instance has its file; no temporary file is left.
    for name in store.instance_files():
        assert Path(name).is_file()
    assert not list(root.rglob("*.tmp"))
    assert sum(1 for p in root.rglob("*") if p.is_file()) == store.n_instances()


_VALUES = st.one_of(
    st.none(), st.text(max_size=70), st.integers(-(2**40), 2**40), st.binary(max_size=40),
    st.floats(allow_nan=True), st.lists(st.text(max_size=8), max_size=4),
)  # fmt: skip
_KEYWORDS = st.sampled_from([
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "ImagesInAcquisition", "BodyPartExamined", "SeriesDescription", "Rows", "PixelData",
])  # fmt: skip


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(keyword=_KEYWORDS, value=_VALUES)
def test_wrong_values_get_a_documented_status(target, tmp_path_factory, keyword, value) -> None:  # type: ignore[no-untyped-def]
    port, _, _, good, _ = target
    from io import BytesIO

    ds = pydicom.dcmread(BytesIO(good))
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1.{abs(hash((keyword, repr(value)))) % 10**12}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    elem = ds.data_element(keyword)
    assert elem is not None
    elem._value = value  # bypass validation: the wrong VR content goes on the wire
    path = tmp_path_factory.mktemp("case") / "case.dcm"
    try:
        ds.save_as(path, enforce_file_format=True)
    except Exception:
        return  # pydicom cannot even encode it: nothing a peer could send
    ae = AE(ae_title="FUZZ")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    assert assoc.is_established
    try:
        try:
            status = assoc.send_c_store(path)
        except (ValueError, AttributeError, TypeError):
            return  # pynetdicom as SCU refuses to send it (e.g. a SOP Class it cannot match)
        assert status.Status in DOCUMENTED, hex(status.Status)
        assert assoc.send_c_echo().Status == 0x0000 if assoc.is_established else True
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("uid", [b"\x00\x00", b"\x00\x00\x00\x00"])
def test_a_store_request_without_a_usable_instance_uid_is_answered(target, tmp_path, uid) -> None:  # type: ignore[no-untyped-def]
    """A C-STORE-RQ whose Affected SOP Instance UID is NUL bytes is not a valid
    request to pynetdicom, which ignored it: the peer waited for its own timeout. The
    node answers 0xC210 with its reason at once, and the association goes on."""
    from io import BytesIO

    port, _, _, good, _ = target
    ds = pydicom.dcmread(BytesIO(good))
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.data_element("SOPInstanceUID")._value = uid
    path = tmp_path / "case.dcm"
    ds.save_as(path, enforce_file_format=True)
    ae = AE(ae_title="FUZZ")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 20  # the answer comes at once; pynetdicom alone never sent one
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        assert status.Status == 0xC210
        assert "command set" in str(status.ErrorComment)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
