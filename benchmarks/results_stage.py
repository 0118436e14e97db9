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
folder; each tree is set up in a process of its own (its own imports), and the two
then run in turns, one run each per round, the order turning round every round, so
that the machine's slow and fast spells fall on both alike (on this 2-core VM a
core's speed changes by up to 3x for seconds at a time; measured one after the
other, one tree could get a slow spell and the other a fast one). "vs baseline" is
this tree's best / the baseline's best; "vs baseline, paired" the median over rounds
of the ratio within a round (reported beside it). Every row is printed the moment it
is measured; ``--budget`` seconds end the run
cleanly (rows not measured are listed as skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import queue
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and os.environ.get("ICH_BENCH_ROOT"):
    sys.path.insert(0, os.environ["ICH_BENCH_ROOT"])  # a baseline's ich_node first
sys.path.insert(1 if os.environ.get("ICH_BENCH_ROOT") else 0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    Budget,
    load_average,
    machine,
    paired_ratio,
    print_row,
    write_json,
)

PARTS = (
    ("render", "render_heatmaps"),
    ("encode SC", "build_heatmap_series"),
    ("PNG", "png_bytes"),
    ("SR", "build_sr"),
    ("files", "_write_atomic"),
    ("files", "_write_durable"),
)
COLUMNS = ["tree", "matrix", "runs", "explain s", "build s", "write s", "total s", "vs baseline"]
COLUMNS += ["vs baseline, paired"]
COLUMNS += ["previews after s", "first total s", "start warm-up s"]
COLUMNS += list(dict.fromkeys(name + " s" for name, _ in PARTS))
#: What a child's answers start with on its stdout (its log lines may be JSON too).
MARK = "@@results-stage "


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
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)  # child mode
    return p


class Stage:
    """One tree's results stage, set up once and run as often as asked.

    The set-up (phantom series, model, prediction, report process, the worker's
    start-up warm-up) is what a worker has before its first study; :meth:`run` is
    what a job does after the probabilities are known. The first run is a worker's
    first study ("first total s").
    """

    def __init__(self, matrix: int, slices: int, size: int, device: str) -> None:
        import ich_node.results.build as build
        from benchmarks.common import random_bundle
        from ich_node.imaging import read_series
        from ich_node.model.bundle import load_bundle
        from ich_node.model.inference import Classifier
        from training.phantom import write_series

        self.build = build
        self.spent: dict[str, float] = {}
        for name, attr in PARTS:
            if hasattr(build, attr):
                setattr(build, attr, self._timed(name, getattr(build, attr)))
        positive = {"any": 0.0, "subdural": 0.0}
        thresholds = {k: positive.get(k, 1.0) for k in build.LABELS}
        # As the worker writes them (into its temporary results folder), where supported.
        parameters = inspect.signature(build.write_results).parameters
        self.write_options = {"in_temp_folder": True} if "in_temp_folder" in parameters else {}
        self.folder = Path(tempfile.mkdtemp(prefix="results-stage-"))
        phantom = write_series(
            self.folder / "s", seed=1, subtypes=("subdural",), n_slices=slices, matrix=matrix
        )
        bundle = random_bundle(
            self.folder / "m.safetensors", name="bench", input_size=size, thresholds=thresholds
        )
        self.classifier = Classifier(load_bundle(bundle), device=device, batch_size=16)
        self.prediction = self.classifier.predict_series(read_series(list(phantom.paths)))
        # As the worker builds them, where supported: the pixels drawn while the SR
        # is encoded (build_results' render), the PNG previews after the hand-over.
        signature = inspect.signature(build.build_results).parameters
        self.overlap = "render" in signature
        self.process = None
        if "reports" in signature:
            from ich_node.results.reports import ReportProcess

            self.process = ReportProcess("console", "WARNING")  # started before the timing
            self.process.start()
        self.extra: dict[str, Any] = {"reports": self.process} if self.process else {}
        # What the worker does when it starts, where the tree has it: a tiny heatmap
        # drawn and encoded (the libraries and tables loaded on first use).
        import ich_node.results.sc as sc

        self.warm_up = 0.0
        if hasattr(sc, "warm_up"):
            from ich_node.model import heatmaps

            self.warm_up = heatmaps.warm_up(self.classifier.device) + sc.warm_up()
        # Written while built (each heatmap as soon as it is encoded), where supported.
        self.written_in_build = "out_dir" in signature
        self.runs = 0

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        spent = self.spent

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - started

        return run

    def run(self) -> dict[str, Any]:
        """One job's results stage: seconds of explain, build and write, and their parts."""
        from ich_node.model.explain import explain_series

        build, classifier, n = self.build, self.classifier, self.runs
        self.runs += 1
        self.spent.clear()
        out = self.folder / f"out{n}"
        if self.written_in_build:
            self.extra["out_dir"] = out
        t0 = time.perf_counter()
        if self.overlap:
            from ich_node.model.heatmaps import with_heatmap_images

            explained = explain_series(self.prediction, classifier, render=False)
            t1 = time.perf_counter()
            results = build.build_results(
                explained,
                classifier.card,
                build.ResultOptions(),
                render=lambda e: with_heatmap_images(e, "positive", classifier.device),
                previews=False,
                **self.extra,
            )
        else:
            explained = explain_series(self.prediction, classifier)
            t1 = time.perf_counter()
            results = build.build_results(explained, classifier.card, build.ResultOptions())
        t2 = time.perf_counter()
        if not self.written_in_build:
            build.write_results(results, out, **self.write_options)
        t3 = time.perf_counter()
        if self.overlap:
            build.write_previews(results, out)
        t4 = time.perf_counter()
        run: dict[str, Any] = {
            "explain s": t1 - t0,
            "build s": t2 - t1,
            "write s": t3 - t2,
            "total s": t3 - t0,
            "previews after s": t4 - t3,
            **{name + " s": self.spent.get(name, 0.0) for name, _ in PARTS},
            "heatmaps": float(len(results.heatmaps)),
        }
        if self.written_in_build:  # the files are written inside build
            run["write s"] = ""
        if self.process is not None:  # the SR is encoded in the report process: not timed here
            run["SR s"] = ""
        shutil.rmtree(out, ignore_errors=True)  # (not kept: 31 MB a run at 512 px)
        return run

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def serve(matrix: int, slices: int, size: int, device: str) -> None:
    """Child mode: set up one :class:`Stage`, then one run per "run" line on stdin,
    each answered with a JSON line after :data:`MARK` on stdout."""
    stage = Stage(matrix, slices, size, device)
    try:
        print(MARK + json.dumps({"start warm-up s": stage.warm_up}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            print(MARK + json.dumps(stage.run()), flush=True)
    finally:
        stage.close()


class Child:
    """A :func:`serve` process of the tree at ``root`` (its own imports)."""

    def __init__(self, root: Path, args: argparse.Namespace, matrix: int) -> None:
        argv = [sys.executable, __file__, "--serve", str(matrix), "--slices", str(args.slices)]
        argv += ["--size", str(args.size), "--device", args.device]
        env = {**os.environ, "ICH_BENCH_ROOT": str(root), "PYTHONPATH": f"{root}:{ROOT}"}
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(self.process.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.process.stderr, False), daemon=True).start()

    def _read(self, stream: Any, answers: bool) -> None:
        for line in stream:
            if answers and line.startswith(MARK):
                self.lines.put(line[len(MARK) :])
            elif not answers:
                self.errors = [*self.errors[-40:], line]
        if answers:
            self.lines.put(None)  # the process ended

    def answer(self, timeout: float) -> dict[str, Any]:
        """The next answer, within ``timeout`` seconds.

        Raises
        ------
        RuntimeError
            The process ended or did not answer in time (its last error lines said).
        """
        try:
            line = self.lines.get(timeout=max(0.001, timeout))
        except queue.Empty:
            raise RuntimeError(f"no answer in {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"it ended ({self.process.wait()}): {''.join(self.errors)[-800:]}")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self.answer(timeout)

    def close(self, wait: float = 30.0) -> None:
        """End the process: it ends when its stdin closes (after the run it is in),
        or is killed after ``wait`` seconds (at once with 0: a spent budget)."""
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measure(
    trees: dict[str, Path], args: argparse.Namespace, matrix: int, budget: Budget
) -> tuple[dict[str, dict[str, Any]], list[dict[str, float]]]:
    """Each tree's best run of ``args.repeats`` (after its first, a worker's first
    study), measured in turns: one run of each tree per round, the order turning
    round every round, so that the machine's slow and fast spells (on this VM a
    core's speed changes by up to 3x for seconds at a time) fall on both alike.

    Returns ``(best, rounds)``: tree name -> its best run's figures, with "first
    total s" and "start warm-up s"; and each measured round's totals by tree name
    (for :func:`benchmarks.common.paired_ratio`).
    """
    children: dict[str, Child] = {}
    best: dict[str, dict[str, Any]] = {}
    rounds: list[dict[str, float]] = []
    finished = False
    try:
        for name, root in trees.items():
            children[name] = Child(root, args, matrix)
        for name, child in children.items():
            best[name] = {"start warm-up s": child.answer(budget.left())["start warm-up s"]}
        for k in range(args.repeats + 1):
            if budget.left() <= 0:
                print(f"(budget spent at {matrix} px after {max(0, k - 1)} rounds)", flush=True)
                break
            order = list(children.items())
            runs = {
                name: child.run(budget.left()) for name, child in order[:: 1 if k % 2 == 0 else -1]
            }
            for name, run in runs.items():
                if k == 0:
                    best[name]["first total s"] = run["total s"]
                elif run["total s"] < best[name].get("total s", float("inf")):
                    best[name] = {**best[name], **run}
            if k > 0:
                rounds.append({name: run["total s"] for name, run in runs.items()})
        finished = True
    finally:
        for child in children.values():
            child.close(30.0 if finished else 0.0)
    return {name: got for name, got in best.items() if "total s" in got}, rounds


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


def main(args: argparse.Namespace) -> int:
    if args.serve:  # child: one tree's stage, run on request
        serve(args.serve, args.slices, args.size, args.device)
        return 0
    if args.quick:
        args.matrix, args.slices, args.repeats = [128], 12, 1
    budget = Budget(args.budget)
    print(
        f"results stage: {args.slices} heatmaps per series, resnet18 at {args.size}, "
        f"device {args.device}, best of {args.repeats}"
        + (" in turns with the baseline" if args.baseline else "")
        + f", {machine()['cores']} cores, load {load_average()} at start",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        if args.baseline:
            trees["baseline " + args.baseline] = _baseline_tree(args.baseline, Path(tmp))
        trees["this tree"] = ROOT
        print_row(COLUMNS, None)
        for matrix in args.matrix:
            if budget.left() <= 0:
                print(f"(budget spent: {matrix} px skipped)", flush=True)
                continue
            try:
                measured, rounds = measure(trees, args, matrix, budget)
            except RuntimeError as exc:
                print(f"({matrix} px not measured: {exc})", flush=True)
                continue
            base_name = "baseline " + str(args.baseline)
            for name, got in measured.items():
                row = {"tree": name, "matrix": matrix, "runs": len(rounds), **got}
                if name == "this tree" and base_name in measured:
                    row["vs baseline"] = got["total s"] / measured[base_name]["total s"]
                    row["vs baseline, paired"] = paired_ratio(rounds, base_name, name)
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
