"""The two images without a Docker engine: their Dockerfiles and build script pass the linters,
and their entry points, run as processes with the environment the Dockerfiles set, do their
job in the container's layout (SAGEMAKER_BASE_DIR instead of /opt/ml)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgclf.contract import TRAIN_IMAGE_ENV
from imgclf.util import free_port
from tests.conftest import ROOT, dockerfile_runtime, png_bytes, random_model
from tests.integration.serving_client import ping_status, post

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("kind", ["train", "serve"])
def test_hadolint_passes(kind):
    proc = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / "docker" / kind / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_passes_on_build_and_push():
    proc = subprocess.run(
        [str(BIN / "shellcheck"), str(ROOT / "build_and_push.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_train_image_sets_the_contracts_environment():
    env, entry = dockerfile_runtime("train")
    assert entry == ["train"]
    assert {k: env.get(k) for k in TRAIN_IMAGE_ENV} == TRAIN_IMAGE_ENV
    assert env["TORCH_HOME"] == "/opt/torch"  # where the build put the pretrained weights


def _instructions(kind: str, word: str) -> list[str]:
    """The arguments of every `word` instruction (continuation lines joined) of a Dockerfile."""
    text = (ROOT / "docker" / kind / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        line.split(None, 1)[1]
        for line in text.splitlines()
        if line.split(None, 1)[:1] == [word] and len(line.split(None, 1)) == 2
    ]


def test_the_serve_image_sets_the_contracts_environment():
    env, entry = dockerfile_runtime("serve")
    assert entry == ["serve"]  # SageMaker runs `docker run IMAGE serve`
    assert env["SAGEMAKER_BIND_TO_PORT"] == "8080"  # the port SageMaker sends requests to
    assert "8080" in _instructions("serve", "EXPOSE")
    labels = " ".join(_instructions("serve", "LABEL"))
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in labels


@pytest.mark.parametrize("kind", ["train", "serve"])
def test_the_images_run_as_root_on_a_base_made_from_debians_archive(kind):
    env, _ = dockerfile_runtime(kind)
    assert not _instructions(kind, "USER")  # SageMaker expects root; see the README
    assert (
        "ARG BASE_IMAGE=debian:bookworm-slim" in (ROOT / "docker" / kind / "Dockerfile").read_text()
    )
    # The NVIDIA container runtime mounts the driver when these are set.
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert set(env["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"compute", "utility"}
    # Build-time pip settings stay in the builder stage.
    assert not [k for k in env if k.startswith("PIP_")]
    assert "# syntax=" not in (ROOT / "docker" / kind / "Dockerfile").read_text()


def _bare_path(tmp_path: Path, without: str) -> str:
    """A PATH holding this machine's tools except `without`."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not Path(folder).is_dir():
            continue
        for tool in Path(folder).iterdir():
            if tool.name != without and not (tools / tool.name).exists():
                (tools / tool.name).symlink_to(tool)
    return str(tools)


def test_build_and_push_without_docker_fails_early_with_one_line(tmp_path):
    env = {**os.environ, "PATH": _bare_path(tmp_path, "docker")}
    proc = subprocess.run(
        [str(ROOT / "build_and_push.sh"), "all", "--no-push"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "build_and_push.sh: docker is not installed; install Docker "
        "(https://docs.docker.com/get-docker/) and run again"
    )


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client on this machine")
def test_build_and_push_without_an_engine_says_so(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    proc = subprocess.run(
        [str(ROOT / "build_and_push.sh"), "serve", "--no-push"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Docker engine is not running" in proc.stderr


def test_build_and_push_rejects_unknown_arguments():
    proc = subprocess.run(
        [str(ROOT / "build_and_push.sh"), "--tga", "x"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "unknown argument '--tga'" in proc.stderr


def _model(base: Path) -> None:
    random_model(base / "model", ["001.cat", "002.dog", "003.fox"])


def test_the_serve_entry_answers_ping_and_invocations_then_stops_on_sigterm(tmp_path):
    base = tmp_path / "ml"
    _model(base)
    image_env, entry = dockerfile_runtime("serve")
    assert entry == ["serve"] and image_env["SAGEMAKER_BIND_TO_PORT"] == "8080"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(image_env)
    env.update(
        {
            "SAGEMAKER_BASE_DIR": str(base),
            "SAGEMAKER_BIND_TO_PORT": str(port),  # SageMaker sets it the same way
            "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
            "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
        }
    )
    proc = subprocess.Popen(
        [str(BIN / entry[0]), "serve"],  # SageMaker runs `docker run IMAGE serve`
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if ping_status(url) == 200:
                break
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no /ping within 180 s"
            time.sleep(0.5)
        status, raw = post(url, png_bytes((50, 40), (200, 30, 30)), "image/png")
        assert status == 200 and b'"predictions"' in raw, raw[:500]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "Traceback" not in output
