"""The `sagemaker` target: the launcher's verbs on Amazon SageMaker through boto3.

Request bodies are built by pure functions (tested against botocore's service model); the
functions that talk to AWS take boto3 clients, so tests point them at moto's server through
boto3's standard `AWS_ENDPOINT_URL`. AWS errors become one-line UserErrors saying what to do.
"""

from __future__ import annotations

import base64
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from imgclf.contract import RESPONSE_FORMAT_ENV
from imgclf.errors import UserError
from imgclf.targets.base import EndpointInfo
from imgclf.targets.sagemaker.aws import (
    AwsOptions,
    Clients,
    aws_errors,
    clients,
    default_bucket,
    resolve_image,
    resolve_role,
)
from imgclf.targets.sagemaker.follow import (
    training_summary,
    wait_for_endpoint,
    wait_for_training,
    wait_for_tuning,
)
from imgclf.targets.sagemaker.requests import (
    DEFAULT_SERVE_INSTANCE,
    DEFAULT_TRAIN_INSTANCE,
    TAG_KEY,
    encode_hyperparameters,
    endpoint_config_request,
    model_request,
    training_definition,
    training_job_request,
    tuning_job_request,
)
from imgclf.targets.sagemaker.s3 import UploadResult, download_job_output, pack_model, upload_tree
from imgclf.util import new_job_name

__all__ = [  # the verbs, and what the CLI and tests reach through the package
    "AwsOptions",
    "clients",
    "deploy",
    "delete_endpoint",
    "download_job_output",
    "encode_hyperparameters",
    "endpoint_config_request",
    "invoke",
    "list_endpoints",
    "model_request",
    "new_job_name",
    "start_training",
    "start_tuning",
    "training_definition",
    "training_job_request",
    "training_summary",
    "tuning_trials",
    "best_from_tuning",
    "wait_for_endpoint",
    "wait_for_training",
    "wait_for_tuning",
]

# ---------------------------------------------------------------- training


def data_prefix(data_dir: Path) -> str:
    return f"imgclf/data/{data_dir.resolve().name}"


def upload_dataset(c: Clients, data_dir: Path, bucket: str) -> UploadResult:
    if not data_dir.is_dir():
        raise UserError(f"--data {data_dir} is not a directory")
    result = upload_tree(c.s3, data_dir, bucket, data_prefix(data_dir))
    print(
        f"data at {result.uri}: {result.uploaded} files uploaded "
        f"({result.bytes_sent / 1e6:.1f} MB), {result.skipped} unchanged"
    )
    return result


def _job_inputs(c: Clients, options: AwsOptions, data: str | Path) -> tuple[str, str, str, str]:
    """Image, role, bucket and the data's S3 URI (uploaded unless already s3://). The image and
    role are checked before anything is uploaded."""
    image, role = resolve_image(options, "train"), resolve_role(options)
    bucket = default_bucket(c, options)
    if str(data).startswith("s3://"):
        return image, role, bucket, str(data)
    return image, role, bucket, upload_dataset(c, Path(data), bucket).uri


def start_training(
    c: Clients,
    options: AwsOptions,
    *,
    data: str | Path,
    hyperparameters: dict[str, str],
    job_name: str,
) -> dict:
    """Upload the data (unless it is already an s3:// URI) and create the training job."""
    region = c.require_region()
    image, role, bucket, train_s3 = _job_inputs(c, options, data)
    request = training_job_request(
        job_name=job_name,
        image=image,
        role_arn=role,
        hyperparameters=hyperparameters,
        train_s3=train_s3,
        output_s3=f"s3://{bucket}/imgclf/jobs",
        checkpoint_s3=f"s3://{bucket}/imgclf/checkpoints/{job_name}",
        region=region,
        instance_type=options.instance_type or DEFAULT_TRAIN_INSTANCE,
        instance_count=options.instance_count,
        max_runtime_s=options.max_runtime_s,
        volume_gb=options.volume_gb,
        spot=options.spot,
        sagemaker_debugger=options.sagemaker_debugger,
    )
    with aws_errors():
        c.sagemaker.create_training_job(**request)
    return request


# ---------------------------------------------------------------- tuning


def start_tuning(c: Clients, options: AwsOptions, space, *, data: str | Path, job_name: str):
    image, role, bucket, train_s3 = _job_inputs(c, options, data)
    definition = training_definition(
        image=image,
        role_arn=role,
        hyperparameters=space.static,
        train_s3=train_s3,
        output_s3=f"s3://{bucket}/imgclf/tuning/{job_name}",
        instance_type=options.instance_type or DEFAULT_TRAIN_INSTANCE,
        instance_count=options.instance_count,
        max_runtime_s=options.max_runtime_s,
        volume_gb=options.volume_gb,
    )
    request = tuning_job_request(space, job_name=job_name, training_definition=definition)
    with aws_errors():
        c.sagemaker.create_hyper_parameter_tuning_job(**request)
    return request


def _decode(value: str) -> str:
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else value


def tuning_trials(c: Clients, job_name: str) -> list[list[str]]:
    """The trial table (best first), or [] where the API is not available."""
    from botocore.exceptions import ClientError

    rows = []
    try:
        pages = c.sagemaker.get_paginator(
            "list_training_jobs_for_hyper_parameter_tuning_job"
        ).paginate(HyperParameterTuningJobName=job_name, SortBy="FinalObjectiveMetricValue")
        for page in pages:
            for job in page.get("TrainingJobSummaries", []):
                metric = job.get("FinalHyperParameterTuningJobObjectiveMetric", {})
                value = metric.get("Value")
                params = " ".join(
                    f"{k}={_decode(v)}" for k, v in job.get("TunedHyperParameters", {}).items()
                )
                rows.append(
                    [
                        job["TrainingJobName"],
                        job["TrainingJobStatus"],
                        "" if value is None else f"{value:.5f}",
                        params,
                    ]
                )
    except (ClientError, KeyError):
        return []
    return rows


def best_from_tuning(desc: dict) -> dict:
    """best.json in the local tuner's shape, from DescribeHyperParameterTuningJob."""
    best = desc.get("BestTrainingJob")
    if not best:
        raise UserError(f"tuning job {desc['HyperParameterTuningJobName']} has no best job yet")
    definition = desc.get("TrainingJobDefinition") or {}
    static = {
        k: _decode(v)
        for k, v in (definition.get("StaticHyperParameters") or {}).items()
        if not k.startswith(("sagemaker_", "_tuning"))
    }
    tuned = {k: _decode(v) for k, v in best.get("TunedHyperParameters", {}).items()}
    objective = desc["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]
    final = best.get("FinalHyperParameterTuningJobObjectiveMetric", {})
    return {
        "hyperparameters": {**static, **tuned},
        "objective": {
            "metric": objective["MetricName"],
            "type": objective["Type"].lower(),
            "value": final.get("Value"),
        },
        "trial": best["TrainingJobName"],
        "job_dir": None,
    }


# ---------------------------------------------------------------- endpoints


def resolve_model_s3(c: Clients, options: AwsOptions, model: str, name: str) -> str:
    """--model: s3://…/model.tar.gz, a SageMaker training job name, or a local model dir / tar."""
    if model.startswith("s3://"):
        return model
    path = Path(model)
    if path.exists():
        body = path.read_bytes() if path.is_file() else pack_model(path)
        bucket = default_bucket(c, options)
        key = f"imgclf/models/{name}/model.tar.gz"
        with aws_errors():
            c.s3.put_object(Bucket=bucket, Key=key, Body=body)
        return f"s3://{bucket}/{key}"
    with aws_errors():
        desc = c.sagemaker.describe_training_job(TrainingJobName=model)
    if desc["TrainingJobStatus"] != "Completed":
        raise UserError(f"training job {model} is {desc['TrainingJobStatus']}, not Completed")
    return desc["ModelArtifacts"]["S3ModelArtifacts"]


def deploy(
    c: Clients,
    options: AwsOptions,
    *,
    model: str,
    name: str,
    serverless_memory_mb: int | None = None,
    response_format: str | None = None,
) -> dict:
    image, role = resolve_image(options, "serve"), resolve_role(options)
    environment = {RESPONSE_FORMAT_ENV: response_format} if response_format else None
    model_s3 = resolve_model_s3(c, options, model, name)
    suffix = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    model_name = f"{name}-{suffix}"
    created: list[tuple[str, dict]] = []  # what to delete, newest first, if a later step fails
    try:
        with aws_errors():
            c.sagemaker.create_model(
                **model_request(
                    name=model_name,
                    image=image,
                    model_s3=model_s3,
                    role_arn=role,
                    environment=environment,
                )
            )
            created.append(("delete_model", {"ModelName": model_name}))
            c.sagemaker.create_endpoint_config(
                **endpoint_config_request(
                    name=model_name,
                    model_name=model_name,
                    instance_type=options.instance_type or DEFAULT_SERVE_INSTANCE,
                    instance_count=options.instance_count,
                    serverless_memory_mb=serverless_memory_mb,
                )
            )
            created.append(("delete_endpoint_config", {"EndpointConfigName": model_name}))
            c.sagemaker.create_endpoint(
                EndpointName=name,
                EndpointConfigName=model_name,
                Tags=[{"Key": TAG_KEY, "Value": "serve"}],
            )
    except BaseException:
        _undo(c, created)
        raise
    return {"endpoint": name, "model": model_name, "model_data": model_s3}


def _undo(c: Clients, created: list[tuple[str, dict]]) -> None:
    """Delete what a failed deploy created (newest first), so nothing is left to bill or to
    clash with the next try; a failure here is reported, not raised over the first one."""
    for method, kwargs in reversed(created):
        try:
            getattr(c.sagemaker, method)(**kwargs)
            print(f"cleaned up: {method.removeprefix('delete_')} {next(iter(kwargs.values()))}")
        except Exception as exc:  # noqa: BLE001 - keep the original error the one raised
            print(f"could not clean up ({method} {kwargs}): {exc}", file=sys.stderr)


def list_endpoints(c: Clients) -> list[EndpointInfo]:
    found = []
    now = datetime.now(UTC)
    with aws_errors():
        for page in c.sagemaker.get_paginator("list_endpoints").paginate():
            for e in page.get("Endpoints", []):
                age = (now - e["CreationTime"]).total_seconds()
                found.append(
                    EndpointInfo(
                        e["EndpointName"],
                        state=e["EndpointStatus"],
                        model="",
                        runs_as=_endpoint_instances(c, e["EndpointName"]),
                        age=f"{age / 3600:.1f} h" if age >= 3600 else f"{age / 60:.0f} min",
                        bills=True,
                    )
                )
    return found


def _endpoint_instances(c: Clients, name: str) -> str:
    from botocore.exceptions import ClientError

    try:
        desc = c.sagemaker.describe_endpoint(EndpointName=name)
        config = c.sagemaker.describe_endpoint_config(EndpointConfigName=desc["EndpointConfigName"])
    except ClientError:
        return "?"
    parts = []
    for v in config.get("ProductionVariants", []):
        if v.get("ServerlessConfig"):
            parts.append(f"serverless {v['ServerlessConfig']['MemorySizeInMB']} MB")
        else:
            parts.append(f"{v.get('InitialInstanceCount', '?')} x {v.get('InstanceType', '?')}")
    return ", ".join(parts)


def delete_endpoint(c: Clients, name: str) -> list[str]:
    """Endpoint, its config and its models: nothing left billing or cluttering."""
    from botocore.exceptions import ClientError

    removed = []
    with aws_errors():
        desc = c.sagemaker.describe_endpoint(EndpointName=name)
        config_name = desc["EndpointConfigName"]
        try:
            config = c.sagemaker.describe_endpoint_config(EndpointConfigName=config_name)
            models = [v["ModelName"] for v in config.get("ProductionVariants", [])]
        except ClientError:
            config, models = None, []
        c.sagemaker.delete_endpoint(EndpointName=name)
        removed.append(f"endpoint {name}")
        if config is not None:
            c.sagemaker.delete_endpoint_config(EndpointConfigName=config_name)
            removed.append(f"endpoint config {config_name}")
        for model in models:
            try:
                c.sagemaker.delete_model(ModelName=model)
                removed.append(f"model {model}")
            except ClientError:
                pass
    return removed


def invoke(
    c: Clients, name: str, body: bytes, *, content_type: str, custom_attributes: str = ""
) -> tuple[int, dict]:
    """(status, answer) like the local target's invoke; model errors (4xx from the container)
    come back as the container's JSON error."""
    from botocore.exceptions import ClientError

    kwargs = {"CustomAttributes": custom_attributes} if custom_attributes else {}
    try:
        response = c.runtime.invoke_endpoint(
            EndpointName=name,
            ContentType=content_type,
            Accept="application/json",
            Body=body,
            **kwargs,
        )
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") == "ModelError":
            status = int(exc.response.get("OriginalStatusCode", 400))
            try:
                return status, json.loads(exc.response.get("OriginalMessage", "{}"))
            except ValueError:
                return status, {"error": error.get("Message", ""), "hint": ""}
        with aws_errors():
            raise
        raise  # unreachable: aws_errors converts
    raw = response["Body"].read()
    try:
        return 200, json.loads(raw)
    except ValueError:
        preview = base64.b64encode(raw[:60]).decode()
        return 502, {"error": "the endpoint answered something that is not JSON", "hint": preview}
