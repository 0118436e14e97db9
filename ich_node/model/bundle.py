"""The model bundle: one safetensors file with the weights and a model card.

The card travels in the safetensors header metadata (key ``ich_node.model_card``,
JSON) and records everything serving needs to reproduce training's view of an
image: architecture, input size, windows, label order, per-label thresholds.
It also carries the SHA-256 of the weights, so a tampered or truncated file is
refused. safetensors holds raw tensors only: loading a bundle never unpickles.

:func:`check_bundle` verifies a file without torch (the serving process, which
never imports torch, checks the bundle before it touches storage or listens);
:func:`load_bundle` runs the same checks and then builds the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

# The card itself is torch-free (ich_node.card) so the results stage can read it.
from ich_node.card import DEMO_NOTICE as DEMO_NOTICE
from ich_node.card import FORMAT_VERSION as FORMAT_VERSION
from ich_node.card import INTENDED_USE as INTENDED_USE
from ich_node.card import BundleError as BundleError
from ich_node.card import ModelCard as ModelCard
from ich_node.labels import LABELS

if TYPE_CHECKING:  # torch is imported where weights are handled, never by check_bundle
    import torch

    from ich_node.model.networks import ICHClassifier, SequenceStage

CARD_KEY: Final = "ich_node.model_card"
#: Prefix of the sequence stage's tensor names in a two-stage bundle.
SEQUENCE_PREFIX: Final = "sequence."
#: The stage lists a card may name.
STAGE_LISTS: Final = (("cnn",), ("cnn", "sequence"))
#: Architectures a card may name (the keys of :data:`ich_node.model.ARCHITECTURES`,
#: repeated here so that checking a bundle needs no torch; a test keeps them equal).
ARCHITECTURE_NAMES: Final = ("resnext101_32x8d", "resnet18", "resnet50")
#: How an admin gets a bundle; every "bad bundle" message ends with it.
BUNDLE_HELP: Final = (
    "Train one with `ich-train fit ... --out DIR` (it writes DIR/model.safetensors; "
    "docs/training.md, section 4 'Deploying the bundle to the node'), or run `make demo` "
    "for a DEMO bundle (demo/model/model.safetensors, not for clinical use)."
)
#: What to do when the file is there but this process may not read it.
ACCESS_HELP: Final = (
    "The bundle itself may be fine: let the user the node runs as read the file and "
    "enter every folder above it (e.g. `chmod a+r FILE` and `chmod a+x` on the folders, "
    "or give them the node's group), then run check-config again."
)


def bundle_help(exc: BundleError) -> str:
    """The advice that fits ``exc``: its own (e.g. file access), else how to get a bundle."""
    return exc.advice or BUNDLE_HELP


def _unreadable(path: Path, exc: OSError) -> BundleError:
    """The BundleError of an OSError met while reading ``path``, by kind."""
    if isinstance(exc, PermissionError):
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a uid without a passwd entry (containers)
            user = f"uid {os.geteuid()}"
        return BundleError(
            f"{path}: permission denied: user {user} may not read the file or enter a "
            "folder above it",
            advice=ACCESS_HELP,
        )
    return BundleError(
        f"{path}: cannot be read ({exc.strerror or type(exc).__name__})",
        advice="The file system reported an error: check the disk, or copy the bundle again.",
    )


#: safetensors dtype codes and the torch dtype names the checksum uses.
_DTYPE_NAMES: Final = {
    "BOOL": "torch.bool",
    "U8": "torch.uint8",
    "I8": "torch.int8",
    "I16": "torch.int16",
    "U16": "torch.uint16",
    "I32": "torch.int32",
    "U32": "torch.uint32",
    "I64": "torch.int64",
    "U64": "torch.uint64",
    "F16": "torch.float16",
    "BF16": "torch.bfloat16",
    "F32": "torch.float32",
    "F64": "torch.float64",
    "F8_E4M3": "torch.float8_e4m3fn",
    "F8_E5M2": "torch.float8_e5m2",
}
#: A safetensors header is at most 100 MB (the format's own limit).
_MAX_HEADER: Final = 100_000_000


@dataclass(frozen=True, slots=True)
class Bundle:
    """A verified bundle: the card and the model with its weights (on the CPU, eval mode).

    ``sequence`` is the second stage when the card names it, else ``None``.
    """

    path: Path
    card: ModelCard
    model: ICHClassifier
    sequence: SequenceStage | None = None


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_bundle(
    path: Path,
    model: ICHClassifier,
    card: ModelCard,
    sequence: SequenceStage | None = None,
) -> ModelCard:
    """Write ``model`` (and ``sequence``) and ``card`` to ``path`` atomically.

    The CNN's tensors keep their names; the sequence stage's are prefixed with
    :data:`SEQUENCE_PREFIX`, and the card's ``stages`` and ``sequence`` say so.
    Returns the card as written (with its sha256).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if sequence is not None:
        for k, v in sequence.state_dict().items():
            state[SEQUENCE_PREFIX + k] = v.detach().to("cpu").contiguous()
        card = replace(
            card,
            stages=("cnn", "sequence"),
            sequence={
                **card.sequence,
                "kind": "bigru",
                "embedding_dim": sequence.embedding_dim,
                "hidden": sequence.hidden,
                "inputs": sequence.inputs,
                "key_prefix": SEQUENCE_PREFIX,
            },
        )
    else:
        card = replace(card, stages=("cnn",), sequence={})
    if getattr(model, "in_channels", 3) != len(card.windows) + 2 * card.context:
        raise ValueError(
            f"the model takes {model.in_channels} channels but the card's windows and "
            f"context={card.context} make {len(card.windows) + 2 * card.context}"
        )
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


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The safetensors header of ``path``: (header, offset of the data, file size).

    The format (https://huggingface.co/docs/safetensors): an unsigned 64-bit
    little-endian header length N, N bytes of JSON, then the tensors' bytes.
    """
    try:
        exists, is_file = path.exists(), path.is_file()  # EACCES on a folder raises
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if not exists:
        raise BundleError(f"{path}: no such model bundle (no such file)")
    if not is_file:
        raise BundleError(f"{path}: not a file")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise BundleError(f"{path}: not a safetensors model bundle (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise BundleError(
                    f"{path}: not a safetensors model bundle (no valid header: the file "
                    "starts like another kind of file, or it is truncated)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleError(
            f"{path}: not a safetensors model bundle (its header is not JSON)"
        ) from None
    if not isinstance(header, dict):
        raise BundleError(f"{path}: not a safetensors model bundle (header is not an object)")
    return header, 8 + n, size


def _tensor_index(
    path: Path, header: dict[str, Any], data_start: int, size: int
) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (torch dtype name, shape, begin, end) with each range inside the file."""
    index: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPE_NAMES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{path}: tensor {name!r} is badly described in the header") from None
        if not 0 <= begin <= end or data_start + end > size:
            raise BundleError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                f"the file has {size} bytes"
            )
        index[name] = (dtype, shape, begin, end)
    if not index:
        raise BundleError(f"{path}: holds no weights")
    return index


def read_card(path: Path) -> ModelCard:
    """Read only the model card (no weights), e.g. for ``--help`` output or checks.

    Raises
    ------
    BundleError
        When the file is missing, not a safetensors file, has no readable ich-node
        model card or a card of another format version.
    """
    path = Path(path)
    header, _, _ = _read_header(path)
    return _card(path, header)


def _card(path: Path, header: dict[str, Any]) -> ModelCard:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or CARD_KEY not in metadata:
        raise BundleError(
            f"{path}: a safetensors file that has no ich-node model card ({CARD_KEY} missing)"
        )
    try:
        card = ModelCard.from_json(metadata[CARD_KEY])
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path}: the model card is unreadable: {exc}") from None
    if card.format_version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format {card.format_version} is not supported "
            f"(this ich-node reads format {FORMAT_VERSION})"
        )
    if card.arch not in ARCHITECTURE_NAMES:
        raise BundleError(f"{path}: unknown architecture {card.arch!r} in the model card")
    if tuple(card.labels) != LABELS:
        raise BundleError(f"{path}: labels {card.labels} differ from this node's {LABELS}")
    if set(card.thresholds) != set(LABELS):
        raise BundleError(f"{path}: thresholds must name each of {LABELS}")
    if not isinstance(card.context, int) or isinstance(card.context, bool) or card.context < 0:
        raise BundleError(f"{path}: context must be an int >= 0, got {card.context!r}")
    if tuple(card.stages) not in STAGE_LISTS:
        raise BundleError(f"{path}: unknown stages {list(card.stages)} in the model card")
    if card.has_sequence:
        for key in ("embedding_dim", "hidden"):
            value = card.sequence.get(key)
            if not isinstance(value, int) or value < 1:
                raise BundleError(f"{path}: the card's sequence.{key} is missing or invalid")
    return card


def check_bundle(path: Path) -> ModelCard:
    """Verify a bundle file without torch: header, model card, sizes and checksum.

    Reads the whole file once (about 1 s per 300 MB). What it cannot check
    without building the network, that the tensors fit the architecture, is
    checked by :func:`load_bundle`.

    Returns
    -------
    ModelCard
        The verified card.

    Raises
    ------
    BundleError
        Naming the path and what is wrong: missing, not a safetensors file,
        truncated, no or unreadable model card, unknown architecture, or weights
        whose SHA-256 differs from the card's (modified or corrupted).
    """
    path = Path(path)
    header, data_start, size = _read_header(path)
    card = _card(path, header)
    index = _tensor_index(path, header, data_start, size)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for name in sorted(index):  # the order and fields of weights_sha256
                dtype, shape, begin, end = index[name]
                fh.seek(data_start + begin)
                digest.update(name.encode())
                digest.update(dtype.encode())
                digest.update(str(shape).encode())
                remaining = end - begin
                while remaining:
                    chunk = fh.read(min(remaining, 1 << 24))
                    if not chunk:
                        raise BundleError(f"{path}: truncated inside tensor {name!r}")
                    digest.update(chunk)
                    remaining -= len(chunk)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    actual = digest.hexdigest()
    if actual != card.sha256:
        raise BundleError(
            f"{path}: the weights' SHA-256 {actual[:12]}... does not match the model card's "
            f"{card.sha256[:12]}...: the file was modified or corrupted; refusing to load it"
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
    card = check_bundle(path)  # first: a file that fails costs no torch import

    from safetensors import safe_open

    from ich_node.imaging.preprocess import context_channels
    from ich_node.model.networks import ICHClassifier, SequenceStage

    try:
        state: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                state[key] = handle.get_tensor(key)
    except Exception as exc:
        raise BundleError(f"{path}: the weights cannot be read ({exc})") from None
    seq_state = {
        k[len(SEQUENCE_PREFIX) :]: v for k, v in state.items() if k.startswith(SEQUENCE_PREFIX)
    }
    cnn_state = {k: v for k, v in state.items() if not k.startswith(SEQUENCE_PREFIX)}
    model = ICHClassifier(card.arch, len(card.labels), context_channels(card.windows, card.context))
    try:
        model.load_state_dict(cnn_state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(f"{path}: the weights do not fit {card.arch}: {first}") from None
    model.eval()
    sequence = None
    if card.has_sequence:
        try:
            sequence = SequenceStage(
                int(card.sequence["embedding_dim"]),
                int(card.sequence["hidden"]),
                len(card.labels),
                inputs=str(card.sequence.get("inputs", "embeddings+logits")),
            )
        except ValueError as exc:
            raise BundleError(f"{path}: the card's sequence stage is invalid: {exc}") from None
        try:
            sequence.load_state_dict(seq_state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise BundleError(f"{path}: the sequence stage's weights do not fit: {first}") from None
        sequence.eval()
    elif seq_state:
        raise BundleError(f"{path}: holds sequence-stage weights its card does not name")
    return Bundle(path=path, card=card, model=model, sequence=sequence)
