"""The model card: what a bundle says about its model, without the weights.

Kept apart from :mod:`ich_node.bundle` (which imports torch) so that the results
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
    """A bundle that cannot be served: missing, tampered, or inconsistent."""


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What a bundle says about its model (stored as JSON in the file header)."""

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

    @property
    def display_name(self) -> str:
        """Name and version as shown in every output; says DEMO for a demo model."""
        text = f"{self.name} {self.version}"
        return f"{text} ({DEMO_NOTICE})" if self.demo else text

    def to_json(self) -> str:
        data = asdict(self)
        data["windows"] = [asdict(w) for w in self.windows]
        data["labels"] = list(self.labels)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise BundleError("the model card is not a JSON object")
        data["windows"] = tuple(Window(**w) for w in data.get("windows", ()))
        data["labels"] = tuple(data.get("labels", ()))
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"the model card has unknown fields {unknown}")
        return cls(**data)
