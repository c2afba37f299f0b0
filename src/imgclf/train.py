"""The training program (the image's SAGEMAKER_PROGRAM): contract → data → model → loop →
artifacts. Runs alone or under torchrun (one process per GPU, or several on CPU with gloo)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from imgclf import artifacts, engine, features, graph, incremental, metrics, models, scores
from imgclf.config import TrainConfig, debug_stop_rules, parse_hyperparameters
from imgclf.contract import (
    GRAPH_FILE,
    NO_REPORT_ENV,
    SCAN_CACHE_ENV,
    TrainingContract,
    read_training_contract,
    write_failure,
)
from imgclf.data.device import DeviceAugment, DeviceNormalize, train_input
from imgclf.data.loaders import (
    EpochSampler,
    ImageListDataset,
    ShardSampler,
    class_weights,
    default_workers,
    make_loader,
    shutdown_loaders,
)
from imgclf.data.scan import DatasetScan, SplitScan, label_name, scan_dataset
from imgclf.data.transforms import Preprocess, eval_transform
from imgclf.debugging import rules
from imgclf.debugging.hook import DebugHook, create_hook
from imgclf.debugging.hook import read_settings as read_debug_settings
from imgclf.debugging.profiling import PROFILER_DIR, Profiler
from imgclf.errors import ConfigError, DataError, TrainingStopped, UserError
from imgclf.job_outputs import JobOutputs
from imgclf.prepare import stored_short_side
from imgclf.util import atomic_write, write_json

log = logging.getLogger("imgclf.train")

EXIT_STOPPED = 143  # 128 + SIGTERM


@dataclass(frozen=True)
class Runtime:
    """Derived per-process state (not configuration)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None
    progress_bar: bool
    # read from the environment once, here at the edge
    local_world_size: int = 1
    scan_cache: Path | None = None  # SCAN_CACHE_ENV: image-check verdicts of earlier jobs
    write_report: bool = True  # NO_REPORT_ENV=1 (the local tuner's trials): no report.html

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class StopFlag:
    """Set by SIGTERM (SageMaker stop or spot interruption): training stops before its next
    batch, keeping the last completed epoch's checkpoint, well inside the 120 s SageMaker gives."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where the GPU supports it, else fp16 on GPU; off on CPU (slower there)."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "fp16":
        if device.type != "cuda":
            raise UserError("amp=fp16 needs a GPU; use amp=bf16 or amp=off on CPU")
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def use_device_augment(setting: str, device: torch.device) -> bool:
    """auto: on a GPU (the crops cost it next to nothing and free the CPU workers); off on a
    CPU, where the batched crops would take the training process's own time."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def setup_runtime(cfg: TrainConfig, environ) -> Runtime:
    world_size = int(environ.get("WORLD_SIZE", "1"))
    rank = int(environ.get("RANK", "0"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # fixed-size training batches: let cuDNN time its kernels once and keep the fastest
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if rank == 0:
            log.info("distributed: world size %d, backend %s", world_size, backend)
    return Runtime(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        device=device,
        amp_dtype=resolve_amp(cfg.amp, device),
        progress_bar=rank == 0 and sys.stderr.isatty(),
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", "1")),
        scan_cache=Path(environ[SCAN_CACHE_ENV]) if environ.get(SCAN_CACHE_ENV) else None,
        write_report=environ.get(NO_REPORT_ENV) != "1",
    )


def _sum(runtime: Runtime):
    def reduce(t: torch.Tensor) -> torch.Tensor:
        if runtime.distributed:
            t = t.clone()
            dist.all_reduce(t)
        return t

    return reduce


def _relative_files(split: SplitScan) -> list[str]:
    """The split's images as paths under its root (`003.two/12.png`), in sample order."""
    root = Path(split.root)
    out = []
    for path, _ in split.samples:
        try:
            out.append(Path(path).relative_to(root).as_posix())
        except ValueError:
            out.append(path)
    return out


def _gathered(result: engine.EvalResult, indices: list[int]) -> engine.EvalResult:
    """Every process's logits and targets, put back in the split's order (each process
    evaluated the indices its ShardSampler gave it)."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (indices, result.logits, result.targets))
    order = torch.tensor([i for idx, _, _ in parts for i in idx], dtype=torch.long)
    logits = torch.cat([x for _, x, _ in parts])
    targets = torch.cat([t for _, _, t in parts])
    logits[order], targets[order] = logits.clone(), targets.clone()
    return dataclasses.replace(result, logits=logits, targets=targets)


def _broadcast(runtime: Runtime, value: Any) -> Any:
    """Rank 0's value on every rank (our own processes: a pickle between them is fine)."""
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- pieces


def scan_data(contract: TrainingContract, cfg: TrainConfig, runtime: Runtime) -> DatasetScan:
    """Rank 0 checks every image once; too many unreadable ones fail the job with the list."""
    result: Any = None
    if runtime.is_main:
        try:
            result = scan_dataset(
                contract.splits, cache_dir=runtime.scan_cache, max_cost=cfg.max_image_pixels
            )
        except UserError as exc:
            result = exc
    result = _broadcast(runtime, result)
    if isinstance(result, Exception):
        raise result
    bad = result.bad
    if runtime.is_main:
        write_json(contract.layout.skipped_images_file, [b.to_dict() for b in bad])
        for b in bad:
            log.warning("skipped unreadable image %s/%s: %s", b.split, b.path, b.reason)
        for name, scan in result.splits.items():
            log.info(
                "split %s: %d images in %d classes%s",
                name,
                len(scan.samples),
                len(scan.classes),
                f", {len(scan.bad)} skipped" if scan.bad else "",
            )
    if len(bad) > cfg.max_bad_images:
        listed = "; ".join(f"{b.split}/{b.path}" for b in bad[:20])
        raise DataError(
            f"{len(bad)} unreadable images, more than max_bad_images={cfg.max_bad_images}: "
            f"{listed}{' ...' if len(bad) > 20 else ''}. Fix or remove them, or raise "
            "max_bad_images (the full list is in output/data/skipped_images.json)"
        )
    return result


def _workers(cfg: TrainConfig, runtime: Runtime) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    return default_workers(runtime.local_world_size)


def build_loaders(
    scan: DatasetScan,
    cfg: TrainConfig,
    pre: Preprocess,
    runtime: Runtime,
    train_input: tuple[Any, int],
) -> dict[str, Any]:
    """Loaders of uint8 batches; the training split's workers apply `train_input` (transform,
    JPEG draft size) from `data.device.train_input`."""
    workers = _workers(cfg, runtime)
    pin = runtime.device.type == "cuda"
    loaders = {}
    for name, split in scan.splits.items():
        if name == "train":
            transform, draft = train_input
            dataset = ImageListDataset(
                split.samples, transform, draft=draft, seed=cfg.seed, max_cost=cfg.max_image_pixels
            )
            sampler = EpochSampler(
                len(dataset), seed=cfg.seed, rank=runtime.rank, world_size=runtime.world_size
            )
        else:
            dataset = ImageListDataset(
                split.samples,
                eval_transform(pre, normalize=False),
                draft=pre.resize_size,
                max_cost=cfg.max_image_pixels,
            )
            sampler = ShardSampler(len(dataset), rank=runtime.rank, world_size=runtime.world_size)
        loaders[name] = make_loader(
            dataset, sampler, batch_size=cfg.batch_size, workers=workers, pin_memory=pin
        )
    return loaders


def build_feature_loaders(
    layout, scan: DatasetScan, cfg: TrainConfig, pre: Preprocess, model, runtime
) -> tuple[dict[str, Any], features.CachedFeatures]:
    """features_cache: every split embedded once by the frozen backbone (or read back from the
    cache), then batches of embeddings in the same sampler order images would have."""
    if runtime.distributed:
        raise ConfigError(
            "features_cache trains only the head on stored embeddings, which takes seconds: "
            "run it as one process (no torchrun, instance_count 1)"
        )
    workers = _workers(cfg, runtime)

    def image_loader(name: str):
        split = scan.splits[name]
        dataset = ImageListDataset(
            split.samples,
            eval_transform(pre, normalize=False),
            draft=pre.resize_size,
            max_cost=cfg.max_image_pixels,
        )
        return make_loader(
            dataset,
            ShardSampler(len(dataset)),
            batch_size=cfg.batch_size,
            workers=workers,
            pin_memory=runtime.device.type == "cuda",
        )

    root = Path(cfg.features_dir) if cfg.features_dir else layout.checkpoint_dir / "features"
    cached = features.load_or_compute(
        root,
        model,
        cfg.arch,
        pre,
        scan,
        image_loader,
        device=runtime.device,
        amp_dtype=runtime.amp_dtype,
        channels_last=cfg.channels_last,
    )
    shutdown_loaders()  # the image loaders are done: no idle workers while the head trains
    if cached.reused:
        log.info("features: reused %s", cached.path)
    else:
        log.info("features: computed in %.1f s, stored in %s", cached.seconds, cached.path)
    loaders: dict[str, Any] = {}
    for name, split in cached.splits.items():
        n = split.targets.numel()
        sampler = EpochSampler(n, seed=cfg.seed) if name == "train" else ShardSampler(n)
        loaders[name] = features.FeatureBatches(split, sampler, batch_size=cfg.batch_size)
    return loaders, cached


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and norm weights: no decay
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if cfg.fused_optimizer else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, **extra)
    return torch.optim.AdamW(groups, lr=cfg.lr, **extra)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    if cfg.scheduler == "none":
        return None
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Progress:
    """A tqdm bar on a terminal; nothing otherwise (the per-epoch metric line is the log)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def start(self, epoch: int, epochs: int, total: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=f"epoch {epoch}/{epochs}",
                unit="batch",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------- the program


@dataclass
class TrainState:
    """What changes from epoch to epoch; a checkpoint keeps it (`to_dict` / `from_dict`)."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def record(self, epoch: int, row: dict, valid_loss: float) -> bool:
        """One finished epoch; True when its validation loss is the best so far."""
        self.history.append(row)
        self.epoch = epoch
        if valid_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = valid_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def patience_spent(self, patience: int) -> bool:
        return bool(patience) and self.bad_epochs >= patience


class TrainingRun:
    """The training program in named stages over one TrainState: `setup` (data, model, loaders,
    loss, optimizer, hooks), `resume` (from checkpoints/), `fit` (the epochs, a checkpoint after
    each), `finish` (test split, artifact, outputs, rules and report)."""

    def __init__(
        self, contract: TrainingContract, cfg: TrainConfig, runtime: Runtime, stop: StopFlag
    ) -> None:
        self.contract, self.cfg, self.runtime, self.stop = contract, cfg, runtime, stop
        self.layout = contract.layout
        self.state = TrainState()

    # ------------------------------------------------------------ setup

    def setup(self) -> TrainingRun:
        cfg, runtime = self.cfg, self.runtime
        torch.manual_seed(cfg.seed)
        self.scan = scan_data(self.contract, cfg, runtime)
        self.classes = self.scan.classes
        self._setup_model()
        self._setup_data()
        weight = None
        if cfg.class_weights:
            weight = class_weights(self.scan.splits["train"].counts()).to(runtime.device)
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()  # plain mean loss, a module smdebug sees
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, len(self.loaders["train"]))
        self.scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None
        self.best_weights = self._weights()
        self.best_valid: engine.EvalResult | None = None  # its validation answers, this run
        self._setup_hooks()
        return self

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.pre = models.get_architecture(cfg.arch).preprocess(cfg.image_size)
        start = self._start_model()
        self.model = models.build_model(
            cfg.arch,
            len(self.classes),
            pretrained=cfg.pretrained and start is None,  # --init-from: not ImageNet's weights
            weights_path=cfg.weights_path,
            freeze=cfg.freeze or cfg.features_cache,
        )
        self.init_from: dict | None = None
        if start is not None:
            plan = incremental.plan_head(
                start, list(self.classes), arch=cfg.arch, allow_dropped=cfg.init_drop_classes
            )
            incremental.start_network(self.model, start, plan, arch=cfg.arch)
            self.init_from = incremental.record(start, plan)
            if self.runtime.is_main:
                log.info("%s", incremental.describe(start, plan))
        self.model.to(self.runtime.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _start_model(self) -> incremental.StartModel | None:
        """The model in the `model` channel (`train --init-from`), checked, or None."""
        channel = self.contract.init_model
        if channel is None:
            return None
        if self.cfg.weights_path:
            raise UserError(
                "weights_path and --init-from (the model channel) both name the weights to "
                "start from: drop one"
            )
        return incremental.load_start_model(channel)

    def _setup_data(self) -> None:
        cfg, runtime, pre = self.cfg, self.runtime, self.pre
        self.normalize = DeviceNormalize.of(pre)  # the loaders hand over uint8 batches
        self.train_prepare: DeviceNormalize | DeviceAugment = self.normalize
        self.trainable: nn.Module = self.model  # what the loop runs: the model, or its head
        self.batch_channels_last = cfg.channels_last
        self.cached = None
        if cfg.features_cache:
            self.loaders, self.cached = build_feature_loaders(
                self.layout, self.scan, cfg, pre, self.model, runtime
            )
            self.trainable = models.head_module(self.model, cfg.arch)
            self.batch_channels_last = False  # batches of embeddings, not images
            return
        on_device = use_device_augment(cfg.device_augment, runtime.device)
        transform, draft, self.train_prepare = train_input(
            pre,
            hflip=cfg.hflip,
            min_crop_scale=cfg.min_crop_scale,
            on_device=on_device,
            seed=cfg.seed,
            rank=runtime.rank,
            stored_side=stored_short_side(self.scan.splits["train"].root),
        )
        if on_device and runtime.is_main:
            log.info("augmentation: random-resized crops and flips on %s", runtime.device)
        self.loaders = build_loaders(self.scan, cfg, pre, runtime, (transform, draft))

    def _setup_hooks(self) -> None:
        """Debugging (smdebug, one writer) and profiling, both off unless asked for."""
        cfg, runtime = self.cfg, self.runtime
        self.stop_on = debug_stop_rules(cfg.debug_stop_on)  # checked when the config was parsed
        self.debug = DebugHook()
        if runtime.is_main:
            self.debug = create_hook(
                read_debug_settings(self.layout, cfg.debug),
                self.trainable,
                [self.criterion, self.eval_criterion],
                status_dir=self.layout.output_data_dir,
            )
        self.profiler = None
        if cfg.profile and runtime.is_main:
            self.profiler = Profiler(
                self.layout.output_data_dir / PROFILER_DIR, runtime.device
            ).start()

    @property
    def head_only(self) -> bool:
        """On cached features only the head changes: checkpoints keep just it (the frozen
        backbone is never run, and writing it every epoch would cost more than training)."""
        return self.cached is not None

    def _weights(self) -> dict:
        return {k: v.detach().clone() for k, v in self.trainable.state_dict().items()}

    # ------------------------------------------------------------ checkpoints

    def resume(self) -> TrainingRun:
        checkpoint = artifacts.load_checkpoint(self.layout.checkpoint_dir)
        if checkpoint is None:
            return self
        if (
            checkpoint.get("classes") != list(self.classes)
            or checkpoint.get("arch") != self.cfg.arch
            or bool(checkpoint.get("head_only")) != self.head_only
        ):
            raise UserError(
                f"the checkpoint in {self.layout.checkpoint_dir} is from another dataset, "
                "architecture or features_cache setting; delete it (or use a new job) to start "
                "from scratch"
            )
        self.trainable.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and checkpoint.get("scheduler"):
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        artifacts.set_rng_state(checkpoint["rng"])
        self.best_weights = checkpoint["best_model"]
        self.state = TrainState.from_dict(checkpoint["state"])
        if self.runtime.is_main:
            log.info("resuming from checkpoint after epoch %d", self.state.epoch)
        return self

    def save_checkpoint(self) -> None:
        artifacts.save_checkpoint(
            self.layout.checkpoint_dir,
            {
                "model": self.trainable.state_dict(),
                "head_only": self.head_only,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": artifacts.rng_state(),
                "best_model": self.best_weights,
                "state": self.state.to_dict(),
                "classes": list(self.classes),
                "arch": self.cfg.arch,
            },
        )

    # ------------------------------------------------------------ fit

    def _network(self) -> nn.Module:
        net: nn.Module = self.trainable
        if self.runtime.distributed:
            device = self.runtime.device
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if self.cfg.compile:
            if self.debug.active and self.runtime.is_main:
                log.warning("compile with debug: smdebug's hooks break the compiled graph up")
            net = torch.compile(net)  # training only: evaluation's last batch has another shape
        return net

    def evaluate(self, split: str, *, keep_outputs: bool = False) -> engine.EvalResult:
        """One pass over `split`; with `keep_outputs`, every image's logits and target in the
        split's order (gathered from every process)."""
        result = engine.evaluate(
            self.trainable,
            self.loaders[split],
            num_classes=len(self.classes),
            device=self.runtime.device,
            amp_dtype=self.runtime.amp_dtype,
            channels_last=self.batch_channels_last,
            normalize=self.normalize,
            reduce=_sum(self.runtime),
            criterion=self.eval_criterion,
            keep_outputs=keep_outputs,
        )
        if keep_outputs and self.runtime.distributed:
            result = _gathered(result, list(self.loaders[split].sampler))
        return result

    def fit(self) -> TrainingRun:
        cfg, state = self.cfg, self.state
        net = self._network()
        self.progress = Progress(self.runtime.progress_bar)
        self.steps_done = state.epoch * len(self.loaders["train"])
        try:
            for epoch in range(state.epoch + 1, cfg.epochs + 1):
                if state.patience_spent(cfg.patience):
                    break
                self._train_epoch(net, epoch)
        finally:
            if self.profiler is not None:
                self.profiler.stop()
        if state.patience_spent(cfg.patience) and state.epoch < cfg.epochs and self.runtime.is_main:
            log.info(
                "early stopping: valid loss has not improved for %d epochs (best: epoch %d)",
                cfg.patience,
                state.best_epoch,
            )
        return self

    def _on_batch(self, epoch: int, step: int, loss: float) -> None:
        self.progress.update(step, loss)
        self.steps_done += 1
        if "ExplodingTensor" in self.stop_on:
            lr = self.optimizer.param_groups[0]["lr"]
            rules.check_finite_loss(loss, step=self.steps_done, epoch=epoch, lr=lr)

    def _train_epoch(self, net: nn.Module, epoch: int) -> None:
        cfg, runtime, train_loader = self.cfg, self.runtime, self.loaders["train"]
        train_loader.sampler.set_epoch(epoch)
        if isinstance(self.train_prepare, DeviceAugment):
            self.train_prepare.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout etc.: the same on resume
        self.progress.start(epoch, cfg.epochs, len(train_loader))
        on_step_time = None
        if self.profiler is not None:
            on_step_time = functools.partial(self.profiler.record_step, epoch)
        self.debug.train_mode()
        try:
            result = engine.train_one_epoch(
                net,
                train_loader,
                self.criterion,
                self.optimizer,
                device=runtime.device,
                scheduler=self.scheduler,
                scaler=self.scaler,
                amp_dtype=runtime.amp_dtype,
                channels_last=self.batch_channels_last,
                normalize=self.train_prepare,
                should_stop=self.stop,
                on_batch=functools.partial(self._on_batch, epoch),
                on_step_time=on_step_time,
                reduce=_sum(runtime),
            )
        finally:
            self.progress.close()
        self.debug.eval_mode()
        valid = self.evaluate("valid", keep_outputs=True)  # the best epoch's: calibration's
        row = {
            "epoch": epoch,
            "train_loss": result.loss,
            "train_acc": result.accuracy,
            "valid_loss": valid.loss,
            "valid_acc": valid.accuracy,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time": result.seconds,
            "images_per_s": result.images_per_second,
        }
        if self.state.record(epoch, {**row, "data_wait_s": result.data_seconds}, valid.loss):
            self.best_weights = self._weights()
            self.best_valid = valid
        if runtime.is_main:
            print(metrics.format_epoch_line(row), flush=True)
            self.save_checkpoint()
        if runtime.distributed:
            dist.barrier()
        if self.stop():
            raise TrainingStopped
        if "Overfit" in self.stop_on:
            rules.check_overfit_history(self.state.history)

    # ------------------------------------------------------------ finish

    def finish(self) -> dict:
        """The best epoch's weights, the test split, then (main process) the artifact, the
        job's outputs, the rules' verdicts and the report. Returns the summary."""
        state, runtime = self.state, self.runtime
        self.trainable.load_state_dict(self.best_weights)
        summary: dict[str, Any] = {
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "valid_loss": state.best_loss,
            "valid_acc": next(
                (h["valid_acc"] for h in state.history if h["epoch"] == state.best_epoch), None
            ),
        }
        if self.cached is not None:
            summary["features"] = self.cached.info()
        if self.init_from is not None:
            summary["init_from"] = self.init_from
        labels = [label_name(c) for c in self.classes]
        self.debug.predict_mode()  # these passes land apart from validation (PREDICT)
        self.calibration = self._calibrate(labels)
        summary["calibration"] = self.calibration.summary(labels)
        self.test_outputs = None
        if "test" in self.loaders:
            test = self.evaluate("test", keep_outputs=True)
            summary.update(
                test_loss=test.loss,
                test_acc=test.accuracy,
                test_top5=test.top5,
                test_images=test.images,
                per_class_accuracy=dict(zip(labels, test.per_class_accuracy())),
                confusion_matrix=test.confusion.tolist(),
            )
            self.test_outputs = scores.evaluation(
                test.logits.numpy(),
                test.targets.numpy(),
                labels,
                temperature=self.calibration.temperature,
            )
            summary.update(scores.split_summary("test", self.test_outputs))
            if runtime.is_main:
                line = {"test_loss": test.loss, "test_acc": test.accuracy, "test_top5": test.top5}
                print(metrics.format_test_line(line), flush=True)
                files = _relative_files(self.scan.splits["test"])
                probs = scores.softmax(test.logits.numpy(), self.calibration.temperature)
                atomic_write(
                    self.layout.output_data_dir / scores.predictions_file("test"),
                    scores.predictions_csv(files, test.targets.tolist(), probs, labels),
                )
        elif runtime.is_main:
            log.warning("no test split: the model is saved without a test evaluation")
        self.debug.close()
        if runtime.is_main:
            self._write_outputs(summary, labels)
            _rules_and_report(self.layout, self.debug, runtime)
        return summary

    def _calibrate(self, labels: list[str]) -> scores.Calibration:
        """The temperature and the per-class thresholds, fitted on the validation split's
        answers of the weights being saved: those of the best epoch's own validation pass (no
        second pass, so the debugging hook records each split once), or, when that epoch ran
        before a resume, a validation pass of the restored weights (recorded as EVAL)."""
        valid = self.best_valid
        if valid is None:
            self.debug.eval_mode()
            valid = self.evaluate("valid", keep_outputs=True)
            self.debug.predict_mode()
        calibration = scores.calibrate(valid.logits.numpy(), valid.targets.numpy(), labels)
        if self.runtime.is_main:
            log.info(
                "calibration: temperature %.3f, validation ECE %.4f -> %.4f",
                calibration.temperature,
                calibration.valid_ece_uncalibrated or 0.0,
                calibration.valid_ece or 0.0,
            )
        return calibration

    def _write_outputs(self, summary: dict, labels: list[str]) -> None:
        cfg, layout = self.cfg, self.layout
        model_config = {
            "arch": cfg.arch,
            "classes": list(self.classes),
            "preprocess": self.pre.to_dict(),
            "channels_last": cfg.channels_last,
            "training_job": self.contract.job_name,
            **self.calibration.model_config(),
            **({"init_from": self.init_from} if self.init_from is not None else {}),
        }
        artifacts.save_artifact(
            layout.model_dir,
            state_dict=self.model.state_dict(),
            labels=labels,
            config=model_config,
            metrics=summary,
        )
        # The ONNX graph an endpoint serves, made once here rather than at every start.
        why_not = graph.write_graph(layout.model_dir)
        if why_not is None:
            log.info("ONNX graph written beside the model (%s)", GRAPH_FILE)
        else:
            log.warning("no ONNX graph in the artifact (endpoints export it at start): %s", why_not)
        write_json(layout.history_file, self.state.history)
        write_json(layout.run_config_file, cfg.to_dict())
        write_json(
            layout.evaluation_file,
            {
                "labels": labels,
                **summary,
                "train_counts": self.scan.splits["train"].counts(),
                "device": self.runtime.device.type,
                "reliability": {
                    "valid": self.calibration.reliability,
                    **({"test": self.test_outputs["reliability"]} if self.test_outputs else {}),
                },
                **(
                    {"test_root": str(self.scan.splits["test"].root)}
                    if "test" in self.scan.splits
                    else {}
                ),
            },
        )
        log.info("model saved to %s", layout.model_dir)


def run(contract: TrainingContract, cfg: TrainConfig, runtime: Runtime, stop: StopFlag) -> dict:
    """The whole program: setup, resume, fit, finish."""
    return TrainingRun(contract, cfg, runtime, stop).setup().resume().fit().finish()


def _rules_and_report(layout, debug: DebugHook, runtime: Runtime) -> None:
    """After training (main process): the rules over the recorded tensors, their verdicts in
    the log and output/data/rules.json, then output/data/report.html."""
    from imgclf import report

    if debug.active:
        # What the job just wrote (config.json, evaluation.json), as `launch.py debug` reads it
        context = JobOutputs(layout).rules_context()
        verdicts = rules.run_rules(debug.settings.out_dir, context)
        for verdict in verdicts:
            (log.warning if verdict.status == "fired" else log.info)("%s", verdict.line())
        write_json(layout.rules_file, rules.verdicts_to_json(verdicts))
    if not runtime.write_report:
        log.info("report: not written now (launch.py report %s writes it)", layout.base)
        return
    path = report.write_report_or_warn(layout.base, log.warning)
    if path is not None:
        log.info("report: %s", path)


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def main(environ=None) -> int:
    """Entry: reads the contract, trains, and turns any failure into output/failure."""
    environ = os.environ if environ is None else environ
    _configure_logging()
    stop = StopFlag()
    stop.install()
    contract = None
    rank = int(environ.get("RANK", "0"))
    try:
        contract = read_training_contract(environ)
        cfg = parse_hyperparameters(contract.hyperparameters)
        runtime = setup_runtime(cfg, environ)
        started = time.perf_counter()
        run(contract, cfg, runtime, stop)
        if rank == 0:
            log.info("training finished in %.1f s", time.perf_counter() - started)
        return 0
    except Exception as exc:
        return _report_failure(exc, contract, rank, stopped=stop())
    finally:
        shutdown_loaders()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _report_failure(
    exc: Exception, contract: TrainingContract | None, rank: int, *, stopped: bool
) -> int:
    """Log the failure, write output/failure (rank 0 only) and return the exit code. A user's
    error gets its message; our bug gets a short reason and its traceback in the log."""
    if stopped or isinstance(exc, TrainingStopped):  # SIGTERM may surface as another error
        message = (
            "Stopped by SIGTERM: the checkpoint of the last completed epoch is kept in "
            "checkpoints/; start the same job again to resume from it"
        )
        log.warning(message)
        code = EXIT_STOPPED
    elif isinstance(exc, UserError):
        message = f"ClientError: {exc}"
        log.error("%s", exc)
        code = 2
    else:
        message = (
            f"AlgorithmError: {type(exc).__name__}: {exc} (an imgclf bug: the job log "
            "has the traceback; please report it)"
        )
        log.error("unexpected error:\n%s", "".join(traceback.format_exception(exc)))
        code = 1
    if rank == 0:
        if contract is not None:
            write_failure(contract.layout, message)
        else:
            print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
