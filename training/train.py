"""The training loop, in the shape of torchvision's classification reference.

``fit(settings)`` builds the index and the patient-level split, trains with
weighted BCE (RSNA weights: ``any`` counts double), AdamW or SGD with linear
warm-up then cosine decay, gradient accumulation, bf16 autocast and
channels_last on CUDA, and DDP when started by ``torchrun`` (gloo on the CPU,
nccl on CUDA). Rank 0 logs and writes: ``settings.yaml``, ``metrics.jsonl``,
``checkpoint.pt`` after every epoch, ``split.json`` and, at the end, the model
bundle ``model.safetensors`` with per-label thresholds chosen on validation.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ich_node.imaging import DEFAULT_WINDOWS, context_channels
from ich_node.labels import LABELS, RSNA_WEIGHTS
from ich_node.model.bundle import ModelCard
from ich_node.model.networks import ICHClassifier, build_model, pretrained_help
from training.data import (
    BlockShardSampler,
    DataIndex,
    SliceDataset,
    Split,
    build_index,
    collate_skip_none,
    read_study_list,
    shard,
    split_by_patient,
)
from training.export import Predictions, clean, export_bundle, level_reports
from training.settings import FitSettings, write_settings

log = structlog.get_logger(__name__)

BUNDLE_NAME = "model.safetensors"
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True, slots=True)
class DistInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True, slots=True)
class FitResult:
    """What :func:`fit` produced.

    Attributes
    ----------
    bundle_path : pathlib.Path or None
        The model bundle; None when the run stopped early (``stop_after_epochs``)
        or on ranks other than 0.
    checkpoint_path : pathlib.Path
    metrics : list of dict
        One entry per epoch run in this call (as in ``metrics.jsonl``).
    card : ModelCard or None
        The bundle's card (rank 0, finished runs).
    """

    bundle_path: Path | None
    checkpoint_path: Path
    metrics: list[dict[str, Any]]
    card: ModelCard | None


def dist_from_env() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend)
    return DistInfo(rank, world, local)


def dist_from_group() -> DistInfo:
    """The current process group (already initialised by the caller), or a single process."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
        return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)))
    return DistInfo()


def resolve_device(name: str, dist: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but no CUDA device is available")
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


# -------------------------------------------------------------- components


class WeightedBCE(nn.Module):
    """Per image the weighted mean of the six BCE terms (RSNA weights), then the batch mean.

    The same quantity as :func:`training.metrics.weighted_log_loss`.
    """

    def __init__(self, weights: dict[str, float] = RSNA_WEIGHTS) -> None:
        super().__init__()
        self.register_buffer("w", torch.tensor([weights[n] for n in LABELS], dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = nn.functional.binary_cross_entropy_with_logits(
            logits.float(), targets, reduction="none"
        )
        return ((bce * self.w).sum(dim=1) / self.w.sum()).mean()


def build_optimizer(model: nn.Module, settings: FitSettings) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov); no weight decay on biases and BatchNorm."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=settings.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: FitSettings, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per optimiser step: linear warm-up to ``lr``, then cosine to ``min_lr_ratio * lr``."""
    total = max(1, settings.epochs * steps_per_epoch)
    warmup = min(total - 1, round(settings.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_train_loader(
    dataset: SliceDataset, settings: FitSettings, dist: DistInfo
) -> tuple[DataLoader, BlockShardSampler]:
    sampler = BlockShardSampler(
        len(dataset),
        batch_size=settings.batch_size,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=settings.seed,
    )
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        num_workers=settings.workers,
        collate_fn=collate_skip_none,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, sampler


def _autocast(device: torch.device, settings: FitSettings):
    if device.type == "cuda" and settings.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _progress(iterable, settings: FitSettings, dist: DistInfo, **kwargs):
    if settings.progress and dist.is_main and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, **kwargs)
    return iterable


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    device: torch.device,
    settings: FitSettings,
    epoch: int,
    dist: DistInfo,
) -> dict[str, float]:
    """One pass over this rank's shard; returns the mean loss over all ranks' images."""
    model.train()
    total, count = torch.zeros((), dtype=torch.float64), 0
    n_batches = len(loader)
    optimizer.zero_grad(set_to_none=True)
    bar = _progress(loader, settings, dist, desc=f"epoch {epoch + 1}", leave=False)
    for i, (images, targets, _) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if device.type == "cuda" and settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        step_now = (i + 1) % settings.accum_steps == 0 or i + 1 == n_batches
        # In the last, short accumulation group each micro-batch weighs 1/len(group).
        group = settings.accum_steps if n_batches - i > n_batches % settings.accum_steps else (
            n_batches % settings.accum_steps)  # fmt: skip
        sync = nullcontext() if step_now or not dist.active else model.no_sync()
        with sync:
            with _autocast(device, settings):
                logits = model(images)
            loss = criterion(logits, targets)
            (loss / group).backward()
        if step_now:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.detach().double().cpu() * len(images)
        count += len(images)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.4f}")
    stats = torch.tensor([float(total), float(count)], dtype=torch.float64)
    if dist.active:
        torch_dist.all_reduce(stats)
    return {"train_loss": float(stats[0] / max(stats[1], 1)), "train_images": int(stats[1])}


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: SliceDataset,
    device: torch.device,
    settings: FitSettings,
    dist: DistInfo,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities for every image of ``dataset``, sharded over ranks and gathered.

    Returns
    -------
    indices : numpy.ndarray
        (N,) int64, dataset positions of the images that could be decoded, sorted.
    probs : numpy.ndarray
        (N, 6) float32 sigmoid probabilities in LABELS order.
    """
    net = model.module if isinstance(model, DistributedDataParallel) else model
    net.eval()
    subset = torch.utils.data.Subset(dataset, list(shard(len(dataset), dist.rank, dist.world_size)))
    loader = DataLoader(
        subset,
        batch_size=settings.eval_batch_size,
        num_workers=settings.workers,
        collate_fn=collate_skip_none,
    )
    idx_parts, prob_parts = [], []
    for images, _, idx in _progress(loader, settings, dist, desc="evaluate", leave=False):
        images = images.to(device)
        if device.type == "cuda" and settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, settings):
            logits = net(images)
        prob_parts.append(torch.sigmoid(logits.float()).cpu().numpy())
        idx_parts.append(idx.numpy())
    indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
    probs = np.concatenate(prob_parts) if prob_parts else np.zeros((0, len(LABELS)), np.float32)
    if dist.active:
        gathered: list[Any] = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, (indices, probs))
        indices = np.concatenate([g[0] for g in gathered])
        probs = np.concatenate([g[1] for g in gathered])
    order = np.argsort(indices, kind="stable")
    return indices[order].astype(np.int64), probs[order].astype(np.float32)


def evaluate(
    model: nn.Module,
    dataset: SliceDataset,
    device: torch.device,
    settings: FitSettings,
    dist: DistInfo,
    thresholds: dict[str, float] | None = None,
) -> tuple[dict[str, Any], Predictions]:
    """Validation metrics per image and per study (study = max over its slices).

    Returns the report and the predictions of the decodable images.
    """
    indices, probs = predict(model, dataset, device, settings, dist)
    truth = np.asarray([dataset.records[i].labels for i in indices], dtype=np.float32)
    pred = Predictions(indices, truth.reshape(-1, len(LABELS)), probs)
    return level_reports(dataset, pred, thresholds), pred


# ----------------------------------------------------------------- the run


def _load_data(settings: FitSettings, dist: DistInfo) -> tuple[DataIndex, Split]:
    cache = Path(settings.cache_dir) if settings.cache_dir else Path(settings.out) / "cache"
    kwargs = {"cache_dir": cache, "workers": settings.index_workers}
    if dist.is_main:
        index = build_index(Path(settings.images), Path(settings.labels), **kwargs)
    if dist.active:
        torch_dist.barrier()
    if not dist.is_main:
        index = build_index(Path(settings.images), Path(settings.labels), **kwargs)
    excluded = read_study_list(Path(settings.exclude_studies)) if settings.exclude_studies else ()
    split = split_by_patient(
        index, val_fraction=settings.val_fraction, seed=settings.seed, exclude_studies=excluded
    )
    if not split.train:
        raise ValueError("the training split is empty")
    return index, split


def _save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, epoch: int,
                     settings: FitSettings) -> None:  # fmt: skip
    net = model.module if isinstance(model, DistributedDataParallel) else model
    state = {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "args": settings.to_dict(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def remaining_estimate(first_epoch_s: float, remaining: int) -> str:
    """What the rest of a run will take, from the first epoch of this call.

    The first epoch also fills the slice cache (``preprocess_cache``) and warms
    up, so the later ones are usually shorter: the estimate is an upper bound at
    the machine's present load.

    Parameters
    ----------
    first_epoch_s : float
        Seconds the first epoch took, validation included.
    remaining : int
        Epochs still to run (>= 1).
    """
    total = first_epoch_s * remaining
    shown = f"{total:.0f} s" if total < 90 else f"{total / 60:.0f} min"
    noun = "epoch" if remaining == 1 else "epochs"
    return (
        f"estimate: the remaining {remaining} {noun} take at most about {shown} at this "
        "pace (the first epoch also filled the slice cache; later ones are usually shorter, "
        "unless the machine gets busier)"
    )


_MUST_MATCH_ON_RESUME = ("arch", "image_size", "context", "epochs", "batch_size",
                         "accum_steps", "seed", "optimizer", "lr", "val_fraction")  # fmt: skip


def fit(
    settings: FitSettings,
    *,
    dist: DistInfo | None = None,
    say: Callable[[str], None] = print,
) -> FitResult:
    """Train, validate and export; the in-process API behind ``ich-train fit``.

    Parameters
    ----------
    settings : FitSettings
        Resolved settings (:func:`training.settings.resolve`).
    dist : DistInfo or None
        The process group this process belongs to (default: the initialised
        ``torch.distributed`` group, if any, else a single process).
    say : callable
        Where rank 0 prints human-readable progress.
    """
    dist = dist or dist_from_group()
    if not dist.is_main:
        say = lambda _msg: None  # noqa: E731 - only rank 0 talks
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device, dist)
    if settings.pretrained is None:
        say("note: no --pretrained weights: training starts from random weights. "
            + pretrained_help(settings.arch))  # fmt: skip

    index, split = _load_data(settings, dist)
    split_info = split.describe(index)
    if dist.is_main:
        write_settings(out / "settings.yaml", settings)
        (out / "split.json").write_text(json.dumps({
            **split_info, "seed": settings.seed, "val_fraction": settings.val_fraction,
            "val_patients": split.val_patients,
            "val_studies": sorted({index.records[i].study_uid for i in split.val}),
            "skipped_images": [list(s) for s in index.skipped],
        }, indent=1))  # fmt: skip
    say(f"data: {len(index.records)} images ({len(index.skipped)} skipped); "
        f"train {split_info['train']}, val {split_info['val']}")  # fmt: skip

    windows = DEFAULT_WINDOWS
    pre_cache = None
    if settings.preprocess_cache:
        pre_cache = Path(settings.cache_dir) if settings.cache_dir else out / "cache"
    train_set = SliceDataset(
        [index.records[i] for i in split.train], windows, settings.image_size,
        augment=settings.augment, seed=settings.seed, cache_dir=pre_cache,
        context=settings.context,
    )  # fmt: skip
    val_set = SliceDataset(
        [index.records[i] for i in split.val], windows, settings.image_size, cache_dir=pre_cache,
        context=settings.context,
    )  # fmt: skip

    torch.manual_seed(settings.seed)
    model: nn.Module = build_model(
        settings.arch, pretrained=Path(settings.pretrained) if settings.pretrained else None,
        in_channels=context_channels(windows, settings.context),
    )  # fmt: skip
    model.to(device)
    if device.type == "cuda" and settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader, sampler = make_train_loader(train_set, settings, dist)
    steps_per_epoch = math.ceil(len(loader) / settings.accum_steps)
    optimizer = build_optimizer(model, settings)
    scheduler = build_scheduler(optimizer, settings, steps_per_epoch)
    criterion = WeightedBCE().to(device)

    start_epoch = 0
    if settings.resume:
        ckpt = torch.load(settings.resume, map_location="cpu", weights_only=True)
        differs = [k for k in _MUST_MATCH_ON_RESUME if ckpt["args"].get(k) != getattr(settings, k)]
        if differs:
            raise ValueError(
                f"--resume {settings.resume}: settings {differs} differ from the checkpoint's "
                f"({ {k: ckpt['args'].get(k) for k in differs} })"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])
        say(f"resumed from {settings.resume} after epoch {start_epoch}")
    if dist.active:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)

    ckpt_path = out / CHECKPOINT_NAME
    history: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    pred: Predictions | None = None
    last_epoch = settings.epochs
    if settings.stop_after_epochs is not None:
        last_epoch = min(settings.epochs, start_epoch + settings.stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        t0 = time.monotonic()
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
        t_train = time.monotonic()
        row.update(train_one_epoch(
            model, loader, optimizer, scheduler, criterion, device, settings, epoch, dist
        ))  # fmt: skip
        # Training throughput of all ranks together (data loading included, no validation).
        row["train_s"] = round(time.monotonic() - t_train, 2)
        row["train_slices_per_s"] = round(row["train_images"] / max(row["train_s"], 1e-9), 1)
        final = epoch + 1 == settings.epochs
        if len(val_set) and ((epoch + 1) % settings.eval_every == 0 or final):
            report, pred = evaluate(model, val_set, device, settings, dist)
            if report:
                row["val_loss"] = report["images"]["weighted_log_loss"]
                row["val_auc"] = report["images"]["roc_auc"]
                row["val_study_auc"] = report["studies"]["roc_auc"]
        row["time_s"] = round(time.monotonic() - t0, 2)
        history.append(clean(row))
        if dist.is_main:
            _save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch + 1, settings)
            with (out / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(clean(row)) + "\n")
            auc_any = (row.get("val_auc") or {}).get("any")
            study_any = (row.get("val_study_auc") or {}).get("any")
            say(f"epoch {epoch + 1}/{settings.epochs}: train loss {row['train_loss']:.4f}"
                + (f", val loss {row['val_loss']:.4f}" if "val_loss" in row else "")
                + (f", val AUC(any) image {auc_any:.3f}" if auc_any is not None else "")
                + (f" study {study_any:.3f}" if study_any is not None else "")
                + f" ({row['time_s']:.0f} s; training {row['train_slices_per_s']:.1f} slices/s)"
            )  # fmt: skip
            if epoch == start_epoch and last_epoch - epoch > 1:
                say(remaining_estimate(row["time_s"], last_epoch - epoch - 1))

    if last_epoch < settings.epochs:
        say(f"stopped after epoch {last_epoch} of {settings.epochs}; resume with "
            f"--resume {ckpt_path}")  # fmt: skip
        return FitResult(None, ckpt_path, history, None)
    if start_epoch >= settings.epochs and len(val_set):
        report, pred = evaluate(model, val_set, device, settings, dist)
    if not dist.is_main:
        return FitResult(None, ckpt_path, history, None)

    net = model.module if isinstance(model, DistributedDataParallel) else model
    assert isinstance(net, ICHClassifier)
    card = export_bundle(
        out / BUNDLE_NAME, net, settings, index=index, split=split, pred=pred,
        val_set=val_set, say=say,
    )  # fmt: skip
    return FitResult(out / BUNDLE_NAME, ckpt_path, history, card)
