"""End to end: training images/s from JPEG files to optimizer steps, naive vs ours.

Run: .venv/bin/python benchmarks/end_to_end.py [--images N] [--batch B] [--arch resnet50]
The issue's GPU goal is about this figure: the data pipeline and the training step together.
Real photographs as 1600x1200 q90 JPEGs (benchmarks/data.py's set), 224 px, AdamW:
- naive: the seed projects' loop: torchvision ImageFolder, full-size PIL decode, float
  ToTensor + Normalize in a default DataLoader (no workers), fp32 NCHW;
- ours: the prepared copy (raw RGB, short side 256; built before timing, as a second job
  finds it), our loader (workers from the CPU count, persistent, pinned, uint8 batches),
  `engine.train_one_epoch` with what `train` resolves for this device: amp=auto,
  channels_last, device_augment=auto (on a GPU the crops, flips and normalisation run there).
Each pipeline runs one untimed epoch (workers start, cuDNN picks its kernels), then one timed
epoch. Prints images/s, the time the loop waited on data, and ours/naive, with the machine.
Defaults: 512 images, batch 64 on a GPU; 64 images, batch 16 on a CPU (minutes otherwise).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from data import make_photos, our_loader, our_train_input
from machine import describe
from torch import nn
from torchvision import datasets, transforms

from imgclf import engine, models
from imgclf.data.loaders import default_workers, shutdown_loaders
from imgclf.prepare import prepare_dataset
from imgclf.train import resolve_amp, use_device_augment


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive(root: Path, arch: str, batch: int, device: torch.device) -> tuple[float, float, int]:
    pre = models.get_architecture(arch).preprocess(224)
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(root / "train", transform), batch_size=batch, shuffle=True
    )
    torch.manual_seed(0)
    model = models.build_model(arch, 133).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()

    def epoch() -> tuple[float, float, int]:
        model.train()
        waited, count = 0.0, 0
        _sync(device)
        start = fetch = time.perf_counter()
        for x, y in loader:
            waited += time.perf_counter() - fetch
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            count += len(y)
            fetch = time.perf_counter()
        _sync(device)
        return time.perf_counter() - start, waited, count

    epoch()
    return epoch()


def ours(
    root: Path, arch: str, batch: int, device: torch.device, workers: int, augment: str = "auto"
) -> tuple[float, float, int]:
    pre = models.get_architecture(arch).preprocess(224)
    on_device = use_device_augment(augment, device)
    loader = our_loader(
        root,
        workers,
        device_augment=on_device,
        pre=pre,
        batch=batch,
        pin_memory=device.type == "cuda",
    )
    sampler = loader.sampler
    # the device's step on each batch: DeviceAugment or DeviceNormalize, as `train` picks it
    _, _, prepare = our_train_input(root, pre, on_device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train sets it on a GPU
    model = models.build_model(arch, 133).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = resolve_amp("auto", device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    common = dict(
        device=device, amp_dtype=amp, channels_last=True, normalize=prepare, scaler=scaler
    )
    for epoch in (1, 2):  # the first is the untimed warm-up
        sampler.set_epoch(epoch)
        if on_device:
            prepare.set_epoch(epoch)
        _sync(device)
        start = time.perf_counter()
        result = engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, **common)
        _sync(device)
        seconds = time.perf_counter() - start
    shutdown_loaders()
    return seconds, result.data_seconds, result.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    parser.add_argument("--images", type=int, default=512 if gpu else 64)
    parser.add_argument("--batch", type=int, default=64 if gpu else 16)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=[None],
        help="loader workers of ours, one row each (default: as train picks)",
    )
    parser.add_argument(
        "--device-augment",
        nargs="*",
        default=["auto"],
        choices=["auto", "on", "off"],
        help="ours with each device_augment setting, one row each",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-e2e-") as tmp:
        root = Path(tmp) / "photos"
        make_photos(root, args.images)
        prepared = prepare_dataset(root, Path(tmp) / "prepared", short_side=256, fmt="raw").root
        rows = [
            (
                "naive (ImageFolder, full decode, fp32 NCHW)",
                *naive(root, args.arch, args.batch, device),
            ),
        ]
        for workers in args.workers:
            count = default_workers() if workers is None else workers
            for augment in args.device_augment:
                on = use_device_augment(augment, device)
                rows.append(
                    (
                        f"ours (prepared, {count} workers, device_augment={on})",
                        *ours(prepared, args.arch, args.batch, device, count, augment),
                    )
                )
    amp = resolve_amp("auto", device)
    print(
        f"\nmachine: {describe()}; {args.arch}, 224 px, batch {args.batch}, {args.images} images; "
        f"ours resolved amp={amp}, device_augment={use_device_augment('auto', device)}"
    )
    print(f"{'pipeline':<60}{'img/s':>9}{'data wait':>11}{'vs naive':>10}")
    base = rows[0][3] / rows[0][1]
    for name, seconds, waited, n in rows:
        rate = n / seconds
        print(f"{name:<60}{rate:>9.1f}{waited / seconds:>10.0%}{rate / base:>9.2f}x")


if __name__ == "__main__":
    main()
