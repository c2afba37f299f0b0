"""Everything the local target runs under Docker, as SageMaker runs the images: a training job as
`docker run` of the training image over its job dir, and the command lines of a serving container
(`deploy --docker IMAGE`; targets.runners.ContainerRunner runs them)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from imgclf.contract import (
    COMBINED_CHANNEL,
    MODEL_CHANNEL,
    SERVE_BIND_HOST_ENV,
    SERVE_PORT_ENV,
    SERVE_STATE_FILE_ENV,
)
from imgclf.errors import UserError
from imgclf.jobs import HOST, LocalJob

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


# ---------------------------------------------------------------- serving containers

CONTAINER_PREFIX = "imgclf-endpoint-"  # then the endpoint's name
# Where a serving container writes serve's state file: a bind mount of a folder of its own,
# the only host folder the container may write to.
STATE_MOUNT = "/run/imgclf"


def serve_container_command(
    *,
    container: str,
    image: str,
    port: int,
    model_dir: Path,
    state_dir: Path,
    state_file: str,
    environment: dict[str, str] | None = None,
    gpus: bool | None = None,
) -> list[str]:
    """`docker run` of the serving image as SageMaker runs it (`serve`, the model at
    /opt/ml/model, no --user), on the host's network and bound to 127.0.0.1 only; serve writes
    its state to STATE_MOUNT/`state_file`, which is `state_dir` on the host. `environment`: more
    of the serving contract's settings (as a SageMaker model's or transform job's Environment
    sets them); the port and the loopback address come last, so nothing overrides them."""
    gpus = _has_gpus() if gpus is None else gpus
    command = [
        "docker",
        "run",
        "--detach",
        "--name",
        container,
        "--network",
        "host",
        # Nothing added back: serve reads the model (files readable by any user), binds an
        # unprivileged port and writes only its state folder (open to it: see ContainerRunner).
        *CONFINED,
        "-v",
        f"{model_dir}:/opt/ml/model:ro",
        "-v",
        f"{state_dir}:{STATE_MOUNT}",
    ]
    settings = {
        **(environment or {}),
        SERVE_STATE_FILE_ENV: f"{STATE_MOUNT}/{state_file}",
        SERVE_PORT_ENV: str(port),
        SERVE_BIND_HOST_ENV: "127.0.0.1",
    }
    for key, value in settings.items():
        command += ["-e", f"{key}={value}"]
    if gpus:
        command += ["--gpus", "all"]
    return command + [image, "serve"]


def inspect_container(container: str) -> tuple[str, bool] | None:
    """(id, running) of the container of that name; None when there is none (or no engine
    answers, or no docker command is installed)."""
    try:
        probe = subprocess.run(
            ["docker", "inspect", "--format", "{{.Id}} {{.State.Running}}", container],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        return None
    fields = probe.stdout.split()
    if probe.returncode != 0 or len(fields) != 2:
        return None
    return fields[0], fields[1] == "true"


def container_logs(container: str) -> str:
    """What the container printed (stdout and stderr), "" when it cannot be read."""
    try:
        proc = subprocess.run(["docker", "logs", container], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout + proc.stderr).decode(errors="replace")


def stop_container(container: str, grace: float = 60.0) -> None:
    """SIGTERM (serve drains), SIGKILL after `grace` (`container`: a name or an id)."""
    subprocess.run(
        ["docker", "stop", "--time", str(int(grace)), container],
        capture_output=True,
        timeout=grace + 60,
    )


def remove_container(container: str) -> None:
    subprocess.run(["docker", "rm", "--force", container], capture_output=True, timeout=60)
