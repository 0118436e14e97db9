"""Inference benchmark: the worker path against the raw model, on the same device.

    python benchmarks/inference.py                      # ResNeXt-101, 512x512, CPU or GPU
    python benchmarks/inference.py --quick              # resnet18, 128x128: CI smoke run

    python benchmarks/inference.py --compile --slices 256   # on a GPU: adds torch.compile

*raw model*: forward passes on ready (S, 3, H, W) tensors already on the device.
*worker path*: what a job does (``Classifier.predict_series``): read the series'
headers, decode the DICOM files, HU, windows, resize (the shared imaging code, the
next batch decoded in a thread during this one's forward pass), the same forward
passes, and the class activation maps the heatmaps are made from.
Each is measured at each precision / memory-format setting; "vs raw" compares the
worker path with the raw model at the same setting.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_of, load_average, table, write_json
from ich_node.imaging import read_series
from ich_node.model.bundle import ModelCard, load_bundle, save_bundle
from ich_node.model.inference import Classifier, resolve_device
from ich_node.model.networks import build_model
from training.phantom import write_series


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnext101_32x8d")
    p.add_argument("--size", type=int, default=512, help="model input size")
    p.add_argument("--slices", type=int, default=0, help="slices per series (0: by device)")
    p.add_argument("--batch-size", type=int, default=0, help="0: 32 on GPU, 8 on CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=0, help="best of N (0: 1 on CPU, 5 on GPU)")
    p.add_argument("--compile", action="store_true", help="also bf16 + torch.compile (GPU)")
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


def interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Best wall time of each callable, run in turns (load on a shared machine hits all)."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], best_of(fn, 1))
    return best


def settings(device: torch.device, compile_too: bool) -> list[dict[str, Any]]:
    """The (precision, channels-last, compile) combinations measured on ``device``."""
    out = [
        {"precision": p, "channels_last": cl, "compile": False}
        for p in ("fp32", "bf16")
        for cl in (False, True)
    ]
    if compile_too:
        out.append({"precision": "bf16", "channels_last": True, "compile": True})
    return out


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.arch, args.size = "resnet18", 128
    device = resolve_device(args.device)
    slices = args.slices or (16 if args.quick else 8 if device.type == "cpu" else 256)
    batch = args.batch_size or (32 if device.type == "cuda" else 8)
    repeats = args.repeats or (1 if args.quick else 2 if device.type == "cpu" else 5)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        phantom = write_series(
            Path(tmp) / "series", seed=1, subtypes=("subdural",), n_slices=slices, matrix=512
        )
        paths = list(phantom.paths)
        torch.manual_seed(0)
        card = ModelCard(name="benchmark", version="0", arch=args.arch, input_size=args.size)
        bundle_path = Path(tmp) / "m.safetensors"
        save_bundle(bundle_path, build_model(args.arch), card)
        decoder = Classifier(load_bundle(bundle_path), device="cpu")
        decoder.prepare(read_series(paths))
        prep = best_of(lambda: decoder.prepare(read_series(paths)), repeats)
        rows.append({"path": "decode+preprocess only (CPU, 1 thread)", "slices/s": slices / prep})
        for s in settings(device, args.compile):
            label = s["precision"] + (" channels-last" if s["channels_last"] else "")
            label += " compiled" if s["compile"] else ""
            classifier = Classifier(
                load_bundle(bundle_path), device=device.type, batch_size=batch,
                precision=s["precision"], channels_last=s["channels_last"], compile=s["compile"],
            )  # fmt: skip
            warm = classifier.warmup() if s["compile"] else 0.0
            _, ready = classifier.prepare(read_series(paths))
            images = torch.from_numpy(ready).to(device)
            if s["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            net = classifier._net if s["compile"] else classifier.model

            def worker(c: Classifier = classifier) -> None:
                c.predict_series(read_series(paths))

            best = interleaved(
                {"raw": raw_forward(net, images, batch, s["precision"]), "worker": worker},
                repeats,
            )
            raw, rate = slices / best["raw"], slices / best["worker"]
            rows.append({"path": f"raw model ({label})", "slices/s": raw, **s})
            rows.append(
                {
                    "path": f"worker: decode+preprocess+infer+CAMs ({label})",
                    "slices/s": rate,
                    "vs raw": rate / raw,
                    "warm-up s": warm,
                    **s,
                }
            )
            del classifier, images
    print(
        f"\n{args.arch} at {args.size}x{args.size}, {slices} slices of 512x512, "
        f"batch {batch}, device {device}, best of {repeats}, load {load_average()}"
    )
    print(table(rows, ["path", "slices/s", "vs raw"]))
    write_json(
        args.json, "inference" + ("_quick" if args.quick else ""),
        {"arch": args.arch, "size": args.size, "slices": slices, "batch": batch,
         "device": str(device), "repeats": repeats, "rows": rows},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
