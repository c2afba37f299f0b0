"""The prepared-dataset cache: every image decoded once (JPEG draft mode), resized to a short
side a little above the training size, and stored in the same ImageFolder layout, either as
raw RGB (binary PPM: no decoding at all when read, ~5x the bytes of a JPEG; the local default)
or as a high-quality JPEG (small: for uploading as a SageMaker channel). Training reads it like
any dataset (random crops and flips as usual); both are plain image files any ImageFolder tool
opens.

A manifest keyed by each source file's path, size and mtime makes a re-run rebuild only what
changed, and remove what was deleted.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from imgclf.contract import resolve_splits
from imgclf.data.decode import try_open_image
from imgclf.data.scan import list_split
from imgclf.errors import DataError, UserError
from imgclf.util import atomic_write, cpu_count, write_json

MANIFEST = "prepared.json"
FORMAT_VERSION = 1
DEFAULT_SHORT_SIDE = 256  # the eval resize of a 224 px model: random crops still have room
QUALITY = 95
# name -> (file suffix, PIL format, save options)
FORMATS = {
    "raw": (".ppm", "PPM", {}),
    "jpeg": (".jpg", "JPEG", {"quality": QUALITY, "subsampling": 0}),
}


@dataclass(frozen=True)
class PrepareResult:
    root: Path
    built: int
    kept: int
    removed: int
    skipped: list[tuple[str, str]]  # (source path, why)

    def summary(self) -> str:
        return (
            f"prepared {self.root}: {self.built} images written, {self.kept} unchanged, "
            f"{self.removed} removed, {len(self.skipped)} unreadable skipped"
        )


def cache_dir(home: Path, source: Path, short_side: int, fmt: str = "raw") -> Path:
    """Where `launch.py train --prepare` keeps the prepared copy of `source`."""
    key = hashlib.sha256(f"{source.resolve()}|{short_side}|{fmt}".encode()).hexdigest()[:16]
    return home / "prepared" / f"{source.resolve().name}-{short_side}-{fmt}-{key}"


def stored_short_side(split_dir: Path) -> int | None:
    """The short side a prepared copy was stored at, when `split_dir` (e.g. .../train) lies in
    one; None for any other dataset. Device augmentation cuts its squares at this size."""
    try:
        manifest = json.loads((Path(split_dir).parent / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    side = manifest.get("short_side") if isinstance(manifest, dict) else None
    return side if isinstance(side, int) and side > 0 else None


def _resize(image: Image.Image, short_side: int) -> Image.Image:
    w, h = image.size
    scale = short_side / min(w, h)
    if scale >= 1:
        return image  # never upscale: the crop does that at training time
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.BICUBIC, reducing_gap=2.0)


def _build(source: Path, target: Path, short_side: int, fmt: str) -> str | None:
    image, problem = try_open_image(source, draft=short_side)
    if image is None:
        return problem
    image = _resize(image, short_side)
    _, pil_format, options = FORMATS[fmt]
    atomic_write(target, lambda handle: image.save(handle, format=pil_format, **options))
    return None


def prepared_copy(home: Path, source: Path, short_side: int, fmt: str) -> Path:
    """`train --prepare`: the prepared copy of `source` kept under <home>/prepared, built or
    brought up to date first (only the files that changed are decoded again)."""
    if not source.is_dir():
        raise UserError(f"--data {source} is not a directory")
    result = prepare_dataset(
        source, cache_dir(home, source, short_side, fmt), short_side=short_side, fmt=fmt
    )
    print(result.summary(), flush=True)
    return result.root


def prepare_dataset(
    data_dir: Path,
    out_dir: Path,
    *,
    short_side: int = DEFAULT_SHORT_SIDE,
    fmt: str = "raw",
    threads: int | None = None,
) -> PrepareResult:
    """Write (or bring up to date) the prepared copy of `data_dir` in `out_dir`."""
    if short_side < 16:
        raise DataError(f"short side {short_side} px is too small; use at least the image size")
    if fmt not in FORMATS:
        raise DataError(f"unknown prepared format {fmt!r}; use one of {', '.join(FORMATS)}")
    suffix = FORMATS[fmt][0]
    splits = resolve_splits({"training": Path(data_dir)})
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    try:
        old = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        old = {}
    same_settings = (
        old.get("short_side") == short_side
        and old.get("version") == FORMAT_VERSION
        and old.get("format", "jpeg") == fmt
    )
    old_files: dict[str, list] = old.get("files", {}) if same_settings else {}
    files: dict[str, list] = {}
    todo: list[tuple[str, Path, Path]] = []
    kept = 0
    for name, root in splits.items():
        _, listed, _ = list_split(name, root)
        for path, _ in listed:
            rel = f"{name}/{path.relative_to(root).as_posix()}"
            stat = path.stat()
            key = [stat.st_size, stat.st_mtime_ns]
            target = out_dir / (rel + suffix)
            entry = old_files.get(rel)
            if entry and entry[:2] == key and (entry[2] is None or target.exists()):
                files[rel] = entry
                kept += 1
            else:
                todo.append((rel, path, target))
                files[rel] = [*key, None]
    threads = threads or min(16, 2 * cpu_count())
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = list(pool.map(lambda item: _build(item[1], item[2], short_side, fmt), todo))
    skipped = []
    for (rel, path, target), problem in zip(todo, problems):
        if problem is None:
            files[rel][2] = target.relative_to(out_dir).as_posix()
        else:
            files[rel][2] = None
            target.unlink(missing_ok=True)
            skipped.append((str(path), problem))
    removed = 0
    written = {entry[2] for entry in files.values() if entry[2]}
    # Every file the last run wrote that this one did not: deleted sources, and the whole old
    # copy when the settings changed (another format leaves other file names behind).
    for entry in old.get("files", {}).values():
        if entry[2] and entry[2] not in written:
            (out_dir / entry[2]).unlink(missing_ok=True)
            removed += 1
    for folder in sorted((p for p in out_dir.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()  # a class or split that no longer has images
    write_json(
        manifest_path,
        {
            "version": FORMAT_VERSION,
            "source": str(Path(data_dir).resolve()),
            "short_side": short_side,
            "format": fmt,
            "files": files,
        },
        indent=None,
    )
    built = len(todo) - len(skipped)
    return PrepareResult(out_dir, built, kept, removed, skipped)
