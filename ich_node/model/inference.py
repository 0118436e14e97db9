"""Batched inference of a bundle on CT series.

Used by ``ich-node predict`` and by the node's worker alike. The images a series
is classified on come from :func:`ich_node.imaging.preprocess_hu`, the same function
training uses.

Speed (measured in ``docs/performance.md``):

- slices are classified in batches of ``batch_size``; while one batch runs on the
  device, a background thread decodes and preprocesses the next one;
- ``precision="auto"`` runs bf16 autocast on CUDA; ``precision="bf16"`` does the
  same on CPUs with native bf16 (AVX512-BF16 or AMX), about twice as fast as fp32
  there (opt-in: see :func:`resolve_precision`);
- channels-last memory format (CUDA and CPU);
- ``compile=True`` wraps the network in :func:`torch.compile`; :meth:`Classifier.warmup`
  pays the compilation once at worker start, and batches are padded to
  ``batch_size`` so that one graph serves every series;
- for a network ending in global average pooling and a linear layer (the ResNet
  family of :mod:`ich_node.model.networks`), the same forward pass that gives the
  probabilities also gives each label's class activation map (the label's ``fc``
  weights applied to the last stage's feature maps). For such a head Grad-CAM
  equals this CAM up to a positive factor, so :mod:`ich_node.model.explain` needs no
  second pass (see :func:`cam_head`);
- a bundle with 2.5D slice context (card ``context``) gets its neighbour channels
  from :func:`ich_node.imaging.add_slice_context`, the function training uses; each
  batch of slices is decoded with ``context`` extra slices on each side so that
  neighbours across batch borders are the real ones (edges replicate);
- a two-stage bundle (card ``stages``: cnn, sequence) runs the CNN batch by batch,
  keeping each slice's pooled embedding and logits, then the
  :class:`ich_node.model.SequenceStage` once over the whole series in spatial order;
  the findings carry the sequence stage's probabilities. Heatmaps stay the CNN's
  class activation maps: they show where on a slice the CNN saw evidence, not how
  the sequence stage weighed the neighbouring slices;
- ``tta=True`` classifies every image and its left-right mirror and averages the
  logits and embeddings (the mirrored CAMs are flipped back and averaged).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import structlog
import torch
import torchvision
from torch import nn

from ich_node.imaging import CTSeries, ImagingError, load_series_hu, preprocess_hu
from ich_node.imaging.pixels import check_hu_plausible
from ich_node.imaging.preprocess import add_slice_context, context_channels, model_hu
from ich_node.model.bundle import Bundle
from ich_node.model.slice_cache import SliceCache, SliceRow, input_digest
from ich_node.results.findings import ModelInfo, SeriesFindings, Thresholds, summarise

log = structlog.get_logger(__name__)

Precision = Literal["auto", "fp32", "bf16"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), per oneDNN."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """``auto``: bf16 on CUDA, fp32 on the CPU; ``fp32`` and ``bf16`` as named.

    bf16 on the CPU is about twice as fast where the CPU computes bf16 natively
    (:func:`cpu_has_native_bf16`; measured in ``docs/performance.md``) but moves
    probabilities by about 1e-2 from the fp32 reference that evaluation and
    ``ich-node predict`` use, so a CPU deployment opts in with ``bf16``. Without
    native support bf16 is emulated and slower than fp32: a warning says so.
    """
    if name not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {name!r}")
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("classifier.bf16_emulated", detail="this CPU has no native bf16: slower")
    return "bf16" if name == "bf16" else "fp32"


def cam_head(model: nn.Module) -> nn.Linear | None:
    """The linear head when the CAM shortcut holds for ``model``, else ``None``.

    It holds when the network is ``fc(flatten(avgpool(layer4(...))))`` with a
    global average pool and a single linear layer: then the gradient of logit k
    with respect to the last stage's feature map c is ``W[k, c] / (h w)`` at every
    position, so Grad-CAM's channel weights are the ``fc`` weights (up to the
    positive factor ``1 / (h w)``, which the [0, 1] normalisation removes) and
    Grad-CAM equals CAM (Zhou et al., 2016). Any other head (an MLP, attention
    pooling) returns ``None`` and is explained with pytorch-grad-cam.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, torchvision.models.ResNet):
        return None
    pool, fc = backbone.avgpool, backbone.fc
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
        return None
    if not isinstance(fc, nn.Linear):
        return None
    if getattr(model, "target_layer", None) is not backbone.layer4[-1]:
        return None
    return fc


class _LogitsAndCams(nn.Module):
    """``ICHClassifier.forward``, also returning each label's class activation map.

    The stages are torchvision's ``ResNet._forward_impl``, called one by one so
    that the last stage's features stay at hand; written out rather than hooked
    so that :func:`torch.compile` sees one plain graph.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, H, W) in [0, 1] -> (N, L) logits, (N, L, h, w) float32 CAMs, (N, D) embeddings."""
        m: Any = self.model
        b = m.backbone
        x = (images - m.mean) / m.std
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        features = b.layer4(b.layer3(b.layer2(b.layer1(x))))  # (N, C, h, w)
        pooled = torch.flatten(b.avgpool(features), 1)
        logits = b.fc(pooled)
        # fp32 even under autocast (which would run the einsum's bmm in bf16): the
        # (L, C) x (N, C, h, w) product is a few kFLOP per pixel.
        with torch.autocast(images.device.type, enabled=False):
            cams = torch.einsum("lc,nchw->nlhw", b.fc.weight.float(), features.float())
        return logits, cams, pooled


class _LogitsAndEmbeddings(nn.Module):
    """``ICHClassifier.embed`` as a module returning (logits, embeddings), for torch.compile."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, logits = self.model.embed(images)  # type: ignore[operator]
        return logits, pooled


@dataclass(frozen=True, slots=True)
class SliceOutputs:
    """The CNN stage's outputs for a run of slices (numpy, on the CPU).

    Attributes
    ----------
    logits : numpy.ndarray
        (S, L) float32 CNN logits.
    embeddings : numpy.ndarray
        (S, D) float32 pooled last-stage features (the sequence stage's input).
    cams : numpy.ndarray or None
        (S, L, h, w) float32 class activation maps, or None (see :func:`cam_head`).
    """

    logits: np.ndarray
    embeddings: np.ndarray
    cams: np.ndarray | None


@dataclass(frozen=True, slots=True)
class Prediction:
    """A series' findings with the arrays they came from (for explanations and rendering).

    ``cams`` holds, per slice and label, the class activation map computed in the
    inference pass (``fc`` weights x last-stage features, before ReLU and scaling),
    or ``None`` when the network's head does not allow the shortcut
    (:func:`cam_head`); :func:`ich_node.explain.explain` then runs Grad-CAM.
    """

    series: CTSeries
    findings: SeriesFindings
    hu: np.ndarray  # (S, H, W) float32 HU, series order
    images: np.ndarray  # (S, C, size, size) float32 in [0, 1], model input (reference orientation)
    cams: np.ndarray | None = None  # (S, L, h, w) float32, h = w = size / 32 for ResNets
    cnn_probabilities: np.ndarray | None = None  # (S, L) the CNN stage alone (two-stage bundles)


class Classifier:
    """A loaded bundle on a device, ready to classify slices in batches.

    Parameters
    ----------
    bundle
        A verified bundle from :func:`ich_node.bundle.load_bundle`.
    device
        ``auto``, ``cpu`` or ``cuda``.
    batch_size
        Slices per forward pass.
    precision
        ``auto`` (bf16 autocast on CUDA, fp32 on the CPU), ``fp32`` or ``bf16``
        (see :func:`resolve_precision`).
    compile
        Wrap the network in :func:`torch.compile`; call :meth:`warmup` at start so the
        first study does not pay for the compilation.
    cams
        Compute class activation maps in the inference pass when the head allows
        it (:func:`cam_head`).
    prefetch
        Decode the next batches' slices in background threads during the forward pass.
    decode_threads
        Threads decoding ahead; 0: one on the CPU (the forward pass needs the cores),
        ``min(4, cores / 2)`` with CUDA, where decoding is the slower side.
    channels_last
        NHWC memory format; ``None``: yes (cuDNN's bf16 and oneDNN's fp32 and bf16
        convolutions all ran faster in it, ``docs/performance.md``).
    tta
        Test-time augmentation: classify each image and its left-right mirror and
        average logits and embeddings (twice the CNN's time). Recorded in the
        findings (``model.tta``) and the SR's text.
    sequence
        Run the bundle's sequence stage when it has one (``False``: the CNN alone,
        e.g. to compare the stages).
    thresholds
        The site's thresholds (``model.thresholds``: label -> value in (0, 1]) that
        replace the bundle's for the labels named; the findings say which came from
        where (:class:`ich_node.results.findings.Thresholds`).

    Raises
    ------
    ValueError
        For a bad ``batch_size``, ``decode_threads`` or site threshold.

    Notes
    -----
    One thread runs a classifier's model: the worker's model stage makes both the
    predictions and the Grad-CAM maps (:func:`ich_node.explain.explain_series`),
    and the encoders get plain arrays. pytorch-grad-cam's hooks on the shared
    model would otherwise see another thread's forward pass, so no lock is needed
    as long as that holds.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        batch_size: int = 16,
        precision: str = "auto",
        compile: bool = False,
        cams: bool = True,
        prefetch: bool = True,
        channels_last: bool | None = None,
        decode_threads: int = 0,
        tta: bool = False,
        sequence: bool = True,
        thresholds: Mapping[str, float] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        self.card = bundle.card
        self.thresholds = Thresholds.resolve(self.card.thresholds, thresholds)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        self.prefetch = prefetch
        if decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0, got {decode_threads!r}")
        if decode_threads == 0:
            cores = os.cpu_count() or 1
            decode_threads = 1 if self.device.type == "cpu" else max(1, min(4, cores // 2))
        self.decode_threads = decode_threads
        if channels_last is None:
            channels_last = True
        self.channels_last = channels_last
        self.model = bundle.model.to(self.device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels
        self.context = self.card.context
        self.in_channels = context_channels(self.card.windows, self.context)
        self.tta = bool(tta)
        self.sequence = (
            bundle.sequence.to(self.device).eval() if sequence and bundle.sequence else None
        )
        self.cam_head = cam_head(self.model) if cams else None
        net: nn.Module = (
            _LogitsAndCams(self.model)
            if self.cam_head is not None
            else _LogitsAndEmbeddings(self.model)
        )
        self.compiled = compile
        self._net: Any = torch.compile(net) if compile else net
        # Forward passes are padded to at least this many slices: kernels are chosen by
        # shape (oneDNN takes another path for one image, cuDNN picks per batch size),
        # so padding is what makes a slice's outputs the same in any batch
        # (fix_batch_numerics; the streaming read relies on it, ich_node.model.slice_cache).
        self.min_batch = 1
        self.info = ModelInfo(
            name=self.card.name,
            version=self.card.version,
            arch=self.card.arch,
            sha256=self.card.sha256,
            demo=self.card.demo,
            stages=("cnn", "sequence") if self.sequence is not None else ("cnn",),
            tta=self.tta,
        )

    @property
    def computes_cams(self) -> bool:
        """Whether predictions carry class activation maps (see :func:`cam_head`)."""
        return self.cam_head is not None

    def _autocast(self) -> torch.autocast | nullcontext[None]:
        # bf16: same decisions for this task, about twice the speed (GPU and bf16 CPUs).
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def batches(self, images: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start index, (B, C, H, W) tensor on the device) batches."""
        for start in range(0, len(images), self.batch_size):
            yield start, self._to_device(images[start : start + self.batch_size])

    def _to_device(self, images: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        n = len(batch)
        # compile: one shape, one compiled graph. min_batch: a slice's outputs do not
        # depend on how many slices share its forward pass (see min_batch).
        size = self.batch_size if self.compiled else self.min_batch
        if n < size:
            pad = batch.new_zeros((size - n, *batch.shape[1:]))
            batch = torch.cat([batch, pad])
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self._net(batch)
        if len(out) == 3:
            logits, cams, pooled = out
        else:
            (logits, pooled), cams = out, None
        return (
            logits[:n].float(),
            None if cams is None else cams[:n].float(),
            pooled[:n].float(),
        )

    @torch.inference_mode()
    def _outputs(self, batch: torch.Tensor) -> SliceOutputs:
        """(B, C, H, W) on the device -> the CNN's logits, embeddings and CAMs (TTA applied)."""
        logits, cams, pooled = self._run(batch)
        if self.tta:
            f_logits, f_cams, f_pooled = self._run(batch.flip(-1))
            logits = (logits + f_logits) / 2
            pooled = (pooled + f_pooled) / 2
            if cams is not None and f_cams is not None:
                cams = (cams + f_cams.flip(-1)) / 2
        return SliceOutputs(
            logits=logits.cpu().numpy(),
            embeddings=pooled.cpu().numpy(),
            cams=None if cams is None else cams.cpu().numpy(),
        )

    def _forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, C, H, W) on the device -> (B, L) CNN probabilities, (B, L, h, w) CAMs or None."""
        out = self._outputs(batch)
        return _sigmoid(out.logits), out.cams

    def outputs(
        self,
        images: np.ndarray,
        cache: SliceCache | None = None,
        *,
        keys: Sequence[bytes] | None = None,
    ) -> SliceOutputs:
        """The CNN's outputs for one batch of slices, reusing those already in ``cache``.

        Parameters
        ----------
        images : numpy.ndarray
            (B, C, H, W) float32 in [0, 1], at most ``batch_size`` slices.
        cache : SliceCache, optional
            Outputs by input digest (:func:`ich_node.model.slice_cache.input_digest`):
            slices found there are not run again, the others are run and added.
        keys : sequence of bytes, optional
            The slices' digests when the caller has them already.

        Returns
        -------
        SliceOutputs
            (B, L) logits, (B, D) embeddings, (B, L, h, w) CAMs or None, in the
            order of ``images``.
        """
        if cache is None:
            return self._outputs(self._to_device(images))
        if keys is None:
            keys = [input_digest(image) for image in images]
        rows: list[SliceRow | None] = [cache.get(key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            run = self._outputs(self._to_device(images[missing]))
            for j, i in enumerate(missing):
                row = SliceRow(
                    run.logits[j], run.embeddings[j], None if run.cams is None else run.cams[j]
                )
                cache.put(keys[i], row)
                rows[i] = row
        return _stack_rows([r for r in rows if r is not None], len(self.card.labels))

    def fix_batch_numerics(self) -> int:
        """Choose :attr:`min_batch` so that a slice's outputs do not depend on its batch.

        On CUDA every forward pass is padded to ``batch_size`` (cuDNN picks its
        kernels per shape; a padded pass costs the GPU about the same). On the CPU,
        where padding costs time, two random slices are run in a batch of 2 and in
        one of ``min(batch_size, 5)``: when their outputs are bitwise equal (oneDNN
        takes its one-image path only for a single image), ``min_batch`` is 2,
        else ``batch_size``. Returns the value chosen.
        """
        if self.device.type != "cpu" or self.batch_size <= 2:
            self.min_batch = self.batch_size
            return self.min_batch
        size = self.card.input_size
        images = np.random.default_rng(0).random(
            (min(self.batch_size, 5), self.in_channels, size, size), dtype=np.float32
        )
        self.min_batch = 2
        two = self._outputs(self._to_device(images[:2]))
        more = self._outputs(self._to_device(images))
        pairs = [(two.logits, more.logits), (two.embeddings, more.embeddings)]
        if two.cams is not None and more.cams is not None:
            pairs.append((two.cams, more.cams))
        same = all(np.array_equal(a, b[:2]) for a, b in pairs)
        self.min_batch = 2 if same else self.batch_size
        log.info("classifier.batch_numerics", min_batch=self.min_batch, pid=os.getpid())
        return self.min_batch

    def _check_images(self, images: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have shape (S, {self.in_channels}, H, W), got {images.shape}"
            )

    def cnn_outputs(self, images: np.ndarray) -> SliceOutputs:
        """(S, C, H, W) float32 in [0, 1] -> the CNN stage's :class:`SliceOutputs` (in batches)."""
        self._check_images(images)
        parts = [self._outputs(batch) for _, batch in self.batches(images)]
        return _concat_outputs(parts, len(self.card.labels))

    @torch.inference_mode()
    def sequence_logits(self, outputs: SliceOutputs) -> np.ndarray:
        """The sequence stage over one whole series: (S, L) float32 logits.

        ``outputs`` are the CNN's, for **all** slices of one series in spatial order.
        Without a sequence stage, the CNN's logits.
        """
        if self.sequence is None or len(outputs.logits) == 0:
            return outputs.logits
        emb = torch.from_numpy(outputs.embeddings).to(self.device)[None]
        logits = torch.from_numpy(outputs.logits).to(self.device)[None]
        out: np.ndarray = self.sequence(emb, logits)[0].float().cpu().numpy()
        return out

    def predict_images_with_cams(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(S, C, H, W) float32 in [0, 1] -> (S, L) **CNN** probabilities, (S, L, h, w) CAMs.

        Slices are classified one by one (no sequence stage: the images need not be a
        series). CAMs are None when the head does not allow them.
        """
        out = self.cnn_outputs(images)
        return _sigmoid(out.logits), out.cams

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """(S, C, H, W) float32 in [0, 1] -> (S, 6) float32 CNN probabilities."""
        return self.predict_images_with_cams(images)[0]

    def prepare(self, series: CTSeries) -> tuple[np.ndarray, np.ndarray]:
        """Decode and preprocess a series: (S, H, W) HU and (S, C, size, size) model input.

        With slice context the neighbours are this run of slices' own (the ends
        replicate): :meth:`prepared_batches` passes runs with the extra slices.
        """
        hu = load_series_hu(series)
        # The model sees one patient orientation; ``hu`` stays as stored (heatmaps).
        images = preprocess_hu(model_hu(series, hu), self.card.windows, self.card.input_size)
        return hu, add_slice_context(images, self.context)

    def prepare_run(self, series: CTSeries, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Slices ``start..end-1`` of ``series``: (S, H, W) HU and (S, C, size, size) input.

        Decoded with up to ``context`` real neighbours on each side, so that each
        slice's input is what :meth:`prepared_batches` gives it in the whole
        ``series`` (only the series' own ends replicate).
        """
        lo, hi = max(0, start - self.context), min(len(series.slices), end + self.context)
        hu, images = self.prepare(replace(series, slices=series.slices[lo:hi]))
        keep = slice(start - lo, end - lo)
        return hu[keep], images[keep]

    def _prepare_chunk(self, series: CTSeries, start: int) -> tuple[np.ndarray, np.ndarray]:
        return self.prepare_run(series, start, min(len(series.slices), start + self.batch_size))

    def prepared_batches(self, series: CTSeries) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(HU, images) per batch of slices, decoded ahead in ``decode_threads`` threads.

        :meth:`predict_series` consumes it; the worker runs it in its reader thread,
        so that the next series decodes while this one is on the device.
        """
        starts = list(range(0, len(series.slices), self.batch_size))
        if not self.prefetch or len(starts) < 2:
            for start in starts:
                yield self._prepare_chunk(series, start)
            return
        # numpy, pydicom's pixel copy and torch's resize release the GIL for much of
        # their time, as does the forward pass: threads overlap decoding with it.
        ahead = self.decode_threads + 1
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:
            pending: deque[Future[tuple[np.ndarray, np.ndarray]]] = deque(
                pool.submit(self._prepare_chunk, series, start) for start in starts[:ahead]
            )
            for start in starts[ahead:]:
                ready = pending.popleft().result()
                pending.append(pool.submit(self._prepare_chunk, series, start))
                yield ready
            while pending:
                yield pending.popleft().result()

    def predict_series(self, series: CTSeries) -> Prediction:
        """Classify every slice of ``series`` and summarise the series."""
        if not series.slices:
            raise ImagingError(f"series {series.series_instance_uid}: no slices")
        return self.predict_prepared(series, self.prepared_batches(series))

    def predict_prepared(
        self,
        series: CTSeries,
        batches: Iterable[tuple[np.ndarray, np.ndarray]],
        cache: SliceCache | None = None,
    ) -> Prediction:
        """Classify ``series`` from its (HU, images) batches, in slice order.

        ``batches`` is :meth:`prepared_batches` of the series, possibly produced in
        another thread (the worker's reader). With ``cache`` (the series' streaming
        read, :mod:`ich_node.model.slice_cache`), the CNN runs only on the slices
        whose input it does not hold; everything else is as without it.
        """
        hus: list[np.ndarray] = []
        inputs: list[np.ndarray] = []
        parts: list[SliceOutputs] = []
        for hu, images in batches:
            if hus and hu.shape[1:] != hus[0].shape[1:]:
                raise ImagingError(
                    f"series {series.series_instance_uid}: matrix {hu.shape[1:]} differs "
                    f"from {hus[0].shape[1:]} in one series"
                )
            hus.append(hu)
            inputs.append(images)
            parts.append(self.outputs(images, cache))
        if not parts:
            raise ImagingError(f"series {series.series_instance_uid}: no slices")
        hu_all = np.concatenate(hus)
        # A head CT's HU, or a refusal: never a confident answer on nonsense values.
        check_hu_plausible(hu_all, f"series {series.series_instance_uid}")
        outputs = _concat_outputs(parts, len(self.card.labels))
        findings, cnn_probabilities = self._summary(series, outputs)
        return Prediction(
            series=series,
            findings=findings,
            hu=hu_all,
            images=np.concatenate(inputs),
            cams=outputs.cams,
            cnn_probabilities=cnn_probabilities,
        )

    def _summary(
        self, series: CTSeries, outputs: SliceOutputs
    ) -> tuple[SeriesFindings, np.ndarray]:
        """The findings from the slices' CNN outputs, and the CNN's (S, L) probabilities."""
        cnn_probabilities = _sigmoid(outputs.logits)
        # Two stages: the sequence model reads the whole series in spatial order.
        probabilities = (
            _sigmoid(self.sequence_logits(outputs))
            if self.sequence is not None
            else cnn_probabilities
        )
        findings = summarise(
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            sop_instance_uids=tuple(s.sop_instance_uid for s in series.slices),
            positions_mm=tuple(s.position_mm for s in series.slices),
            probabilities=probabilities,
            thresholds=self.thresholds,
            model=self.info,
            source=series,
        )
        return findings, cnn_probabilities

    def findings_of(self, series: CTSeries, rows: Sequence[SliceRow]) -> SeriesFindings:
        """Findings of ``series`` from each slice's CNN outputs (:class:`SliceRow`, in order).

        What :meth:`predict_prepared` does after the CNN (the sequence stage over
        the slices in spatial order, the series summary), for the streaming read's
        slices received so far (:mod:`ich_node.service.stream_stage`).

        Raises
        ------
        ValueError
            When ``rows`` is not one row per slice.
        """
        if len(rows) != len(series.slices) or not rows:
            raise ValueError(
                f"rows must hold one row per slice ({len(series.slices)}), got {len(rows)}"
            )
        return self._summary(series, _stack_rows(list(rows), len(self.card.labels)))[0]

    def warmup(self) -> float:
        """Run one full batch of zeros (compiles the graph, picks kernels); returns seconds.

        Call once when the worker starts so the first study is not slower than the rest.
        On the CPU without ``compile`` it only costs time and is skipped.
        """
        if not self.compiled and self.device.type == "cpu":
            return 0.0
        import time

        size = self.card.input_size
        started = time.perf_counter()
        zeros = np.zeros((self.batch_size, self.in_channels, size, size), np.float32)
        self._forward(self._to_device(zeros))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        log.info("classifier.warm", seconds=round(seconds, 2), pid=os.getpid())
        return seconds


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    """(..., L) float logits -> float32 probabilities (torch's sigmoid, as training uses)."""
    return torch.sigmoid(torch.from_numpy(np.asarray(logits, np.float32))).numpy()


def _stack_rows(rows: list[SliceRow], labels: int) -> SliceOutputs:
    """Per-slice rows as one :class:`SliceOutputs`, in order."""
    if not rows:
        return SliceOutputs(np.empty((0, labels), np.float32), np.empty((0, 0), np.float32), None)
    cams = [r.cams for r in rows if r.cams is not None]
    return SliceOutputs(
        logits=np.stack([r.logits for r in rows]),
        embeddings=np.stack([r.embedding for r in rows]),
        cams=np.stack(cams) if len(cams) == len(rows) else None,
    )


def _concat_outputs(parts: list[SliceOutputs], labels: int) -> SliceOutputs:
    if not parts:
        return SliceOutputs(np.empty((0, labels), np.float32), np.empty((0, 0), np.float32), None)
    cams = [p.cams for p in parts if p.cams is not None]
    return SliceOutputs(
        logits=np.concatenate([p.logits for p in parts]),
        embeddings=np.concatenate([p.embeddings for p in parts]),
        cams=np.concatenate(cams) if len(cams) == len(parts) else None,
    )
