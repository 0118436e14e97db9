"""The classifier: a torchvision backbone with a six-logit head.

The network takes (N, C, H, W) float32 windowed images in [0, 1] (see
:func:`ich_node.imaging.preprocess_hu`; C = 3 windows, or 3 + 2 x context with
2.5D slice context, :func:`ich_node.imaging.add_slice_context`) and normalises them
itself with the ImageNet statistics, so training and serving cannot disagree about it.

:class:`SequenceStage` is the optional second stage: a bidirectional GRU over the
CNN's pooled slice embeddings of a whole series (the RSNA 2019 winners' recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

import torch
import torchvision
from torch import nn

from ich_node.labels import LABELS

#: Architectures selectable by name. ``resnext101_32x8d`` is the production network;
#: ``resnet18`` is small enough to train on a CPU for tests and the demo.
ARCHITECTURES: Final[dict[str, Callable[..., nn.Module]]] = {
    "resnext101_32x8d": torchvision.models.resnext101_32x8d,
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
}

_IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
_IMAGENET_STD: Final = (0.229, 0.224, 0.225)

_WEIGHTS_HELP: Final[dict[str, str]] = {
    "resnext101_32x8d": "ResNeXt101_32X8D_Weights.IMAGENET1K_V2 "
    "(https://download.pytorch.org/models/resnext101_32x8d-110c445d.pth)",
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1 "
    "(https://download.pytorch.org/models/resnet18-f37072fd.pth)",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2 "
    "(https://download.pytorch.org/models/resnet50-11ad3fa6.pth)",
}


class PretrainedWeightsError(ValueError):
    """The ImageNet weights file is missing or does not fit the architecture."""


def pretrained_help(arch: str) -> str:
    """Say how to obtain the ImageNet weights for ``arch`` on a machine with internet."""
    name = _WEIGHTS_HELP.get(arch, f"the torchvision ImageNet weights of {arch}")
    return (
        f"ich-node never downloads weights. On a machine with internet, save {name} as a "
        'file, e.g. `python -c "import torch, torchvision; m = torchvision.models.'
        f"{arch}(weights='DEFAULT'); torch.save(m.state_dict(), '{arch}-imagenet.pth')\"`, "
        "copy the file here and pass it with --pretrained PATH."
    )


class ICHClassifier(nn.Module):
    """A torchvision backbone whose ``fc`` layer gives one logit per label.

    Parameters
    ----------
    arch
        A key of :data:`ARCHITECTURES`.
    num_labels
        Number of output logits (six: :data:`ich_node.labels.LABELS`).
    in_channels
        Input channels: 3 (the windows) or 3 + 2 x context (2.5D slice context). The
        first convolution is widened for more than 3 (:func:`widen_first_conv`);
        the extra channels are normalised with the ImageNet statistics of the
        first (red) channel, since they repeat the brain window (channel 0).
    """

    def __init__(self, arch: str, num_labels: int = len(LABELS), in_channels: int = 3) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}",
            )
        if in_channels < 3:
            raise ValueError(f"in_channels must be >= 3, got {in_channels!r}")
        self.arch = arch
        self.in_channels = in_channels
        self.backbone: torchvision.models.ResNet = ARCHITECTURES[arch](weights=None)
        head = self.backbone.fc
        assert isinstance(head, nn.Linear)
        self.embedding_dim = head.in_features
        self.backbone.fc = nn.Linear(head.in_features, num_labels)
        if in_channels != 3:
            widen_first_conv(self.backbone, in_channels)
        extra = in_channels - 3
        mean = _IMAGENET_MEAN + (_IMAGENET_MEAN[0],) * extra
        std = _IMAGENET_STD + (_IMAGENET_STD[0],) * extra
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, in_channels, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, in_channels, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [0, 1] -> (N, num_labels) logits."""
        return self.backbone((images - self.mean) / self.std)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, D, h, w) last-stage feature maps (D = embedding_dim)."""
        b = self.backbone
        x = (images - self.mean) / self.std
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        out: torch.Tensor = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return out

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) in [0, 1] -> (N, D) pooled embeddings and (N, L) logits.

        The embedding is the global-average-pooled last stage, the input of ``fc``:
        what :class:`SequenceStage` reads.
        """
        b = self.backbone
        pooled = torch.flatten(b.avgpool(self.features(images)), 1)
        return pooled, b.fc(pooled)

    @property
    def target_layer(self) -> nn.Module:
        """The last convolutional stage, where Grad-CAM looks (all ResNet-family nets)."""
        layer: nn.Module = self.backbone.layer4[-1]
        return layer


def widen_first_conv(backbone: torchvision.models.ResNet, in_channels: int) -> None:
    """Replace ``conv1`` by one taking ``in_channels`` inputs, keeping its weights' meaning.

    The first three input channels keep their weights; each extra channel gets the
    mean of the three RGB filters, and then all filters are scaled by
    ``3 / in_channels`` so that the layer's response to an image whose channels are
    alike (a CT window repeated) keeps the size ImageNet training gave it. This is
    the usual adaptation of a pretrained stem to more channels (timm's
    ``adapt_input_conv`` does the same with repeated filters). Called on a fresh
    network and again by :func:`load_imagenet_weights` after loading the
    3-channel ImageNet filters.
    """
    old = backbone.conv1
    weight = old.weight.detach()
    if weight.shape[1] == in_channels:
        return
    if weight.shape[1] != 3:
        raise ValueError(f"conv1 has {weight.shape[1]} inputs; widening needs 3")
    conv = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
    )
    with torch.no_grad():
        extra = weight.mean(dim=1, keepdim=True).expand(-1, in_channels - 3, -1, -1)
        conv.weight.copy_(torch.cat([weight, extra], dim=1) * (3.0 / in_channels))
        if old.bias is not None and conv.bias is not None:
            conv.bias.copy_(old.bias)
    backbone.conv1 = conv


def load_imagenet_weights(model: ICHClassifier, path: Path) -> None:
    """Load a torchvision ImageNet state dict (``.pth`` or ``.safetensors``) into the backbone.

    The classification head is left at its fresh initialisation: the 1000-class
    ImageNet ``fc`` does not fit six labels. Files are read with
    ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"--pretrained {path}: no such file. {pretrained_help(model.arch)}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file gets the same clear message
        raise PretrainedWeightsError(
            f"--pretrained {path}: cannot read it as a state dict ({exc}). "
            f"{pretrained_help(model.arch)}"
        ) from None
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"--pretrained {path}: not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if model.in_channels != 3:  # 2.5D: load the RGB stem, then widen it again
        conv1 = state.get("conv1.weight")
        if conv1 is None or conv1.ndim != 4 or conv1.shape[1] != 3:
            raise PretrainedWeightsError(
                f"--pretrained {path}: no 3-channel conv1.weight to widen. "
                f"{pretrained_help(model.arch)}"
            )
        model.backbone.conv1 = nn.Conv2d(
            3, conv1.shape[0], kernel_size=7, stride=2, padding=3, bias=False
        )
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        detail = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise PretrainedWeightsError(
            f"--pretrained {path}: does not fit {model.arch} ({detail}). "
            f"{pretrained_help(model.arch)}"
        ) from None
    finally:
        if model.in_channels != 3:
            widen_first_conv(model.backbone, model.in_channels)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"--pretrained {path}: does not fit {model.arch} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}). "
            f"{pretrained_help(model.arch)}"
        )


def build_model(
    arch: str,
    *,
    num_labels: int = len(LABELS),
    pretrained: Path | None = None,
    in_channels: int = 3,
) -> ICHClassifier:
    """Build the classifier, optionally from local ImageNet weights (never downloaded)."""
    model = ICHClassifier(arch, num_labels, in_channels)
    if pretrained is not None:
        load_imagenet_weights(model, pretrained)
    return model


# ------------------------------------------------------------------ sequence stage


def neighbour_differences(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, S, D) -> (B, S, 3D): each slice's embedding, minus the one below, minus the one above.

    Slices are in spatial order; at the ends the missing neighbour is the slice
    itself (difference 0). Padded positions beyond a series' length must be
    masked by the caller (:class:`SequenceStage` packs the sequences).
    """
    below = torch.cat([embeddings[:, :1], embeddings[:, :-1]], dim=1)
    above = torch.cat([embeddings[:, 1:], embeddings[:, -1:]], dim=1)
    return torch.cat([embeddings, embeddings - below, embeddings - above], dim=-1)


#: What a :class:`SequenceStage` reads per slice (card ``sequence.inputs``).
SEQUENCE_INPUTS: Final = ("embeddings+logits", "logits")


class SequenceStage(nn.Module):
    """Bidirectional GRU over a series' slices: six logits per slice.

    Input per slice, in spatial order: the CNN's logits ``z_s`` with ``z_s - z_{s-1}``
    and ``z_s - z_{s+1}``, and (``inputs="embeddings+logits"``, the default) the CNN's
    pooled embedding ``e_s`` (D floats) with ``e_s - e_{s-1}`` and ``e_s - e_{s+1}``
    (differences to the neighbours, as the 2nd place of RSNA 2019 used), layer-
    normalised. They are projected to ``hidden`` and read by a one-layer
    bidirectional GRU. The output is a **correction added to the CNN's logits**
    (the head starts at zero, so an untrained stage returns the CNN's answer).
    ``inputs="logits"`` leaves the embeddings out: a few thousand parameters, for
    small training sets (the phantom CI test), where a stage reading 3 x D
    numbers per slice memorises its few series.

    Parameters
    ----------
    embedding_dim
        D, the CNN's :attr:`ICHClassifier.embedding_dim` (512 for ResNet-18, 2048 for
        ResNeXt-101).
    hidden
        GRU width per direction.
    num_labels
        Six.
    dropout
        Dropout on the projected input and the GRU output (training only).
    inputs
        One of :data:`SEQUENCE_INPUTS`.
    """

    def __init__(
        self,
        embedding_dim: int,
        hidden: int = 128,
        num_labels: int = len(LABELS),
        dropout: float = 0.3,
        inputs: str = "embeddings+logits",
    ) -> None:
        super().__init__()
        if inputs not in SEQUENCE_INPUTS:
            raise ValueError(f"inputs must be one of {SEQUENCE_INPUTS}, got {inputs!r}")
        self.embedding_dim = embedding_dim
        self.hidden = hidden
        self.inputs = inputs
        self.uses_embeddings = inputs == "embeddings+logits"
        width = 3 * num_labels
        if self.uses_embeddings:
            self.norm = nn.LayerNorm(3 * embedding_dim)
            width += 3 * embedding_dim
        self.project = nn.Linear(width, hidden)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden + num_labels, num_labels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(
        self,
        embeddings: torch.Tensor,
        cnn_logits: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-slice logits of whole series.

        Parameters
        ----------
        embeddings
            (B, S, D) float, slices in spatial order (inferior -> superior), zero-padded
            after each series' end (unused with ``inputs="logits"``).
        cnn_logits
            (B, S, L) float, the CNN's logits of the same slices.
        lengths
            (B,) int64 slices per series; ``None``: all ``S``.

        Returns
        -------
        torch.Tensor
            (B, S, L) float32 logits: ``cnn_logits + correction``. Padded positions
            hold the CNN's logits unchanged.
        """
        b, s, _ = cnn_logits.shape
        device = cnn_logits.device
        if lengths is None:
            lengths = torch.full((b,), s, dtype=torch.int64)
        idx = torch.arange(s, device=device)
        last = (lengths.to(device) - 1).clamp(min=0)
        # the last real slice's "above" neighbour is itself, not the padding
        at_end = (idx[None, :] == last[:, None])[..., None]

        def diffs(x: torch.Tensor) -> torch.Tensor:
            f = neighbour_differences(x.float())
            n = x.shape[-1]
            return torch.cat([f[..., : 2 * n], torch.where(at_end, 0.0, f[..., 2 * n :])], -1)

        parts = [diffs(cnn_logits)]
        if self.uses_embeddings:
            parts.insert(0, self.norm(diffs(embeddings)))
        x = self.drop(torch.relu(self.project(torch.cat(parts, dim=-1))))
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.gru(packed)
        seq, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=s)
        correction = self.head(torch.cat([self.drop(seq), cnn_logits.float()], dim=-1))
        valid = (idx[None, :] < lengths.to(device)[:, None])[..., None]
        return cnn_logits.float() + torch.where(valid, correction, 0.0)
