"""Inference benchmark: the worker path against the raw model, on the same device.

    python benchmarks/inference.py                      # CPU: ResNeXt-101 at 512, 8 slices
    python benchmarks/inference.py --device cuda        # GPU: 128 slices, bf16, ~60 s
    python benchmarks/inference.py --device cuda --compile   # adds the compiled rows
    python benchmarks/inference.py --arch resnet18 --size 64 --slices 64 \\
        --precisions bf16 --memory cl --pools thread process   # the CPU target of #26
    python benchmarks/inference.py --quick              # resnet18, 128x128: CI smoke run

*raw model*: forward passes on ready (S, C, H, W) tensors already on the device.
*worker path*: what a job does (``Classifier.predict_series``): read the series'
headers (parsed in the classifier's header pool of processes, as the worker's read
stage does), decode the DICOM files in the decode pool (threads or processes),
then on the model's device HU, orientation, windows, resize, the same forward passes
and the class activation maps the heatmaps are made from. Raw and worker runs
alternate so that load from other processes hits both; "vs raw" compares the worker
path with the raw model at the same setting (the best time of each), "vs raw, paired"
is the median over the rounds of the same ratio within a round (raw and worker back
to back, in one state of the machine). Two more rows show the two halves of
the preprocessing alone: the decode pool (CPU) and the device preprocessing.

Every row is printed the moment it is measured. ``--budget`` seconds (default 60
on a GPU, 900 on the CPU) end the run cleanly: settings that no longer fit are
listed as skipped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Budget,
    best_of,
    load_average,
    paired_ratio,
    print_row,
    write_json,
)
from ich_node.imaging import read_series
from ich_node.imaging.decode import DecodePool
from ich_node.imaging.preprocess import series_reorientation
from ich_node.imaging.tensors import model_input, stored_to_hu
from ich_node.model.bundle import ModelCard, load_bundle, save_bundle
from ich_node.model.inference import Classifier, resolve_device
from ich_node.model.networks import build_model
from training.phantom import write_series

COLUMNS = ["path", "slices/s", "vs raw", "vs raw, paired", "warm-up s", "load"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnext101_32x8d")
    p.add_argument("--size", type=int, default=512, help="model input size")
    p.add_argument("--slices", type=int, default=0, help="slices per series (0: 128 GPU, 8 CPU)")
    p.add_argument("--matrix", type=int, default=512, help="phantom slice matrix")
    p.add_argument("--batch-size", type=int, default=0, help="0: 32 on GPU, 8 on CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=0, help="best of N (0: 2 on CPU, 3 on GPU)")
    p.add_argument(
        "--precisions", nargs="+", choices=("fp32", "bf16"), default=None,
        help="default: bf16 on GPU, fp32 and bf16 on the CPU",
    )  # fmt: skip
    p.add_argument(
        "--memory", nargs="+", choices=("nchw", "cl"), default=None,
        help="memory formats (cl: channels-last); default: cl on GPU, both on the CPU",
    )  # fmt: skip
    p.add_argument("--compile", action="store_true", help="also bf16 + channels-last compiled")
    p.add_argument(
        "--pools", nargs="+", choices=("thread", "process"), default=["thread"],
        help="decode pool kinds measured on the worker path",
    )  # fmt: skip
    p.add_argument("--decode-threads", type=int, default=0, help="decode pool size (0: cores)")
    p.add_argument("--budget", type=float, default=0.0, help="seconds (0: 60 GPU, 900 CPU)")
    p.add_argument("--quick", action="store_true", help="resnet18 at 128 px, few slices")
    p.add_argument("--json", type=Path, default=None)
    return p


def raw_forward(
    model: torch.nn.Module, images: torch.Tensor, batch: int, precision: str
) -> Callable[[], None]:
    """Forward passes on ready tensors (no CAMs, nothing else), as a callable."""
    device = images.device
    ctx = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )

    def run() -> None:
        with torch.inference_mode(), ctx:
            for start in range(0, len(images), batch):
                model(images[start : start + batch])
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def interleaved(
    fns: dict[str, Callable[[], None]], repeats: int
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Best wall time of each callable, run in turns (load on a shared machine hits
    all), and each round's times: ``(best, rounds)``, seconds.

    The order turns round every round, so that no callable always runs right after
    the same other one (after forward passes the OpenMP threads spin for a few
    milliseconds: what follows them pays it, docs/performance.md)."""
    best = dict.fromkeys(fns, float("inf"))
    rounds: list[dict[str, float]] = []
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels, decode pool
    for k in range(repeats):
        order = list(fns.items()) if k % 2 == 0 else list(fns.items())[::-1]
        rounds.append({name: best_of(fn, 1) for name, fn in order})
        for name, t in rounds[-1].items():
            best[name] = min(best[name], t)
    return best, rounds


def settings(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The (precision, channels-last, compile) combinations measured."""
    gpu = device.type == "cuda"
    precisions = args.precisions or (["bf16"] if gpu else ["fp32", "bf16"])
    memory = args.memory or (["cl"] if gpu else ["nchw", "cl"])
    out = [
        {"precision": p, "channels_last": m == "cl", "compile": False}
        for p in precisions
        for m in memory
    ]
    if args.compile:
        out.append({"precision": "bf16", "channels_last": True, "compile": True})
    return out


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.arch, args.size, args.matrix = "resnet18", 128, 128
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    slices = args.slices or (16 if args.quick else 128 if gpu else 8)
    batch = args.batch_size or (32 if gpu else 8)
    repeats = args.repeats or (1 if args.quick else 3 if gpu else 2)
    budget = Budget(args.budget or (60.0 if gpu else 900.0))
    print(
        f"{args.arch} at {args.size}x{args.size}, {slices} slices of {args.matrix}x{args.matrix}, "
        f"batch {batch}, device {device}, best of {repeats}, load {load_average()} at start",
        flush=True,
    )
    print_row(COLUMNS, None)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        row["load"] = load_average()
        rows.append(row)
        print_row(COLUMNS, row)

    with tempfile.TemporaryDirectory() as tmp:
        phantom = write_series(
            Path(tmp) / "series", seed=1, subtypes=("subdural",), n_slices=slices,
            matrix=args.matrix,
        )  # fmt: skip
        paths = list(phantom.paths)
        torch.manual_seed(0)
        card = ModelCard(name="benchmark", version="0", arch=args.arch, input_size=args.size)
        bundle_path = Path(tmp) / "m.safetensors"
        save_bundle(bundle_path, build_model(args.arch), card)
        series = read_series(paths)
        with DecodePool(args.decode_threads, "process") as parsers:  # headers alone
            read_series(paths, pool=parsers)
            for label, pool_arg in (("here", None), (f"{parsers.workers} processes", parsers)):
                t = best_of(lambda p=pool_arg: read_series(paths, pool=p), repeats)
                emit({"path": f"headers only, parsed {label}", "slices/s": slices / t})
        for kind in args.pools:  # the CPU half: parse and decode in the pool
            with DecodePool(args.decode_threads, kind) as pool:
                pool.map(series.slices)
                t = best_of(lambda p=pool: p.map(read_series(paths).slices), repeats)
                emit(
                    {
                        "path": f"headers + decode pool only ({pool.workers} {kind}"
                        + ("es)" if kind == "process" else "s)"),
                        "slices/s": slices / t,
                    }
                )
        with DecodePool(args.decode_threads) as pool:  # the device half
            decoded = pool.map(series.slices)
        turn = series_reorientation(series)

        def preprocess() -> None:
            with torch.inference_mode():
                for start in range(0, slices, batch):
                    hu = stored_to_hu(decoded[start : start + batch], device)
                    model_input(hu, card.windows, args.size, turn=turn)
            if gpu:
                torch.cuda.synchronize()

        preprocess()
        t = best_of(preprocess, repeats)
        emit({"path": f"HU, windows, resize only ({device.type})", "slices/s": slices / t})
        for s in settings(args, device):
            label = s["precision"] + (" channels-last" if s["channels_last"] else "")
            label += " compiled" if s["compile"] else ""
            needed = 40.0 if s["compile"] else 3.0
            if not budget.allows(needed):
                print(f"(budget: {label} skipped, {budget.left():.0f} s left)", flush=True)
                continue
            options: dict[str, Any] = {
                "device": device.type,
                "batch_size": batch,
                "precision": s["precision"],
                "channels_last": s["channels_last"],
                "compile": s["compile"],
                "decode_threads": args.decode_threads,
            }
            # One pool kind at a time, each against the raw model in turn: two pools
            # alive in one process (a process pool's children beside the other's
            # threads) slowed the thread pool by 3x on 2 cores.
            net: Any = None
            for kind in args.pools:
                if net is not None and not budget.allows(needed):
                    print(f"(budget: {label}, {kind} pool skipped)", flush=True)
                    continue
                c = Classifier(load_bundle(bundle_path), decode_pool=kind, **options)
                warm = 0.0
                if s["compile"]:
                    if net is None:
                        warm = c.warmup()
                    else:
                        c._net = net  # the compiled graph of the first pool's classifier
                _, ready = c.prepare(series)
                images = torch.from_numpy(ready).to(device)
                if s["channels_last"]:
                    images = images.contiguous(memory_format=torch.channels_last)
                net = c._net
                fns: dict[str, Callable[[], None]] = {
                    "raw": raw_forward(net if s["compile"] else c.model, images, batch,
                                       s["precision"]),
                    "worker": lambda c=c: c.predict_series(
                        read_series(paths, pool=c.header_pool)  # as the worker reads
                    )
                    and None,
                }  # fmt: skip
                best, rounds = interleaved(fns, repeats)
                raw, rate = slices / best["raw"], slices / best["worker"]
                emit({"path": f"raw model ({label}; beside the {kind} pool)", "slices/s": raw,
                      **s})  # fmt: skip
                emit(
                    {
                        "path": f"worker path, {kind} pool ({label})",
                        "slices/s": rate,
                        "vs raw": rate / raw,
                        "vs raw, paired": paired_ratio(rounds, "worker", "raw"),
                        "warm-up s": warm,
                        "pool": kind,
                        **s,
                    }
                )
                c.close()
                del c, images
    print(f"load {load_average()} at the end, {time.strftime('%Y-%m-%d %H:%M')}")
    write_json(
        args.json, "inference" + ("_quick" if args.quick else ""),
        {"arch": args.arch, "size": args.size, "slices": slices, "batch": batch,
         "device": str(device), "repeats": repeats, "rows": rows},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
