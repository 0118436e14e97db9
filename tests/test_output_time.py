"""Results are dated in the patient's zone: the source study's TimezoneOffsetFromUTC, else
``node.timezone``, else the system's; (0008,0201) always names it, findings.json too.

End to end through a real listener, worker and sender (DCMTK storescp reads back what
the PACS got), on both store backends, with the node's process clock in UTC.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pydicom
import pytest

from ich_node.config import ConfigError, parse_config
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.backend import open_store
from ich_node.queue.layout import results_dir
from ich_node.results.common import OUTPUT_DATE_TIMES, output_time, source_utc_offset
from tests.conftest import dcmtk
from tests.pipeline import Pacs, Pipeline, derived, node_config
from training.phantom import PhantomSeries, write_series

#: Dates and times copied from the source (in its zone), not made by the node.
COPIED = {"StudyDate", "StudyTime", "PatientBirthDate"}


def _header(offset: str | None) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    if offset is not None:
        ds.TimezoneOffsetFromUTC = offset
    return ds


def test_the_sources_offset_wins_then_node_timezone_then_the_system() -> None:
    now = datetime.datetime(2024, 7, 1, 23, 30, tzinfo=datetime.UTC)
    tokyo = output_time(_header("+0900"), ZoneInfo("America/New_York"), "America/New_York", now)
    assert tokyo.when.isoformat() == "2024-07-02T08:30:00+09:00" and tokyo.zone_from == "source"
    # Summer in New York: -04:00 (the zone's rules, not a fixed offset).
    ny = output_time(_header(None), ZoneInfo("America/New_York"), "America/New_York", now)
    assert ny.when.isoformat() == "2024-07-01T19:30:00-04:00"
    assert (ny.zone_from, ny.zone_name) == ("node.timezone", "America/New_York")
    winter = output_time(_header(None), ZoneInfo("America/New_York"), "", now.replace(month=1))
    assert winter.when.utcoffset() == datetime.timedelta(hours=-5)
    system = output_time(_header(None), None, "", now)
    assert system.zone_from == "system" and system.when == now
    for bad in ("0900", "+9", "+2500", "+0960", "-1300", "UTC", ""):
        assert source_utc_offset(_header(bad)) is None, bad
    assert source_utc_offset(_header("-0330")) == datetime.timezone(
        -datetime.timedelta(hours=3, minutes=30)
    )
    assert source_utc_offset(_header("+1400")) is not None


def test_node_timezone_must_be_an_iana_name(tmp_path: Path) -> None:
    assert parse_config({"node": {"timezone": "Asia/Tokyo"}}).node.timezone == "Asia/Tokyo"
    assert parse_config({}).node.timezone is None
    with pytest.raises(ConfigError, match=r"node\.timezone"):
        parse_config({"node": {"timezone": "Mars/Olympus_Mons"}})


@pytest.fixture
def utc_process() -> Iterator[None]:
    """The node's process clock in UTC, as in the container."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    root = tmp_path_factory.mktemp("tz_study")
    return write_series(root / "s", seed=41, subtypes=("subdural",), n_slices=10, matrix=64)


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path) -> Classifier:
    return Classifier(load_bundle(tiny_bundle), device="cpu", batch_size=10)


def _read(
    tmp_path: Path,
    storage_section: Callable[[Path], Any],
    classifier: Classifier,
    files: list[Path],
    **node: Any,
) -> tuple[list[pydicom.Dataset], dict[str, Any], datetime.datetime]:
    pacs = Pacs(tmp_path / "pacs")
    pacs.start()
    database = storage_section(tmp_path / "node").database
    config = node_config(tmp_path, database, pacs, node={**node}, results={"heatmaps": "all"})
    store = open_store(config.storage)
    if database is not None:
        store.place_store_id()  # type: ignore[attr-defined]
    pipeline = Pipeline(config, store, classifier, pacs)
    started = datetime.datetime.now(datetime.UTC)
    try:
        pipeline.send(files)
        pipeline.drain()
        (job,) = store.jobs()
        findings = json.loads(
            (results_dir(config.storage.dir, job.job_id) / "findings.json").read_text()
        )
        outputs = [ds for ds in pacs.received() if ds.Modality in ("SR", "OT")]
    finally:
        pipeline.close()
        store.close()
        pacs.stop()
    return outputs, findings, started


def _check(
    outputs: list[pydicom.Dataset], offset: str, started: datetime.datetime, tmp_path: Path
) -> None:
    assert {ds.Modality for ds in outputs} == {"SR", "OT"}  # the SR and the heatmaps
    for ds in outputs:
        assert ds.TimezoneOffsetFromUTC == offset
        made = [(d, t) for d, t in OUTPUT_DATE_TIMES if d in ds]
        assert ("ContentDate", "ContentTime") in made
        for date_keyword, time_keyword in made:
            stamp = datetime.datetime.strptime(
                f"{ds[date_keyword].value}{str(ds[time_keyword].value)[:6]}{offset}",
                "%Y%m%d%H%M%S%z",
            )
            # Now, in that zone: within the run, to the second.
            assert started - datetime.timedelta(seconds=1) <= stamp, (date_keyword, stamp)
            assert stamp <= datetime.datetime.now(datetime.UTC), (date_keyword, stamp)
        for item in ds.get("ContributingEquipmentSequence", ()):  # made now, as a DT
            if "ContributionDateTime" in item:
                assert str(item.ContributionDateTime).endswith(offset)
        others = [
            e.keyword
            for e in ds.iterall()
            if e.VR in ("DA", "TM", "DT")
            and e.keyword not in COPIED
            and e.keyword not in {k for pair in OUTPUT_DATE_TIMES for k in pair}
            and e.keyword != "ContributionDateTime"
        ]
        assert others == [], others  # no date or time left in another zone
    sr = next(ds for ds in outputs if ds.Modality == "SR")
    path = tmp_path / "sr_check.dcm"
    sr.save_as(path)
    report = subprocess.run([dcmtk("dciodvfy"), str(path)], capture_output=True, text=True)
    errors = [x for x in (report.stdout + report.stderr).splitlines() if x.startswith("Error")]
    assert errors == [], errors


def test_a_source_at_plus_0900_read_by_a_node_in_utc_is_dated_in_its_zone(
    tmp_path: Path,
    storage_section: Callable[[Path], Any],
    classifier: Classifier,
    study: PhantomSeries,
    utc_process: None,
) -> None:
    def tokyo(i: int, ds: pydicom.Dataset) -> None:
        ds.TimezoneOffsetFromUTC = "+0900"

    files = derived(study.paths, tmp_path / "tokyo", tokyo)
    # node.timezone names another zone: the source's own offset still wins.
    outputs, findings, started = _read(
        tmp_path, storage_section, classifier, files, timezone="America/New_York"
    )
    _check(outputs, "+0900", started, tmp_path)
    source = pydicom.dcmread(files[0])
    for ds in outputs:  # the study's own date and time, as the source has them
        assert (ds.StudyDate, ds.StudyTime) == (source.StudyDate, source.StudyTime)
    written = datetime.datetime.fromisoformat(findings["time"]["written"])
    assert written.utcoffset() == datetime.timedelta(hours=9)
    assert findings["time"]["utc_offset"] == "+09:00" and findings["time"]["zone_from"] == "source"


def test_without_an_offset_the_node_timezone_dates_the_results_and_is_named(
    tmp_path: Path,
    storage_section: Callable[[Path], Any],
    classifier: Classifier,
    study: PhantomSeries,
    utc_process: None,
) -> None:
    outputs, findings, started = _read(
        tmp_path, storage_section, classifier, list(study.paths), timezone="Asia/Kolkata"
    )
    _check(outputs, "+0530", started, tmp_path)
    assert findings["time"]["zone_from"] == "node.timezone"
    assert findings["time"]["zone_name"] == "Asia/Kolkata"
    assert findings["time"]["written"].endswith("+05:30")
