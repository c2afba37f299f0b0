"""Datasets, samplers and loaders over scanned samples (seeded per sample and epoch, so a
resumed job repeats its augmentation), the loaders' shutdown at exit, and class weights."""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from imgclf.data.decode import MAX_DECODE_COST, open_image
from imgclf.errors import DataError
from imgclf.util import cpu_count


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Balanced weights n / (k · n_c), as scikit-learn's class_weight='balanced'."""
    counts_t = torch.tensor(counts, dtype=torch.float64)
    weights = counts_t.sum() / (len(counts) * counts_t.clamp(min=1))
    return weights.float()


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
