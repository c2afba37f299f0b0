"""Training and evaluation loops: pure functions of a model, a loader and settings (no env, no
files). Sums are reduced across processes through the `reduce` callable the caller passes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from imgclf.errors import TrainingStopped

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class EpochResult:
    loss: float
    accuracy: float
    images: int
    seconds: float
    data_seconds: float  # time spent waiting for the loader

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    top5: float
    confusion: torch.Tensor  # [true, predicted] counts, int64
    images: int
    # with keep_outputs: this process's logits [n, classes] (float32, CPU) and targets, in
    # the loader's order
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diag().double() / totals).tolist()


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(images, targets, device, channels_last, normalize=None):
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        if normalize is None:
            raise TypeError("uint8 batches need a `normalize` (data.device.DeviceNormalize)")
        images = normalize(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    scheduler=None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[int, float], None] | None = None,
    on_step_time: Callable[[int, float, float], None] | None = None,
    reduce: Reduce = _no_reduce,
) -> EpochResult:
    """One pass over `loader`; the scheduler steps per batch. Raises TrainingStopped when
    `should_stop()` turns true (checked before each batch). `on_step_time(step, data_s,
    compute_s)` gets each step's split (the device is synchronised for it). uint8 batches are
    turned into normalised floats on the device by `normalize`."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct, n
    start = time.perf_counter()
    data_wait = 0.0
    fetch_start = start
    for step, (images, targets) in enumerate(loader):
        fetched = time.perf_counter()
        step_wait = fetched - fetch_start
        data_wait += step_wait
        if should_stop():
            raise TrainingStopped
        images, targets = _to_device(images, targets, device, channels_last, normalize)
        with autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = targets.numel()
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == targets).sum()
            totals += torch.stack(
                [
                    loss.detach().double() * n,
                    correct.double(),
                    torch.tensor(n, dtype=torch.float64, device=device),
                ]
            )
        if on_batch is not None:
            on_batch(step, float(loss.detach()))
        if on_step_time is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            on_step_time(step, step_wait, time.perf_counter() - fetched)
        fetch_start = time.perf_counter()
    seconds = time.perf_counter() - start
    totals = reduce(totals)
    count = max(totals[2].item(), 1.0)
    return EpochResult(
        loss=totals[0].item() / count,
        accuracy=totals[1].item() / count,
        images=int(totals[2].item()),
        seconds=seconds,
        data_seconds=data_wait,
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    *,
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reduce: Reduce = _no_reduce,
    criterion: nn.Module | None = None,
    keep_outputs: bool = False,
) -> EvalResult:
    """Plain (unweighted, unsmoothed) cross-entropy, top-1, top-5 and the confusion matrix.
    `criterion` (a plain mean cross-entropy module) computes the loss when given, so hooks on
    it (smdebug) see each batch's loss. `keep_outputs`: the logits and targets too (this
    process's share; calibration and the predictions file need them)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    k = min(5, num_classes)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for images, targets in loader:
        images, targets = _to_device(images, targets, device, channels_last, normalize)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        if keep_outputs:
            kept.append((logits.cpu(), targets.cpu()))
        if criterion is not None:
            loss_sum += criterion(logits, targets).double() * targets.numel()
        else:
            loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        top5 += (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum().double()
        predicted = logits.argmax(dim=1)
        confusion += torch.bincount(
            targets * num_classes + predicted, minlength=num_classes * num_classes
        ).double()
    packed = reduce(torch.cat([loss_sum[None], top5[None], confusion]))
    confusion_matrix = packed[2:].round().long().view(num_classes, num_classes).cpu()
    count = max(int(confusion_matrix.sum()), 1)
    return EvalResult(
        loss=packed[0].item() / count,
        accuracy=confusion_matrix.diag().sum().item() / count,
        top5=packed[1].item() / count,
        confusion=confusion_matrix,
        images=int(confusion_matrix.sum()),
        logits=_cat([x for x, _ in kept], (0, num_classes)) if keep_outputs else None,
        targets=_cat([t for _, t in kept], (0,), torch.long) if keep_outputs else None,
    )


def _cat(parts: list[torch.Tensor], empty: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(empty, dtype=dtype)
