"""serve's settings (serving.settings): read once from the environment, bad values named."""

from pathlib import Path

import pytest

from imgclf import contract
from imgclf.serving import settings as serving_settings
from imgclf.serving.settings import SettingsError, read_settings


def test_settings_come_from_the_environment_and_bad_values_are_named():
    settings = read_settings(
        {
            "SAGEMAKER_BASE_DIR": "/opt/ml",
            "SAGEMAKER_MODEL_SERVER_TIMEOUT": "30",
            "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
            "IMGCLF_HEADER_TIMEOUT_SECONDS": "2.5",
            "IMGCLF_RESPONSE_FORMAT": "vectors",
        }
    )
    assert settings.model_dir == Path("/opt/ml/model") and settings.worker_count == 2
    assert settings.timeout_s == 30 and settings.limits.header_timeout_s == 2.5
    assert settings.response_format == "vectors"
    # Defaults are the dataclasses' own.
    assert read_settings({}) == serving_settings.Settings(model_dir=Path("/opt/ml/model"))
    with pytest.raises(SettingsError, match="SAGEMAKER_MODEL_SERVER_TIMEOUT"):
        read_settings({"SAGEMAKER_MODEL_SERVER_TIMEOUT": "sixty"})
    with pytest.raises(SettingsError, match="IMGCLF_RESPONSE_FORMAT"):
        read_settings({"IMGCLF_RESPONSE_FORMAT": "csv"})
    for bad in ("0", "-1", "x"):
        with pytest.raises(SettingsError, match="IMGCLF_BATCH_SIZE"):
            read_settings({"IMGCLF_BATCH_SIZE": bad})


def test_the_deploys_min_confidence():
    assert read_settings({}).min_confidence is None
    assert read_settings({"IMGCLF_MIN_CONFIDENCE": "auto"}).min_confidence == "auto"
    assert read_settings({"IMGCLF_MIN_CONFIDENCE": "0.7"}).min_confidence == 0.7
    assert read_settings({"IMGCLF_MIN_CONFIDENCE": "off"}).min_confidence is None
    with pytest.raises(SettingsError, match="IMGCLF_MIN_CONFIDENCE='70%'.*0 to 1"):
        read_settings({"IMGCLF_MIN_CONFIDENCE": "70%"})


@pytest.mark.parametrize(
    "env",
    [
        {"SAGEMAKER_PROGRAM": "inference.py"},
        {"SAGEMAKER_SUBMIT_DIRECTORY": "s3://bucket/sourcedir.tar.gz"},
        {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code"},
    ],
)
def test_an_sdk_entry_point_is_refused_with_how_to_deploy(env):
    """The SageMaker SDK sets these for PyTorchModel(entry_point=...): the user's code would
    never run here, so the start fails and says how to deploy an imgclf artifact."""
    with pytest.raises(SettingsError) as err:
        read_settings(env)
    text = str(err.value)
    assert all(f"{k}=" in text for k in env)
    assert "runs no user code" in text and "entry_point" in text and "launch.py deploy" in text


def test_sagemaker_names_are_the_inference_toolkits():
    """contract.py spells SageMaker's serving variables for the launcher (which must not need
    sagemaker-inference); they are the toolkit's own names."""
    from sagemaker_inference import parameters

    assert contract.SERVE_PORT_ENV == parameters.BIND_TO_PORT_ENV
    assert contract.SERVE_WORKERS_ENV == parameters.MODEL_SERVER_WORKERS_ENV
    assert contract.SERVE_TIMEOUT_ENV == parameters.MODEL_SERVER_TIMEOUT_ENV
    assert contract.SERVE_STARTUP_TIMEOUT_ENV == parameters.STARTUP_TIMEOUT_ENV
    assert contract.SERVE_PROGRAM_ENV == parameters.USER_PROGRAM_ENV
    assert contract.BASE_DIR_ENV == parameters.BASE_PATH_ENV
    assert contract.SERVE_MAX_PAYLOAD_ENV == parameters.MAX_REQUEST_SIZE


def test_a_batch_transform_takes_its_payload_limit_and_minutes_per_request():
    real_time = read_settings({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "50"})
    assert not real_time.batch and real_time.limits.max_body_bytes == 6 * 1024 * 1024
    assert real_time.timeout_s == 60
    batch = read_settings(
        {
            "SAGEMAKER_BATCH": "true",
            "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20",
            "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
        }
    )
    assert batch.batch and batch.limits.max_body_bytes == 20 * 1024 * 1024
    assert batch.timeout_s == 600 and batch.limits.body_timeout_s == 600
    assert batch.limits.linger_bytes > batch.limits.max_body_bytes
    assert batch.execution_parameters() == {
        "MaxConcurrentTransforms": 5,  # not 2 x 8: SageMaker takes at most 100 MB in flight
        "BatchStrategy": "SINGLE_RECORD",
        "MaxPayloadInMB": 20,
    }
    six = read_settings({"SAGEMAKER_BATCH": "true", "SAGEMAKER_MODEL_SERVER_WORKERS": "1"})
    assert six.execution_parameters()["MaxConcurrentTransforms"] == six.batch_size
    timed = read_settings({"SAGEMAKER_BATCH": "1", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "1800"})
    assert timed.timeout_s == 1800 and timed.max_payload_mb == 6
    with pytest.raises(SettingsError, match="SAGEMAKER_MAX_PAYLOAD_IN_MB='101'.*100 MB"):
        read_settings({"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "101"})
    with pytest.raises(SettingsError, match="SAGEMAKER_BATCH='maybe'"):
        read_settings({"SAGEMAKER_BATCH": "maybe"})


def test_an_async_endpoint_takes_a_gigabyte_and_an_hour_and_keeps_every_other_guard():
    """IMGCLF_ASYNC, which `deploy --async-output` writes into the model: async inference's own
    limits (1 GB, an hour), one such body held at a time; the pixel budget is unchanged."""
    from imgclf.serving.protocol import MB, Limits

    real_time = read_settings({})
    asynchronous = read_settings({"IMGCLF_ASYNC": "true"})
    assert asynchronous.asynchronous and not asynchronous.batch
    assert asynchronous.limits.max_body_bytes == 1024 * MB
    assert asynchronous.timeout_s == 3600 and asynchronous.limits.body_timeout_s == 3600
    assert asynchronous.limits.body_budget_bytes == 1024 * MB
    unchanged = {"header_timeout_s", "max_connections", "idle_timeout_s", "max_header_bytes"}
    for name in unchanged:
        assert getattr(asynchronous.limits, name) == getattr(Limits(), name), name
    assert real_time.limits.max_body_bytes == 6 * MB and real_time.timeout_s == 60
    smaller = read_settings({"IMGCLF_ASYNC": "1", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "200"})
    assert smaller.max_payload_mb == 200
    with pytest.raises(SettingsError, match="over async inference's limit of 1024 MB"):
        read_settings({"IMGCLF_ASYNC": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "2048"})
    with pytest.raises(SettingsError, match="IMGCLF_ASYNC='sometimes'"):
        read_settings({"IMGCLF_ASYNC": "sometimes"})
    # A transform job run with an async endpoint's model is a transform: batch limits.
    both = read_settings({"IMGCLF_ASYNC": "true", "SAGEMAKER_BATCH": "true"})
    assert both.batch and not both.asynchronous and both.max_payload_mb == 6
