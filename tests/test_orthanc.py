"""The real PACS loop: Orthanc routes head CTs to the node and receives its results.

Orthanc (Debian's ``orthanc`` package) runs with the shipped routing rule
(``config/orthanc/route-head-ct.lua``) on loopback ports. The rule is checked first
against DCMTK's ``storescp`` standing in for the node (which series arrive, which
do not, and why), then end to end against ``ich-node serve`` started with the
systemd unit's command line and the configuration from ``docs/deployment.md``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import MRImageStorage, SecondaryCaptureImageStorage

from tests.conftest import dcmtk
from tests.orthanc_util import (
    EXAMPLE_CONFIG,
    NODE_MODALITY,
    ROUTING_RULE,
    Orthanc,
    find_plugin,
    free_ports,
    launch_orthanc,
    orthanc_binary,
    running_orthanc,
    wait_for,
    write_variant,
)
from training.phantom import PhantomSeries, write_series

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "ich-node.service"
GUIDE = REPO / "docs" / "deployment.md"
ORTHANC_AET = "ORTHANC"
NODE_AET = "ICH_NODE"

needs_orthanc = pytest.mark.skipif(
    orthanc_binary() is None, reason="Orthanc is not installed (apt-get install orthanc)"
)


# ----------------------------------------------------------------------------- series


def _chest(ds: pydicom.Dataset) -> None:
    ds.BodyPartExamined = "CHEST"
    ds.StudyDescription = "CT CHEST WO CONTRAST"
    ds.SeriesDescription = "AXIAL 5mm LUNG"


def _mr(ds: pydicom.Dataset) -> None:
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.StudyDescription = "MR BRAIN"
    ds.SeriesDescription = "AX T2"


def _head_without_body_part(ds: pydicom.Dataset) -> None:
    # Real head CTs often lack BodyPartExamined; the description names the head.
    del ds.BodyPartExamined
    ds.StudyDescription = "CT SCHAEDEL NATIV"
    ds.SeriesDescription = "AXIAL 5mm"


def _scout(ds: pydicom.Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "SCOUT"


def _like_node_result(ds: pydicom.Dataset) -> None:
    # What the node sends back: Secondary Capture, "ICH AI heatmaps", BodyPartExamined HEAD.
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.Manufacturer = "ich-node"
    ds.SeriesDescription = "ICH AI heatmaps"
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]


@dataclass(frozen=True)
class Upload:
    name: str
    paths: list[Path]
    series_instance_uid: str
    study_instance_uid: str
    sop_instance_uids: frozenset[str]


def _upload(orthanc: Orthanc, name: str, paths: list[Path]) -> Upload:
    orthanc.upload(paths)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return Upload(
        name,
        paths,
        str(headers[0].SeriesInstanceUID),
        str(headers[0].StudyInstanceUID),
        frozenset(str(h.SOPInstanceUID) for h in headers),
    )


@pytest.fixture(scope="module")
def head_ct(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    """A small phantom head CT (12 slices, 128x128) with a subdural hematoma."""
    out = tmp_path_factory.mktemp("head_ct")
    return write_series(out, seed=11, subtypes=("subdural",), n_slices=12, matrix=128)


def _orthanc_series_id(orthanc: Orthanc, series_instance_uid: str) -> str:
    found = json.loads(orthanc.request("POST", "/tools/lookup", series_instance_uid.encode()))
    return next(str(item["ID"]) for item in found if item["Type"] == "Series")


def _rule_decisions(orthanc: Orthanc) -> dict[str, str]:
    """What the rule said per Orthanc series id: "routing" or the reason it did not."""
    decisions = {}
    for line in orthanc.log().splitlines():
        m = re.search(
            r"ich-node: (?:routing series (\S+) \(|not routing series (\S+): (.*)$)", line
        )
        if m:
            decisions[m.group(1) or m.group(2)] = "routing" if m.group(1) else m.group(3)
    return decisions


def _store_jobs(orthanc: Orthanc) -> list[dict]:
    return [j for j in orthanc.get("/jobs?expand") if j["Type"] == "DicomModalityStore"]


# ------------------------------------------------------------------- rule vs storescp


@needs_orthanc
def test_example_orthanc_json_runs_as_written(tmp_path: Path) -> None:
    """config/orthanc/orthanc.json, comments included, starts Orthanc with the node and the rule."""
    http_port, dicom_port = free_ports(2)
    text = EXAMPLE_CONFIG.read_text()
    for old, new in (
        ('"HttpPort": 8042', f'"HttpPort": {http_port}'),
        ('"DicomPort": 4242', f'"DicomPort": {dicom_port}'),
        ('"RemoteAccessAllowed": true', '"RemoteAccessAllowed": false'),
        ("/var/lib/orthanc", str(tmp_path / "var")),
        ("/etc/orthanc/ich-node/route-head-ct.lua", str(ROUTING_RULE)),
        ('"Plugins": ["/usr/share/orthanc/plugins"]', '"Plugins": []'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "orthanc.json"
    config.write_text(text)
    orthanc = launch_orthanc(
        config,
        tmp_path,
        aet=ORTHANC_AET,
        http_port=http_port,
        dicom_port=dicom_port,
        auth=("admin", "change-me"),
    )
    try:
        modalities = orthanc.get("/modalities?expand")
        lua = orthanc.log()
    finally:
        orthanc.stop()
    assert modalities[NODE_MODALITY]["AET"] == NODE_AET
    assert modalities[NODE_MODALITY]["Port"] == 11112
    assert modalities[NODE_MODALITY]["AllowStore"] is True
    assert f"Installing the Lua scripts from: {ROUTING_RULE}" in lua


@needs_orthanc
def test_rule_sends_head_ct_only(tmp_path: Path, head_ct: PhantomSeries) -> None:
    """The shipped rule sends head CTs and nothing else; DCMTK storescp plays the node."""
    storescp = dcmtk("storescp")
    http_port, dicom_port, node_port = free_ports(3)
    received = tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen(
        [storescp, "--aetitle", NODE_AET, "--output-directory", str(received), str(node_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with running_orthanc(
            tmp_path / "orthanc",
            aet=ORTHANC_AET,
            http_port=http_port,
            dicom_port=dicom_port,
            modalities={NODE_MODALITY: (NODE_AET, "127.0.0.1", node_port)},
            stable_age=2,
        ) as orthanc:
            src = head_ct.paths
            sent = [
                _upload(orthanc, "head", list(src)),
                _upload(
                    orthanc,
                    "head, no body part",
                    write_variant(src, tmp_path / "hnb", _head_without_body_part),
                ),
            ]
            kept = [
                _upload(orthanc, "chest", write_variant(src, tmp_path / "chest", _chest)),
                _upload(orthanc, "mr", write_variant(src, tmp_path / "mr", _mr)),
                _upload(orthanc, "scout", write_variant(src[:2], tmp_path / "scout", _scout)),
                _upload(
                    orthanc, "result", write_variant(src[:3], tmp_path / "sc", _like_node_result)
                ),
            ]
            ids = {u.name: _orthanc_series_id(orthanc, u.series_instance_uid) for u in sent + kept}
            decisions = wait_for(
                "the rule's decision on every series",
                lambda: (d := _rule_decisions(orthanc)).keys() >= set(ids.values()) and d,
                timeout=60,
            )
            expected = {u.sop_instance_uids for u in sent}
            want = frozenset().union(*expected)
            wait_for(
                "storescp to receive the head CT series",
                lambda: {p.name.split(".", 1)[1] for p in received.iterdir()} >= want,
                timeout=60,
            )
            wait_for(
                "Orthanc's store jobs to finish",
                lambda: all(j["State"] == "Success" for j in _store_jobs(orthanc)),
                timeout=30,
            )
            jobs = _store_jobs(orthanc)
    finally:
        scp.terminate()
        scp.wait(timeout=10)

    assert {u.name: decisions[ids[u.name]] for u in sent} == {u.name: "routing" for u in sent}
    reasons = {u.name: decisions[ids[u.name]] for u in kept}
    assert reasons["chest"] == 'not a head (BodyPartExamined "CHEST")'
    assert reasons["mr"].startswith("SOP class 1.2.840.10008.5.1.4.1.1.4 ")
    assert reasons["scout"] == "localizer, scout or dose screen"
    assert reasons["result"].startswith("SOP class 1.2.840.10008.5.1.4.1.1.7 ")
    # Exactly the head CT instances arrived (storescp names files <modality>.<SOP UID>).
    assert {p.name.split(".", 1)[1] for p in received.iterdir()} == want
    assert sorted(tuple(j["Content"]["ParentResources"]) for j in jobs) == sorted(
        (ids[u.name],) for u in sent
    )
    assert all(j["Content"]["RemoteAet"] == NODE_AET for j in jobs)


# ---------------------------------------------------------------- the node, end to end


def guide_config() -> dict:
    """The node.yaml example of docs/deployment.md, parsed."""
    text = GUIDE.read_text()
    marker = text.index("<!-- example: node.yaml")
    block = re.search(r"```yaml\n(.*?)```", text[marker:], re.S)
    assert block is not None, "docs/deployment.md lost its node.yaml example"
    return yaml.safe_load(block.group(1))


def unit_command(name: str) -> list[str]:
    """The unit's ``name=`` command line (ExecStart, ExecStartPre) as argv."""
    for line in UNIT.read_text().splitlines():
        if line.startswith(f"{name}="):
            return shlex.split(line.split("=", 1)[1])
    raise AssertionError(f"{UNIT} has no {name}=")


def _as_installed(argv: list[str], config: Path) -> list[str]:
    # The unit runs /opt/ich-node/venv/bin/ich-node on /etc/ich-node/node.yaml; here
    # the same command runs from this venv on the test's copy of the guide's file.
    assert Path(argv[0]).name == "ich-node", argv
    exe = Path(sys.executable).parent / "ich-node"
    return [str(exe), *(str(config) if a == "/etc/ich-node/node.yaml" else a for a in argv[1:])]


def test_unit_file_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit without a warning."""
    analyze = Path("/usr/bin/systemd-analyze")
    if not analyze.is_file():
        pytest.skip("systemd-analyze is not installed")
    exe = Path(sys.executable).parent / "ich-node"
    unit = tmp_path / "ich-node.service"
    unit.write_text(UNIT.read_text().replace("/opt/ich-node/venv/bin/ich-node", str(exe)))
    done = subprocess.run(
        [str(analyze), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert str(unit) not in done.stderr, done.stderr


@dataclass
class Node:
    process: subprocess.Popen[bytes]
    config: Path
    log_path: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        exe = Path(sys.executable).parent / "ich-node"
        return subprocess.run(
            [str(exe), *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def status(self) -> dict:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def pacs_and_node(tmp_path: Path, tiny_bundle: Path) -> Iterator[tuple[Orthanc, Node]]:
    """Orthanc with the rule, and ich-node started as the systemd unit starts it."""
    http_port, dicom_port, node_port = free_ports(3)
    config = guide_config()
    # Only what a test on loopback must change: addresses, ports, paths, timings.
    config["node"].update(host="127.0.0.1", port=node_port)
    config["callers"][0].update(ae_title=ORTHANC_AET, host="127.0.0.1")
    config["destinations"][0].update(ae_title=ORTHANC_AET, host="127.0.0.1", port=dicom_port)
    config["series"]["stable_seconds"] = 1.0
    config["model"].update(bundle=str(tiny_bundle), device="cpu")
    config["storage"]["dir"] = str(tmp_path / "state")
    config["metrics"]["address"] = None
    # The random test model rarely calls anything positive: a heatmap for every slice.
    config["results"] = {"heatmaps": "all"}
    config["sender"] = {"backoff_base_seconds": 0.5}
    config_path = tmp_path / "node.yaml"
    config_path.write_text(yaml.safe_dump(config))

    pre = subprocess.run(
        _as_installed(unit_command("ExecStartPre"), config_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pre.returncode == 0, pre.stderr

    with running_orthanc(
        tmp_path / "orthanc",
        aet=ORTHANC_AET,
        http_port=http_port,
        dicom_port=dicom_port,
        modalities={NODE_MODALITY: (NODE_AET, "127.0.0.1", node_port)},
        stable_age=2,
    ) as orthanc:
        log_path = tmp_path / "node.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                _as_installed(unit_command("ExecStart"), config_path),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            node = Node(process, config_path, log_path)
            try:

                def healthy() -> bool:
                    if process.poll() is not None:
                        raise RuntimeError(f"ich-node serve exited:\n{node.log()[-3000:]}")
                    return node.cli("health").returncode == 0

                wait_for("ich-node health", healthy, timeout=120, interval=1.0)
                yield orthanc, node
            finally:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        assert process.returncode == 0, node.log()[-3000:]


def _series_of_study(orthanc: Orthanc, study_instance_uid: str) -> list[dict]:
    study = orthanc.study_id(study_instance_uid)
    return [] if study is None else orthanc.get(f"/studies/{study}/series")


def _results_arrived(orthanc: Orthanc, study_instance_uid: str) -> list[dict] | None:
    series = _series_of_study(orthanc, study_instance_uid)
    modalities = {s["MainDicomTags"].get("Modality") for s in series}
    descriptions = {s["MainDicomTags"].get("SeriesDescription") for s in series}
    return series if "SR" in modalities and "ICH AI heatmaps" in descriptions else None


def _tags(orthanc: Orthanc, instance: str) -> dict:
    return orthanc.get(f"/instances/{instance}/tags?simplify")


@needs_orthanc
def test_head_ct_round_trip(
    tmp_path: Path, head_ct: PhantomSeries, pacs_and_node: tuple[Orthanc, Node]
) -> None:
    """Head CT in Orthanc → rule → node → SR + heatmaps back in the same study."""
    orthanc, node = pacs_and_node
    src = head_ct.paths
    head = _upload(orthanc, "head", list(src))
    chest = _upload(orthanc, "chest", write_variant(src, tmp_path / "chest", _chest))
    mr = _upload(orthanc, "mr", write_variant(src, tmp_path / "mr", _mr))

    series = wait_for(
        "the SR and the heatmap series in Orthanc",
        lambda: _results_arrived(orthanc, head.study_instance_uid),
        timeout=240,
        interval=1.0,
    )
    by_uid = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in series}
    assert head.series_instance_uid in by_uid
    sr_series = [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]
    sc_series = [
        s for s in series if s["MainDicomTags"].get("SeriesDescription") == "ICH AI heatmaps"
    ]
    assert len(sr_series) == 1 and len(sc_series) == 1

    # The SR: same study, evidence = the source CT series and its instances.
    (sr_instance,) = sr_series[0]["Instances"]
    sr = _tags(orthanc, sr_instance)
    assert sr["StudyInstanceUID"] == head.study_instance_uid
    assert sr["PatientID"] == pydicom.dcmread(src[0], stop_before_pixels=True).PatientID
    evidence = sr["CurrentRequestedProcedureEvidenceSequence"]
    referenced = {
        s["SeriesInstanceUID"]: {r["ReferencedSOPInstanceUID"] for r in s["ReferencedSOPSequence"]}
        for study in evidence
        for s in study["ReferencedSeriesSequence"]
    }
    assert {study["StudyInstanceUID"] for study in evidence} == {head.study_instance_uid}
    assert head.series_instance_uid in referenced
    assert referenced[head.series_instance_uid] <= head.sop_instance_uids
    assert referenced[head.series_instance_uid]

    # The heatmaps: same study, each image references one source slice.
    sources = []
    for instance in sc_series[0]["Instances"]:
        tags = _tags(orthanc, instance)
        assert tags["StudyInstanceUID"] == head.study_instance_uid
        assert tags["SOPClassUID"] == SecondaryCaptureImageStorage
        (source,) = tags["SourceImageSequence"]
        sources.append(source["ReferencedSOPInstanceUID"])
    assert set(sources) <= head.sop_instance_uids
    assert len(set(sources)) == len(sources) == len(head.sop_instance_uids)

    # The results came back to Orthanc and the rule looked at them: never routed back.
    result_ids = {s["ID"] for s in sr_series + sc_series}
    all_ids = result_ids | {
        _orthanc_series_id(orthanc, u.series_instance_uid) for u in (head, chest, mr)
    }
    decisions = wait_for(
        "the rule's decision on every series, results included",
        lambda: (d := _rule_decisions(orthanc)).keys() >= all_ids and d,
        timeout=60,
    )
    assert decisions[_orthanc_series_id(orthanc, head.series_instance_uid)] == "routing"
    for rid in result_ids:
        assert decisions[rid].startswith("SOP class"), decisions[rid]
    jobs = _store_jobs(orthanc)
    assert [j["Content"]["ParentResources"] for j in jobs] == [
        [_orthanc_series_id(orthanc, head.series_instance_uid)]
    ]
    assert jobs[0]["State"] == "Success"

    # The node read the head CT and nothing else, and delivered its results.
    status = node.status()
    assert status["instances"] == len(head.sop_instance_uids)
    assert sum(status["series"].values()) == 1
    assert status["jobs"] == {"done": 1}, status
    assert set(status["deliveries"]) == {"done"}, status
    for upload in (chest, mr):
        assert [
            s["MainDicomTags"]["SeriesInstanceUID"]
            for s in _series_of_study(orthanc, upload.study_instance_uid)
        ] == [upload.series_instance_uid]


# ------------------------------------------------------------------------- the viewer


@needs_orthanc
def test_web_viewer_shows_the_heatmaps(
    tmp_path: Path, head_ct: PhantomSeries, tiny_bundle: Path
) -> None:
    """Orthanc Web Viewer draws the node's heatmap series (headless Chromium screenshot)."""
    from PIL import Image

    from scripts.orthanc_screenshot import chromium_binary, screenshot, viewer_url

    plugin = find_plugin("libOrthancWebViewer.so")
    if plugin is None:
        pytest.skip("Orthanc Web Viewer is not installed (apt-get install orthanc-webviewer)")
    if chromium_binary() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    exe = Path(sys.executable).parent / "ich-node"
    predicted = subprocess.run(
        [
            str(exe),
            "predict",
            "--bundle",
            str(tiny_bundle),
            "--out",
            str(tmp_path / "results"),
            "--device",
            "cpu",
            "--heatmaps",
            "all",
            str(head_ct.paths[0].parent),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predicted.returncode == 0, predicted.stderr
    http_port, dicom_port = free_ports(2)
    with running_orthanc(
        tmp_path / "orthanc",
        aet=ORTHANC_AET,
        http_port=http_port,
        dicom_port=dicom_port,
        modalities={},
        lua_scripts=(),
        plugins=[plugin],
    ) as orthanc:
        orthanc.upload(head_ct.paths)
        orthanc.upload(sorted((tmp_path / "results").rglob("*.dcm")))
        (sc,) = [
            s
            for s in orthanc.get("/series?expand")
            if s["MainDicomTags"].get("SeriesDescription") == "ICH AI heatmaps"
        ]
        png = screenshot(viewer_url(orthanc, sc["ID"]), tmp_path / "viewer.png", size=(800, 600))
    hsv = np.asarray(Image.open(png).convert("HSV"))
    assert hsv.shape == (600, 800, 3)
    hue, saturation, value = (hsv[..., i].astype(int) for i in range(3))
    # The overlay's colours (a jet colour map over a grey brain window) are on screen:
    colourful = (saturation > 128) & (value > 96)
    grey = (saturation < 24) & (value > 64) & (value < 224)
    assert colourful.mean() > 0.02, colourful.mean()
    assert grey.mean() > 0.02, grey.mean()
    assert len(np.unique(hue[colourful] // 32)) >= 3


# ------------------------------------------------------------------------ the docs


def _yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)


@pytest.mark.parametrize("doc", ["routing.md", "deployment.md"])
def test_node_yaml_in_the_docs_is_valid(tmp_path: Path, doc: str) -> None:
    """Every node.yaml snippet of the routing and deployment guides holds valid keys.

    Snippets show a section or two, so they are loaded as configuration files
    (keys, types, values); ``check-config`` goes further (callers, storage, the
    bundle on the device, the database) and needs a whole site.
    """
    from ich_node.config import ConfigError, load_config

    blocks = _yaml_blocks(REPO / "docs" / doc)
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"{i}.yaml"
        path.write_text(block)
        try:
            load_config(path)
        except ConfigError as exc:
            pytest.fail(f"{doc} block {i}:\n{block}\n{exc}")
