"""Two listeners and two workers as separate processes on one PostgreSQL database.

10 small phantom studies, 4 of them with their series split across both
listeners; the host of one worker is SIGKILLed while it holds a job, one listener
once its studies are sent (the last study then goes to the other). Each series
version is read exactly once and the PACS (a pynetdicom SCP) receives exactly one
SR per series. The run is :func:`benchmarks.multihost.run_multihost`.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.timeout(600)
def test_two_listeners_two_workers_one_killed(
    tmp_path: Path, tiny_bundle: Path, pg_url: str
) -> None:
    from benchmarks.multihost import run_multihost

    report = run_multihost(tmp_path, pg_url, bundle=tiny_bundle, studies=10, split=4)
    assert report["violations"] == [], report
    assert report["killed"]["host"] == "w1" and report["listener_killed"] == "l2"
    assert report["series"] == 10 and report["jobs"] == 10
    assert report["srs_received"] == 10
    # Series were read while they arrived (series.streaming), one whose slices went to
    # both listeners among them, and still each version was read once (above).
    assert report["streamed_series"] >= 1 and report["split_series_streamed"] >= 1
    # Every host registered under its own node id; `status` shows them all.
    hosts = {"l1.listener", "l2.listener", "w1.worker", "w2.worker", "w2.worker-0"}
    assert hosts <= set(report["status_heartbeats"])
    # `health --role`: the live listener and worker hosts are healthy, the killed one not.
    assert report["health"] == {"l1": 0, "w2": 0, "w1": 1}
