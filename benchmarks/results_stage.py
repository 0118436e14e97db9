"""Results-stage benchmark: what rendering, encoding and writing 40 heatmaps cost.

    python benchmarks/results_stage.py                          # 128 and 512 px, this tree
    python benchmarks/results_stage.py --baseline f0a2140       # and that commit, side by side
    python benchmarks/results_stage.py --quick --budget 60      # CI smoke run

One series of ``--slices`` phantom slices (every one positive, so every one gets a
heatmap: the worst case) is classified once; then, ``--repeats`` times, what a job
does after the probabilities are known:

- *explain*: the model stage's hand-over (:func:`ich_node.model.explain.explain_series`):
  the Grad-CAM maps (in trees before the worker drew the pixels in ``build``, also the
  heatmap pixels);
- *build*: :func:`ich_node.results.build.build_results` as the worker calls it where
  the tree supports it: the head region and the heatmap pixels drawn
  (``render=``) while the SR is encoded in the report process (``reports=``), text
  and legend burned in, Secondary Capture images encoded and each written into the
  results folder as soon as it is encoded (``out_dir=``), then the SR;
- *write*: :func:`ich_node.results.build.write_results`, in trees that write after
  building (blank where *build* writes);
- *total*: until the hand-over to the senders; *previews after*: the PNG previews
  the worker writes after it (:func:`ich_node.results.build.write_previews`);
- *first total*: the first of the runs, a worker's first study: what is loaded on
  first use is paid there unless the worker's start loaded it (*start warm-up*: the
  worker's own warm-up of the drawing and the encoders, where the tree has one).

Inside *build* (and *write*), the time spent in each part is summed over threads
(so with threads the parts may add up to more than the wall time): render =
``render_heatmaps`` (text and legend), encode SC = ``build_heatmap_series``, PNG =
``png_bytes`` (the previews after the hand-over included), SR = ``build_sr`` (blank
when it runs in the report process), files = ``_write_atomic`` / ``_write_durable``.

``--baseline REV`` extracts that commit's ``ich_node`` (``git archive``) into a temporary
folder and measures it in a subprocess the same way, alternating with this tree, so
that load from other processes hits both; the ratio column is this tree / baseline.
Every row is printed the moment it is measured; ``--budget`` seconds end the run
cleanly (rows not measured are listed as skipped).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and os.environ.get("ICH_BENCH_ROOT"):
    sys.path.insert(0, os.environ["ICH_BENCH_ROOT"])  # a baseline's ich_node first
sys.path.insert(1 if os.environ.get("ICH_BENCH_ROOT") else 0, str(ROOT))

from benchmarks.common import Budget, load_average, machine, print_row, write_json  # noqa: E402

PARTS = (
    ("render", "render_heatmaps"),
    ("encode SC", "build_heatmap_series"),
    ("PNG", "png_bytes"),
    ("SR", "build_sr"),
    ("files", "_write_atomic"),
    ("files", "_write_durable"),
)
COLUMNS = ["tree", "matrix", "explain s", "build s", "write s", "total s", "vs baseline"]
COLUMNS += ["previews after s", "first total s", "start warm-up s"]
COLUMNS += list(dict.fromkeys(name + " s" for name, _ in PARTS))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--matrix", type=int, nargs="+", default=[128, 512], help="slice matrices")
    p.add_argument("--slices", type=int, default=40, help="slices (= heatmaps) per series")
    p.add_argument("--size", type=int, default=64, help="model input size (resnet18)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=3, help="best of N")
    p.add_argument("--baseline", default=None, help="git revision to measure side by side")
    p.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument("--quick", action="store_true", help="12 slices of 128 px, 1 repeat")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--measure", type=int, default=0, help=argparse.SUPPRESS)  # child mode
    return p


def measure(matrix: int, slices: int, size: int, device: str, repeats: int) -> dict[str, Any]:
    """Best-of-``repeats`` seconds of explain, build and write, and of their parts."""
    import ich_node.results.build as build
    from benchmarks.common import random_bundle
    from ich_node.imaging import read_series
    from ich_node.model.bundle import load_bundle
    from ich_node.model.explain import explain_series
    from ich_node.model.inference import Classifier
    from training.phantom import write_series

    spent: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - started

        return run

    for name, attr in PARTS:
        if hasattr(build, attr):
            setattr(build, attr, timed(name, getattr(build, attr)))
    positive = {"any": 0.0, "subdural": 0.0}
    thresholds = {k: positive.get(k, 1.0) for k in build.LABELS}
    best: dict[str, float] = {}
    # As the worker writes them (into its temporary results folder), where supported.
    parameters = inspect.signature(build.write_results).parameters
    write_options = {"in_temp_folder": True} if "in_temp_folder" in parameters else {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        phantom = write_series(
            folder / "s", seed=1, subtypes=("subdural",), n_slices=slices, matrix=matrix
        )
        bundle = random_bundle(
            folder / "m.safetensors", name="bench", input_size=size, thresholds=thresholds
        )
        classifier = Classifier(load_bundle(bundle), device=device, batch_size=16)
        prediction = classifier.predict_series(read_series(list(phantom.paths)))
        # As the worker builds them, where supported: the pixels drawn while the SR
        # is encoded (build_results' render), the PNG previews after the hand-over.
        overlap = "render" in inspect.signature(build.build_results).parameters
        process = None
        if "reports" in inspect.signature(build.build_results).parameters:
            from ich_node.results.reports import ReportProcess

            process = ReportProcess("console", "WARNING")  # started before the timing
            process.start()
        extra: dict[str, Any] = {"reports": process} if process is not None else {}
        # What the worker does when it starts, where the tree has it: a tiny heatmap
        # drawn and encoded (the libraries and tables loaded on first use).
        import ich_node.results.sc as sc

        warm_up = 0.0
        if hasattr(sc, "warm_up"):
            from ich_node.model import heatmaps

            warm_up = heatmaps.warm_up(classifier.device) + sc.warm_up()
        first = float("nan")
        # Written while built (each heatmap as soon as it is encoded), where supported.
        written_in_build = "out_dir" in inspect.signature(build.build_results).parameters
        # The first run is the worker's first study ("first total s"); the best of
        # the others is the row.
        for n in range(repeats + 1):
            spent.clear()
            if written_in_build:
                extra["out_dir"] = folder / f"out{n}"
            t0 = time.perf_counter()
            if overlap:
                from ich_node.model.heatmaps import with_heatmap_images

                explained = explain_series(prediction, classifier, render=False)
                t1 = time.perf_counter()
                results = build.build_results(
                    explained,
                    classifier.card,
                    build.ResultOptions(),
                    render=lambda e: with_heatmap_images(e, "positive", classifier.device),
                    previews=False,
                    **extra,
                )
            else:
                explained = explain_series(prediction, classifier)
                t1 = time.perf_counter()
                results = build.build_results(explained, classifier.card, build.ResultOptions())
            t2 = time.perf_counter()
            if not written_in_build:
                build.write_results(results, folder / f"out{n}", **write_options)
            t3 = time.perf_counter()
            if overlap:
                build.write_previews(results, folder / f"out{n}")
            t4 = time.perf_counter()
            if n == 0:
                first = t3 - t0
                continue
            run = {
                "explain s": t1 - t0,
                "build s": t2 - t1,
                "write s": t3 - t2,
                "total s": t3 - t0,
                "previews after s": t4 - t3,
                **{name + " s": spent.get(name, 0.0) for name, _ in PARTS},
                "heatmaps": float(len(results.heatmaps)),
            }
            if written_in_build:  # the files are written inside build
                run["write s"] = ""
            if process is not None:  # the SR is encoded in the report process: not timed here
                run["SR s"] = ""
            if run["total s"] < best.get("total s", float("inf")):
                best = run
        if process is not None:
            process.close()
    return {**best, "first total s": first, "start warm-up s": warm_up}


def _baseline_tree(rev: str, into: Path) -> Path:
    """``rev``'s ich_node and training packages, extracted with ``git archive``."""
    archive = into / "baseline.tar"
    with archive.open("wb") as out:
        subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "ich_node", "training"],
            stdout=out,
            check=True,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def _in_child(root: Path, args: argparse.Namespace, matrix: int, budget_s: float) -> dict[str, Any]:
    """:func:`measure` of the tree at ``root`` in a subprocess (its own imports)."""
    argv = [sys.executable, __file__, "--measure", str(matrix), "--slices", str(args.slices)]
    argv += ["--size", str(args.size), "--device", args.device, "--repeats", str(args.repeats)]
    env = {**os.environ, "ICH_BENCH_ROOT": str(root), "PYTHONPATH": f"{root}:{ROOT}"}
    run = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=max(1.0, budget_s), check=False
    )
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({run.returncode}): {run.stderr[-800:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main(args: argparse.Namespace) -> int:
    if args.measure:  # child: one measurement, one JSON line
        print(json.dumps(measure(args.measure, args.slices, args.size, args.device, args.repeats)))
        return 0
    if args.quick:
        args.matrix, args.slices, args.repeats = [128], 12, 1
    budget = Budget(args.budget)
    print(
        f"results stage: {args.slices} heatmaps per series, resnet18 at {args.size}, "
        f"device {args.device}, best of {args.repeats}, {machine()['cores']} cores, "
        f"load {load_average()} at start",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = _baseline_tree(args.baseline, Path(tmp)) if args.baseline else None
        print_row(COLUMNS, None)
        for matrix in args.matrix:
            trees = [("baseline " + args.baseline, baseline)] if baseline else []
            trees.append(("this tree", ROOT))
            measured: dict[str, dict[str, Any]] = {}
            for name, root in trees:
                if budget.left() <= 0:
                    print(f"(budget spent: {name} at {matrix} px skipped)", flush=True)
                    continue
                try:
                    got = _in_child(root, args, matrix, budget.left())  # type: ignore[arg-type]
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"({name} at {matrix} px not measured: {exc})", flush=True)
                    continue
                measured[name] = got
                row = {"tree": name, "matrix": matrix, **got}
                if name == "this tree" and len(measured) == 2:
                    base = next(v for k, v in measured.items() if k != name)
                    row["vs baseline"] = got["total s"] / base["total s"]
                rows.append(row)
                print_row(COLUMNS, row)
    print(f"load {load_average()} at the end")
    write_json(
        args.json,
        "results_stage" + ("_quick" if args.quick else ""),
        {"slices": args.slices, "baseline": args.baseline, "device": args.device, "rows": rows},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
