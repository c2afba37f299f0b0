"""The training image's framework module (SAGEMAKER_TRAINING_MODULE=imgclf.container:main).

sagemaker-training's `train` entry imports this and calls `main`. We run our program
(imgclf_train.py, shipped in imgclf/_program) as a child process, under torchrun through
sagemaker-training's torch_distributed runner when `sagemaker_torch_distributed_enabled` is set.
Only that program runs: whatever `sagemaker_program` / `sagemaker_submit_directory` say (an SDK
estimator's entry_point and source_dir), no other code is fetched, installed or started, and
SageMaker's own hyperparameters are checked (config.PLATFORM_KEYS) before anything starts.
SIGTERM (docker stop, a spot interruption) is passed on to the whole process group so the
program can keep its checkpoint and leave a reason in output/failure. In a container this
module's process is PID 1, where `killpg(1)` would mean kill(-1): every other process in the
container is signalled instead, and with none yet (still waiting for the hosts), it writes
output/failure and exits 143.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from imgclf.config import PROGRAM, check_platform_keys
from imgclf.contract import (
    BASE_DIR_ENV,
    DEFAULT_BASE_DIR,
    TORCH_DISTRIBUTED_KEY,
    Layout,
    read_training_contract,
    write_failure,
)
from imgclf.errors import UserError
from imgclf.util import parse_bool

PROGRAM_DIR = Path(__file__).parent / "_program"
PROGRAM_ARG = "--hyperparameters-from-config"


def signal_the_job(signum: int) -> bool:
    """Send `signum` to every process of the job but this one; False when there is none."""
    try:
        if os.getpid() == 1 or os.getpgrp() == 1:
            os.kill(-1, signum)  # PID 1 in a container: every other process in it
        else:
            os.killpg(os.getpgrp(), signum)
    except ProcessLookupError:
        return False
    return True


def _forward_sigterm() -> None:
    def forward(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # keep waiting for the children
        if not signal_the_job(signal.SIGTERM):  # stopped before the program started
            base = Path(os.environ.get(BASE_DIR_ENV, DEFAULT_BASE_DIR))
            write_failure(Layout(base), "Stopped by SIGTERM before the training program started")
            os._exit(128 + signum)  # sagemaker-training's `finally` would turn SystemExit into 0

    signal.signal(signal.SIGTERM, forward)


def install_program(code_dir: Path) -> None:
    """Make `code_dir` hold our program and nothing else. The runner starts `python
    imgclf_train.py` there with `code_dir` first on sys.path, so any other file could shadow a
    module (a torch.py), and a setup.py or requirements.txt would be pip-installed; a program of
    our name already there could be anyone's, so it is replaced."""
    code_dir.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in code_dir.iterdir() if p.name != PROGRAM)
    if others:
        raise UserError(
            f"{code_dir} holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}: this "
            f"image runs only its own program ({PROGRAM}) from there and nothing else may be in "
            "it; remove them"
        )
    (code_dir / PROGRAM).unlink(missing_ok=True)  # a link there is removed, not written through
    shutil.copyfile(PROGRAM_DIR / PROGRAM, code_dir / PROGRAM)


def main() -> None:
    from sagemaker_training import entry_point, environment, errors, process, runner

    layout = Layout(Path(os.environ.get(BASE_DIR_ENV, DEFAULT_BASE_DIR)))
    try:
        check_platform_keys(read_training_contract().hyperparameters)
        install_program(layout.code_dir)
    except UserError as exc:
        write_failure(layout, f"ClientError: {exc}")  # sagemaker-training keeps this one
        raise errors.ClientError(str(exc)) from None
    env = environment.Environment()
    distributed = parse_bool(env.additional_framework_parameters.get(TORCH_DISTRIBUTED_KEY)) is True
    runner_type = runner.TorchDistributedRunnerType if distributed else runner.ProcessRunnerType
    _forward_sigterm()
    # The program reads hyperparameters.json itself; the runner would paste hyperparameters
    # unquoted into a shell command line, so none are passed that way.
    env_vars = env.to_env_vars()
    chosen = runner.get(runner_type, PROGRAM, [PROGRAM_ARG], env_vars)

    class RunByKeyword(process.ProcessRunner):
        """entry_point.run calls `run(wait, capture_error)` by position, but the torch
        distributed runner's order is (capture_error, wait): torchrun then ran through
        /bin/sh without being waited on, and a failed job was reported as a success. By
        keyword both runners start the command without a shell and wait for it."""

        def __init__(self) -> None:  # the chosen runner holds the command
            pass

        def run(self, wait=True, capture_error=False):
            return chosen.run(wait=wait, capture_error=capture_error)

    # uri: the code dir itself, which install_program filled (nothing is downloaded)
    entry_point.run(
        str(layout.code_dir), PROGRAM, [PROGRAM_ARG], env_vars, runner_type=RunByKeyword()
    )
