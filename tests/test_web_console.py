"""The web console as a person uses it: real Chromium (Selenium) against a real node.

One node per module: ``ich-node serve`` in a subprocess reads phantom studies sent
with DCMTK ``storescu`` (a random-weights bundle whose thresholds are 0.01, so the
study is positive, as in the alert tests) and sends its results to a destination
that is down, so the delivery parks. ``ich-node web`` runs in a second subprocess
on the same ``storage.dir``. Debian's Chromium, driven through the system
``/usr/bin/chromedriver`` (never a downloaded driver), logs in, finds the positive
study, opens its heatmaps, is refused without a CSRF token, as a viewer (no
Resend button, 403 on the POST), with a wrong password and after its session
expired, and resends the parked job once the destination is up, then sees it
delivered. The logs of both processes are checked for the planted patient data.

``ICH_WEB_SCREENSHOTS=DIR`` saves a screenshot of each page there (docs/img/ for
docs/web.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import yaml

from benchmarks.common import free_port, port_open, random_bundle, serve_argv
from ich_node.labels import LABELS
from ich_node.queue.store import Store
from tests.alert_servers import MLLPServer
from tests.conftest import dcmtk
from training.phantom import write_series

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ADMIN, ADMIN_PASSWORD = "ada", "ada-correct-horse"
VIEWER, VIEWER_PASSWORD = "vic", "vic-battery-staple"
SHOTS = os.environ.get("ICH_WEB_SCREENSHOTS")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="Debian chromium and chromium-driver are not installed",
)
webdriver = pytest.importorskip("selenium.webdriver")


def wait_for(predicate: object, timeout: float = 180.0, every: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()  # type: ignore[operator]
        if value:
            return value
        time.sleep(every)
    return None


def _web_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "ich_node.cli", "web", "--config", str(config)]


@dataclass
class Site:
    """The node, its web console and the phantom study they hold."""

    root: Path
    storage: Path
    web_url: str
    pacs_port: int
    accession: str
    patient_name: str
    patient_id: str
    birth_date: str
    series_uid: str
    skipped_uid: str
    processes: list[subprocess.Popen[bytes]]

    def store(self) -> Store:
        return Store.open(self.storage)

    def log(self, name: str) -> str:
        return (self.root / name).read_text(errors="replace")


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)


def _config(
    root: Path, bundle: Path, pacs_port: int, web_port: int, ris_port: int, **web: object
) -> dict:
    return {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": free_port(), "workers": 1},
        "callers": [{"ae_title": "MODALITY"}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": pacs_port}],
        "series": {"stable_seconds": 0.5, "min_slices": 8},
        "model": {"bundle": str(bundle), "device": "cpu", "batch_size": 8},
        "results": {"heatmaps": "positive"},
        "sender": {"max_attempts": 2, "backoff_base_seconds": 0.2, "backoff_max_seconds": 0.5,
                   "timeout_seconds": 10.0},
        "storage": {"dir": str(root / "node"), "min_free_mb": 1},
        "logging": {"format": "json", "level": "INFO"},
        "notifications": [{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris_port,
                           "receiving_application": "RIS", "receiving_facility": "HOSP"}],
        "web": {"address": f"127.0.0.1:{web_port}", "users_file": str(root / "web-users"),
                "show_patient": True, **web},
    }  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("web_site")
    bundle = random_bundle(root / "model.safetensors", name="web console test model",
                           thresholds=dict.fromkeys(LABELS, 0.01))  # fmt: skip
    pacs_port, web_port = free_port(), free_port()
    ris = MLLPServer("AA")  # python-hl7's MLLP server: the alert is accepted at once
    config = root / "node.yaml"
    config.write_text(yaml.safe_dump(_config(root, bundle, pacs_port, web_port, ris.port)))
    for name, role, password in ((ADMIN, "admin", ADMIN_PASSWORD),
                                 (VIEWER, "viewer", VIEWER_PASSWORD)):  # fmt: skip
        added = subprocess.run(
            [sys.executable, "-m", "ich_node.cli", "web-user", "add", name, "--role", role,
             "--config", str(config), "--password-stdin"],
            input=password + "\n", capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
    study = write_series(root / "study", seed=41, subtypes=("subdural",), n_slices=10, matrix=128)
    small = write_series(root / "small", seed=42, n_slices=4, matrix=128)  # too few: skipped
    header = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
    processes = [_start(serve_argv(config), root / "node.log")]
    node_port = yaml.safe_load(config.read_text())["node"]["port"]
    site = Site(
        root, root / "node", f"http://127.0.0.1:{web_port}", pacs_port,
        str(header.AccessionNumber), str(header.PatientName), str(header.PatientID),
        str(header.PatientBirthDate), str(header.SeriesInstanceUID),
        str(pydicom.dcmread(small.paths[0], stop_before_pixels=True).SeriesInstanceUID),
        processes,
    )  # fmt: skip
    try:
        assert wait_for(lambda: port_open(node_port) or processes[0].poll() is not None, 240)
        assert processes[0].poll() is None, site.log("node.log")[-3000:]
        for files in (study.paths, small.paths):
            sent = subprocess.run(
                [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "ICH_NODE", "127.0.0.1",
                 str(node_port), *map(str, files)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr
        # A caller the node does not know: refused, shown by peer on the Problems page.
        stranger = subprocess.run(
            [dcmtk("echoscu"), "-aet", "STRANGER", "-aec", "ICH_NODE", "127.0.0.1",
             str(node_port)], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert stranger.returncode != 0
        # The destination is down: the job's delivery parks after two attempts.
        assert wait_for(lambda: any(d.state == "parked" for d in site.store().deliveries()), 240), (
            site.log("node.log")[-3000:]
        )
        assert wait_for(lambda: any(a.accepted_at for a in site.store().alerts()), 120)
        processes.append(_start(_web_argv(config), root / "web.log"))
        assert wait_for(lambda: port_open(web_port) or processes[1].poll() is not None, 60)
        assert processes[1].poll() is None, site.log("web.log")[-3000:]
        yield site
    finally:
        ris.close()
        for process in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1280,1000", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    # Debian's driver, never one Selenium Manager downloaded: the versions match.
    system = subprocess.run([str(CHROMEDRIVER), "--version"], capture_output=True, text=True)
    assert driver.capabilities["chrome"]["chromedriverVersion"].split()[0] in system.stdout
    yield driver
    driver.quit()


# -- helpers: what a person does ------------------------------------------------------
def status_code(driver: object) -> int:
    """The HTTP status of the page now shown (Navigation Timing, Chromium 109+)."""
    return int(
        driver.execute_script(  # type: ignore[attr-defined]
            "return performance.getEntriesByType('navigation')[0].responseStatus"
        )
    )


def navigate(driver: object, action: object) -> None:
    """Do ``action`` (a click or a submit that loads a page) and wait for the new page."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.wait import WebDriverWait

    old = driver.find_element("tag name", "html")  # type: ignore[attr-defined]
    action() if callable(action) else action.click()  # type: ignore[attr-defined]

    def gone(_driver: object) -> bool:
        # The old page's root is stale once the new page replaced it. While the page
        # changes, chromedriver may answer "Node with given id does not belong to the
        # document" (an unknown error) instead of a stale element: gone too.
        try:
            old.is_enabled()  # type: ignore[attr-defined]
        except WebDriverException:
            return True
        return False

    wait = WebDriverWait(driver, 60)
    wait.until(gone)
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")


def text(driver: object, css: str) -> str:
    return str(driver.find_element("css selector", css).text)  # type: ignore[attr-defined]


def login(driver: object, site: Site, name: str, password: str, path: str = "/") -> None:
    driver.get(site.web_url + path)  # type: ignore[attr-defined]
    driver.find_element("id", "name").send_keys(name)  # type: ignore[attr-defined]
    driver.find_element("id", "password").send_keys(password)  # type: ignore[attr-defined]
    navigate(driver, driver.find_element("id", "login"))  # type: ignore[attr-defined]


def logout(driver: object) -> None:
    buttons = driver.find_elements("id", "logout")  # type: ignore[attr-defined]
    if buttons:
        navigate(driver, buttons[0])
        assert "/login" in driver.current_url  # type: ignore[attr-defined]


def shot(driver: object, name: str) -> None:
    if SHOTS:  # the whole page, then the usual window again
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")  # type: ignore[attr-defined]
        driver.set_window_size(1280, min(3000, max(600, int(height) + 140)))  # type: ignore[attr-defined]
        driver.save_screenshot(str(Path(SHOTS) / f"web-{name}.png"))  # type: ignore[attr-defined]
        driver.set_window_size(1280, 1000)  # type: ignore[attr-defined]


# -- the tests, in the order a session goes ----------------------------------------------
def test_wrong_password_is_refused(browser: object, site: Site) -> None:
    browser.delete_all_cookies()  # type: ignore[attr-defined]
    login(browser, site, ADMIN, "not-the-password")
    assert text(browser, "#login-error") == "Wrong user name or password."
    assert status_code(browser) == 401
    shot(browser, "login")
    browser.get(site.web_url + "/series")  # type: ignore[attr-defined]
    assert "/login" in browser.current_url  # type: ignore[attr-defined]  # no session


def test_admin_finds_the_positive_study_and_opens_its_heatmaps(browser: object, site: Site) -> None:
    login(browser, site, ADMIN, ADMIN_PASSWORD)
    assert text(browser, "h1") == "Overview"
    assert text(browser, "#mode") == "live"
    assert text(browser, "#reads-24h") == "1" and text(browser, "#positives-24h") == "1"
    assert "alive" in text(browser, "#processes")
    assert text(browser, "#ttn-median-24h").endswith(" s")  # the RIS accepted the alert
    shot(browser, "overview")

    navigate(browser, browser.find_element("link text", "Series"))  # type: ignore[attr-defined]
    rows = browser.find_elements("css selector", "#series tr.row")  # type: ignore[attr-defined]
    assert {r.get_attribute("data-series") for r in rows} == {site.series_uid, site.skipped_uid}
    skipped = browser.find_element(  # type: ignore[attr-defined]
        "css selector", f'tr[data-series="{site.skipped_uid}"] td.state'
    )
    assert skipped.text.startswith("skipped")
    shot(browser, "series")
    browser.find_element("id", "positive").click()  # type: ignore[attr-defined]
    browser.find_element("id", "q").send_keys(site.accession)  # type: ignore[attr-defined]
    navigate(browser, browser.find_element("id", "search"))  # type: ignore[attr-defined]
    rows = browser.find_elements("css selector", "#series tr.row")  # type: ignore[attr-defined]
    assert [r.get_attribute("data-series") for r in rows] == [site.series_uid]
    assert "subdural" in rows[0].find_element("css selector", "td.labels").text
    assert rows[0].find_element("css selector", "td.patient").text == site.patient_name

    navigate(browser, rows[0].find_element("css selector", "a.open"))
    assert text(browser, "#accession") == site.accession
    assert text(browser, "#patient-id") == site.patient_id  # web.show_patient: true
    results = browser.find_elements("css selector", "#findings td.result")  # type: ignore[attr-defined]
    assert {r.get_attribute("data-label"): r.text for r in results}["any"] == "POSITIVE"
    assert browser.find_elements("css selector", "#plot svg polyline")  # type: ignore[attr-defined]
    assert "done" in text(browser, '#alerts tr[data-target="ris"]')
    assert "AI result for triage support, not a diagnosis" in text(browser, "main")
    images = browser.find_elements("css selector", "#heatmaps img")  # type: ignore[attr-defined]
    assert len(images) == 10  # thresholds 0.01: every slice positive, each explained
    assert wait_for(
        lambda: all(
            browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)  # type: ignore[attr-defined]
            for i in images
        ),
        30,
    ), "heatmap previews did not load"
    shot(browser, "series-version")
    navigate(browser, images[4].find_element("xpath", ".."))  # open one heatmap
    assert browser.current_url.endswith("/heatmaps/5.png")  # type: ignore[attr-defined]
    width = browser.execute_script(  # type: ignore[attr-defined]
        "return document.images[0].naturalWidth"
    )
    assert width == 128  # the source slice's matrix
    browser.back()  # type: ignore[attr-defined]


def test_admin_post_without_csrf_token_is_refused(browser: object, site: Site) -> None:
    browser.get(site.web_url + "/problems")  # type: ignore[attr-defined]
    assert status_code(browser) == 200
    parked = browser.find_elements("css selector", "#deliveries tr.delivery")  # type: ignore[attr-defined]
    assert parked and "parked" in parked[0].text
    refused = text(browser, ".refusals")
    assert "127.0.0.1" in refused and "STRANGER" in refused
    assert "calling_ae_not_recognised" in refused
    shot(browser, "problems")
    browser.execute_script(  # type: ignore[attr-defined]
        "document.querySelectorAll('form.inline input[name=csrf]').forEach(e => e.remove())"
    )
    navigate(browser, browser.find_element("css selector", "#deliveries button.resend"))  # type: ignore[attr-defined]
    assert text(browser, "#message-title") == "Refused"
    assert status_code(browser) == 403
    assert {d.state for d in site.store().deliveries() if d.destination == "pacs"} == {
        "parked"
    }  # nothing re-queued


def test_viewer_has_no_resend_button_and_gets_403(browser: object, site: Site) -> None:
    browser.get(site.web_url + "/problems")  # type: ignore[attr-defined]
    job_id = browser.find_element(  # type: ignore[attr-defined]
        "css selector", "#deliveries tr.delivery"
    ).get_attribute("data-job")
    logout(browser)
    login(browser, site, VIEWER, VIEWER_PASSWORD, "/problems")
    assert text(browser, "#who") == f"{VIEWER} (viewer)"
    assert "parked" in text(browser, "#deliveries")
    assert not browser.find_elements("css selector", "button.resend")  # type: ignore[attr-defined]
    # The POST a Resend button would send, with the viewer's own valid CSRF token.
    post = lambda: browser.execute_script(  # type: ignore[attr-defined]  # noqa: E731
        """const f = document.createElement('form');
        f.method = 'post'; f.action = '/problems/resend';
        const values = {csrf: document.querySelector('form.logout input[name=csrf]').value,
                        job_id: arguments[0]};
        for (const [k, v] of Object.entries(values)) {
            const i = document.createElement('input');
            i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i);
        }
        document.body.appendChild(f); f.submit();""",
        job_id,
    )
    navigate(browser, post)
    assert text(browser, "#message-title") == "Not allowed"
    assert status_code(browser) == 403
    assert {d.state for d in site.store().deliveries() if d.destination == "pacs"} == {"parked"}
    logout(browser)


def test_admin_resends_the_parked_job_and_sees_it_delivered(
    browser: object, site: Site, tmp_path: Path
) -> None:
    pacs = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "-od", str(tmp_path), str(site.pacs_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_for(lambda: port_open(site.pacs_port), 30)
        login(browser, site, ADMIN, ADMIN_PASSWORD, "/problems")
        navigate(browser, browser.find_element("css selector", "#deliveries button.resend"))  # type: ignore[attr-defined]
        assert "re-queued" in text(browser, "p.flash")
        browser.get(f"{site.web_url}/series/{site.series_uid}")  # type: ignore[attr-defined]

        def delivered() -> bool:
            browser.refresh()  # type: ignore[attr-defined]
            row = browser.find_element("css selector", '#deliveries tr[data-destination="pacs"]')  # type: ignore[attr-defined]
            return "done" in row.text

        assert wait_for(delivered, 120, every=1.0), site.log("node.log")[-3000:]
        assert text(browser, "#state") == "delivered"
        received = [pydicom.dcmread(p, stop_before_pixels=True) for p in tmp_path.iterdir()]
        assert sum(ds.Modality == "SR" for ds in received) == 1
        assert len(received) == 11  # the SR and ten heatmaps
        browser.get(site.web_url + "/problems")  # type: ignore[attr-defined]
        assert not browser.find_elements("css selector", "#deliveries tr.delivery")  # type: ignore[attr-defined]
        browser.get(site.web_url + "/validation")  # type: ignore[attr-defined]
        assert "No audit report yet" in text(browser, "#no-report")
        shot(browser, "validation")
    finally:
        pacs.terminate()
        pacs.wait(10)


def test_an_expired_session_is_refused(browser: object, site: Site, tmp_path: Path) -> None:
    """A second console on the same node whose sessions end after 3 idle seconds."""
    data = yaml.safe_load((site.root / "node.yaml").read_text())
    port = free_port()
    data["web"].update(address=f"127.0.0.1:{port}", session_minutes=0.05)
    config = tmp_path / "short.yaml"
    config.write_text(yaml.safe_dump(data))
    web = _start(_web_argv(config), tmp_path / "web.log")
    try:
        assert wait_for(lambda: port_open(port) or web.poll() is not None, 60)
        url = f"http://127.0.0.1:{port}"
        browser.get(url + "/problems")  # type: ignore[attr-defined]
        browser.find_element("id", "name").send_keys(VIEWER)  # type: ignore[attr-defined]
        browser.find_element("id", "password").send_keys(VIEWER_PASSWORD)  # type: ignore[attr-defined]
        navigate(browser, browser.find_element("id", "login"))  # type: ignore[attr-defined]
        assert text(browser, "h1") == "Problems"
        time.sleep(4)
        browser.get(url + "/series")  # type: ignore[attr-defined]
        assert "/login" in browser.current_url  # type: ignore[attr-defined]
        assert text(browser, "#login-error") == "Your session expired: log in again."
        assert "web.session_expired" in (tmp_path / "web.log").read_text()
    finally:
        web.terminate()
        web.wait(30)


def test_logs_name_users_and_pages_never_the_patient(site: Site) -> None:
    web_log, node_log = site.log("web.log"), site.log("node.log")
    for value in (site.patient_name, site.patient_id, site.birth_date, site.accession,
                  site.patient_name.replace("^", " ")):  # fmt: skip
        assert value not in web_log and value not in node_log, value
    assert '"event": "web.view"' in web_log and f'"user": "{ADMIN}"' in web_log
    assert f'"path": "/series/{site.series_uid}"' in web_log
    assert '"event": "web.resend"' in web_log and '"event": "web.login_failed"' in web_log
    assert "?q=" not in web_log  # the search (it may name a patient) is never logged
