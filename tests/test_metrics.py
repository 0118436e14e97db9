"""The Prometheus endpoint, scraped over HTTP while the listener takes a real C-STORE.

It runs on both store backends (SQLite, PostgreSQL): the gauges and stage times are read
from the store.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from benchmarks.faults import free_port as another_port
from ich_node.config import parse_config
from ich_node.ingest.listener import start_listener
from ich_node.ingest.spool import Spool
from ich_node.metrics import Metrics
from ich_node.queue.store import Store


def test_metrics_endpoint_counts_instances_states_and_stage_latencies(
    tmp_path: Path,
    free_port: int,
    phantom_series,
    open_store: Callable[[Path], Store],
    storage_section: Callable[[Path], object],
) -> None:  # type: ignore[no-untyped-def]
    database = storage_section(tmp_path / "node").database  # type: ignore[attr-defined]
    config = parse_config({
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port},
        "callers": ({"ae_title": "MODALITY"},),
        "storage": {"dir": str(tmp_path / "node"), "database": database, "min_free_mb": 0},
    })  # fmt: skip
    store = open_store(config.storage.dir)
    metrics = Metrics(store)
    address = f"127.0.0.1:{another_port()}"
    http = metrics.serve(address)
    server = start_listener(config, Spool(config.storage.dir, store, 0), metrics=metrics)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", free_port, ae_title="ICH_NODE")
        for path in phantom_series.paths[:3]:
            assert assoc.send_c_store(path).Status == 0x0000
        assert assoc.send_c_store(phantom_series.paths[0]).Status == 0x0000  # duplicate
        assoc.release()
        store.add_stage_times("job1", {"read_s": 0.2, "infer_s": 1.5, "job_s": 2.0}, 0.0)
        assert metrics.run_once() == 3
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        http.shutdown()  # type: ignore[attr-defined]
        store.close()
    assert 'ich_node_instances_received_total{outcome="stored"} 3.0' in text
    assert 'ich_node_instances_received_total{outcome="duplicate"} 1.0' in text
    assert "ich_node_store_seconds_count 4.0" in text
    assert 'ich_node_series{state="receiving"} 1.0' in text
    assert "ich_node_instances 3.0" in text
    assert 'ich_node_stage_seconds_count{stage="infer"} 1.0' in text
    assert 'ich_node_stage_seconds_sum{stage="read"} 0.2' in text
    assert 'ich_node_stage_seconds_bucket{le="2.5",stage="job"} 1.0' in text
    for uid in (phantom_series.series_instance_uid, phantom_series.study_instance_uid):
        assert uid not in text  # labels carry states and stages, never UIDs
