"""Accuracy parity: the optimised pipeline's test accuracy vs the naive pipeline's, equal epochs.

Run: .venv/bin/python benchmarks/parity.py [--epochs 6] [--seeds 0 1]
On scikit-learn's digits (ImageFolder train/valid/test), ResNet-18 from random init at 32 px,
batch 64, AdamW lr 3e-3 with the same warmup + cosine schedule, the same crops:
- naive: the seed projects' loop: torchvision ImageFolder, float ToTensor + Normalize in the
  loader, default DataLoader (no workers), fp32 NCHW, last epoch's weights;
- ours: `launch.py train --prepare` (the prepared copy, raw RGB), uint8 batches normalised on the
  device, loader workers, channels_last, best validation epoch's weights; with
  `--device-augment`, its random-resized crops and flips are DeviceAugment's batched ones (the
  GPU default), run here on the CPU.
Prints each run's test accuracy and wall time, the mean difference in points, and the speed
ratio. The goal (issue #7): within 1 point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from machine import describe  # noqa: E402

from imgclf import models  # noqa: E402
from imgclf.sample import write_digits  # noqa: E402

HPS = {
    "arch": "resnet18",
    "pretrained": "false",
    "image_size": "32",
    "batch_size": "64",
    "lr": "0.003",
    "weight_decay": "0.0001",
    "hflip": "false",
    "min_crop_scale": "0.6",
    "patience": "0",
    "warmup_epochs": "1",
}


def naive(data: Path, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    pre = models.get_architecture("resnet18").preprocess(32)
    norm = transforms.Normalize(pre.mean, pre.std)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(32, scale=(0.6, 1.0)), transforms.ToTensor(), norm]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(pre.resize_size),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            norm,
        ]
    )
    train = torch.utils.data.DataLoader(
        datasets.ImageFolder(data / "train", train_tf), batch_size=64, shuffle=True
    )
    test = torch.utils.data.DataLoader(datasets.ImageFolder(data / "test", eval_tf), batch_size=64)
    model = models.build_model("resnet18", 10)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}], lr=3e-3
    )
    total, warmup = epochs * len(train), len(train)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for x, y in train:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for x, y in test:
            correct += (model(x).argmax(1) == y).sum().item()
            count += len(y)
    return correct / count


def ours(data: Path, home: Path, epochs: int, seed: int, device_augment: str) -> float:
    hps = {**HPS, "epochs": str(epochs), "seed": str(seed), "channels_last": "true"}
    hps["device_augment"] = device_augment
    command = [sys.executable, str(ROOT / "launch.py"), "train", "--data", str(data), "--prepare"]
    command += ["--job-name", f"ours-{seed}", "--hp", *[f"{k}={v}" for k, v in hps.items()]]
    proc = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "IMGCLF_HOME": str(home)}, capture_output=True
    )
    if proc.returncode != 0:
        sys.exit(f"our job failed:\n{proc.stdout[-2000:]!r}\n{proc.stderr[-2000:]!r}")
    metrics = home / "jobs" / f"ours-{seed}" / "model" / "metrics.json"
    return json.loads(metrics.read_text())["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--device-augment",
        action="store_true",
        help="ours with device_augment=on: the batched crops a GPU job uses (here on the CPU)",
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-parity-") as tmp:
        data = Path(tmp) / "digits"
        write_digits(data)
        for seed in args.seeds:
            start = time.perf_counter()
            acc_naive = naive(data, args.epochs, seed)
            t_naive = time.perf_counter() - start
            start = time.perf_counter()
            augment = "on" if args.device_augment else "auto"
            acc_ours = ours(data, Path(tmp) / "home", args.epochs, seed, augment)
            t_ours = time.perf_counter() - start
            rows.append((seed, acc_naive, t_naive, acc_ours, t_ours))
    crops = "DeviceAugment" if args.device_augment else "CPU workers"
    print(
        f"\nmachine: {describe()}; digits, resnet18 random init, 32 px, {args.epochs} epochs; "
        f"ours crops in: {crops}"
    )
    print(f"{'seed':>5}{'naive acc':>11}{'naive s':>9}{'ours acc':>10}{'ours s':>8}{'diff pt':>9}")
    for seed, an, tn, ao, to in rows:
        print(f"{seed:>5}{an:>11.2%}{tn:>9.1f}{ao:>10.2%}{to:>8.1f}{(ao - an) * 100:>+9.2f}")
    mean_n = sum(r[1] for r in rows) / len(rows)
    mean_o = sum(r[3] for r in rows) / len(rows)
    speed = sum(r[2] for r in rows) / sum(r[4] for r in rows)
    print(
        f"\nmean test accuracy: naive {mean_n:.2%}, ours {mean_o:.2%} "
        f"({(mean_o - mean_n) * 100:+.2f} points; goal: within 1); wall time naive/ours "
        f"{speed:.2f}x (ours includes process start-up, the prepare step and the report)"
    )


if __name__ == "__main__":
    main()
