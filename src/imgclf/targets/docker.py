"""Everything the local target runs under Docker: a training job as `docker run` of the training
image over its job dir, and endpoints as the serving image (`deploy --docker IMAGE`), both as
SageMaker runs them."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from imgclf.contract import (
    COMBINED_CHANNEL,
    MODEL_CHANNEL,
    RESPONSE_FORMAT_ENV,
    SERVE_BIND_HOST_ENV,
    SERVE_PORT_ENV,
    SERVE_WORKERS_ENV,
    check_name,
)
from imgclf.errors import UserError
from imgclf.jobs import HOST, LocalJob
from imgclf.targets.endpoints import (
    READY_TIMEOUT_SECONDS,
    BadRecord,
    drop_unreadable,
    load_endpoint,
    ping,
    port_free,
    read_record,
    record_names,
    unpack_model,
    warn,
)
from imgclf.util import plain_dir, write_json

# Every local container drops all capabilities and cannot gain any (setuid binaries, file
# capabilities), while still running as root as SageMaker runs images. What a command adds
# back is listed beside it with the reason.
CONFINED = ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


def _has_gpus() -> bool:
    """An NVIDIA driver here: containers get `--gpus all` (the images are CUDA builds)."""
    return shutil.which("nvidia-smi") is not None


def docker_command(job: LocalJob, image: str, *, gpus: bool | None = None) -> list[str]:
    """`docker run` of the training image over the job dir, as SageMaker runs it: `algo-1`
    resolvable, no network (which proves the job needs none), the data read-only."""
    gpus = _has_gpus() if gpus is None else gpus
    command = [
        "docker",
        "run",
        "--rm",
        "--name",
        job.name,
        "--network",
        "none",
        "--hostname",
        HOST,
        # sagemaker-training waits until every host in resourceconfig.json resolves.
        "--add-host",
        f"{HOST}:127.0.0.1",
        "--shm-size",
        "2g",  # DataLoader workers share batches through /dev/shm
        *CONFINED,
        # Root in the container writes model/, output/ and checkpoints/ into the job dir, which
        # the host user owns (0755): root passes those permission checks only with this.
        "--cap-add",
        "DAC_OVERRIDE",
        "-v",
        f"{job.layout.base}:/opt/ml",
        "-v",
        f"{job.data_dir}:/opt/ml/input/data/{COMBINED_CHANNEL}:ro",
        "-e",
        f"TRAINING_JOB_NAME={job.name}",
    ]
    if job.init_model is not None:  # `train --init-from`: the model channel, read-only
        channel = f"/opt/ml/input/data/{MODEL_CHANNEL}"
        inside = channel if job.init_model.is_dir() else f"{channel}/{job.init_model.name}"
        command += ["-v", f"{job.init_model}:{inside}:ro"]
    if gpus:
        command += ["--gpus", "all"]
    return command + [image, "train"]


def require_docker() -> None:
    if shutil.which("docker") is None:
        raise UserError(
            "--docker needs the docker command, which is not installed; drop "
            "--docker to run the same entry point without Docker"
        )
    probe = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
        raise UserError(
            f"no Docker engine is reachable ({reason}); start one, or drop --docker "
            "to run the same entry point without Docker"
        )


# ---------------------------------------------------------------- endpoints

CONTAINER_PREFIX = "imgclf-endpoint-"


@dataclass(frozen=True)
class ContainerEndpoint:
    """A local endpoint run by the serving image (`deploy --docker IMAGE`): host network, bound
    to 127.0.0.1, the model read-only at /opt/ml/model, as root as SageMaker runs it."""

    name: str
    port: int
    image: str
    base: Path
    model: str

    @property
    def container(self) -> str:
        return CONTAINER_PREFIX + self.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "base": str(self.base)}


def _containers_dir(home: Path) -> Path:
    return home / "endpoints-docker"


def read_container_endpoint(home: Path, name: str) -> ContainerEndpoint | None:
    """The container endpoint's record; None when there is none; BadRecord when unusable."""
    folder = _containers_dir(home) / check_name("endpoint", name)
    doc = read_record(
        folder, "container.json", {"name": str, "port": int, "image": str, "model": str}
    )
    if doc is None:
        return None
    return ContainerEndpoint(name, doc["port"], doc["image"], folder, doc["model"])


def load_container_endpoint(home: Path, name: str) -> ContainerEndpoint | None:
    """The container endpoint's record, or None (with a warning naming an unusable file)."""
    try:
        return read_container_endpoint(home, name)
    except BadRecord as exc:
        warn(f"skipping endpoint {name}: {exc}")
        return None


def list_container_endpoints(home: Path) -> list[ContainerEndpoint]:
    found = (load_container_endpoint(home, n) for n in record_names(_containers_dir(home)))
    return [e for e in found if e is not None]


def container_running(container: str) -> bool:
    probe = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Running}}", container],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return probe.returncode == 0 and probe.stdout.strip() == "true"


def serve_container_command(
    endpoint: ContainerEndpoint,
    model_dir: Path,
    *,
    workers: int | None = None,
    gpus: bool | None = None,
    response_format: str | None = None,
    environment: dict[str, str] | None = None,
) -> list[str]:
    """`docker run` of the serving image as SageMaker runs it (`serve`, the model at
    /opt/ml/model, no --user), on the host's network and bound to 127.0.0.1 only."""
    gpus = _has_gpus() if gpus is None else gpus
    command = [
        "docker",
        "run",
        "--detach",
        "--name",
        endpoint.container,
        "--network",
        "host",
        # Nothing added back: serve reads the model (files readable by any user), binds an
        # unprivileged port and writes only inside the container.
        *CONFINED,
        "-v",
        f"{model_dir}:/opt/ml/model:ro",
        "-e",
        f"{SERVE_PORT_ENV}={endpoint.port}",
        "-e",
        f"{SERVE_BIND_HOST_ENV}=127.0.0.1",
    ]
    if workers:
        command += ["-e", f"{SERVE_WORKERS_ENV}={workers}"]
    if response_format:  # the answers' default shape, as a SageMaker model's Environment sets it
        command += ["-e", f"{RESPONSE_FORMAT_ENV}={response_format}"]
    for key, value in (environment or {}).items():  # as a transform job's Environment sets them
        command += ["-e", f"{key}={value}"]
    if gpus:
        command += ["--gpus", "all"]
    return command + [endpoint.image, "serve"]


def container_logs(container: str, tail: int = 200) -> str:
    proc = subprocess.run(
        ["docker", "logs", "--tail", str(tail), container],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout + proc.stderr


def _remove_container(container: str, grace: float = 60.0) -> None:
    """SIGTERM (the server drains), SIGKILL after `grace`, then remove the container."""
    for command in (
        ["docker", "stop", "--time", str(int(grace)), container],
        ["docker", "rm", "--force", container],
    ):
        subprocess.run(command, capture_output=True, timeout=grace + 60)


def deploy_container(
    home: Path,
    model: Path,
    *,
    name: str,
    port: int,
    image: str,
    workers: int | None = None,
    response_format: str | None = None,
    environment: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT_SECONDS,
) -> ContainerEndpoint:
    """Run the serving image over a model dir or model.tar.gz; return once /ping answers 200."""
    base = _containers_dir(home) / check_name("endpoint", name)
    if (
        os.path.lexists(base)
        or load_container_endpoint(home, name) is not None
        or load_endpoint(home, name) is not None
    ):
        raise UserError(
            f"endpoint {name} exists; `launch.py delete {name}` first, or pick another --name"
        )
    if not port_free(port):
        raise UserError(f"port {port} is in use; pick another with --port")
    plain_dir(_containers_dir(home), "endpoints folder")
    base.mkdir()
    endpoint = ContainerEndpoint(name, port, image, base, str(Path(model).resolve()))
    try:
        source = Path(model).resolve()
        if source.is_dir():
            model_dir = source
        else:
            unpack_model(source, base / "model")  # model.tar.gz, unpacked as SageMaker does
            model_dir = base / "model"
        subprocess.run(["docker", "rm", "--force", endpoint.container], capture_output=True)
        started = subprocess.run(
            serve_container_command(
                endpoint,
                model_dir,
                workers=workers,
                response_format=response_format,
                environment=environment,
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if started.returncode != 0:
            reason = (started.stderr.strip().splitlines() or ["no reason given"])[-1]
            raise UserError(f"docker run of {image} failed: {reason}")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    write_json(base / "container.json", endpoint.to_dict())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(port):
            return endpoint
        if not container_running(endpoint.container):
            lines = container_logs(endpoint.container).strip().splitlines()
            reason = next(
                (line for line in reversed(lines) if "cannot serve" in line),
                lines[-1] if lines else "no log",
            )
            delete_container_endpoint(home, name)
            raise UserError(f"endpoint {name} did not start: {reason}")
        time.sleep(0.5)
    delete_container_endpoint(home, name)
    raise UserError(
        f"endpoint {name} was not ready within {timeout:.0f} s; "
        f"`docker logs {endpoint.container}` says why"
    )


def has_container_endpoint(home: Path, name: str) -> bool:
    """A folder for this name under the container endpoints (its record readable or not)."""
    return os.path.lexists(_containers_dir(home) / check_name("endpoint", name))


def delete_container_endpoint(home: Path, name: str) -> str:
    """Stop and remove the endpoint's container and its folder; what was done, for the user."""
    folder = _containers_dir(home) / check_name("endpoint", name)
    try:
        endpoint = read_container_endpoint(home, name)
    except BadRecord as exc:
        drop_unreadable(folder, name, exc)
        return (
            "its record could not be read: folder removed, no container touched (if "
            f"{CONTAINER_PREFIX}{name} is yours: docker rm --force {CONTAINER_PREFIX}{name})"
        )
    if endpoint is None:
        raise UserError(f"no local container endpoint named {name}")
    _remove_container(endpoint.container)
    shutil.rmtree(endpoint.base, ignore_errors=True)
    return f"stopped (container {endpoint.container} removed)"
