"""The launcher's local target end to end: real data, resume after SIGTERM, DDP under torchrun."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST_HPS, LAUNCH, ROOT, hp_args, run_launch


@pytest.mark.parametrize("device_augment", ["auto", "on"])
def test_digits_reach_95_percent_through_the_launcher(tmp_path, digits_dir, device_augment):
    """auto is the CPU workers' RandomResizedCrop here; on: the batched crops of DeviceAugment
    (what a GPU job uses) must train as well."""
    proc = run_launch(
        "train",
        "--data",
        str(digits_dir),
        "--job-name",
        "digits",
        *hp_args({**FAST_HPS, "epochs": "4", "device_augment": device_augment}),
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log_text = (tmp_path / "jobs" / "digits" / "train.log").read_text()
    assert ("random-resized crops and flips on cpu" in log_text) == (device_augment == "on")
    model = tmp_path / "jobs" / "digits" / "model"
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["test_acc"] >= 0.95, metrics["test_acc"]
    assert "test accuracy" in proc.stdout and str(model) in proc.stdout
    assert (tmp_path / "jobs" / "digits" / "train.log").read_text().count("#metrics epoch=") == 4


RESUME_HPS = {
    **FAST_HPS,
    "epochs": "3",
    "image_size": "24",
    "batch_size": "16",
    "workers": "1",
    "seed": "11",
    "patience": "0",
}


def _weights(home, job):
    return torch.load(home / "jobs" / job / "model" / "model.pt", weights_only=True)


def test_sigterm_keeps_the_checkpoint_and_the_rerun_resumes_to_the_same_weights(
    tmp_path, tiny_digits
):
    args = ["train", "--data", str(tiny_digits), *hp_args(RESUME_HPS)]
    straight = run_launch(*args, "--job-name", "straight", home=tmp_path)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    env = {**os.environ, "IMGCLF_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [*LAUNCH, *args, "--job-name", "stopped"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("#metrics epoch=1 "):
            os.killpg(proc.pid, signal.SIGTERM)
            stopped_at = time.monotonic()
            break
    rest = proc.stdout.read()
    code = proc.wait(timeout=120)
    assert time.monotonic() - stopped_at < 120
    assert code != 0, "".join(seen) + rest
    job = tmp_path / "jobs" / "stopped"
    assert "Stopped by SIGTERM" in (job / "output" / "failure").read_text()
    done = torch.load(job / "checkpoints" / "checkpoint.pt", weights_only=True)["state"]["epoch"]
    assert 1 <= done < 3

    resumed = run_launch(*args, "--job-name", "stopped", home=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from checkpoint after epoch {done}" in resumed.stdout
    assert "#metrics epoch=1 " not in resumed.stdout
    assert f"#metrics epoch={done + 1} " in resumed.stdout
    assert not (job / "output" / "failure").exists()

    a, b = _weights(tmp_path, "straight"), _weights(tmp_path, "stopped")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_under_torchrun_write_one_artifact(tmp_path, tiny_digits):
    proc = run_launch(
        "train",
        "--data",
        str(tiny_digits),
        "--job-name",
        "ddp",
        "--nproc",
        "2",
        *hp_args({**FAST_HPS, "epochs": "1", "image_size": "16", "workers": "0"}),
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torchrun" in proc.stdout
    assert "world size 2, backend gloo" in proc.stdout
    assert proc.stdout.count("#metrics epoch=1 ") == 1  # rank 0 alone prints and writes
    model = tmp_path / "jobs" / "ddp" / "model"
    assert sorted(p.name for p in model.iterdir()) == [
        "labels.json",
        "metrics.json",
        "model.onnx",  # the ONNX graph an endpoint serves, made once (imgclf.graph)
        "model.pt",
        "model_config.json",
        "model_onnx.json",
    ]
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["test_images"] == 40  # every test image counted once across both ranks
    # both ranks' answers gathered back in the split's order: one row per image, and each
    # row's verdict is its own image's (the rows agree with the confusion matrix)
    rows = (tmp_path / "jobs/ddp/output/data/test_predictions.csv").read_text().splitlines()[1:]
    assert len({row.split(",")[0] for row in rows}) == len(rows) == 40
    pairs = [tuple(row.split(",")[1:3]) for row in rows]
    labels = list(metrics["per_class_accuracy"])
    for i, true in enumerate(labels):
        for j, predicted in enumerate(labels):
            assert pairs.count((true, predicted)) == metrics["confusion_matrix"][i][j]


def _spaced_environment(folder):
    """A Python environment in `folder` (a path with a space) over this one's packages, with
    `train` and `torchrun` written as pip writes scripts for such a path: a checkout with a
    space whose .venv `make setup` made."""
    import shutil
    import sys
    import sysconfig

    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    (site / "outer.pth").write_text("\n".join(p for p in sys.path if p and Path(p).is_dir()))
    here = Path(sys.executable).parent
    trampoline = f"#!/bin/sh\n'''exec' \"{python}\" \"$0\" \"$@\"\n' '''\n"
    for script in ("train", "torchrun"):
        body = (here / script).read_text().split("\n", 1)[1]
        (venv / "bin" / script).write_text(trampoline + body)
        shutil.copymode(here / script, venv / "bin" / script)
    return python


def test_paths_with_spaces_train_under_torchrun(tmp_path, tiny_digits):
    """Checkout (its Python and scripts), data and home all in a folder named with a space;
    torchrun's command runs without a shell."""
    import shutil

    folder = tmp_path / "my projects"
    python = _spaced_environment(folder)
    data = shutil.copytree(tiny_digits, folder / "tiny digits")
    hps = hp_args({**FAST_HPS, "epochs": "1", "image_size": "16", "workers": "0"})
    proc = subprocess.run(
        [str(python), str(ROOT / "launch.py"), "train", "--data", str(data), "--nproc", "2"]
        + ["--job-name", "spaced", *hps],
        env={**os.environ, "IMGCLF_HOME": str(folder / "home dir")},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    assert (folder / "home dir" / "jobs" / "spaced" / "model" / "model.pt").exists()


def test_bad_hyperparameter_is_refused_before_a_job_starts(tmp_path, tiny_digits):
    proc = run_launch("train", "--data", str(tiny_digits), "--hp", "optimizer=sgdd", home=tmp_path)
    assert proc.returncode == 2
    assert "optimizer" in proc.stderr and "adamw, sgd" in proc.stderr
    assert not (tmp_path / "jobs").exists()


def test_train_prepare_trains_on_a_prepared_copy_built_once(tmp_path, tiny_digits):
    args = ["train", "--data", str(tiny_digits), "--prepare", "24"]
    hps = hp_args({**FAST_HPS, "epochs": "1", "image_size": "16", "workers": "0"})
    first = run_launch(*args, "--job-name", "p1", *hps, home=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "200 images written, 0 unchanged" in first.stdout
    channel = tmp_path / "jobs" / "p1" / "input" / "data" / "training"
    prepared = channel.resolve()
    assert prepared.parent == tmp_path / "prepared" and prepared != tiny_digits
    stored = {p.suffix for p in prepared.rglob("*") if p.is_file() and p.suffix != ".json"}
    assert stored == {".ppm"}  # raw RGB locally: nothing to decode when read
    assert (tmp_path / "jobs" / "p1" / "model" / "model.pt").exists()
    second = run_launch(*args, "--job-name", "p2", *hps, home=tmp_path)
    assert second.returncode == 0
    assert "0 images written, 200 unchanged" in second.stdout


def test_compile_trains_and_saves_plain_weights(tmp_path, tiny_digits):
    """torch.compile (inductor, a real C compile here) wraps only the training step: the
    artifact holds the plain model's keys, which the endpoint loads."""
    hps = {**FAST_HPS, "epochs": "1", "image_size": "16", "workers": "0", "compile": "true"}
    proc = run_launch(
        "train", "--data", str(tiny_digits), "--job-name", "c", *hp_args(hps), home=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = _weights(tmp_path, "c")
    assert "fc.weight" in state and not any(k.startswith("_orig_mod") for k in state)
    from imgclf.serving.inference import model_fn

    assert model_fn(tmp_path / "jobs" / "c" / "model", torch.device("cpu")).labels
