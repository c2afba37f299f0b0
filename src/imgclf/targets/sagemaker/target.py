"""SageMakerTarget: the Target protocol over this package's verbs (boto3 clients made once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgclf.contract import BEST_FILE, MODEL_CHANNEL, TUNING_NAME_MAX_LENGTH, check_name
from imgclf.errors import UserError
from imgclf.targets import sagemaker as sm
from imgclf.targets.base import (
    BestTrial,
    DeployRequest,
    EndpointInfo,
    JobResult,
    TrainRequest,
    TransformRequest,
    TransformResult,
    TuneRequest,
    TuningResult,
)
from imgclf.util import new_job_name, plain_dir, write_json

CONSOLE = "https://console.aws.amazon.com/sagemaker/home#/jobs/"
TRIAL_HEADER = ("training job", "status")  # then the metric, then the hyperparameters


def _starts_from(channels: list[dict]) -> list[str]:
    """`  starts from s3://…` where the request has a `model` channel (`--init-from`)."""
    return [
        f"  starts from {ch['DataSource']['S3DataSource']['S3Uri']} (channel {ch['ChannelName']})"
        for ch in channels
        if ch["ChannelName"] == MODEL_CHANNEL
    ]


class SageMakerTarget:
    name = "sagemaker"

    def __init__(self, options: sm.AwsOptions) -> None:
        self.options = options
        self.c = sm.clients(options)

    def train(self, request: TrainRequest) -> JobResult:
        if request.docker:
            raise UserError("--docker runs the image locally; drop --target sagemaker or --docker")
        name = check_name("training job", request.job_name or new_job_name())
        data = request.data
        if request.prepare and not data.startswith("s3://"):  # JPEG: small to upload
            from imgclf.prepare import prepared_copy

            fmt = request.prepare_format or "jpeg"
            data = str(prepared_copy(self.options.home, Path(data), request.prepare, fmt))
        sent = sm.start_training(
            self.c,
            self.options,
            data=data,
            hyperparameters=request.hyperparameters,
            job_name=name,
            init_from=request.init_from,
        )
        resources = sent["ResourceConfig"]
        details = (
            f"training job {name} created: {resources['InstanceCount']} x "
            f"{resources['InstanceType']}, image {sent['AlgorithmSpecification']['TrainingImage']}",
            *_starts_from(sent["InputDataConfig"]),
            f"  console: {CONSOLE}{name}",
        )
        if not self.options.wait:
            follow = f"  follow: aws sagemaker describe-training-job --training-job-name {name}"
            return JobResult(name, ok=True, waited=False, details=(*details, follow))
        for line in details:
            print(line, flush=True)
        desc = sm.wait_for_training(self.c, name, poll_s=self.options.poll_s)
        ok = desc["TrainingJobStatus"] == "Completed"
        return JobResult(
            name,
            ok=ok,
            code=0 if ok else 1,
            failure=None if ok else desc.get("FailureReason") or desc["TrainingJobStatus"],
            model=desc.get("ModelArtifacts", {}).get("S3ModelArtifacts"),
            details=tuple(sm.training_summary(desc)),
        )

    def job_dir(self, job: str) -> Path:
        check_name("training job", job)  # before it becomes a folder under the home
        return sm.download_job_output(
            self.c, job, plain_dir(self.options.home / "sagemaker" / job, "job folder")
        )

    def tune(self, request: TuneRequest) -> TuningResult:
        if request.refine:
            raise UserError(
                "--refine runs on the local target only; on SageMaker, tune with "
                "--features-cache, then train the best trials with --hp-from"
            )
        space = request.space
        name = check_name(
            "tuning job",
            request.job_name or new_job_name("tune")[:TUNING_NAME_MAX_LENGTH],
            max_length=TUNING_NAME_MAX_LENGTH,
        )
        sent = sm.start_tuning(
            self.c,
            self.options,
            space,
            data=request.data,
            job_name=name,
            init_from=request.init_from,
        )
        print(
            f"tuning job {name} created: {space.max_trials} trials, {space.parallel_trials} at "
            f"once, {space.strategy}, {space.direction} {space.metric}",
            *_starts_from(sent["TrainingJobDefinition"]["InputDataConfig"]),
            sep="\n",
            flush=True,
        )
        if not self.options.wait:
            return TuningResult(name, ok=True, waited=False)
        desc = sm.wait_for_tuning(self.c, name, poll_s=self.options.poll_s)
        table = {
            "header": (*TRIAL_HEADER, space.metric, "hyperparameters"),
            "rows": tuple(tuple(r) for r in sm.tuning_trials(self.c, name)),
        }
        status = desc["HyperParameterTuningJobStatus"]
        if status != "Completed":
            why = f"tuning job {name} {status}: {desc.get('FailureReason') or ''}"
            return TuningResult(name, ok=False, failure=why, **table)
        best = sm.best_from_tuning(desc)
        out = request.out or self.options.home / "tuning" / name
        write_json(out / BEST_FILE, best)
        return TuningResult(name, ok=True, best=BestTrial.from_doc(best, out / BEST_FILE), **table)

    def deploy(self, request: DeployRequest) -> EndpointInfo:
        if request.docker:
            raise UserError("--docker runs the image locally; drop --target sagemaker or --docker")
        check_name("endpoint", request.name)
        scaling = None
        if request.min_instances is not None or request.max_instances is not None:
            if request.min_instances is None or request.max_instances is None:
                raise UserError("autoscaling needs both --min-instances and --max-instances")
            scaling = sm.Scaling(
                request.min_instances,
                request.max_instances,
                request.target_invocations or sm.DEFAULT_TARGET_INVOCATIONS,
            )
        elif request.target_invocations is not None:
            raise UserError("--target-invocations needs --min-instances and --max-instances")
        made = sm.deploy(
            self.c,
            self.options,
            model=request.model,
            name=request.name,
            serverless_memory_mb=request.serverless_mb,
            response_format=request.response_format,
            rollout=request.rollout,
            rollback_alarms=request.rollback_alarms,
            scaling=scaling,
            async_output=request.async_output,
            startup_timeout_s=request.startup_timeout_s,
            download_timeout_s=request.download_timeout_s,
        )
        previous = made["previous"]
        verb = "updating" if previous else "creating"
        shift = f", {request.rollout}" if previous else ""
        print(
            f"endpoint {request.name} {verb}{shift}: model {made['model']} from "
            f"{made['model_data']}" + (f" on {made['instances']}" if made["instances"] else ""),
            flush=True,
        )
        state = "Updating" if previous else "Creating"
        model = made["model_data"]
        if self.options.wait:
            if previous:
                for line in sm.follow_update(self.c, made, poll_s=self.options.poll_s):
                    print(line, flush=True)
                state = "InService"
            else:
                state = sm.wait_for_endpoint(self.c, request.name, poll_s=self.options.poll_s)[
                    "EndpointStatus"
                ]
            if scaling is not None:
                for line in sm.apply_scaling(
                    self.c, request.name, scaling, asynchronous=made["asynchronous"]
                ):
                    print(line, flush=True)
        elif previous:
            old = " ".join([previous["config"], *previous["models"]])
            print(
                f"  once it is InService, {old} can go: aws sagemaker delete-endpoint-config / "
                "delete-model (a deploy that waits removes them itself)"
            )
        return EndpointInfo(
            request.name,
            state=state,
            model=model,
            runs_as=made["model"],
            log=f"CloudWatch /aws/sagemaker/Endpoints/{request.name}",
            bills=True,
        )

    def transform(self, request: TransformRequest) -> TransformResult:
        from imgclf.targets.sagemaker.transform import run_transform

        if request.docker:
            raise UserError("--docker runs the image locally; drop --target sagemaker or --docker")
        name = check_name("transform job", request.job_name or new_job_name("transform"))
        return run_transform(self.c, self.options, request, name)

    def endpoints(self) -> list[EndpointInfo]:
        return sm.list_endpoints(self.c)

    def delete(self, name: str) -> list[str]:
        check_name("endpoint", name)
        return [f"deleted {item}" for item in sm.delete_endpoint(self.c, name)]

    def pick_endpoint(self, name: str | None) -> EndpointInfo:
        if not name:
            raise UserError(
                "name the endpoint with --endpoint (launch.py endpoints --target "
                "sagemaker lists them)"
            )
        return EndpointInfo(name, state="", model="", runs_as="", bills=True)

    def invoke(
        self, endpoint: EndpointInfo, body: bytes, *, content_type: str, custom_attributes: str
    ) -> tuple[int, Any]:
        return sm.invoke(
            self.c,
            endpoint.name,
            body,
            content_type=content_type,
            custom_attributes=custom_attributes,
        )

    def invoke_async(
        self, endpoint: EndpointInfo, body: bytes, *, content_type: str, custom_attributes: str
    ) -> tuple[int, Any]:
        return sm.invoke_async(
            self.c,
            self.options,
            endpoint.name,
            body,
            content_type=content_type,
            custom_attributes=custom_attributes,
        )
