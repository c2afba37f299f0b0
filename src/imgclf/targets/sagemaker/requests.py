"""Every request body sent to SageMaker, built by pure functions (no AWS call, no
environment): botocore's service model validates them in the tests."""

from __future__ import annotations

import json
from typing import Any

from imgclf.contract import DEBUG_COLLECTIONS
from imgclf.errors import UserError
from imgclf.metrics import metric_definitions
from imgclf.tuning.space import STRATEGIES, TuningSpace, sagemaker_parameter_ranges

DEFAULT_TRAIN_INSTANCE = "ml.g5.xlarge"
DEFAULT_SERVE_INSTANCE = "ml.g5.xlarge"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
TAG_KEY = "imgclf"

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
                {"CollectionName": name, "CollectionParameters": {"save_interval": str(steps)}}
                for name, steps in DEBUG_COLLECTIONS.items()
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
    model_s3: str | None = None,
) -> dict:
    """What a training job is, whether it runs alone (CreateTrainingJob) or as a tuning trial
    (CreateHyperParameterTuningJob's TrainingJobDefinition): image, role, data, output,
    instances, limits, network isolation and the hyperparameters, encoded. Built once here so
    the two requests cannot drift apart. `model_s3` (`--init-from`): the model.tar.gz the job
    starts from, as a `model` channel (`model_channel`)."""
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
            },
            *([model_channel(model_s3)] if model_s3 else []),
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


def model_channel(model_s3: str) -> dict:
    """The `model` channel of incremental training, as SageMaker's built-in algorithms take it:
    the model.tar.gz, downloaded whole (File mode, every instance) into
    /opt/ml/input/data/model/, where the training program unpacks and checks it."""
    from imgclf.contract import MODEL_CHANNEL, MODEL_CHANNEL_CONTENT_TYPE

    if not model_s3.startswith("s3://") or len(model_s3) <= len("s3://"):
        raise UserError(f"--init-from {model_s3!r}: give s3://BUCKET/KEY of a model.tar.gz")
    return {
        "ChannelName": MODEL_CHANNEL,
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": model_s3,
                "S3DataDistributionType": "FullyReplicated",
            }
        },
        "ContentType": MODEL_CHANNEL_CONTENT_TYPE,
        "CompressionType": "None",
        "InputMode": "File",
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


def tuning_job_request(space: TuningSpace, *, job_name: str, training_definition: dict) -> dict:
    """The CreateHyperParameterTuningJob request body (pure; botocore validates its shape).
    `training_definition`: what each trial is, from `training_definition` above (the very
    builder of a training job's request) with the space's static hyperparameters."""
    definition = dict(training_definition)
    definition["StaticHyperParameters"] = definition.pop("HyperParameters")
    config: dict[str, Any] = {
        "Strategy": STRATEGIES[space.strategy],
        "HyperParameterTuningJobObjective": {
            "Type": space.direction.capitalize(),
            "MetricName": space.metric,
        },
        "ResourceLimits": {
            "MaxNumberOfTrainingJobs": space.max_trials,
            "MaxParallelTrainingJobs": space.parallel_trials,
        },
        "ParameterRanges": sagemaker_parameter_ranges(space),
        # Hyperband stops jobs itself; SageMaker refuses its early stopping type beside it.
        "TrainingJobEarlyStoppingType": "Auto"
        if space.early_stopping and space.strategy != "hyperband"
        else "Off",
    }
    if space.strategy == "hyperband":
        config["StrategyConfig"] = {
            "HyperbandStrategyConfig": {"MinResource": 1, "MaxResource": space.max_epochs()}
        }
    if space.seed is not None:
        config["RandomSeed"] = space.seed
    return {
        "HyperParameterTuningJobName": job_name,
        "HyperParameterTuningJobConfig": config,
        "TrainingJobDefinition": definition,
    }


def model_request(
    *, name: str, image: str, model_s3: str, role_arn: str, environment: dict | None = None
) -> dict:
    container = {"Image": image, "ModelDataUrl": model_s3, "Mode": "SingleModel"}
    if environment:  # the serving contract's settings (contract.RESPONSE_FORMAT_ENV, ...)
        container["Environment"] = dict(environment)
    return {
        "ModelName": name,
        "PrimaryContainer": container,
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
    startup_timeout_s: int | None = None,
    download_timeout_s: int | None = None,
    async_config: dict | None = None,
) -> dict:
    """CreateEndpointConfig: one variant, on instances (with startup and model-download
    timeouts: `startup_timeouts`) or serverless; `async_config` (`async_inference_config`)
    makes it an asynchronous endpoint."""
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
        if startup_timeout_s is not None:
            variant["ContainerStartupHealthCheckTimeoutInSeconds"] = startup_timeout_s
        if download_timeout_s is not None:
            variant["ModelDataDownloadTimeoutInSeconds"] = download_timeout_s
    request = {
        "EndpointConfigName": name,
        "ProductionVariants": [variant],
        "Tags": [{"Key": TAG_KEY, "Value": "serve"}],
    }
    if async_config is not None:
        if serverless_memory_mb:
            raise UserError("--async-output needs instances: drop --serverless-mb")
        request["AsyncInferenceConfig"] = async_config
    return request


# ---------------------------------------------------------------- a running endpoint (pure)

VARIANT = "AllTraffic"  # the one production variant every endpoint of ours has
# A new model on a running endpoint: UpdateEndpoint's blue/green traffic shifting.
ROLLOUTS = ("all-at-once", "canary:PCT:MINUTES", "linear:PCT:MINUTES")
MAX_ROLLBACK_ALARMS = 10  # AutoRollbackConfiguration's limit

# Cold start of the serving container, `serve` to a 200 from /ping, measured by
# benchmarks/startup.py on the 2-CPU development machine (AMD EPYC, no GPU, shared with other
# sessions: load average 4 to 5), ResNet-50 with 133 classes, one worker, median of 3 runs
# (benchmarks/README.md, 2026-12-07): 4.9 s for an artifact that carries its ONNX graph on a CPU
# instance (imgclf.graph: no torch import, no export), 19.8 s for one without (the worker
# exports the graph; what every artifact took before the graph was made once). `docker run`
# adds the container's own start to these (process mode measured; the docker suite checks the
# image). The variant's health-check timeout is STARTUP_MARGIN times the figure that applies,
# in whole minutes, at least SageMaker's 60 s: room for a slower instance, a bigger network
# (ResNet-152's export is about 4x ResNet-50's) and a restart of MMS. Where `deploy` cannot tell
# that the graph will be served (a job's or an S3 model.tar.gz, a GPU instance), the figure
# without it.
MEASURED_COLD_START_S = 4.9
MEASURED_COLD_START_EXPORT_S = 19.8
STARTUP_MARGIN = 10
# model.tar.gz from S3: not measured here (no AWS from this machine); sized for 10 MB/s, far
# under what one instance reads from S3 in its own region, and never under SageMaker's 60 s.
DOWNLOAD_BYTES_PER_S = 10 * 1024 * 1024
TIMEOUT_RANGE_S = (60, 3600)  # SageMaker's range for both variant timeouts

# Autoscaling. The default target of SageMakerVariantInvocationsPerInstance (a minute's
# invocations per instance): half of what benchmarks/serve.py measured the serving container
# sustain, ResNet-50 at concurrency 16 on 2 CPUs, 16.82 req/s (benchmarks/README.md, issue 23,
# run 2): 16.82 x 60 x 0.5 = 504. Half: AWS's own guidance for a target (scale out before the
# instance saturates), and room for bigger photos than the benchmark's 1600x1200 JPEGs.
MEASURED_REQUESTS_PER_S = 16.82
TARGET_FRACTION = 0.5
DEFAULT_TARGET_INVOCATIONS = int(MEASURED_REQUESTS_PER_S * 60 * TARGET_FRACTION)
SCALE_OUT_COOLDOWN_S = 60  # add instances soon after the load rises
SCALE_IN_COOLDOWN_S = 300  # remove them only once it has stayed low (each new one cold-starts)
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
# An async endpoint scales on its queue: requests waiting per instance (a target of a few keeps
# each instance's workers busy), and from zero on SageMaker's HasBacklogWithoutCapacity metric.
DEFAULT_TARGET_BACKLOG = 5
ASYNC_TIMEOUT_S = 3600  # InvokeEndpointAsync's InvocationTimeoutSeconds ceiling


def traffic_routing(rollout: str) -> dict:
    """--rollout → TrafficRoutingConfiguration: `all-at-once` (the default), `canary:PCT:MINUTES`
    (PCT% of the new fleet takes traffic, MINUTES of baking, then the rest) or
    `linear:PCT:MINUTES` (PCT% more every MINUTES). The baking minutes are when rollback alarms
    are watched."""
    parts = rollout.split(":")
    kind = parts[0]
    if kind == "all-at-once" and len(parts) == 1:
        return {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    bounds = {"canary": (1, 50), "linear": (10, 50)}  # SageMaker's own, in % of capacity
    if kind not in bounds or len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
        raise UserError(f"--rollout {rollout!r}: use one of {', '.join(ROLLOUTS)}")
    pct, minutes = int(parts[1]), int(parts[2])
    low, high = bounds[kind]
    if not low <= pct <= high:
        raise UserError(f"--rollout {rollout!r}: a {kind} step is {low} to {high} percent")
    if not 1 <= minutes <= 60:
        raise UserError(f"--rollout {rollout!r}: the wait is 1 to 60 minutes")
    size = {"Type": "CAPACITY_PERCENT", "Value": pct}
    key = "CanarySize" if kind == "canary" else "LinearStepSize"
    return {"Type": kind.upper(), "WaitIntervalInSeconds": minutes * 60, key: size}


def update_endpoint_request(
    *, name: str, config_name: str, rollout: str = "all-at-once", rollback_alarms=()
) -> dict:
    """UpdateEndpoint: the endpoint moves to `config_name` by a blue/green deployment; with
    alarms, SageMaker shifts the traffic back if one fires while it deploys or bakes."""
    routing = traffic_routing(rollout)
    alarms = list(dict.fromkeys(rollback_alarms))
    if len(alarms) > MAX_ROLLBACK_ALARMS:
        raise UserError(f"--rollback-alarm: at most {MAX_ROLLBACK_ALARMS} alarms")
    steps = 1
    if routing["Type"] == "LINEAR":
        steps = -(-100 // routing["LinearStepSize"]["Value"])
    elif routing["Type"] == "CANARY":
        steps = 2
    # Every baking step, plus an hour to provision and health-check the new fleet.
    timeout = min(28800, max(600, steps * routing["WaitIntervalInSeconds"] + 3600))
    config: dict = {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": routing,
            "MaximumExecutionTimeoutInSeconds": timeout,
        }
    }
    if alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in alarms]}
    return {"EndpointName": name, "EndpointConfigName": config_name, "DeploymentConfig": config}


def startup_timeouts(model_bytes: int | None, *, graph: bool = False) -> tuple[int, int]:
    """(ContainerStartupHealthCheckTimeoutInSeconds, ModelDataDownloadTimeoutInSeconds) from
    the measured cold start (`graph`: the artifact's own ONNX graph is served, on a CPU
    instance) and the model's size (unknown: a 1 GB model's time)."""
    low, high = TIMEOUT_RANGE_S

    def minutes(seconds: float) -> int:
        return int(min(high, max(low, -(-seconds // 60) * 60)))

    size = model_bytes if model_bytes is not None else 1024**3
    cold = MEASURED_COLD_START_S if graph else MEASURED_COLD_START_EXPORT_S
    return (
        minutes(cold * STARTUP_MARGIN),
        minutes(size / DOWNLOAD_BYTES_PER_S),
    )


def gpu_instance(instance_type: str) -> bool:
    return instance_type.removeprefix("ml.")[:1] in ("g", "p")


def instance_workers(instance_type: str) -> int:
    """MMS workers `serve` starts on an instance by default (settings.default_workers): one per
    GPU (taken as one: the smallest GPU instances), or one per four vCPUs (large = 2 vCPUs,
    xlarge = 4, Nxlarge = 4N)."""
    family, _, size = instance_type.removeprefix("ml.").partition(".")
    if family[:1] in ("g", "p"):
        return 1
    vcpus = {"medium": 1, "large": 2, "xlarge": 4}.get(size)
    if vcpus is None and size.endswith("xlarge") and size[:-6].isdigit():
        vcpus = 4 * int(size[:-6])
    return max(1, (vcpus or 4) // 4)


def async_inference_config(*, output_s3: str, max_concurrent: int) -> dict:
    """AsyncInferenceConfig: answers under output_s3/, failures under output_s3/failures/."""
    base = output_s3.rstrip("/")
    if not base.startswith("s3://") or len(base) <= len("s3://"):
        raise UserError(f"--async-output {output_s3!r}: give an S3 prefix, s3://BUCKET/PREFIX")
    return {
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": max(1, min(1000, max_concurrent))},
        "OutputConfig": {"S3OutputPath": base, "S3FailurePath": f"{base}/failures"},
    }


def variant_resource(endpoint: str) -> str:
    return f"endpoint/{endpoint}/variant/{VARIANT}"


def scalable_target_request(*, endpoint: str, min_instances: int, max_instances: int) -> dict:
    """RegisterScalableTarget for the variant's instance count."""
    if not 0 <= min_instances <= max_instances or max_instances < 1:
        raise UserError(
            f"--min-instances {min_instances} --max-instances {max_instances}: need "
            "0 <= min <= max and max >= 1"
        )
    return {
        "ServiceNamespace": "sagemaker",
        "ResourceId": variant_resource(endpoint),
        "ScalableDimension": SCALABLE_DIMENSION,
        "MinCapacity": min_instances,
        "MaxCapacity": max_instances,
    }


def _policy(endpoint: str, name: str, policy_type: str) -> dict:
    return {
        "PolicyName": f"{endpoint}-{name}",
        "ServiceNamespace": "sagemaker",
        "ResourceId": variant_resource(endpoint),
        "ScalableDimension": SCALABLE_DIMENSION,
        "PolicyType": policy_type,
    }


def invocations_policy_request(*, endpoint: str, target_invocations: int) -> dict:
    """Target tracking on SageMakerVariantInvocationsPerInstance (a minute's invocations)."""
    if target_invocations < 1:
        raise UserError(f"--target-invocations {target_invocations}: give 1 or more a minute")
    return {
        **_policy(endpoint, "invocations", "TargetTrackingScaling"),
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": float(target_invocations),
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
            },
            "ScaleOutCooldown": SCALE_OUT_COOLDOWN_S,
            "ScaleInCooldown": SCALE_IN_COOLDOWN_S,
        },
    }


def backlog_policy_request(*, endpoint: str, target_backlog: int = DEFAULT_TARGET_BACKLOG) -> dict:
    """An async endpoint: target tracking on its queue per instance (down to 0 instances)."""
    return {
        **_policy(endpoint, "backlog", "TargetTrackingScaling"),
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": float(target_backlog),
            "CustomizedMetricSpecification": {
                "MetricName": "ApproximateBacklogSizePerInstance",
                "Namespace": "AWS/SageMaker",
                "Dimensions": [{"Name": "EndpointName", "Value": endpoint}],
                "Statistic": "Average",
            },
            "ScaleOutCooldown": SCALE_OUT_COOLDOWN_S,
            "ScaleInCooldown": SCALE_IN_COOLDOWN_S,
        },
    }


def scale_from_zero_policy_request(*, endpoint: str) -> dict:
    """At 0 instances there is no per-instance backlog to track: one instance is added when
    requests wait with none to take them (the alarm below)."""
    return {
        **_policy(endpoint, "from-zero", "StepScaling"),
        "StepScalingPolicyConfiguration": {
            "AdjustmentType": "ChangeInCapacity",
            "MetricAggregationType": "Average",
            "Cooldown": SCALE_OUT_COOLDOWN_S,
            "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
        },
    }


def backlog_alarm_name(endpoint: str) -> str:
    return f"imgclf-{endpoint}-backlog-without-capacity"


def backlog_alarm_request(*, endpoint: str, policy_arn: str) -> dict:
    """CloudWatch PutMetricAlarm: HasBacklogWithoutCapacity >= 1 for a minute → the step policy."""
    return {
        "AlarmName": backlog_alarm_name(endpoint),
        "AlarmDescription": f"imgclf: requests wait on {endpoint} with no instance to take them",
        "MetricName": "HasBacklogWithoutCapacity",
        "Namespace": "AWS/SageMaker",
        "Dimensions": [{"Name": "EndpointName", "Value": endpoint}],
        "Statistic": "Average",
        "Period": 60,
        "EvaluationPeriods": 1,
        "Threshold": 1.0,
        "ComparisonOperator": "GreaterThanOrEqualToThreshold",
        "TreatMissingData": "missing",
        "AlarmActions": [policy_arn],
    }


DEFAULT_TRANSFORM_INSTANCE = "ml.g5.xlarge"
TRANSFORM_MB_IN_FLIGHT = 100  # MaxConcurrentTransforms x MaxPayloadInMB, at most


def check_in_flight(max_concurrent: int | None, max_payload_mb: int) -> None:
    """SageMaker refuses MaxConcurrentTransforms x MaxPayloadInMB over 100."""
    if max_concurrent and max_concurrent * max_payload_mb > TRANSFORM_MB_IN_FLIGHT:
        raise UserError(
            f"--concurrency {max_concurrent} x --max-payload-mb {max_payload_mb} is over the "
            f"{TRANSFORM_MB_IN_FLIGHT} MB SageMaker allows in flight per instance; lower one "
            "(or leave --concurrency out: the container says what it takes)"
        )


def transform_job_request(
    *,
    job_name: str,
    model_name: str,
    input_s3: str,
    output_s3: str,
    manifest: bool = False,
    max_payload_mb: int = 6,
    max_concurrent: int | None = None,
    timeout_s: int = 600,
    retries: int = 3,
    accept: str = "application/json",
    environment: dict[str, str] | None = None,
    instance_type: str = DEFAULT_TRANSFORM_INSTANCE,
    instance_count: int = 1,
) -> dict:
    """The CreateTransformJob request body: every object under `input_s3` (or listed in the
    manifest file at `input_s3`) sent whole as one request (SplitType None, one image a
    record), its answer written to `<output_s3>/<key relative to the input>.out`. Without
    `max_concurrent`, SageMaker asks the container's GET /execution-parameters. The
    container's batch settings travel in Environment as well as being set by SageMaker, so
    the placeholder answers (a bad image does not fail the job) never depend on the platform
    setting them."""
    from imgclf.contract import SERVE_BATCH_ENV, SERVE_MAX_PAYLOAD_ENV

    check_in_flight(max_concurrent, max_payload_mb)
    request: dict[str, Any] = {
        "TransformJobName": job_name,
        "ModelName": model_name,
        "BatchStrategy": "SingleRecord",
        "MaxPayloadInMB": max_payload_mb,
        "ModelClientConfig": {
            "InvocationsTimeoutInSeconds": timeout_s,
            "InvocationsMaxRetries": retries,
        },
        "Environment": {
            SERVE_BATCH_ENV: "true",
            SERVE_MAX_PAYLOAD_ENV: str(max_payload_mb),
            **(environment or {}),
        },
        "TransformInput": {
            "DataSource": {
                "S3DataSource": {
                    "S3DataType": "ManifestFile" if manifest else "S3Prefix",
                    "S3Uri": input_s3,
                }
            },
            "ContentType": "application/x-image",
            "CompressionType": "None",
            "SplitType": "None",
        },
        "TransformOutput": {"S3OutputPath": output_s3, "Accept": accept, "AssembleWith": "None"},
        "TransformResources": {"InstanceType": instance_type, "InstanceCount": instance_count},
        "Tags": [{"Key": TAG_KEY, "Value": "transform"}],
    }
    if max_concurrent:
        request["MaxConcurrentTransforms"] = max_concurrent
    return request


def transform_manifest(prefix: str, keys: list[str]) -> str:
    """A manifest file (S3DataType ManifestFile): the files still to send, each relative to
    the input prefix, so their outputs keep the names a whole-prefix job gives them."""
    return json.dumps([{"prefix": prefix.rstrip("/") + "/"}, *keys])
