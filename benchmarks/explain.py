"""Explain benchmark: the cost of a heatmap per explained slice, relative to a forward slice.

    python benchmarks/explain.py            # ResNeXt-101 at 512x512 on the default device
    python benchmarks/explain.py --quick    # resnet18 at 128x128 (CI)

Every slice of a phantom series is explained (thresholds at 0: all labels positive,
each slice explained for the sum of the five subtypes), so the explain time divided
by the slices is the cost per explained slice. Rows:

- *forward, probabilities only*: ``Classifier(cams=False).predict_images``;
- *forward with CAMs*: the inference pass as the node runs it (``predict_images_with_cams``);
  its extra over the row above is what the shortcut costs in the inference pass;
- *CAM shortcut from the prediction*: ``explain(prediction)`` when the prediction
  carries the CAMs (label sums, scaling, resize);
- *CAM shortcut, recomputed*: a prediction without CAMs (one forward pass of the
  explained slices);
- *pytorch-grad-cam*: ``explain(method="gradcam")``, forward and backward passes;
- *heatmap images*: what the worker's results thread adds before encoding
  (``with_heatmap_images``): the head region (CPU) and the overlays rendered for the
  series at once on the device.

"extra per explained slice / forward" is the cost of the heatmap beyond the
inference a slice gets anyway, as a multiple of one forward slice. The maps of the
shortcut and of pytorch-grad-cam are compared (Pearson correlation, min over slices).
Each row is printed when measured; ``--budget`` seconds end the run cleanly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Budget, best_of, load_average, print_row, write_json
from ich_node.imaging import read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import Bundle, ModelCard
from ich_node.model.explain import explain, explain_series
from ich_node.model.heatmaps import with_heatmap_images
from ich_node.model.inference import Classifier, resolve_device
from ich_node.model.networks import build_model
from training.phantom import write_series


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnext101_32x8d")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=0, help="0: 4 on CPU, 64 on GPU")
    p.add_argument("--batch-size", type=int, default=0, help="0: 32 on GPU, 4 on CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    p.add_argument("--repeats", type=int, default=0, help="0: 2 on CPU, 5 on GPU")
    p.add_argument("--quick", action="store_true", help="resnet18 at 128 px")
    p.add_argument("--budget", type=float, default=0.0, help="seconds (0: 60 GPU, 600 CPU)")
    p.add_argument("--json", type=Path, default=None)
    return p


COLUMNS = ["path", "s/slice", "extra / forward"]


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.arch, args.size = "resnet18", 128
    device = resolve_device(args.device)
    cpu = device.type == "cpu"
    slices = args.slices or (8 if args.quick else 4 if cpu else 64)
    batch = args.batch_size or (4 if cpu else 32)
    repeats = args.repeats or (2 if cpu else 5)
    budget = Budget(args.budget or (600.0 if cpu else 60.0))
    print(
        f"{args.arch} at {args.size}x{args.size}, {slices} slices explained, batch {batch}, "
        f"{args.precision}, device {device}, best of {repeats}, load {load_average()} at start",
        flush=True,
    )
    tmp = tempfile.TemporaryDirectory()  # the files are read again by every prediction
    phantom = write_series(
        Path(tmp.name) / "s", seed=2, subtypes=("subdural",), n_slices=slices, matrix=512
    )
    series = read_series(list(phantom.paths))
    torch.manual_seed(0)
    card = ModelCard(
        name="benchmark", version="0", arch=args.arch, input_size=args.size,
        thresholds=dict.fromkeys(LABELS, 0.0),
    )  # fmt: skip
    bundle = Bundle(Path("in-memory"), card, build_model(args.arch).eval())
    options = {"device": device.type, "batch_size": batch, "precision": args.precision}
    plain = Classifier(bundle, cams=False, **options)
    classifier = Classifier(bundle, **options)
    prediction = classifier.predict_series(series)
    images = prediction.images
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed(fn: Any) -> Any:
        def run() -> None:
            fn()
            sync()

        return run

    print_row(COLUMNS, None)
    forward = best_of(timed(lambda: plain.predict_images(images)), 1) / slices  # warm-up too
    steps: list[tuple[str, Any, bool]] = [
        ("forward, probabilities only", lambda: plain.predict_images(images), False),
        (
            "forward with CAMs (the node's inference pass)",
            lambda: classifier.predict_images_with_cams(images),
            True,
        ),
        ("CAM shortcut from the prediction", lambda: explain(prediction, classifier), False),
        (
            "CAM shortcut, recomputed (no CAMs in the prediction)",
            lambda: explain(replace(prediction, cams=None), classifier),
            False,
        ),
        ("pytorch-grad-cam", lambda: explain(prediction, classifier, method="gradcam"), False),
        (
            "heatmap images, head region and rendering (with_heatmap_images)",
            lambda: with_heatmap_images(explained, "positive", device),
            False,
        ),
    ]
    explained = explain_series(prediction, classifier, render=False)
    rows: list[dict[str, Any]] = []
    for name, fn, minus_forward in steps:
        if not budget.allows(4 * forward * slices):
            print(f"(budget: {name} skipped, {budget.left():.0f} s left)", flush=True)
            continue
        run = timed(fn)
        run()
        per = best_of(run, repeats) / slices
        if name.startswith("forward, probabilities"):
            forward = per
        extra = (per - forward) / forward if minus_forward else per / forward
        rows.append({"path": name, "s/slice": per, "extra / forward": "" if not rows else extra})
        print_row(COLUMNS, rows[-1])
    correlation = float("nan")
    if budget.allows(4 * forward * slices):
        shortcut = explain(prediction, classifier)
        reference = explain(prediction, classifier, method="gradcam")
        correlation = min(
            float(np.corrcoef(a.cam.ravel(), b.cam.ravel())[0, 1])
            for a, b in zip(shortcut, reference, strict=True)
        )
        print(f"shortcut vs pytorch-grad-cam: min correlation {correlation:.7f}", flush=True)
    print(f"load {load_average()} at the end")
    write_json(
        args.json, "explain" + ("_quick" if args.quick else ""),
        {"arch": args.arch, "size": args.size, "slices": slices, "batch": batch,
         "precision": args.precision, "device": str(device), "repeats": repeats,
         "min_correlation": correlation, "rows": rows},
    )  # fmt: skip
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
