"""The `sagemaker` target: the launcher's verbs on Amazon SageMaker through boto3.

Request bodies are built by pure functions (tested against botocore's service model); the
functions that talk to AWS take boto3 clients, so tests point them at moto's server through
boto3's standard `AWS_ENDPOINT_URL`. AWS errors become one-line UserErrors saying what to do.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from imgclf.contract import RESPONSE_FORMAT_ENV, SERVE_ASYNC_ENV
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
    ASYNC_TIMEOUT_S,
    DEFAULT_SERVE_INSTANCE,
    DEFAULT_TARGET_INVOCATIONS,
    DEFAULT_TRAIN_INSTANCE,
    SCALABLE_DIMENSION,
    TAG_KEY,
    async_inference_config,
    backlog_alarm_name,
    backlog_alarm_request,
    backlog_policy_request,
    encode_hyperparameters,
    endpoint_config_request,
    gpu_instance,
    instance_workers,
    invocations_policy_request,
    model_request,
    scalable_target_request,
    scale_from_zero_policy_request,
    startup_timeouts,
    training_definition,
    training_job_request,
    tuning_job_request,
    update_endpoint_request,
    variant_resource,
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
    "invoke_async",
    "follow_update",
    "apply_scaling",
    "Scaling",
    "DEFAULT_TARGET_INVOCATIONS",
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
    init_from: str | None = None,
) -> dict:
    """Upload the data (unless it is already an s3:// URI) and create the training job; with
    `init_from` (`init_model_s3`) the job starts from that model (its `model` channel)."""
    region = c.require_region()
    image, role, bucket, train_s3 = _job_inputs(c, options, data)
    model_s3 = init_model_s3(c, options, init_from, job_name) if init_from else None
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
        model_s3=model_s3,
    )
    with aws_errors():
        c.sagemaker.create_training_job(**request)
    return request


def init_model_s3(c: Clients, options: AwsOptions, init_from: str, job_name: str) -> str:
    """`--init-from` as the S3 URI of a model.tar.gz: s3://… as given, a training job's
    model, or a local model dir or model.tar.gz uploaded to imgclf/init-models/JOB/."""
    return resolve_model_s3(c, options, init_from, job_name, folder="imgclf/init-models")


# ---------------------------------------------------------------- tuning


def start_tuning(
    c: Clients,
    options: AwsOptions,
    space,
    *,
    data: str | Path,
    job_name: str,
    init_from: str | None = None,
):
    image, role, bucket, train_s3 = _job_inputs(c, options, data)
    model_s3 = init_model_s3(c, options, init_from, job_name) if init_from else None
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
        model_s3=model_s3,  # every trial starts from the same model
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


def resolve_model_s3(
    c: Clients, options: AwsOptions, model: str, name: str, *, folder: str = "imgclf/models"
) -> str:
    """--model: s3://…/model.tar.gz, a SageMaker training job name, or a local model dir / tar
    (uploaded to FOLDER/NAME/model.tar.gz)."""
    if model.startswith("s3://"):
        return model
    path = Path(model)
    if path.exists():
        body = path.read_bytes() if path.is_file() else pack_model(path)
        bucket = default_bucket(c, options)
        key = f"{folder}/{name}/model.tar.gz"
        with aws_errors():
            c.s3.put_object(Bucket=bucket, Key=key, Body=body)
        return f"s3://{bucket}/{key}"
    with aws_errors():
        desc = c.sagemaker.describe_training_job(TrainingJobName=model)
    if desc["TrainingJobStatus"] != "Completed":
        raise UserError(f"training job {model} is {desc['TrainingJobStatus']}, not Completed")
    return desc["ModelArtifacts"]["S3ModelArtifacts"]


@dataclass(frozen=True)
class Scaling:
    """What `deploy --min-instances A --max-instances B [--target-invocations N]` asks for."""

    min_instances: int
    max_instances: int
    target_invocations: int = DEFAULT_TARGET_INVOCATIONS


def describe_endpoint(c: Clients, name: str) -> dict | None:
    """DescribeEndpoint, or None where there is no endpoint of that name."""
    from botocore.exceptions import ClientError

    try:
        return c.sagemaker.describe_endpoint(EndpointName=name)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") in ("ValidationException", "ResourceNotFound") and (
            "not find" in error.get("Message", "").lower()
        ):
            return None
        with aws_errors():
            raise
        raise  # unreachable: aws_errors converts


def carries_graph(model: str) -> bool:
    """Whether --model is a local model folder whose ONNX graph is recorded for its
    model_config.json and model.pt (imgclf.graph; no torch): its endpoint serves the graph."""
    from imgclf import artifacts, graph

    path = Path(model)
    if model.startswith("s3://") or not path.is_dir():
        return False
    try:
        config, _ = artifacts.read_description(path)
    except UserError:
        return False
    return graph.graph_record_problem(path, config) is None


def model_size(c: Clients, model_s3: str) -> int | None:
    """The model.tar.gz's size in bytes (None where S3 does not say)."""
    from botocore.exceptions import ClientError

    bucket, _, key = model_s3.removeprefix("s3://").partition("/")
    try:
        return int(c.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except (ClientError, KeyError, ValueError):
        return None


def deploy(
    c: Clients,
    options: AwsOptions,
    *,
    model: str,
    name: str,
    serverless_memory_mb: int | None = None,
    response_format: str | None = None,
    rollout: str = "all-at-once",
    rollback_alarms: tuple[str, ...] = (),
    scaling: Scaling | None = None,
    async_output: str | None = None,
    startup_timeout_s: int | None = None,
    download_timeout_s: int | None = None,
) -> dict:
    """A new model and endpoint config, then CreateEndpoint where `name` has no endpoint, or
    UpdateEndpoint (blue/green) where it has one: `follow_update` then waits for the update and
    removes what the endpoint no longer uses. Everything is checked before anything is made."""
    image, role = resolve_image(options, "serve"), resolve_role(options)
    existing = describe_endpoint(c, name)
    if existing is None and (rollout != "all-at-once" or rollback_alarms):
        raise UserError(
            f"--rollout and --rollback-alarm shape the update of a running endpoint; there is no "
            f"endpoint {name} yet: drop them (a new endpoint takes all traffic at once)"
        )
    if existing is not None and existing["EndpointStatus"] != "InService":
        raise UserError(
            f"endpoint {name} is {existing['EndpointStatus']}: a new model can go onto it once "
            f"it is InService (launch.py endpoints --target sagemaker), or delete it"
        )
    if serverless_memory_mb and scaling is not None:
        raise UserError("a serverless endpoint scales itself: drop --min/--max-instances")
    if scaling is not None and scaling.min_instances == 0 and not async_output:
        raise UserError(
            "--min-instances 0: only an asynchronous endpoint (--async-output) can scale to "
            "zero; a real-time one needs at least 1"
        )
    if scaling is not None and not options.wait:
        raise UserError(
            "autoscaling is registered once the endpoint is InService: drop --no-wait, or "
            "--min-instances/--max-instances"
        )
    # A bad --rollout, too many alarms, a bad scaling range: refused before anything is made.
    update_endpoint_request(
        name=name, config_name=name, rollout=rollout, rollback_alarms=rollback_alarms
    )
    if scaling is not None:
        scalable_target_request(
            endpoint=name, min_instances=scaling.min_instances, max_instances=scaling.max_instances
        )
        invocations_policy_request(endpoint=name, target_invocations=scaling.target_invocations)
    instance_type = options.instance_type or DEFAULT_SERVE_INSTANCE
    previous = _previous(c, existing) if existing is not None else None
    scaled_before = current_scaling(c, name) if existing is not None else None
    if (
        scaled_before
        and previous
        and previous["instance_type"] not in (None, instance_type)
        and scaling is None
    ):
        raise UserError(
            f"endpoint {name} autoscales ({scaled_before['MinCapacity']}-"
            f"{scaled_before['MaxCapacity']} instances) and the instance type changes from "
            f"{previous['instance_type']} to {instance_type}, which SageMaker refuses while the "
            "scaling is registered: pass --min-instances and --max-instances (the scaling is "
            "removed, the endpoint updated, then the scaling registered again)"
        )
    environment = {RESPONSE_FORMAT_ENV: response_format} if response_format else {}
    async_config = None
    if async_output:
        environment[SERVE_ASYNC_ENV] = "true"
        # As many requests at once as the instance's workers take in their MMS batches: what
        # the container's own GET /execution-parameters says (serving.settings).
        from imgclf.serving.settings import Settings

        workers = instance_workers(instance_type)
        concurrent = Settings(workers=workers).execution_parameters()["MaxConcurrentTransforms"]
        async_config = async_inference_config(output_s3=async_output, max_concurrent=concurrent)
    instance_count = options.instance_count
    if scaling is not None:
        instance_count = max(instance_count, scaling.min_instances, 1)
    if previous and previous["desired"]:
        instance_count = max(instance_count, previous["desired"])  # the traffic it takes now
    model_s3 = resolve_model_s3(c, options, model, name)
    graph_served = not serverless_memory_mb and not gpu_instance(instance_type)
    health_s, download_s = startup_timeouts(
        model_size(c, model_s3), graph=graph_served and carries_graph(model)
    )
    now = datetime.now(UTC)
    # Unique per deploy (two within a second: an update right after a create), within 63.
    suffix = f"{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}"
    model_name = f"{name[: 62 - len(suffix)]}-{suffix}"
    created: list[tuple[str, dict]] = []  # what to delete, newest first, if a later step fails
    try:
        with aws_errors():
            c.sagemaker.create_model(
                **model_request(
                    name=model_name,
                    image=image,
                    model_s3=model_s3,
                    role_arn=role,
                    environment=environment or None,
                )
            )
            created.append(("delete_model", {"ModelName": model_name}))
            c.sagemaker.create_endpoint_config(
                **endpoint_config_request(
                    name=model_name,
                    model_name=model_name,
                    instance_type=instance_type,
                    instance_count=instance_count,
                    serverless_memory_mb=serverless_memory_mb,
                    startup_timeout_s=startup_timeout_s or health_s,
                    download_timeout_s=download_timeout_s or download_s,
                    async_config=async_config,
                )
            )
            created.append(("delete_endpoint_config", {"EndpointConfigName": model_name}))
            if existing is None:
                c.sagemaker.create_endpoint(
                    EndpointName=name,
                    EndpointConfigName=model_name,
                    Tags=[{"Key": TAG_KEY, "Value": "serve"}],
                )
            else:
                if scaled_before and previous["instance_type"] not in (None, instance_type):
                    for line in remove_scaling(c, name):
                        print(line, flush=True)
                c.sagemaker.update_endpoint(
                    **update_endpoint_request(
                        name=name,
                        config_name=model_name,
                        rollout=rollout,
                        rollback_alarms=rollback_alarms,
                    )
                )
    except BaseException:
        _undo(c, created)
        raise
    return {
        "endpoint": name,
        "model": model_name,
        "model_data": model_s3,
        "config": model_name,
        "previous": previous,
        "scaling": scaling,
        "asynchronous": async_config is not None,
        "instances": f"{instance_count} x {instance_type}" if not serverless_memory_mb else "",
    }


def _previous(c: Clients, endpoint: dict) -> dict:
    """What the endpoint runs before an update: its config, models, instance type and count."""
    from botocore.exceptions import ClientError

    config_name = endpoint["EndpointConfigName"]
    try:
        config = c.sagemaker.describe_endpoint_config(EndpointConfigName=config_name)
        variants = config.get("ProductionVariants", [])
    except ClientError:
        variants = []
    desired = sum(
        v.get("DesiredInstanceCount") or 0 for v in endpoint.get("ProductionVariants", [])
    )
    return {
        "config": config_name,
        "models": [v["ModelName"] for v in variants],
        "instance_type": next((v.get("InstanceType") for v in variants), None),
        "desired": desired,
    }


def follow_update(c: Clients, made: dict, *, poll_s: float) -> list[str]:
    """Wait for UpdateEndpoint to end, then remove the side the endpoint no longer serves: the
    old config and models once the new one took the traffic; the new ones after a rollback,
    which is then an error naming the reason (the old model still serves)."""
    name, previous = made["endpoint"], made["previous"]
    try:
        desc = wait_for_endpoint(c, name, poll_s=poll_s)
    except KeyboardInterrupt:
        old = " ".join([previous["config"], *previous["models"]])
        print(f"\nthe update of {name} goes on; once it is InService, {old} can be deleted")
        raise
    if desc["EndpointConfigName"] == made["config"]:
        removed = _remove(c, previous["config"], previous["models"])
        return [f"endpoint {name} now serves {made['model']}", *removed]
    reason = desc.get("FailureReason") or "an alarm fired or the new fleet failed its health check"
    removed = _remove(c, made["config"], [made["model"]])
    for line in removed:
        print(line)
    raise UserError(
        f"the update of endpoint {name} was rolled back ({reason}): "
        f"{' '.join(previous['models']) or previous['config']} still serves; see "
        f"/aws/sagemaker/Endpoints/{name} in CloudWatch"
    )


def _remove(c: Clients, config: str, models: list[str]) -> list[str]:
    from botocore.exceptions import ClientError

    removed = []
    for method, kwargs, what in (
        ("delete_endpoint_config", {"EndpointConfigName": config}, f"endpoint config {config}"),
        *(("delete_model", {"ModelName": m}, f"model {m}") for m in models),
    ):
        try:
            getattr(c.sagemaker, method)(**kwargs)
            removed.append(f"removed {what}")
        except ClientError as exc:
            removed.append(f"could not remove {what}: {exc.response.get('Error', {}).get('Code')}")
    return removed


# ---------------------------------------------------------------- autoscaling


def current_scaling(c: Clients, name: str) -> dict | None:
    """The variant's scalable target (MinCapacity, MaxCapacity) and its policies, or None."""
    from botocore.exceptions import ClientError

    resource = variant_resource(name)
    try:
        targets = c.autoscaling.describe_scalable_targets(
            ServiceNamespace="sagemaker",
            ResourceIds=[resource],
            ScalableDimension=SCALABLE_DIMENSION,
        ).get("ScalableTargets", [])
        if not targets:
            return None
        policies = c.autoscaling.describe_scaling_policies(
            ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION
        ).get("ScalingPolicies", [])
    except ClientError:
        return None
    found = [t for t in targets if t["ResourceId"] == resource]
    if not found:
        return None
    return {**found[0], "policies": [p for p in policies if p["ResourceId"] == resource]}


def apply_scaling(c: Clients, name: str, scaling: Scaling, *, asynchronous: bool) -> list[str]:
    """Register the variant's instance count with Application Auto Scaling and its policy:
    invocations per instance, or an async endpoint's backlog (and, from zero instances, the
    alarm on HasBacklogWithoutCapacity that brings the first one back). A policy an earlier
    deploy registered that this one does not want (real-time then async, or back) is removed."""
    before = current_scaling(c, name)
    if not asynchronous:
        policies = [
            invocations_policy_request(endpoint=name, target_invocations=scaling.target_invocations)
        ]
        said = [f"  target: {scaling.target_invocations} invocations a minute per instance"]
    else:
        policies = [backlog_policy_request(endpoint=name)]
        said = ["  target: the backlog of requests waiting per instance"]
        if scaling.min_instances == 0:
            policies.append(scale_from_zero_policy_request(endpoint=name))
            said.append(
                f"  from zero: alarm {backlog_alarm_name(name)} adds an instance when requests "
                "wait with none running"
            )
    lines = [f"autoscaling: {scaling.min_instances} to {scaling.max_instances} instances", *said]
    with aws_errors():
        c.autoscaling.register_scalable_target(
            **scalable_target_request(
                endpoint=name,
                min_instances=scaling.min_instances,
                max_instances=scaling.max_instances,
            )
        )
        for policy in policies:
            made = c.autoscaling.put_scaling_policy(**policy)
            if policy["PolicyType"] == "StepScaling":  # the one the from-zero alarm runs
                c.cloudwatch.put_metric_alarm(
                    **backlog_alarm_request(endpoint=name, policy_arn=made["PolicyARN"])
                )
        wanted = {policy["PolicyName"] for policy in policies}
        for old in (before or {}).get("policies", []):
            if old["PolicyName"] not in wanted:
                c.autoscaling.delete_scaling_policy(
                    PolicyName=old["PolicyName"],
                    ServiceNamespace="sagemaker",
                    ResourceId=variant_resource(name),
                    ScalableDimension=SCALABLE_DIMENSION,
                )
                lines.append(f"  removed scaling policy {old['PolicyName']}")
                if old["PolicyType"] == "StepScaling":  # its alarm would name nothing
                    c.cloudwatch.delete_alarms(AlarmNames=[backlog_alarm_name(name)])
                    lines.append(f"  removed alarm {backlog_alarm_name(name)}")
    return lines


def remove_scaling(c: Clients, name: str) -> list[str]:
    """Delete the variant's scaling policies, its scalable target and our backlog alarm."""
    from botocore.exceptions import ClientError

    found = current_scaling(c, name)
    removed = []
    with aws_errors():
        if found is not None:
            for policy in found["policies"]:
                c.autoscaling.delete_scaling_policy(
                    PolicyName=policy["PolicyName"],
                    ServiceNamespace="sagemaker",
                    ResourceId=variant_resource(name),
                    ScalableDimension=SCALABLE_DIMENSION,
                )
                removed.append(f"scaling policy {policy['PolicyName']}")
            c.autoscaling.deregister_scalable_target(
                ServiceNamespace="sagemaker",
                ResourceId=variant_resource(name),
                ScalableDimension=SCALABLE_DIMENSION,
            )
            removed.append(f"scalable target {variant_resource(name)}")
        alarm = backlog_alarm_name(name)
        try:
            alarms = c.cloudwatch.describe_alarms(AlarmNames=[alarm]).get("MetricAlarms", [])
        except ClientError:
            alarms = []
        if alarms:
            c.cloudwatch.delete_alarms(AlarmNames=[alarm])
            removed.append(f"alarm {alarm}")
    return removed


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
                models, runs_as = _endpoint_details(c, e["EndpointName"])
                found.append(
                    EndpointInfo(
                        e["EndpointName"],
                        state=e["EndpointStatus"],
                        model=models,
                        runs_as=runs_as,
                        age=f"{age / 3600:.1f} h" if age >= 3600 else f"{age / 60:.0f} min",
                        bills=True,
                    )
                )
    return found


def _endpoint_details(c: Clients, name: str) -> tuple[str, str]:
    """(the models it serves: both during an update; its instances: current and desired
    counts, and the autoscaling range where one is registered)."""
    from botocore.exceptions import ClientError

    try:
        desc = c.sagemaker.describe_endpoint(EndpointName=name)
        config = c.sagemaker.describe_endpoint_config(EndpointConfigName=desc["EndpointConfigName"])
    except ClientError:
        return "?", "?"
    models = " ".join(v["ModelName"] for v in config.get("ProductionVariants", []))
    pending = desc.get("PendingDeploymentSummary") or {}
    if pending.get("EndpointConfigName"):
        try:
            new = c.sagemaker.describe_endpoint_config(
                EndpointConfigName=pending["EndpointConfigName"]
            )
            incoming = " ".join(v["ModelName"] for v in new.get("ProductionVariants", []))
        except ClientError:
            incoming = pending["EndpointConfigName"]
        models = f"{models} -> {incoming} (updating)"
    counts = {v["VariantName"]: v for v in desc.get("ProductionVariants", [])}
    parts = []
    for v in config.get("ProductionVariants", []):
        if v.get("ServerlessConfig"):
            parts.append(f"serverless {v['ServerlessConfig']['MemorySizeInMB']} MB")
            continue
        live = counts.get(v["VariantName"], {})
        current = live.get("CurrentInstanceCount", v.get("InitialInstanceCount", "?"))
        desired = live.get("DesiredInstanceCount", current)
        parts.append(f"{current} x {v.get('InstanceType', '?')} (desired {desired})")
    if config.get("AsyncInferenceConfig"):
        parts.append("async")
    scaling = current_scaling(c, name)
    if scaling is not None:
        parts.append(f"scales {scaling['MinCapacity']}-{scaling['MaxCapacity']}")
    return models, ", ".join(parts)


def delete_endpoint(c: Clients, name: str) -> list[str]:
    """Its autoscaling, the endpoint, its config and its models: nothing left billing or
    cluttering (a scalable target left behind would name an endpoint that is gone)."""
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
        removed += remove_scaling(c, name)
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


def invoke_async(
    c: Clients,
    options: AwsOptions,
    name: str,
    body: bytes,
    *,
    content_type: str,
    custom_attributes: str = "",
) -> tuple[int, dict]:
    """Upload the body, InvokeEndpointAsync, then (unless options.wait is off) wait for the
    answer or the failure to appear in S3: (200, answer), (0, the error), (202, locations)."""
    bucket = default_bucket(c, options)
    key = f"imgclf/async-input/{name}/{uuid.uuid4().hex}"
    kwargs = {"CustomAttributes": custom_attributes} if custom_attributes else {}
    with aws_errors():
        c.s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        sent = c.runtime.invoke_endpoint_async(
            EndpointName=name,
            InputLocation=f"s3://{bucket}/{key}",
            ContentType=content_type,
            Accept="application/json",
            InvocationTimeoutSeconds=ASYNC_TIMEOUT_S,
            **kwargs,
        )
    output, failure = sent["OutputLocation"], sent.get("FailureLocation")
    if not options.wait:
        return 202, {"output": output, "failure": failure, "input": f"s3://{bucket}/{key}"}
    # The endpoint queues the request, may first scale up from zero, and has up to the hour.
    deadline = time.monotonic() + ASYNC_TIMEOUT_S + 900
    poll_s = min(options.poll_s, 2.0)
    while True:
        for location, status in ((output, 200), (failure, 0)):
            raw = _read_s3(c, location) if location else None
            if raw is not None:
                with aws_errors():
                    c.s3.delete_object(Bucket=bucket, Key=key)  # the input is no longer needed
                return status, _answer(raw, status)
        if time.monotonic() > deadline:
            raise UserError(
                f"no answer from endpoint {name} in {ASYNC_TIMEOUT_S + 900} s; it will be "
                f"written to {output} (or {failure})"
            )
        time.sleep(poll_s)


def _read_s3(c: Clients, uri: str) -> bytes | None:
    from botocore.exceptions import ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        return c.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchBucket"):
            return None
        with aws_errors():
            raise
        raise  # unreachable: aws_errors converts


def _answer(raw: bytes, status: int) -> dict:
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if status == 200 and answer is not None:
        return answer
    if isinstance(answer, dict) and "error" in answer:
        return answer
    text = raw.decode("utf-8", "replace").strip()
    return {"error": text[:300] or "the request failed", "hint": "see the endpoint's log"}
