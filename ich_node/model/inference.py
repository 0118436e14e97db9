"""Batched inference of a bundle on CT series.

Used by ``ich-node predict`` and by the node's worker alike. The images a series
is classified on come from :func:`ich_node.imaging.preprocess_hu`, the same function
training uses.

Speed (measured in ``docs/performance.md``):

- slices are parsed and decoded to their stored integers in a pool of
  ``decode_threads`` threads (:class:`ich_node.imaging.decode.DecodePool`), a few
  batches ahead; everything after (HU, orientation, windows, resize, slice context)
  runs as tensor operations on the model's device (:mod:`ich_node.imaging.tensors`,
  the same functions training runs on the CPU); slices are classified in batches of
  ``batch_size``, and the outputs stay on the device until the series' last batch;
- ``precision="auto"`` runs bf16 autocast on CUDA; ``precision="bf16"`` does the
  same on CPUs with native bf16 (AVX512-BF16 or AMX), about twice as fast as fp32
  there (opt-in: see :func:`resolve_precision`);
- channels-last memory format (CUDA and CPU);
- ``compile=True`` wraps the network in :func:`torch.compile` (``dynamic=False``);
  :meth:`Classifier.warmup` pays the compilation once at worker start, and batches
  are padded to ``batch_size`` (also on a GPU without compile, for cuDNN's kernel
  choice) so that one graph serves every series;
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog
import torch
import torchvision
from torch import nn

from ich_node.imaging import CTSeries, CTSlice, ImagingError
from ich_node.imaging.decode import DEFAULT_KIND, DecodePool, PoolKind
from ich_node.imaging.orientation import Reorientation
from ich_node.imaging.pixels import check_hu_counts
from ich_node.imaging.preprocess import context_channels, series_reorientation
from ich_node.imaging.series import check_matrix, decode_slice
from ich_node.imaging.tensors import (
    CPU_CHUNK,
    add_slice_context,
    counts_record,
    empty_large,
    hu_counts,
    one_torch_thread,
    prepare_slices,
)
from ich_node.model.bundle import Bundle
from ich_node.model.slice_cache import SliceCache, SliceRow, input_digest
from ich_node.results.findings import ModelInfo, SeriesFindings, Thresholds, summarise

log = structlog.get_logger(__name__)

Precision = Literal["auto", "fp32", "bf16"]


#: Slices a CPU worker preprocesses in one turn before their forward passes
#: (:meth:`Classifier.prepared_batches`): at 512 px, 1 GiB of HU and model input.
CPU_TURN_SLICES = 256


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
class _DeviceOutputs:
    """:class:`SliceOutputs` still on the model's device (float32 tensors)."""

    logits: torch.Tensor
    embeddings: torch.Tensor
    cams: torch.Tensor | None

    def numpy(self) -> SliceOutputs:
        return SliceOutputs(
            logits=self.logits.cpu().numpy(),
            embeddings=self.embeddings.cpu().numpy(),
            cams=None if self.cams is None else self.cams.cpu().numpy(),
        )


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A batch of consecutive slices, preprocessed on the model's device.

    Made by :meth:`Classifier.prepared_batches` (in the worker's reader thread),
    consumed by :meth:`Classifier.predict_prepared` (the model thread).

    Attributes
    ----------
    hu : torch.Tensor
        (B, H, W) float32 HU, source orientation, on the model's device.
    images : torch.Tensor
        (B, C, size, size) float32 in [0, 1], the model input (reference
        orientation, slice context included), on the model's device.
    counts : torch.Tensor
        (4,) int64 voxel counts of ``hu`` for the plausibility check
        (:func:`ich_node.imaging.tensors.hu_counts`).
    series_hu : torch.Tensor or None
        (S, H, W) HU of the whole series, filled batch by batch (``hu`` is a view of
        it): complete once the last batch is made, so the series' HU are never
        concatenated (a copy of a whole series, ~1 MB a slice).
    """

    hu: torch.Tensor
    images: torch.Tensor
    counts: torch.Tensor
    series_hu: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class _Unit:
    """A few consecutive slices decoded and preprocessed by a CPU pool thread (no context)."""

    images: torch.Tensor  # (n, C, size, size) float32
    counts: torch.Tensor  # (n, 4) int64 per-slice counts (ich_node.imaging.tensors.hu_counts)


@dataclass(frozen=True, slots=True)
class Prediction:
    """A series' findings with the arrays they came from (for explanations and rendering).

    ``cams`` holds, per slice and label, the class activation map computed in the
    inference pass (``fc`` weights x last-stage features, before ReLU and scaling),
    or ``None`` when the network's head does not allow the shortcut
    (:func:`cam_head`); :func:`ich_node.model.explain.explain` then runs Grad-CAM.
    The ``*_device`` tensors are the same arrays on the model's device, where the
    model stage renders the heatmaps (:mod:`ich_node.model.heatmaps`).
    """

    series: CTSeries
    findings: SeriesFindings
    hu: np.ndarray  # (S, H, W) float32 HU, series order
    inputs: torch.Tensor  # (S, C, size, size) float32 in [0, 1], model input, on the device
    cams: np.ndarray | None = None  # (S, L, h, w) float32, h = w = size / 32 for ResNets
    cnn_probabilities: np.ndarray | None = None  # (S, L) the CNN stage alone (two-stage bundles)
    hu_device: torch.Tensor | None = None  # ``hu`` on the model's device
    cams_device: torch.Tensor | None = None  # ``cams`` on the model's device

    @property
    def images(self) -> np.ndarray:
        """(S, C, size, size) float32 in [0, 1]: the model input, on the CPU (a copy from a GPU)."""
        out: np.ndarray = self.inputs.cpu().numpy()
        return out


class Classifier:
    """A loaded bundle on a device, ready to classify slices in batches.

    Parameters
    ----------
    bundle
        A verified bundle from :func:`ich_node.model.bundle.load_bundle`.
    device
        ``auto``, ``cpu`` or ``cuda``.
    batch_size
        Slices per forward pass.
    precision
        ``auto`` (bf16 autocast on CUDA, fp32 on the CPU), ``fp32`` or ``bf16``
        (see :func:`resolve_precision`).
    compile
        Wrap the network in :func:`torch.compile`; call :meth:`warmup` at start so the
        first study does not pay for the compilation. Every batch is padded to
        ``batch_size`` (padded outputs dropped): one graph for every series length.
    cams
        Compute class activation maps in the inference pass when the head allows
        it (:func:`cam_head`).
    prefetch
        Decode the next slices in the decode pool during the forward pass (False:
        decode each batch in the calling thread, one slice after the other).
    decode_threads
        Size of the decode pool (:class:`ich_node.imaging.decode.DecodePool`); 0:
        the cores this process may use.
    decode_pool
        ``thread`` or ``process`` (:data:`ich_node.imaging.decode.DEFAULT_KIND`).
        The headers are parsed in ``header_pool``, ``decode_threads`` processes
        (the decode pool itself when it is one), started at the first series read
        with it (``read_series(paths, pool=classifier.header_pool)``).
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
    compile_backend
        :func:`torch.compile`'s backend (``inductor``; tests count recompilations
        with ``eager``).

    Raises
    ------
    ValueError
        For a bad ``batch_size``, ``decode_threads`` or site threshold.

    Notes
    -----
    The slices' integers are decoded in the pool on the CPU; everything after
    (HU, orientation, windows, resize, slice context) runs on the model's device
    (:mod:`ich_node.imaging.tensors`), in the thread that iterates
    :meth:`prepared_batches`. One thread runs a classifier's model: the worker's
    model stage makes both the predictions and the Grad-CAM maps
    (:func:`ich_node.model.explain.explain_series`), and the encoders get plain
    arrays. pytorch-grad-cam's hooks on the shared model would otherwise see
    another thread's forward pass, so no lock is needed as long as that holds.
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
        decode_pool: PoolKind = DEFAULT_KIND,
        tta: bool = False,
        sequence: bool = True,
        thresholds: Mapping[str, float] | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        self.card = bundle.card
        self.thresholds = Thresholds.resolve(self.card.thresholds, thresholds)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.pool = DecodePool(decode_threads, decode_pool)  # started at the first series
        self.decode_threads = self.pool.workers
        # Headers parse in processes whatever decodes the pixels (pydicom's parser holds
        # the GIL): read_series(paths, pool=classifier.header_pool).
        self.header_pool = (
            self.pool if decode_pool == "process" else DecodePool(decode_threads, "process")
        )
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
        # One input shape (dynamic=False; partial batches are padded, see _run): the
        # graph compiled at warm-up serves every series, whatever its length.
        self._net: Any = (
            torch.compile(net, dynamic=False, backend=compile_backend) if compile else net
        )
        # Padding also spares cuDNN's autotuning (cudnn.benchmark) a new batch size
        # per series length on a GPU; on the CPU, eager batches are padded to
        # min_batch only.
        self.pads_batches = compile or self.device.type == "cuda"
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

    def close(self) -> None:
        """Stop the decode and header pools (a later series starts them again)."""
        self.pool.close()
        self.header_pool.close()

    def _autocast(self) -> torch.autocast | nullcontext[None]:
        # bf16: same decisions for this task, about twice the speed (GPU and bf16 CPUs).
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def batches(self, images: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start index, (B, C, H, W) tensor on the device) batches."""
        for start in range(0, len(images), self.batch_size):
            yield start, self._to_device(images[start : start + self.batch_size])

    def _to_device(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            batch = images.to(self.device, dtype=torch.float32, non_blocking=True)
        else:
            batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        n = len(batch)
        # Compiled or on a GPU: one shape, one graph, one kernel choice. min_batch: a
        # slice's outputs do not depend on how many slices share its forward pass.
        size = self.batch_size if self.pads_batches else self.min_batch
        if n < size:
            pad = batch.new_zeros((size - n, *batch.shape[1:]))
            batch = torch.cat([batch, pad])
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
        if self.compiled and not batch.is_inference():
            # The graph's guards tell inference tensors (what the device preprocessing
            # makes) from ordinary ones: every batch is one, or it would compile twice.
            batch = batch.clone()
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
    def _device_outputs(self, batch: torch.Tensor) -> _DeviceOutputs:
        """(B, C, H, W) on the device -> the CNN's logits, embeddings and CAMs (TTA
        applied), still on the device: nothing waits for the device here."""
        logits, cams, pooled = self._run(batch)
        if self.tta:
            f_logits, f_cams, f_pooled = self._run(batch.flip(-1))
            logits = (logits + f_logits) / 2
            pooled = (pooled + f_pooled) / 2
            if cams is not None and f_cams is not None:
                cams = (cams + f_cams.flip(-1)) / 2
        return _DeviceOutputs(logits=logits, embeddings=pooled, cams=cams)

    def _outputs(self, batch: torch.Tensor) -> SliceOutputs:
        """(B, C, H, W) on the device -> the CNN's outputs as numpy."""
        return self._device_outputs(batch).numpy()

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

        The same path as :meth:`predict_series` (:meth:`prepared_batches`), gathered
        and copied to the CPU.
        """
        batches = list(self.prepared_batches(series))
        hu = torch.cat([b.hu for b in batches]).cpu().numpy()
        return hu, torch.cat([b.images for b in batches]).cpu().numpy()

    def prepare_run(self, series: CTSeries, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Slices ``start..end-1`` of ``series``: (S, H, W) HU and (S, C, size, size) input.

        Decoded with up to ``context`` real neighbours on each side and preprocessed
        as :meth:`prepared_batches` does (the same functions, on the model's device),
        so that each slice's input is what it gets in the whole ``series`` (only the
        series' own ends replicate); returned on the CPU.
        """
        n = len(series.slices)
        if not 0 <= start < end <= n:
            raise ValueError(f"slices {start}..{end} are not a run of {n}")
        lo, hi = max(0, start - self.context), min(n, end + self.context)
        turn = series_reorientation(series)
        decoded = [
            f.result() for f in [self._in_pool(decode_slice, s) for s in series.slices[lo:hi]]
        ]
        with torch.inference_mode():
            hu, images = prepare_slices(
                decoded,
                self.card.windows,
                self.card.input_size,
                device=self.device,
                turn=turn,
                context=self.context,
            )
        keep = slice(start - lo, end - lo)
        return hu[keep].cpu().numpy(), images[keep].cpu().numpy()

    def _in_pool(self, task: Any, *args: Any) -> Future[Any]:
        """``task(*args)`` in the decode pool, or now in this thread without prefetch."""
        if self.prefetch:
            return self.pool.run(task, *args)
        done: Future[Any] = Future()
        try:
            done.set_result(task(*args))
        except Exception as exc:
            done.set_exception(exc)
        return done

    def _prepare_unit(
        self, slices: Sequence[CTSlice], turn: Reorientation, hu_out: torch.Tensor
    ) -> _Unit:
        """A pool task on the CPU: decode a few slices and preprocess them, one torch
        thread (the pool's threads share the cores with the model's); their HU go
        into ``hu_out``, a view of the series' HU."""
        decoded = [decode_slice(s) for s in slices]
        with one_torch_thread(), torch.inference_mode():
            hu, images = prepare_slices(
                decoded, self.card.windows, self.card.input_size, turn=turn, hu_out=hu_out
            )
            return _Unit(images=images, counts=hu_counts(hu, per_slice=True))

    def prepared_batches(self, series: CTSeries) -> Iterator[PreparedBatch]:
        """The series in batches of ``batch_size`` slices, preprocessed on the model's device.

        Slices are decoded in the decode pool, a few batches ahead of the one being
        preprocessed (each slice once, also when the slice context needs it in two
        batches); each batch then becomes HU and model input on the device
        (:func:`ich_node.imaging.tensors.prepare_slices`), its slice context from the
        real neighbours across batch borders. On the CPU with a thread pool, the pool's
        threads also preprocess, a few slices per task with one torch thread each, and
        they take turns with the forward passes: up to :data:`CPU_TURN_SLICES` slices
        are preprocessed on all the cores before the first of their batches is given
        out (both at once stalled the model's OpenMP threads: docs/performance.md).

        :meth:`predict_series` consumes it; the worker runs it in its reader thread,
        so that the next batches are decoded and preprocessed while this one is on
        the device.

        Raises
        ------
        ImagingError
            No slices, slices of different matrices, or a slice that cannot be
            decoded (:func:`ich_node.imaging.series.decode_slice`); SeriesRefused
            as :func:`~ich_node.imaging.tensors.stored_to_hu`.
        """
        check_matrix(series)
        slices, n, ctx = series.slices, len(series.slices), self.context
        turn = series_reorientation(series)
        in_pool = self.device.type == "cpu" and self.pool.kind == "thread" and self.prefetch
        unit = CPU_CHUNK if in_pool else 1  # slices per pool task
        # Slices in flight: enough for every decoder to have two, and the next batch.
        ahead = max(2 * self.pool.workers * unit, self.batch_size) + self.batch_size + 2 * ctx
        if in_pool:
            # On the CPU the pool's threads and the model's take turns for the cores:
            # up to CPU_TURN_SLICES slices are preprocessed at once, then the forward
            # passes run on them with no preprocessing beside (measured faster than
            # both at once, which stalled the model's OpenMP threads: performance.md).
            ahead = max(ahead, CPU_TURN_SLICES)
        pending: dict[int, Future[Any]] = {}  # unit index -> its task
        submitted = 0
        with torch.inference_mode():
            series_hu = empty_large(  # in huge pages on the CPU: 4x cheaper first touch
                (n, slices[0].rows, slices[0].columns), torch.float32, self.device
            )

        def task(k: int) -> Future[Any]:
            part = slices[k * unit : (k + 1) * unit]
            if in_pool:
                out = series_hu[k * unit : k * unit + len(part)]
                return self._in_pool(self._prepare_unit, part, turn, out)
            return self._in_pool(decode_slice, part[0])

        try:
            for start in range(0, n, self.batch_size):
                end = min(n, start + self.batch_size)
                lo, hi = max(0, start - ctx), min(n, end + ctx)
                while submitted * unit < min(n, hi + ahead):
                    pending[submitted] = task(submitted)
                    submitted += 1
                first, last = lo // unit, (hi - 1) // unit
                if in_pool:  # this turn's preprocessing ends before the forward passes
                    for future in list(pending.values()):
                        future.result()
                done = [pending[k].result() for k in range(first, last + 1)]
                for k in [k for k in pending if (k + 1) * unit <= end - ctx]:  # not needed again
                    del pending[k]
                keep = slice(start - lo, end - lo)
                with torch.inference_mode():
                    if in_pool:
                        cut = slice(lo - first * unit, hi - first * unit)
                        images = add_slice_context(torch.cat([u.images for u in done])[cut], ctx)
                        counts = torch.cat([u.counts for u in done])[cut][keep].sum(dim=0)
                    else:
                        hu, images = prepare_slices(
                            done,
                            self.card.windows,
                            self.card.input_size,
                            device=self.device,
                            turn=turn,
                            context=ctx,
                        )
                        series_hu[start:end].copy_(hu[keep])
                        counts = hu_counts(hu[keep])
                    batch = PreparedBatch(
                        hu=series_hu[start:end],
                        images=images[keep],
                        counts=counts,
                        series_hu=series_hu,
                    )
                yield batch
        finally:
            for f in pending.values():
                f.cancel()

    def predict_series(self, series: CTSeries) -> Prediction:
        """Classify every slice of ``series`` and summarise the series."""
        if not series.slices:
            raise ImagingError(f"series {series.series_instance_uid}: no slices")
        return self.predict_prepared(series, self.prepared_batches(series))

    def predict_prepared(
        self,
        series: CTSeries,
        batches: Iterable[PreparedBatch],
        cache: SliceCache | None = None,
    ) -> Prediction:
        """Classify ``series`` from its :class:`PreparedBatch` es, in slice order.

        ``batches`` is :meth:`prepared_batches` of the series, possibly produced in
        another thread (the worker's reader). The outputs stay on the device until
        the last batch: one wait for the device per series, not per batch. With
        ``cache`` (the series' streaming read, :mod:`ich_node.model.slice_cache`), the
        CNN runs only on the slices whose input it does not hold (the inputs are
        then copied to the CPU to be hashed); everything else is as without it.
        """
        hus: list[torch.Tensor] = []
        inputs: list[torch.Tensor] = []
        parts: list[_DeviceOutputs] = []
        counts: torch.Tensor | None = None
        for batch in batches:
            if hus and batch.hu.shape[1:] != hus[0].shape[1:]:
                raise ImagingError(
                    f"series {series.series_instance_uid}: matrix {tuple(batch.hu.shape[1:])} "
                    f"differs from {tuple(hus[0].shape[1:])} in one series"
                )
            hus.append(batch.hu)
            inputs.append(batch.images)
            counts = batch.counts if counts is None else counts + batch.counts
            if cache is None:
                parts.append(self._device_outputs(self._to_device(batch.images)))
            else:
                got = self.outputs(batch.images.cpu().numpy(), cache)
                parts.append(
                    _DeviceOutputs(
                        logits=torch.from_numpy(got.logits),
                        embeddings=torch.from_numpy(got.embeddings),
                        cams=None if got.cams is None else torch.from_numpy(got.cams),
                    )
                )
        if not parts or counts is None:
            raise ImagingError(f"series {series.series_instance_uid}: no slices")
        # A head CT's HU, or a refusal: never a confident answer on nonsense values.
        check_hu_counts(counts_record(counts), f"series {series.series_instance_uid}")
        with torch.inference_mode():
            whole = batch.series_hu  # the last batch's: complete now
            if whole is not None and sum(len(h) for h in hus) == len(whole):
                hu_device = whole
            else:
                hu_device = torch.cat(hus)
            device_cams = (
                torch.cat([p.cams for p in parts])  # type: ignore[misc]
                if all(p.cams is not None for p in parts)
                else None
            )
            outputs = _DeviceOutputs(
                logits=torch.cat([p.logits for p in parts]),
                embeddings=torch.cat([p.embeddings for p in parts]),
                cams=device_cams,
            ).numpy()
            hu_all = hu_device.cpu().numpy()
        findings, cnn_probabilities = self._summary(series, outputs)
        return Prediction(
            series=series,
            findings=findings,
            hu=hu_all,
            inputs=torch.cat(inputs),
            cams=outputs.cams,
            cnn_probabilities=cnn_probabilities,
            hu_device=hu_device,
            cams_device=device_cams,
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
        """Run every input shape once (compiles the graph, picks kernels); returns seconds.

        Call once when the worker starts so the first study is not slower than the
        rest. With padded batches (compiled, or on a GPU) there is one shape: a full
        batch of zeros (with TTA its mirror too, the same shape). On the CPU without
        ``compile`` it only costs time and is skipped.
        """
        if not self.pads_batches:
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
