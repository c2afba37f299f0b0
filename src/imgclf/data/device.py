"""Training input split between the loader workers and the batch's device: uint8 batches are
normalised (`DeviceNormalize`) or augmented and normalised (`DeviceAugment`) where the model is;
`train_input` picks the workers' transform to go with each."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms
from torchvision.ops import roi_align

from imgclf.data.transforms import Preprocess, train_transform


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
