"""The local target's verbs (imgclf.targets.local.LocalTarget) that do not need an endpoint:
a job run over a job dir and its results read back, job dirs by name or path, the tuning
table, and what a local endpoint refuses. Endpoints: tests/integration/test_endpoint.py."""

import json

import pytest

from imgclf.errors import UserError
from imgclf.targets.base import TrainRequest
from imgclf.targets.local import LocalTarget
from tests.conftest import FAST_HPS, finished_study

TINY = {**FAST_HPS, "epochs": "1", "image_size": "16", "workers": "0"}


def test_a_job_that_trains_returns_its_model_metrics_and_report(tmp_path, tiny_digits):
    target = LocalTarget(tmp_path)
    result = target.train(TrainRequest(str(tiny_digits), TINY, job_name="tiny"))
    assert result.ok, result.failure
    job = tmp_path / "jobs" / "tiny"
    assert result.model == str(job / "model") and result.log == str(job / "train.log")
    assert result.metrics == json.loads((job / "model" / "metrics.json").read_text())
    assert result.metrics["test_images"] == 40
    assert result.report == str(job / "output" / "data" / "report.html")
    assert target.job_dir("tiny") == job and target.job_dir(str(job)) == job


def test_a_job_that_fails_returns_the_reason_it_wrote(tmp_path, tiny_digits):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "valid").mkdir()
    result = LocalTarget(tmp_path).train(TrainRequest(str(empty), TINY, job_name="broken"))
    assert not result.ok and result.code != 0
    assert "no class folders" in result.failure
    assert result.log == str(tmp_path / "jobs" / "broken" / "train.log")


def test_an_unknown_job_is_named_with_where_local_jobs_live(tmp_path):
    with pytest.raises(UserError, match="nothing is neither a job dir nor a local job name"):
        LocalTarget(tmp_path).job_dir("nothing")
    with pytest.raises(UserError, match="job name"):
        LocalTarget(tmp_path).job_dir("../elsewhere")


def test_the_tuning_table_of_a_tuning_dir(tmp_path):
    status = LocalTarget(tmp_path).tuning_status(finished_study(tmp_path / "tuning"))
    assert status.ok and "valid_loss" in status.header
    assert [row[0] for row in status.rows] == ["1", "0"]  # best first: 0.3, then 0.4
    assert all(row[1] == "COMPLETE" for row in status.rows)


def test_a_local_endpoint_refuses_an_asynchronous_request(tmp_path):
    with pytest.raises(UserError, match="drop --async"):
        LocalTarget(tmp_path).invoke_async(
            None, b"", content_type="image/jpeg", custom_attributes=""
        )
