"""Crash consistency: SIGKILL the node while studies stream in, restart, check.

The run itself is :func:`benchmarks.faults.run_crash` (real ``serve`` subprocess,
pynetdicom PACS and destination on 127.0.0.1). CI runs 3 kills; the full run
(30 kills) is marked slow::

    .venv/bin/python -m pytest -m slow tests/test_reliability_crash.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.faults import run_crash


def _assert_consistent(report) -> None:  # type: ignore[no-untyped-def]
    checks = report.checks
    assert checks["violations"] == [], checks
    assert checks["acknowledged_instances"] == report.instances  # the feeder got through
    assert checks["recorded_instances"] == report.instances
    assert checks["series_versions_done"] >= report.studies
    assert checks["result_objects_distinct_received"] == checks["result_objects_expected"] > 0


def test_three_kills_lose_nothing(tmp_path: Path, tiny_bundle: Path) -> None:
    report = run_crash(tmp_path, tiny_bundle, kills=3, studies=4, seed=1, gap=(1.0, 5.0))
    _assert_consistent(report)
    assert sum(report.kill_activity.values()) >= 3


@pytest.mark.slow
def test_thirty_kills_lose_nothing(tmp_path: Path, tiny_bundle: Path) -> None:
    report = run_crash(tmp_path, tiny_bundle, kills=30, studies=20, seed=2, gap=(0.5, 6.0))
    _assert_consistent(report)
