"""The `serve` entry (imgclf.serving.serve): its preflight refuses what cannot be served before
any port is opened, and it keeps its state in the file the launcher names, so `deploy` waits on
serve's word."""

import json

import pytest

from imgclf.contract import SERVE_PORT_ENV, SERVE_STATE_FILE_ENV
from imgclf.errors import UserError
from imgclf.serving import serve
from tests.conftest import random_model


def test_an_unknown_runtime_fails_the_endpoints_preflight(tmp_path):
    model = random_model(tmp_path / "model", ["001.cat", "002.dog"])
    with pytest.raises(UserError, match="'tensorrt' is unknown"):
        serve.preflight(model, cpu_runtime="tensorrt")


def test_serve_records_why_it_cannot_start(tmp_path):
    state_file = tmp_path / "endpoint" / "state.json"
    state_file.parent.mkdir()
    environ = {SERVE_STATE_FILE_ENV: str(state_file), SERVE_PORT_ENV: "eighty"}
    assert serve.main(environ) == 1
    doc = json.loads(state_file.read_text())
    assert doc["state"] == "failed" and doc["pid"] > 0
    assert doc["reason"] == f"cannot serve: {SERVE_PORT_ENV}='eighty' is not a number"
    assert [p.name for p in state_file.parent.iterdir()] == ["state.json"]  # no temp left


def test_a_broken_model_is_recorded_and_without_the_variable_no_file_is_written(tmp_path):
    state_file = tmp_path / "state.json"
    environ = {SERVE_STATE_FILE_ENV: str(state_file), "SAGEMAKER_BASE_DIR": str(tmp_path)}
    assert serve.main(environ) == 1  # no model/ under the base dir
    reason = json.loads(state_file.read_text())["reason"]
    assert reason.startswith(f"cannot serve the model at {tmp_path / 'model'}: ")
    assert serve.main({"SAGEMAKER_BASE_DIR": str(tmp_path / "other")}) == 1
    assert not (tmp_path / "other").exists()


def test_an_sdk_entry_point_fails_the_start_with_its_reason(tmp_path):
    state_file = tmp_path / "state.json"
    environ = {SERVE_STATE_FILE_ENV: str(state_file), "SAGEMAKER_PROGRAM": "inference.py"}
    assert serve.main(environ) == 1
    reason = json.loads(state_file.read_text())["reason"]
    assert "SAGEMAKER_PROGRAM='inference.py'" in reason and "runs no user code" in reason


def test_a_recorded_reason_is_never_empty():
    assert serve.reason(MemoryError()) == "out of memory"
    assert serve.reason(KeyError("arch")) == "'arch'"
    assert serve.reason(RuntimeError("")) == "RuntimeError"
    assert serve.reason(ValueError("first line\nsecond")) == "first line"


def test_a_broken_artifact_is_named_by_the_users_path_not_the_private_copy(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "labels.json").write_text("[not json")
    state_file = tmp_path / "state.json"
    environ = {SERVE_STATE_FILE_ENV: str(state_file), "IMGCLF_MODEL_DIR": str(model)}
    assert serve.main(environ) == 1
    reason = json.loads(state_file.read_text())["reason"]
    assert (
        reason.startswith(f"cannot serve the model at {model}: ") and "imgclf-serve-" not in reason
    )
