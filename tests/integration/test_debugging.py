"""Debugging, profiling and the report on real jobs: smdebug records, our rules judge, the
report renders. Each rule is triggered by a job built to trigger it."""

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tests.conftest import hp_args, make_sagemaker_job, run_launch, run_train_entry

BASE = {
    "arch": "resnet18",
    "pretrained": "false",
    "image_size": "16",
    "workers": "0",
    "hflip": "false",
}


def train(home, data, name, *flags, **hps):
    proc = run_launch(
        "train",
        "--data",
        str(data),
        "--job-name",
        name,
        *flags,
        *hp_args({**BASE, **{k: str(v) for k, v in hps.items()}}),
        home=home,
    )
    return proc, home / "jobs" / name


def verdicts(job):
    return {v["rule"]: v for v in json.loads((job / "output/data/rules.json").read_text())}


def subset(src, dst, per_split):
    for split, count in per_split.items():
        for i, cls in enumerate(sorted((src / split).iterdir())):
            n = count(i) if callable(count) else count
            out = dst / split / cls.name
            out.mkdir(parents=True)
            for image in sorted(cls.iterdir())[:n]:
                shutil.copy(image, out / image.name)
    return dst


def test_hook_records_losses_in_both_modes_that_match_the_logged_values(tmp_path, tiny_digits):
    proc, job = train(tmp_path, tiny_digits, "hooked", "--debug", epochs=2, batch_size=32)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from smdebug import modes
    from smdebug.trials import create_trial

    trial = create_trial(str(job / "output" / "data" / "tensors"))
    (name,) = trial.tensor_names(collection="losses")
    loss = trial.tensor(name)
    train_steps, eval_steps = loss.steps(mode=modes.TRAIN), loss.steps(mode=modes.EVAL)
    # 120 training images in batches of 32: 4 steps an epoch; 40 validation images: 2.
    assert train_steps == list(range(8)) and eval_steps == list(range(4))
    assert loss.steps(mode=modes.PREDICT) == [0, 1]  # the test split, kept apart
    history = json.loads((job / "output/data/history.json").read_text())
    sizes = {"train": [32, 32, 32, 24], "valid": [32, 8]}
    for epoch, row in enumerate(history):
        for key, mode, steps in (("train", modes.TRAIN, 4), ("valid", modes.EVAL, 2)):
            values = [float(loss.value(epoch * steps + s, mode=mode)) for s in range(steps)]
            mean = np.average(values, weights=sizes[key])
            assert mean == pytest.approx(row[f"{key}_loss"], rel=1e-4), (key, epoch)
    assert trial.tensor_names(collection="gradients")
    status = json.loads((job / "output/data/debug.json").read_text())
    assert status["tensors"] is True and status["source"] == "hyperparameter"


def test_a_healthy_job_keeps_every_rule_quiet(tmp_path, digits_dir):
    proc, job = train(tmp_path, digits_dir, "healthy", "--debug", epochs=2, batch_size=32)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = verdicts(job)
    assert set(found) == {
        "LossNotDecreasing",
        "Overfit",
        "VanishingGradient",
        "ExplodingTensor",
        "PoorWeightInitialization",
        "ClassImbalance",
    }
    assert {r: v["status"] for r, v in found.items()} == dict.fromkeys(found, "quiet")
    assert "rule ExplodingTensor: QUIET" in (job / "train.log").read_text()


@pytest.fixture(scope="module")
def zero_weights(tmp_path_factory):
    """ImageNet-shaped ResNet-18 weights with every convolution zeroed: nothing flows."""
    state = torchvision.models.resnet18().state_dict()
    for key, value in state.items():
        if "conv" in key or "downsample.0" in key:
            value.zero_()
    path = tmp_path_factory.mktemp("weights") / "zero.pt"
    torch.save(state, path)
    return path


def test_each_rule_fires_on_a_job_built_to_trigger_it(tmp_path, tiny_digits, zero_weights):
    few = subset(tiny_digits, tmp_path / "few", {"train": 3, "valid": 4, "test": 4})
    uneven = subset(
        tiny_digits, tmp_path / "uneven", {"train": lambda i: 1 if i == 1 else 12, "valid": 4}
    )
    cases = {
        # lr 10 with plain SGD: the loss overflows to inf, then NaN.
        "ExplodingTensor": (
            tiny_digits,
            {
                "optimizer": "sgd",
                "lr": 10,
                "epochs": 4,
                "batch_size": 8,
                "scheduler": "none",
                "debug_stop_on": "",
            },
        ),
        # Three images a class and eight epochs: memorised, validation loss climbs.
        "Overfit": (
            few,
            {"lr": 0.003, "epochs": 8, "batch_size": 10, "patience": 0, "min_crop_scale": 1.0},
        ),
        # lr 0 and fixed crops: the loss cannot move.
        "LossNotDecreasing": (
            tiny_digits,
            {"lr": 0, "epochs": 3, "batch_size": 6, "min_crop_scale": 1.0},
        ),
        # Zeroed convolutions: zero activations and zero gradients.
        "VanishingGradient": (
            tiny_digits,
            {"pretrained": "true", "weights_path": zero_weights, "epochs": 1, "batch_size": 16},
        ),
        "ClassImbalance": (uneven, {"epochs": 1, "batch_size": 16}),
    }
    for rule, (data, hps) in cases.items():
        proc, job = train(tmp_path, data, rule.lower(), "--debug", **hps)
        assert proc.returncode == 0, (rule, proc.stdout[-2000:] + proc.stderr[-2000:])
        found = verdicts(job)
        assert found[rule]["status"] == "fired", (rule, found)
        if rule != "ClassImbalance":
            assert isinstance(found[rule]["step"], int)
        assert found[rule]["advice"]
        log = (job / "train.log").read_text()
        assert f"rule {rule}: FIRED" in log and "Try:" in log
        if rule == "VanishingGradient":
            assert found["PoorWeightInitialization"]["status"] == "fired"
        if rule == "ExplodingTensor":
            # Launched again on the saved tensors, the same verdict.
            again = run_launch("debug", str(job), home=tmp_path)
            assert again.returncode == 1 and "rule ExplodingTensor: FIRED" in again.stdout


def test_a_nan_loss_stops_the_job_with_the_reason(tmp_path, tiny_digits):
    proc, job = train(
        tmp_path,
        tiny_digits,
        "nan",
        "--debug",
        optimizer="sgd",
        lr=10,
        epochs=4,
        batch_size=8,
        scheduler="none",
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    failure = (job / "output" / "failure").read_text()
    assert failure.startswith("ClientError: ExplodingTensor: the training loss is")
    assert "lower lr" in failure
    assert not (job / "model" / "model.pt").exists()


def test_frozen_backbone_with_the_hook_and_no_hook_at_all(tmp_path, tiny_digits):
    weights = tmp_path / "rand.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    proc, job = train(
        tmp_path,
        tiny_digits,
        "frozen",
        "--debug",
        pretrained="true",
        weights_path=weights,
        freeze="true",
        epochs=1,
        batch_size=32,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from smdebug.trials import create_trial

    gradients = create_trial(str(job / "output/data/tensors")).tensor_names(collection="gradients")
    assert gradients and all("fc." in g for g in gradients)  # only the head trains

    proc, plain = train(tmp_path, tiny_digits, "plain", epochs=1, batch_size=32)
    assert proc.returncode == 0
    assert not (plain / "output/tensors").exists() and not (plain / "output/data/tensors").exists()
    assert not (plain / "output/data/rules.json").exists()
    report = (plain / "output/data/report.html").read_text()
    assert "Not run: train with --debug" in report


def test_sagemakers_hook_config_file_turns_the_hook_on(tmp_path, tiny_digits):
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters={**BASE, "epochs": "1", "batch_size": "32"},
        channels={"training": tiny_digits},
    )
    (base / "input/config/debughookconfig.json").write_text(
        json.dumps(
            {
                "S3OutputPath": "s3://bucket/debug",
                "LocalPath": "/opt/ml/output/tensors",
                "HookParameters": {"save_interval": "5"},
                "CollectionConfigurations": [
                    {"CollectionName": "losses", "CollectionParameters": {"save_interval": "2"}}
                ],
            }
        )
    )
    proc = run_train_entry(base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from smdebug import modes
    from smdebug.trials import create_trial

    trial = create_trial(str(base / "output/tensors"))  # /opt/ml moved to the base dir
    (name,) = trial.tensor_names(collection="losses")
    assert trial.tensor(name).steps(mode=modes.TRAIN) == [0, 2]
    assert "rule ExplodingTensor: QUIET" in proc.stdout


def test_without_smdebug_training_runs_and_says_why(tmp_path, tiny_digits):
    fake = tmp_path / "no_smdebug" / "smdebug"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('smdebug is not installed here')\n")
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": str(fake.parent), "IMGCLF_HOME": str(tmp_path)}
    from tests.conftest import LAUNCH, ROOT

    args = ["train", "--data", str(tiny_digits), "--job-name", "nosmd", "--debug"]
    proc = subprocess.run(
        [*LAUNCH, *args, *hp_args({**BASE, "epochs": "1", "batch_size": "32"})],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    job = tmp_path / "jobs" / "nosmd"
    status = json.loads((job / "output/data/debug.json").read_text())
    assert status["tensors"] is False and "smdebug is not installed here" in status["reason"]
    assert (job / "model/model.pt").exists()
    report = (job / "output/data/report.html").read_text()
    assert "smdebug tensors are missing" in report
    assert sys.executable  # the launcher ran in this interpreter's venv


def test_ddp_with_the_hook_has_one_writer(tmp_path, tiny_digits):
    proc, job = train(
        tmp_path, tiny_digits, "ddp", "--debug", "--nproc", "2", epochs=1, batch_size=16
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = list((job / "output/data/tensors/events").rglob("*.tfevents"))
    assert events and {p.name.split("_", 1)[1] for p in events} == {"worker_0.tfevents"}
    assert verdicts(job)["ExplodingTensor"]["status"] == "quiet"


# ---------------------------------------------------------------- the report


def test_the_report_has_its_sections_and_the_jobs_numbers(tmp_path, tiny_digits):
    proc, job = train(tmp_path, tiny_digits, "rep", "--debug", "--profile", epochs=2, batch_size=16)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = job / "output/data/report.html"
    html = report.read_text()
    metrics = json.loads((job / "model/metrics.json").read_text())
    for section in (
        "summary",
        "curves",
        "classes",
        "confusion",
        "scores",
        "calibration",
        "mistakes",
        "rules",
        "time",
        "system",
        "operators",
    ):
        assert f"id='{section}'" in html, section
    assert f"{metrics['test_acc']:.4f}" in html and f"{metrics['valid_loss']:.4f}" in html
    worst = min(metrics["per_class_accuracy"].values())
    assert f"<td>{worst:.3f}</td>" in html
    assert f"<td>{metrics['macro_avg']['f1']:.3f}</td>" in html
    assert f"<td>{metrics['calibration']['temperature']:.3f}</td>" in html
    assert "http://" not in html and "https://" not in html  # opens offline
    for name in ("trace.json", "steps.json", "system.jsonl", "top_ops.json"):
        assert (job / "output/data/profiler" / name).exists(), name
    steps = json.loads((job / "output/data/profiler/steps.json").read_text())
    assert len(steps) == 2 * math.ceil(120 / 16)
    assert all(s["data_s"] >= 0 and s["compute_s"] > 0 for s in steps)
    rebuilt = run_launch("report", "rep", "--out", str(tmp_path / "again.html"), home=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (tmp_path / "again.html").read_text().count("data:image/png;base64,") == html.count(
        "data:image/png;base64,"
    )


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_the_report_renders_in_headless_chromium(tmp_path, tiny_digits):
    proc, job = train(tmp_path, tiny_digits, "shot", "--debug", epochs=2, batch_size=16)
    assert proc.returncode == 0
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,3600",
            f"--screenshot={shot}",
            (job / "output/data/report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (3600, 1200)
    # Not blank: ink on the page, and in every band where the figures sit.
    assert (pixels < 200).mean() > 0.02
    for band in np.array_split(pixels[:2400], 6):
        assert band.std() > 10
