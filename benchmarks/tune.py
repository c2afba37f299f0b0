"""Early stopping in the local tuner: the same trials with and without pruning, on digits.

Run: .venv/bin/python benchmarks/tune.py [--trials 6] [--parallel 2] [--epochs 4]
Both studies get the same hyperparameter sets (drawn once from a seeded generator and queued
in each study, in the same order); one prunes with the median rule, one does not.
Prints trial-epochs spent, wall time and the best valid_loss of each, and the ratios.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import yaml
from machine import describe

from imgclf.sample import write_digits
from imgclf.tuning import local as tuner
from imgclf.tuning.space import load_space

FIXED = {"arch": "resnet18", "pretrained": "false", "image_size": "16", "hflip": "false"}


def trial_params(n: int) -> list[dict]:
    rng = random.Random(3)
    return [
        {"lr": 10 ** rng.uniform(-5, math.log10(3e-2)), "batch_size": rng.choice(["32", "64"])}
        for _ in range(n)
    ]


def run(data: Path, root: Path, *, early: bool, trials: int, parallel: int, epochs: int):
    space_file = root / f"space-{early}.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "objective": {"metric": "valid_loss", "type": "minimize"},
                "strategy": "random",
                "max_trials": trials,
                "parallel_trials": parallel,
                "early_stopping": early,
                "seed": 3,
                "parameters": {
                    "lr": {"type": "continuous", "min": 1e-5, "max": 3e-2, "scaling": "log"},
                    "batch_size": {"type": "categorical", "values": [32, 64]},
                },
            }
        )
    )
    space = load_space(space_file, fixed={**FIXED, "epochs": str(epochs), "workers": "0"})
    out = root / ("early" if early else "full")
    out.mkdir()
    study = tuner.open_study(space, tuner.default_storage(out), max_epochs=epochs)
    for params in trial_params(trials):
        study.enqueue_trial(params)
    start = time.perf_counter()
    best = tuner.run_tuning(space, data_dir=data, out_dir=out)
    wall = time.perf_counter() - start
    _, rows = tuner.load_status(out)
    trial_epochs = sum(int(r[2]) for r in rows)
    pruned = sum(r[1] == "PRUNED" for r in rows)
    return {
        "wall": wall,
        "epochs": trial_epochs,
        "pruned": pruned,
        "best": best["objective"]["value"],
        "best_params": {k: best["hyperparameters"][k] for k in ("lr", "batch_size")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-tune-") as tmp:
        root = Path(tmp)
        data = root / "digits"
        write_digits(data)
        results = {}
        for early in (False, True):
            results[early] = run(
                data,
                root,
                early=early,
                trials=args.trials,
                parallel=args.parallel,
                epochs=args.epochs,
            )
    print(
        f"\nmachine: {describe()} (trials on the CPU); "
        f"{args.trials} trials x up to {args.epochs} epochs, {args.parallel} in parallel, "
        "ResNet-18 at 16 px on scikit-learn digits"
    )
    print(f"{'early stopping':<16}{'trial-epochs':>14}{'pruned':>8}{'wall s':>9}  best valid_loss")
    for early in (False, True):
        r = results[early]
        print(
            f"{'on' if early else 'off':<16}{r['epochs']:>14}{r['pruned']:>8}{r['wall']:>9.1f}"
            f"  {r['best']:.4f} {r['best_params']}"
        )
    off, on = results[False], results[True]
    print(
        f"\nwith/without early stopping: trial-epochs {on['epochs'] / off['epochs']:.2f}x, "
        f"wall time {on['wall'] / off['wall']:.2f}x, "
        f"best valid_loss {on['best']:.4f} vs {off['best']:.4f}"
    )


if __name__ == "__main__":
    main()
