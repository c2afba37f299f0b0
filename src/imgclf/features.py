"""Frozen-backbone training on cached features.

With `features_cache=true` the backbone never trains, so its output for an image never changes:
each split is embedded once (the evaluation transform: resize, centre crop) and stored; the
head (the architecture's final Linear layer) then trains on the stored embeddings for as many
epochs and trials as wanted, in seconds. The saved model is the whole network (backbone + the
trained head), so it deploys like any other.

The cache key covers everything the embeddings depend on: the backbone's parameters and buffers
(so pretrained weights, a weights file or a seeded random init), the preprocessing, and every
sample's path within its split, size and modification time. Parallel trials that need the same
key wait on a file lock and the first one computes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf import engine, models
from imgclf.data.device import DeviceNormalize
from imgclf.data.scan import DatasetScan
from imgclf.data.transforms import Preprocess
from imgclf.util import atomic_write, open_lock, write_json

log = logging.getLogger("imgclf.features")

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SplitFeatures:
    features: torch.Tensor  # [N, D] float32, on the CPU
    targets: torch.Tensor  # [N] int64


@dataclass(frozen=True)
class CachedFeatures:
    splits: dict[str, SplitFeatures]
    key: str
    path: Path
    reused: bool
    seconds: float  # spent computing (0 when reused)

    def info(self) -> dict:
        return {
            "key": self.key,
            "path": str(self.path),
            "reused": self.reused,
            "seconds": round(self.seconds, 3),
            "dims": int(next(iter(self.splits.values())).features.shape[1]),
        }


class FeatureBatches:
    """Batches of stored features in the order of a sampler: the training loop's loader.

    `EpochSampler` (training: a seeded permutation per epoch, this rank's share) or
    `ShardSampler` (evaluation) decide the order, as they do for images."""

    def __init__(self, split: SplitFeatures, sampler, *, batch_size: int) -> None:
        self.split, self.sampler, self.batch_size = split, sampler, batch_size

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = [i[0] if isinstance(i, tuple) else i for i in self.sampler]
        index = torch.tensor(order, dtype=torch.long)
        for start in range(0, len(index), self.batch_size):
            chunk = index[start : start + self.batch_size]
            yield self.split.features[chunk], self.split.targets[chunk]


def _tensor_digest(h, tensor: torch.Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())


def cache_key(model: nn.Module, arch_name: str, pre: Preprocess, scan: DatasetScan) -> str:
    """A digest of the backbone's state, the preprocessing and the dataset's files."""
    head = models.get_architecture(arch_name).head
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([FORMAT_VERSION, arch_name, pre.to_dict()]).encode())
    for name, tensor in model.state_dict().items():
        if not name.startswith(head + "."):
            h.update(name.encode())
            _tensor_digest(h, tensor)
    for split_name, split in sorted(scan.splits.items()):
        h.update(json.dumps([split_name, list(split.classes)]).encode())
        for path, target in split.samples:
            stat = os.stat(path)
            rel = os.path.relpath(path, split.root)  # jobs see the data under their own dirs
            h.update(f"{rel}|{target}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def backbone_only(model: nn.Module, arch_name: str):
    """The model with its head swapped for Identity: it returns the head's input."""
    parent_path, _, attr = models.get_architecture(arch_name).head.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    try:
        yield model
    finally:
        setattr(parent, attr, head)


@torch.inference_mode()
def embed(
    model: nn.Module,
    arch_name: str,
    loader,
    *,
    device: torch.device,
    normalize,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> SplitFeatures:
    """The backbone's output (eval mode) for every batch of `loader`, in order."""
    was_training = model.training
    model.eval()
    feats, targets = [], []
    try:
        with backbone_only(model, arch_name) as backbone:
            for images, target in loader:
                images, _ = engine._to_device(images, target, device, channels_last, normalize)
                with engine.autocast(device, amp_dtype):
                    out = backbone(images)
                feats.append(out.float().flatten(1).cpu())
                targets.append(target.cpu())
    finally:
        model.train(was_training)
    if not feats:
        return SplitFeatures(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
    return SplitFeatures(torch.cat(feats), torch.cat(targets).long())


def _save(path: Path, split: SplitFeatures) -> None:
    atomic_write(
        path,
        lambda handle: torch.save({"features": split.features, "targets": split.targets}, handle),
    )


def _load(path: Path) -> SplitFeatures:
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return SplitFeatures(stored["features"], stored["targets"])


def load_or_compute(
    root: Path,
    model: nn.Module,
    arch_name: str,
    pre: Preprocess,
    scan: DatasetScan,
    make_loader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> CachedFeatures:
    """Every split's features from `root/<key>/`, computed first when missing. `make_loader(
    split_name)` gives an in-order loader of uint8 eval-transformed images for a split."""
    key = cache_key(model, arch_name, pre, scan)
    folder = root / key
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(scan.splits)
    with open_lock(root / f"{key}.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel trials: one computes, the others wait
        done = folder / "info.json"
        if done.exists():
            splits = {name: _load(folder / f"{name}.pt") for name in names}
            return CachedFeatures(splits, key, folder, reused=True, seconds=0.0)
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        normalize = DeviceNormalize.of(pre)
        splits = {}
        for name in names:
            splits[name] = embed(
                model,
                arch_name,
                make_loader(name),
                device=device,
                normalize=normalize,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
            )
            _save(folder / f"{name}.pt", splits[name])
        seconds = time.perf_counter() - start
        info = {
            "version": FORMAT_VERSION,
            "arch": arch_name,
            "preprocess": pre.to_dict(),
            "images": {name: int(s.targets.numel()) for name, s in splits.items()},
            "dims": int(splits[names[0]].features.shape[1]),
            "seconds": round(seconds, 3),
        }
        write_json(done, info)  # written last: a half-built folder is never taken as done
        return CachedFeatures(splits, key, folder, reused=False, seconds=seconds)
