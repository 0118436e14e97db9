"""The model card: what a bundle says about its model, without the weights.

Kept apart from :mod:`ich_node.model.bundle` (which imports torch) so that the results
stage, which names the model in every output, imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from ich_node.imaging import DEFAULT_WINDOWS, Window
from ich_node.labels import LABELS

FORMAT_VERSION: Final = 1
INTENDED_USE: Final = (
    "AI result for triage support of intracranial hemorrhage on non-contrast head CT; "
    "not a diagnosis. A radiologist reads every study."
)
DEMO_NOTICE: Final = "DEMO model trained on synthetic phantoms - not for clinical use"


class BundleError(ValueError):
    """A bundle that cannot be served: missing, tampered, inconsistent or unreadable.

    Parameters
    ----------
    message : str
        What is wrong, naming the file.
    advice : str, optional
        What to do about this kind of failure (e.g. file permissions for a bundle
        the node's user may not read); None: get a bundle
        (:data:`ich_node.model.bundle.BUNDLE_HELP`, see ``bundle_help``).
    """

    def __init__(self, message: str, *, advice: str | None = None) -> None:
        super().__init__(message)
        self.advice = advice


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What a bundle says about its model (stored as JSON in the file header).

    Fields added after format 1 was first written have defaults that describe
    the bundles written before them, so those still load:

    ``context``
        Slice context of the CNN input (0: none; 1: the brain window of slices
        s-1 and s+1 as two extra channels, :func:`ich_node.imaging.add_slice_context`).
    ``stages``
        ``("cnn",)``, or ``("cnn", "sequence")`` for a bundle that also holds a
        :class:`ich_node.model.SequenceStage` (its tensors' names start with
        ``sequence.``; the CNN's keep their unprefixed names).
    ``sequence``
        The sequence stage's shape and training record (``embedding_dim``,
        ``hidden``, ``key_prefix``, ``training``, ``metrics``); empty for one stage.
    """

    name: str
    version: str
    arch: str
    input_size: int
    windows: tuple[Window, ...] = DEFAULT_WINDOWS
    labels: tuple[str, ...] = LABELS
    thresholds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LABELS, 0.5))
    demo: bool = False
    training_data: str = ""
    split: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    git_commit: str | None = None
    created: str = ""
    intended_use: str = INTENDED_USE
    sha256: str = ""
    format_version: int = FORMAT_VERSION
    context: int = 0
    stages: tuple[str, ...] = ("cnn",)
    sequence: dict[str, Any] = field(default_factory=dict)

    @property
    def has_sequence(self) -> bool:
        """Whether the bundle holds the sequence stage (CNN -> sequence)."""
        return "sequence" in self.stages

    @property
    def display_name(self) -> str:
        """Name and version as shown in every output; says DEMO for a demo model."""
        text = f"{self.name} {self.version}"
        return f"{text} ({DEMO_NOTICE})" if self.demo else text

    def to_json(self) -> str:
        data = asdict(self)
        data["windows"] = [asdict(w) for w in self.windows]
        data["labels"] = list(self.labels)
        data["stages"] = list(self.stages)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise BundleError("the model card is not a JSON object")
        data["windows"] = tuple(Window(**w) for w in data.get("windows", ()))
        data["labels"] = tuple(data.get("labels", ()))
        if "stages" in data:
            data["stages"] = tuple(data["stages"])
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"the model card has unknown fields {unknown}")
        return cls(**data)
