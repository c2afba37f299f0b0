"""How an image becomes the model's input: `Preprocess` (stored in model_config.json) and the
train and eval transforms. The eval transform is also the endpoint's preprocessing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torchvision import transforms

from imgclf.config import FIELDS

# What model_config.json may say about preprocessing (Preprocess.from_dict).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MIN_STD = 1e-3  # a smaller std scales pixels by over 1/(255 * 0.001): no real normalisation


def _kind(value: Any) -> str:
    return {list: "a list", dict: "an object", str: "text"}.get(type(value), type(value).__name__)


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bounded_int(d: dict, key: str, lo: int, hi: int, where: str) -> int:
    if key not in d:
        raise ValueError(f"{where} lacks {key} (an integer from {lo} to {hi})")
    value = d[key]
    if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        raise ValueError(f"{where}.{key} is {_shown(value)}: accepted an integer from {lo} to {hi}")
    return value


def _triple(d: dict, key: str, lo: float, hi: float, where: str) -> tuple[float, float, float]:
    value = d.get(key)
    if not (
        isinstance(value, list)
        and len(value) == 3
        and all(_number(x) and math.isfinite(x) and lo <= x <= hi for x in value)
    ):
        raise ValueError(
            f"{where}.{key} is {_shown(value)}: accepted a list of 3 numbers from {lo:g} to {hi:g}"
        )
    return (float(value[0]), float(value[1]), float(value[2]))


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input; stored in model_config.json."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "preprocess") -> Preprocess:
        """What `to_dict` wrote, checked before anything is sized from it: a ValueError naming
        the key (`where`.key), its value and what is accepted."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} is {_kind(d)}: expected an object {{image_size, ...}}")
        lo, hi = FIELDS["image_size"].metadata["minimum"], FIELDS["image_size"].metadata["maximum"]
        image_size = _bounded_int(d, "image_size", lo, hi, where)
        # Architecture.preprocess makes it 1.0-1.15x image_size (the weights' resize ratio).
        resize_size = _bounded_int(d, "resize_size", image_size, 2 * image_size, where)
        mean = _triple(d, "mean", 0.0, 1.0, where)
        std = _triple(d, "std", MIN_STD, 1.0, where)
        interpolation = d.get("interpolation", "bilinear")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"{where}.interpolation is {_shown(interpolation)}: accepted "
                + ", ".join(INTERPOLATIONS)
            )
        return cls(image_size, resize_size, mean, std, interpolation)

    @property
    def mode(self) -> transforms.InterpolationMode:
        return transforms.InterpolationMode(self.interpolation)


def eval_transform(pre: Preprocess, *, normalize: bool = True) -> transforms.Compose:
    """Resize the short side, centre-crop, normalise: evaluation and the endpoint share this.
    With `normalize=False` the result is a uint8 tensor for `DeviceNormalize` (training)."""
    steps = [
        transforms.Resize(pre.resize_size, interpolation=pre.mode, antialias=True),
        transforms.CenterCrop(pre.image_size),
    ]
    return transforms.Compose(steps + _to_tensor(pre, normalize))


def train_transform(
    pre: Preprocess, *, hflip: bool, min_crop_scale: float, normalize: bool = True
) -> transforms.Compose:
    steps = [
        transforms.RandomResizedCrop(
            pre.image_size, scale=(min_crop_scale, 1.0), interpolation=pre.mode, antialias=True
        )
    ]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + _to_tensor(pre, normalize))


def _to_tensor(pre: Preprocess, normalize: bool) -> list:
    if normalize:
        return [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]
    return [transforms.PILToTensor()]
