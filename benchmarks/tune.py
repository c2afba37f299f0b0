"""Early stopping in the local tuner: the same trials with and without it, on digits.

Run: .venv/bin/python benchmarks/tune.py [--trials 12] [--epochs 8] [--parallel 2]
         [--rules asha,median]
Every study gets the same hyperparameter sets (drawn once from a seeded generator and queued in
the same order): one without early stopping, one per rule with it (asha is the default; each
with the default early_stopping_metric, auto). Prints trial-epochs spent, wall time and the best
trial of each, and the ratios against no early stopping. Then it replays rules on the learning
curves the study without early stopping recorded (no training: Optuna's pruners fed the
recorded epochs, 2 trials at a time, in 60 shuffled trial orders): how often each keeps the
eventual best trial and what it spends, judged on the validation or the training loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from machine import describe

from imgclf.sample import write_digits
from imgclf.tuning import local as tuner
from imgclf.tuning.replay import replay
from imgclf.tuning.results import load_status
from imgclf.tuning.space import TuningSpace, load_space
from imgclf.tuning.study import default_storage, open_study

FIXED = {"arch": "resnet18", "pretrained": "false", "image_size": "16", "hflip": "false"}


def trial_params(n: int) -> list[dict]:
    rng = random.Random(3)
    return [
        {"lr": 10 ** rng.uniform(-5, math.log10(3e-2)), "batch_size": rng.choice(["32", "64"])}
        for _ in range(n)
    ]


def make_space(root: Path, rule: str | None, *, trials: int, parallel: int, epochs: int):
    space_file = root / f"space-{rule}.yaml"
    doc = {
        "objective": {"metric": "valid_loss", "type": "minimize"},
        "strategy": "random",
        "max_trials": trials,
        "parallel_trials": parallel,
        "early_stopping": rule is not None,
        "seed": 3,
        "parameters": {
            "lr": {"type": "continuous", "min": 1e-5, "max": 3e-2, "scaling": "log"},
            "batch_size": {"type": "categorical", "values": [32, 64]},
        },
    }
    if rule is not None:
        doc["early_stopping_rule"] = rule
    space_file.write_text(yaml.safe_dump(doc))
    return load_space(space_file, fixed={**FIXED, "epochs": str(epochs), "workers": "0"})


def run(data: Path, root: Path, space: TuningSpace, name: str, epochs: int) -> dict:
    out = root / name
    out.mkdir()
    study = open_study(space, default_storage(out), max_epochs=epochs)
    for params in trial_params(space.max_trials):
        study.enqueue_trial(params)
    start = time.perf_counter()
    best = tuner.run_tuning(space, data_dir=data, out_dir=out)
    wall = time.perf_counter() - start
    _, rows = load_status(out)
    # Each finished trial's learning curve (a pruned trial stops before it writes one).
    files = {
        t.number: Path(t.user_attrs["job_dir"]) / "output/data/history.json" for t in study.trials
    }
    histories = {n: json.loads(f.read_text()) for n, f in files.items() if f.exists()}
    shutil.rmtree(out)  # the trials' models: ~45 MB each
    return {
        "wall": wall,
        "epochs": sum(int(r[2]) for r in rows),
        "pruned": sum(r[1] == "PRUNED" for r in rows),
        "best_trial": best["trial"],
        "best": best["objective"]["value"],
        "best_params": {k: best["hyperparameters"][k] for k in ("lr", "batch_size")},
        "histories": histories,
    }


def replay_table(space: TuningSpace, histories: list[list[dict]], parallel: int) -> None:
    rng = random.Random(0)
    orders = [rng.sample(range(len(histories)), len(histories)) for _ in range(60)]
    rules = [("asha", None), ("asha", 1), ("median", None), ("median", 0)]
    print(f"\nreplay on the recorded curves, {len(orders)} trial orders, {parallel} at a time:")
    print(f"{'rule':<12}{'min epochs':>11}  {'judged on':<11}{'trial-epochs':>13}{'kept best':>11}")
    for rule, min_epochs in rules:
        for judge in ("valid_loss", "train_loss"):
            variant = dataclasses.replace(
                space,
                early_stopping=True,
                early_stopping_rule=rule,
                early_stopping_min_epochs=min_epochs,
                early_stopping_metric=judge,
            )
            runs = [replay(variant, histories, order, parallel=parallel) for order in orders]
            mean = sum(r.ratio for r in runs) / len(runs)
            kept = sum(r.kept_best for r in runs)
            print(
                f"{rule:<12}{variant.min_epochs_before_stopping():>11}  {judge:<11}"
                f"{mean:>12.2f}x{kept:>8}/{len(runs)}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rules", default="asha", help="early stopping rules to run for real")
    args = parser.parse_args()
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    shape = {"trials": args.trials, "parallel": args.parallel, "epochs": args.epochs}
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-tune-") as tmp:
        root = Path(tmp)
        data = root / "digits"
        write_digits(data)
        off_space = make_space(root, None, **shape)
        results = {"off": run(data, root, off_space, "off", args.epochs)}
        spaces = {}
        for rule in rules:
            spaces[rule] = make_space(root, rule, **shape)
            results[rule] = run(data, root, spaces[rule], rule, args.epochs)
    print(
        f"\nmachine: {describe()} (trials on the CPU); "
        f"{args.trials} trials x up to {args.epochs} epochs, {args.parallel} in parallel, "
        "ResNet-18 at 16 px on scikit-learn digits"
    )
    print(
        f"{'early stopping':<28}{'trial-epochs':>13}{'pruned':>8}{'wall s':>9}"
        f"  best trial: valid_loss, hyperparameters"
    )
    for name, r in results.items():
        label = "off" if name == "off" else f"{name} on {spaces[name].stopping_metric()}"
        print(
            f"{label:<28}{r['epochs']:>13}{r['pruned']:>8}{r['wall']:>9.1f}"
            f"  #{r['best_trial']}: {r['best']:.4f} {r['best_params']}"
        )
    off = results["off"]
    for rule in rules:
        on = results[rule]
        same = "the same best trial" if on["best_trial"] == off["best_trial"] else "ANOTHER best"
        print(
            f"{rule} / off: trial-epochs {on['epochs'] / off['epochs']:.2f}x, "
            f"wall time {on['wall'] / off['wall']:.2f}x, {same} "
            f"(#{on['best_trial']} vs #{off['best_trial']})"
        )
    histories = [off["histories"][n] for n in sorted(off["histories"])]
    replay_table(off_space, histories, args.parallel)


if __name__ == "__main__":
    main()
