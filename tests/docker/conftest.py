"""The images, built by build_and_push.sh and run as SageMaker runs them, on a real engine.

The engine is the one at DOCKER_HOST, the default socket, or the private socket `make engine`
starts (docker/engine.sh). Without one, every test here is skipped with one line that says so.
The images and containers the tests make are removed at the end; the base image is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import FAST_HPS, ROOT, make_sagemaker_job
from tests.integration.serving_client import post

ENGINE_DIR = Path(os.environ.get("IMGCLF_ENGINE_DIR", "/var/lib/imgclf-docker"))
NO_ENGINE = (
    "no Docker engine: the docker tests are skipped (run `make engine` as root with apt-get, "
    "or point DOCKER_HOST at an engine)"
)


def _answers(host: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    if host:
        env["DOCKER_HOST"] = host
    try:
        probe = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            env=env,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def find_engine() -> str | None:
    """DOCKER_HOST, else the CLI's default, else `make engine`'s socket; None when none answers.
    The empty string means the CLI's default."""
    if shutil.which("docker") is None:
        return None
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"] if _answers(os.environ["DOCKER_HOST"]) else None
    if _answers(None):
        return ""
    private = f"unix://{ENGINE_DIR / 'docker.sock'}"
    return private if _answers(private) else None


@dataclass
class Engine:
    host: str
    made_images: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed at the end of the run

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
        if self.host:
            env["DOCKER_HOST"] = self.host
        env.update(extra or {})
        return env

    def docker(self, *args: str, timeout: float = 600, check: bool = True, **kw):
        proc = subprocess.run(
            ["docker", *args], env=self.env(), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check:
            assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr[-2000:]}"
        return proc

    def image_ids(self) -> set[str]:
        return set(self.docker("images", "--all", "--quiet", "--no-trunc").stdout.split())


NOTES: list[str] = []


@pytest.fixture(scope="session")
def engine():
    host = find_engine()
    if host is None:
        pytest.skip(NO_ENGINE)
    if host:
        os.environ["DOCKER_HOST"] = host  # launch.py and build_and_push.sh use the same engine
    made = Engine(host)
    before = made.image_ids()
    yield made
    # Remove what the tests made: containers named imgclf-test-*, then the images built here
    # (tags first, then the untagged layers the builds left), never the base image.
    names = made.docker("ps", "-a", "--filter", "name=imgclf-test-", "--format", "{{.Names}}")
    for name in names.stdout.split():
        made.docker("rm", "--force", name, check=False)
    for image in made.made_images:
        made.docker("rmi", "--force", image, check=False)
    for _ in range(3):
        left = made.image_ids() - before
        if not left:
            break
        made.docker("rmi", "--force", *left, check=False)


@dataclass(frozen=True)
class Images:
    train: str
    serve: str


@pytest.fixture(scope="session")
def images(engine) -> Images:
    """Both images, built by build_and_push.sh --no-push (what ships is what is tested)."""
    tag = f"t{uuid.uuid4().hex[:8]}"
    prefix = "imgclf-test"
    names = {kind: f"{prefix}-{kind}:{tag}" for kind in ("train", "serve")}
    engine.made_images += [*names.values(), *(f"{prefix}-{k}:latest" for k in names)]
    started = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / "build_and_push.sh"), "all", "--no-push", "--tag", tag],
        env=engine.env({"IMGCLF_ECR_PREFIX": prefix}),
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stdout.split() == [f"train={names['train']}", f"serve={names['serve']}"]
    for line in proc.stderr.splitlines():
        if line.startswith("built "):
            NOTES.append(line)
    NOTES.append(f"both images built in {time.monotonic() - started:.0f} s")
    return Images(names["train"], names["serve"])


def pytest_terminal_summary(terminalreporter):
    if NOTES:
        terminalreporter.section("docker images")
        for line in NOTES:
            terminalreporter.write_line(line)


# ---------------------------------------------------------------- training


# Python values, written as the SageMaker SDK writes a plain Estimator's: str() of each.
JOB_HPS = {
    **FAST_HPS,
    "pretrained": False,
    "epochs": 3,
    "image_size": 24,
    "batch_size": 16,
    "workers": 1,
    "seed": 11,
    "patience": 0,
}


def sagemaker_job(base: Path, data: Path) -> Path:
    return make_sagemaker_job(
        base,
        hyperparameters={k: str(v) for k, v in JOB_HPS.items()},
        channels={"training": data},
        json_encode=False,
    )


def train_command(engine, image: str, base: Path, name: str, *, add_host: bool = True):
    command = ["docker", "run", "--name", name, "--network", "none", "-v", f"{base}:/opt/ml"]
    if add_host:  # SageMaker's hosts resolve; without this, sagemaker-training waits for algo-1
        command += ["--add-host", "algo-1:127.0.0.1"]
    return command + [image, "train"]


def run_training(engine, image: str, base: Path, timeout: float = 900):
    name = f"imgclf-test-{uuid.uuid4().hex[:8]}"
    try:
        return subprocess.run(
            train_command(engine, image, base, name),
            env=engine.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        engine.docker("rm", "--force", name, check=False)


@pytest.fixture(scope="session")
def trained_job(engine, images, tiny_digits, tmp_path_factory) -> Path:
    """One uninterrupted job in the training image; its model/ is what the serving tests serve."""
    base = sagemaker_job(tmp_path_factory.mktemp("straight") / "ml", tiny_digits)
    proc = run_training(engine, images.train, base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base


# ---------------------------------------------------------------- HTTP helpers


def predict(url: str, body: bytes, content_type: str = "image/png") -> dict:
    status, raw = post(
        url, body, content_type, {"X-Amzn-SageMaker-Custom-Attributes": "probabilities=true"}
    )
    assert status == 200, raw[:500]
    return json.loads(raw)
