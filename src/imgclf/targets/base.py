"""The Target protocol: the launcher's verbs, the same on every target, and the small results they
return. `cli` parses arguments into the requests below, calls `target.verb(request)` and prints
the result; it never asks which target it holds. Torch-free, and nothing here imports a target.

A verb may print progress while it runs (an upload, a waiter's status lines); what it found out
comes back as one of these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class TrainRequest:
    data: str  # a dataset folder, or s3://… on SageMaker
    hyperparameters: dict[str, str]
    job_name: str | None = None  # None: a new UTC-stamped name
    nproc: int = 1  # processes under torchrun (local)
    docker: str | None = None  # run this training image under Docker (local)
    prepare: int | None = None  # train on a prepared copy of `data` with this short side
    prepare_format: str | None = None  # raw or jpeg (None: the target's choice)
    # The model the job starts from (its `model` channel): a job name, a model dir, a
    # model.tar.gz or s3://… (SageMaker). None: ImageNet's weights (or none), as the config says.
    init_from: str | None = None


@dataclass(frozen=True)
class JobResult:
    """A training job: finished (ok or not), or created and not followed (`waited` False)."""

    name: str
    ok: bool
    waited: bool = True
    code: int = 0  # the exit status the launcher returns (nonzero when not ok)
    failure: str | None = None
    model: str | None = None  # the model dir, or the model.tar.gz's S3 URI
    outputs: str | None = None
    report: str | None = None
    log: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json's summary, if any
    details: tuple[str, ...] = ()  # the target's own lines (instances, console, billable time)


@dataclass(frozen=True)
class TuneRequest:
    space: Any  # imgclf.tuning.space.TuningSpace
    data: str
    out: Path | None = None  # the tuning dir (local; SageMaker: where best.json is written)
    storage: str | None = None  # Optuna storage URL (local)
    refine: int = 0  # full fine-tunes of the K best trials afterwards (local)
    job_name: str | None = None
    init_from: str | None = None  # what TrainRequest.init_from takes: every trial starts there


@dataclass(frozen=True)
class BestTrial:
    trial: str
    metric: str
    value: float | None
    file: Path  # best.json: `launch.py train --hp-from` reads it

    @classmethod
    def from_doc(cls, doc: dict, file: Path) -> BestTrial:
        """From best.json's document (both targets write the same shape)."""
        objective = doc["objective"]
        return cls(str(doc["trial"]), objective["metric"], objective["value"], file)


@dataclass(frozen=True)
class TuningResult:
    name: str  # the tuning dir (local) or the tuning job's name
    ok: bool
    waited: bool = True
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    best: BestTrial | None = None
    failure: str | None = None
    refined: tuple[dict, ...] = ()  # {trial, cached_value, value} per full fine-tune


@dataclass(frozen=True)
class DeployRequest:
    model: str  # a model dir, a model.tar.gz, s3://… or a training job name (SageMaker)
    name: str
    port: int = 8080  # local
    workers: int | None = None  # local
    response_format: str | None = None  # local
    docker: str | None = None  # run this serving image under Docker (local)
    serverless_mb: int | None = None  # SageMaker
    # SageMaker, onto an existing endpoint: UpdateEndpoint's traffic shifting and rollback.
    rollout: str = "all-at-once"
    rollback_alarms: tuple[str, ...] = ()
    # SageMaker autoscaling of the variant (None: none registered by this deploy).
    min_instances: int | None = None
    max_instances: int | None = None
    target_invocations: int | None = None  # a minute's invocations per instance
    async_output: str | None = None  # SageMaker: s3://… for an asynchronous endpoint's answers
    startup_timeout_s: int | None = None  # SageMaker: the variant's health-check timeout
    download_timeout_s: int | None = None  # SageMaker: the variant's model-download timeout

    def sagemaker_only(self) -> list[str]:
        """The flags set here that only a SageMaker endpoint has."""
        flags = {
            "--rollout": self.rollout != "all-at-once",
            "--rollback-alarm": bool(self.rollback_alarms),
            "--min-instances": self.min_instances is not None,
            "--max-instances": self.max_instances is not None,
            "--target-invocations": self.target_invocations is not None,
            "--async-output": self.async_output is not None,
            "--startup-timeout": self.startup_timeout_s is not None,
            "--download-timeout": self.download_timeout_s is not None,
            "--serverless-mb": self.serverless_mb is not None,
        }
        return [flag for flag, given in flags.items() if given]


@dataclass(frozen=True)
class TransformRequest:
    """`launch.py transform`: every file under `input` classified, `<file>.out` under `output`."""

    model: str  # what DeployRequest.model takes
    input: str  # a folder (any depth), or s3://bucket/prefix/
    output: str  # a folder, or s3://bucket/prefix/ (SageMaker)
    max_payload_mb: int = 6  # SageMaker's MaxPayloadInMB (at most 100)
    concurrency: int | None = None  # requests in flight (None: what the server says it takes)
    response_format: str | None = None  # the .out files' shape: predictions or vectors
    accept: str = "application/json"  # or application/jsonlines
    docker: str | None = None  # run this serving image under Docker (local)
    job_name: str | None = None  # SageMaker


@dataclass(frozen=True)
class TransformResult:
    """What a transform did: counts from predictions.csv, and where things are."""

    name: str
    images: int
    classified: int
    failed: int
    predictions: str  # predictions.csv
    outputs: str  # where the .out files are (a folder, and on SageMaker also the S3 prefix)
    waited: bool = True  # False: a SageMaker job created and not followed (--no-wait)
    details: tuple[str, ...] = ()

    @classmethod
    def of(cls, name: str, summary: Any, outputs: str, details: list[str]) -> TransformResult:
        """From predictions.csv's counts (imgclf.transform.Summary)."""
        return cls(
            name,
            summary.images,
            summary.classified,
            summary.failed,
            predictions=str(summary.predictions),
            outputs=outputs,
            details=tuple(details),
        )

    def line(self) -> str:
        return (
            f"{self.images} images: {self.classified} classified, {self.failed} failed "
            f"(see {self.predictions})"
        )


@dataclass(frozen=True)
class EndpointInfo:
    """One endpoint as `deploy`, `endpoints` and `invoke` see it."""

    name: str
    state: str  # healthy, unhealthy (why), dead, orphaned; InService, Creating…
    model: str
    runs_as: str  # "pid=123", "container=imgclf-endpoint-x", "1 x ml.m5.xlarge"
    url: str | None = None  # where /invocations is (local)
    log: str | None = None  # where its log is read
    port: int | None = None
    age: str = ""
    bills: bool = False  # billed per instance-hour until deleted


class Target(Protocol):
    """What `launch.py VERB --target NAME` runs."""

    name: str

    def train(self, request: TrainRequest) -> JobResult: ...

    def tune(self, request: TuneRequest) -> TuningResult: ...

    def deploy(self, request: DeployRequest) -> EndpointInfo: ...

    def transform(self, request: TransformRequest) -> TransformResult: ...

    def endpoints(self) -> list[EndpointInfo]: ...

    def delete(self, name: str) -> list[str]:
        """Stop and remove an endpoint: one line per thing removed."""
        ...

    def pick_endpoint(self, name: str | None) -> EndpointInfo:
        """The endpoint `invoke` talks to (None: the only one there is, where that is known)."""
        ...

    def invoke(
        self, endpoint: EndpointInfo, body: bytes, *, content_type: str, custom_attributes: str
    ) -> tuple[int, Any]:
        """POST /invocations: (status, the answer's JSON), a model's 4xx included."""
        ...

    def invoke_async(
        self, endpoint: EndpointInfo, body: bytes, *, content_type: str, custom_attributes: str
    ) -> tuple[int, Any]:
        """An asynchronous endpoint's request: (200, the answer) once it is written, (0, the
        error) when the failure is, or (202, {"output", "failure"}: where each will be) when
        the target was told not to wait."""
        ...

    def job_dir(self, job: str) -> Path:
        """A job's directory (model/, output/data/) for `debug` and `report`."""
        ...
