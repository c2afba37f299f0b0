"""What a trained model's answers are worth: class scores, calibration, the predictions file,
and `launch.py evaluate` over the same model and data."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from imgclf import engine, scores
from imgclf.data.device import DeviceNormalize
from imgclf.data.loaders import ImageListDataset, ShardSampler, make_loader
from imgclf.data.scan import label_name, scan_dataset
from imgclf.data.transforms import eval_transform
from imgclf.evaluate import load_network
from tests.conftest import FAST_HPS, hp_args, run_launch


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_digits):
    home = tmp_path_factory.mktemp("home")
    proc = run_launch(
        "train",
        "--data",
        str(tiny_digits),
        "--job-name",
        "scored",
        *hp_args({**FAST_HPS, "epochs": "2", "batch_size": "16"}),
        home=home,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return home, home / "jobs" / "scored"


def test_the_job_scores_each_class_and_lists_every_test_image(job, tiny_digits):
    _, job_dir = job
    metrics = json.loads((job_dir / "model/metrics.json").read_text())
    labels = list(metrics["per_class_accuracy"])
    again = scores.class_scores(metrics["confusion_matrix"], labels)
    assert metrics["per_class"] == again["per_class"]
    assert metrics["macro_avg"] == again["macro_avg"]
    assert metrics["weighted_avg"]["recall"] == pytest.approx(metrics["test_acc"])
    assert 0 <= metrics["test_ece"] <= 1 and 0 <= metrics["test_ece_uncalibrated"] <= 1
    config = json.loads((job_dir / "model/model_config.json").read_text())
    assert config["temperature"] == pytest.approx(metrics["calibration"]["temperature"])
    assert len(config["thresholds"]) == 10
    with (job_dir / "output/data/test_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    test_images = sorted(p for p in (tiny_digits / "test").rglob("*.png"))
    assert sorted(r["file"] for r in rows) == [
        p.relative_to(tiny_digits / "test").as_posix() for p in test_images
    ]
    assert np.mean([r["correct"] == "1" for r in rows]) == pytest.approx(metrics["test_acc"])
    assert all(r["true_label"] == label_name(r["file"].split("/")[0]) for r in rows)


def test_evaluate_reproduces_the_jobs_test_metrics(job, tiny_digits, tmp_path):
    home, job_dir = job
    proc = run_launch(
        "evaluate",
        "--model",
        str(job_dir / "model"),
        "--data",
        str(tiny_digits),
        "--out",
        str(tmp_path / "ev"),
        home=home,
    )
    assert proc.returncode == 0, proc.stderr
    trained = json.loads((job_dir / "model/metrics.json").read_text())
    evaluated = json.loads((tmp_path / "ev/metrics.json").read_text())
    for key in ("test_acc", "test_top5", "confusion_matrix", "per_class", "macro_avg", "test_ece"):
        assert evaluated[key] == trained[key], key
    assert evaluated["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-5)
    assert (tmp_path / "ev/test_predictions.csv").read_text() == (
        job_dir / "output/data/test_predictions.csv"
    ).read_text()
    page = (tmp_path / "ev/report.html").read_text()
    for section in ("summary", "classes", "confusion", "scores", "calibration", "mistakes"):
        assert f"id='{section}'" in page, section
    # another split, and a split with classes the model does not know
    valid = run_launch(
        "evaluate", "--model", "scored", "--data", str(tiny_digits), "--split", "valid", home=home
    )
    assert valid.returncode == 0, valid.stderr
    assert (home / "evaluations/scored-valid/valid_predictions.csv").is_file()
    odd = tmp_path / "odd"
    shutil.copytree(tiny_digits / "test", odd / "test")
    (odd / "test/011.eleven").mkdir()
    shutil.copy(next((tiny_digits / "test/001.zero").iterdir()), odd / "test/011.eleven/x.png")
    refused = run_launch("evaluate", "--model", "scored", "--data", str(odd), home=home)
    assert refused.returncode == 2 and "011.eleven" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_calibration_lowers_the_validation_ece_of_an_overconfident_model(job, tiny_digits):
    _, job_dir = job
    network, art = load_network(job_dir / "model", torch.device("cpu"))
    with torch.no_grad():  # the same answers, five times as sure of them
        network.fc.weight.mul_(5)
        network.fc.bias.mul_(5)
    split = scan_dataset({"valid": tiny_digits / "valid"}).splits["valid"]
    pre = art.preprocess
    loader = make_loader(
        ImageListDataset(
            split.samples, eval_transform(pre, normalize=False), draft=pre.resize_size
        ),
        ShardSampler(len(split.samples)),
        batch_size=64,
        workers=0,
        pin_memory=False,
    )
    result = engine.evaluate(
        network,
        loader,
        num_classes=10,
        device=torch.device("cpu"),
        normalize=DeviceNormalize.of(pre),
        keep_outputs=True,
    )
    calibration = scores.calibrate(result.logits.numpy(), result.targets.numpy(), art.labels)
    assert calibration.temperature > 1.5  # it undoes the sharpening
    assert calibration.valid_ece < calibration.valid_ece_uncalibrated
