"""`launch.py data …`: sample datasets, checks, prepared copies (no target involved)."""

from __future__ import annotations

from pathlib import Path

from imgclf.cli.common import home, print_table
from imgclf.errors import UserError


def cmd_data_sample(args) -> int:
    from imgclf.sample import write_digits

    root = Path(args.dir)
    if root.exists() and any(root.iterdir()) and not args.force:
        if (root / "train").is_dir():
            print(f"{root} already holds a dataset (use --force to write it again)")
            return 0
        raise UserError(f"{root} exists and is not empty; choose an empty folder or --force")
    counts = write_digits(root, size=args.size, seed=args.seed)
    print(
        f"wrote scikit-learn digits to {root}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + " images, 10 classes"
    )
    return 0


def _split_dirs(root: Path) -> dict[str, Path]:
    from imgclf.contract import resolve_splits

    return resolve_splits({"training": root})


def cmd_data_check(args) -> int:
    from imgclf.config import parse_hyperparameters
    from imgclf.data.scan import scan_dataset

    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    bound = {"max_image_pixels": args.max_image_pixels} if args.max_image_pixels else {}
    max_cost = parse_hyperparameters(bound).max_image_pixels  # checked as training checks it
    scan = scan_dataset(_split_dirs(root), max_cost=max_cost)
    names = list(scan.splits)
    print(f"dataset {root}: {len(scan.classes)} classes, splits: {', '.join(names)}")
    counts = {name: s.counts() for name, s in scan.splits.items()}
    if len(scan.classes) <= args.max_rows:
        rows = [[c, *(counts[n][i] for n in names)] for i, c in enumerate(scan.classes)]
        print_table(rows, ["class", *names])
    total_row = [["total", *(sum(counts[n]) for n in names)]]
    print_table(total_row, ["", *names])
    for name in names:
        c = [x for x in counts[name] if x > 0] or [0]
        ratio = max(c) / max(min(c), 1)
        note = "  (consider --hp class_weights=true)" if ratio >= 3 and name == "train" else ""
        print(f"{name}: per class min {min(c)}, max {max(c)}, imbalance {ratio:.1f}x{note}")
    bad = scan.bad
    ignored = [f"{n}/{p}" for n, s in scan.splits.items() for p in s.ignored]
    if ignored:
        print(
            f"{len(ignored)} files ignored (not images by name): "
            + ", ".join(ignored[:10])
            + (" ..." if len(ignored) > 10 else "")
        )
    if bad:
        print(f"{len(bad)} unreadable images (training skips them):")
        for b in bad:
            print(f"  {root / b.split / b.path}: {b.reason}")
        return 1 if args.strict else 0
    print("all images readable")
    return 0


def cmd_data_prepare(args) -> int:
    from imgclf.prepare import cache_dir, prepare_dataset

    source = Path(args.dir)
    if not source.is_dir():
        raise UserError(f"{source} is not a directory")
    out = Path(args.out) if args.out else cache_dir(home(args), source, args.size, args.format)
    result = prepare_dataset(source, out, short_side=args.size, fmt=args.format)
    print(result.summary())
    for path, why in result.skipped[:20]:
        print(f"  skipped {path}: {why}")
    print(f"  train on it: python launch.py train --data {out} ...")
    return 0
