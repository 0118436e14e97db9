"""What the sequence stage adds to a series' time in the worker (CPU by default).

    python benchmarks/sequence.py                         # resnet18 and ResNeXt-101 at 256 px
    python benchmarks/sequence.py --archs resnet18 --slices 40 --size 128   # quick

For each architecture: two bundles with the same CNN, one with a
:class:`ich_node.model.SequenceStage` (128 units, as ``fit-sequence`` trains by
default). ``Classifier.predict_series`` (the worker's model stage: decode, HU,
windows, resize, CNN with CAMs, then the sequence stage) is timed with each, best of
``--repeats``; the sequence stage alone (``Classifier.sequence_logits`` on the
series' embeddings) is timed too. "seq share" = sequence stage alone / two-stage
series time; that is what the stage adds to the worker's time per series. Each row
is printed when measured; ``--budget`` seconds end the run cleanly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Budget, best_of, load_average, print_row, write_json
from ich_node.imaging import read_series
from ich_node.model.bundle import ModelCard, load_bundle, save_bundle
from ich_node.model.inference import Classifier
from ich_node.model.networks import SequenceStage, build_model
from training.phantom import write_series


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnext101_32x8d"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="resnet18, 16 slices at 128 px, once")
    p.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run")
    args = p.parse_args(argv)
    budget = Budget(args.budget)
    columns = ["arch", "size", "slices", "one-stage s", "two-stage s", "sequence s", "seq share %"]
    if args.quick:
        args.archs, args.slices, args.size, args.repeats = ["resnet18"], 16, 128, 1
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ph = write_series(Path(tmp) / "s", seed=1, subtypes=("subdural",), n_slices=args.slices,
                          matrix=512)  # fmt: skip
        series = read_series(ph.paths)
        print_row(columns, None)
        for arch in args.archs:
            if rows and not budget.allows(3 * rows[-1]["two-stage s"] * (args.repeats + 1)):
                print(f"(budget: {arch} skipped, {budget.left():.0f} s left)", flush=True)
                continue
            torch.manual_seed(0)
            model = build_model(arch)
            card = ModelCard(name="bench", version="0", arch=arch, input_size=args.size,
                             demo=True)  # fmt: skip
            one = save_bundle(Path(tmp) / f"{arch}-1.safetensors", model, card)
            stage = SequenceStage(model.embedding_dim)
            save_bundle(Path(tmp) / f"{arch}-2.safetensors", model, one, stage)
            c1 = Classifier(load_bundle(Path(tmp) / f"{arch}-1.safetensors"), device=args.device)
            c2 = Classifier(load_bundle(Path(tmp) / f"{arch}-2.safetensors"), device=args.device)
            c2.predict_series(series)  # warm up both
            c1.predict_series(series)
            t1 = best_of(lambda c=c1: c.predict_series(series), args.repeats)
            t2 = best_of(lambda c=c2: c.predict_series(series), args.repeats)
            images = c2.prepare(series)[1]
            outputs = c2.cnn_outputs(images)
            seq = min(_timed(c2.sequence_logits, outputs) for _ in range(20))
            rows.append({
                "arch": arch, "size": args.size, "slices": args.slices,
                "one-stage s": round(t1, 3), "two-stage s": round(t2, 3),
                "sequence s": round(seq, 5), "seq share %": round(100 * seq / t2, 3),
            })  # fmt: skip
            print_row(columns, rows[-1])
    print(f"load average {load_average()}, torch threads {torch.get_num_threads()}")
    write_json(args.json, "sequence", {"rows": rows})
    return 0


def _timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
