"""Tuning trials on cached features vs full fine-tune trials: time and accuracy of each.

Run: .venv/bin/python benchmarks/features.py [--image-size 64] [--epochs 6] [--trials 4]
Two local tuning studies on scikit-learn's digits, run by the local tuner as `launch.py tune`
runs them, with the same fixed hyperparameters and queued learning rates:
- full: one full fine-tune trial (every layer trains, augmented crops every epoch): a `train`
  process over a job dir, as SageMaker runs a trial;
- cached: `--trials` trials with `features_cache=true`, one after another in the tuner's trial
  worker: the first starts the worker (imports, once per tuning job) and embeds every split,
  the later ones read the embeddings back and train the head.
Prints each trial's wall time as the tuner sees it (Optuna's trial start to end: job dir,
process or worker, training, test, artifact), its training time (the job's own "training
finished" figure), test accuracy, and the ratios full / cached. No pretrained weights can be
downloaded here, so the backbone is a random-init network: that limits the cached head's
accuracy, not its speed.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import yaml
from machine import describe

from imgclf.sample import write_digits
from imgclf.tuning import local as tuner
from imgclf.tuning.space import load_space
from imgclf.tuning.study import default_storage, open_study


def run_study(root: Path, data: Path, name: str, fixed: dict[str, str], lrs: list[float]):
    """A study of len(lrs) trials (those learning rates, in order), one at a time."""
    space_file = root / f"{name}.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "objective": {"metric": "valid_loss", "type": "minimize"},
                "strategy": "random",
                "max_trials": len(lrs),
                "parallel_trials": 1,
                "early_stopping": False,
                "parameters": {"lr": {"type": "continuous", "min": 1e-4, "max": 0.1}},
            }
        )
    )
    space = load_space(space_file, fixed=fixed)
    out = root / name
    out.mkdir()
    study = open_study(space, default_storage(out), max_epochs=space.max_epochs())
    for lr in lrs:
        study.enqueue_trial({"lr": lr})
    start = time.perf_counter()
    tuner.run_tuning(space, data_dir=data, out_dir=out)
    total = time.perf_counter() - start
    rows = []
    for trial in study.trials:
        job = Path(trial.user_attrs["job_dir"])
        log = (job / "train.log").read_text()
        metrics = json.loads((job / "model" / "metrics.json").read_text())
        rows.append(
            {
                "wall": (trial.datetime_complete - trial.datetime_start).total_seconds(),
                "train": float(re.search(r"training finished in ([0-9.]+) s", log).group(1)),
                "acc": metrics["test_acc"],
                "reused": metrics.get("features", {}).get("reused"),
            }
        )
    return rows, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--trials", type=int, default=4, help="cached-feature trials")
    args = parser.parse_args()
    common = {
        "arch": args.arch,
        "pretrained": "false",
        "image_size": str(args.image_size),
        "epochs": str(args.epochs),
        "batch_size": "64",
        "hflip": "false",
        "min_crop_scale": "0.6",
        "patience": "0",
    }
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-features-") as tmp:
        root, data = Path(tmp), Path(tmp) / "digits"
        write_digits(data)
        (full,), full_total = run_study(root, data, "full", common, [0.003])
        cached_hps = {**common, "features_cache": "true", "features_dir": str(root / "features")}
        lrs = [0.01 * (i + 1) for i in range(args.trials)]
        cached, cached_total = run_study(root, data, "cached", cached_hps, lrs)
    assert [r["reused"] for r in cached] == [False] + [True] * (len(cached) - 1), cached
    later = cached[1:]
    later_wall = sum(r["wall"] for r in later) / len(later)
    later_train = sum(r["train"] for r in later) / len(later)
    per_trial = cached_total / len(cached)
    print(
        f"\nmachine: {describe()}; digits 1797 images, {args.arch} random init, "
        f"{args.image_size} px, {args.epochs} epochs; trials as the local tuner runs them"
    )
    print(f"{'trial':<46}{'wall s':>8}{'train s':>9}{'test acc':>10}{'wall vs full':>14}")
    named = [("full fine-tune (a train process)", full)]
    named.append(("cached, first (starts the worker, embeds)", cached[0]))
    for i, r in enumerate(later, 1):
        named.append((f"cached, later #{i} (reads back, in the worker)", r))
    for name, r in named:
        print(
            f"{name:<46}{r['wall']:>8.1f}{r['train']:>9.1f}{r['acc']:>10.2%}"
            f"{full['wall'] / r['wall']:>13.1f}x"
        )
    print(
        f"\nlater cached trial vs full fine-tune: {full['wall'] / later_wall:.1f}x less wall time "
        f"per trial ({later_wall:.2f} s vs {full['wall']:.1f} s), "
        f"{full['train'] / later_train:.1f}x less training time"
    )
    print(
        f"whole cached study, worker start and embedding included: {cached_total:.1f} s for "
        f"{len(cached)} trials, {per_trial:.2f} s a trial, {full['wall'] / per_trial:.1f}x less "
        f"than the full fine-tune trial (its study: {full_total:.1f} s)"
    )


if __name__ == "__main__":
    main()
