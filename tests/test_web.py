"""The web console over HTTP, on both store backends: a real server on 127.0.0.1.

The console (uvicorn serving :func:`ich_node.web.app.create_app`, in a thread of
the test) reads a store built here through the store's own interfaces: a
positive series read with its findings and heatmap previews and a parked
delivery, a job parked with its reason, a skipped series, and a listener's
refusal file. The pages, logins, sessions (a clock the test moves), CSRF,
roles, resend (through ``ops.requeue_parked``) and patient-data hiding are
checked against that known content. The Chromium tests (test_web_console.py)
drive the same console against a real node.
"""

from __future__ import annotations

import io
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
import structlog
import uvicorn
from PIL import Image

from benchmarks.common import free_port
from ich_node.config import NodeConfig, QueueSection, WebSection, load_config
from ich_node.imaging.records import Coverage, Dropped
from ich_node.ingest.refusals import PeerRefusals, RefusalTally, read_refusals, write_refusals
from ich_node.labels import LABELS
from ich_node.queue.backend import job_queue
from ich_node.queue.interface import SeriesRead
from ich_node.queue.jobs import job_id_for
from ich_node.queue.layout import StorageLayout
from ich_node.results.findings import (
    LabelFinding,
    ModelInfo,
    SeriesFindings,
    SliceFinding,
    write_findings,
)
from ich_node.service.ops import collect_status, percentile
from ich_node.web.app import create_app
from ich_node.web.plot import probability_svg
from ich_node.web.users import LoginLimiter, UsersError, add_user, parse_users, read_users, verify
from training.phantom import write_series

ADMIN, VIEWER, PASSWORD = "ada", "vic", "a-long-password"
SUBDURAL_THRESHOLD = 0.4


@dataclass
class Built:
    """What the test store holds."""

    storage: Path
    positive_uid: str
    positive_job: str
    parked_uid: str
    parked_job: str
    skipped_uid: str
    accession: str
    patient_name: str
    patient_id: str
    birth_date: str
    findings: SeriesFindings


def _findings(series: object, version: int = 1) -> SeriesFindings:
    """Findings of a positive (subdural) series, built here: slice i has 0.1 * i."""
    n = len(series.sop_instance_uids)  # type: ignore[attr-defined]
    slices = tuple(
        SliceFinding(uid, -40.0 + 5.0 * i, {label: (0.1 * i if label in ("any", "subdural")
                                                    else 0.05) for label in LABELS})
        for i, uid in enumerate(series.sop_instance_uids)  # type: ignore[attr-defined]
    )  # fmt: skip
    top = 0.1 * (n - 1)
    return SeriesFindings(
        study_instance_uid=series.study_instance_uid,  # type: ignore[attr-defined]
        series_instance_uid=series.series_instance_uid,  # type: ignore[attr-defined]
        model=ModelInfo("test model", "1.0", "resnet18", "0" * 64, demo=True),
        series={
            label: LabelFinding(
                top if label in ("any", "subdural") else 0.05,
                label in ("any", "subdural"),
                SUBDURAL_THRESHOLD,
            )
            for label in LABELS
        },
        slices=slices,
        coverage=Coverage(-40.0, -40.0 + 5.0 * (n - 1), 5.0, 5.0, 0),
        coverage_complete=True,
        dropped=(Dropped("1.2.3.4.5", None, "localizer (ImageType LOCALIZER)"),),
        notes=("RescaleSlope missing: 1 assumed",),
        version=version,
    )


def record(store: object, paths: tuple[Path, ...], now: float) -> str:
    """Record a series' files as the listener does; its SeriesInstanceUID."""
    from ich_node.ingest.spool import instance_record

    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rec = instance_record(ds, ds.SOPClassUID, ds.SOPInstanceUID)
        store.add_instance(rec, path, path.stat().st_size, now)  # type: ignore[attr-defined]
    return str(ds.SeriesInstanceUID)


def queue(store: object, paths: tuple[Path, ...], now: float) -> object:
    """Record a series and queue version 1 of it, as the assembler does (its JobRecord)."""
    uid = record(store, paths, now)
    return store.queue_series(uid, len(paths), job_id_for, now)  # type: ignore[attr-defined]


def build(storage: Path, store: object, now: float) -> Built:
    """A node's store and folders as a node would leave them (see the module docstring)."""
    spool = StorageLayout(storage).spool
    positive = write_series(spool / "a", seed=51, subtypes=("subdural",), n_slices=8, matrix=64)
    parked = write_series(spool / "b", seed=52, n_slices=8, matrix=64)
    small = write_series(spool / "c", seed=53, n_slices=3, matrix=64)
    jobs = job_queue(store, QueueSection())  # type: ignore[arg-type]
    job = queue(store, positive.paths, now - 60)
    leased = jobs.lease("worker-0", now - 50)
    assert leased is not None and leased.job_id == job.job_id
    layout = StorageLayout(storage)
    findings = _findings(positive)
    write_findings(layout.results_dir(job.job_id) / "findings.json", findings)
    heatmaps = layout.outbox(job.job_id) / "heatmaps"
    heatmaps.mkdir(parents=True)
    for n in (1, 2, 10):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (n * 20, 0, 0)).save(buffer, format="PNG")
        (heatmaps / f"{n}.png").write_bytes(buffer.getvalue())
    header = pydicom.dcmread(positive.paths[0], stop_before_pixels=True)
    read = SeriesRead(
        job.job_id, positive.study_instance_uid, positive.series_instance_uid,
        str(header.AccessionNumber), 1, "f" * 64, 8, "test model", "1.0", "0" * 64,
        {label: SUBDURAL_THRESHOLD for label in LABELS},
        {label: findings.series[label].probability for label in LABELS},
        ("any", "subdural"), True, 1, read_at=now - 40,
    )  # fmt: skip
    jobs.complete(leased, ["pacs"], 4, now - 40, read=read)
    store.finish_delivery(  # type: ignore[attr-defined]
        job.job_id, "pacs", "parked", "after 8 attempts: connection refused by 127.0.0.1:104",
        now - 30, now - 30,
    )  # fmt: skip
    second = queue(store, parked.paths, now - 20)
    leased = jobs.lease("worker-0", now - 19)
    assert leased is not None and leased.job_id == second.job_id
    jobs.fail(leased, "cannot decode PixelData (JPEG 2000)", now - 18, permanent=True)
    record(store, small.paths, now - 10)  # a series too small to read: skipped, with why
    store.skip_series(small.series_instance_uid, 3, "too few slices (3 < 10)")  # type: ignore[attr-defined]
    store.heartbeat("node", 4242, now - 1)  # type: ignore[attr-defined]
    store.heartbeat("worker-0", 4243, now - 100)  # type: ignore[attr-defined]
    tally = RefusalTally()
    tally.add("10.1.2.3", "STRANGER", "calling_ae_not_recognised", now - 5)
    tally.add("10.1.2.3", "STRANGER", "calling_ae_not_recognised", now - 4)
    tally.add("10.9.9.9", None, "negotiation_timeout", now - 3)
    write_refusals(layout.refusals_file("node"), tally.rows(), now - 3600)
    store.count_refusals(  # type: ignore[attr-defined]
        {"disk_low": (3, "12 MiB free, storage.min_free_mb not met")}, now - 2
    )
    return Built(
        storage, positive.series_instance_uid, job.job_id, parked.series_instance_uid,
        second.job_id, small.series_instance_uid, str(header.AccessionNumber),
        str(header.PatientName), str(header.PatientID), str(header.PatientBirthDate), findings,
    )  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Console:
    url: str
    built: Built
    clock: Clock
    store: object
    config: NodeConfig

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=30)


def _serve(app: object) -> tuple[str, Callable[[], None]]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off"
        )  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture
def console(
    tmp_path: Path,
    open_store: Callable[[Path], object],
    storage_section: Callable[..., object],
    request: pytest.FixtureRequest,
) -> Iterator[Console]:
    """The console on a built store; ``indirect`` param: ``web`` keys (dict)."""
    storage = tmp_path / "node"
    store = open_store(storage)
    clock = Clock()
    built = build(storage, store, clock.now)
    users = tmp_path / "users"
    add_user(users, ADMIN, "admin", PASSWORD)
    add_user(users, VIEWER, "viewer", PASSWORD)
    web = WebSection(users_file=users, **getattr(request, "param", {}))
    config = NodeConfig(storage=storage_section(storage), web=web)  # type: ignore[arg-type]
    app = create_app(config, secret=b"k" * 32, clock=clock)
    url, stop = _serve(app)
    yield Console(url, built, clock, store, config)
    stop()
    app.state.web.console.close()


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


def login(client: httpx.Client, name: str, password: str = PASSWORD) -> httpx.Response:
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"csrf": token, "name": name, "password": password,
                                       "next": "/"})  # fmt: skip


# -- pages ---------------------------------------------------------------------------
def test_every_page_needs_a_login(console: Console) -> None:
    with console.client() as client:
        for path in ("/", "/series", f"/series/{console.built.positive_uid}", "/problems",
                     "/validation", f"/series/{console.built.positive_uid}/v/1/heatmaps/1.png"):  # fmt: skip
            answer = client.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/login?next=")
        assert client.post("/problems/resend", data={"job_id": "0" * 16}).status_code == 303
        page = client.get("/login")
        assert page.status_code == 200 and 'name="password"' in page.text
        assert "script" not in page.text.lower()  # plain HTML: no JavaScript at all
        assert "Content-Security-Policy" in page.headers and "http" not in page.headers[
            "Content-Security-Policy"
        ]  # fmt: skip


def test_overview_agrees_with_status(console: Console) -> None:
    with console.client() as client:
        assert login(client, VIEWER).status_code == 303
        page = client.get("/").text
    status = collect_status(console.store, console.clock.now)  # type: ignore[arg-type]
    assert re.search(r'id="reads-24h">1<', page) and re.search(r'id="positives-24h">1<', page)
    assert re.search(r'id="parked-24h">2<', page)  # a parked job and a parked delivery
    series = ", ".join(f"{k} {v}" for k, v in sorted(status["series"].items()))
    assert series == "parked 2, skipped 1" and series in page
    assert re.search(r"<td>node</td><td>4242</td><td>1.0 s ago</td>\s*<td class=\"ok\">alive", page)
    assert re.search(r"<td>worker-0</td><td>4243</td><td>100 s ago</td>\s*<td class=\"bad\">stale",
                     page)  # fmt: skip
    assert 'id="mode"' in page and ">live<" in page
    assert "MB free" in page


def test_series_list_search_and_paging(console: Console) -> None:
    b = console.built
    with console.client() as client:
        login(client, VIEWER)
        page = client.get("/series").text
        rows = re.findall(r'data-series="([^"]+)"', page)
        assert sorted(rows) == sorted([b.positive_uid, b.parked_uid, b.skipped_uid])
        assert "skipped: too few slices (3 &lt; 10)" in page
        found = client.get("/series", params={"q": b.accession}).text
        assert re.findall(r'data-series="([^"]+)"', found) == [b.positive_uid]
        assert '<strong class="positive">any, subdural</strong>' in found
        positive = client.get("/series", params={"positive": "1"}).text
        assert re.findall(r'data-series="([^"]+)"', positive) == [b.positive_uid]
        skipped = client.get("/series", params={"state": "skipped"}).text
        assert re.findall(r'data-series="([^"]+)"', skipped) == [b.skipped_uid]
        # Patient data is hidden (web.show_patient: false): not shown, not searchable.
        assert b.patient_name not in page and b.patient_id not in page
        assert "data-series" not in client.get("/series", params={"q": b.patient_id}).text


@pytest.mark.parametrize("console", [{"page_size": 5}], indirect=True)
def test_paging(console: Console, tmp_path: Path) -> None:
    spool = StorageLayout(console.built.storage).spool
    for seed in range(60, 64):  # 4 more series: 7, two pages of 5
        series = write_series(spool / str(seed), seed=seed, n_slices=2, matrix=64)
        queue(console.store, series.paths, console.clock.now)
    with console.client() as client:
        login(client, VIEWER)
        first = client.get("/series").text
        second = client.get("/series", params={"page": "2"}).text
        beyond = client.get("/series", params={"page": "9"}).text
    one, two = (re.findall(r'data-series="([^"]+)"', p) for p in (first, second))
    assert len(one) == 5 and len(two) == 2 and not set(one) & set(two)
    assert "page 1 of 2" in first and 'id="next"' in first and "page 2 of 2" in beyond


def test_series_version_page(console: Console) -> None:
    b = console.built
    with console.client() as client:
        login(client, VIEWER)
        page = client.get(f"/series/{b.positive_uid}")
        assert page.status_code == 200
        text = page.text
        assert f'id="accession">{b.accession}<' in text
        assert b.patient_name not in text and "patient-id" not in text
        results = dict(re.findall(r'data-label="([a-z]+)">(\w+)<', text))
        assert results == {label: "POSITIVE" if label in ("any", "subdural") else "negative"
                           for label in LABELS}  # fmt: skip
        assert "DEMO model" in text and "not a diagnosis" in text
        assert "RescaleSlope missing: 1 assumed" in text
        assert "1.2.3.4.5</code>: localizer (ImageType LOCALIZER)" in text
        assert "connection refused by 127.0.0.1:104" in text  # the parked delivery's reason
        assert re.findall(r"/heatmaps/(\d+)\.png\"><img", text) == ["1", "2", "10"]
        png = client.get(f"/series/{b.positive_uid}/v/1/heatmaps/10.png")
        assert png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).getpixel((0, 0)) == (200, 0, 0)
        for bad in ("..%2Ffindings.json", "1.dcm", "x.png", "3.png"):
            assert client.get(f"/series/{b.positive_uid}/v/1/heatmaps/{bad}").status_code == 404
        assert client.get(f"/series/{b.positive_uid}/v/7").status_code == 404
        assert client.get("/series/not-a-uid").status_code == 404
        # A viewer has no Resend button, even beside a parked delivery.
        assert 'class="resend"' not in text
        assert "parked" in client.get(f"/series/{b.parked_uid}").text


def test_after_retention_the_ledger_answers(console: Console) -> None:
    """Retention removed the images and the results: the list, the version page and the
    Overview still say what the node answered, from the results ledger."""
    import shutil

    b = console.built
    layout = StorageLayout(b.storage)
    shutil.rmtree(layout.results_dir(b.positive_job))
    shutil.rmtree(layout.spool / "a")
    with console.client() as client:
        login(client, VIEWER)
        found = client.get("/series", params={"q": b.accession}).text
        assert re.findall(r'data-series="([^"]+)"', found) == [b.positive_uid]
        assert '<strong class="positive">any, subdural</strong>' in found
        page = client.get(f"/series/{b.positive_uid}").text
        assert 'id="ledger"' in page and "removed by retention" in page
        results = dict(re.findall(r'data-label="([a-z]+)">(\w+)<', page))
        assert results["subdural"] == "POSITIVE" and results["epidural"] == "negative"
        assert "heatmaps/1.png" not in page
        assert re.search(r'id="positives-24h">1<', client.get("/").text)


def test_links_planted_in_the_results_are_not_followed(console: Console, tmp_path: Path) -> None:
    """A heatmap or findings.json that is a symbolic link (to a file outside the
    storage) is never served or read: the store's path guard (StorageLayout.confine)."""
    b = console.built
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"\x89PNG secret outside the storage")
    folder = StorageLayout(b.storage).outbox(b.positive_job) / "heatmaps"
    (folder / "2.png").unlink()
    (folder / "2.png").symlink_to(outside)
    results = StorageLayout(b.storage).results_dir(b.positive_job)
    (results / "findings.json").rename(tmp_path / "findings.json")
    (results / "findings.json").symlink_to(tmp_path / "findings.json")
    with console.client() as client:
        login(client, VIEWER)
        assert client.get(f"/series/{b.positive_uid}/v/1/heatmaps/2.png").status_code == 404
        assert client.get(f"/series/{b.positive_uid}/v/1/heatmaps/1.png").status_code == 200
        page = client.get(f"/series/{b.positive_uid}").text
    assert "RescaleSlope missing" not in page  # the linked findings.json was not read
    assert 'id="ledger"' in page  # the ledger's answer instead


def test_probability_plot() -> None:
    series = type("S", (), {"sop_instance_uids": tuple(f"1.2.{i}" for i in range(5)),
                            "study_instance_uid": "1.2", "series_instance_uid": "1.2.9"})()  # fmt: skip
    svg = probability_svg(_findings(series))
    lines = re.findall(r'<polyline [^>]*points="([^"]+)"', svg)
    assert len(lines) == len(LABELS)
    any_points = [tuple(map(float, p.split(","))) for p in lines[0].split()]
    assert len(any_points) == 5
    # Plot area: y from 12 (p=1) to 12+212 (p=0); slice i has p = 0.1 i.
    assert [round(y, 1) for _, y in any_points] == [round(12 + 212 * (1 - 0.1 * i), 1)
                                                    for i in range(5)]  # fmt: skip
    assert f'y1="{12 + 212 * (1 - SUBDURAL_THRESHOLD):.1f}"' in svg  # the threshold line
    assert "<script" not in svg


def test_problems_and_refusals(console: Console) -> None:
    b = console.built
    with console.client() as client:
        login(client, ADMIN)
        page = client.get("/problems").text
    assert "not retried: cannot decode PixelData (JPEG 2000)" in page
    assert re.search(rf'data-job="{b.parked_job}"', page)
    assert f'class="resend" data-job="{b.positive_job}"' in page  # admin: a button each
    assert f'class="resend" data-job="{b.parked_job}"' in page
    rows = re.findall(r'<tr class="refusal"><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>'
                      r"<td>(\d+)</td>", page)  # fmt: skip
    assert rows == [("10.1.2.3", "STRANGER", "calling_ae_not_recognised", "2"),
                    ("10.9.9.9", "—", "negotiation_timeout", "1")]  # fmt: skip
    # What the node itself refused, from the store (as `status` lists it).
    found = re.findall(r'<tr class="store-refusal"><td>([^<]+)</td><td>(\d+)</td>.*?<td>([^<]*)</td></tr>',
                       page)  # fmt: skip
    assert found == [("disk_low", "3", "12 MiB free, storage.min_free_mb not met")]


def test_shadow_mode_shows_on_every_page(console: Console) -> None:
    """node.mode: shadow is said on the Overview (with what it means) and in every footer."""
    node = console.config.node.model_copy(update={"mode": "shadow"})
    config = console.config.model_copy(update={"node": node})
    app = create_app(config, secret=b"k" * 32, clock=console.clock)
    url, stop = _serve(app)
    try:
        with httpx.Client(base_url=url, follow_redirects=False, timeout=30) as client:
            login(client, VIEWER)
            overview = client.get("/").text
            problems = client.get("/problems").text
    finally:
        stop()
        app.state.web.console.close()
    assert re.search(r'id="mode" class="mode-shadow">shadow<', overview)
    assert "only destinations and targets marked shadow receive them" in overview
    assert '<span id="footer-mode">shadow</span>' in problems


def test_admin_resend_requeues_what_is_parked(console: Console) -> None:
    b = console.built
    with structlog.testing.capture_logs() as logs, console.client() as client:
        login(client, ADMIN)
        token = csrf_of(client.get("/problems").text)
        answer = client.post("/problems/resend", data={"csrf": token, "job_id": b.positive_job})
        assert answer.status_code == 303 and answer.headers["location"] == "/problems"
        assert "1 deliveries re-queued" in client.get("/problems").text  # the flash line
        answer = client.post("/problems/resend", data={"csrf": token, "job_id": b.parked_job})
        assert answer.status_code == 303
    store = console.store
    assert [d.state for d in store.deliveries(b.positive_job)] == ["pending"]  # type: ignore[attr-defined]
    assert store.job(b.parked_job).state == "queued"  # type: ignore[attr-defined]
    resent = [e for e in logs if e["event"] == "web.resend"]
    assert [(e["user"], e["job_id"], e["requeued"]) for e in resent] == [
        (ADMIN, b.positive_job, True), (ADMIN, b.parked_job, True)]  # fmt: skip


def test_viewer_gets_403_and_nothing_changes(console: Console) -> None:
    b = console.built
    with console.client() as client:
        login(client, VIEWER)
        page = client.get("/problems").text
        assert 'class="resend"' not in page and "Resending needs the admin role" in page
        answer = client.post("/problems/resend",
                             data={"csrf": csrf_of(page), "job_id": b.positive_job})  # fmt: skip
        assert answer.status_code == 403 and "Only admins may do this." in answer.text
    assert [d.state for d in console.store.deliveries(b.positive_job)] == ["parked"]  # type: ignore[attr-defined]


def test_csrf_token_required_on_every_post(console: Console) -> None:
    b = console.built
    with console.client() as client:
        # Login itself: without the token of the login page's session, refused.
        answer = client.post("/login", data={"name": ADMIN, "password": PASSWORD})
        assert answer.status_code == 403
        login(client, ADMIN)
        for data in ({"job_id": b.positive_job}, {"job_id": b.positive_job, "csrf": "x" * 43}):
            answer = client.post("/problems/resend", data=data)
            assert answer.status_code == 403, data
        assert client.post("/logout", data={}).status_code == 403
        assert client.get("/").status_code == 200  # still logged in
    assert [d.state for d in console.store.deliveries(b.positive_job)] == ["parked"]  # type: ignore[attr-defined]


def test_wrong_password_and_rate_limit(console: Console) -> None:
    with structlog.testing.capture_logs() as logs, console.client() as client:
        assert login(client, ADMIN, "wrong").status_code == 401
        assert login(client, "nobody", "wrong").status_code == 401
        assert client.get("/").status_code == 303
        for _ in range(4):  # web.login_max_failures: 5 for one name
            assert login(client, ADMIN, "wrong").status_code == 401
        refused = login(client, ADMIN, PASSWORD)  # even the right password, for a while
        assert refused.status_code == 429 and "Too many failed logins" in refused.text
        assert login(client, VIEWER).status_code == 303  # another name is not locked out
        console.clock.now += 15 * 60 + 1  # the window passed
        client.cookies.clear()
        assert login(client, ADMIN).status_code == 303
    failed = [e for e in logs if e["event"] == "web.login_failed"]
    assert [e["user"] for e in failed] == [ADMIN, "(unknown)"] + [ADMIN] * 4
    assert "wrong" not in repr(logs) and PASSWORD not in repr(logs)


def test_sessions_expire(console: Console) -> None:
    def with_cookie(value: str) -> httpx.Client:
        return httpx.Client(base_url=console.url, cookies={"ich_node_session": value})

    with console.client() as client:
        login(client, VIEWER)
        cookie = client.cookies["ich_node_session"]
        assert client.get("/").status_code == 200
        console.clock.now += 29 * 60  # web.session_minutes: 30, since the last page
        assert client.get("/").status_code == 200
        console.clock.now += 31 * 60
        answer = client.get("/series")
        assert answer.status_code == 303 and answer.headers["location"] == "/login?next=/series"
        assert "Your session expired" in client.get("/login").text
    with with_cookie(cookie) as replayed:  # the old cookie, replayed, is no better
        assert replayed.get("/", follow_redirects=False).status_code == 303
    with console.client() as client:  # activity does not keep a session past 12 hours
        login(client, VIEWER)
        for _ in range(24):
            console.clock.now += 29 * 60
            assert client.get("/").status_code == 200
        console.clock.now += 29 * 60
        assert client.get("/").status_code == 303
    with console.client() as client:  # a signed cookie altered by hand is worth nothing
        set_cookie = login(client, VIEWER).headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        value = client.cookies["ich_node_session"]
        assert client.get("/").status_code == 200
    payload, _, signature = value.partition(".")
    forged = payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB") + "." + signature
    with with_cookie(forged) as forger:
        assert forger.get("/", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("console", [{"show_patient": True}], indirect=True)
def test_show_patient_shows_it_and_never_logs_it(console: Console) -> None:
    b = console.built
    with structlog.testing.capture_logs() as logs, console.client() as client:
        login(client, ADMIN)
        page = client.get(f"/series/{b.positive_uid}").text
        assert f'id="patient-name">{b.patient_name}<' in page
        assert f'id="patient-id">{b.patient_id}<' in page
        birth = f"{b.birth_date[:4]}-{b.birth_date[4:6]}-{b.birth_date[6:]}"
        assert f'id="patient-birth-date">{birth}<' in page
        found = client.get("/series", params={"q": b.patient_id})
        assert re.findall(r'data-series="([^"]+)"', found.text) == [b.positive_uid]
    views = [e for e in logs if e["event"] == "web.view"]
    assert {e["path"] for e in views} == {f"/series/{b.positive_uid}", "/series"}
    assert all(e["user"] == ADMIN and e["status"] == 200 for e in views)
    for value in (b.patient_name, b.patient_id, b.birth_date, b.accession):
        assert value not in repr(logs)


def test_validation_page_shows_the_latest_audit_report(console: Console) -> None:
    latest = StorageLayout(console.built.storage).audit_latest
    with console.client() as client:
        login(client, VIEWER)
        assert "No audit report yet" in client.get("/validation").text
        assert client.get("/validation/report.html").status_code == 404
        latest.mkdir(parents=True)
        (latest / "report.html").write_text("<html><body><h1>Audit</h1></body></html>")
        (latest / "report.json").write_text('{"n_reads": 3}')
        page = client.get("/validation").text
        assert '<iframe src="/validation/report.html"' in page and "sandbox" in page
        report = client.get("/validation/report.html")
        assert "<h1>Audit</h1>" in report.text
        assert "sandbox" in report.headers["content-security-policy"]
        assert client.get("/validation/report.json").json() == {"n_reads": 3}
        assert client.get("/validation/other.txt").status_code == 404


# -- users, limits, refusals, configuration ---------------------------------------------
def test_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert add_user(path, "ada", "admin", "pw-1") is True
    assert add_user(path, "vic", "viewer", "pw-2") is True
    assert add_user(path, "ada", "viewer", "pw-3") is False  # updated
    assert path.stat().st_mode & 0o777 == 0o600
    users = read_users(path)
    assert {u.name: u.role for u in users.values()} == {"ada": "viewer", "vic": "viewer"}
    assert users["ada"].password_hash.startswith("$argon2id$")
    assert verify(users["ada"], "pw-3") and not verify(users["ada"], "pw-1")
    assert not verify(None, "pw-3")
    for bad in ("ada:admin", "a b:admin:$argon2id$x", "ada:root:$argon2id$x", "ada:admin:plain",
                "ada:admin:$argon2id$x\nada:viewer:$argon2id$y"):  # fmt: skip
        with pytest.raises(UsersError, match=r"users:\d"):
            parse_users(bad, "users")
    for name, role, password in (("a:b", "admin", "x"), ("ok", "root", "x"), ("ok", "admin", "")):
        with pytest.raises(ValueError):
            add_user(path, name, role, password)


def test_web_user_add_command(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("storage: {dir: node}\nweb: {users_file: users}\n")
    argv = [sys.executable, "-m", "ich_node.cli", "web-user", "add", "ada", "--role", "admin",
            "--config", str(config), "--password-stdin"]  # fmt: skip
    run = subprocess.run(argv, input="s3cret pass\n", capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "added user ada (admin)" in run.stdout
    assert verify(read_users(tmp_path / "users")["ada"], "s3cret pass")
    run = subprocess.run(argv, input="\n", capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "the password is empty" in run.stderr
    config.write_text("storage: {dir: node}\n")
    run = subprocess.run(argv, input="x\n", capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "web.users_file is not set" in run.stderr
    web = subprocess.run([sys.executable, "-m", "ich_node.cli", "web", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert web.returncode == 2 and "web.users_file: not set" in web.stderr


def test_login_limiter_counts_names_and_addresses() -> None:
    now = [0.0]
    limiter = LoginLimiter(3, 60.0, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.wait_s("ada", "10.0.0.1") == 0
        limiter.failed("ada", "10.0.0.1")
    assert limiter.wait_s("ada", "10.0.0.2") == 60.0  # the name, from anywhere
    assert limiter.wait_s("vic", "10.0.0.1") == 0  # the address is below its 12
    for i in range(9):
        limiter.failed(f"user{i}", "10.0.0.1")
    assert limiter.wait_s("vic", "10.0.0.1") == 60.0  # 12 failures from one address
    now[0] = 30.0
    assert limiter.wait_s("ada", "10.0.0.3") == 30.0
    now[0] = 61.0
    assert limiter.wait_s("ada", "10.0.0.1") == 0


def test_refusal_tally_is_bounded_and_round_trips(tmp_path: Path) -> None:
    tally = RefusalTally(max_peers=3)
    for i in range(5):
        tally.add(f"10.0.0.{i}", "X", "calling_ae_not_recognised", float(i))
    tally.add("10.0.0.4", "X", "calling_ae_not_recognised", 9.0)
    rows = tally.rows()
    assert [(r.peer, r.count) for r in rows] == [("10.0.0.4", 2), ("10.0.0.2", 1),
                                                 ("10.0.0.3", 1)]  # fmt: skip
    path = StorageLayout(tmp_path).refusals_file("host-1.listener")
    write_refusals(path, rows, 100.0)
    (path.parent / "broken.json").write_text("{")
    assert read_refusals(path.parent) == [("host-1.listener", 100.0, rows)]
    assert rows[0] == PeerRefusals("10.0.0.4", "X", "calling_ae_not_recognised", 2, 9.0)


def test_web_section_defaults_and_paths(tmp_path: Path) -> None:
    assert NodeConfig().web == WebSection()
    assert WebSection().address == "127.0.0.1:8090" and WebSection().show_patient is False
    config = tmp_path / "node.yaml"
    config.write_text("web: {users_file: u, secret_file: s, tls: {cert: c.pem, key: k.pem}}\n")
    web = load_config(config).web
    assert web.users_file == tmp_path / "u" and web.secret_file == tmp_path / "s"
    assert web.tls is not None and web.tls.cert == tmp_path / "c.pem"
    config.write_text("web: {address: 'nowhere'}\n")
    with pytest.raises(ValueError, match=r"web\.address"):
        load_config(config)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 0.95) == 19.0 and percentile(values, 1.0) == 20.0
    assert percentile([3.0], 0.95) == 3.0 and percentile([], 0.5) is None


def test_console_imports_no_model_listener_or_worker() -> None:
    code = (
        "import sys; import ich_node.web.app, ich_node.web.run; "
        "bad = [m for m in ('torch', 'ich_node.model', 'ich_node.service.worker', "
        "'ich_node.service.serve', 'ich_node.ingest.listener') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_web_process_over_tls_with_a_secret_file(tmp_path: Path) -> None:
    """``ich-node web`` with ``web.tls``: HTTPS only, Secure cookies; a short secret file or
    a bad certificate stops it at start with one line naming the key (exit 2)."""
    from tests.alert_servers import make_ca

    ca = make_ca(tmp_path / "ca")
    add_user(tmp_path / "users", ADMIN, "admin", PASSWORD)
    (tmp_path / "secret").write_bytes(b"s" * 48)
    port = free_port()
    config = tmp_path / "node.yaml"
    web = {"address": f"127.0.0.1:{port}", "users_file": "users", "secret_file": "secret",
           "tls": {"cert": str(ca.cert), "key": str(ca.key)}}  # fmt: skip
    config.write_text(f"storage: {{dir: node}}\nweb: {web!r}\n".replace("'", '"'))
    argv = [sys.executable, "-m", "ich_node.cli", "web", "--config", str(config)]
    with open(tmp_path / "web.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        trust = ssl.create_default_context(cafile=str(ca.ca))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with httpx.Client(verify=trust, base_url=f"https://127.0.0.1:{port}") as c:
                    page = c.get("/login")
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        assert process.poll() is None, (tmp_path / "web.log").read_text()
        assert page.status_code == 200
        assert "secure" in page.headers["set-cookie"].lower()
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the port
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=5)
    finally:
        process.terminate()
        process.wait(30)
    (tmp_path / "secret").write_bytes(b"short")
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "web.secret_file" in run.stderr and "at least 32" in run.stderr
    (tmp_path / "secret").write_bytes(b"s" * 48)
    (tmp_path / "bad.pem").write_text("not a certificate")
    config.write_text(config.read_text().replace(str(ca.cert), str(tmp_path / "bad.pem")))
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "web.tls: cannot load" in run.stderr
