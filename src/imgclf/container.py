"""The training image's framework module (SAGEMAKER_TRAINING_MODULE=imgclf.container:main).

sagemaker-training's `train` entry imports this and calls `main`. We run our program
(SAGEMAKER_PROGRAM, shipped in imgclf/_program) as a child process, under torchrun through
sagemaker-training's torch_distributed runner when `sagemaker_torch_distributed_enabled` is set.
SIGTERM (docker stop, a spot interruption) is passed on to the whole process group so the
program can keep its checkpoint and leave a reason in output/failure. In a container this
module's process is PID 1, where `killpg(1)` would mean kill(-1): every other process in the
container is signalled instead, and with none yet (still waiting for the hosts), it writes
output/failure and exits 143.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from imgclf.contract import (
    BASE_DIR_ENV,
    DEFAULT_BASE_DIR,
    TORCH_DISTRIBUTED_KEY,
    TRAIN_IMAGE_ENV,
    Layout,
    write_failure,
)
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


def main() -> None:
    from sagemaker_training import entry_point, environment, runner

    env = environment.Environment()
    distributed = parse_bool(env.additional_framework_parameters.get(TORCH_DISTRIBUTED_KEY)) is True
    runner_type = runner.TorchDistributedRunnerType if distributed else runner.ProcessRunnerType
    _forward_sigterm()
    # The program ships in the package; the code dir SageMaker would fill from
    # sagemaker_submit_directory is filled from here instead (nothing is downloaded).
    uri = (
        env.module_dir
        if Path(env.module_dir).is_dir() and os.listdir(env.module_dir)
        else str(PROGRAM_DIR)
    )
    entry_point.run(
        uri,
        env.user_entry_point or TRAIN_IMAGE_ENV["SAGEMAKER_PROGRAM"],
        # The program reads hyperparameters.json itself; the runner would paste hyperparameters
        # unquoted into a shell command line, so none are passed that way.
        [PROGRAM_ARG],
        env.to_env_vars(),
        runner_type=runner_type,
    )
