"""Tuning trials on cached features vs full fine-tune trials: time and accuracy of each.

Run: .venv/bin/python benchmarks/features.py [--image-size 64] [--epochs 6] [--arch resnet18]
Three local training jobs on scikit-learn's digits (the launcher, as a tuning trial runs them:
without a report.html), with the same hyperparameters:
- full: a full fine-tune (every layer trains, augmented crops every epoch);
- cached, first: `features_cache=true`, which embeds every split once and trains the head;
- cached, later: the same again with another learning rate, as the next trial of a study: the
  embeddings are read back.
Prints each job's wall time (process start to exit, as the tuner sees it) and training time (the
job's own "training finished" figure, without interpreter start-up), test accuracy, and the
ratios full / cached. No pretrained weights can be downloaded here, so the backbone is a
random-init network: that limits the cached head's accuracy, not its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

from imgclf.contract import NO_REPORT_ENV

ROOT = Path(__file__).resolve().parents[1]


def run_job(home: Path, data: Path, name: str, hps: dict[str, str]) -> dict:
    command = [sys.executable, str(ROOT / "launch.py"), "train", "--data", str(data)]
    command += ["--job-name", name, "--hp", *[f"{k}={v}" for k, v in hps.items()]]
    start = time.perf_counter()
    proc = subprocess.run(
        command,
        cwd=ROOT,
        # as the local tuner runs its trials: no report.html per trial
        env={**os.environ, "IMGCLF_HOME": str(home), NO_REPORT_ENV: "1"},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"job {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    log = (home / "jobs" / name / "train.log").read_text()
    trained = float(re.search(r"training finished in ([0-9.]+) s", log).group(1))
    metrics = json.loads((home / "jobs" / name / "model" / "metrics.json").read_text())
    return {"wall": wall, "train": trained, "acc": metrics["test_acc"], "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from imgclf.sample import write_digits

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
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-features-") as tmp:
        home, data = Path(tmp) / "home", Path(tmp) / "digits"
        write_digits(data)
        full = run_job(home, data, "full", {**common, "lr": "0.003"})
        rows.append(("full fine-tune", full))
        cached = {**common, "features_cache": "true", "features_dir": str(home / "features")}
        first = run_job(home, data, "cached-1", {**cached, "lr": "0.01"})
        rows.append(("cached features, first trial (embeds)", first))
        later = run_job(home, data, "cached-2", {**cached, "lr": "0.02"})
        rows.append(("cached features, later trial (reads back)", later))
        assert later["metrics"]["features"]["reused"], "the second cached job did not reuse"
    print(
        f"\nmachine: {describe()}; digits 1797 images, {args.arch} random init, "
        f"{args.image_size} px, {args.epochs} epochs"
    )
    print(f"{'trial':<44}{'wall s':>8}{'train s':>9}{'test acc':>10}{'wall vs full':>14}")
    for name, r in rows:
        print(
            f"{name:<44}{r['wall']:>8.1f}{r['train']:>9.1f}{r['acc']:>10.2%}"
            f"{full['wall'] / r['wall']:>13.1f}x"
        )
    print(
        f"\nlater cached trial vs full fine-tune: {full['wall'] / later['wall']:.1f}x less wall "
        f"time per trial, {full['train'] / later['train']:.1f}x less training time; "
        f"test accuracy {later['acc']:.2%} vs {full['acc']:.2%}"
    )


if __name__ == "__main__":
    main()
