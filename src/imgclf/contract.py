"""The SageMaker container contract: the /opt/ml layout and what SageMaker writes into it.

`read_training_contract` is the one place that reads the environment and the config files; it
returns a frozen snapshot that everything below works from.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from imgclf.errors import DataError, UserError
from imgclf.util import atomic_write

DEFAULT_BASE_DIR = "/opt/ml"
BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"
# "1": no report.html at the end of a job (the local tuner's trials: it writes the best trial's
# report once, and `launch.py report JOB` writes any other's later).
NO_REPORT_ENV = "IMGCLF_NO_REPORT"
# A tuning run's answer, on either target: {"hyperparameters", "objective", "trial", ...}, what
# `launch.py train --hp-from` reads.
BEST_FILE = "best.json"
# smdebug collections and how often (steps) each is saved: our hook's defaults and what
# `--sagemaker-debugger` asks SageMaker Debugger for (one table for both).
DEBUG_COLLECTIONS = {"losses": 1, "gradients": 10, "weights": 10}
# The launcher's default SageMaker execution role (read at the edge, by the CLI, only).
SAGEMAKER_ROLE_ENV = "IMGCLF_SAGEMAKER_ROLE"
# How a CPU endpoint runs the network: auto (ONNX Runtime when installed) | torch | onnxruntime.
CPU_RUNTIME_ENV = "IMGCLF_CPU_RUNTIME"

# ---------------------------------------------------------------- the serving process
# Every environment name `serve` honours (SageMaker's names where SageMaker has one), read once
# by serving.settings.read_settings; the local target and the Dockerfile set the same names.
SERVE_PORT_ENV = "SAGEMAKER_BIND_TO_PORT"
SERVE_WORKERS_ENV = "SAGEMAKER_MODEL_SERVER_WORKERS"
SERVE_TIMEOUT_ENV = "SAGEMAKER_MODEL_SERVER_TIMEOUT"  # seconds per request
SERVE_STARTUP_TIMEOUT_ENV = "SAGEMAKER_STARTUP_TIMEOUT"
# Set by the SageMaker SDK for a model deployed with entry_point=: refused (serving.settings).
SERVE_PROGRAM_ENV = "SAGEMAKER_PROGRAM"
# Set by SageMaker in a batch transform's containers: batch limits (serving.settings).
SERVE_BATCH_ENV = "SAGEMAKER_BATCH"
SERVE_MAX_PAYLOAD_ENV = "SAGEMAKER_MAX_PAYLOAD_IN_MB"
SERVE_SUBMIT_DIRECTORY_ENV = "SAGEMAKER_SUBMIT_DIRECTORY"
# Written by the launcher into an asynchronous endpoint's model: async limits (serving.settings).
SERVE_ASYNC_ENV = "IMGCLF_ASYNC"
SERVE_MODEL_DIR_ENV = "IMGCLF_MODEL_DIR"
# Where the launcher stages a model for a running local endpoint before it sends `serve`
# SIGHUP (serve.Swap); unset (a container): `serve` swaps nothing and ignores SIGHUP.
SERVE_NEXT_MODEL_DIR_ENV = "IMGCLF_NEXT_MODEL_DIR"
SERVE_BIND_HOST_ENV = "IMGCLF_BIND_HOST"  # 0.0.0.0 in a container; 127.0.0.1 locally
SERVE_HANDLER_ENV = "IMGCLF_MMS_HANDLER"  # another MMS service module (A/B benchmarks)
SERVE_DRAIN_ENV = "IMGCLF_DRAIN_SECONDS"
SERVE_RECOVER_ENV = "IMGCLF_RECOVER_SECONDS"
SERVE_HEADER_TIMEOUT_ENV = "IMGCLF_HEADER_TIMEOUT_SECONDS"
SERVE_BODY_TIMEOUT_ENV = "IMGCLF_BODY_TIMEOUT_SECONDS"
SERVE_IDLE_TIMEOUT_ENV = "IMGCLF_IDLE_TIMEOUT_SECONDS"
SERVE_MAX_CONNECTIONS_ENV = "IMGCLF_MAX_CONNECTIONS"
# Where `serve` writes its state as JSON ({"state": starting|ready|failed|stopping|stopped,
# "reason", "pid"}), replaced atomically at each change; unset: no file (a container).
SERVE_STATE_FILE_ENV = "IMGCLF_STATE_FILE"
# MMS batching: up to this many concurrent requests reach a worker as one handler call (one
# forward pass), gathered for at most this many milliseconds after the first (1 = take what is
# already queued; MMS's own default of 100 would delay every lone request by 100 ms).
SERVE_BATCH_SIZE_ENV = "IMGCLF_BATCH_SIZE"
SERVE_BATCH_DELAY_ENV = "IMGCLF_MAX_BATCH_DELAY_MS"
RESPONSE_FORMAT_ENV = "IMGCLF_RESPONSE_FORMAT"  # the deploy's default answer format
# The deploy's default min_confidence: a probability, "auto" (each class's own threshold), "off"
MIN_CONFIDENCE_ENV = "IMGCLF_MIN_CONFIDENCE"
MMS_WORKERS_ENV = "IMGCLF_WORKERS"  # set by serve for each MMS worker: how to split the CPUs
# Set by serve for MMS's workers: a folder where each worker, once its model is loaded, leaves
# a file named by its pid (MMS calls a worker READY as soon as it connects, before the load).
WORKER_LOADED_DIR_ENV = "IMGCLF_WORKER_LOADED_DIR"
# The launcher's state lives here (default .imgclf).
HOME_ENV = "IMGCLF_HOME"
# Set by the local target: where image-check verdicts of earlier jobs are kept (the files of a
# dataset are decoded once to find unreadable ones, not once per job or tuning trial).
SCAN_CACHE_ENV = "IMGCLF_SCAN_CACHE"

# The training image's environment (docker/train/Dockerfile sets the same; a test compares).
# sagemaker-training's `train` entry imports SAGEMAKER_TRAINING_MODULE and calls it; our module
# runs SAGEMAKER_PROGRAM as a process, or under torchrun when distribution is enabled.
TRAIN_IMAGE_ENV = {
    "SAGEMAKER_TRAINING_MODULE": "imgclf.container:main",
    "SAGEMAKER_PROGRAM": "imgclf_train.py",
}

# Hyperparameters that turn on torchrun through sagemaker-training's torch_distributed runner.
TORCH_DISTRIBUTED_KEY = "sagemaker_torch_distributed_enabled"
PROCESSES_PER_HOST_KEY = "sagemaker_mpi_num_of_processes_per_host"

# Job and endpoint names: SageMaker's own pattern (training jobs, endpoints, models), so a name
# is valid on both targets, as a folder under the launcher's home and as a container name.
NAME_MAX_LENGTH = 63
TUNING_NAME_MAX_LENGTH = 32  # HyperParameterTuningJobName


def name_pattern(max_length: int = NAME_MAX_LENGTH) -> str:
    return f"^[a-zA-Z0-9](-*[a-zA-Z0-9]){{0,{max_length - 1}}}$"


def check_name(kind: str, value: str, *, max_length: int = NAME_MAX_LENGTH) -> str:
    """`value` when it is a valid `kind` name (e.g. "job", "endpoint"), else a UserError naming it
    and the pattern: letters, digits and hyphens, starting and ending with a letter or digit."""
    body = name_pattern(max_length)[1:-1]  # fullmatch: `$` would let a trailing newline through
    if not isinstance(value, str) or re.fullmatch(body, value) is None:
        raise UserError(
            f"{kind} name {value!r} is not valid: use letters, digits and hyphens, starting and "
            f"ending with a letter or digit, at most {max_length} characters "
            f"(SageMaker's pattern {name_pattern(max_length)})"
        )
    return value


# ---------------------------------------------------------------- job outputs
# What a training job leaves behind, one vocabulary for the program that writes it and every
# reader (report, debug, the tuner, the targets; none of them needs torch for it). `Layout`
# gives each file's path in a job directory.
# The model artifact, model/ (SageMaker tars it into model.tar.gz; `serve` loads it):
MODEL_FILE = "model.pt"  # the state_dict
LABELS_FILE = "labels.json"  # {"0": label, ...}
MODEL_CONFIG_FILE = "model_config.json"  # architecture, classes, preprocessing, calibration
METRICS_FILE = "metrics.json"  # the job's summary (test metrics); also `evaluate`'s
# The network as an ONNX graph (a protobuf, no pickles) and its record (which model.pt and
# preprocessing it was exported from, its parity probe): made once with the artifact so an
# endpoint need not export it at every start (imgclf.graph). Optional: without them, or when
# they do not match model.pt, the endpoint exports the graph itself or serves eager PyTorch.
GRAPH_FILE = "model.onnx"
GRAPH_RECORD_FILE = "model_onnx.json"
CHECKPOINT_FILE = "checkpoint.pt"  # in checkpoints/: what a resumed job starts from
# output/data/:
HISTORY_FILE = "history.json"  # one row per epoch
RUN_CONFIG_FILE = "config.json"  # the resolved hyperparameters the job ran with
EVALUATION_FILE = "evaluation.json"  # labels, per-class figures, reliability, train counts
RULES_FILE = "rules.json"  # the debugging rules' verdicts
DEBUG_STATUS_FILE = "debug.json"  # whether smdebug tensors were recorded, and where
SKIPPED_IMAGES_FILE = "skipped_images.json"  # images the scan found unreadable
REPORT_FILE = "report.html"

CHANNEL_NAMES = ("train", "valid", "test")
COMBINED_CHANNEL = "training"
# Incremental training (`train --init-from`): the model a job starts from, in a channel named
# as SageMaker's built-in algorithms name it, with their content type. It holds a model dir
# (a local job) or the model.tar.gz SageMaker downloads into it.
MODEL_CHANNEL = "model"
MODEL_CHANNEL_CONTENT_TYPE = "application/x-sagemaker-model"

FAILURE_LIMIT = 1024


@dataclass(frozen=True)
class Layout:
    """Paths of a job directory shaped like /opt/ml."""

    base: Path

    @property
    def config_dir(self) -> Path:
        return self.base / "input" / "config"

    @property
    def data_dir(self) -> Path:
        return self.base / "input" / "data"

    @property
    def model_dir(self) -> Path:
        return self.base / "model"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def output_data_dir(self) -> Path:
        return self.base / "output" / "data"

    @property
    def failure_file(self) -> Path:
        return self.base / "output" / "failure"

    @property
    def checkpoint_dir(self) -> Path:
        return self.base / "checkpoints"

    @property
    def code_dir(self) -> Path:
        return self.base / "code"

    # -- what the job leaves behind (see the job outputs' names above)

    @property
    def metrics_file(self) -> Path:
        return self.model_dir / METRICS_FILE

    @property
    def history_file(self) -> Path:
        return self.output_data_dir / HISTORY_FILE

    @property
    def run_config_file(self) -> Path:
        return self.output_data_dir / RUN_CONFIG_FILE

    @property
    def evaluation_file(self) -> Path:
        return self.output_data_dir / EVALUATION_FILE

    @property
    def rules_file(self) -> Path:
        return self.output_data_dir / RULES_FILE

    @property
    def debug_status_file(self) -> Path:
        return self.output_data_dir / DEBUG_STATUS_FILE

    @property
    def skipped_images_file(self) -> Path:
        return self.output_data_dir / SKIPPED_IMAGES_FILE

    @property
    def report_file(self) -> Path:
        return self.output_data_dir / REPORT_FILE


@dataclass(frozen=True)
class TrainingContract:
    """A read-only snapshot of what SageMaker gave this training container."""

    layout: Layout
    hyperparameters: Mapping[str, str]
    hosts: tuple[str, ...]
    current_host: str
    channels: Mapping[str, Path]
    job_name: str

    @property
    def splits(self) -> dict[str, Path]:
        """`train`/`valid`/`test` directories, from separate channels or one `training` channel."""
        return resolve_splits(self.channels)

    @property
    def init_model(self) -> Path | None:
        """The `model` channel (the model this job starts from), or None."""
        return self.channels.get(MODEL_CHANNEL)


def _read_json(path: Path, default):
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); SageMaker writes it as JSON") from None


def read_training_contract(environ: Mapping[str, str] | None = None) -> TrainingContract:
    """Read the job directory (SAGEMAKER_BASE_DIR, default /opt/ml) and SM_* variables once."""
    env = os.environ if environ is None else environ
    layout = Layout(Path(env.get(BASE_DIR_ENV, DEFAULT_BASE_DIR)))
    raw_hps = _read_json(layout.config_dir / "hyperparameters.json", {})
    if not isinstance(raw_hps, dict):
        raise UserError(f"{layout.config_dir / 'hyperparameters.json'} must hold a JSON object")
    resources = _read_json(layout.config_dir / "resourceconfig.json", {})
    data_config = _read_json(layout.config_dir / "inputdataconfig.json", None)
    hosts = tuple(resources.get("hosts") or [env.get("SM_CURRENT_HOST", "algo-1")])
    current = resources.get("current_host") or env.get("SM_CURRENT_HOST", hosts[0])
    if data_config is None:  # no inputdataconfig.json: take the channel folders that exist
        names = (
            sorted(p.name for p in layout.data_dir.iterdir()) if layout.data_dir.is_dir() else []
        )
    else:
        names = sorted(data_config)
    channels = {name: layout.data_dir / name for name in names}
    return TrainingContract(
        layout=layout,
        hyperparameters={str(k): v for k, v in raw_hps.items()},
        hosts=hosts,
        current_host=str(current),
        channels=channels,
        job_name=env.get("TRAINING_JOB_NAME", layout.base.name),
    )


def resolve_splits(channels: Mapping[str, Path]) -> dict[str, Path]:
    """Map channels to split directories: `train`, `valid`, `test` channels, or one `training`
    channel that holds `train/ valid/ test/` (the dogImages layout)."""
    splits = {name: Path(channels[name]) for name in CHANNEL_NAMES if name in channels}
    if COMBINED_CHANNEL in channels:
        root = Path(channels[COMBINED_CHANNEL])
        for name in CHANNEL_NAMES:
            if name not in splits and (root / name).is_dir():
                splits[name] = root / name
    missing = [name for name in ("train", "valid") if name not in splits]
    if missing:
        given = ", ".join(sorted(channels)) or "none"
        raise DataError(
            f"no {' or '.join(missing)} data: channels given: {given}. Give channels named "
            "train, valid (and test), or one 'training' channel holding train/ valid/ test/ "
            "folders of class subfolders (the ImageFolder layout)"
        )
    for name, path in splits.items():
        if not path.is_dir():
            raise DataError(f"channel {name}: {path} is not a directory")
    return splits


def write_failure(layout: Layout, message: str) -> None:
    """SageMaker shows the first 1024 characters of output/failure as the job's FailureReason."""
    layout.output_dir.mkdir(parents=True, exist_ok=True)
    text = message.strip()
    if len(text) > FAILURE_LIMIT:
        text = text[: FAILURE_LIMIT - 3] + "..."
    atomic_write(layout.failure_file, text + "\n")
