"""`launch.py data sample`: scikit-learn's digits (real handwriting, shipped with the package)
written as an ImageFolder with train/ valid/ test/ and dogImages-style class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = (("train", 0.7), ("valid", 0.15), ("test", 0.15))


def write_digits(root: Path, *, size: int = 32, seed: int = 0) -> dict[str, int]:
    """Write the 1,797 digits as grayscale PNGs (`train/001.zero/0007.png`); a stratified
    70/15/15 split, the same for the same seed. Returns images per split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys((name for name, _ in SPLITS), 0)
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        n_train = int(round(len(indices) * SPLITS[0][1]))
        n_valid = int(round(len(indices) * SPLITS[1][1]))
        parts = {
            "train": indices[:n_train],
            "valid": indices[n_train : n_train + n_valid],
            "test": indices[n_train + n_valid :],
        }
        folder = f"{label + 1:03d}.{DIGIT_NAMES[label]}"
        for split, members in parts.items():
            out = root / split / folder
            out.mkdir(parents=True, exist_ok=True)
            for index in members:
                pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
                image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)
                image.save(out / f"{index:04d}.png")
            counts[split] += len(members)
    return counts
