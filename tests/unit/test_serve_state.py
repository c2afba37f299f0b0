"""`serve` keeps its state in the file the launcher names, so `deploy` waits on serve's word."""

import json

from imgclf.contract import SERVE_PORT_ENV, SERVE_STATE_FILE_ENV
from imgclf.serving import serve


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
