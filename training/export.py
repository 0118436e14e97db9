"""Export: the model bundle with its model card, thresholds chosen on validation.

The card records what serving needs (arch, input size, windows, labels,
thresholds) and what an auditor needs (training data, split, validation
metrics, settings, git commit, creation time). A model trained on any phantom
image is marked ``demo``.
"""

from __future__ import annotations

import datetime as dt
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ich_node.imaging import DEFAULT_WINDOWS
from ich_node.labels import LABELS
from ich_node.model.bundle import ModelCard, save_bundle
from ich_node.model.networks import ICHClassifier
from training import metrics as M
from training.data import DataIndex, SliceDataset, Split
from training.settings import FitSettings

MODEL_NAME = "ich-node ICH classifier"


@dataclass(frozen=True, slots=True)
class Predictions:
    """Validation outputs: dataset positions (N,) int64, labels and probabilities (N, 6)."""

    indices: np.ndarray
    truth: np.ndarray
    probs: np.ndarray


def level_reports(
    dataset: SliceDataset,
    pred: Predictions,
    thresholds: dict[str, float] | None,
) -> dict[str, Any]:
    """Image- and study-level :func:`training.metrics.full_report` of ``pred``."""
    thresholds = thresholds or dict.fromkeys(LABELS, 0.5)
    if len(pred.indices) == 0:
        return {}
    studies = [dataset.records[i].study_uid for i in pred.indices]
    _, study_truth = M.group_max(studies, pred.truth)
    _, study_probs = M.group_max(studies, pred.probs)
    return {
        "images": M.full_report(pred.truth, pred.probs, thresholds),
        "studies": M.full_report(study_truth, study_probs, thresholds),
    }


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the source tree, None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _training_data(index: DataIndex, split: Split) -> str:
    train = [index.records[i] for i in split.train]
    n_phantom = sum(r.phantom for r in train)
    base = f"{len(train)} images"
    if n_phantom == len(train):
        return f"synthetic phantoms (ich-node phantom generator), {base}"
    if n_phantom:
        return f"mixed: {n_phantom} synthetic phantom and {len(train) - n_phantom} real images"
    return f"RSNA 2019 Intracranial Hemorrhage layout, {base}"


def export_bundle(
    path: Path,
    model: ICHClassifier,
    settings: FitSettings,
    *,
    index: DataIndex,
    split: Split,
    pred: Predictions | None,
    val_set: SliceDataset,
    say: Callable[[str], None] = print,
) -> ModelCard:
    """Choose thresholds on validation, compute the card's metrics, write the bundle.

    Thresholds: per label the F1-maximising threshold on the validation images
    (:func:`training.metrics.best_f1_threshold`), 0.5 when validation has no
    positive or no negative of that label (or there is no validation split).
    """
    metrics: dict[str, Any] = {}
    if pred is not None and len(pred.indices):
        thresholds = M.choose_thresholds(pred.truth, pred.probs)
        metrics = {"validation": level_reports(val_set, pred, thresholds)}
    else:
        thresholds = dict.fromkeys(LABELS, 0.5)
        say("warning: no validation split: thresholds are 0.5 and the card has no metrics")
    phantom = any(index.records[i].phantom for i in split.train)
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    commit = git_commit()
    version = settings.version or (
        f"0.1.0+{created:%Y%m%d%H%M%S}" + (f".g{commit[:8]}" if commit else "")
    )
    card = ModelCard(
        name=MODEL_NAME,
        version=version,
        arch=settings.arch,
        input_size=settings.image_size,
        context=settings.context,
        windows=DEFAULT_WINDOWS,
        labels=LABELS,
        thresholds={k: float(v) for k, v in thresholds.items()},
        demo=phantom,
        training_data=_training_data(index, split),
        split=clean(split.describe(index) | {"seed": settings.seed,
                                             "val_fraction": settings.val_fraction}),
        metrics=clean(metrics),
        training=clean(settings.to_dict()),
        git_commit=commit,
        created=created.isoformat(),
    )  # fmt: skip
    card = save_bundle(path, model, card)
    if metrics:
        v = metrics["validation"]
        say(f"validation (thresholds {card.thresholds}): "
            f"image AUC(any) {_fmt(v['images']['roc_auc']['any'])}, "
            f"study AUC(any) {_fmt(v['studies']['roc_auc']['any'])}, "
            f"weighted log loss {v['images']['weighted_log_loss']:.4f}")  # fmt: skip
    say(f"wrote {path} ({card.display_name}, sha256 {card.sha256[:12]}...)")
    return card


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"
