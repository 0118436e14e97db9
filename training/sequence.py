"""``ich-train fit-sequence``: the second stage, a bi-GRU over a series' slice embeddings.

The RSNA 2019 winners' recipe in two steps:

1. ``ich-train fit`` trains the CNN (optionally with 2.5D slice context);
2. ``ich-train fit-sequence --run RUN --out OUT`` extracts each slice's pooled
   embedding and logits **once** from the trained CNN (``RUN/model.safetensors``),
   groups them by series in spatial order and trains
   :class:`ich_node.model.SequenceStage` on them. The split is the CNN run's: the
   same index, ``split_by_patient`` with the run's seed, validation fraction and
   excluded studies (checked against ``RUN/split.json``).

Overfitting risk and the remedy used. The CNN has seen the training slices, so
its embeddings of them are cleaner and its logits more confident than on new
studies; a sequence stage trained on them learns to trust the CNN more than it
should. Remedy: the training split's embeddings are extracted
``embed_passes`` times **with the CNN's training augmentation** (flip, rotation,
zoom, shift; a different draw each pass, seeded), and each epoch every series
takes one of its passes at random; the stage also has dropout on its input and
GRU output and a residual form (it corrects the CNN's logits, starting from zero).
Thresholds and the card's metrics come from the validation patients, whose
embeddings the CNN never trained on. Out-of-fold embeddings (K CNNs, each
embedding the patients it did not train on) remove the bias entirely but cost K
CNN trainings; they are not implemented (docs/training.md).

Outputs: ``OUT/model.safetensors``, one bundle with both stages (the CNN's tensors
unprefixed, the sequence stage's under ``sequence.``; the card's ``stages`` is
``["cnn", "sequence"]``), ``OUT/sequence_settings.yaml`` and ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from ich_node.labels import LABELS
from ich_node.model.bundle import Bundle, ModelCard, load_bundle, save_bundle
from ich_node.model.networks import ICHClassifier, SequenceStage
from training import metrics as M
from training.data import (
    DataIndex,
    ImageRecord,
    SliceDataset,
    Split,
    build_index,
    collate_skip_none,
    read_study_list,
    split_by_patient,
)
from training.export import clean
from training.settings import FitSettings, resolve
from training.train import WeightedBCE

BUNDLE_NAME = "model.safetensors"


@dataclass(frozen=True, slots=True)
class SequenceSettings:
    """Every knob of ``ich-train fit-sequence`` (flags use these names)."""

    run: str = ""  # the CNN run's folder: settings.yaml, split.json, model.safetensors
    out: str = "runs/ich-sequence"
    images: str | None = None  # default: the run's
    labels: str | None = None
    cache_dir: str | None = None
    bundle: str | None = None  # default RUN/model.safetensors
    hidden: int = 128
    inputs: str = "embeddings+logits"
    dropout: float = 0.3
    epochs: int = 30
    batch_series: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-2
    embed_passes: int = 3
    folds: int = 0
    embed_batch_size: int = 64
    workers: int = 0
    device: str = "auto"
    seed: int = 0
    version: str | None = None

    def __post_init__(self) -> None:
        for name in ("hidden", "epochs", "batch_series", "embed_passes", "embed_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"folds must be 0 (off) or >= 2, got {self.folds!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class SeriesEmbeddings:
    """One series' CNN outputs in spatial order.

    Attributes
    ----------
    series_uid, study_uid : str
    record_indices : numpy.ndarray
        (S,) int64 positions in the dataset the outputs came from.
    embeddings : numpy.ndarray
        (P, S, D) float32, one row per extraction pass (P = 1 without augmentation).
    logits : numpy.ndarray
        (P, S, L) float32 CNN logits.
    truth : numpy.ndarray
        (S, L) float32 labels.
    """

    series_uid: str
    study_uid: str
    record_indices: np.ndarray
    embeddings: np.ndarray
    logits: np.ndarray
    truth: np.ndarray


@dataclass(frozen=True, slots=True)
class SequenceResult:
    """What :func:`fit_sequence` produced: the bundle, its card, the per-epoch log."""

    bundle_path: Path
    card: ModelCard
    metrics: list[dict[str, Any]]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is available")
    return torch.device(name)


@torch.no_grad()
def extract(
    model: ICHClassifier, dataset: SliceDataset, device: torch.device, batch_size: int,
    workers: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Pooled embeddings and logits of every decodable image of ``dataset``.

    Returns
    -------
    indices : (N,) int64 dataset positions, sorted
    embeddings : (N, D) float32
    logits : (N, L) float32
    """
    model.eval().to(device)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip_none
    )
    idx, emb, log = [], [], []
    for images, _, index in loader:
        if not len(images):
            continue
        pooled, logits = model.embed(images.to(device))
        idx.append(index.numpy())
        emb.append(pooled.float().cpu().numpy())
        log.append(logits.float().cpu().numpy())
    if not idx:
        raise ValueError("no image could be decoded")
    indices = np.concatenate(idx)
    order = np.argsort(indices, kind="stable")
    return indices[order], np.concatenate(emb)[order], np.concatenate(log)[order]


def group_series(
    records: Sequence[ImageRecord],
    indices: np.ndarray,
    embeddings: Sequence[np.ndarray],
    logits: Sequence[np.ndarray],
) -> list[SeriesEmbeddings]:
    """Group per-image outputs (one array per pass, rows = ``indices``) by series.

    ``records`` are in :func:`training.data.build_index` order, i.e. by series and
    then by position along the slice normal: each group is in spatial order.
    """
    groups: dict[str, list[int]] = {}
    for row, i in enumerate(indices):
        groups.setdefault(records[int(i)].series_uid, []).append(row)
    out = []
    for uid, rows in groups.items():
        r = np.asarray(rows)
        out.append(
            SeriesEmbeddings(
                series_uid=uid,
                study_uid=records[int(indices[r[0]])].study_uid,
                record_indices=indices[r],
                embeddings=np.stack([e[r] for e in embeddings]).astype(np.float32),
                logits=np.stack([g[r] for g in logits]).astype(np.float32),
                truth=np.asarray([records[int(i)].labels for i in indices[r]], np.float32),
            )
        )
    return out


def _pad(items: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(x) for x in items], dtype=torch.int64)
    out = np.zeros((len(items), int(lengths.max()), *items[0].shape[1:]), np.float32)
    for k, x in enumerate(items):
        out[k, : len(x)] = x
    return torch.from_numpy(out), lengths


@torch.no_grad()
def sequence_probs(
    stage: SequenceStage, series: Sequence[SeriesEmbeddings], device: torch.device
) -> list[np.ndarray]:
    """(S, L) float32 probabilities per series (pass 0), one series at a time."""
    stage.eval().to(device)
    out = []
    for s in series:
        emb = torch.from_numpy(s.embeddings[0]).to(device)[None]
        logits = torch.from_numpy(s.logits[0]).to(device)[None]
        out.append(torch.sigmoid(stage(emb, logits)[0]).cpu().numpy())
    return out


def train_stage(
    train: Sequence[SeriesEmbeddings],
    settings: SequenceSettings,
    device: torch.device,
    *,
    val: Sequence[SeriesEmbeddings] = (),
    say: Callable[[str], None] = print,
    log_path: Path | None = None,
) -> tuple[SequenceStage, list[dict[str, Any]]]:
    """Train a :class:`SequenceStage` on whole series; returns it and one log row per epoch.

    Loss: the RSNA-weighted BCE per slice (as the CNN's), averaged over all real
    slices of the batch. AdamW, cosine decay, ``batch_series`` series per step,
    each series taking one of its extraction passes at random (seeded).
    """
    torch.manual_seed(settings.seed)
    dim = train[0].embeddings.shape[-1]
    stage = SequenceStage(dim, settings.hidden, len(LABELS), settings.dropout, settings.inputs)
    stage = stage.to(device)
    opt = torch.optim.AdamW(stage.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * math.ceil(len(train) / settings.batch_series)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k / max(steps, 1), 1.0)))
    )
    criterion = WeightedBCE().to(device)
    rng = np.random.default_rng(settings.seed)
    history: list[dict[str, Any]] = []
    for epoch in range(settings.epochs):
        t0 = time.monotonic()
        stage.train()
        order = rng.permutation(len(train))
        total, count = 0.0, 0
        for start in range(0, len(order), settings.batch_series):
            batch = [train[k] for k in order[start : start + settings.batch_series]]
            passes = [int(rng.integers(len(s.embeddings))) for s in batch]
            emb, lengths = _pad([s.embeddings[p] for s, p in zip(batch, passes, strict=True)])
            logits, _ = _pad([s.logits[p] for s, p in zip(batch, passes, strict=True)])
            truth, _ = _pad([s.truth for s in batch])
            out = stage(emb.to(device), logits.to(device), lengths)
            valid = torch.arange(emb.shape[1])[None, :] < lengths[:, None]
            loss = criterion(out[valid.to(device)], truth.to(device)[valid.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(stage.parameters(), 5.0)
            opt.step()
            sched.step()
            n = int(lengths.sum())
            total += float(loss) * n
            count += n
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(count, 1)}
        if val:
            probs = np.concatenate(sequence_probs(stage, val, device))
            truth = np.concatenate([s.truth for s in val])
            row["val_loss"] = M.weighted_log_loss(truth, probs)
        row["time_s"] = round(time.monotonic() - t0, 2)
        history.append(clean(row))
        if log_path is not None:
            with log_path.open("a") as fh:
                fh.write(json.dumps(clean(row)) + "\n")
        say(f"sequence epoch {epoch + 1}/{settings.epochs}: train loss {row['train_loss']:.4f}"
            + (f", val loss {row['val_loss']:.4f}" if "val_loss" in row else ""))  # fmt: skip
    stage.eval()
    return stage, history


def stage_reports(
    series: Sequence[SeriesEmbeddings], probs: Sequence[np.ndarray], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Image- and study-level :func:`training.metrics.full_report` (study = max over slices)."""
    truth = np.concatenate([s.truth for s in series])
    p = np.concatenate(probs)
    studies = [s.study_uid for s in series for _ in range(len(s.truth))]
    _, study_truth = M.group_max(studies, truth)
    _, study_probs = M.group_max(studies, p)
    return {
        "images": M.full_report(truth, p, thresholds),
        "studies": M.full_report(study_truth, study_probs, thresholds),
    }


def _cnn_run(settings: SequenceSettings) -> tuple[FitSettings, Bundle]:
    run = Path(settings.run)
    if not (run / "settings.yaml").is_file():
        raise ValueError(f"--run {run}: no settings.yaml (the folder `ich-train fit --out` wrote)")
    values = yaml.safe_load((run / "settings.yaml").read_text()) or {}
    for key in ("images", "labels", "cache_dir"):
        if getattr(settings, key):
            values[key] = getattr(settings, key)
    fit_settings = resolve(None, **values)
    bundle = load_bundle(Path(settings.bundle) if settings.bundle else run / BUNDLE_NAME)
    if bundle.card.has_sequence:
        raise ValueError(f"{bundle.path}: already has a sequence stage; pass the CNN run's bundle")
    return fit_settings, bundle


def _same_split(run: Path, split: Split) -> None:
    path = run / "split.json"
    if not path.is_file():
        return
    recorded = json.loads(path.read_text()).get("val_patients")
    if recorded is not None and list(recorded) != list(split.val_patients):
        raise ValueError(
            f"{path}: the CNN run's validation patients differ from the split rebuilt here "
            "(same data, seed and val_fraction are needed: patient-level splits must match)"
        )


def _out_of_fold(
    settings: SequenceSettings,
    fit_settings: FitSettings,
    index: DataIndex,
    split: Split,
    card: ModelCard,
    cache: Path,
    say: Callable[[str], None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold embeddings of the training split: K CNNs, each embeds the fold it never saw.

    The training patients are dealt to ``settings.folds`` folds (shuffled with the
    sequence seed). For fold k a CNN is trained with the run's settings on the
    other folds (``ich-train fit`` with the held-out fold, the validation studies
    and the run's excluded studies excluded, no validation split) in
    ``OUT/folds/k``, then embeds fold k. Returns indices into the training records
    (sorted), embeddings and logits, as :func:`extract`.
    """
    from training.train import fit

    out = Path(settings.out) / "folds"
    train_idx = list(split.train)
    position = {i: j for j, i in enumerate(train_idx)}
    patients = sorted({index.records[i].patient_id for i in train_idx})
    order = np.random.default_rng(settings.seed).permutation(len(patients))
    fold_of = {patients[int(p)]: k % settings.folds for k, p in enumerate(order)}
    val_studies = {index.records[i].study_uid for i in split.val}
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    device = _device(settings.device)
    for k in range(settings.folds):
        held = [i for i in train_idx if fold_of[index.records[i].patient_id] == k]
        held_studies = {index.records[i].study_uid for i in held}
        folder = out / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        excluded = held_studies | val_studies | set(split.excluded_studies)
        (folder / "exclude.txt").write_text("\n".join(sorted(excluded)) + "\n")
        say(f"fold {k + 1}/{settings.folds}: training a CNN without {len(held)} slices")
        fold_settings = fit_settings.replace(
            out=str(folder), exclude_studies=str(folder / "exclude.txt"), val_fraction=0.0,
            resume=None, stop_after_epochs=None, cache_dir=str(cache), progress=False,
            device=settings.device,
        )  # fmt: skip
        result = fit(fold_settings, say=lambda _m: None)
        assert result.bundle_path is not None
        model = load_bundle(result.bundle_path).model
        records = [index.records[i] for i in held]
        ds = SliceDataset(records, card.windows, card.input_size,
                          cache_dir=cache if fit_settings.preprocess_cache else None,
                          context=card.context)  # fmt: skip
        idx, e, g = extract(model, ds, device, settings.embed_batch_size, settings.workers)
        parts.append((np.asarray([position[held[int(j)]] for j in idx]), e, g))
    indices = np.concatenate([p[0] for p in parts])
    order_ = np.argsort(indices, kind="stable")
    return (
        indices[order_],
        np.concatenate([p[1] for p in parts])[order_],
        np.concatenate([p[2] for p in parts])[order_],
    )


def fit_sequence(
    settings: SequenceSettings, *, say: Callable[[str], None] = print
) -> SequenceResult:
    """Extract embeddings once from the run's CNN, train the sequence stage, export both.

    Raises
    ------
    ValueError
        No run folder, a bundle that already has two stages, or a split that
        differs from the CNN run's.
    """
    fit_settings, bundle = _cnn_run(settings)
    device = _device(settings.device)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sequence_settings.yaml").write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False))
    log_path = out / "metrics.jsonl"
    log_path.write_text("")
    cache = Path(fit_settings.cache_dir) if fit_settings.cache_dir else Path(settings.run) / "cache"
    index: DataIndex = build_index(
        Path(fit_settings.images), Path(fit_settings.labels), cache_dir=cache,
        workers=fit_settings.index_workers,
    )  # fmt: skip
    excluded = (
        read_study_list(Path(fit_settings.exclude_studies)) if fit_settings.exclude_studies else ()
    )
    split = split_by_patient(
        index, val_fraction=fit_settings.val_fraction, seed=fit_settings.seed,
        exclude_studies=excluded,
    )  # fmt: skip
    _same_split(Path(settings.run), split)
    card = bundle.card
    pre = cache if fit_settings.preprocess_cache else None
    common = {"cache_dir": pre, "context": card.context}
    train_records = [index.records[i] for i in split.train]
    val_records = [index.records[i] for i in split.val]
    aug = fit_settings.augment
    if aug.jitters_windows:  # the cache holds one windowing; keep extraction cheap
        aug = replace(aug, window_center_hu=0.0, window_width=0.0)
    if settings.folds >= 2:
        indices, e, g = _out_of_fold(settings, fit_settings, index, split, card, cache, say)
        embs, logs = [e], [g]
    else:
        embs, logs = [], []
        indices = np.zeros(0, np.int64)
        for p in range(settings.embed_passes):
            ds = SliceDataset(train_records, card.windows, card.input_size,
                              augment=aug if settings.embed_passes > 1 else None,
                              seed=settings.seed + 1000 * (p + 1), **common)  # fmt: skip
            t0 = time.monotonic()
            idx, e, g = extract(
                bundle.model, ds, device, settings.embed_batch_size, settings.workers
            )
            if p and not np.array_equal(idx, indices):
                raise ValueError("extraction passes decoded different images")
            indices = idx
            embs.append(e)
            logs.append(g)
            say(f"embeddings pass {p + 1}/{settings.embed_passes}: {len(idx)} training slices "
                f"({time.monotonic() - t0:.0f} s)")  # fmt: skip
    train = group_series(train_records, indices, embs, logs)
    val: list[SeriesEmbeddings] = []
    if val_records:
        ds = SliceDataset(val_records, card.windows, card.input_size, **common)
        vi, ve, vg = extract(bundle.model, ds, device, settings.embed_batch_size, settings.workers)
        val = group_series(val_records, vi, [ve], [vg])
    say(f"sequence stage: {len(train)} training series, {len(val)} validation series")
    stage, history = train_stage(train, settings, device, val=val, say=say, log_path=log_path)

    metrics: dict[str, Any] = {}
    thresholds = dict(card.thresholds)
    if val:
        probs = sequence_probs(stage, val, device)
        truth = np.concatenate([s.truth for s in val])
        thresholds = M.choose_thresholds(truth, np.concatenate(probs))
        cnn_probs = [1 / (1 + np.exp(-s.logits[0])) for s in val]
        metrics = {
            "validation": stage_reports(val, probs, thresholds),
            "validation_cnn": stage_reports(val, cnn_probs, dict(card.thresholds)),
        }
    version = settings.version or f"{card.version}+seq"
    new_card = replace(
        card,
        version=version,
        thresholds={k: float(v) for k, v in thresholds.items()},
        metrics=clean(metrics),
        sequence={
            "training": clean(settings.to_dict()),
            "cnn_metrics": clean(card.metrics),
            "cnn_thresholds": dict(card.thresholds),
            "overfitting_remedy": (
                f"out-of-fold embeddings ({settings.folds} CNNs trained on the other folds)"
                if settings.folds >= 2
                else f"training-split embeddings extracted {settings.embed_passes} times "
                "under the CNN's training augmentation"
            )
            + "; dropout; residual on CNN logits",
        },
    )
    path = out / BUNDLE_NAME
    written = save_bundle(path, bundle.model, new_card, stage.cpu())
    if metrics:
        a = metrics["validation"]["images"]["weighted_log_loss"]
        b = metrics["validation_cnn"]["images"]["weighted_log_loss"]
        say(f"validation weighted log loss: CNN {b:.4f}, CNN + sequence {a:.4f}")
    say(f"wrote {path} ({written.display_name}, stages {'+'.join(written.stages)})")
    return SequenceResult(path, written, history)
