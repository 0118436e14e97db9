"""Worker benchmark: studies back to back, one job at a time against the pipeline.

    python benchmarks/worker.py                     # ResNeXt-101, 512x512, 4 studies of 40 slices
    python benchmarks/worker.py --arch resnet18     # where the model is fast, so the rest shows
    python benchmarks/worker.py --quick             # resnet18, 128x128: CI smoke run

    python benchmarks/worker.py --device cuda --batch-size 32 --compile   # on a GPU

Both modes run the node's own :class:`ich_node.worker.Worker` on a real store with
the same queued phantom studies (512x512 DICOM CT), heatmaps and SR included:

*one at a time*: ``Worker.run_once`` in a loop: read, decode (in the decode pool,
ahead of the forward passes; HU, windows and resize on the model's device), infer,
write results, complete; then the next job.
*pipeline*: ``Worker.run``: a reader thread leases the next job and decodes it
ahead while the model runs, and a results thread writes heatmaps and the SR
while the model already runs the next job.

The time is from the first lease to the last job recorded done; the raw model
row is forward passes on ready tensors at the same setting, the bound for both.
Each row is printed when measured; ``--budget`` seconds end the run cleanly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Budget,
    load_average,
    print_row,
    queue_series,
    random_bundle,
    wait_for,
    write_json,
)
from benchmarks.inference import raw_forward
from ich_node.config import parse_config
from ich_node.log import configure_logging
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier
from ich_node.queue.store import Store
from ich_node.service.worker import Worker
from training.phantom import PhantomSeries, write_series


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnext101_32x8d")
    p.add_argument("--size", type=int, default=512, help="model input size")
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--slices", type=int, default=40, help="slices per study")
    p.add_argument("--batch-size", type=int, default=0, help="0: 32 on GPU, 8 on CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--compile", action="store_true", help="torch.compile (paid at start)")
    p.add_argument("--quick", action="store_true", help="resnet18 at 128 px, 3 small studies")
    p.add_argument("--budget", type=float, default=0.0, help="seconds (0: 60 GPU, 900 CPU)")
    p.add_argument("--json", type=Path, default=None)
    return p


COLUMNS = ["mode", "seconds", "slices/s", "vs one at a time", "read_s", "infer_s", "results_s"]


def _drain(
    mode: str,
    classifier: Classifier,
    studies: list[PhantomSeries],
    root: Path,
    timeout: float = 3600.0,
) -> tuple[float, dict[str, float]]:
    """Seconds from the first lease to the last job done; mean stage seconds per job."""
    config = parse_config({"storage": {"dir": str(root / mode)}})
    store = Store.open(config.storage.dir)
    jobs = [
        queue_series(store, s.paths, time.time() - 60 + i).job_id for i, s in enumerate(studies)
    ]
    worker = Worker(config, f"bench-{mode}", store, classifier)
    started = time.perf_counter()
    if mode == "pipeline":
        stop = threading.Event()
        runner = threading.Thread(target=worker.run, args=(stop,), kwargs={"poll_seconds": 0.005})
        runner.start()
        wait_for(
            "every job done",
            lambda: all(store.job(j).state == "done" for j in jobs),  # type: ignore[union-attr]
            timeout=timeout,
            every=0.005,
        )
        seconds = time.perf_counter() - started
        stop.set()
        runner.join()
    else:
        while worker.run_once(time.time()) is not None:
            pass
        seconds = time.perf_counter() - started
    states = [store.job(j).state for j in jobs]  # type: ignore[union-attr]
    if states != ["done"] * len(jobs):
        raise RuntimeError(f"{mode}: jobs ended {states}")
    stages: dict[str, list[float]] = {}
    for _, name, value in store.stage_times_after(0):
        stages.setdefault(name, []).append(value)
    store.close()
    return seconds, {k: sum(v) / len(v) for k, v in stages.items()}


def main(args: argparse.Namespace) -> int:
    configure_logging("console", "WARNING")  # one line per job would bury the table
    if args.quick:
        args.arch, args.size, args.studies, args.slices = "resnet18", 128, 3, 8
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    batch = args.batch_size or (32 if device.type == "cuda" else 8)
    budget = Budget(args.budget or (60.0 if device.type == "cuda" else 900.0))
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        root = Path(tmp)
        bundle = random_bundle(
            root / "model.safetensors",
            name="benchmark model (random weights)",
            arch=args.arch,
            input_size=args.size,
        )
        classifier = Classifier(
            load_bundle(bundle),
            device=str(device),
            batch_size=batch,
            precision=args.precision,
            compile=args.compile,
        )
        classifier.warmup()
        subtypes: list[tuple[str, ...]] = [
            ("subdural",),
            ("intraparenchymal",),
            (),
            ("subarachnoid",),
        ]
        studies = [
            write_series(
                root / f"study{i}",
                seed=100 + i,
                subtypes=subtypes[i % len(subtypes)],
                n_slices=args.slices,
                matrix=512,
            )
            for i in range(args.studies)
        ]
        print(
            f"{args.studies} studies of {args.slices} slices (512x512 DICOM), {args.arch} at "
            f"{args.size}x{args.size}, batch {batch}, {classifier.precision}, device {device}, "
            f"compile {args.compile}, load {load_average()} at start; stage columns: mean "
            "seconds per job",
            flush=True,
        )
        print_row(COLUMNS, None)
        _drain("warm-up", classifier, studies[:1], root)  # allocator, kernels, imports
        rows = []
        n_slices = args.studies * args.slices
        images = torch.rand(n_slices, 3, args.size, args.size, device=device)
        images = images.contiguous(memory_format=torch.channels_last)
        raw = raw_forward(classifier.model, images, batch, classifier.precision)
        raw()
        t = time.perf_counter()
        raw()
        raw_s = time.perf_counter() - t
        rows.append(
            {"mode": "raw model (ready tensors)", "seconds": round(raw_s, 2),
             "slices/s": round(n_slices / raw_s, 1), "vs one at a time": "",
             "read_s": "", "infer_s": "", "results_s": ""}
        )  # fmt: skip
        print_row(COLUMNS, rows[-1])
        serial_s = 0.0
        for mode in ("one at a time", "pipeline"):
            # Each mode takes about as long as the last; the first one runs anyway.
            if serial_s and not budget.allows(1.2 * serial_s):
                print(f"(budget: {mode} skipped, {budget.left():.0f} s left)", flush=True)
                continue
            seconds, stages = _drain(
                mode.replace(" ", "-"), classifier, studies, root, max(1.0, budget.left())
            )
            serial_s = serial_s or seconds
            rows.append(
                {"mode": mode, "seconds": round(seconds, 2),
                 "slices/s": round(n_slices / seconds, 1),
                 "vs one at a time": f"{serial_s / seconds:.2f}x",
                 **{k: round(stages.get(k, 0.0), 3) for k in ("read_s", "infer_s", "results_s")}}
            )  # fmt: skip
            print_row(COLUMNS, rows[-1])
        classifier.close()
    print(f"load {load_average()} at the end")
    write_json(
        args.json, "worker" + ("_quick" if args.quick else ""),
        {"arch": args.arch, "size": args.size, "studies": args.studies, "slices": args.slices,
         "batch": batch, "device": str(device), "precision": classifier.precision,
         "compile": args.compile, "rows": rows},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
