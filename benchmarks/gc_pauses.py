"""Garbage-collector pauses in a worker and its report process, start-up heap frozen or not.

    python benchmarks/gc_pauses.py                  # 40 studies per mode, 40 slices of 128 px
    python benchmarks/gc_pauses.py --quick          # CI smoke run (a few studies)

The worker and its report process load a great deal at start (torch, the model,
pydicom, highdicom and its tables: about 630,000 and 315,000 objects the garbage
collector tracks) and keep it until they exit. A full (generation 2) collection
walks all of it; each study makes enough new objects (pydicom data sets, highdicom's
SR tree) that one comes every few studies, inside a study.
:func:`ich_node.results.reports.freeze_startup_heap` (``gc.freeze`` after the
warm-up, as both processes do) leaves the start-up objects out of it.

One process loads the classifier, starts the report process and warms up as the
worker does, then runs ``--studies`` studies of one phantom series (read,
classified, explained, results built and written as the worker does:
``build_results(render=..., reports=..., out_dir=...)``) per mode, one mode after
the other: *collected* (nothing frozen: ``gc.unfreeze`` in both processes) and
*frozen* (:func:`freeze_startup_heap` in both). Every full collection in either
process is recorded (``gc.callbacks``) with its duration. Each row is printed when
its mode is done; ``--budget`` seconds end the run cleanly (a mode cut short says
how many studies it ran; modes not started are listed as skipped).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Budget, load_average, print_row, write_json

COLUMNS = (
    "mode",
    "studies",
    "worker full collections",
    "worker pauses ms",
    "worker longest ms",
    "report full collections",
    "report pauses ms",
    "report longest ms",
    "objects frozen (worker, report)",
    "study median s",
    "study longest s",
)
MODES = ("collected", "frozen")

#: Durations (s) of the full collections of this process since :func:`watch`.
_pauses: list[float] = []
_started = [0.0]


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    if info["generation"] != 2:
        return
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _pauses.append(time.perf_counter() - _started[0])


def watch() -> None:
    """Record this process's full collections from now on (once per process)."""
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)


def taken() -> list[float]:
    """The full collections' durations (s) since the last call."""
    out = list(_pauses)
    _pauses.clear()
    return out


def set_mode(mode: str) -> int:
    """``frozen``: :func:`freeze_startup_heap`; ``collected``: ``gc.unfreeze``. Returns
    the objects frozen."""
    from ich_node.results.reports import freeze_startup_heap

    if mode == "frozen":
        return freeze_startup_heap()
    gc.unfreeze()
    return gc.get_freeze_count()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--studies", type=int, default=40, help="studies per mode")
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--matrix", type=int, default=128)
    p.add_argument("--budget", type=float, default=900.0, help="seconds for the whole run")
    p.add_argument("--quick", action="store_true", help="4 studies of 12 slices of 64 px")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.studies, args.slices, args.matrix = 4, 12, 64
    budget = Budget(args.budget)
    import ich_node.model.heatmaps as heatmaps
    from benchmarks.common import random_bundle
    from ich_node.imaging import read_series
    from ich_node.labels import LABELS
    from ich_node.model.bundle import load_bundle
    from ich_node.model.explain import explain_series
    from ich_node.model.inference import Classifier
    from ich_node.results import sc
    from ich_node.results.build import ResultOptions, build_results
    from ich_node.results.reports import ReportProcess
    from training.phantom import write_series

    print(
        f"Garbage-collector pauses: {args.studies} studies per mode, {args.slices} slices "
        f"of {args.matrix} px, resnet18 at 64, every slice positive; load "
        f"{load_average()} at start",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        phantom = write_series(
            folder / "series", seed=1, subtypes=("subdural",), n_slices=args.slices,
            matrix=args.matrix,
        )  # fmt: skip
        paths = list(phantom.paths)
        thresholds = {label: 1.01 for label in LABELS} | {"any": 0.0, "subdural": 0.0}
        bundle = random_bundle(
            folder / "m.safetensors", name="benchmark", input_size=64, thresholds=thresholds
        )
        classifier = Classifier(load_bundle(bundle), device="cpu", batch_size=16)
        reports = ReportProcess("console", "WARNING")
        reports.start()
        classifier.warmup()
        heatmaps.warm_up(classifier.device)
        sc.warm_up()

        def in_report_process(fn: Any, *fn_args: Any) -> Any:
            future = reports.submit(fn, *fn_args)
            assert future is not None, "the report process did not start"
            return future.result(timeout=120)

        in_report_process(watch)
        watch()
        print_row(COLUMNS, None)
        done = 0
        for mode in MODES:
            if not budget.allows():
                skipped.append(mode)
                continue
            frozen = (set_mode(mode), in_report_process(set_mode, mode))
            taken(), in_report_process(taken)  # (what the switch itself collected)
            seconds = []
            for _ in range(args.studies):
                if not budget.allows():
                    break
                started = time.perf_counter()
                prediction = classifier.predict_series(read_series(paths))
                explained = explain_series(prediction, classifier, render=False)
                build_results(
                    explained,
                    classifier.card,
                    ResultOptions(),
                    render=lambda e: heatmaps.with_heatmap_images(e, "positive", classifier.device),
                    previews=False,
                    reports=reports,
                    out_dir=folder / f"out{done}",
                )
                seconds.append(time.perf_counter() - started)
                done += 1
            if not seconds:
                skipped.append(mode)
                continue
            worker, report = taken(), in_report_process(taken)
            row = {
                "mode": mode,
                "studies": len(seconds),
                "worker full collections": len(worker),
                "worker pauses ms": 1e3 * sum(worker),
                "worker longest ms": 1e3 * max(worker, default=0.0),
                "report full collections": len(report),
                "report pauses ms": 1e3 * sum(report),
                "report longest ms": 1e3 * max(report, default=0.0),
                "objects frozen (worker, report)": f"{frozen[0]}, {frozen[1]}",
                "study median s": statistics.median(seconds),
                "study longest s": max(seconds),
            }
            rows.append(row)
            print_row(COLUMNS, row)
        reports.close()
    if skipped:
        print(f"(budget: {', '.join(skipped)} skipped)", flush=True)
    print(f"load {load_average()} at the end", flush=True)
    write_json(
        args.json,
        "gc_pauses_quick" if args.quick else "gc_pauses",
        {"studies": args.studies, "slices": args.slices, "matrix": args.matrix, "rows": rows},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
