"""Prometheus metrics of the serving process (prometheus-client).

The serving process exports everything: what it sees itself (C-STOREs, series
decisions, deliveries) is counted as it happens; jobs and deliveries per state
are read from the store at each scrape; the stage latencies of the worker
processes reach it through the store (``stage_times``), which the main loop
polls, so no multiprocess mode is needed. Labels carry states, stages and
destination names only: never a UID, never patient data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ich_node.queue.store import Store

log = structlog.get_logger(__name__)

#: Latency buckets in seconds, from a C-STORE (ms) to a long job (minutes).
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_STAGES: Final = {"read_s": "read", "infer_s": "infer", "results_s": "encode", "job_s": "job"}


class _StoreCollector(Collector):
    """Rows per state of jobs, deliveries and series, read at scrape time."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for table in ("jobs", "deliveries", "series"):
            family = GaugeMetricFamily(
                f"ich_node_{table}",
                f"{table.capitalize()} in the store per state",
                labels=["state"],
            )
            try:
                counts = self.store.counts(table)
            except Exception as exc:  # a busy store must not break the scrape
                log.warning("metrics.store_unavailable", error=type(exc).__name__)
                counts = {}
            for state, n in sorted(counts.items()):
                family.add_metric([state], n)
            yield family
        family = GaugeMetricFamily("ich_node_instances", "Instances recorded in the store")
        with contextlib.suppress(Exception):
            family.add_metric([], self.store.n_instances())
        yield family
        family = GaugeMetricFamily(
            "ich_node_sop_uid_reused_instances",
            "Instances whose SOP Instance UID is also recorded in another series",
        )
        with contextlib.suppress(Exception):
            family.add_metric([], self.store.reread_counts().sop_uid_reused)
        yield family


class Metrics:
    """The node's metrics, in their own registry.

    Parameters
    ----------
    store : Store, optional
        When given, job/delivery/series gauges are read from it at scrape time.
    """

    def __init__(self, store: Store | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances = Counter(
            "ich_node_instances_received",
            "C-STORE requests by outcome (stored, duplicate, rejected, out_of_resources)",
            ["outcome"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "ich_node_store_seconds", "C-STORE handling time", buckets=BUCKETS, registry=r
        )
        self.series = Counter(
            "ich_node_series_decisions",
            "Series decisions by outcome (queued, skipped, identical: a re-send not read again)",
            ["outcome"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "ich_node_stage_seconds",
            "Time per stage: read, infer, encode, job (whole job), send (per delivery)",
            ["stage"],
            buckets=BUCKETS,
            registry=r,
        )
        self.deliveries = Counter(
            "ich_node_deliveries_attempted",
            "Delivery attempts by destination and outcome (done, retry, parked)",
            ["destination", "outcome"],
            registry=r,
        )
        self.send_failures = Counter(
            "ich_node_send_failures", "Failed delivery attempts per destination", ["destination"],
            registry=r,
        )  # fmt: skip
        self.time_to_notification = Histogram(
            "ich_node_time_to_notification_seconds",
            "From the last instance of a series version received to its alert accepted "
            "by the notification target",
            ["target"],
            buckets=BUCKETS,
            registry=r,
        )
        self.refusals = Counter(
            "ich_node_associations_refused",
            "Connections and associations the listener refused or aborted, by reason "
            "(see docs/admin.md, Hostile peers)",
            ["reason"],
            registry=r,
        )
        self._last_stage_id = 0
        self._store = store
        if store is not None:
            r.register(_StoreCollector(store))
            # Only timings recorded from now on: a restart does not replay old jobs.
            rows = store.stage_times_after(0)
            while rows:
                self._last_stage_id = rows[-1][0]
                rows = store.stage_times_after(self._last_stage_id)

    def run_once(self) -> int:
        """Observe the worker stage timings recorded since the last call; returns how many."""
        if self._store is None:
            return 0
        rows = self._store.stage_times_after(self._last_stage_id)
        for row_id, stage, seconds in rows:
            self.stage_seconds.labels(_STAGES.get(stage, stage)).observe(seconds)
            self._last_stage_id = row_id
        return len(rows)

    def serve(self, address: str) -> object:
        """Start the HTTP endpoint at ``HOST:PORT`` in a daemon thread; returns the server."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host or "0.0.0.0", registry=self.registry
        )
        log.info("metrics.started", address=address)
        return server
