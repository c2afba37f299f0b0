"""Scanning ImageFolder splits: class folders, candidate files, each image decoded once to find
the unreadable ones (verdicts cached between jobs), the splits checked against each other, and
the label a class folder stands for. No torch."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data.decode import MAX_DECODE_COST, try_open_image
from imgclf.errors import DataError
from imgclf.util import cpu_count, write_json

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# Decoding at 1/8 scale still reads every byte of a JPEG: truncation is found, cheaply.
_CHECK_DRAFT = 64
_PREFIX = re.compile(r"^\d+[._-]")


def image_problem(path: Path, *, max_cost: int = MAX_DECODE_COST) -> str | None:
    """Why an image cannot be used, or None when it decodes within `max_cost`."""
    return try_open_image(path, draft=_CHECK_DRAFT, max_cost=max_cost)[1]


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
