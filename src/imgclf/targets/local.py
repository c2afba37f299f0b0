"""The local target: a job directory shaped like /opt/ml and the image's own `train` entry
(sagemaker-training) run over it as a child process, or the image itself under Docker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from imgclf.contract import (
    BASE_DIR_ENV,
    COMBINED_CHANNEL,
    PROCESSES_PER_HOST_KEY,
    TORCH_DISTRIBUTED_KEY,
    TRAIN_IMAGE_ENV,
    Layout,
)
from imgclf.errors import UserError

HOST = "algo-1"
STOP_GRACE_SECONDS = 120  # what SageMaker gives a stopped job


def default_home() -> Path:
    return Path(os.environ.get("IMGCLF_HOME", ".imgclf")).resolve()


@dataclass(frozen=True)
class LocalJob:
    name: str
    layout: Layout
    data_dir: Path

    @property
    def log_file(self) -> Path:
        return self.layout.base / "train.log"


def new_job_name(prefix: str = "imgclf") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_job(
    home: Path,
    name: str,
    *,
    data_dir: Path,
    hyperparameters: dict[str, str],
    nproc: int = 1,
    link_data: bool = True,
) -> LocalJob:
    """Lay out jobs/<name>/ as SageMaker lays out /opt/ml. A job dir that exists keeps its
    checkpoints/ (so the job resumes) and gets fresh config, model/ and output/."""
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise UserError(f"--data {data_dir} is not a directory")
    layout = Layout(home / "jobs" / name)
    for stale in (layout.base / "input", layout.model_dir, layout.output_dir, layout.code_dir):
        if stale.is_symlink() or stale.is_file():
            stale.unlink()
        elif stale.exists():
            shutil.rmtree(stale)
    for folder in (
        layout.config_dir,
        layout.data_dir,
        layout.model_dir,
        layout.output_data_dir,
        layout.checkpoint_dir,
    ):
        folder.mkdir(parents=True, exist_ok=True)
    hps = {str(k): str(v) for k, v in hyperparameters.items()}
    if nproc > 1:
        hps[TORCH_DISTRIBUTED_KEY] = "true"
        hps[PROCESSES_PER_HOST_KEY] = str(nproc)
    _write(layout.config_dir / "hyperparameters.json", hps)
    _write(
        layout.config_dir / "resourceconfig.json",
        {"current_host": HOST, "hosts": [HOST], "network_interface_name": "lo"},
    )
    _write(
        layout.config_dir / "inputdataconfig.json",
        {
            COMBINED_CHANNEL: {
                "TrainingInputMode": "File",
                "S3DistributionType": "FullyReplicated",
                "RecordWrapperType": "None",
            }
        },
    )
    channel = layout.data_dir / COMBINED_CHANNEL
    if link_data:
        channel.symlink_to(data_dir, target_is_directory=True)
    else:
        channel.mkdir()
    return LocalJob(name, layout, data_dir)


def _write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def job_environment(job: LocalJob, base_env: dict[str, str] | None = None) -> dict[str, str]:
    """The image's environment over the job dir; AWS credentials are not passed to the job."""
    env = {k: v for k, v in (base_env or os.environ).items() if not k.startswith("AWS_")}
    bindir = str(Path(sys.executable).parent)
    env.update(TRAIN_IMAGE_ENV)
    env.update(
        {
            BASE_DIR_ENV: str(job.layout.base),
            "TRAINING_JOB_NAME": job.name,
            "SM_CURRENT_HOST": HOST,
            # sagemaker-training waits until every host name resolves; there is one host, here.
            "SM_STUDIO_LOCAL_MODE": "true",
            "PATH": bindir + os.pathsep + env.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def train_command() -> list[str]:
    """sagemaker-training's `train` console script: what the image's ENTRYPOINT runs."""
    script = Path(sys.executable).parent / "train"
    if not script.exists():
        raise UserError(
            f"{script} is missing: sagemaker-training is not installed in this "
            "Python environment; run `make setup`"
        )
    return [str(script)]


def run_job(job: LocalJob, command: list[str], env: dict[str, str], *, echo: bool = True) -> int:
    """Run the job's process group, copying its output to train.log (and the console). Ctrl-C
    stops it the way SageMaker does: SIGTERM, then SIGKILL after the grace period."""
    interactive = echo and sys.stderr.isatty()
    with open(job.log_file, "ab") as log:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=None if interactive else subprocess.STDOUT,  # keep the progress bar live
            start_new_session=True,
        )
        # `kill` of the launcher stops the job the same way (SIGTERM to its process group).
        previous = signal.signal(signal.SIGTERM, lambda *_: _signal_group(proc, signal.SIGTERM))
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
            return proc.wait()
        except KeyboardInterrupt:
            stop_process_group(proc)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            if proc.poll() is None:
                stop_process_group(proc)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def stop_process_group(proc: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> int:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return proc.wait()
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def docker_command(job: LocalJob, image: str, *, gpus: bool | None = None) -> list[str]:
    """`docker run` of the training image over the job dir, as SageMaker runs it."""
    if gpus is None:
        gpus = shutil.which("nvidia-smi") is not None
    command = [
        "docker",
        "run",
        "--rm",
        "--name",
        job.name,
        "--shm-size",
        "2g",  # DataLoader workers share batches through /dev/shm
        "-v",
        f"{job.layout.base}:/opt/ml",
        "-v",
        f"{job.data_dir}:/opt/ml/input/data/{COMBINED_CHANNEL}:ro",
        "-e",
        f"TRAINING_JOB_NAME={job.name}",
    ]
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


def read_failure(job: LocalJob) -> str | None:
    path = job.layout.failure_file
    return path.read_text().strip() if path.exists() else None
