"""The serving image run as SageMaker runs it: the training image's model packed into
model.tar.gz as SageMaker packs it, unpacked by root, then `docker run IMAGE serve` with the
model at /opt/ml/model and no --user (host network, bound to 127.0.0.1 here)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.util import free_port
from tests.conftest import run_launch
from tests.docker.conftest import NOTES, predict
from tests.integration.serving_client import http, ping_status

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def unpacked_model(trained_job, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hosting")
    archive = root / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # SageMaker tars the contents of /opt/ml/model
        for path in sorted((trained_job / "model").iterdir()):
            tar.add(path, arcname=path.name)
    target = root / "model"
    target.mkdir()
    # Hosting unpacks it as root, keeping the modes the archive holds.
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(target)], check=True)
    return target


def start_serving(engine, image: str, model_dir: Path) -> tuple[str, str]:
    name = f"imgclf-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    engine.docker(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "-v",
        f"{model_dir}:/opt/ml/model:ro",
        "-e",
        f"SAGEMAKER_BIND_TO_PORT={port}",
        "-e",
        "IMGCLF_BIND_HOST=127.0.0.1",
        image,
        "serve",
    )
    return name, f"http://127.0.0.1:{port}"


def running(engine, name: str) -> bool:
    state = engine.docker("inspect", "--format", "{{.State.Running}}", name, check=False)
    return state.stdout.strip() == "true"


@pytest.fixture(scope="module")
def served(engine, images, unpacked_model):
    started = time.monotonic()
    name, url = start_serving(engine, images.serve, unpacked_model)
    try:
        deadline = time.monotonic() + 300
        while ping_status(url) != 200:
            logs = engine.docker("logs", name, check=False)
            assert running(engine, name), logs.stdout[-3000:] + logs.stderr[-3000:]
            assert time.monotonic() < deadline, "no /ping 200 within 300 s"
            time.sleep(0.2)
        NOTES.append(
            f"serving container: docker run to /ping 200 in {time.monotonic() - started:.1f} s"
        )
        yield name, url
    finally:
        engine.docker("rm", "--force", name, check=False)


@pytest.fixture(scope="module")
def local_endpoint(unpacked_model, tmp_path_factory):
    """The same model served by the local target (a process, no Docker)."""
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    proc = run_launch(
        "deploy", "--model", str(unpacked_model), "--name", "ref", "--port", str(port), home=home
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield f"http://127.0.0.1:{port}"
    run_launch("delete", "ref", home=home)


def _images(tiny_digits: Path) -> list[tuple[bytes, str]]:
    pngs = sorted((tiny_digits / "test").rglob("*.png"))[::7][:6]
    out = [(p.read_bytes(), "image/png") for p in pngs]
    buf = io.BytesIO()
    Image.open(pngs[0]).convert("RGB").save(buf, format="JPEG", quality=90)
    out.append((buf.getvalue(), "image/jpeg"))
    return out


def test_answers_equal_the_local_endpoints(served, local_endpoint, tiny_digits):
    _, url = served
    for body, content_type in _images(tiny_digits):
        ours, theirs = predict(url, body, content_type), predict(local_endpoint, body, content_type)
        assert [p["label"] for p in ours["predictions"]] == [
            p["label"] for p in theirs["predictions"]
        ]
        np.testing.assert_allclose(ours["probabilities"], theirs["probabilities"], atol=1e-5)


def _bad_requests(tiny_digits: Path) -> list[tuple[str, bytes, str, dict]]:
    good = sorted((tiny_digits / "test").rglob("*.png"))[0].read_bytes()
    jpeg = _images(tiny_digits)[-1][0]
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")
    return [
        ("empty body", b"", "image/jpeg", {}),
        ("random bytes", os.urandom(2048), "application/octet-stream", {}),
        ("truncated jpeg", jpeg[: len(jpeg) // 2], "image/jpeg", {}),
        ("decompression bomb", bomb.getvalue(), "image/png", {}),
        ("over 6 MB", b"\xff" * (6 * 1024 * 1024 + 10), "image/jpeg", {}),
        ("unknown content type", b"a,b", "text/csv", {}),
        ("npy", b"\x93NUMPY\x01\x00", "application/x-npy", {}),
        ("unknown accept", good, "image/png", {"Accept": "text/csv"}),
        ("malformed json", b'{"instances": [', "application/json", {}),
        ("bad base64", b'{"instances": ["%%%"]}', "application/json", {}),
        ("bad topk", good, "image/png", {"X-Amzn-SageMaker-Custom-Attributes": "topk=-1"}),
    ]


def test_bad_input_gets_the_local_endpoints_4xx_and_the_container_stays_healthy(
    served, local_endpoint, tiny_digits
):
    _, url = served
    for name, body, content_type, headers in _bad_requests(tiny_digits):
        sent = {"Content-Type": content_type, **headers}
        status, raw = http(url + "/invocations", body, sent)
        expected, _ = http(local_endpoint + "/invocations", body, sent)
        assert 400 <= status < 500 and status == expected, (name, status, expected, raw[:300])
        assert b"Traceback" not in raw and b"/site-packages/" not in raw, name
        assert ping_status(url) == 200, name


def test_a_broken_model_exits_non_zero_with_the_reason_and_never_pings(
    engine, images, unpacked_model, tmp_path
):
    broken = tmp_path / "model"
    shutil.copytree(unpacked_model, broken)
    (broken / "model.pt").write_bytes(b"\x00" * 100)
    name, url = start_serving(engine, images.serve, broken)
    try:
        deadline = time.monotonic() + 300
        while running(engine, name):
            assert ping_status(url) != 200
            assert time.monotonic() < deadline, "the container is still running after 300 s"
            time.sleep(0.2)
        code = engine.docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = engine.docker("logs", name)
    finally:
        engine.docker("rm", "--force", name, check=False)
    assert code != "0"
    text = logs.stdout + logs.stderr
    assert "cannot serve the model" in text and "model.pt" in text, text[-3000:]


def test_docker_stop_drains_in_flight_requests_and_exits_0(engine, served, tiny_digits):
    """Last in this module: it stops the shared container."""
    name, url = served
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (1200, 1200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=80)
    body = json.dumps({"instances": [base64.b64encode(buf.getvalue()).decode()] * 3}).encode()
    answers: list[int] = []

    def send():
        answers.append(http(url + "/invocations", body, {"Content-Type": "application/json"})[0])

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # the requests are in the server's hands
    engine.docker("stop", "--time", "60", name)
    for thread in threads:
        thread.join(timeout=120)
    code = engine.docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    assert answers == [200] * 8
    assert code == "0"
