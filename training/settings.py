"""Training settings: dataclass defaults < YAML preset (``--config``) < command line.

The resolved settings are written as ``settings.yaml`` next to the results and
stored in the checkpoint and the model card.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from training.data import Augment


@dataclass(frozen=True, slots=True)
class FitSettings:
    """Every knob of ``ich-train fit``; YAML keys and ``--flags`` use these names.

    Paths are strings here so that the settings round-trip through YAML.
    """

    # data
    images: str = ""
    labels: str = ""
    out: str = "runs/ich"
    cache_dir: str | None = None
    preprocess_cache: bool = True
    val_fraction: float = 0.1
    exclude_studies: str | None = None
    workers: int = 2
    index_workers: int = 0
    # model
    arch: str = "resnext101_32x8d"
    pretrained: str | None = None
    image_size: int = 256
    context: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    seed: int = 0
    # augmentation
    hflip: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    window_center_hu: float = 0.0
    window_width: float = 0.0
    # runtime
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    eval_every: int = 1
    eval_batch_size: int = 64
    resume: str | None = None
    stop_after_epochs: int | None = None
    progress: bool = True
    version: str | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "accum_steps", "image_size", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.context, int) or self.context < 0:
            raise ValueError(f"context must be an int >= 0, got {self.context!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    @property
    def augment(self) -> Augment:
        return Augment(
            hflip=self.hflip,
            rotate_deg=self.rotate_deg,
            scale=self.scale,
            translate=self.translate,
            window_center_hu=self.window_center_hu,
            window_width=self.window_width,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> FitSettings:
        return dataclasses.replace(self, **changes)


FIELD_NAMES = tuple(f.name for f in fields(FitSettings))


def read_preset(path: Path) -> dict[str, Any]:
    """Read a YAML preset; unknown keys are an error naming them."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(data)}")
    unknown = sorted(set(data) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}")
    return data


def resolve(preset: Path | None = None, **overrides: Any) -> FitSettings:
    """Defaults, then the preset, then the non-None ``overrides``."""
    values: dict[str, Any] = {}
    if preset is not None:
        values.update(read_preset(preset))
    unknown = sorted(set(overrides) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("images", "labels", "out", "cache_dir", "exclude_studies", "pretrained", "resume"):
        if values.get(key) is not None:
            values[key] = str(values[key])
    return FitSettings(**values)


def write_settings(path: Path, settings: FitSettings) -> None:
    Path(path).write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False))
