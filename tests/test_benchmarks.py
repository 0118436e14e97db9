"""Every benchmark runs in quick mode, so none rots. No timing asserts: the figures
depend on the machine; these tests check that each benchmark measured what it says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import dcmtk


def _run(module: Any, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    args = module.get_args_parser().parse_args(["--quick", "--json", str(out), *extra])
    assert module.main(args) == 0
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["machine"]["cores"] >= 1 and result["load_average"] >= 0
    return result


def test_inference_quick(tmp_path: Path) -> None:
    from benchmarks import inference

    result = _run(inference, tmp_path)
    rows = {r["path"]: r for r in result["rows"]}
    for label in ("fp32", "fp32 channels-last", "bf16", "bf16 channels-last"):
        assert rows[f"raw model ({label}; beside the thread pool)"]["slices/s"] > 0
        worker = rows[f"worker path, thread pool ({label})"]
        assert worker["slices/s"] > 0 and worker["vs raw"] > 0
    assert any(p.startswith("headers + decode pool only") for p in rows)
    assert rows["HU, windows, resize only (cpu)"]["slices/s"] > 0
    assert result["arch"] == "resnet18" and result["slices"] == 16


def test_a_spent_budget_ends_a_benchmark_cleanly(tmp_path: Path, capsys: Any) -> None:
    """--budget: what no longer fits is skipped and said; the run still ends with its JSON."""
    from benchmarks import inference

    result = _run(inference, tmp_path, "--budget", "0.001", "--pools", "thread")
    paths = [r["path"] for r in result["rows"]]
    assert not any(p.startswith(("raw model", "worker path")) for p in paths)
    assert "(budget: fp32 skipped" in capsys.readouterr().out


def test_results_stage_quick(tmp_path: Path) -> None:
    from benchmarks import results_stage

    result = _run(results_stage, tmp_path)
    (row,) = result["rows"]
    assert row["tree"] == "this tree" and row["matrix"] == 128 and row["heatmaps"] == 12
    assert row["runs"] == 1 and "vs baseline" not in row
    # The worker's way: files written inside build, the SR in the report process.
    for part in ("explain s", "build s", "render s", "encode SC s", "files s", "total s"):
        assert row[part] > 0, part
    assert row["write s"] == "" and row["SR s"] == ""
    assert row["previews after s"] > 0  # the PNG previews, after the hand-over


def test_gc_pauses_quick(tmp_path: Path) -> None:
    """Both modes run their studies; in the frozen one the worker and the report
    process froze their start-up objects, in the other nothing is frozen."""
    from benchmarks import gc_pauses

    result = _run(gc_pauses, tmp_path)
    collected, frozen = result["rows"]
    assert (collected["mode"], frozen["mode"]) == ("collected", "frozen")
    assert collected["studies"] == frozen["studies"] == 4
    assert collected["objects frozen (worker, report)"] == "0, 0"
    worker, report = map(int, frozen["objects frozen (worker, report)"].split(", "))
    assert worker > 100_000 and report > 10_000
    for row in (collected, frozen):
        assert row["study median s"] > 0 and row["worker full collections"] >= 0


def test_a_spent_budget_ends_the_results_stage_benchmark_cleanly(
    tmp_path: Path, capsys: Any
) -> None:
    from benchmarks import results_stage

    result = _run(results_stage, tmp_path, "--budget", "0.5")
    assert result["rows"] == []
    assert "(128 px not measured: no answer in" in capsys.readouterr().out


def test_results_stage_takes_turns_with_a_baseline(tmp_path: Path) -> None:
    """With --baseline, both trees are measured in turns (each in its own process)
    and this tree's row has both ratios."""
    import subprocess

    from benchmarks import results_stage

    root = Path(results_stage.__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--verify", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        pytest.skip("not a git checkout: no commit to measure against")
    result = _run(results_stage, tmp_path, "--baseline", head.stdout.strip())
    rows = {r["tree"].split()[0]: r for r in result["rows"]}
    assert set(rows) == {"baseline", "this"}
    for row in rows.values():
        assert row["runs"] == 1 and row["total s"] > 0 and row["first total s"] > 0
    assert rows["this"]["vs baseline"] == pytest.approx(
        rows["this"]["total s"] / rows["baseline"]["total s"]
    )
    # One round: the paired ratio is that round's ratio, the same as the bests'.
    assert rows["this"]["vs baseline, paired"] == pytest.approx(rows["this"]["vs baseline"])


def test_explain_quick(tmp_path: Path) -> None:
    from benchmarks import explain

    result = _run(explain, tmp_path)
    paths = [r["path"] for r in result["rows"]]
    assert "pytorch-grad-cam" in paths and paths[-1].startswith("heatmap images")
    assert all(r["s/slice"] > 0 for r in result["rows"])
    # The shortcut is Grad-CAM for this head: the maps must agree.
    assert result["min_correlation"] > 0.999


def test_head_mask_quick(tmp_path: Path) -> None:
    from benchmarks import head_mask

    result = _run(head_mask, tmp_path)
    (row,) = result["rows"]
    assert row["slices"] == 16 and row["matrix"] == "256x256"
    assert row["s/series"] > 0 and 5 < row["head voxels %"] < 60


def test_ingest_quick(tmp_path: Path) -> None:
    dcmtk("storescu")
    from benchmarks import ingest

    result = _run(ingest, tmp_path)
    receivers = {(r["receiver"], r["associations"]) for r in result["rows"]}
    assert len(receivers) == 6  # three receivers x (1, 8) associations
    assert all(r["files/s"] > 0 and r["MB/s"] > 0 for r in result["rows"])
    # Each run is paired with pynetdicom's in the same round; the node's CPU is measured.
    assert all(r["vs pynetdicom"] > 0 for r in result["rows"])
    node = [r for r in result["rows"] if r["receiver"].startswith("ich-node")]
    assert len(node) == 2 and all(r["CPU ms/file"] > 0 for r in node)


@pytest.mark.parametrize("peers", ["dcmtk", "pynetdicom"])
def test_end_to_end_quick(tmp_path: Path, peers: str) -> None:
    """With DCMTK as the PACS, and with pynetdicom's (where DCMTK is missing: the GPU image)."""
    if peers == "dcmtk":
        dcmtk("storescp")
    from benchmarks import end_to_end

    result = _run(end_to_end, tmp_path, "--peers", peers)
    assert result["peers"] == peers
    assert [r["completion"] for r in result["rows"]] == ["header count", "quiet period"]
    for row in result["rows"]:
        assert row["objects"] == 13  # 12 heatmaps and the SR reached the destination
        assert row["seconds"] > 0 and row["job s"] > 0


def test_memory_quick(tmp_path: Path) -> None:
    dcmtk("storescp")
    from benchmarks import memory

    result = _run(memory, tmp_path)
    assert [s["studies"] for s in result["samples"]] == [1, 2, 4, 6]
    assert all(s["listener MB"] > 0 and s["worker MB"] > 0 for s in result["samples"])


def test_worker_quick(tmp_path: Path) -> None:
    from benchmarks import worker

    result = _run(worker, tmp_path)
    modes = [r["mode"] for r in result["rows"]]
    assert modes == ["raw model (ready tensors)", "one at a time", "pipeline"]
    for row in result["rows"][1:]:  # both modes ran every study to done
        assert row["seconds"] > 0 and row["infer_s"] > 0 and row["results_s"] > 0
    assert result["studies"] == 3 and result["slices"] == 8


def test_run_all_knows_every_benchmark() -> None:
    from benchmarks import run_all

    here = Path(run_all.__file__).parent
    assert {p.stem for p in here.glob("*.py")} - {
        "__init__",
        "common",
        "run_all",
        "faults",
        "multihost",
        "hostile_peers",
    } == set(run_all.BENCHMARKS)
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nonsense"])


def test_alerts_quick(tmp_path: Path) -> None:
    """Through two `serve`s, with and without streaming: the preliminary ORU reaches
    python-hl7's MLLP server, the final and the SR follow, and the findings agree."""
    from benchmarks import alerts

    result = _run(alerts, tmp_path)
    streaming, completion = result["rows"]
    assert (streaming["mode"], completion["mode"]) == ("streaming", "at completion")
    assert streaming["positive ack -> early alert s"] > 0
    assert completion["positive ack -> early alert s"] is None  # no early target there
    for row in (streaming, completion):
        assert row["last ack -> final alert s"] > 0 and row["last ack -> SR s"] > 0
    assert streaming["streamed slices"] >= 0 and completion["streamed slices"] is None
    assert result["max_probability_difference"] <= 1e-6


def test_store_backends_quick(tmp_path: Path) -> None:
    from benchmarks.store_backends import main

    assert main(["--quick", "--json", str(tmp_path / "store_backends.json")]) == 0
    result = json.loads((tmp_path / "store_backends.json").read_text())
    measures = {(r["backend"], r["measure"]) for r in result["rows"]}
    assert ("sqlite", "jobs/s, 2 workers") in measures
    assert all(r["value"] > 0 for r in result["rows"])


def test_web_quick(tmp_path: Path) -> None:
    from benchmarks import web

    result = _run(web, tmp_path)
    pages = {r["page"]: r for r in result["rows"]}
    assert set(pages) == {"Series list", "Overview", "search by accession",
                          "last page of the list", "series version", "Problems"}  # fmt: skip
    assert all(r["series"] == 50 and r["best ms"] > 0 and r["KiB"] > 0 for r in pages.values())
