"""The `sagemaker` target: the launcher's verbs on Amazon SageMaker through boto3.

Request bodies are built by pure functions (tested against botocore's service model); the
functions that talk to AWS take boto3 clients, so tests point them at moto's server through
boto3's standard `AWS_ENDPOINT_URL`. AWS errors become one-line UserErrors saying what to do.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from imgclf.errors import UserError
from imgclf.metrics import metric_definitions

DEFAULT_TRAIN_INSTANCE = "ml.g5.xlarge"
DEFAULT_SERVE_INSTANCE = "ml.g5.xlarge"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
LOG_GROUP_TRAINING = "/aws/sagemaker/TrainingJobs"
IMAGES_FILE = "images.json"  # written by build_and_push.sh
TAG_KEY = "imgclf"
MULTIPART_BYTES = 64 * 1024 * 1024  # upload part size; also how the ETag is computed

# SageMaker Debugger's built-in rule evaluator images (repository sagemaker-debugger-rules).
DEBUGGER_RULE_ACCOUNTS = {
    "ap-east-1": "199566480951",
    "ap-northeast-1": "430734990657",
    "ap-northeast-2": "578805364391",
    "ap-south-1": "904829902805",
    "ap-southeast-1": "972752614525",
    "ap-southeast-2": "184798709955",
    "ca-central-1": "519511493484",
    "eu-central-1": "482524230118",
    "eu-north-1": "314864569078",
    "eu-west-1": "929884845733",
    "eu-west-2": "250201462417",
    "eu-west-3": "447278800020",
    "me-south-1": "986000313247",
    "sa-east-1": "818342061345",
    "us-east-1": "503895931360",
    "us-east-2": "915447279597",
    "us-west-1": "685455198987",
    "us-west-2": "895741380848",
}
# The built-in rules matching our in-container ones (#6), sent only with --sagemaker-debugger.
DEBUGGER_RULES = {
    "LossNotDecreasing": {"rule_to_invoke": "LossNotDecreasing", "tensor_regex": ".*loss.*"},
    "Overfit": {"rule_to_invoke": "Overfit"},
    "VanishingGradient": {"rule_to_invoke": "VanishingGradient"},
    "ExplodingTensor": {"rule_to_invoke": "ExplodingTensor"},
    "PoorWeightInitialization": {"rule_to_invoke": "PoorWeightInitialization"},
}


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class AwsOptions:
    """What the user passed (or the defaults): the same for every verb."""

    region: str | None = None
    role: str | None = None
    bucket: str | None = None
    instance_type: str | None = None
    instance_count: int = 1
    image: str | None = None
    wait: bool = True
    sagemaker_debugger: bool = False
    spot: bool = False
    max_runtime_s: int = 24 * 3600
    volume_gb: int = 50
    poll_s: float = 30.0
    home: Path = field(default_factory=lambda: Path(".imgclf"))


def remembered_image(home: Path, kind: str) -> str | None:
    path = home / IMAGES_FILE
    try:
        return json.loads(path.read_text()).get(kind)
    except (OSError, ValueError, AttributeError):
        return None


def resolve_image(options: AwsOptions, kind: str) -> str:
    image = options.image or remembered_image(options.home, kind)
    if not image:
        raise UserError(
            f"no {kind} image: run ./build_and_push.sh {kind} (it remembers the URI in "
            f"{options.home / IMAGES_FILE}) or pass --image URI"
        )
    return image


def resolve_role(options: AwsOptions) -> str:
    role = options.role or os.environ.get("IMGCLF_SAGEMAKER_ROLE")
    if not role:
        raise UserError(
            "no SageMaker execution role: pass --role arn:aws:iam::ACCOUNT:role/NAME (or set "
            "IMGCLF_SAGEMAKER_ROLE); the role needs AmazonSageMakerFullAccess and S3 access"
        )
    if not role.startswith("arn:"):
        raise UserError(f"--role {role} is not an ARN (arn:aws:iam::ACCOUNT:role/NAME)")
    return role


# ---------------------------------------------------------------- AWS errors


ERROR_HINTS = {
    "AccessDenied": "the credentials lack a permission for {op}; attach it to the user/role",
    "AccessDeniedException": "the credentials lack a permission for {op}; attach it",
    "UnrecognizedClientException": "the AWS credentials are not valid; run `aws configure`",
    "InvalidClientTokenId": "the AWS credentials are not valid; run `aws configure`",
    "ExpiredToken": "the AWS session token expired; log in again (aws sso login / new keys)",
    "ExpiredTokenException": "the AWS session token expired; log in again",
    "ResourceLimitExceeded": "an account quota is reached ({message}); request more in "
    "Service Quotas (SageMaker, '<instance type> for training job/endpoint usage') or pick "
    "another --instance-type",
    "ResourceInUse": "{message}; choose another name or delete the old one",
    "ResourceNotFound": "{message}",
    "NoSuchBucket": "the bucket does not exist; pass --bucket of one you own",
}


@contextlib.contextmanager
def aws_errors() -> Iterator[None]:
    """botocore failures → one line that says what to do (no traceback, no credentials)."""
    from botocore import exceptions as bx

    try:
        yield
    except bx.NoCredentialsError:
        raise UserError(
            "no AWS credentials: run `aws configure`, set AWS_PROFILE, or export "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        ) from None
    except bx.NoRegionError:
        raise UserError("no AWS region: pass --region R or set AWS_REGION") from None
    except bx.EndpointConnectionError as exc:
        raise UserError(
            f"cannot reach AWS ({exc.kwargs.get('endpoint_url')}); check the network"
        ) from None
    except bx.ParamValidationError as exc:
        raise UserError(f"invalid request: {exc}") from None
    except bx.ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "Error")
        message = error.get("Message", "")
        op = getattr(exc, "operation_name", "the call")
        hint = ERROR_HINTS.get(code)
        if code == "ValidationException" and "image" in message.lower():
            hint = "{message}; push the image with ./build_and_push.sh or fix --image"
        text = hint.format(op=op, message=message) if hint else message
        raise UserError(f"AWS {op}: {code}: {text}") from None


def session(region: str | None):
    import boto3

    return boto3.session.Session(region_name=region) if region else boto3.session.Session()


def clients(options: AwsOptions) -> Clients:
    s = session(options.region)
    with aws_errors():
        return Clients(
            sagemaker=s.client("sagemaker"),
            s3=s.client("s3"),
            logs=s.client("logs"),
            runtime=s.client("sagemaker-runtime"),
            sts=s.client("sts"),
            region=s.region_name,
        )


@dataclass
class Clients:
    sagemaker: object
    s3: object
    logs: object
    runtime: object
    sts: object
    region: str | None

    def require_region(self) -> str:
        if not self.region:
            raise UserError("no AWS region: pass --region R or set AWS_REGION")
        return self.region


def default_bucket(c: Clients, options: AwsOptions) -> str:
    """--bucket, else sagemaker-REGION-ACCOUNT (the SageMaker SDK's default), created if
    missing."""
    if options.bucket:
        return options.bucket
    region = c.require_region()
    with aws_errors():
        account = c.sts.get_caller_identity()["Account"]
        bucket = f"sagemaker-{region}-{account}"
        try:
            c.s3.head_bucket(Bucket=bucket)
        except Exception:  # noqa: BLE001 - any miss: try to create it, which says why not
            kwargs = {}
            if region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            c.s3.create_bucket(Bucket=bucket, **kwargs)
    return bucket


# ---------------------------------------------------------------- S3 upload


def s3_etag(path: Path, part_size: int = MULTIPART_BYTES) -> str:
    """The ETag S3 gives an upload of this file made with `part_size` parts (no SSE-KMS)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= part_size:
            return hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
        digests = []
        while chunk := f.read(part_size):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    joined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{joined}-{len(digests)}"


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise UserError(f"{uri} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


@dataclass
class UploadResult:
    uri: str
    uploaded: int
    skipped: int
    bytes_sent: int


def upload_tree(
    s3, local_dir: Path, bucket: str, prefix: str, *, progress: bool = True
) -> UploadResult:
    """Upload every file under `local_dir` to s3://bucket/prefix/, skipping files already there
    with the same size and ETag (a re-run of an unchanged dataset sends nothing)."""
    from boto3.s3.transfer import TransferConfig
    from tqdm import tqdm

    prefix = prefix.strip("/")
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"{local_dir} holds no files to upload")
    existing: dict[str, tuple[int, str]] = {}
    with aws_errors():
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/"
        ):
            for obj in page.get("Contents", []):
                existing[obj["Key"]] = (obj["Size"], obj["ETag"].strip('"'))
    todo = []
    for path in files:
        key = f"{prefix}/{path.relative_to(local_dir).as_posix()}"
        size = path.stat().st_size
        have = existing.get(key)
        if have and have[0] == size and have[1] == s3_etag(path):
            continue
        todo.append((path, key, size))
    config = TransferConfig(
        multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES
    )
    total = sum(size for _, _, size in todo)
    with (
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"upload to s3://{bucket}/{prefix}",
            disable=not progress or not todo,
            file=sys.stderr,
        ) as bar,
        aws_errors(),
    ):
        for path, key, _ in todo:
            s3.upload_file(str(path), bucket, key, Config=config, Callback=bar.update)
    return UploadResult(f"s3://{bucket}/{prefix}/", len(todo), len(files) - len(todo), total)


# ---------------------------------------------------------------- request bodies (pure)


def encode_hyperparameters(hps: dict[str, str]) -> dict[str, str]:
    """Each value JSON-encoded into a string, as the SageMaker Python SDK's framework estimators
    (PyTorch and the like) send them; a plain `Estimator` sends `str(value)` instead ("False").
    The training program reads both: it decodes each with json.loads and falls back to the
    raw string."""
    return {k: json.dumps(v) for k, v in hps.items()}


def debugger_configs(region: str, output_s3: str) -> dict:
    """DebugHookConfig, DebugRuleConfigurations, ProfilerConfig and the ProfilerReport rule:
    SageMaker Debugger, for accounts that still have it (closed to new ones since 2026-07-30)."""
    account = DEBUGGER_RULE_ACCOUNTS.get(region)
    if account is None:
        raise UserError(
            f"SageMaker Debugger's rule images are not published in {region}; drop "
            "--sagemaker-debugger (our in-container rules still run)"
        )
    image = f"{account}.dkr.ecr.{region}.amazonaws.com/sagemaker-debugger-rules:latest"
    base = output_s3.rstrip("/")
    return {
        "DebugHookConfig": {
            "S3OutputPath": f"{base}/debug-output",
            "LocalPath": "/opt/ml/output/tensors",
            "CollectionConfigurations": [
                {"CollectionName": "losses", "CollectionParameters": {"save_interval": "10"}},
                {"CollectionName": "gradients", "CollectionParameters": {"save_interval": "50"}},
            ],
        },
        "DebugRuleConfigurations": [
            {
                "RuleConfigurationName": f"{name}-rule",
                "RuleEvaluatorImage": image,
                "RuleParameters": params,
            }
            for name, params in DEBUGGER_RULES.items()
        ],
        "ProfilerConfig": {
            "S3OutputPath": f"{base}/profiler-output",
            "ProfilingIntervalInMilliseconds": 500,
        },
        "ProfilerRuleConfigurations": [
            {
                "RuleConfigurationName": "ProfilerReport",
                "RuleEvaluatorImage": image,
                "RuleParameters": {"rule_to_invoke": "ProfilerReport"},
            }
        ],
    }


def training_definition(
    *,
    image: str,
    role_arn: str,
    hyperparameters: dict[str, str],
    train_s3: str,
    output_s3: str,
    instance_type: str = DEFAULT_TRAIN_INSTANCE,
    instance_count: int = 1,
    max_runtime_s: int = 24 * 3600,
    volume_gb: int = 50,
) -> dict:
    """What a training job is, whether it runs alone (CreateTrainingJob) or as a tuning trial
    (CreateHyperParameterTuningJob's TrainingJobDefinition): image, role, data, output,
    instances, limits, network isolation and the hyperparameters, encoded. Built once here so
    the two requests cannot drift apart."""
    from imgclf.contract import COMBINED_CHANNEL, TORCH_DISTRIBUTED_KEY

    hps = dict(hyperparameters)
    if instance_count > 1:
        # Several instances: torchrun through sagemaker-training's torch_distributed runner.
        hps[TORCH_DISTRIBUTED_KEY] = "true"
    return {
        "HyperParameters": encode_hyperparameters(hps),
        "AlgorithmSpecification": {
            "TrainingImage": image,
            "TrainingInputMode": "File",
            "MetricDefinitions": metric_definitions(),
        },
        "RoleArn": role_arn,
        "InputDataConfig": [
            {
                "ChannelName": COMBINED_CHANNEL,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": train_s3,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "InputMode": "File",
            }
        ],
        "OutputDataConfig": {"S3OutputPath": output_s3},
        "ResourceConfig": {
            "InstanceType": instance_type,
            "InstanceCount": instance_count,
            "VolumeSizeInGB": volume_gb,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime_s},
        # Weights are baked into the image at build time: the job needs no network.
        "EnableNetworkIsolation": True,
    }


def training_job_request(
    *,
    job_name: str,
    checkpoint_s3: str,
    region: str,
    spot: bool = False,
    sagemaker_debugger: bool = False,
    **definition,
) -> dict:
    """The CreateTrainingJob request body: `training_definition(**definition)` plus what only a
    job of its own has (name, checkpoints, spot, metrics time series, tags, Debugger)."""
    request = {"TrainingJobName": job_name, **training_definition(**definition)}
    request["AlgorithmSpecification"]["EnableSageMakerMetricsTimeSeries"] = True
    if spot:
        stopping = request["StoppingCondition"]
        stopping["MaxWaitTimeInSeconds"] = stopping["MaxRuntimeInSeconds"] * 2
    request["CheckpointConfig"] = {"S3Uri": checkpoint_s3, "LocalPath": CHECKPOINT_LOCAL_PATH}
    request["EnableManagedSpotTraining"] = spot
    request["Tags"] = [{"Key": TAG_KEY, "Value": "train"}]
    if sagemaker_debugger:
        request.update(debugger_configs(region, request["OutputDataConfig"]["S3OutputPath"]))
    return request


def model_request(*, name: str, image: str, model_s3: str, role_arn: str) -> dict:
    return {
        "ModelName": name,
        "PrimaryContainer": {"Image": image, "ModelDataUrl": model_s3, "Mode": "SingleModel"},
        "ExecutionRoleArn": role_arn,
        "EnableNetworkIsolation": True,
        "Tags": [{"Key": TAG_KEY, "Value": "serve"}],
    }


def endpoint_config_request(
    *,
    name: str,
    model_name: str,
    instance_type: str = DEFAULT_SERVE_INSTANCE,
    instance_count: int = 1,
    serverless_memory_mb: int | None = None,
    serverless_concurrency: int = 5,
) -> dict:
    variant: dict = {"VariantName": "AllTraffic", "ModelName": model_name}
    if serverless_memory_mb:
        variant["ServerlessConfig"] = {
            "MemorySizeInMB": serverless_memory_mb,
            "MaxConcurrency": serverless_concurrency,
        }
    else:
        variant.update(
            {
                "InitialInstanceCount": instance_count,
                "InstanceType": instance_type,
                "InitialVariantWeight": 1.0,
            }
        )
    return {
        "EndpointConfigName": name,
        "ProductionVariants": [variant],
        "Tags": [{"Key": TAG_KEY, "Value": "serve"}],
    }


# ---------------------------------------------------------------- training


def new_job_name(prefix: str = "imgclf") -> str:
    return f"{prefix}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


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


class LogStreamer:
    """Prints new CloudWatch log events of a job's streams (`<job>/algo-N-...`)."""

    def __init__(self, logs, group: str, prefix: str, out=None) -> None:
        self.logs, self.group, self.prefix = logs, group, prefix
        self.tokens: dict[str, int] = {}
        self.out = out or sys.stdout

    def poll(self) -> int:
        from botocore.exceptions import ClientError

        printed = 0
        try:
            streams = self.logs.describe_log_streams(
                logGroupName=self.group, logStreamNamePrefix=self.prefix
            ).get("logStreams", [])
        except ClientError:
            return 0  # the group appears when the first instance starts
        for stream in streams:
            name = stream["logStreamName"]
            start = self.tokens.get(name, 0)
            events = self.logs.get_log_events(
                logGroupName=self.group, logStreamName=name, startTime=start, startFromHead=True
            ).get("events", [])
            for event in events:
                if event["timestamp"] < start:
                    continue
                host = name[len(self.prefix) :].split("-")[:2]
                print(f"[{'-'.join(host)}] {event['message'].rstrip()}", file=self.out)
                printed += 1
                self.tokens[name] = event["timestamp"] + 1
        self.out.flush()
        return printed


def wait_for_training(
    c: Clients,
    job_name: str,
    *,
    poll_s: float = 30.0,
    ask: Callable[[str], str] | None = None,
) -> dict:
    """Follow the job: a line per status change, its CloudWatch log, until it ends. Ctrl-C
    offers to stop it (it keeps running, and billing, otherwise)."""
    streamer = LogStreamer(c.logs, LOG_GROUP_TRAINING, f"{job_name}/")
    last = None
    while True:
        try:
            with aws_errors():
                desc = c.sagemaker.describe_training_job(TrainingJobName=job_name)
                status = (desc["TrainingJobStatus"], desc.get("SecondaryStatus"))
                if status != last:
                    print(f"{job_name}: {status[0]} / {status[1]}", flush=True)
                    last = status
                streamer.poll()
            if status[0] in ("Completed", "Failed", "Stopped"):
                return desc
            time.sleep(poll_s)
        except KeyboardInterrupt:
            answer = "n"
            if ask is not None or sys.stdin.isatty():
                answer = (ask or input)(f"\nstop training job {job_name}? [y/N] ").strip().lower()
            if answer.startswith("y"):
                with aws_errors():
                    c.sagemaker.stop_training_job(TrainingJobName=job_name)
                print(f"stopping {job_name}; its last checkpoint stays in S3")
            else:
                print(
                    f"{job_name} keeps running (and billing); stop it with: aws sagemaker "
                    f"stop-training-job --training-job-name {job_name}"
                )
            raise


def training_summary(desc: dict) -> list[str]:
    lines = [f"job {desc['TrainingJobName']}: {desc['TrainingJobStatus']}"]
    if desc.get("FailureReason"):
        lines.append(f"  reason: {desc['FailureReason']}")
    model = desc.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if model:
        lines.append(f"  model: {model}")
    for metric in desc.get("FinalMetricDataList", []) or []:
        lines.append(f"  {metric['MetricName']}: {metric['Value']:.4f}")
    seconds = desc.get("BillableTimeInSeconds")
    if seconds:
        lines.append(f"  billable: {seconds} s on {desc['ResourceConfig']['InstanceType']}")
    return lines


# ---------------------------------------------------------------- tuning


def start_tuning(c: Clients, options: AwsOptions, space, *, data: str | Path, job_name: str):
    from imgclf.tuning.space import tuning_job_request

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


def wait_for_tuning(c: Clients, job_name: str, *, poll_s: float = 60.0) -> dict:
    last = None
    while True:
        with aws_errors():
            desc = c.sagemaker.describe_hyper_parameter_tuning_job(
                HyperParameterTuningJobName=job_name
            )
        status = desc["HyperParameterTuningJobStatus"]
        counters = desc.get("TrainingJobStatusCounters", {})
        line = f"{job_name}: {status} " + ", ".join(f"{k} {v}" for k, v in counters.items())
        if line != last:
            print(line, flush=True)
            last = line
        if status in ("Completed", "Failed", "Stopped"):
            return desc
        time.sleep(poll_s)


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


def pack_model(model_dir: Path) -> bytes:
    """model.tar.gz of a local model dir (the layout SageMaker unpacks into /opt/ml/model)."""
    if not (model_dir / "model.pt").is_file():
        raise UserError(f"{model_dir} is not a model dir (no model.pt); pass a job's model/")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name)
    return buf.getvalue()


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
) -> dict:
    image, role = resolve_image(options, "serve"), resolve_role(options)
    model_s3 = resolve_model_s3(c, options, model, name)
    suffix = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    model_name = f"{name}-{suffix}"
    with aws_errors():
        c.sagemaker.create_model(
            **model_request(
                name=model_name,
                image=image,
                model_s3=model_s3,
                role_arn=role,
            )
        )
        c.sagemaker.create_endpoint_config(
            **endpoint_config_request(
                name=model_name,
                model_name=model_name,
                instance_type=options.instance_type or DEFAULT_SERVE_INSTANCE,
                instance_count=options.instance_count,
                serverless_memory_mb=serverless_memory_mb,
            )
        )
        c.sagemaker.create_endpoint(
            EndpointName=name,
            EndpointConfigName=model_name,
            Tags=[{"Key": TAG_KEY, "Value": "serve"}],
        )
    return {"endpoint": name, "model": model_name, "model_data": model_s3}


def wait_for_endpoint(c: Clients, name: str, *, poll_s: float = 30.0) -> dict:
    last = None
    while True:
        with aws_errors():
            desc = c.sagemaker.describe_endpoint(EndpointName=name)
        status = desc["EndpointStatus"]
        if status != last:
            print(f"endpoint {name}: {status}", flush=True)
            last = status
        if status == "InService":
            return desc
        if status in ("Failed", "OutOfService"):
            reason = desc.get("FailureReason") or f"see log /aws/sagemaker/Endpoints/{name}"
            raise UserError(
                f"endpoint {name} is {status}: {reason}; delete it with "
                f"launch.py delete {name} --target sagemaker"
            )
        time.sleep(poll_s)


def list_endpoints(c: Clients) -> list[list[str]]:
    rows = []
    now = datetime.now(UTC)
    with aws_errors():
        for page in c.sagemaker.get_paginator("list_endpoints").paginate():
            for e in page.get("Endpoints", []):
                age = now - e["CreationTime"]
                hours = age.total_seconds() / 3600
                rows.append(
                    [
                        e["EndpointName"],
                        e["EndpointStatus"],
                        f"{hours:.1f} h" if hours >= 1 else f"{age.total_seconds() / 60:.0f} min",
                        _endpoint_instances(c, e["EndpointName"]),
                    ]
                )
    return rows


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


def download_job_output(c: Clients, job_name: str, dest: Path) -> Path:
    """A SageMaker job's model.tar.gz and output.tar.gz unpacked into a local job dir
    (model/ and output/data/), for `launch.py report` and `debug`."""
    with aws_errors():
        desc = c.sagemaker.describe_training_job(TrainingJobName=job_name)
    model_uri = desc.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if not model_uri:
        raise UserError(f"training job {job_name} has no output yet ({desc['TrainingJobStatus']})")
    output_uri = model_uri.rsplit("/", 1)[0] + "/output.tar.gz"
    for uri, folder in ((model_uri, dest / "model"), (output_uri, dest / "output" / "data")):
        bucket, key = split_s3_uri(uri)
        with aws_errors():
            body = c.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
            tar.extractall(folder, filter="data")  # no absolute paths, links or devices
    return dest
