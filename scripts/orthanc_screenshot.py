"""Screenshots of the node's results in Orthanc, for the docs ("what you will see").

Runs the real loop on loopback ports: Orthanc (with the Orthanc Web Viewer plugin
and the shipped routing rule) ← a phantom head CT with a hemorrhage → the rule
sends it to ``ich-node serve`` → the SR and the heatmap series come back. Then
headless Chromium opens the heatmap series in the web viewer and the study in
Orthanc Explorer and saves both pictures::

    python scripts/orthanc_screenshot.py                # demo/model/model.safetensors
    python scripts/orthanc_screenshot.py --bundle B.safetensors --out-dir docs/img

Needs Debian's ``orthanc``, ``orthanc-webviewer`` and ``chromium``. Writes
``viewer_heatmap.png`` (the heatmap of the most suspicious slice: the viewer
is scrolled there with the mouse wheel over the DevTools protocol) and
``viewer_study.png`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.orthanc_util import (  # noqa: E402
    NODE_MODALITY,
    Orthanc,
    find_plugin,
    free_ports,
    orthanc_binary,
    running_orthanc,
    wait_for,
)

DEMO_BUNDLE = REPO / "demo" / "model" / "model.safetensors"
HEATMAPS = "ICH AI heatmaps"
#: Flags for headless Chromium as root in a container (no sandbox, no network noise).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium_binary() -> str | None:
    """Path of Chromium (Debian ``chromium``) or Chrome, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (no network port).

    ``--remote-debugging-pipe`` makes Chromium read JSON commands from fd 3 and
    write answers to fd 4, each message ending with a NUL byte.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("Chromium is not installed (apt-get install chromium)")
        self.size = size
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-")
        to_child, self._to_chromium = os.pipe()
        self._from_chromium, from_child = os.pipe()

        def wire_fds() -> None:  # in the child, before exec: the pipes become fds 3 and 4
            r, w = os.dup(to_child), os.dup(from_child)
            r, w = os.dup2(r, 50), os.dup2(w, 51)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.process = subprocess.Popen(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self._profile.name}",
                f"--window-size={size[0]},{size[1]}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=wire_fds,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child)
        os.close(from_child)
        self._next_id = 0
        self._buffer = b""
        self.session: str | None = None

    def call(self, method: str, **params: object) -> dict:
        """Send one command (to the attached page, when there is one) and return its result."""
        self._next_id += 1
        message: dict[str, object] = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_chromium, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chromium, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        width, height = self.size
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.call("Page.navigate", url=url)

    def wheel(self, steps: int) -> None:
        """Turn the mouse wheel ``steps`` notches down over the middle of the page."""
        for _ in range(steps):
            self.call(
                "Input.dispatchMouseEvent",
                type="mouseWheel",
                x=self.size[0] // 2,
                y=self.size[1] // 2,
                deltaX=0,
                deltaY=120,
            )
            time.sleep(0.3)

    def capture(self, out: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.call("Browser.close")
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        os.close(self._to_chromium)
        os.close(self._from_chromium)
        self._profile.cleanup()


def screenshot(
    url: str,
    out: Path,
    *,
    size: tuple[int, int] = (1280, 800),
    settle_s: float = 5.0,
    wheel_steps: int = 0,
) -> Path:
    """Open ``url`` in headless Chromium, wait, optionally scroll, save a PNG to ``out``.

    ``settle_s`` lets the page's scripts fetch and draw the images; in the Orthanc
    Web Viewer each wheel step shows the next image of the series.
    """
    browser = Chromium(size)
    try:
        browser.open(url)
        time.sleep(settle_s)
        if wheel_steps:
            browser.wheel(wheel_steps)
            time.sleep(2.0)
        return browser.capture(out)
    finally:
        browser.close()


def viewer_url(orthanc: Orthanc, series_id: str) -> str:
    """The Orthanc Web Viewer page of one series."""
    return f"{orthanc.url}/web-viewer/app/viewer.html?series={series_id}"


def explorer_study_url(orthanc: Orthanc, study_id: str) -> str:
    """Orthanc Explorer's page of one study (its series list)."""
    return f"{orthanc.url}/app/explorer.html#study?uuid={study_id}"


def heatmap_series(orthanc: Orthanc, study_id: str) -> dict | None:
    """The study's "ICH AI heatmaps" series (Orthanc's JSON), once it and the SR are there."""
    series = orthanc.get(f"/studies/{study_id}/series")
    has_sr = any(s["MainDicomTags"].get("Modality") == "SR" for s in series)
    for s in series:
        if has_sr and s["MainDicomTags"].get("SeriesDescription") == HEATMAPS:
            return dict(s)
    return None


def _slice_probabilities(exe: Path, bundle: Path, series_dir: Path, work: Path) -> dict[str, float]:
    """P(any) per source SOP Instance UID, from ``ich-node predict`` with the same bundle."""
    out = work / "predict"
    subprocess.run(
        [
            str(exe),
            "predict",
            "--no-dicom",
            "--bundle",
            str(bundle),
            "--out",
            str(out),
            str(series_dir),
        ],
        check=True,
        capture_output=True,
    )
    (findings,) = out.glob("*/findings.json")
    data = json.loads(findings.read_text())
    return {s["sop_instance_uid"]: float(s["probabilities"]["any"]) for s in data["slices"]}


def most_suspicious_position(
    orthanc: Orthanc, series: dict, probabilities: dict[str, float]
) -> int:
    """Position (0-based, in InstanceNumber order, as the viewer shows them) of the
    heatmap whose source slice has the highest probability."""
    ranked = []
    for instance in series["Instances"]:
        tags = orthanc.get(f"/instances/{instance}/tags?simplify")
        source = tags["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]
        ranked.append((int(tags["InstanceNumber"]), probabilities.get(source, 0.0)))
    ranked.sort()
    return max(range(len(ranked)), key=lambda i: ranked[i][1])


def _node_config(
    work: Path, bundle: Path, node_port: int, orthanc_aet: str, orthanc_port: int
) -> Path:
    config = {
        "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": node_port},
        "callers": [{"ae_title": orthanc_aet, "host": "127.0.0.1"}],
        "destinations": [
            {"name": "orthanc", "ae_title": orthanc_aet, "host": "127.0.0.1", "port": orthanc_port}
        ],
        "series": {"stable_seconds": 1.0},
        "model": {"bundle": str(bundle), "device": "auto"},
        "storage": {"dir": str(work / "node-state")},
        "logging": {"format": "json", "level": "INFO"},
    }
    path = work / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_loop(args: argparse.Namespace, work: Path) -> None:
    """Orthanc + node + phantom upload, then the two screenshots."""
    from training.phantom import write_series

    http_port, dicom_port, node_port = free_ports(3)
    plugin = find_plugin("libOrthancWebViewer.so")
    if plugin is None:
        raise RuntimeError(
            "the Orthanc Web Viewer plugin is missing (apt-get install orthanc-webviewer)"
        )
    config = _node_config(work, args.bundle, node_port, "ORTHANC", dicom_port)
    exe = Path(sys.executable).parent / "ich-node"
    with running_orthanc(
        work / "orthanc",
        aet="ORTHANC",
        http_port=http_port,
        dicom_port=dicom_port,
        modalities={NODE_MODALITY: ("ICH_NODE", "127.0.0.1", node_port)},
        stable_age=1,
        plugins=[plugin],
    ) as orthanc:
        log = (work / "node.log").open("wb")
        node = subprocess.Popen(
            [str(exe), "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                "ich-node health",
                lambda: (
                    subprocess.run(
                        [str(exe), "health", "--config", str(config)], capture_output=True
                    ).returncode
                    == 0
                ),
                timeout=180,
                interval=1.0,
            )
            series = write_series(
                work / "ct", seed=args.seed, subtypes=tuple(args.subtypes), n_slices=28
            )
            answers = orthanc.upload(series.paths)
            study_id = str(answers[0]["ParentStudy"])
            print(f"uploaded phantom study {series.study_instance_uid} ({args.subtypes})")
            sc = wait_for(
                "the SR and the heatmaps in Orthanc",
                lambda: heatmap_series(orthanc, study_id),
                timeout=args.timeout,
                interval=1.0,
            )
            n = len(sc["Instances"])
            print(f"{n} heatmap image(s) arrived in series {sc['ID']}")
            probabilities = _slice_probabilities(exe, args.bundle, series.paths[0].parent, work)
            steps = most_suspicious_position(orthanc, sc, probabilities)
            print(f"showing heatmap {steps + 1} of {n} (highest 'any' probability)")
            args.out_dir.mkdir(parents=True, exist_ok=True)
            path = screenshot(
                viewer_url(orthanc, sc["ID"]),
                args.out_dir / "viewer_heatmap.png",
                wheel_steps=steps,
            )
            print(f"wrote {path}")
            path = screenshot(
                explorer_study_url(orthanc, study_id), args.out_dir / "viewer_study.png"
            )
            print(f"wrote {path}")
        finally:
            node.terminate()
            node.wait(timeout=60)
            log.close()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle",
        type=Path,
        default=DEMO_BUNDLE,
        help=f"model bundle (default: the demo model, {DEMO_BUNDLE.relative_to(REPO)})",
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--subtypes", nargs="+", default=["subdural", "intraparenchymal"], help="phantom lesions"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for results")
    return parser


def main(args: argparse.Namespace) -> int:
    if orthanc_binary() is None:
        print(
            "Orthanc is not installed (apt-get install orthanc orthanc-webviewer)", file=sys.stderr
        )
        return 2
    if not args.bundle.is_file():
        print(
            f"no model bundle at {args.bundle} (run `make demo` or pass --bundle)", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="ich-orthanc-") as tmp:
        run_loop(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
