"""Screenshots of the node's results in Orthanc, for the docs ("what you will see").

Runs the real loop on loopback ports: Orthanc (with the Orthanc Web Viewer plugin
and the shipped routing rule) ← a phantom head CT with a hemorrhage → the rule
sends it to ``ich-node serve`` → the SR and the heatmap series come back. Then
headless Chromium opens the heatmap series in the web viewer and the study in
Orthanc Explorer and saves both pictures::

    python scripts/orthanc_screenshot.py                # demo/model/model.safetensors
    python scripts/orthanc_screenshot.py --bundle B.safetensors --out-dir docs/img

Needs Debian's ``orthanc``, ``orthanc-webviewer`` and ``chromium``. Writes
``viewer_heatmap.png`` and ``viewer_study.png`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
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


def screenshot(
    url: str,
    out: Path,
    *,
    size: tuple[int, int] = (1280, 800),
    budget_ms: int = 15000,
) -> Path:
    """Open ``url`` in headless Chromium and save a PNG of the window to ``out``.

    ``budget_ms`` of virtual time lets the page's scripts fetch and draw the images.
    Raises RuntimeError when Chromium is missing or writes no picture.
    """
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("Chromium is not installed (apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={out}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot of {url}:\n{done.stderr[-2000:]}")
    return out


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
            args.out_dir.mkdir(parents=True, exist_ok=True)
            for name, url in (
                ("viewer_heatmap.png", viewer_url(orthanc, sc["ID"])),
                ("viewer_study.png", explorer_study_url(orthanc, study_id)),
            ):
                path = screenshot(url, args.out_dir / name)
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
