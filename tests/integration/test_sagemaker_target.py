"""`--target sagemaker` through real boto3 clients against moto's server on 127.0.0.1: what each
verb sends to AWS, read back from the server and from its request recording."""

import base64
import csv
import json
import shutil
import time

import pytest

from imgclf.metrics import metric_definitions
from tests.conftest import hp_args, run_launch

ROLE = "arn:aws:iam::123456789012:role/imgclf-sagemaker"
TRAIN_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/imgclf-train:abc123"
SERVE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/imgclf-serve:abc123"
BUCKET = "sagemaker-us-east-1-123456789012"  # the default: sagemaker-REGION-ACCOUNT


def launch(aws, home, *args):
    proc = run_launch(*args, home=home, env=aws.env(), timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def remember_images(home):
    """What build_and_push.sh leaves behind: the default --image of each kind."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "images.json").write_text(json.dumps({"train": TRAIN_IMAGE, "serve": SERVE_IMAGE}))


def data_puts(aws):
    return [
        r
        for r in aws.requests()
        if r["method"] == "PUT"
        and "/imgclf/data/" in r["url"]
        and "x-id=CreateBucket" not in r["url"]
    ]


def test_train_uploads_once_and_creates_the_job_it_was_asked_for(aws, tmp_path, tiny_digits):
    home = tmp_path / "home"
    remember_images(home)
    job = "digits-sm-1"
    logs = aws.client("logs")
    now_ms = int(time.time() * 1000)
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    logs.create_log_stream(
        logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=f"{job}/algo-1-1700000000"
    )
    logs.put_log_events(
        logGroupName="/aws/sagemaker/TrainingJobs",
        logStreamName=f"{job}/algo-1-1700000000",
        logEvents=[{"timestamp": now_ms, "message": "#metrics epoch=1 valid_loss=0.5"}],
    )
    hps = {"arch": "resnet18", "epochs": "3", "lr": "0.003", "hflip": "false"}
    args = ["train", "--target", "sagemaker", "--data", str(tiny_digits), "--role", ROLE]
    first = ok(launch(aws, home, *args, "--job-name", job, *hp_args(hps), "--sagemaker-debugger"))
    files = sorted(p for p in tiny_digits.rglob("*") if p.is_file())
    assert f"{len(files)} files uploaded" in first.stdout
    assert "[algo-1] #metrics epoch=1 valid_loss=0.5" in first.stdout  # the CloudWatch log
    assert "Completed" in first.stdout

    s3 = aws.client("s3")
    keys = {
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    }
    name = tiny_digits.name
    assert {f"imgclf/data/{name}/{p.relative_to(tiny_digits).as_posix()}" for p in files} <= keys

    desc = aws.client("sagemaker").describe_training_job(TrainingJobName=job)
    spec = desc["AlgorithmSpecification"]
    assert spec["TrainingImage"] == TRAIN_IMAGE
    # As the SageMaker SDK sends them: strings holding JSON.
    assert desc["HyperParameters"] == {k: json.dumps(v) for k, v in hps.items()}
    channel = desc["InputDataConfig"][0]
    assert channel["ChannelName"] == "training"
    assert channel["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{BUCKET}/imgclf/data/{name}/"
    assert desc["CheckpointConfig"] == {
        "S3Uri": f"s3://{BUCKET}/imgclf/checkpoints/{job}",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert desc["RoleArn"] == ROLE
    assert desc["EnableNetworkIsolation"] is True
    assert desc["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/imgclf/jobs"

    # What reached the server, including what moto does not keep (ProfilerConfig).
    (create,) = aws.requests("SageMaker.CreateTrainingJob")
    body = create["json"]
    assert body["AlgorithmSpecification"]["MetricDefinitions"] == metric_definitions()
    assert body["DebugHookConfig"]["S3OutputPath"].startswith(f"s3://{BUCKET}/")
    rules = {r["RuleParameters"]["rule_to_invoke"] for r in body["DebugRuleConfigurations"]}
    assert {"LossNotDecreasing", "Overfit", "VanishingGradient", "ExplodingTensor"} <= rules
    assert all(
        r["RuleEvaluatorImage"].startswith("503895931360.dkr.ecr.us-east-1.amazonaws.com/")
        for r in body["DebugRuleConfigurations"]
    )
    assert body["ProfilerConfig"]["ProfilingIntervalInMilliseconds"] == 500
    assert body["ProfilerRuleConfigurations"][0]["RuleParameters"] == {
        "rule_to_invoke": "ProfilerReport"
    }
    assert body["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"

    # The same data again: nothing is sent, and without --sagemaker-debugger none of it is.
    aws.recording.write_text("")
    again = ok(launch(aws, home, *args, "--job-name", "digits-sm-2", "--instance-count", "2"))
    assert "0 files uploaded" in again.stdout and f"{len(files)} unchanged" in again.stdout
    assert data_puts(aws) == []
    (create,) = aws.requests("SageMaker.CreateTrainingJob")
    body = create["json"]
    assert not {"DebugHookConfig", "DebugRuleConfigurations", "ProfilerConfig"} & set(body)
    assert body["ResourceConfig"]["InstanceCount"] == 2
    assert json.loads(body["HyperParameters"]["sagemaker_torch_distributed_enabled"]) == "true"


def test_a_changed_file_is_the_only_one_sent_again(aws, tmp_path, tiny_digits):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    home = tmp_path / "home"
    remember_images(home)
    args = ["train", "--target", "sagemaker", "--data", str(data), "--role", ROLE, "--no-wait"]
    ok(launch(aws, home, *args, "--job-name", "a"))
    changed = sorted(data.rglob("*.png"))[0]
    changed.write_bytes(changed.read_bytes() + b"\0")  # same image, one byte longer
    aws.recording.write_text("")
    second = ok(launch(aws, home, *args, "--job-name", "b"))
    assert "1 files uploaded" in second.stdout
    (put,) = data_puts(aws)
    assert put["url"].endswith(changed.relative_to(data).as_posix())


def test_tune_sends_the_space_and_writes_best_json(aws, tmp_path, tiny_digits):
    from imgclf.tuning.space import load_space, sagemaker_parameter_ranges
    from tests.conftest import ROOT

    home = tmp_path / "home"
    remember_images(home)
    out = tmp_path / "tuning"
    proc = ok(
        launch(
            aws,
            home,
            "tune",
            "--target",
            "sagemaker",
            "--data",
            str(tiny_digits),
            "--space",
            str(ROOT / "tuning.yaml"),
            "--role",
            ROLE,
            "--job-name",
            "tune-digits",
            "--max-trials",
            "4",
            "--out",
            str(out),
            "--hp",
            "arch=resnet18",
        )
    )
    (create,) = aws.requests("SageMaker.CreateHyperParameterTuningJob")
    body = create["json"]
    config = body["HyperParameterTuningJobConfig"]
    assert config["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 4
    assert config["ParameterRanges"] == sagemaker_parameter_ranges(load_space(ROOT / "tuning.yaml"))
    assert config["HyperParameterTuningJobObjective"] == {
        "Type": "Minimize",
        "MetricName": "valid_loss",
    }
    assert config["TrainingJobEarlyStoppingType"] == "Auto"
    definition = body["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["TrainingImage"] == TRAIN_IMAGE
    assert definition["StaticHyperParameters"] == {"arch": json.dumps("resnet18")}
    best = json.loads((out / "best.json").read_text())
    # From DescribeHyperParameterTuningJob's BestTrainingJob (moto's canned one).
    desc = aws.client("sagemaker").describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName="tune-digits"
    )
    assert best["trial"] == desc["BestTrainingJob"]["TrainingJobName"]
    assert best["hyperparameters"]["arch"] == "resnet18"
    assert "best:" in proc.stdout


def _model_channel(body: dict) -> dict:
    (channel,) = [c for c in body["InputDataConfig"] if c["ChannelName"] == "model"]
    assert channel["ContentType"] == "application/x-sagemaker-model"
    return channel["DataSource"]["S3DataSource"]


def test_init_from_sends_the_model_channel_for_a_job_a_local_model_and_every_trial(
    aws, tmp_path, tiny_digits
):
    """`--init-from` a training job (its model.tar.gz), a local model dir (packed and
    uploaded) or s3://… (as given), in CreateTrainingJob and in the tuning job's definition."""
    import io
    import tarfile

    from tests.conftest import ROOT, random_model

    home = tmp_path / "home"
    remember_images(home)
    args = ["train", "--target", "sagemaker", "--data", str(tiny_digits), "--role", ROLE]
    ok(launch(aws, home, *args, "--job-name", "old-job"))
    old = aws.client("sagemaker").describe_training_job(TrainingJobName="old-job")
    aws.recording.write_text("")
    proc = ok(launch(aws, home, *args, "--job-name", "new-job", "--init-from", "old-job"))
    (create,) = aws.requests("SageMaker.CreateTrainingJob")
    source = _model_channel(create["json"])
    assert source["S3Uri"] == old["ModelArtifacts"]["S3ModelArtifacts"]
    assert f"starts from {source['S3Uri']} (channel model)" in proc.stdout
    desc = aws.client("sagemaker").describe_training_job(TrainingJobName="new-job")
    assert [c["ChannelName"] for c in desc["InputDataConfig"]] == ["training", "model"]

    model_dir = random_model(tmp_path / "mine" / "model", ["001.zero", "002.one"])
    aws.recording.write_text("")
    ok(launch(aws, home, *args, "--job-name", "from-dir", "--init-from", str(model_dir)))
    (create,) = aws.requests("SageMaker.CreateTrainingJob")
    key = "imgclf/init-models/from-dir/model.tar.gz"
    assert _model_channel(create["json"])["S3Uri"] == f"s3://{BUCKET}/{key}"
    body = aws.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert {"model.pt", "labels.json", "model_config.json"} <= set(tar.getnames())

    aws.recording.write_text("")
    uri = f"s3://{BUCKET}/{key}"
    ok(
        launch(
            aws,
            home,
            *["tune", "--target", "sagemaker", "--data", str(tiny_digits), "--role", ROLE],
            *["--space", str(ROOT / "tuning.yaml"), "--job-name", "tune-init", "--no-wait"],
            *["--hp", "arch=resnet18", "--init-from", uri],
        )
    )
    (create,) = aws.requests("SageMaker.CreateHyperParameterTuningJob")
    assert _model_channel(create["json"]["TrainingJobDefinition"])["S3Uri"] == uri


def test_deploy_invoke_list_and_delete_an_endpoint(aws, tmp_path, tiny_digits):
    home = tmp_path / "home"
    remember_images(home)
    ok(
        launch(
            aws,
            home,
            *["train", "--target", "sagemaker", "--data", str(tiny_digits), "--role", ROLE],
            *["--job-name", "for-deploy"],
        )
    )
    deployed = ok(
        launch(
            aws,
            home,
            *["deploy", "--target", "sagemaker", "--model", "for-deploy", "--name", "dogs"],
            *["--role", ROLE, "--instance-type", "ml.c5.xlarge", "--response-format", "vectors"],
        )
    )
    assert "InService" in deployed.stdout and "delete dogs" in deployed.stdout
    sm = aws.client("sagemaker")
    endpoint = sm.describe_endpoint(EndpointName="dogs")
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.c5.xlarge"
    model = sm.describe_model(ModelName=variant["ModelName"])
    job = sm.describe_training_job(TrainingJobName="for-deploy")
    assert model["PrimaryContainer"]["Image"] == SERVE_IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == job["ModelArtifacts"]["S3ModelArtifacts"]
    # the deploy's default answer travels as the serving contract's variable
    assert model["PrimaryContainer"]["Environment"] == {"IMGCLF_RESPONSE_FORMAT": "vectors"}

    listed = ok(launch(aws, home, "endpoints", "--target", "sagemaker"))
    assert "dogs" in listed.stdout and "1 x ml.c5.xlarge" in listed.stdout

    answers = [
        {"predictions": [{"label": "Affenpinscher", "probability": 0.875}]},
        {"predictions": [{"label": "Basenji", "probability": 0.5}]},
    ]
    aws.post(
        "/moto-api/static/sagemaker/endpoint-results",
        {"results": [{"Body": json.dumps(answers), "ContentType": "application/json"}]},
    )
    # moto's server cannot take a binary body (it decodes every body as UTF-8), so this sends
    # the JSON batch form; raw image bodies are tested against the local endpoint.
    images = sorted(tiny_digits.rglob("*.png"))[:2]
    invoked = ok(
        launch(
            aws,
            home,
            *["invoke", "--target", "sagemaker", "--endpoint", "dogs", "--batch"],
            *map(str, images),
        )
    )
    assert "Affenpinscher" in invoked.stdout and "0.8750" in invoked.stdout
    assert "Basenji" in invoked.stdout
    (call,) = [r for r in aws.requests() if "/endpoints/dogs/invocations" in r["url"]]
    sent = json.loads(call["body"])
    assert [base64.b64decode(i) for i in sent["instances"]] == [p.read_bytes() for p in images]
    headers = {k.lower(): v for k, v in call["headers"].items()}
    assert headers["content-type"] == "application/json"
    # The format the launcher prints, whatever the deploy's default (vectors here).
    assert headers["x-amzn-sagemaker-custom-attributes"] == "topk=3,format=predictions"

    deleted = ok(launch(aws, home, "delete", "dogs", "--target", "sagemaker"))
    assert "endpoint dogs" in deleted.stdout and "model" in deleted.stdout
    assert sm.list_endpoints()["Endpoints"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert sm.list_models()["Models"] == []


@pytest.mark.parametrize(
    ("env_change", "args", "expected"),
    [
        (
            {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
            ["--role", ROLE],
            "no AWS credentials",
        ),
        ({}, [], "no SageMaker execution role"),
        ({}, ["--role", "imgclf-role"], "is not an ARN"),
    ],
)
def test_aws_problems_are_one_clear_line(aws, tmp_path, tiny_digits, env_change, args, expected):
    home = tmp_path / "home"
    remember_images(home)
    env = aws.env()
    for key, value in env_change.items():
        env.pop(key) if value is None else env.__setitem__(key, value)
    env.pop("IMGCLF_SAGEMAKER_ROLE", None)
    proc = run_launch(
        *["train", "--target", "sagemaker", "--data", str(tiny_digits), *args],
        home=home,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and "testing" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_without_a_pushed_image_it_says_to_run_build_and_push(aws, tmp_path, tiny_digits):
    proc = launch(
        aws,
        tmp_path / "empty-home",
        *["train", "--target", "sagemaker", "--data", str(tiny_digits), "--role", ROLE],
    )
    assert proc.returncode == 2
    assert "build_and_push.sh train" in proc.stderr


def test_an_unknown_endpoint_is_a_clear_error(aws, tmp_path):
    proc = launch(aws, tmp_path, "delete", "nope", "--target", "sagemaker")
    assert proc.returncode == 2
    assert "nope" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_report_and_debug_of_a_sagemaker_job_download_its_output(aws, tmp_path, tiny_digits):
    import io
    import tarfile

    # A job trained the way the container trains with `debug=true` (what --target sagemaker
    # sends for --debug): its model/ and output/data/ are what SageMaker uploads as tarballs.
    local_home = tmp_path / "local"
    hps = {"arch": "resnet18", "pretrained": "false", "image_size": "16", "epochs": "1"}
    hps.update({"workers": "0", "batch_size": "32", "debug": "true"})
    trained = run_launch(
        "train", "--data", str(tiny_digits), "--job-name", "src", *hp_args(hps), home=local_home
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    job = local_home / "jobs" / "src"
    assert (job / "output/data/tensors").is_dir()

    home = tmp_path / "home"
    remember_images(home)
    args = ["train", "--target", "sagemaker", "--data", str(tiny_digits), "--role", ROLE]
    ok(launch(aws, home, *args, "--job-name", "remote", "--no-wait"))
    s3 = aws.client("s3")
    for name, folder in (("model.tar.gz", job / "model"), ("output.tar.gz", job / "output/data")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in sorted(folder.rglob("*")):
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
        s3.put_object(Bucket=BUCKET, Key=f"imgclf/jobs/remote/output/{name}", Body=buf.getvalue())

    report = ok(launch(aws, home, "report", "remote", "--target", "sagemaker"))
    path = home / "sagemaker" / "remote" / "output" / "data" / "report.html"
    assert str(path) in report.stdout
    metrics = json.loads((job / "model/metrics.json").read_text())
    assert f"{metrics['test_acc']:.4f}" in path.read_text()
    debug = launch(aws, home, "debug", "remote", "--target", "sagemaker")
    assert "rule ExplodingTensor: QUIET" in debug.stdout, debug.stdout + debug.stderr


def test_a_deploy_that_fails_midway_leaves_nothing_behind(aws, tmp_path):
    """The model is created, then the endpoint config is refused (serverless memory under
    SageMaker's 1024 MB minimum): the model is deleted again and the error is one line."""
    home = tmp_path / "home"
    remember_images(home)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"weights")
    proc = launch(
        aws,
        home,
        *["deploy", "--target", "sagemaker", "--model", str(model_dir), "--name", "half"],
        *["--role", ROLE, "--serverless-mb", "100"],
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "MemorySizeInMB" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "cleaned up: model half-" in proc.stdout
    sm = aws.client("sagemaker")
    assert sm.list_models()["Models"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert sm.list_endpoints()["Endpoints"] == []


# ---------------------------------------------------------------- issue 25: endpoints that live on


def model_folder(tmp_path, name="model"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"weights of " + name.encode())
    return folder


def scaling_of(aws, endpoint):
    scaling = aws.client("application-autoscaling")
    resource = f"endpoint/{endpoint}/variant/AllTraffic"
    targets = scaling.describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=[resource]
    )["ScalableTargets"]
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)[
        "ScalingPolicies"
    ]
    return targets, policies


def test_autoscaling_is_registered_listed_and_removed_with_the_endpoint(aws, tmp_path):
    home = tmp_path / "home"
    remember_images(home)
    deployed = ok(
        launch(
            aws,
            home,
            *["deploy", "--target", "sagemaker", "--model", str(model_folder(tmp_path))],
            *["--name", "dogs", "--role", ROLE, "--instance-type", "ml.c5.xlarge"],
            *["--min-instances", "2", "--max-instances", "5"],
        )
    )
    assert "autoscaling: 2 to 5 instances" in deployed.stdout
    assert "504 invocations a minute per instance" in deployed.stdout  # the measured default
    (target,), (policy,) = scaling_of(aws, "dogs")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 5)
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 504
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == (
        "SageMakerVariantInvocationsPerInstance"
    )
    sm = aws.client("sagemaker")
    config = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName="dogs")["EndpointConfigName"]
    )
    variant = config["ProductionVariants"][0]
    # Starts at the minimum; the startup timeouts are sized, not SageMaker's defaults (a folder
    # without an ONNX graph: 10x the cold start of a worker that exports it).
    assert variant["InitialInstanceCount"] == 2
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 240
    assert variant["ModelDataDownloadTimeoutInSeconds"] == 60

    listed = ok(launch(aws, home, "endpoints", "--target", "sagemaker"))
    assert "2 x ml.c5.xlarge (desired 2), scales 2-5" in listed.stdout
    assert variant["ModelName"] in listed.stdout

    deleted = ok(launch(aws, home, "delete", "dogs", "--target", "sagemaker"))
    assert "scalable target endpoint/dogs/variant/AllTraffic" in deleted.stdout
    assert scaling_of(aws, "dogs") == ([], [])
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []


def test_an_async_endpoint_scales_to_zero_and_invoke_async_reads_the_answer_from_s3(
    aws, tmp_path, tiny_digits
):
    home = tmp_path / "home"
    remember_images(home)
    ok(
        launch(
            aws,
            home,
            *["deploy", "--target", "sagemaker", "--model", str(model_folder(tmp_path))],
            *["--name", "big", "--role", ROLE, "--instance-type", "ml.c5.2xlarge"],
            *["--async-output", "s3://answers/big/", "--min-instances", "0"],
            *["--max-instances", "3", "--startup-timeout", "600"],
        )
    )
    sm = aws.client("sagemaker")
    endpoint = sm.describe_endpoint(EndpointName="big")
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    assert config["AsyncInferenceConfig"] == {
        # 2 workers on 8 vCPUs, 8 requests in each one's MMS batch: GET /execution-parameters.
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 16},
        "OutputConfig": {
            "S3OutputPath": "s3://answers/big",
            "S3FailurePath": "s3://answers/big/failures",
        },
    }
    variant = config["ProductionVariants"][0]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 600  # overridden
    assert variant["InitialInstanceCount"] == 1  # 0 is for the scaling, not the start
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["Environment"] == {"IMGCLF_ASYNC": "true"}
    (target,), policies = scaling_of(aws, "big")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 3)
    kinds = {p["PolicyName"]: p["PolicyType"] for p in policies}
    assert kinds == {"big-backlog": "TargetTrackingScaling", "big-from-zero": "StepScaling"}
    (alarm,) = aws.client("cloudwatch").describe_alarms()["MetricAlarms"]
    assert alarm["MetricName"] == "HasBacklogWithoutCapacity"
    from_zero = next(p for p in policies if p["PolicyName"] == "big-from-zero")
    assert alarm["AlarmActions"] == [from_zero["PolicyARN"]]

    # moto answers InvokeEndpointAsync from its queue and writes the answer into its own bucket.
    answers = [
        {"predictions": [{"label": "Basenji", "index": 1, "probability": 0.625}]},
        {"predictions": [{"label": "Affenpinscher", "index": 0, "probability": 0.5}]},
    ]
    aws.post(
        "/moto-api/static/sagemaker/async-endpoint-results",
        {"results": [{"data": json.dumps(answers)}]},
    )
    images = sorted(tiny_digits.rglob("*.png"))[:2]
    invoked = ok(
        launch(
            aws,
            home,
            *["invoke", "--target", "sagemaker", "--endpoint", "big", "--async", "--batch"],
            *map(str, images),
        )
    )
    assert "Basenji" in invoked.stdout and "0.6250" in invoked.stdout
    assert "Affenpinscher" in invoked.stdout
    (call,) = [r for r in aws.requests() if "/endpoints/big/async-invocations" in r["url"]]
    headers = {k.lower(): v for k, v in call["headers"].items()}
    source = headers["x-amzn-sagemaker-inputlocation"]
    assert source.startswith(f"s3://{BUCKET}/imgclf/async-input/big/")
    (upload,) = [r for r in aws.requests() if r["method"] == "PUT" and "async-input" in r["url"]]
    sent = json.loads(upload["body"])
    assert [base64.b64decode(i) for i in sent["instances"]] == [p.read_bytes() for p in images]
    s3 = aws.client("s3")
    left = s3.list_objects_v2(Bucket=BUCKET, Prefix="imgclf/async-input/").get("KeyCount")
    assert left == 0  # the input is removed once answered

    aws.post(
        "/moto-api/static/sagemaker/async-endpoint-results",
        {"results": [{"is_failure": True, "data": json.dumps({"error": "bad", "hint": "fix"})}]},
    )
    failed = launch(
        aws,
        home,
        *["invoke", "--target", "sagemaker", "--endpoint", "big", "--async", "--batch"],
        *map(str, images[:1]),
    )
    assert failed.returncode == 1 and "error: bad (fix)" in failed.stdout
    queued = ok(
        launch(
            aws,
            home,
            *["invoke", "--target", "sagemaker", "--endpoint", "big", "--async", "--no-wait"],
            str(images[0]),
        )
    )
    assert "answer: s3://" in queued.stdout and "failure: s3://" in queued.stdout

    deleted = ok(launch(aws, home, "delete", "big", "--target", "sagemaker"))
    assert "alarm imgclf-big-backlog-without-capacity" in deleted.stdout
    assert scaling_of(aws, "big") == ([], [])
    assert aws.client("cloudwatch").describe_alarms()["MetricAlarms"] == []


def test_sagemaker_only_settings_are_refused_clearly(aws, tmp_path):
    home = tmp_path / "home"
    remember_images(home)
    cases = [
        (["--min-instances", "0", "--max-instances", "2"], "only an asynchronous endpoint"),
        (["--min-instances", "1"], "needs both --min-instances and --max-instances"),
        (["--rollout", "canary:10:5"], "there is no endpoint new yet"),
        (["--async-output", "answers"], "s3://BUCKET/PREFIX"),
        (["--min-instances", "3", "--max-instances", "2"], "need 0 <= min <= max"),
    ]
    for args, says in cases:
        proc = launch(
            aws,
            home,
            *["deploy", "--target", "sagemaker", "--model", "s3://b/m/model.tar.gz"],
            *["--name", "new", "--role", ROLE, *args],
        )
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    sm = aws.client("sagemaker")
    assert sm.list_models()["Models"] == [] and sm.list_endpoint_configs()["EndpointConfigs"] == []
    local = launch(aws, home, "deploy", "--model", str(tmp_path), "--min-instances", "1")
    assert local.returncode == 2 and "add --target sagemaker" in local.stderr


# UpdateEndpoint is not in moto 5.2.5: in the tests below that one call is answered by the
# response SageMaker recorded for it (checked against botocore's service model), from a
# handler on the client's own before-call event; every other call reaches moto's server.
UPDATE_RESPONSE = {"EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/dogs"}


def _target(aws, monkeypatch, home, **options):
    from imgclf.targets.sagemaker import AwsOptions
    from imgclf.targets.sagemaker.target import SageMakerTarget

    for key in [k for k in __import__("os").environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in aws.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return SageMakerTarget(AwsOptions(role=ROLE, home=home, poll_s=0.05, **options))


def _answer_update_endpoint(target, aws, *, takes_effect: bool):
    """Answer UpdateEndpoint with the recorded response; with `takes_effect`, the endpoint is
    then moved to the new config on moto's server (CreateEndpoint over the same name is how
    moto replaces one), as SageMaker's finished blue/green deployment leaves it."""
    import botocore.session
    from botocore.awsrequest import AWSResponse
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("UpdateEndpoint").output_shape
    report = ParamValidator().validate(UPDATE_RESPONSE, shape)
    assert not report.has_errors(), report.generate_report()
    sent = []

    def answer(params, **_):
        body = json.loads(params["body"])
        sent.append(body)
        if takes_effect:
            aws.client("sagemaker").create_endpoint(
                EndpointName=body["EndpointName"], EndpointConfigName=body["EndpointConfigName"]
            )
        return AWSResponse(params["url"], 200, {}, None), dict(UPDATE_RESPONSE)

    target.c.sagemaker.meta.events.register("before-call.sagemaker.UpdateEndpoint", answer)
    return sent


def _deploy(target, model, **kw):
    from imgclf.targets.base import DeployRequest

    return target.deploy(DeployRequest(str(model), "dogs", **kw))


def test_deploy_to_a_running_endpoint_updates_it_and_removes_the_old_model(
    aws, tmp_path, monkeypatch, capsys
):
    home = tmp_path / "home"
    remember_images(home)
    target = _target(aws, monkeypatch, home, instance_type="ml.c5.xlarge")
    sent = _answer_update_endpoint(target, aws, takes_effect=True)
    _deploy(target, model_folder(tmp_path, "old"), min_instances=1, max_instances=4)
    sm = aws.client("sagemaker")
    (old_model,) = [m["ModelName"] for m in sm.list_models()["Models"]]
    assert sent == []  # a new endpoint is CreateEndpoint

    info = _deploy(
        target,
        model_folder(tmp_path, "new"),
        rollout="canary:10:5",
        rollback_alarms=("dogs-5xx", "dogs-latency"),
    )
    out = capsys.readouterr().out
    (update,) = sent
    assert update["EndpointName"] == "dogs"
    new_config = update["EndpointConfigName"]
    policy = update["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"]["CanarySize"] == {
        "Type": "CAPACITY_PERCENT",
        "Value": 10,
    }
    assert update["DeploymentConfig"]["AutoRollbackConfiguration"] == {
        "Alarms": [{"AlarmName": "dogs-5xx"}, {"AlarmName": "dogs-latency"}]
    }
    assert info.state == "InService" and f"now serves {new_config}" in out
    endpoint = sm.describe_endpoint(EndpointName="dogs")
    assert endpoint["EndpointConfigName"] == new_config
    # The old config and model are gone; only the new ones are left.
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == [new_config]
    configs = [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]]
    assert configs == [new_config] and f"removed model {old_model}" in out
    # The scaling registered with the first deploy stays (same instance type).
    (scaled,), _ = scaling_of(aws, "dogs")
    assert (scaled["MinCapacity"], scaled["MaxCapacity"]) == (1, 4)

    # Another instance type while autoscaling is registered: SageMaker would refuse the update;
    # the deploy refuses first, before anything is made, and says how.
    other = _target(aws, monkeypatch, home, instance_type="ml.c5.2xlarge")
    sent_other = _answer_update_endpoint(other, aws, takes_effect=True)
    with pytest.raises(Exception, match="pass --min-instances and --max-instances"):
        _deploy(other, model_folder(tmp_path, "bigger"))
    assert sent_other == [] and len(sm.list_models()["Models"]) == 1
    _deploy(other, model_folder(tmp_path, "bigger2"), min_instances=2, max_instances=6)
    out = capsys.readouterr().out
    assert "scalable target endpoint/dogs/variant/AllTraffic" in out  # removed for the update
    (scaled,), _ = scaling_of(aws, "dogs")
    assert (scaled["MinCapacity"], scaled["MaxCapacity"]) == (2, 6)  # and registered again


def test_an_update_that_rolls_back_leaves_the_old_model_serving(aws, tmp_path, monkeypatch, capsys):
    from imgclf.errors import UserError

    home = tmp_path / "home"
    remember_images(home)
    target = _target(aws, monkeypatch, home, instance_type="ml.c5.xlarge")
    sent = _answer_update_endpoint(target, aws, takes_effect=False)
    _deploy(target, model_folder(tmp_path, "old"))
    sm = aws.client("sagemaker")
    before = sm.describe_endpoint(EndpointName="dogs")["EndpointConfigName"]
    with pytest.raises(UserError, match="rolled back") as err:
        _deploy(target, model_folder(tmp_path, "new"), rollback_alarms=("dogs-5xx",))
    assert f"{before} still serves" in str(err.value)
    assert len(sent) == 1
    assert sm.describe_endpoint(EndpointName="dogs")["EndpointConfigName"] == before
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == [before]
    configs = [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]]
    assert configs == [before]


def test_transform_uploads_creates_the_job_downloads_answers_and_resumes(
    aws, tmp_path, tiny_digits
):
    """moto completes a transform job at once and runs no container, so the answers the
    container would write are put under the output prefix by the test (in the serving
    program's format) between the two runs."""
    from tests.conftest import random_model

    home = tmp_path / "home"
    remember_images(home)
    classes = sorted(p.name for p in (tiny_digits / "train").iterdir())
    model = random_model(tmp_path / "model", classes)
    source = tmp_path / "photos"
    for cls in classes[:2]:
        shutil.copytree(tiny_digits / "test" / cls, source / "shelter" / cls)
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*.png"))
    out_uri = f"s3://{BUCKET}/transform-out/"
    args = ["transform", "--target", "sagemaker", "--model", str(model), "--role", ROLE]
    args += ["--input", str(source), "--output", out_uri, "--instance-count", "2"]
    args += ["--instance-type", "ml.c5.xlarge", "--max-payload-mb", "12", "--job-name", "tx-1"]
    logs = aws.client("logs")
    group, stream = "/aws/sagemaker/TransformJobs", "tx-1/i-0abc123-1700000000"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName=stream)
    logs.put_log_events(
        logGroupName=group,
        logStreamName=stream,
        logEvents=[{"timestamp": int(time.time() * 1000), "message": "serve: endpoint ready"}],
    )

    first = launch(aws, home, *args)
    assert first.returncode == 1, first.stdout + first.stderr  # the job wrote nothing (moto)
    assert f"{len(files)} files uploaded" in first.stdout
    assert "transform job tx-1: Completed" in first.stdout
    assert "[i-0abc123] serve: endpoint ready" in first.stdout  # its CloudWatch log
    s3 = aws.client("s3")

    def sent(request):
        """The job's body, and the files its manifest lists (relative to its prefix)."""
        body = request["json"]
        source_s3 = body["TransformInput"]["DataSource"]["S3DataSource"]
        assert source_s3["S3DataType"] == "ManifestFile"  # exactly these files
        bucket, key = source_s3["S3Uri"][5:].split("/", 1)
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        return body, manifest[0]["prefix"], manifest[1:]

    [created] = aws.requests("SageMaker.CreateTransformJob")
    body, prefix, listed = sent(created)
    assert prefix.startswith(f"s3://{BUCKET}/imgclf/transform-input/photos-")
    assert listed == files
    uploaded = {
        o["Key"]
        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix[len(f"s3://{BUCKET}/") :])[
            "Contents"
        ]
    }
    assert len(uploaded) == len(files)
    assert body["TransformInput"]["ContentType"] == "application/x-image"
    assert body["TransformInput"]["SplitType"] == "None"
    assert body["BatchStrategy"] == "SingleRecord" and body["MaxPayloadInMB"] == 12
    assert "MaxConcurrentTransforms" not in body  # SageMaker asks the container
    assert body["Environment"] == {"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "12"}
    assert body["TransformResources"] == {"InstanceType": "ml.c5.xlarge", "InstanceCount": 2}
    assert body["TransformOutput"]["S3OutputPath"] == out_uri
    assert body["ModelClientConfig"] == {
        "InvocationsTimeoutInSeconds": 600,
        "InvocationsMaxRetries": 3,
    }
    [model_made] = aws.requests("SageMaker.CreateModel")
    assert model_made["json"]["PrimaryContainer"]["Image"] == SERVE_IMAGE
    sm = aws.client("sagemaker")
    with pytest.raises(sm.exceptions.ClientError):  # the job's model is removed after it
        sm.describe_model(ModelName="tx-1")
    local = home / "sagemaker" / "transform" / BUCKET / "transform-out"
    assert "no answer: transform job tx-1 Completed" in (local / "predictions.csv").read_text()

    # What the serving container answers for three files, as SageMaker stores them: two named
    # as the input's relative path, one with a folder in front (its documentation's example).
    answered = files[:3]
    keys = [f"transform-out/{answered[0]}.out", f"transform-out/{answered[1]}.out"]
    keys.append(f"transform-out/photos/{answered[2]}.out")
    for n, key in enumerate(keys):
        answer = {"predictions": [{"label": f"l{n}", "index": n, "probability": 0.5}]}
        s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(answer))
    aws.recording.write_text("")
    second = launch(aws, home, *args)  # the same command
    assert "0 files uploaded" in second.stdout  # the input is already there
    [created] = aws.requests("SageMaker.CreateTransformJob")
    assert created["json"]["TransformJobName"] == "tx-1-2"  # a job name is used once
    _, _, listed = sent(created)
    assert listed == files[3:]  # only the files still without an answer
    with (local / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == files
    assert [r["label"] for r in rows[:3]] == ["l0", "l1", "l2"]
    assert all(r["error"].startswith("no answer: transform job tx-1-2") for r in rows[3:])
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*.out")) == [
        f + ".out" for f in answered
    ]
    last = second.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{len(files)} images: 3 classified, {len(files) - 3} failed")


def test_transform_refuses_an_output_inside_its_input_before_uploading(aws, tmp_path):
    home = tmp_path / "home"
    remember_images(home)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    args = ["transform", "--target", "sagemaker", "--model", "job", "--role", ROLE]
    inside = launch(
        aws, home, *args, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "in" / "out")
    )
    assert inside.returncode == 2 and "overlap" in inside.stderr
    s3_overlap = launch(
        aws, home, *args, "--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/in/out/"
    )
    assert s3_overlap.returncode == 2 and "overlap" in s3_overlap.stderr
    too_much = launch(
        aws, home, *args, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
        "--concurrency", "8", "--max-payload-mb", "20",
    )  # fmt: skip
    assert too_much.returncode == 2 and "100 MB" in too_much.stderr
    assert not aws.requests("SageMaker.CreateModel")
    assert not [r for r in aws.requests() if r["method"] == "PUT" and "/in/" in r["url"]]
