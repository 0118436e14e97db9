"""The model bundle: one safetensors file with the weights and a model card.

The card travels in the safetensors header metadata (key ``ich_node.model_card``,
JSON) and records everything serving needs to reproduce training's view of an
image: architecture, input size, windows, label order, per-label thresholds.
It also carries the SHA-256 of the weights, so a tampered or truncated file is
refused. safetensors holds raw tensors only: loading a bundle never unpickles.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# The card itself is torch-free (ich_node.card) so the results stage can read it.
from ich_node.card import DEMO_NOTICE as DEMO_NOTICE
from ich_node.card import FORMAT_VERSION as FORMAT_VERSION
from ich_node.card import INTENDED_USE as INTENDED_USE
from ich_node.card import BundleError as BundleError
from ich_node.card import ModelCard as ModelCard
from ich_node.labels import LABELS
from ich_node.model import ARCHITECTURES, ICHClassifier

CARD_KEY: Final = "ich_node.model_card"


@dataclass(frozen=True, slots=True)
class Bundle:
    """A verified bundle: the card and the model with its weights (on the CPU, eval mode)."""

    path: Path
    card: ModelCard
    model: ICHClassifier


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_bundle(path: Path, model: ICHClassifier, card: ModelCard) -> ModelCard:
    """Write ``model`` and ``card`` to ``path`` atomically; return the card with its sha256."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if card.arch != model.arch:
        raise ValueError(f"card.arch is {card.arch!r} but the model is {model.arch!r}")
    if tuple(card.labels) != LABELS:
        raise ValueError(f"card.labels must be {LABELS}, got {card.labels!r}")
    card = replace(card, sha256=weights_sha256(state))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={CARD_KEY: card.to_json()})
    tmp.replace(path)
    return card


def read_card(path: Path) -> ModelCard:
    """Read only the model card (no weights), e.g. for ``--help`` output or checks."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such model bundle")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise BundleError(f"{path}: not a safetensors model bundle ({exc})") from None
    if CARD_KEY not in metadata:
        raise BundleError(f"{path}: has no ich-node model card ({CARD_KEY} missing)")
    try:
        card = ModelCard.from_json(metadata[CARD_KEY])
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path}: the model card is unreadable: {exc}") from None
    if card.format_version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format {card.format_version} is not supported "
            f"(this ich-node reads format {FORMAT_VERSION})"
        )
    return card


def load_bundle(path: Path) -> Bundle:
    """Load and verify a bundle.

    Raises
    ------
    BundleError
        When the file is missing or not a bundle, the weights' checksum differs
        from the card (tampered or corrupted), or the weights do not fit the
        card's architecture and labels.
    """
    path = Path(path)
    card = read_card(path)
    if card.arch not in ARCHITECTURES:
        raise BundleError(f"{path}: unknown architecture {card.arch!r} in the model card")
    if tuple(card.labels) != LABELS:
        raise BundleError(f"{path}: labels {card.labels} differ from this node's {LABELS}")
    if set(card.thresholds) != set(LABELS):
        raise BundleError(f"{path}: thresholds must name each of {LABELS}")
    try:
        state: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                state[key] = handle.get_tensor(key)
    except Exception as exc:
        raise BundleError(f"{path}: the weights cannot be read ({exc})") from None
    actual = weights_sha256(state)
    if actual != card.sha256:
        raise BundleError(
            f"{path}: the weights' SHA-256 {actual[:12]}... does not match the model card's "
            f"{card.sha256[:12]}...: the file was modified or corrupted; refusing to load it"
        )
    model = ICHClassifier(card.arch, len(card.labels))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(f"{path}: the weights do not fit {card.arch}: {first}") from None
    model.eval()
    return Bundle(path=path, card=card, model=model)
