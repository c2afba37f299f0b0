"""The training image run as SageMaker runs it: `docker run IMAGE train` over an /opt/ml laid
out as SageMaker lays it out, with no network."""

from __future__ import annotations

import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.docker.conftest import JOB_HPS, run_training, sagemaker_job, train_command

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]


def test_the_job_leaves_the_artifact_and_the_report(trained_job):
    model = trained_job / "model"
    assert sorted(p.name for p in model.iterdir()) == [
        "labels.json",
        "metrics.json",
        "model.onnx",  # the ONNX graph an endpoint serves, made once (imgclf.graph)
        "model.pt",
        "model_config.json",
        "model_onnx.json",
    ]
    # Readable by whoever serves the unpacked model.tar.gz.
    assert {stat.S_IMODE(p.stat().st_mode) for p in model.iterdir()} == {0o644}
    report = trained_job / "output" / "data" / "report.html"
    assert report.is_file() and b"<img" in report.read_bytes()  # matplotlib's figures
    assert not (trained_job / "output" / "failure").exists()


def _weights(base: Path) -> dict[str, torch.Tensor]:
    return torch.load(base / "model" / "model.pt", weights_only=True)


def test_docker_stop_keeps_the_checkpoint_and_the_restart_resumes_to_the_same_weights(
    engine, images, trained_job, tiny_digits, tmp_path
):
    base = sagemaker_job(tmp_path / "ml", tiny_digits)
    name = f"imgclf-test-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        train_command(engine, images.train, base, name),
        env=engine.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("#metrics epoch=1 "):
                engine.docker("stop", "--time", "120", name)
                break
        rest = proc.stdout.read()
        code = proc.wait(timeout=180)
    finally:
        engine.docker("rm", "--force", name, check=False)
    assert code not in (0, 137), "".join(seen) + rest  # failed, and not killed after the grace
    assert "Stopped by SIGTERM" in (base / "output" / "failure").read_text()
    checkpoint = torch.load(base / "checkpoints" / "checkpoint.pt", weights_only=True)
    done = checkpoint["state"]["epoch"]
    assert 1 <= done < JOB_HPS["epochs"]

    # SageMaker restarts the job on a fresh instance: new output, the checkpoints synced back.
    for folder in ("model", "output"):
        shutil.rmtree(base / folder)
    (base / "model").mkdir()
    (base / "output" / "data").mkdir(parents=True)
    resumed = run_training(engine, images.train, base)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from checkpoint after epoch {done}" in resumed.stdout
    assert "#metrics epoch=1 " not in resumed.stdout
    a, b = _weights(trained_job), _weights(base)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_broken_dataset_ends_with_a_failure_file_and_a_non_zero_exit(
    engine, images, tiny_digits, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    shutil.rmtree(data / "valid")
    base = sagemaker_job(tmp_path / "ml", data)
    proc = run_training(engine, images.train, base)
    assert proc.returncode != 0
    failure = (base / "output" / "failure").read_text()
    assert "valid" in failure and "Traceback" not in failure
    assert not (base / "model" / "model.pt").exists()


def test_docker_stop_while_waiting_for_the_hosts_exits_at_once(engine, images, tmp_path):
    """Without `algo-1` resolvable, sagemaker-training waits for it; the PID-1 forwarder must
    then exit on SIGTERM (in a container, killpg(1) would be kill(-1))."""
    base = tmp_path / "ml"
    base.mkdir()
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text('{"current_host": "algo-1", "hosts": ["algo-1"]}')
    (config / "hyperparameters.json").write_text("{}")
    (config / "inputdataconfig.json").write_text("{}")
    name = f"imgclf-test-{uuid.uuid4().hex[:8]}"
    command = train_command(engine, images.train, base, name, add_host=False)
    proc = subprocess.Popen(
        command, env=engine.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Our module has run once sagemaker-training copied the program to /opt/ml/code; the
        # wait for algo-1 comes next.
        deadline = time.monotonic() + 300
        while not any((base / "code").glob("*.py")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.5)
        time.sleep(2)
        assert proc.poll() is None, proc.stdout.read()
        engine.docker("stop", "--time", "60", name)
        code = proc.wait(timeout=120)
        output = proc.stdout.read()
    finally:
        engine.docker("rm", "--force", name, check=False)
    assert code == 143, output  # 128 + SIGTERM: it exited by itself, not by SIGKILL
    assert "ProcessLookupError" not in output
    failure = (base / "output" / "failure").read_text()
    assert "Stopped by SIGTERM before the training program started" in failure
