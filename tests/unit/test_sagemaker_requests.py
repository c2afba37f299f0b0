"""The sagemaker target's request bodies, checked by botocore's own validator against the real
SageMaker service model, and the S3 ETag the uploader compares with."""

import hashlib
import json

import botocore.session
import pytest
from botocore.validate import ParamValidator

from imgclf.contract import TORCH_DISTRIBUTED_KEY
from imgclf.errors import UserError
from imgclf.metrics import metric_definitions
from imgclf.targets import sagemaker as sm
from imgclf.targets.sagemaker import requests as rq
from imgclf.targets.sagemaker import s3 as sm_s3
from imgclf.targets.sagemaker import training_definition
from imgclf.targets.sagemaker.requests import tuning_job_request
from imgclf.tuning import space as sp

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/imgclf-train:abc"


def validate(operation: str, request: dict) -> None:
    model = botocore.session.get_session().get_service_model("sagemaker")
    report = ParamValidator().validate(request, model.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()


def training(**kw):
    args = {
        "job_name": "imgclf-20261122-120000",
        "image": IMAGE,
        "role_arn": ROLE,
        "hyperparameters": {"arch": "resnet50", "lr": "0.001", "pretrained": "true"},
        "train_s3": "s3://b/imgclf/data/dogImages/",
        "output_s3": "s3://b/imgclf/jobs",
        "checkpoint_s3": "s3://b/imgclf/checkpoints/imgclf-20261122-120000",
        "region": "eu-west-1",
    }
    return sm.training_job_request(**{**args, **kw})


@pytest.mark.parametrize(
    "extra",
    [{}, {"spot": True}, {"instance_count": 4}, {"sagemaker_debugger": True}],
    ids=["plain", "spot", "distributed", "debugger"],
)
def test_training_request_passes_botocores_validation(extra):
    request = training(**extra)
    validate("CreateTrainingJob", request)
    # Every hyperparameter is a string holding JSON, as the SageMaker SDK sends them.
    assert all(isinstance(v, str) for v in request["HyperParameters"].values())
    assert {k: json.loads(v) for k, v in request["HyperParameters"].items()}["lr"] == "0.001"
    if extra.get("spot"):
        stop = request["StoppingCondition"]
        assert request["EnableManagedSpotTraining"] is True
        assert stop["MaxWaitTimeInSeconds"] >= stop["MaxRuntimeInSeconds"]
    if extra.get("instance_count"):
        assert json.loads(request["HyperParameters"][TORCH_DISTRIBUTED_KEY]) == "true"
    else:
        assert TORCH_DISTRIBUTED_KEY not in request["HyperParameters"]
    if extra.get("sagemaker_debugger"):
        images = {r["RuleEvaluatorImage"] for r in request["DebugRuleConfigurations"]}
        assert images == {
            "929884845733.dkr.ecr.eu-west-1.amazonaws.com/sagemaker-debugger-rules:latest"
        }
    else:
        assert "DebugHookConfig" not in request and "ProfilerConfig" not in request


def test_init_from_is_a_model_channel_in_the_job_and_in_every_tuning_trial():
    """As SageMaker's built-in algorithms take a model for incremental training: a channel
    named `model`, content type application/x-sagemaker-model, the tar downloaded whole."""
    from imgclf.tuning.space import load_space
    from tests.unit.test_space import ROOT_SPACE

    model_s3 = "s3://b/imgclf/jobs/old-job/output/model.tar.gz"
    request = training(model_s3=model_s3)
    validate("CreateTrainingJob", request)
    training_channel, model = request["InputDataConfig"]
    assert training_channel["ChannelName"] == "training"
    assert model == {
        "ChannelName": "model",
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": model_s3,
                "S3DataDistributionType": "FullyReplicated",
            }
        },
        "ContentType": "application/x-sagemaker-model",
        "CompressionType": "None",
        "InputMode": "File",
    }
    assert [c["ChannelName"] for c in training()["InputDataConfig"]] == ["training"]
    space = load_space(ROOT_SPACE, fixed={"arch": "resnet18"})
    definition = sm.training_definition(
        image=IMAGE,
        role_arn=ROLE,
        hyperparameters=dict(space.static),
        train_s3="s3://b/d/",
        output_s3="s3://b/o",
        model_s3=model_s3,
    )
    tuning = tuning_job_request(space, job_name="t", training_definition=definition)
    validate("CreateHyperParameterTuningJob", tuning)
    assert tuning["TrainingJobDefinition"]["InputDataConfig"][1] == model
    with pytest.raises(UserError, match="s3://BUCKET/KEY"):
        rq.model_channel("old-job")


def test_debugger_in_a_region_without_rule_images_is_a_clear_error():
    with pytest.raises(UserError, match="not published in mars-1"):
        training(region="mars-1", sagemaker_debugger=True)


@pytest.mark.parametrize("serverless", [None, 2048])
def test_model_and_endpoint_config_requests_pass_validation(serverless):
    environment = {"IMGCLF_RESPONSE_FORMAT": "vectors"} if serverless else None
    model = sm.model_request(
        name="dogs-1",
        image=IMAGE,
        model_s3="s3://b/m/model.tar.gz",
        role_arn=ROLE,
        environment=environment,
    )
    validate("CreateModel", model)
    assert model["PrimaryContainer"].get("Environment") == environment
    config = sm.endpoint_config_request(
        name="dogs-1", model_name="dogs-1", serverless_memory_mb=serverless
    )
    validate("CreateEndpointConfig", config)
    variant = config["ProductionVariants"][0]
    assert ("ServerlessConfig" in variant) == bool(serverless)
    assert ("InstanceType" in variant) != bool(serverless)


def test_s3_etag_single_and_multipart(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    assert sm_s3.s3_etag(small) == hashlib.md5(b"x" * 1000).hexdigest()
    big = tmp_path / "big.bin"
    data = bytes(range(256)) * 40  # 10240 bytes, 3 parts of 4096
    big.write_bytes(data)
    parts = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    joined = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert sm_s3.s3_etag(big, part_size=4096) == f"{joined}-3"


def test_best_json_from_a_tuning_job_decodes_sdk_style_values():
    desc = {
        "HyperParameterTuningJobName": "t",
        "HyperParameterTuningJobConfig": {
            "HyperParameterTuningJobObjective": {"Type": "Minimize", "MetricName": "valid_loss"}
        },
        "TrainingJobDefinition": {
            "StaticHyperParameters": {
                "arch": '"resnet50"',
                "sagemaker_region": '"eu-west-1"',
                "_tuning_objective_metric": "valid_loss",
            }
        },
        "BestTrainingJob": {
            "TrainingJobName": "t-003-abc",
            "TunedHyperParameters": {"lr": "0.0031", "batch_size": '"32"'},
            "FinalHyperParameterTuningJobObjectiveMetric": {
                "MetricName": "valid_loss",
                "Value": 0.2,
            },
        },
    }
    best = sm.best_from_tuning(desc)
    assert best["hyperparameters"] == {"arch": "resnet50", "lr": "0.0031", "batch_size": "32"}
    assert best["objective"] == {"metric": "valid_loss", "type": "minimize", "value": 0.2}
    assert best["trial"] == "t-003-abc"


@pytest.mark.parametrize("instances", [1, 2])
def test_training_and_tuning_requests_carry_the_same_training_definition(instances):
    """One builder for both: a tuning trial is the very job `train --target sagemaker` runs
    (with 2 instances, one distributed job, not 2 single-process copies)."""
    from imgclf.targets.sagemaker.requests import tuning_job_request
    from imgclf.tuning.space import load_space
    from tests.unit.test_space import ROOT_SPACE

    space = load_space(ROOT_SPACE, fixed={"arch": "resnet50", "pretrained": "true"})
    common = {
        "image": IMAGE,
        "role_arn": ROLE,
        "train_s3": "s3://b/imgclf/data/dogImages/",
        "output_s3": "s3://b/imgclf/out",
        "instance_type": "ml.g5.2xlarge",
        "instance_count": instances,
        "max_runtime_s": 7200,
        "volume_gb": 80,
    }
    job = sm.training_job_request(
        job_name="j",
        checkpoint_s3="s3://b/c",
        region="eu-west-1",
        hyperparameters=dict(space.static),
        **common,
    )
    definition = sm.training_definition(hyperparameters=dict(space.static), **common)
    tuning = tuning_job_request(space, job_name="t", training_definition=definition)
    validate("CreateTrainingJob", job)
    validate("CreateHyperParameterTuningJob", tuning)
    trial = tuning["TrainingJobDefinition"]
    assert trial["StaticHyperParameters"] == job["HyperParameters"]
    for key in ("RoleArn", "InputDataConfig", "OutputDataConfig", "ResourceConfig"):
        assert trial[key] == job[key], key
    assert trial["EnableNetworkIsolation"] is job["EnableNetworkIsolation"] is True
    spec = {
        k: v
        for k, v in job["AlgorithmSpecification"].items()
        if k in trial["AlgorithmSpecification"]
    }
    assert spec == trial["AlgorithmSpecification"]
    assert trial["StoppingCondition"]["MaxRuntimeInSeconds"] == 7200
    distributed = TORCH_DISTRIBUTED_KEY in trial["StaticHyperParameters"]
    assert distributed == (instances > 1)
    assert trial["ResourceConfig"]["InstanceCount"] == instances


def test_an_html_error_page_becomes_one_short_line():
    from imgclf.targets.sagemaker.aws import one_line

    page = (
        "<html><head><style>body {color: red}</style><title>502</title></head>\n<body>\n"
        "<h1>Bad Gateway</h1>\n<p>The proxy   could not reach\n the server.</p>"
        + "<p>x</p>" * 200
        + "</body></html>"
    )
    line = one_line(page)
    assert "\n" not in line and "<" not in line and "color" not in line
    assert line.startswith("502 Bad Gateway The proxy could not reach the server.")
    assert len(line) <= 300 and line.endswith("...")
    assert one_line("ValidationException: plain text") == "ValidationException: plain text"


@pytest.mark.parametrize("strategy", ["bayesian", "random", "hyperband"])
def test_tuning_request_passes_botocores_own_validation(strategy):
    space = sp.load_space("tuning.yaml", fixed={"arch": "resnet50"})
    space = sp.TuningSpace(**{**space.__dict__, "strategy": strategy})
    definition = training_definition(
        image=IMAGE,
        role_arn=ROLE,
        hyperparameters=space.static,
        train_s3="s3://b/data/",
        output_s3="s3://b/out/",
    )
    request = tuning_job_request(space, job_name="imgclf-tune-1", training_definition=definition)
    validate("CreateHyperParameterTuningJob", request)
    config = request["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {
        "Type": "Minimize",
        "MetricName": "valid_loss",
    }
    assert (
        request["TrainingJobDefinition"]["AlgorithmSpecification"]["MetricDefinitions"]
        == metric_definitions()
    )
    expected = "Off" if strategy == "hyperband" else "Auto"
    assert config["TrainingJobEarlyStoppingType"] == expected


def test_a_broken_request_is_caught_by_the_same_validation():
    with pytest.raises(AssertionError):
        validate("CreateHyperParameterTuningJob", {"HyperParameterTuningJobName": 5})


# ---------------------------------------------------------------- issue 25: endpoints that live on


def validate_in(service: str, operation: str, request: dict) -> None:
    model = botocore.session.get_session().get_service_model(service)
    report = ParamValidator().validate(request, model.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()


@pytest.mark.parametrize(
    ("rollout", "alarms", "routing"),
    [
        ("all-at-once", (), {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}),
        (
            "canary:10:5",
            ("errors-high",),
            {
                "Type": "CANARY",
                "WaitIntervalInSeconds": 300,
                "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10},
            },
        ),
        (
            "linear:25:2",
            ("errors-high", "latency-high", "errors-high"),
            {
                "Type": "LINEAR",
                "WaitIntervalInSeconds": 120,
                "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25},
            },
        ),
    ],
)
def test_update_endpoint_requests_pass_validation(rollout, alarms, routing):
    request = rq.update_endpoint_request(
        name="dogs", config_name="dogs-2", rollout=rollout, rollback_alarms=alarms
    )
    validate("UpdateEndpoint", request)
    policy = request["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"] == routing
    # Long enough for every baking step (linear 25%: four of 2 minutes) and the new fleet.
    steps = {"ALL_AT_ONCE": 1, "CANARY": 2, "LINEAR": 4}[routing["Type"]]
    assert policy["MaximumExecutionTimeoutInSeconds"] >= steps * routing["WaitIntervalInSeconds"]
    rollback = request["DeploymentConfig"].get("AutoRollbackConfiguration")
    names = list(dict.fromkeys(alarms))  # a repeated name is sent once
    assert rollback == ({"Alarms": [{"AlarmName": a} for a in names]} if alarms else None)


@pytest.mark.parametrize(
    ("rollout", "says"),
    [
        ("blue-green", "use one of all-at-once, canary:PCT:MINUTES"),
        ("canary:10", "use one of"),
        ("canary:75:5", "a canary step is 1 to 50 percent"),
        ("linear:5:5", "a linear step is 10 to 50 percent"),
        ("linear:20:90", "1 to 60 minutes"),
        ("canary:x:5", "use one of"),
    ],
)
def test_a_bad_rollout_is_refused_naming_what_is_accepted(rollout, says):
    with pytest.raises(UserError, match=says):
        rq.update_endpoint_request(name="d", config_name="d-2", rollout=rollout)


def test_too_many_rollback_alarms_are_refused():
    with pytest.raises(UserError, match="at most 10 alarms"):
        rq.update_endpoint_request(
            name="d", config_name="d-2", rollback_alarms=[f"a{i}" for i in range(11)]
        )


def test_an_async_endpoint_config_with_startup_timeouts_passes_validation():
    health, download = rq.startup_timeouts(95 * 1024 * 1024)  # a ResNet-50's model.tar.gz
    # 10x the measured 19.8 s cold start without a graph, in whole minutes; a small model:
    # SageMaker's minimum. With its graph served, 10x 4.9 s: SageMaker's minimum.
    assert (health, download) == (240, 60)
    assert rq.startup_timeouts(95 * 1024 * 1024, graph=True) == (60, 60)
    assert rq.gpu_instance("ml.g5.xlarge") and not rq.gpu_instance("ml.m5.large")
    assert rq.startup_timeouts(3 * 1024**3)[1] == 360  # 3 GB at 10 MB/s: 307 s, in minutes
    assert rq.startup_timeouts(100 * 1024**3)[1] == 3600  # SageMaker's ceiling
    workers = rq.instance_workers("ml.c5.2xlarge")
    assert workers == 2 and rq.instance_workers("ml.g5.xlarge") == 1
    assert rq.instance_workers("ml.m5.large") == 1
    config = rq.endpoint_config_request(
        name="big-1",
        model_name="big-1",
        instance_type="ml.c5.2xlarge",
        startup_timeout_s=health,
        download_timeout_s=download,
        async_config=rq.async_inference_config(output_s3="s3://b/answers/", max_concurrent=16),
    )
    validate("CreateEndpointConfig", config)
    variant = config["ProductionVariants"][0]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 240
    assert variant["ModelDataDownloadTimeoutInSeconds"] == 60
    assert config["AsyncInferenceConfig"] == {
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 16},
        "OutputConfig": {
            "S3OutputPath": "s3://b/answers",
            "S3FailurePath": "s3://b/answers/failures",
        },
    }
    with pytest.raises(UserError, match="s3://BUCKET/PREFIX"):
        rq.async_inference_config(output_s3="answers/", max_concurrent=1)
    with pytest.raises(UserError, match="drop --serverless-mb"):
        rq.endpoint_config_request(
            name="x",
            model_name="x",
            serverless_memory_mb=2048,
            async_config=rq.async_inference_config(output_s3="s3://b/a", max_concurrent=1),
        )


def test_autoscaling_requests_pass_application_autoscalings_validation():
    target = rq.scalable_target_request(endpoint="dogs", min_instances=1, max_instances=4)
    validate_in("application-autoscaling", "RegisterScalableTarget", target)
    assert target["ResourceId"] == "endpoint/dogs/variant/AllTraffic"
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    policy = rq.invocations_policy_request(endpoint="dogs", target_invocations=600)
    validate_in("application-autoscaling", "PutScalingPolicy", policy)
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 600.0
    assert tracking["PredefinedMetricSpecification"] == {
        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
    }
    assert tracking["ScaleInCooldown"] > tracking["ScaleOutCooldown"]
    # The default target: half the measured 16.82 req/s a minute.
    assert rq.DEFAULT_TARGET_INVOCATIONS == 504
    for request in (
        rq.backlog_policy_request(endpoint="big"),
        rq.scale_from_zero_policy_request(endpoint="big"),
    ):
        validate_in("application-autoscaling", "PutScalingPolicy", request)
    alarm = rq.backlog_alarm_request(endpoint="big", policy_arn="arn:aws:autoscaling:x")
    validate_in("cloudwatch", "PutMetricAlarm", alarm)
    assert alarm["MetricName"] == "HasBacklogWithoutCapacity"
    for low, high in ((2, 1), (-1, 3), (0, 0)):
        with pytest.raises(UserError, match="need 0 <= min <= max"):
            rq.scalable_target_request(endpoint="d", min_instances=low, max_instances=high)
    with pytest.raises(UserError, match="--target-invocations 0"):
        rq.invocations_policy_request(endpoint="d", target_invocations=0)


def test_invoke_endpoint_async_request_shape_passes_validation():
    validate_in(
        "sagemaker-runtime",
        "InvokeEndpointAsync",
        {
            "EndpointName": "big",
            "InputLocation": "s3://b/imgclf/async-input/big/abc",
            "ContentType": "image/jpeg",
            "Accept": "application/json",
            "InvocationTimeoutSeconds": rq.ASYNC_TIMEOUT_S,
        },
    )


@pytest.mark.parametrize("manifest", [False, True])
def test_transform_job_request_passes_validation(manifest):
    from imgclf.targets.sagemaker.requests import transform_job_request, transform_manifest

    request = transform_job_request(
        job_name="transform-1",
        model_name="transform-1",
        input_s3="s3://b/manifests/t.manifest" if manifest else "s3://b/in/",
        output_s3="s3://b/out/",
        manifest=manifest,
        max_payload_mb=20,
        max_concurrent=5,
        accept="application/jsonlines",
        environment={"IMGCLF_RESPONSE_FORMAT": "vectors"},
        instance_count=3,
    )
    validate("CreateTransformJob", request)
    source = request["TransformInput"]["DataSource"]["S3DataSource"]
    assert source["S3DataType"] == ("ManifestFile" if manifest else "S3Prefix")
    assert request["TransformInput"]["SplitType"] == "None"  # a file is one request
    assert request["Environment"]["SAGEMAKER_BATCH"] == "true"  # placeholders, not failures
    assert request["Environment"]["SAGEMAKER_MAX_PAYLOAD_IN_MB"] == "20"
    assert json.loads(transform_manifest("s3://b/in", ["a/x.jpg"])) == [
        {"prefix": "s3://b/in/"},
        "a/x.jpg",
    ]


def test_transform_concurrency_times_payload_over_100_mb_is_refused_before_sending():
    from imgclf.targets.sagemaker.requests import transform_job_request

    with pytest.raises(UserError, match="over the 100 MB SageMaker allows"):
        transform_job_request(
            job_name="t", model_name="t", input_s3="s3://b/i/", output_s3="s3://b/o/",
            max_payload_mb=20, max_concurrent=8,
        )  # fmt: skip
