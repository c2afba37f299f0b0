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
        # serve's state file, the one folder it writes on the host: deploy waited on it
        assert mounts["/run/imgclf"]["RW"] is True and len(mounts) == 2
        folder = tmp_path / "endpoints" / "dk"
        assert mounts["/run/imgclf"]["Source"] == str((folder / "state").resolve())
        assert json.loads((folder / "state" / "state.json").read_text())["state"] == "ready"
        record = json.loads((folder / "endpoint.json").read_text())
        assert record["kind"] == "container" and record["container_id"] == config["Id"]
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


def test_transform_with_docker_runs_the_serving_image_in_batch_mode(
    engine, images, tiny_digits, tmp_path
):
    import csv
    import shutil

    import numpy as np

    from tests.conftest import random_model, write_odd_images

    classes = sorted(p.name for p in (tiny_digits / "train").iterdir())
    model = random_model(tmp_path / "model", classes)
    source, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(tiny_digits / "test" / classes[0], source / "a" / classes[0])
    write_odd_images(source / "odd", np.random.default_rng(2))
    files = sorted(
        p.relative_to(source).as_posix()
        for p in source.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )
    proc = run_launch(
        "transform", "--docker", images.serve, "--model", str(model), "--input", str(source),
        "--output", str(out), "--job-name", "dk-transform", home=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 3 broken images
    assert (
        proc.stdout.strip()
        .splitlines()[-1]
        .startswith(f"{len(files)} images: {len(files) - 3} classified, 3 failed")
    )
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.out")) == [
        f + ".out" for f in files
    ]
    placeholder = json.loads((out / "odd" / "text.jpg.out").read_bytes())
    assert placeholder["status"] == 400 and placeholder["predictions"] == []  # batch mode
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == files
    assert {r["label"] for r in rows if not r["error"]} <= {c.split(".", 1)[1] for c in classes}
    # the container is gone at the end
    assert engine.docker("inspect", "imgclf-endpoint-dk-transform", check=False).returncode != 0


def test_deploy_with_docker_of_a_broken_model_names_serves_reason_and_leaves_nothing(
    engine, images, tmp_path
):
    """The reason comes from the state file serve wrote in the container, as for a process
    endpoint; the container and the endpoint's folder are removed."""
    from tests.conftest import random_model

    model = random_model(tmp_path / "model", ["001.cat", "002.dog"])
    (model / "labels.json").unlink()
    proc = run_launch(
        "deploy", "--docker", images.serve, "--model", str(model), "--name", "dkb",
        "--port", str(free_port()), home=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and "endpoint dkb did not start: cannot serve the model" in error[0]
    assert "labels.json" in error[0]
    assert engine.docker("inspect", "imgclf-endpoint-dkb", check=False).returncode != 0
    assert not (tmp_path / "endpoints" / "dkb").exists()
