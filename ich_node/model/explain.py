"""Grad-CAM explanations of positive slices (stage 7 of ``architecture.md``).

Grad-CAM (Selvaraju et al., 2017) weights the activations of the classifier's last
convolutional stage (:attr:`ich_node.model.ICHClassifier.target_layer`) by the mean
gradient of a label's logit, sums them and keeps the positive part.

Two implementations give the same maps:

- **CAM shortcut** (``method="cam"``, the default where it holds): our networks end
  in global average pooling and one linear layer, so the mean gradient of logit k
  with respect to feature channel c is ``W[k, c] / (h w)``, and Grad-CAM is the
  class activation map ``ReLU(sum_c W[k, c] A_c)`` (Zhou et al., 2016) up to a
  positive factor that the [0, 1] scaling removes. The classifier computes these
  maps in the inference pass itself (:attr:`ich_node.inference.Prediction.cams`),
  so explaining a slice costs a weighted sum of its maps and a resize: no second
  forward pass, no backward pass. When a prediction does not carry them, one
  forward pass over the explained slices computes them.
- **pytorch-grad-cam** (``method="gradcam"``; ``grad-cam`` on PyPI): forward and
  backward passes with hooks. The reference the tests compare the shortcut to
  (correlation > 0.999), and the path for heads where the shortcut does not hold
  (:func:`ich_node.inference.cam_head` is ``None``).

Both scale each map as pytorch-grad-cam does: ReLU, minus its minimum, divided by
its maximum (plus 1e-7), then a bilinear resize to the input size (OpenCV's in
pytorch-grad-cam; the same filter as a batched tensor operation here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from ich_node.imaging.preprocess import series_reorientation
from ich_node.labels import LABELS
from ich_node.model.heatmaps import with_heatmap_images
from ich_node.model.inference import Classifier, Prediction
from ich_node.results.common import source_header
from ich_node.results.findings import ExplainedSeries, SeriesFindings, SliceExplanation

log = structlog.get_logger(__name__)


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


Method = Literal["auto", "cam", "gradcam"]


def scale_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """pytorch-grad-cam's scaling: ReLU, min-max to [0, 1] per map, bilinear resize.

    The whole batch at once, on ``maps``' device.

    Parameters
    ----------
    maps : torch.Tensor
        (N, h, w) weighted sums of feature maps (any sign).
    size : int
        Output side, pixels (the model input size).

    Returns
    -------
    torch.Tensor
        (N, size, size) float32 in [0, 1]. The resize is OpenCV's ``INTER_LINEAR``
        as pytorch-grad-cam uses it (half-pixel centres, edges clamped), i.e.
        torch's bilinear with ``align_corners=False``.
    """
    m = maps.to(torch.float32).clamp_min(0.0)
    m = m - m.amin(dim=(1, 2), keepdim=True)
    m = m / (1e-7 + m.amax(dim=(1, 2), keepdim=True))
    out = F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return torch.nan_to_num(out, nan=0.0).clamp_(0.0, 1.0)


def _cam_maps(
    cams: torch.Tensor, wanted: Sequence[tuple[int, tuple[str, ...]]], size: int
) -> torch.Tensor:
    """(S, L, h, w) CAMs -> (len(wanted), size, size) maps of each slice's label sum.

    Grad-CAM of a sum of logits is the CAM of the summed weights: the sum of the
    labels' maps (before the ReLU).
    """
    index_of = {label: j for j, label in enumerate(LABELS)}
    weights = torch.zeros((len(wanted), len(LABELS)), dtype=torch.float32)
    for n, (_, labels) in enumerate(wanted):
        for label in labels:
            weights[n, index_of[label]] = 1.0
    rows = torch.as_tensor([i for i, _ in wanted], device=cams.device)
    summed = torch.einsum("nl,nlhw->nhw", weights.to(cams.device), cams[rows].to(torch.float32))
    return scale_maps(summed, size)


def _gradcam_maps(
    prediction: Prediction,
    classifier: Classifier,
    wanted: Sequence[tuple[int, tuple[str, ...]]],
) -> list[np.ndarray]:
    """pytorch-grad-cam's maps (forward and backward per batch), in ``wanted`` order."""
    model = classifier.model
    index_of = {label: j for j, label in enumerate(LABELS)}
    out: list[np.ndarray] = []
    # pytorch-grad-cam hooks the layer; the context manager removes the hooks again.
    # No other thread runs this model meanwhile: explanations are made in the
    # thread that runs the model (see explain_series), never by the encoders.
    with (
        torch.enable_grad(),
        GradCAM(model=model, target_layers=[model.target_layer]) as cam,
    ):
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
            for m in maps:
                m = np.nan_to_num(np.asarray(m, dtype=np.float32), nan=0.0)
                out.append(np.clip(m, 0.0, 1.0))
        # GradCAM leaves gradients on the weights; drop them so memory is not held.
        model.zero_grad(set_to_none=True)
    return out


def explain(
    prediction: Prediction,
    classifier: Classifier,
    *,
    negative_top_slices: int = 0,
    method: Method = "auto",
) -> tuple[SliceExplanation, ...]:
    """Grad-CAM maps for the positive slices of a prediction.

    Parameters
    ----------
    prediction : Prediction
        From :meth:`Classifier.predict_series`; ``prediction.inputs`` is the
        (S, C, size, size) float32 model input in [0, 1], ``prediction.cams`` the
        class activation maps of the inference pass (or ``None``).
    classifier : Classifier
        The classifier that made the prediction; its device runs what is needed,
        in batches of ``classifier.batch_size`` slices.
    negative_top_slices : int
        See :func:`slices_to_explain`.
    method : {"auto", "cam", "gradcam"}
        ``auto``: the CAM shortcut when the classifier's head allows it
        (:attr:`Classifier.computes_cams`), else pytorch-grad-cam. ``cam`` insists
        on the shortcut (``ValueError`` where it does not hold); ``gradcam`` always
        runs pytorch-grad-cam (the reference).

    Returns
    -------
    tuple of SliceExplanation
        One per explained slice, in slice order.
    """
    if method not in ("auto", "cam", "gradcam"):
        raise ValueError(f"method must be 'auto', 'cam' or 'gradcam', got {method!r}")
    wanted = slices_to_explain(prediction.findings, negative_top_slices)
    if not wanted:
        return ()
    shortcut = method != "gradcam" and (prediction.cams is not None or classifier.computes_cams)
    if method == "cam" and not shortcut:
        raise ValueError(
            "method='cam' needs a network ending in global average pooling and one "
            f"linear layer; {classifier.card.arch!r} as loaded does not (use 'auto')"
        )
    size = int(prediction.inputs.shape[-1])
    if shortcut:
        with torch.inference_mode():
            cams = prediction.cams_device
            if cams is None and prediction.cams is not None:
                cams = torch.from_numpy(prediction.cams).to(classifier.device)
            if cams is None:  # e.g. a prediction made without CAMs: one forward pass
                indices = [i for i, _ in wanted]
                _, computed = classifier.predict_images_with_cams(prediction.images[indices])
                assert computed is not None
                cams = torch.zeros((len(prediction.inputs), *computed.shape[1:]))
                cams[indices] = torch.from_numpy(computed)
                cams = cams.to(classifier.device)
            maps = _cam_maps(cams, wanted, size)
    else:  # forward and backward passes: not in inference mode
        maps = torch.from_numpy(np.stack(_gradcam_maps(prediction, classifier, wanted)))
        maps = maps.to(classifier.device)
    # The model input was turned to the reference orientation: turn the maps back,
    # exactly (flips and transposes), so they lie on the source pixels.
    turn = series_reorientation(prediction.series)
    if not turn.identity:
        maps = turn.invert(maps)
    host = maps.cpu().numpy()
    out = tuple(
        SliceExplanation(index=i, labels=labels, cam=host[n])
        for n, (i, labels) in enumerate(wanted)
    )
    log.debug("explain.done", slices=len(out), method="cam" if shortcut else "gradcam")
    return out


def explain_series(
    prediction: Prediction,
    classifier: Classifier,
    *,
    negative_top_slices: int = 0,
    explain_slices: bool = True,
    heatmaps: str = "positive",
    render: bool = True,
) -> ExplainedSeries:
    """The model stage's hand-over to the results stage: plain data, no model.

    Run in the thread that runs the model (the worker's model stage, or
    ``predict``'s loop), so that Grad-CAM's hooks never meet another forward pass
    and the encoders never touch torch.

    Parameters
    ----------
    prediction : Prediction
        From :meth:`Classifier.predict_series` or ``predict_prepared``.
    classifier : Classifier
        The classifier that made it.
    negative_top_slices : int
        See :func:`slices_to_explain`.
    explain_slices : bool
        False when no output needs the maps (no heatmaps, no parametric map).
    heatmaps : {"positive", "all", "none"}
        Which heatmap images to render (``results.heatmaps``): one per explained
        slice, one per slice, none.
    render : bool
        Also render the heatmap images' pixels, for the whole series at once on the
        model's device (:func:`ich_node.model.heatmaps.with_heatmap_images`). The
        worker leaves that to its results thread (``False``), so that the head
        region's CPU work never holds the model.

    Returns
    -------
    ExplainedSeries
        Findings, (S, rows, columns) float32 HU, explanations, the first slice's
        header and (``render``) the heatmap images and the head region.

    Raises
    ------
    OSError, pydicom.errors.InvalidDicomError
        When the first slice's header can no longer be read.
    ValueError
        ``heatmaps`` not one of the three.
    """
    if heatmaps not in ("positive", "all", "none"):
        raise ValueError(f"heatmaps must be 'positive', 'all' or 'none', got {heatmaps!r}")
    explanations = (
        explain(prediction, classifier, negative_top_slices=negative_top_slices)
        if explain_slices
        else ()
    )
    explained = ExplainedSeries(
        series=prediction.series,
        findings=prediction.findings,
        hu=prediction.hu,
        explanations=explanations,
        header=source_header(prediction.series),
    )
    if not render:
        return explained
    return with_heatmap_images(explained, heatmaps, classifier.device, hu=prediction.hu_device)
