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


DEFAULT_TRANSFORM_INSTANCE = "ml.g5.xlarge"


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
