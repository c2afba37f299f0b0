"""`train --init-from` and `tune --init-from` on the local target, end to end on digits: a model
of classes 0-7 grows to 0-9 in one epoch without forgetting the old ones, one more epoch on the
same classes is no worse, and every tuning trial starts from the same model."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from tests.conftest import FAST_HPS, hp_args, random_model, run_launch
from tests.integration.test_tune import TRIAL_HPS, write_space

# Continuing a trained model: no warmup, a small batch for more steps in the one epoch.
CONTINUE = {**FAST_HPS, "epochs": "1", "batch_size": "32", "warmup_epochs": "0"}


def _metrics(job_dir) -> dict:
    return json.loads((job_dir / "model" / "metrics.json").read_text())


def _trained(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def digits_0_7(tmp_path_factory, digits_dir):
    """A model trained on digits 0-7 (four epochs, about 99% on their test images)."""
    root = tmp_path_factory.mktemp("digits_0_7")
    for split in ("train", "valid", "test"):
        for folder in sorted((digits_dir / split).iterdir())[:8]:
            shutil.copytree(folder, root / split / folder.name)
    home = tmp_path_factory.mktemp("home")
    hps = {**FAST_HPS, "epochs": "4"}
    _trained(run_launch("train", "--data", str(root), "--job-name", "d8", *hp_args(hps), home=home))
    return home, root


@pytest.mark.slow
def test_a_grown_class_set_keeps_the_old_classes_and_learns_the_new(digits_0_7, digits_dir):
    home, _ = digits_0_7
    proc = run_launch(
        "train",
        "--data",
        str(digits_dir),
        "--job-name",
        "d10",
        "--init-from",
        "d8",
        *hp_args({**CONTINUE, "lr": "0.001"}),
        home=home,
    )
    _trained(proc)
    assert "8 classes keep their head rows, 2 new (eight, nine)" in proc.stdout
    metrics = _metrics(home / "jobs" / "d10")
    confusion = metrics["confusion_matrix"]
    old_right = sum(confusion[i][i] for i in range(8))
    old_images = sum(sum(confusion[i]) for i in range(8))
    assert old_right / old_images > 0.90, metrics["per_class_accuracy"]
    per_class = metrics["per_class_accuracy"]
    assert per_class["eight"] > 0.5 and per_class["nine"] > 0.5, per_class  # chance: 0.1
    config = json.loads((home / "jobs" / "d10" / "model" / "model_config.json").read_text())
    assert config["init_from"]["training_job"] == "d8"
    assert config["init_from"]["added"] == ["eight", "nine"]


@pytest.mark.slow
def test_one_more_epoch_on_the_same_classes_is_at_least_as_accurate(digits_0_7):
    home, root = digits_0_7
    before = _metrics(home / "jobs" / "d8")
    proc = run_launch(
        "train",
        "--data",
        str(root),
        "--job-name",
        "d8-more",
        "--init-from",
        str(home / "jobs" / "d8" / "model"),
        *hp_args({**CONTINUE, "lr": "0.0003"}),
        home=home,
    )
    _trained(proc)
    after = _metrics(home / "jobs" / "d8-more")
    assert after["init_from"]["added"] == [] and after["init_from"]["dropped"] == []
    assert after["test_acc"] >= before["test_acc"], (before["test_acc"], after["test_acc"])


def test_every_tuning_trial_and_refined_run_starts_from_the_same_model(tmp_path, tiny_digits):
    folders = sorted(p.name for p in (tiny_digits / "train").iterdir())
    start = random_model(tmp_path / "start" / "model", folders)
    digest = hashlib.sha256((start / "model.pt").read_bytes()).hexdigest()
    space = write_space(
        tmp_path / "space.yaml", max_trials=2, early_stopping=False, strategy="random"
    )
    out = tmp_path / "tune"
    proc = run_launch(
        "tune",
        "--data",
        str(tiny_digits),
        "--space",
        str(space),
        "--out",
        str(out),
        "--features-cache",
        "--refine",
        "1",
        "--init-from",
        str(start),
        *hp_args({**TRIAL_HPS, "epochs": "1"}),
        home=tmp_path,
    )
    _trained(proc)
    runs = sorted((out / "jobs").glob("*/model/model_config.json"))
    names = [p.parent.parent.name for p in runs]
    assert names[1:] == ["trial-000", "trial-001"] and names[0].startswith("refine-"), names
    for path in runs:
        assert json.loads(path.read_text())["init_from"]["model_sha256"] == digest, path
    # the trials' features come from the start model's backbone: one cache for all
    assert len([p for p in (out / "features").iterdir() if p.is_dir()]) == 1
