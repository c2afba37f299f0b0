"""Local jobs: a job directory shaped like SageMaker's /opt/ml, and the training image's own
`train` entry (sagemaker-training) run over it as a process group, the way SageMaker runs a
training job (SIGTERM, then SIGKILL after the grace period). The local target and the local
tuner both run their jobs through this module; it imports neither."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imgclf.contract import (
    BASE_DIR_ENV,
    COMBINED_CHANNEL,
    MODEL_CHANNEL,
    MODEL_CHANNEL_CONTENT_TYPE,
    PROCESSES_PER_HOST_KEY,
    SCAN_CACHE_ENV,
    TORCH_DISTRIBUTED_KEY,
    TRAIN_IMAGE_ENV,
    Layout,
    check_name,
    name_pattern,
)
from imgclf.errors import UserError
from imgclf.util import new_job_name, open_lock, plain_dir, write_json  # noqa: F401 - re-exported

HOST = "algo-1"
STOP_GRACE_SECONDS = 120  # what SageMaker gives a stopped job


@dataclass(frozen=True)
class LocalJob:
    name: str
    layout: Layout
    data_dir: Path
    lock: object = None  # the open, flock'ed locks/<name>.lock (see lock_job)
    init_model: Path | None = None  # what the `model` channel holds (`train --init-from`)

    @property
    def log_file(self) -> Path:
        return self.layout.base / "train.log"


def prepare_job(
    home: Path,
    name: str,
    *,
    data_dir: Path,
    hyperparameters: dict[str, str],
    nproc: int = 1,
    link_data: bool = True,
    init_model: Path | None = None,
) -> LocalJob:
    """Lay out jobs/<name>/ as SageMaker lays out /opt/ml. A job dir that exists keeps its
    checkpoints/ (so the job resumes) and gets fresh config, model/ and output/. The name is
    checked first (a name such as `../..` would make the job dir the user's project), and no
    folder of the job may be a symbolic link. `init_model` (a model dir or model.tar.gz, from
    `init_model_path`) becomes the `model` channel, as SageMaker's incremental training has it."""
    check_name("job", name)
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise UserError(f"--data {data_dir} is not a directory")
    lock = lock_job(home / "jobs", name)
    layout = Layout(plain_dir(plain_dir(home / "jobs", "jobs folder") / name, "job folder"))
    if init_model is not None:
        init_model = Path(init_model).resolve()
        if init_model == layout.base.resolve() or layout.base.resolve() in init_model.parents:
            raise UserError(
                f"--init-from {init_model} is in job {name}'s own folder, which this run "
                "replaces: give the new job another --job-name"
            )
    plain_dir(layout.checkpoint_dir, "checkpoint folder")
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
    channels = {
        COMBINED_CHANNEL: {
            "TrainingInputMode": "File",
            "S3DistributionType": "FullyReplicated",
            "RecordWrapperType": "None",
        }
    }
    if init_model is not None:
        channels[MODEL_CHANNEL] = {
            **channels[COMBINED_CHANNEL],
            "ContentType": MODEL_CHANNEL_CONTENT_TYPE,
        }
    _write(layout.config_dir / "inputdataconfig.json", channels)
    channel = layout.data_dir / COMBINED_CHANNEL
    if link_data:
        channel.symlink_to(data_dir, target_is_directory=True)
    else:
        channel.mkdir()
    if init_model is not None:
        _lay_model_channel(layout.data_dir / MODEL_CHANNEL, init_model, link=link_data)
    return LocalJob(name, layout, data_dir, lock, init_model)


def init_model_path(home: Path, value: str) -> Path:
    """`--init-from` on the local target: a model dir, a model.tar.gz or a local job's name
    (its model/), as a path; s3:// is refused in one line (nothing here talks to AWS)."""
    if "://" in value:
        raise UserError(
            f"--init-from {value}: the local target reads a model dir, a model.tar.gz or a local "
            "job's name; for s3:// add --target sagemaker (or copy it here first: aws s3 cp)"
        )
    path = Path(value)
    if path.exists():
        return path.resolve()
    named = home / "jobs" / value / "model"
    if re.fullmatch(name_pattern()[1:-1], value) and (named / "model.pt").is_file():
        return named.resolve()
    raise UserError(
        f"--init-from {value} is neither a model dir, a model.tar.gz nor the name of a local "
        f"job with a model (see {home / 'jobs'})"
    )


def _lay_model_channel(channel: Path, source: Path, *, link: bool) -> None:
    """The `model` channel: a link to the model dir, or a folder holding a link to the archive
    (SageMaker downloads model.tar.gz into the channel's folder); under Docker an empty folder
    that the container mounts the model over (targets.docker)."""
    if not link:
        channel.mkdir()
    elif source.is_dir():
        channel.symlink_to(source, target_is_directory=True)
    else:
        channel.mkdir()
        (channel / source.name).symlink_to(source)


def lock_job(jobs_dir: Path, name: str):
    """Take locks/<name>.lock beside jobs/ (an flock, released when the launcher exits, however
    it exits), or refuse at once when another launcher runs a job of that name: two jobs in one
    directory would mix one's hyperparameters with the other's model and failure file. (Not in
    jobs/ itself, where every entry is a job directory.)"""
    import fcntl

    check_name("job", name)
    locks = plain_dir(jobs_dir.parent / "locks", "locks folder")
    path = Path(os.path.abspath(locks / f"{name}.lock"))
    if path in _HELD_LOCKS:  # this process runs the job again (a resume, a refined trial)
        return _HELD_LOCKS[path]
    handle = open_lock(path)  # held until this process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            f"job {name} is already running ({holder}); wait for it to end, stop it, or give "
            "this one another --job-name"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"launcher pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    _HELD_LOCKS[path] = handle
    return handle


_HELD_LOCKS: dict[Path, object] = {}


def _write(path: Path, obj) -> None:
    write_json(path, obj)


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
            # Jobs under one home (or one tuning dir) share their image-check verdicts.
            SCAN_CACHE_ENV: str(job.layout.base.parent.parent / "scans"),
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


def run_job(
    job: LocalJob,
    command: list[str],
    env: dict[str, str] | None,
    *,
    echo: bool = True,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> int:
    """Run the job's process group, copying its output to train.log (and the console, and
    `on_line`). Ctrl-C or SIGTERM stops it the way SageMaker does: SIGTERM, then SIGKILL after
    the grace period."""
    interactive = echo and sys.stderr.isatty()
    with open(job.log_file, "ab") as log:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=None if interactive else subprocess.STDOUT,  # keep the progress bar live
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if on_start is not None:
            on_start(proc)
        previous = None
        if threading.current_thread() is threading.main_thread():
            # `kill` of the launcher stops the job the same way (SIGTERM to its group), and
            # whoever handled SIGTERM before (the tuner) still hears it.
            def on_sigterm(signum, frame):
                signal_group(proc, signal.SIGTERM)
                if callable(previous):
                    previous(signum, frame)

            previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
                if on_line is not None:
                    on_line(line.decode("utf-8", "replace"))
            return proc.wait()
        except KeyboardInterrupt:
            stop_process_group(proc)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if proc.poll() is None:
                stop_process_group(proc)


def signal_group(proc: subprocess.Popen, signum: int) -> None:
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


def read_failure(job: LocalJob) -> str | None:
    path = job.layout.failure_file
    return path.read_text().strip() if path.exists() else None
