"""Frozen-backbone training on cached features: computed once, reused by later jobs and tuning
trials, and the saved model is the whole network the endpoint serves."""

import json
import shutil

import torch

from imgclf import artifacts
from imgclf.data.decode import open_image
from imgclf.data.scan import scan_split
from imgclf.serving.inference import model_fn, predict_fn
from tests.conftest import FAST_HPS, hp_args, run_launch

FEATURE_HPS = {**FAST_HPS, "epochs": "4", "lr": "0.01", "workers": "1", "patience": "0"}


def _train(home, data_dir, name, **extra):
    proc = run_launch(
        "train",
        "--data",
        str(data_dir),
        "--job-name",
        name,
        "--features-cache",
        *hp_args({**FEATURE_HPS, **extra}),
        home=home,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((home / "jobs" / name / "model" / "metrics.json").read_text())


def test_features_are_computed_once_and_the_saved_model_serves_what_was_measured(
    tmp_path, tiny_digits
):
    tiny_digits = shutil.copytree(tiny_digits, tmp_path / "data")  # one file is touched below
    first = _train(tmp_path, tiny_digits, "first")
    assert first["features"]["reused"] is False and first["features"]["dims"] == 512
    second = _train(tmp_path, tiny_digits, "second", lr="0.02")
    assert second["features"]["reused"] is True
    assert second["features"]["key"] == first["features"]["key"]
    log = (tmp_path / "jobs" / "second" / "train.log").read_text()
    assert "features: reused" in log and log.count("#metrics epoch=") == 4
    assert len([p for p in (tmp_path / "features").iterdir() if p.is_dir()]) == 1

    # The artifact is backbone + trained head: served on the test images through the
    # endpoint's own preprocessing, it scores exactly what the job measured on the features.
    loaded = model_fn(tmp_path / "jobs" / "second" / "model", torch.device("cpu"))
    scan = scan_split("test", tiny_digits / "test")
    images = [open_image(path) for path, _ in scan.samples]
    predicted = torch.from_numpy(predict_fn(images, loaded).argmax(axis=1))
    targets = torch.tensor([t for _, t in scan.samples])
    correct = int((predicted == targets).sum())
    assert correct == round(second["test_acc"] * second["test_images"]), correct

    # Checkpoints keep only what trains (the head); a re-run of the job resumes from one and
    # ends where it did.
    checkpoint = torch.load(
        tmp_path / "jobs" / "second" / "checkpoints" / artifacts.CHECKPOINT_FILE,
        weights_only=True,
    )
    assert checkpoint["head_only"] is True
    n_classes = len([d for d in (tiny_digits / "train").iterdir() if d.is_dir()])
    assert sum(t.numel() for t in checkpoint["model"].values()) == (512 + 1) * n_classes
    again = _train(tmp_path, tiny_digits, "second", lr="0.02")
    assert (
        "resuming from checkpoint after epoch 4"
        in (tmp_path / "jobs" / "second" / "train.log").read_text()
    )
    assert again["test_acc"] == second["test_acc"]

    # A changed image changes the key: the next job embeds again.
    changed = sorted((tiny_digits / "train").rglob("*.png"))[0]
    changed.touch()
    third = _train(tmp_path, tiny_digits, "third")
    assert third["features"]["reused"] is False
    assert third["features"]["key"] != first["features"]["key"]


def test_features_cache_learns_digits_from_a_backbone_it_never_trains(tmp_path, digits_dir):
    """A random-init ResNet-18 (no pretrained weights here) as a fixed feature extractor: the
    head alone gets well above chance (10%) on real handwriting."""
    metrics = _train(tmp_path, digits_dir, "digits", epochs="6", batch_size="64")
    assert metrics["test_acc"] >= 0.8, metrics["test_acc"]
    assert metrics["features"]["seconds"] > 0


def test_features_cache_is_one_process_only(tmp_path, tiny_digits):
    proc = run_launch(
        "train",
        "--data",
        str(tiny_digits),
        "--features-cache",
        "--nproc",
        "2",
        *hp_args(FEATURE_HPS),
        home=tmp_path,
    )
    assert proc.returncode != 0
    assert "features_cache" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
