"""The classifier: a torchvision backbone with a six-logit head.

The network takes (N, 3, H, W) float32 windowed images in [0, 1] (see
:func:`ich_node.imaging.preprocess_hu`) and normalises them itself with the
ImageNet statistics, so training and serving cannot disagree about it.
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
    """

    def __init__(self, arch: str, num_labels: int = len(LABELS)) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}",
            )
        self.arch = arch
        self.backbone: torchvision.models.ResNet = ARCHITECTURES[arch](weights=None)
        head = self.backbone.fc
        assert isinstance(head, nn.Linear)
        self.backbone.fc = nn.Linear(head.in_features, num_labels)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] -> (N, num_labels) logits."""
        return self.backbone((images - self.mean) / self.std)

    @property
    def target_layer(self) -> nn.Module:
        """The last convolutional stage, where Grad-CAM looks (all ResNet-family nets)."""
        layer: nn.Module = self.backbone.layer4[-1]
        return layer


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
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        detail = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise PretrainedWeightsError(
            f"--pretrained {path}: does not fit {model.arch} ({detail}). "
            f"{pretrained_help(model.arch)}"
        ) from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"--pretrained {path}: does not fit {model.arch} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}). "
            f"{pretrained_help(model.arch)}"
        )


def build_model(
    arch: str, *, num_labels: int = len(LABELS), pretrained: Path | None = None
) -> ICHClassifier:
    """Build the classifier, optionally from local ImageNet weights (never downloaded)."""
    model = ICHClassifier(arch, num_labels)
    if pretrained is not None:
        load_imagenet_weights(model, pretrained)
    return model
