"""Grad-CAM explanations of positive slices (stage 7 of ``architecture.md``).

Grad-CAM (Selvaraju et al., 2017) weights the activations of the classifier's last
convolutional stage (:attr:`ich_node.model.ICHClassifier.target_layer`) by the mean
gradient of a label's logit. We use pytorch-grad-cam (``grad-cam`` on PyPI): it is
maintained, handles the hooks and their release, batches several images per call and
returns maps already scaled to [0, 1] at the input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from ich_node.findings import SeriesFindings
from ich_node.inference import Classifier, Prediction
from ich_node.labels import LABELS

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SliceExplanation:
    """The Grad-CAM map of one slice.

    Attributes
    ----------
    index : int
        Slice index in series order (``prediction.series.slices``).
    labels : tuple of str
        The labels whose logits were explained (in :data:`LABELS` order).
    cam : numpy.ndarray
        (H, W) float32 in [0, 1] at the model input size; 1 is the region that
        raises the explained logits most.
    """

    index: int
    labels: tuple[str, ...]
    cam: np.ndarray


class _SumOfLogits:
    """Grad-CAM target: the sum of several labels' logits of one image."""

    def __init__(self, categories: Sequence[int]) -> None:
        self.categories = list(categories)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        if model_output.ndim == 1:
            return model_output[self.categories].sum()
        return model_output[:, self.categories].sum(dim=1)


def slices_to_explain(
    findings: SeriesFindings, negative_top_slices: int = 0
) -> list[tuple[int, tuple[str, ...]]]:
    """Which slices to explain, and for which labels.

    A slice is explained for the subtypes that are positive both on the series
    and on that slice. A slice positive for ``any`` but for no positive subtype
    is explained for ``any``. A negative series (``any`` below its threshold)
    gets its ``negative_top_slices`` slices with the highest ``any`` probability,
    explained for ``any``, so a reader can see what the model looked at.

    Parameters
    ----------
    findings : SeriesFindings
        The series' findings.
    negative_top_slices : int
        Slices to explain in a negative series; 0 explains none.

    Returns
    -------
    list of (int, tuple of str)
        (slice index, labels) in slice order.
    """
    if negative_top_slices < 0:
        raise ValueError(f"negative_top_slices must be >= 0, got {negative_top_slices!r}")
    chosen: dict[int, tuple[str, ...]] = {}
    if findings.series["any"].positive:
        positive = [label for label in LABELS[1:] if findings.series[label].positive]
        by_slice: dict[int, list[str]] = {}
        for label in positive:
            for i in findings.positive_slices(label):
                by_slice.setdefault(i, []).append(label)
        for i in findings.positive_slices("any"):
            by_slice.setdefault(i, ["any"])
        chosen = {i: tuple(labels) for i, labels in by_slice.items()}
    elif negative_top_slices > 0:
        p_any = np.array([s.probabilities["any"] for s in findings.slices], dtype=np.float64)
        order = np.argsort(-p_any, kind="stable")[:negative_top_slices]
        chosen = {int(i): ("any",) for i in order}
    return sorted(chosen.items())


def explain(
    prediction: Prediction,
    classifier: Classifier,
    *,
    negative_top_slices: int = 0,
) -> tuple[SliceExplanation, ...]:
    """Grad-CAM maps for the positive slices of a prediction.

    Parameters
    ----------
    prediction : Prediction
        From :meth:`Classifier.predict_series`; ``prediction.images`` is the
        (S, 3, size, size) float32 model input in [0, 1].
    classifier : Classifier
        The classifier that made the prediction; its device runs Grad-CAM, in
        batches of ``classifier.batch_size`` slices.
    negative_top_slices : int
        See :func:`slices_to_explain`.

    Returns
    -------
    tuple of SliceExplanation
        One per explained slice, in slice order.
    """
    wanted = slices_to_explain(prediction.findings, negative_top_slices)
    if not wanted:
        return ()
    model = classifier.model
    index_of = {label: j for j, label in enumerate(LABELS)}
    out: list[SliceExplanation] = []
    # pytorch-grad-cam hooks the layer; the context manager removes the hooks again.
    with torch.enable_grad(), GradCAM(model=model, target_layers=[model.target_layer]) as cam:
        for start in range(0, len(wanted), classifier.batch_size):
            chunk = wanted[start : start + classifier.batch_size]
            indices = [i for i, _ in chunk]
            images = np.ascontiguousarray(prediction.images[indices], dtype=np.float32)
            batch = torch.from_numpy(images).to(classifier.device)
            targets = [
                ClassifierOutputTarget(index_of[labels[0]])
                if len(labels) == 1
                else _SumOfLogits([index_of[label] for label in labels])
                for _, labels in chunk
            ]
            maps = cam(input_tensor=batch, targets=targets)  # (B, H, W) float32 in [0, 1]
            for (i, labels), m in zip(chunk, maps, strict=True):
                m = np.nan_to_num(np.asarray(m, dtype=np.float32), nan=0.0)
                out.append(SliceExplanation(index=i, labels=labels, cam=np.clip(m, 0.0, 1.0)))
    # GradCAM leaves gradients on the weights; drop them so memory is not held.
    model.zero_grad(set_to_none=True)
    log.debug("explain.done", slices=len(out))
    return tuple(out)
