"""Datasets from ImageFolder splits: scanning and checking images, decoding any image to RGB,
the train/eval transforms (the eval transform is also the endpoint's preprocessing), samplers,
loaders and class weights."""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import re
import weakref
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.ops import roi_align

from imgclf.config import FIELDS
from imgclf.errors import DataError
from imgclf.util import cpu_count, write_json

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# Decoding at 1/8 scale still reads every byte of a JPEG: truncation is found, cheaply.
_CHECK_DRAFT = 64
_PREFIX = re.compile(r"^\d+[._-]")


# ---------------------------------------------------------------- decoding

# What one pixel of a mode costs to decode and turn into RGB, against 8-bit RGB (measured peak
# memory: RGB ~8 bytes a pixel, RGBA ~15, 16-bit or float ~25 through to_rgb's float64 scaling).
# Training's bound on one image and the endpoint's bound on one request both count this way.
PIXEL_WEIGHT = {"RGBA": 2, "LA": 2, "PA": 2, "RGBa": 2, "La": 2, "CMYK": 2}
PIXEL_WEIGHT.update(dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N", "I", "F"), 3))
# Training's default bound on one image's decode cost (weighted pixels): Pillow's own warning
# threshold, ~0.7 GB of peak memory for an RGB image, ~30 Mpx of 16-bit (per loader worker).
MAX_DECODE_COST = FIELDS["max_image_pixels"].default


def decode_cost(mode: str, width: int, height: int) -> int:
    """Weighted pixels an image of `mode` and size takes to decode to RGB (see PIXEL_WEIGHT)."""
    return width * height * PIXEL_WEIGHT.get(mode, 1)


class ImageTooCostly(ValueError):
    """An image whose decode would cost more than the bound it was opened with."""


def check_decode_cost(mode: str, width: int, height: int, max_cost: int) -> None:
    """ImageTooCostly, saying what the image is and the bound, when its decode costs too much."""
    cost = decode_cost(mode, width, height)
    if cost > max_cost:
        weight = PIXEL_WEIGHT.get(mode, 1)
        counted = f" (each {mode} pixel counts {weight}x)" if weight > 1 else ""
        raise ImageTooCostly(
            f"{width}x{height} {mode} pixels cost {cost} to decode{counted}, over the bound of "
            f"{max_cost} (hyperparameter max_image_pixels)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → upright 8-bit RGB: EXIF rotation applied, 16-bit and float scaled,
    transparency composited on white, CMYK/palette/grayscale converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode != "F" and array.max() > 255 else 255.0
        if image.mode == "F":
            peak = max(float(array.max()), 1.0) if array.max() > 1.0 else 1.0
        scaled = np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8)
        image = Image.fromarray(scaled)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def open_image(source, *, draft: int | None = None, max_cost: int | None = None) -> Image.Image:
    """Decode a path or file object to RGB. `draft` lets JPEGs decode at a reduced scale whose
    short side is still at least `draft` pixels (much faster for large photos). With
    `max_cost`, an image whose full size costs more (decode_cost) is refused from its header,
    before anything is decoded: ImageTooCostly."""
    with Image.open(source) as image:
        if max_cost is not None:
            # The full size, whatever the draft: the scan (small draft) and training (larger
            # draft) then take and refuse the same images.
            check_decode_cost(image.mode, *image.size, max_cost)
        if draft and image.format == "JPEG":
            image.draft(image.mode, (draft, draft))
        image.load()
        return to_rgb(image)


def try_open_image(
    path: Path, *, draft: int | None, max_cost: int = MAX_DECODE_COST
) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, why the file cannot be used)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        return open_image(path, draft=draft, max_cost=max_cost), None
    except ImageTooCostly as exc:
        return None, f"too costly to decode: {exc}"
    except UnidentifiedImageError:
        return None, "not an image PIL can read"
    except Image.DecompressionBombError:
        limit = Image.MAX_IMAGE_PIXELS * 2
        return None, f"too many pixels (over {limit}): likely a decompression bomb"
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"cannot be decoded: {exc}"


def image_problem(path: Path, *, max_cost: int = MAX_DECODE_COST) -> str | None:
    """Why an image cannot be used, or None when it decodes within `max_cost`."""
    return try_open_image(path, draft=_CHECK_DRAFT, max_cost=max_cost)[1]


# ---------------------------------------------------------------- scanning


@dataclass(frozen=True)
class BadImage:
    split: str
    path: str  # relative to the split's folder: "001.zero/img.jpg"
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"split": self.split, "path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class SplitScan:
    """One split's class folders, readable samples and unreadable files."""

    name: str
    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]
    bad: tuple[BadImage, ...] = ()
    ignored: tuple[str, ...] = ()  # not image files by their name (notes.txt, .DS_Store)

    def counts(self) -> list[int]:
        counter = Counter(target for _, target in self.samples)
        return [counter.get(i, 0) for i in range(len(self.classes))]


def list_split(name: str, root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]], list[str]]:
    """Class folders and candidate image files of one ImageFolder split (no decoding)."""
    if not root.is_dir():
        raise DataError(f"split {name}: {root} is not a directory")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p)))
    if not classes:
        raise DataError(
            f"split {name}: {root} has no class folders. Expected {root}/<class>/<image> "
            "(e.g. train/001.Affenpinscher/a.jpg)"
        )
    files: list[tuple[Path, int]] = []
    ignored: list[str] = []
    # (device, inode) of the split and its class folders: a symbolic link back to one of them
    # (e.g. train/001.x/loop -> ..) is listed once as ignored and not followed
    known = {_identity(root), *(_identity(root / cls) for cls in classes)}
    for index, cls in enumerate(classes):
        seen = set(known)
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            keep = []
            for d in sorted(d for d in dirnames if not d.startswith(".")):
                identity = _identity(Path(dirpath) / d)
                if identity in seen:
                    where = (Path(dirpath) / d).relative_to(root)
                    ignored.append(f"{where} (a link to a folder already read: not followed)")
                else:
                    seen.add(identity)
                    keep.append(d)
            dirnames[:] = keep
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                if filename.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored.append(str(path.relative_to(root)))
                    continue
                files.append((path, index))
    return classes, files, ignored


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _verdict_key(root: Path, path: Path) -> str:
    stat = path.stat()
    return f"{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}"


def scan_split(
    name: str,
    root: Path,
    *,
    threads: int | None = None,
    verdicts: dict | None = None,
    max_cost: int = MAX_DECODE_COST,
) -> SplitScan:
    """List a split and decode every image once (JPEG draft mode) to find unreadable ones and
    those whose decode costs more than `max_cost` (decode_cost). `verdicts` ("relative
    path|size|mtime" -> problem or None) holds what earlier scans with the same `max_cost`
    found: files it knows are not decoded again, and it is updated in place."""
    classes, files, ignored = list_split(name, root)
    threads = threads or min(16, 2 * cpu_count())
    known = verdicts if verdicts is not None else {}
    keys = [_verdict_key(root, path) for path, _ in files]
    todo = [(path, key) for (path, _), key in zip(files, keys) if key not in known]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        found = list(pool.map(lambda item: image_problem(item[0], max_cost=max_cost), todo))
    known.update((key, problem) for (_, key), problem in zip(todo, found))
    problems = [known[key] for key in keys]
    samples, bad = [], []
    for (path, target), problem in zip(files, problems):
        if problem is None:
            samples.append((str(path), target))
        else:
            bad.append(BadImage(name, str(path.relative_to(root)), problem))
    return SplitScan(name, root, classes, tuple(samples), tuple(bad), tuple(ignored))


@dataclass(frozen=True)
class DatasetScan:
    """All splits of a dataset, checked against each other."""

    splits: dict[str, SplitScan]
    classes: tuple[str, ...] = field(default=())

    @property
    def bad(self) -> list[BadImage]:
        return [b for s in self.splits.values() for b in s.bad]


def scan_dataset(
    split_dirs: dict[str, Path],
    *,
    cache_dir: Path | None = None,
    max_cost: int = MAX_DECODE_COST,
) -> DatasetScan:
    """Scan every split; class sets that differ between splits are an error naming them.
    With `cache_dir`, each split's verdicts are kept there (keyed by the split's real path and
    valid for one `max_cost`), so the next job over the same files only decodes new or changed
    ones."""
    scans = {}
    for name, path in split_dirs.items():
        cache_file = None
        verdicts: dict = {}
        if cache_dir is not None:
            real = str(Path(path).resolve())
            digest = hashlib.sha256(real.encode()).hexdigest()[:20]
            cache_file = Path(cache_dir) / f"{digest}.json"
            try:
                stored = json.loads(cache_file.read_text())
                if stored.get("root") == real and stored.get("max_cost") == max_cost:
                    verdicts = stored["verdicts"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                verdicts = {}
        count = len(verdicts)
        scans[name] = scan_split(name, Path(path), verdicts=verdicts, max_cost=max_cost)
        if cache_file is not None and len(verdicts) != count:
            _write_verdicts(cache_file, str(Path(path).resolve()), verdicts, max_cost)
    reference = scans["train"].classes if "train" in scans else next(iter(scans.values())).classes
    problems = []
    for name, scan in scans.items():
        missing = sorted(set(reference) - set(scan.classes))
        extra = sorted(set(scan.classes) - set(reference))
        if missing:
            problems.append(f"{name} lacks {_names(missing)}")
        if extra:
            problems.append(f"{name} has {_names(extra)} that train lacks")
    if problems:
        raise DataError(
            "class folders differ between splits: "
            + "; ".join(problems)
            + ". Every split needs the same class folders"
        )
    for name, scan in scans.items():
        empty = [c for c, n in zip(scan.classes, scan.counts()) if n == 0]
        if empty and name == "train":
            raise DataError(
                f"split train: class folders with no readable images: {_names(empty)}. "
                "Add images or remove the folders from every split"
            )
    return DatasetScan(scans, reference)


def _write_verdicts(path: Path, root: str, verdicts: dict, max_cost: int) -> None:
    try:
        write_json(path, {"root": root, "max_cost": max_cost, "verdicts": verdicts}, indent=None)
    except OSError:
        pass  # a cache: the next scan decodes again


def _names(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def label_name(folder: str) -> str:
    """`001.Affenpinscher` → `Affenpinscher`; `002.Afghan_hound` → `Afghan hound`."""
    name = _PREFIX.sub("", folder).replace("_", " ").strip()
    return name or folder


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Balanced weights n / (k · n_c), as scikit-learn's class_weight='balanced'."""
    counts_t = torch.tensor(counts, dtype=torch.float64)
    weights = counts_t.sum() / (len(counts) * counts_t.clamp(min=1))
    return weights.float()


# ---------------------------------------------------------------- transforms


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


class RandomSquare:
    """A square of the image's short side at a random place along its long side (a slice, no
    resampling), then resized to `side` only if its side differs. On a prepared copy stored at
    `side` that is no resampling at all: the workers' whole share is reading the file (the
    antialiased resize it replaces cost 4 of the 5 ms a sample took a worker)."""

    def __init__(self, side: int, interpolation: transforms.InterpolationMode) -> None:
        self.side = side
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        short = min(w, h)
        # torch's generator: seeded per sample by ImageListDataset, so crops are reproducible
        offset = int(torch.randint(0, max(w, h) - short + 1, (1,)).item())
        box = (offset, 0, offset + short, short) if w >= h else (0, offset, short, offset + short)
        square = image.crop(box)
        if short != self.side:
            size = [self.side, self.side]
            square = transforms.functional.resize(
                square, size, interpolation=self.interpolation, antialias=True
            )
        return square


def device_augment_transform(pre: Preprocess, *, side: int | None = None) -> transforms.Compose:
    """The workers' share when augmentation runs on the device: a square of the short side at a
    random place along the long side, at `side` pixels (default `resize_size`; training on a
    prepared copy passes the copy's short side, so nothing is resampled); `DeviceAugment` then
    takes the random-resized crop and the flip of a whole batch at once. Every sample has the
    same shape, so batches stack."""
    return transforms.Compose(
        [RandomSquare(side or pre.resize_size, pre.mode), transforms.PILToTensor()]
    )


def _to_tensor(pre: Preprocess, normalize: bool) -> list:
    if normalize:
        return [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]
    return [transforms.PILToTensor()]


class DeviceNormalize:
    """uint8 batches -> normalised float on the batch's device, in two in-place passes.

    Workers hand over uint8 crops (a quarter of the bytes of float: less to copy between
    processes and to pin, and a faster host-to-device copy); the float conversion and the
    normalisation then run where the model is (on a GPU: for free). Float batches pass through.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of(cls, pre: Preprocess) -> DeviceNormalize:
        return cls(pre.mean, pre.std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        return self.apply_(images.float())

    def apply_(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise float pixels in 0..255, in place: ~10x faster on a CPU than a broadcast
        addcmul."""
        if images.device not in self._cache:
            self._cache[images.device] = (
                self.scale.to(images.device),
                self.shift.to(images.device),
            )
        scale, shift = self._cache[images.device]
        return images.mul_(scale).add_(shift)


class DeviceAugment:
    """Random-resized crop, horizontal flip and normalisation of a uint8 batch, on the batch's
    device, in a few batched kernels (a GPU does in microseconds what costs the CPU workers
    most of their time).

    Boxes follow torchvision's RandomResizedCrop (area fraction in `scale`, log-uniform aspect
    ratio in 3/4..4/3, ten tries and then the whole image) and are cut and resized for the
    whole batch by `torchvision.ops.roi_align`, which averages ceil(box / output) samples per
    output pixel: an area filter when it shrinks, bilinear when it enlarges. The random numbers
    come from a CPU generator seeded by (seed, rank, epoch), so a resumed job repeats them.
    Float batches (already normalised) pass through.
    """

    RATIO = (3.0 / 4.0, 4.0 / 3.0)
    TRIES = 10

    def __init__(
        self,
        pre: Preprocess,
        *,
        hflip: bool,
        min_crop_scale: float,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.size = pre.image_size
        self.hflip = hflip
        self.min_scale = min_crop_scale
        self.seed, self.rank = seed, rank
        self.normalize = DeviceNormalize.of(pre)
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_009 + self.rank) ^ 0x5A5A)

    def boxes(self, n: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 4) boxes x1, y1, x2, y2 in pixels and (n,) flip flags."""
        g = self.generator
        area = float(height * width)
        scale = torch.empty(n, self.TRIES).uniform_(self.min_scale, 1.0, generator=g)
        log_lo, log_hi = math.log(self.RATIO[0]), math.log(self.RATIO[1])
        ratio = torch.exp(torch.empty(n, self.TRIES).uniform_(log_lo, log_hi, generator=g))
        w = torch.sqrt(area * scale * ratio).round()
        h = torch.sqrt(area * scale / ratio).round()
        fits = (w <= width) & (h <= height) & (w > 0) & (h > 0)
        first = torch.where(fits.any(1), fits.float().argmax(1), -1)
        pick = first.clamp(min=0).unsqueeze(1)
        w = torch.where(first >= 0, w.gather(1, pick).squeeze(1), float(width))
        h = torch.where(first >= 0, h.gather(1, pick).squeeze(1), float(height))
        x0 = (torch.rand(n, generator=g) * (width - w + 1)).floor()
        y0 = (torch.rand(n, generator=g) * (height - h + 1)).floor()
        flips = torch.rand(n, generator=g) < 0.5 if self.hflip else torch.zeros(n, dtype=bool)
        return torch.stack([x0, y0, x0 + w, y0 + h], 1), flips

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        n, _, height, width = images.shape
        boxes, flips = self.boxes(n, height, width)
        rois = torch.cat([torch.arange(n, dtype=torch.float32).unsqueeze(1), boxes], 1)
        out = roi_align(
            images.float(),
            rois.to(images.device),
            output_size=self.size,
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        )
        if flips.any():
            index = flips.nonzero().squeeze(1).to(images.device)
            out[index] = out[index].flip(-1)
        return self.normalize.apply_(out)


def train_input(
    pre: Preprocess,
    *,
    hflip: bool,
    min_crop_scale: float,
    on_device: bool,
    seed: int = 0,
    rank: int = 0,
    stored_side: int | None = None,
) -> tuple[transforms.Compose, int, DeviceNormalize | DeviceAugment]:
    """How training images are augmented: (the workers' transform, the JPEG draft size they
    decode at, what the device does to each uint8 batch). On the device (`device_augment`):
    equal squares from the workers, crops, flips and normalisation by `DeviceAugment`;
    otherwise random-resized crops in the workers, normalisation by `DeviceNormalize`.
    `stored_side`: the short side of a prepared copy (`prepare.stored_short_side`); the
    workers' squares keep it, so they need no resampling."""
    if on_device:
        augment = DeviceAugment(
            pre, hflip=hflip, min_crop_scale=min_crop_scale, seed=seed, rank=rank
        )
        side = stored_side or pre.resize_size
        return device_augment_transform(pre, side=side), side, augment
    transform = train_transform(pre, hflip=hflip, min_crop_scale=min_crop_scale, normalize=False)
    return transform, 2 * pre.image_size, DeviceNormalize.of(pre)


# ---------------------------------------------------------------- datasets and loaders


class ImageListDataset(Dataset):
    """(path, target) samples decoded to RGB and transformed.

    Training indices arrive as (index, epoch) from `EpochSampler`: the random augmentation of a
    sample is seeded from (seed, epoch, index), so it does not depend on worker count, worker
    order or whether the job was resumed.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform,
        *,
        draft: int | None,
        seed: int = 0,
        max_cost: int = MAX_DECODE_COST,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.draft = draft
        self.seed = seed
        self.max_cost = max_cost

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, epoch = key
            # The CPU generator only: torch.manual_seed also queues seeds for every accelerator
            # backend, formatting a stack trace each time (~1 ms a sample in a loader worker).
            seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
            torch.default_generator.manual_seed(seed)
        else:
            index = key
        path, target = self.samples[index]
        try:
            # The scan refused over-bound images already; this holds if a file changed since.
            image = open_image(path, draft=self.draft, max_cost=self.max_cost)
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"image {path} could not be read during training: {exc}") from None
        return self.transform(image), target


class EpochSampler(Sampler):
    """Shuffles (or not) with a permutation fixed by (seed, epoch) and gives this rank its share
    (padded to equal length, like DistributedSampler). Yields (index, epoch) pairs."""

    def __init__(
        self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.per_rank = -(-size // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]
        for index in order[self.rank : total : self.world_size]:
            yield (index, self.epoch)


class ShardSampler(Sampler):
    """Evaluation: rank r gets indices r, r+w, ... with no padding (no sample counted twice)."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def default_workers(local_world_size: int = 1) -> int:
    return max(0, min(8, cpu_count() // max(1, local_world_size)))


def _ignore_sigterm(worker_id: int) -> None:
    """SIGTERM goes to the whole process group; the main process stops the workers itself."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_LOADERS: weakref.WeakSet = weakref.WeakSet()


def shutdown_loaders() -> None:
    """Stop every loader's worker processes now. Workers ignore SIGTERM (so `docker stop`
    reaches the trainer first), so the interpreter's exit, which terminates and then joins its
    children, would wait on them forever if a loader outlived the training run."""
    for loader in list(_LOADERS):
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        loader._iterator = None


# Registered after torch (and so multiprocessing) is imported: atexit runs this first, before
# multiprocessing's own exit handler would wait on the workers.
atexit.register(shutdown_loaders)


def make_loader(
    dataset: Dataset, sampler: Sampler, *, batch_size: int, workers: int, pin_memory: bool
) -> DataLoader:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_sigterm if workers > 0 else None,
    )
    if workers > 0:
        _LOADERS.add(loader)
    return loader
