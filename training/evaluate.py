"""``ich-train evaluate``: a bundle's metrics on a labelled dataset, per image and per study.

Images are read and preprocessed with the bundle's windows and input size
(:class:`training.data.SliceDataset`, i.e. :func:`ich_node.imaging.preprocess_hu`)
and classified by :class:`ich_node.inference.Classifier`, the node's own inference.
A study's label and probability are the maxima over its slices. Thresholds are the
bundle's. For a two-stage bundle the report has both stages side by side
(``stages``: ``cnn`` and ``cnn+sequence``): the CNN's outputs of every slice, then
the sequence stage over each series in spatial order, as the node runs them.
Metric definitions: :mod:`training.metrics` and ``docs/training.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from torch.utils.data import DataLoader

from ich_node.labels import LABELS
from ich_node.model.bundle import load_bundle
from ich_node.model.inference import Classifier, SliceOutputs
from training import metrics as M
from training.data import SliceDataset, build_index, collate_skip_none, read_study_list

log = structlog.get_logger(__name__)

#: Published ResNeXt-101 results we compare with (averaging not stated there).
REFERENCE: dict[str, float] = {
    "accuracy": 0.919,
    "f1": 0.777,
    "jaccard": 0.729,
    "recall": 0.805,
    "precision": 0.891,
}


def evaluate_bundle(
    bundle: Path,
    images: Path,
    labels: Path,
    out: Path,
    *,
    studies: Path | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 32,
    device: str = "auto",
    workers: int = 0,
    tta: bool = False,
) -> dict[str, Any]:
    """Evaluate ``bundle`` and write ``out`` (JSON) and the same name with ``.md``.

    Parameters
    ----------
    bundle : pathlib.Path
        A model bundle (``model.safetensors``).
    images, labels : pathlib.Path
        RSNA-layout data (:func:`training.data.build_index`).
    out : pathlib.Path
        The JSON report; the Markdown table goes to ``out.with_suffix(".md")``.
    studies : pathlib.Path or None
        Keep only these StudyInstanceUIDs (one per line), e.g. the
        ``val_studies`` of a run's ``split.json`` written out as a list.
    cache_dir : pathlib.Path or None
        Index cache (and preprocessed slices) folder.

    Returns
    -------
    dict
        The report: ``bundle`` (name, version, sha256, thresholds), ``data``
        (counts, skipped images), ``images`` and ``studies`` (each a
        :func:`training.metrics.full_report`, of the served output: the sequence
        stage's for a two-stage bundle), ``stages`` (two-stage bundles: ``cnn`` and
        ``cnn+sequence``, each with ``images`` and ``studies``) and ``reference``.
    """
    b = load_bundle(Path(bundle))
    index = build_index(Path(images), Path(labels), cache_dir=cache_dir)
    records = list(index.records)
    if studies is not None:
        keep = read_study_list(Path(studies))
        records = [r for r in records if r.study_uid in keep]
        if not records:
            raise ValueError(f"--studies {studies}: none of its studies is in the data")
    dataset = SliceDataset(
        records, b.card.windows, b.card.input_size, cache_dir=cache_dir, context=b.card.context
    )
    classifier = Classifier(b, device=device, batch_size=batch_size, tta=tta)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip_none
    )
    idx_parts, outputs = [], []
    for batch, _, idx in loader:
        if len(batch):
            outputs.append(classifier.cnn_outputs(batch.numpy()))
            idx_parts.append(idx.numpy())
    if not idx_parts:
        raise ValueError(f"{images}: no image could be decoded")
    indices = np.concatenate(idx_parts)
    logits = np.concatenate([o.logits for o in outputs])
    embeddings = np.concatenate([o.embeddings for o in outputs])
    cnn_probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    probs = cnn_probs
    if classifier.sequence is not None:
        # the sequence stage over each series, slices in spatial order (index order)
        seq_logits = np.empty_like(logits)
        by_series: dict[str, list[int]] = {}
        for row, i in enumerate(indices):
            by_series.setdefault(records[int(i)].series_uid, []).append(row)
        for rows in by_series.values():
            r = np.asarray(rows)
            seq_logits[r] = classifier.sequence_logits(SliceOutputs(logits[r], embeddings[r], None))
        probs = 1 / (1 + np.exp(-seq_logits.astype(np.float64)))
    truth = np.asarray([records[i].labels for i in indices], dtype=np.float64)
    undecodable = sorted(set(range(len(records))) - set(indices.tolist()))
    thresholds = dict(b.card.thresholds)
    study_keys = [records[i].study_uid for i in indices]
    _, study_truth = M.group_max(study_keys, truth)
    _, study_probs = M.group_max(study_keys, probs)
    report: dict[str, Any] = {
        "bundle": {
            "path": str(bundle),
            "name": b.card.display_name,
            "version": b.card.version,
            "arch": b.card.arch,
            "sha256": b.card.sha256,
            "thresholds": thresholds,
            "stages": list(b.card.stages),
            "context": b.card.context,
            "tta": tta,
        },
        "data": {
            "images": str(images),
            "labels": str(labels),
            "n_images": len(indices),
            "n_studies": len(set(study_keys)),
            "n_patients": len({records[i].patient_id for i in indices}),
            "skipped": [list(s) for s in index.skipped]
            + [[records[i].image_id, "undecodable pixel data"] for i in undecodable],
        },
        "images": M.full_report(truth, probs, thresholds),
        "studies": M.full_report(study_truth, study_probs, thresholds),
        "reference": {"model": "ResNeXt-101 (published)", **REFERENCE},
    }
    if classifier.sequence is not None:
        cnn_thresholds = dict(b.card.sequence.get("cnn_thresholds", thresholds))
        _, cnn_study = M.group_max(study_keys, cnn_probs)
        report["stages"] = {
            "cnn": {
                "thresholds": cnn_thresholds,
                "images": M.full_report(truth, cnn_probs, cnn_thresholds),
                "studies": M.full_report(study_truth, cnn_study, cnn_thresholds),
            },
            "cnn+sequence": {
                "thresholds": thresholds,
                "images": report["images"],
                "studies": report["studies"],
            },
        }
    report = _clean(report)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    return report


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: summary table (images, studies, reference) and per-label AUC."""
    lines = [
        f"# Evaluation of {report['bundle']['name']}",
        "",
        f"Data: {report['data']['n_images']} images, {report['data']['n_studies']} studies, "
        f"{report['data']['n_patients']} patients ({len(report['data']['skipped'])} skipped). "
        "Study label and probability = max over its slices. Thresholds from the bundle.",
        "",
        "| metric | averaging | images | studies | published ResNeXt-101 |",
        "|---|---|---|---|---|",
    ]
    img, std = report["images"], report["studies"]
    lines.append(
        f"| accuracy | label-wise (1 - Hamming loss) | {_pct(img['accuracy'])} "
        f"| {_pct(std['accuracy'])} | {_pct(REFERENCE['accuracy'])} |"
    )
    lines.append(
        f"| exact match | all 6 labels right | {_pct(img['exact_match'])} "
        f"| {_pct(std['exact_match'])} | |"
    )
    for name in ("f1", "jaccard", "recall", "precision"):
        for avg in ("macro", "micro", "samples"):
            ref = _pct(REFERENCE[name]) if avg == "macro" else ""
            lines.append(
                f"| {name} | {avg} | {_pct(img[name][avg])} | {_pct(std[name][avg])} | {ref} |"
            )
    lines.append(
        f"| RSNA weighted log loss | per image, any x2 | {img['weighted_log_loss']:.4f} "
        f"| {std['weighted_log_loss']:.4f} | |"
    )
    lines += ["", "| label | AUC images | AUC studies | F1 images | F1 studies | threshold |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for label in LABELS:
        auc_i, auc_s = img["roc_auc"][label], std["roc_auc"][label]
        lines.append(
            f"| {label} | {'n/a' if auc_i is None else f'{auc_i:.3f}'} "
            f"| {'n/a' if auc_s is None else f'{auc_s:.3f}'} "
            f"| {_pct(img['f1']['per_label'][label])} | {_pct(std['f1']['per_label'][label])} "
            f"| {report['bundle']['thresholds'][label]:.3f} |"
        )
    if report.get("stages"):
        lines += ["", "CNN alone and CNN + sequence stage, side by side (same images):", "",
                  "| metric | CNN images | CNN + sequence images | CNN studies "
                  "| CNN + sequence studies |", "|---|---|---|---|---|"]  # fmt: skip
        a, b = report["stages"]["cnn"], report["stages"]["cnn+sequence"]
        lines.append(
            f"| RSNA weighted log loss | {a['images']['weighted_log_loss']:.4f} "
            f"| {b['images']['weighted_log_loss']:.4f} | {a['studies']['weighted_log_loss']:.4f} "
            f"| {b['studies']['weighted_log_loss']:.4f} |"
        )
        cells = {
            "accuracy": lambda r: _pct(r["accuracy"]),
            "F1 macro": lambda r: _pct(r["f1"]["macro"]),
            "AUC any": lambda r: (
                "n/a" if r["roc_auc"]["any"] is None else f"{r['roc_auc']['any']:.3f}"
            ),
        }
        for name, cell in cells.items():
            lines.append(
                f"| {name} | {cell(a['images'])} | {cell(b['images'])} | {cell(a['studies'])} "
                f"| {cell(b['studies'])} |"
            )
    return "\n".join(lines) + "\n"
