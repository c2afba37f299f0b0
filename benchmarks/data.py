"""Data pipeline: one epoch of decode + augment to tensors, naive ImageFolder vs ours.

Run: .venv/bin/python benchmarks/data.py [--images 500] [--epochs 3]
The images are real photographs (scikit-learn's sample photos, cropped, flipped and re-lit into
distinct pictures) saved as 1600x1200 JPEGs at quality 90, in 5 class folders, like a user's
dogImages folder. Both pipelines produce normalised 224 px random-resized-crop tensors in
batches of 32:
- naive: torchvision ImageFolder, full-size PIL decode every epoch, default DataLoader (as the
  seed projects fine-tune);
- ours: `launch.py data prepare` (decode once with JPEG draft mode, short side 256, stored as
  JPEG q95 or as raw RGB, the local default), then our dataset and loader (workers from the
  CPU count, persistent, prefetch) handing over uint8 crops that are normalised after the
  hand-over, as training does;
- ours + device augment (`device_augment`, auto on a GPU): the workers only cut 256 px squares
  and `DeviceAugment` crops, flips and normalises whole batches on the device. With no GPU here
  two rows: the workers' share alone (what bounds a GPU job's input) and with the batched crops
  run on this CPU.
Prints seconds per epoch and images/s, and the ratios against naive.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe
from PIL import Image, ImageEnhance
from torchvision import datasets, transforms

from imgclf import models
from imgclf.data.device import DeviceAugment, DeviceNormalize, train_input
from imgclf.data.loaders import (
    EpochSampler,
    ImageListDataset,
    default_workers,
    make_loader,
    shutdown_loaders,
)
from imgclf.data.scan import list_split
from imgclf.data.transforms import Preprocess
from imgclf.prepare import prepare_dataset, stored_short_side


def make_photos(root: Path, count: int, classes: int = 5) -> None:
    from sklearn.datasets import load_sample_image

    photos = [Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")]
    rng = random.Random(0)
    for i in range(count):
        photo = photos[i % 2]
        w, h = photo.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = photo.crop((x, y, x + cw, y + ch)).resize((1600, 1200), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
        folder = root / "train" / f"{i % classes + 1:03d}.class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"photo{i:04d}.jpg", quality=90)
    for split in ("valid",):  # prepare needs the layout; one image a class is enough
        for cls in sorted((root / "train").iterdir()):
            out = root / split / cls.name
            out.mkdir(parents=True, exist_ok=True)
            first = sorted(cls.iterdir())[0]
            (out / first.name).write_bytes(first.read_bytes())


def epoch_seconds(loader, normalize=None) -> tuple[float, int]:
    """One pass; `normalize` (ours) turns the uint8 batches into the normalised float batches
    the model gets, here on the CPU (on a GPU it runs on the device, after the copy). Without
    it, the uint8 batches as they leave the workers."""
    start = time.perf_counter()
    images = 0
    for batch, _ in loader:
        if normalize is not None:
            batch = normalize(batch)
            assert batch.shape[1:] == (3, 224, 224) and batch.dtype == torch.float32
        images += batch.shape[0]
    return time.perf_counter() - start, images


def naive_loader(root: Path):
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    dataset = datasets.ImageFolder(root / "train", transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)


PRE = models.get_architecture("resnet50").preprocess(224)


def our_train_input(root: Path, pre: Preprocess, device_augment: bool):
    """`train_input` as `train` calls it over `root`: (workers' transform, draft size, the
    device's step on each batch). device_augment: workers cut squares at the stored short side;
    DeviceAugment crops on the device."""
    return train_input(
        pre,
        hflip=True,
        min_crop_scale=0.25,
        on_device=device_augment,
        stored_side=stored_short_side(root / "train"),
    )


def our_loader(
    root: Path,
    workers: int,
    *,
    device_augment: bool = False,
    pre: Preprocess = PRE,
    batch: int = 32,
    pin_memory: bool = False,
):
    """Our training loader over `root`/train, as `train` builds it (end_to_end.py uses it too)."""
    _, files, _ = list_split("train", root / "train")
    samples = [(str(p), t) for p, t in files]
    transform, draft, _ = our_train_input(root, pre, device_augment)
    dataset = ImageListDataset(samples, transform, draft=draft, seed=0)
    sampler = EpochSampler(len(dataset), seed=0)
    return make_loader(dataset, sampler, batch_size=batch, workers=workers, pin_memory=pin_memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of ours after the first")
    args = parser.parse_args()
    torch.set_num_threads(1)  # decode and augment only: keep the comparison on the loaders
    workers = default_workers()
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-data-") as tmp:
        root = Path(tmp) / "photos"
        make_photos(root, args.images)
        size_mb = sum(p.stat().st_size for p in root.rglob("*.jpg")) / 1e6

        seconds, n = epoch_seconds(naive_loader(root))
        rows.append(("naive ImageFolder, full decode, workers=0", seconds, n))
        naive = seconds

        normalize = DeviceNormalize.of(PRE)
        seconds, n = epoch_seconds(our_loader(root, workers), normalize)
        rows.append((f"ours on the originals (draft decode, workers={workers})", seconds, n))

        sizes = {}
        for fmt in ("jpeg", "raw"):
            start = time.perf_counter()
            prepared = prepare_dataset(root, Path(tmp) / fmt, short_side=256, fmt=fmt)
            build = time.perf_counter() - start
            loader = our_loader(prepared.root, workers)
            seconds, n = epoch_seconds(loader, normalize)
            rows.append((f"ours {fmt}, first epoch incl. building the cache", build + seconds, n))
            later = [epoch_seconds(loader, normalize)[0] for _ in range(args.epochs)]
            rows.append(
                (f"ours {fmt}, later epochs (mean of {args.epochs})", float(np.mean(later)), n)
            )
            if fmt == "raw":  # device_augment=on (auto on a GPU), at later epochs
                loader = our_loader(prepared.root, workers, device_augment=True)
                epoch_seconds(loader)  # start the workers, warm the page cache
                later = [epoch_seconds(loader)[0] for _ in range(args.epochs)]
                rows.append(("ours raw + device augment: the workers' share", np.mean(later), n))
                augment = DeviceAugment(PRE, hflip=True, min_crop_scale=0.25)
                later = [epoch_seconds(loader, augment)[0] for _ in range(args.epochs)]
                rows.append(("ours raw + device augment, the crops on this CPU", np.mean(later), n))
            files = [p for p in prepared.root.rglob("*") if p.is_file() and p.suffix != ".json"]
            sizes[fmt] = sum(p.stat().st_size for p in files) / 1e6
            shutdown_loaders()
    print(
        f"\nmachine: {describe()}; {args.images} JPEGs 1600x1200 q90 ({size_mb:.0f} MB), "
        f"prepared copies: jpeg {sizes['jpeg']:.0f} MB, raw {sizes['raw']:.0f} MB"
    )
    print(f"{'pipeline':<56}{'s/epoch':>9}{'img/s':>9}{'vs naive':>10}")
    for name, seconds, n in rows:
        print(f"{name:<56}{seconds:>9.2f}{n / seconds:>9.1f}{naive / seconds:>9.1f}x")


if __name__ == "__main__":
    main()
