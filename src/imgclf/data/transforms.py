"""How an image becomes the model's input: `Preprocess` (stored in model_config.json) and the
train and eval transforms. The eval transform is also the endpoint's preprocessing: its resize
and centre crop (`ResizeCenterCrop`) need Pillow alone, so an endpoint serving a prebuilt ONNX
graph imports neither torchvision nor its start-up cost (1.6 s on 2 CPUs); torchvision is
imported by the transforms that need it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from imgclf.config import FIELDS

if TYPE_CHECKING:
    from torchvision import transforms

# What model_config.json may say about preprocessing (Preprocess.from_dict), and Pillow's filter
# for each: what torchvision's InterpolationMode of that name uses on a PIL image.
PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
INTERPOLATIONS = tuple(PIL_FILTERS)
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
        from torchvision import transforms

        return transforms.InterpolationMode(self.interpolation)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(short_side): the short side becomes
    `short_side`, the long one int(short_side * long / short)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


@dataclass(frozen=True)
class ResizeCenterCrop:
    """PIL image → PIL image: the short side resized to `resize_size`, then the centred
    `image_size` square. Exactly torchvision's Resize(antialias=True) then CenterCrop on a PIL
    image (both call Pillow's resize and crop with these sizes; tests/unit/test_transform.py
    holds them pixel for pixel), without importing torch."""

    pre: Preprocess

    def __call__(self, image: Image.Image) -> Image.Image:
        pre = self.pre
        size = resized_size(image.width, image.height, pre.resize_size)
        if size != image.size:
            image = image.resize(size, PIL_FILTERS[pre.interpolation])
        crop = pre.image_size
        top = int(round((image.height - crop) / 2.0))
        left = int(round((image.width - crop) / 2.0))
        return image.crop((left, top, left + crop, top + crop))


def eval_crop(pre: Preprocess):
    """PIL image → uint8 CHW NumPy array: the eval transform without its tensor conversion,
    torch-free (the endpoint's preprocessing before an ONNX graph)."""
    import numpy as np

    crop = ResizeCenterCrop(pre)

    def apply(image: Image.Image):
        return np.ascontiguousarray(np.asarray(crop(image), dtype=np.uint8).transpose(2, 0, 1))

    return apply


def eval_transform(pre: Preprocess, *, normalize: bool = True) -> transforms.Compose:
    """Resize the short side, centre-crop, normalise: evaluation and the endpoint share this.
    With `normalize=False` the result is a uint8 tensor for `DeviceNormalize` (training)."""
    from torchvision import transforms

    return transforms.Compose([ResizeCenterCrop(pre), *_to_tensor(pre, normalize)])


def train_transform(
    pre: Preprocess, *, hflip: bool, min_crop_scale: float, normalize: bool = True
) -> transforms.Compose:
    from torchvision import transforms

    steps = [
        transforms.RandomResizedCrop(
            pre.image_size, scale=(min_crop_scale, 1.0), interpolation=pre.mode, antialias=True
        )
    ]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + _to_tensor(pre, normalize))


def _to_tensor(pre: Preprocess, normalize: bool) -> list:
    from torchvision import transforms

    if normalize:
        return [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]
    return [transforms.PILToTensor()]
