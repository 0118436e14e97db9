"""``ich-train``: phantom data, preprocessing cache, training and evaluation.

Subcommands (a stable interface; scripts depend on it)::

    ich-train phantom  --out DIR --studies N [--seed S] [--matrix 512] [--slices MIN MAX]
    ich-train cache    --images DIR --labels CSV --image-size N --cache-dir DIR [--workers W]
    ich-train fit      --images DIR --labels CSV --arch ARCH --image-size N --epochs E --out OUT
                       [--config YAML] [--pretrained PATH] [--resume OUT/checkpoint.pt] ...
    ich-train fit-sequence --run RUN --out OUT [--epochs E] [--hidden H] [--embed-passes P] ...
    ich-train evaluate --bundle B --images DIR --labels CSV --out REPORT.json [--studies FILE]

Several GPUs or processes: ``torchrun --nproc_per_node N -m training fit ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from training.settings import FitSettings

_FIT_HELP = {
    "images": "folder of ID_<image>.dcm files",
    "labels": "stage_2_train.csv (ID_<image>_<subtype>,<label>)",
    "out": "output folder: model.safetensors, settings.yaml, metrics.jsonl, checkpoint.pt",
    "cache_dir": "index and preprocessed-slice cache (default OUT/cache)",
    "preprocess_cache": "keep preprocessed slices as uint8 .npy in the cache",
    "val_fraction": "fraction of patients in the validation split",
    "exclude_studies": "file of StudyInstanceUIDs (one a line) kept out of train and val",
    "workers": "DataLoader worker processes per rank",
    "index_workers": "processes reading DICOM headers when indexing",
    "arch": "resnext101_32x8d (production), resnet50, resnet18 (CPU demo/tests)",
    "pretrained": "local ImageNet state dict (.pth/.safetensors); never downloaded",
    "image_size": "model input side, pixels",
    "context": "2.5D slice context: neighbours on each side as extra brain-window channels "
    "(0: none, 1: s-1 and s+1)",
    "batch_size": "images per step and rank (effective batch: x ranks x accum-steps)",
    "accum_steps": "micro-batches per optimiser step",
    "warmup_epochs": "linear warm-up length, epochs (fractions allowed)",
    "min_lr_ratio": "final lr of the cosine decay, as a fraction of --lr",
    "hflip": "probability of a left-right flip",
    "rotate_deg": "max rotation, degrees",
    "scale": "max zoom change (0.1: 0.9-1.1)",
    "translate": "max shift, fraction of the side",
    "window_center_hu": "window-center jitter, HU (needs HU: bypasses the slice cache)",
    "window_width": "window-width jitter, relative (0.1: x0.9-1.1)",
    "device": "auto, cpu or cuda",
    "amp": "bf16 autocast on CUDA",
    "channels_last": "channels_last memory format on CUDA",
    "eval_every": "validate every N epochs (and after the last)",
    "resume": "checkpoint.pt to continue from",
    "stop_after_epochs": "stop after this many epochs in this invocation (resume later)",
    "progress": "tqdm bars (only on a terminal, rank 0)",
    "version": "model version in the card (default 0.1.0+<time>.g<commit>)",
}


def _arg_type(annotation: object) -> type:
    hint = typing.get_type_hints(FitSettings)[annotation] if isinstance(annotation, str) else None
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint  # type: ignore[return-value]


def _add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML preset (e.g. config/train_demo.yaml)")
    for f in fields(FitSettings):
        kind = _arg_type(f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = _FIT_HELP.get(f.name, "") + f" (default {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)  # fmt: skip
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ich-train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic dataset in the RSNA 2019 layout")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--studies", type=int, required=True, help="number of studies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matrix", type=int, default=512, help="image side, pixels")
    p.add_argument("--slices", type=int, nargs=2, metavar=("MIN", "MAX"), default=(24, 32))

    p = sub.add_parser("cache", help="index the data and preprocess every slice once")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--workers", type=int, default=2)

    p = sub.add_parser("fit", help="train and export the model bundle")
    _add_fit_arguments(p)

    p = sub.add_parser(
        "fit-sequence",
        help="second stage: train the sequence model on the CNN run's embeddings",
    )
    from training.sequence import SequenceSettings

    seq_help = {
        "run": "the CNN run's folder (settings.yaml, split.json, model.safetensors)",
        "out": "output folder: model.safetensors (both stages), metrics.jsonl",
        "images": "image folder (default: the run's)",
        "labels": "labels CSV (default: the run's)",
        "cache_dir": "index and slice cache (default: the run's)",
        "bundle": "the CNN bundle (default RUN/model.safetensors)",
        "hidden": "GRU width per direction",
        "inputs": "what the stage reads per slice: embeddings+logits (RSNA) or logits "
        "(small data sets)",
        "embed_passes": "augmented extractions of the training split's embeddings",
        "folds": "out-of-fold embeddings: train this many extra CNNs, each embeds the "
        "training patients it did not see (0: off, use --embed-passes)",
        "batch_series": "series per optimiser step",
    }
    for f in fields(SequenceSettings):
        kind = typing.get_type_hints(SequenceSettings)[f.name]
        if isinstance(kind, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        p.add_argument(
            "--" + f.name.replace("_", "-"), type=kind, default=None,
            required=f.name == "run",
            help=seq_help.get(f.name, "") + f" (default {f.default!r})",
        )  # fmt: skip

    p = sub.add_parser("evaluate", help="metrics of a bundle on labelled data")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="REPORT.json (REPORT.md beside it)")
    p.add_argument("--studies", type=Path, help="only these StudyInstanceUIDs (one a line)")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--tta", action="store_true", help="average each image with its mirror")
    return parser


def settings_from_args(args: argparse.Namespace) -> FitSettings:
    """Resolve ``fit`` settings: defaults < ``--config`` < flags; check the required ones."""
    from training.settings import FIELD_NAMES, resolve

    overrides = {name: getattr(args, name) for name in FIELD_NAMES}
    settings = resolve(args.config, **overrides)
    missing = [f"--{k}" for k in ("images", "labels") if not getattr(settings, k)]
    if missing:
        raise SystemExit(f"ich-train fit: {', '.join(missing)} required (flag or --config)")
    return settings


def run_phantom(args: argparse.Namespace) -> int:
    from training.phantom import write_dataset

    lo, hi = args.slices
    summary = write_dataset(args.out, args.studies, seed=args.seed, n_slices=(lo, hi),
                            matrix=args.matrix)  # fmt: skip
    print(f"wrote {summary.n_studies} studies ({summary.n_positive_studies} with hemorrhage), "
          f"{summary.n_images} images to {summary.out}")  # fmt: skip
    print(f"  images: {summary.out / 'images'}")
    print(f"  labels: {summary.out / 'stage_2_train.csv'}")
    print("  positive slices: " + ", ".join(f"{k} {v}" for k, v in summary.label_counts.items()))
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ich_node.imaging import DEFAULT_WINDOWS
    from training.data import SliceDataset, build_index, collate_skip_none

    index = build_index(args.images, args.labels, cache_dir=args.cache_dir,
                        workers=args.workers)  # fmt: skip
    dataset = SliceDataset(index.records, DEFAULT_WINDOWS, args.image_size,
                           cache_dir=args.cache_dir)  # fmt: skip
    loader = DataLoader(dataset, batch_size=64, num_workers=args.workers,
                        collate_fn=collate_skip_none)  # fmt: skip
    done = sum(len(idx) for _, _, idx in loader)
    print(
        f"cached {done} of {len(dataset)} images at {args.image_size} px in {args.cache_dir} "
        f"({len(index.skipped)} skipped while indexing, {len(dataset) - done} undecodable)"
    )
    return 0


def run_fit(args: argparse.Namespace) -> int:
    import torch.distributed as torch_dist

    from training.train import dist_from_env, fit

    settings = settings_from_args(args)
    dist = dist_from_env()
    try:
        fit(settings, dist=dist)
    finally:
        if dist.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
        _warnings_summary(Path(settings.out), dist.is_main)
    return 0


def _warnings_summary(out: Path, is_main: bool) -> None:
    """Library warnings of the run: each kind once with its count, kept in the run folder.

    Each kind was shown once when first seen (:mod:`ich_node.log`); this is the
    count (this process's; data-loader workers show their own first occurrences).
    """
    from ich_node.log import warning_counts

    counts = warning_counts(None)
    if not counts or not is_main:
        return
    for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"library warning x{n}: {kind}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "library_warnings.json").write_text(json.dumps(counts, indent=2, sort_keys=True))


def run_fit_sequence(args: argparse.Namespace) -> int:
    from training.sequence import SequenceSettings, fit_sequence

    values = {f.name: getattr(args, f.name) for f in fields(SequenceSettings)}
    fit_sequence(SequenceSettings(**{k: v for k, v in values.items() if v is not None}))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_bundle

    report = evaluate_bundle(
        args.bundle, args.images, args.labels, args.out, studies=args.studies,
        cache_dir=args.cache_dir, batch_size=args.batch_size, device=args.device,
        workers=args.workers, tta=args.tta,
    )  # fmt: skip
    for level in ("images", "studies"):
        r = report[level]
        auc = r["roc_auc"]["any"]
        print(f"{level}: accuracy {r['accuracy']:.3f}, F1 macro {r['f1']['macro']:.3f} "
              f"micro {r['f1']['micro']:.3f}, AUC(any) "
              f"{'n/a' if auc is None else f'{auc:.3f}'}, "
              f"weighted log loss {r['weighted_log_loss']:.4f}")  # fmt: skip
    for name, stage in report.get("stages", {}).items():
        print(f"{name}: weighted log loss images {stage['images']['weighted_log_loss']:.4f}, "
              f"studies {stage['studies']['weighted_log_loss']:.4f}")  # fmt: skip
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from ich_node.log import configure_logging

    # Progress and results are printed; the log only carries warnings and errors.
    configure_logging("console", "WARNING")
    handlers = {"phantom": run_phantom, "cache": run_cache, "fit": run_fit,
                "fit-sequence": run_fit_sequence, "evaluate": run_evaluate}  # fmt: skip
    try:
        return handlers[args.command](args)
    except (ValueError, OSError) as exc:
        print(f"ich-train {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
