"""Every setting `serve` honours, read once from the environment into one frozen object: each
default is written once (a field's default here, or protocol.Limits'). SageMaker's variables
are read by the names sagemaker-inference's `parameters` module gives them (what the serving
image has that toolkit for); ours by imgclf.contract's. contract.py also spells SageMaker's
names, for the launcher and the training image, which do not have the toolkit:
tests/unit/test_settings.py holds the two spellings equal.

What of sagemaker-inference is not used, and why: `environment.Environment` reads `os.environ`
itself (its module computes the model directory at import), so it cannot be given the
environment a test or the launcher hands us, turns a bad number into a bare `ValueError` that
names no variable, and has the toolkit's defaults (a 600 s start-up); `model_server` writes
/etc, binds the management API to 0.0.0.0 and pip-installs a model's requirements.txt;
`transformer` sends tracebacks to clients; `decoder` unpickles NumPy payloads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from sagemaker_inference import parameters as sagemaker

from imgclf.contract import (
    CPU_RUNTIME_ENV,
    DEFAULT_BASE_DIR,
    MIN_CONFIDENCE_ENV,
    RESPONSE_FORMAT_ENV,
    SERVE_ASYNC_ENV,
    SERVE_BATCH_DELAY_ENV,
    SERVE_BATCH_ENV,
    SERVE_BATCH_SIZE_ENV,
    SERVE_BIND_HOST_ENV,
    SERVE_BODY_TIMEOUT_ENV,
    SERVE_DRAIN_ENV,
    SERVE_HANDLER_ENV,
    SERVE_HEADER_TIMEOUT_ENV,
    SERVE_IDLE_TIMEOUT_ENV,
    SERVE_MAX_CONNECTIONS_ENV,
    SERVE_MODEL_DIR_ENV,
    SERVE_NEXT_MODEL_DIR_ENV,
    SERVE_RECOVER_ENV,
    SERVE_SUBMIT_DIRECTORY_ENV,
)
from imgclf.serving.protocol import (
    DEFAULT_FORMAT,
    FORMATS,
    MAX_PAYLOAD_MB,
    MB,
    Limits,
    RequestError,
    min_confidence,
)
from imgclf.util import cpu_count, parse_bool

HANDLER = "imgclf.serving.handler_service"  # the MMS service module serve registers
# A batch transform's request: SageMaker's own default invocation timeout (ModelClientConfig's
# InvocationsTimeoutInSeconds), and its default MaxPayloadInMB.
BATCH_TIMEOUT_S = 600.0
BATCH_PAYLOAD_MB = 6
# An asynchronous endpoint's request (IMGCLF_ASYNC, which the launcher writes into the model):
# what SageMaker's async inference allows, 1 GB from S3 and an hour (InvokeEndpointAsync's
# InvocationTimeoutSeconds ceiling; its own default of 15 min expires a request first).
ASYNC_TIMEOUT_S = 3600.0
ASYNC_PAYLOAD_MB = 1024


class SettingsError(ValueError):
    """A setting that cannot be served: the message names the variable and what is accepted."""


def default_workers() -> int:
    """One per GPU; on CPU one per four cores (each worker uses several threads)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return max(1, cpu_count() // 4)


@dataclass(frozen=True)
class Settings:
    """What `serve` runs with. `workers` None: `default_workers()`."""

    model_dir: Path = Path(DEFAULT_BASE_DIR) / "model"
    next_model_dir: Path | None = None  # a model to swap in on SIGHUP (None: no swaps)
    bind_host: str = "0.0.0.0"  # noqa: S104 - the container's port; the launcher sets 127.0.0.1
    port: int = 8080
    workers: int | None = None
    startup_timeout_s: int = 300
    handler: str = HANDLER  # another MMS service module (A/B benchmarks)
    cpu_runtime: str = "auto"  # see imgclf.serving.runtime
    drain_s: float = 30.0  # SIGTERM waits this long for requests in flight
    recover_after_s: float = 20.0  # no worker ready this long: restart MMS
    max_restarts: int = 3  # restarts in a row that do not bring a worker back: exit 1
    response_format: str = DEFAULT_FORMAT  # the default answer format
    # the default min_confidence (a probability, "auto", or None: off); a request's own wins
    min_confidence: float | str | None = None
    batch_size: int = 8  # requests per handler call (one forward pass)
    max_batch_delay_ms: int = 1  # wait for more after the first
    batch: bool = False  # a batch transform's container (SAGEMAKER_BATCH): see read_settings
    asynchronous: bool = False  # an async endpoint's container (IMGCLF_ASYNC): read_settings
    limits: Limits = field(default_factory=Limits)  # the front's timeouts and caps

    @property
    def timeout_s(self) -> float:
        """Per request, from its arrival to its answer (SAGEMAKER_MODEL_SERVER_TIMEOUT)."""
        return self.limits.request_timeout_s

    @property
    def max_payload_mb(self) -> int:
        """The body limit in MB (6 real-time; a batch transform's SAGEMAKER_MAX_PAYLOAD_IN_MB)."""
        return self.limits.max_body_bytes // MB

    @property
    def worker_count(self) -> int:
        return self.workers or default_workers()

    def execution_parameters(self) -> dict:
        """GET /execution-parameters (SageMaker's batch transform asks before it sends): as
        many requests at once as the workers take in their batches, one image a record."""
        # SageMaker refuses MaxConcurrentTransforms x MaxPayloadInMB over 100 (MB in flight).
        in_flight = max(1, MAX_PAYLOAD_MB // self.max_payload_mb)
        return {
            "MaxConcurrentTransforms": min(self.worker_count * self.batch_size, in_flight),
            "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": self.max_payload_mb,
        }


# (field, variable, type) for every number read; Limits' fields go to `limits`.
_NUMBERS = (
    ("port", sagemaker.BIND_TO_PORT_ENV, int),
    ("workers", sagemaker.MODEL_SERVER_WORKERS_ENV, int),
    ("startup_timeout_s", sagemaker.STARTUP_TIMEOUT_ENV, int),
    ("drain_s", SERVE_DRAIN_ENV, float),
    ("recover_after_s", SERVE_RECOVER_ENV, float),
    ("batch_size", SERVE_BATCH_SIZE_ENV, int),
    ("max_batch_delay_ms", SERVE_BATCH_DELAY_ENV, int),
    ("request_timeout_s", sagemaker.MODEL_SERVER_TIMEOUT_ENV, float),
    ("header_timeout_s", SERVE_HEADER_TIMEOUT_ENV, float),
    ("body_timeout_s", SERVE_BODY_TIMEOUT_ENV, float),
    ("idle_timeout_s", SERVE_IDLE_TIMEOUT_ENV, float),
    ("max_connections", SERVE_MAX_CONNECTIONS_ENV, int),
)
_LIMIT_FIELDS = {f.name for f in dataclasses.fields(Limits)}


def _number(name: str, raw: str, kind):
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value


def refuse_user_code(environ) -> None:
    """SAGEMAKER_PROGRAM / SAGEMAKER_SUBMIT_DIRECTORY (what the SageMaker SDK sets for a model
    deployed with `entry_point=`) name code this image would never run: serving anyway would
    answer with imgclf's handler while the user believes their inference.py does, so the start
    fails and says how to deploy an imgclf artifact instead."""
    named = [n for n in (sagemaker.USER_PROGRAM_ENV, SERVE_SUBMIT_DIRECTORY_ENV) if environ.get(n)]
    if named:
        shown = ", ".join(f"{n}={environ[n]!r}" for n in named)
        raise SettingsError(
            f"{shown} is set (the SageMaker SDK sets it for a model given entry_point=...): this "
            "image serves imgclf model artifacts with its own handler and runs no user code; "
            "deploy without entry_point/source_dir (SDK v2: Model(image_uri=..., "
            "model_data=...); v3: ModelBuilder(image_uri=..., s3_model_data_url=...)) or with "
            "`launch.py deploy --target sagemaker`"
        )


def read_settings(environ) -> Settings:
    """The settings from `environ`; a SettingsError names the first variable that is wrong."""
    refuse_user_code(environ)
    base = Path(environ.get(sagemaker.BASE_PATH_ENV) or DEFAULT_BASE_DIR)
    values: dict = {"model_dir": Path(environ.get(SERVE_MODEL_DIR_ENV) or base / "model")}
    if environ.get(SERVE_NEXT_MODEL_DIR_ENV):
        values["next_model_dir"] = Path(environ[SERVE_NEXT_MODEL_DIR_ENV])
    limits: dict = {}
    for name, variable, kind in _NUMBERS:
        raw = environ.get(variable)
        if raw:
            (limits if name in _LIMIT_FIELDS else values)[name] = _number(variable, raw, kind)
    fmt = environ.get(RESPONSE_FORMAT_ENV) or DEFAULT_FORMAT
    if fmt not in FORMATS:
        raise SettingsError(f"{RESPONSE_FORMAT_ENV}={fmt!r}: use one of {', '.join(FORMATS)}")
    values["response_format"] = fmt
    if environ.get(MIN_CONFIDENCE_ENV):
        try:
            values["min_confidence"] = min_confidence(environ[MIN_CONFIDENCE_ENV])
        except RequestError:
            raise SettingsError(
                f"{MIN_CONFIDENCE_ENV}={environ[MIN_CONFIDENCE_ENV]!r}: use a probability from "
                "0 to 1, auto (each class's threshold from the validation split) or off"
            ) from None
    for name, variable in (
        ("bind_host", SERVE_BIND_HOST_ENV),
        ("handler", SERVE_HANDLER_ENV),
        ("cpu_runtime", CPU_RUNTIME_ENV),
    ):
        if environ.get(variable):
            values[name] = environ[variable]
    batch = _flag(environ, SERVE_BATCH_ENV)
    # A batch transform's container is one whatever its model says (a model made for an async
    # endpoint, reused in a transform job): the platform sets SAGEMAKER_BATCH.
    asynchronous = _flag(environ, SERVE_ASYNC_ENV) and not batch
    if batch:
        # A batch transform: bodies up to its MaxPayloadInMB, minutes per request; every other
        # guard (pixel budget, decode bounds, drain) as on a real-time endpoint.
        mb = _payload_mb(environ, BATCH_PAYLOAD_MB, MAX_PAYLOAD_MB, "SageMaker's ceiling")
        values["batch"] = True
        limits.setdefault("request_timeout_s", BATCH_TIMEOUT_S)
        limits.setdefault("body_timeout_s", limits["request_timeout_s"])
        limits.update(
            max_body_bytes=mb * MB,
            linger_bytes=max(Limits.linger_bytes, 2 * mb * MB),
            body_budget_bytes=max(Limits.body_budget_bytes, 4 * mb * MB),
        )
    elif asynchronous:
        # An async endpoint: SageMaker reads the request from S3 and posts it here, up to 1 GB,
        # and waits up to an hour. One body of the largest size is held at a time (the others
        # wait their turn in the front); the pixel budget and decode bounds are unchanged, so a
        # large photo costs its decode at the draft scale, as any other.
        mb = _payload_mb(environ, ASYNC_PAYLOAD_MB, ASYNC_PAYLOAD_MB, "async inference's limit")
        values["asynchronous"] = True
        limits.setdefault("request_timeout_s", ASYNC_TIMEOUT_S)
        limits.setdefault("body_timeout_s", limits["request_timeout_s"])
        limits.update(
            max_body_bytes=mb * MB,
            body_budget_bytes=max(Limits.body_budget_bytes, mb * MB),
        )
    return Settings(**values, limits=Limits(**limits))


def _flag(environ, variable: str) -> bool:
    value = parse_bool(environ.get(variable) or "false")
    if value is None:
        raise SettingsError(f"{variable}={environ[variable]!r}: use true or false")
    return value


def _payload_mb(environ, default: int, ceiling: int, what: str) -> int:
    """SAGEMAKER_MAX_PAYLOAD_IN_MB, within `ceiling`."""
    payload = environ.get(sagemaker.MAX_REQUEST_SIZE) or str(default)
    mb = _number(sagemaker.MAX_REQUEST_SIZE, payload, int)
    if mb > ceiling:
        raise SettingsError(
            f"{sagemaker.MAX_REQUEST_SIZE}={payload!r} is over {what} of {ceiling} MB"
        )
    return mb
