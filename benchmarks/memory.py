"""Memory benchmark: resident memory of the node's processes over many studies.

    python benchmarks/memory.py            # 200 studies
    python benchmarks/memory.py --quick    # 6 studies (CI)

The node runs as in production (``serve``, one worker, DCMTK ``storescp`` as the
destination). Studies are small on purpose (12 slices of 128x128, resnet18 at 64
px, random weights, every slice explained so each study also makes 12 heatmaps
and an SR): the figure is growth per study, not the size of one. Each study is
sent in one association (DCMTK ``storescu``) and its SR awaited before the next.

RSS is read from ``/proc/<pid>/status`` (VmRSS) of the ``serve`` process, which
holds the listener (and the assembler and the sender threads, without torch), and
of its worker process. Growth compares the last sample with the one taken after
the first tenth of the studies (allocators and caches warm by then).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Budget,
    children,
    load_average,
    print_row,
    restamp_series,
    rss_mb,
    table,
    write_json,
)
from benchmarks.end_to_end import Destination, Node, make_bundle, measure_study


def uses_torch(pid: int) -> bool:
    """Whether ``pid`` has libtorch mapped: the worker, not multiprocessing's helpers."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--studies", type=int, default=200)
    p.add_argument("--slices", type=int, default=12)
    p.add_argument("--every", type=int, default=20, help="sample RSS every N studies")
    p.add_argument("--quick", action="store_true", help="6 studies")
    p.add_argument("--budget", type=float, default=3600.0, help="seconds for all studies")
    p.add_argument("--json", type=Path, default=None)
    return p


COLUMNS = ["studies", "listener MB", "worker MB", "elapsed s"]


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.studies, args.every = 6, 2
    import pydicom

    from training.phantom import write_series

    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        phantom = write_series(
            tmp / "series", seed=31, subtypes=("subdural",), n_slices=args.slices, matrix=128
        )
        bundle = make_bundle(tmp / "model.safetensors", "resnet18", 64)
        pacs = Destination(tmp / "pacs")
        config = {
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                              "port": pacs.port}],
            "series": {"stable_seconds": 5.0, "min_slices": min(10, args.slices)},
            "model": {"bundle": str(bundle), "device": "cpu", "batch_size": 16},
            "sender": {"max_attempts": 10, "backoff_base_seconds": 0.2,
                       "backoff_max_seconds": 1.0, "timeout_seconds": 30.0},
        }  # fmt: skip
        node = Node(tmp, config)
        started = time.perf_counter()
        budget = Budget(args.budget)
        print(
            f"{args.studies} studies of {args.slices} slices 128x128, resnet18 at 64, "
            f"load {load_average()} at start",
            flush=True,
        )
        print_row(COLUMNS, None)
        try:
            for n in range(1, args.studies + 1):
                if n > 1 and not budget.allows(3 * (time.perf_counter() - started) / (n - 1)):
                    print(f"(budget: stopped after {n - 1} studies)", flush=True)
                    break
                files = restamp_series(phantom.paths, tmp / "study", f"memory-{n}")
                study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
                measure_study(node, pacs, files, study, timeout=120)
                for f in files:
                    f.unlink()
                if n == 1 or n % args.every == 0 or n == args.studies:
                    workers = [w for w in children(node.process.pid) if uses_torch(w)]
                    samples.append(
                        {
                            "studies": n,
                            "listener MB": rss_mb(node.process.pid),
                            "worker MB": sum(rss_mb(w) for w in workers),
                            "elapsed s": time.perf_counter() - started,
                        }
                    )
                    print_row(COLUMNS, samples[-1])
        finally:
            node.stop()
            pacs.process.terminate()
            pacs.process.wait(10)
    done = samples[-1]["studies"]
    base = next(s for s in samples if s["studies"] >= max(1, done // 10))
    last = samples[-1]
    growth = {
        "listener growth %": 100 * (last["listener MB"] / base["listener MB"] - 1),
        "worker growth %": 100 * (last["worker MB"] / base["worker MB"] - 1),
    }
    print(f"growth from study {base['studies']} to {last['studies']}, load {load_average()}")
    print(table([growth], list(growth)))
    write_json(
        args.json, "memory" + ("_quick" if args.quick else ""),
        {"studies": args.studies, "slices": args.slices, "baseline_study": base["studies"],
         **growth, "max_listener_mb": max(s["listener MB"] for s in samples),
         "samples": samples},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
