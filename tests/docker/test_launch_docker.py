"""The launcher's `--docker` verbs: the same commands as the local target, run by the images."""

from __future__ import annotations

import json

import pytest

from imgclf.util import free_port
from tests.conftest import FAST_HPS, hp_args, run_launch
from tests.integration.serving_client import post

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]


def test_train_deploy_invoke_and_delete_with_docker(engine, images, tiny_digits, tmp_path):
    hps = {**FAST_HPS, "epochs": "1", "image_size": "24"}
    trained = run_launch(
        "train", "--data", str(tiny_digits), "--job-name", "dk", "--docker", images.train,
        *hp_args(hps), home=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    job = tmp_path / "jobs" / "dk"
    assert "job dk finished" in trained.stdout
    assert (job / "model" / "model.pt").is_file()
    assert (job / "output" / "data" / "report.html").is_file()
    assert "#metrics epoch=1 " in (job / "train.log").read_text()

    port = free_port()
    deployed = run_launch(
        "deploy", "--docker", images.serve, "--model", str(job / "model"), "--name", "dk",
        "--port", str(port), "--response-format", "vectors", home=tmp_path,
    )  # fmt: skip
    container = "imgclf-endpoint-dk"
    try:
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        inspect = engine.docker("inspect", container)
        config = json.loads(inspect.stdout)[0]
        assert config["HostConfig"]["NetworkMode"] == "host"
        mounts = {m["Destination"]: m for m in config["Mounts"]}
        assert mounts["/opt/ml/model"]["RW"] is False
        assert not config["Config"]["User"]  # root, as SageMaker runs it

        listed = run_launch("endpoints", home=tmp_path)
        row = next(line for line in listed.stdout.splitlines() if line.startswith("dk "))
        assert "healthy" in row and container in row

        image = sorted((tiny_digits / "test").rglob("*.png"))[0]
        invoked = run_launch("invoke", "--endpoint", "dk", str(image), home=tmp_path)
        assert invoked.returncode == 0, invoked.stdout + invoked.stderr
        assert "probability" in invoked.stdout  # invoke asks for the format it prints
        # The deploy's default format reached serve in the container: a plain client gets
        # the seed projects' vectors, one row of probabilities per image.
        status, raw = post(f"http://127.0.0.1:{port}", image.read_bytes(), "image/png")
        assert status == 200, raw[:300]
        rows = json.loads(raw)
        assert len(rows) == 1 and len(rows[0]) == 10 and abs(sum(rows[0]) - 1) < 1e-4
    finally:
        deleted = run_launch("delete", "dk", home=tmp_path)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert engine.docker("inspect", container, check=False).returncode != 0
    assert "no local endpoints" in run_launch("endpoints", home=tmp_path).stdout
