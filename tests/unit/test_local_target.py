"""The local target's verbs (imgclf.targets.local.LocalTarget): a job run over a job dir and its
results read back, job dirs by name or path, the tuning table, and endpoints of either kind
through one record: a real `serve` deployed, picked, invoked and deleted (the process runner),
and a container endpoint's record, refusals and command lines without Docker (the images run
in tests/docker/test_launch_docker.py). The serving program itself: tests/integration/."""

import json
import os
import shutil
import stat

import pytest

from imgclf.errors import UserError
from imgclf.processes import boot_id, process_start
from imgclf.targets.base import DeployRequest, TrainRequest
from imgclf.targets.local import LocalTarget
from imgclf.util import free_port
from tests.conftest import FAST_HPS, finished_study, png_bytes, random_model

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


# ------------------------------------------------------------ endpoints

CLASSES = ["001.cat", "002.dog"]


@pytest.fixture
def no_engine(tmp_path, monkeypatch):
    """The docker command finds no engine (even where one runs)."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")


def write_record(home, name, **fields):
    folder = home / "endpoints" / name
    folder.mkdir(parents=True)
    doc = {"name": name, "port": 9, "model": "m", "base": str(folder), **fields}
    (folder / "endpoint.json").write_text(json.dumps(doc))
    return folder


def test_a_process_endpoint_is_deployed_picked_invoked_and_deleted(tmp_path):
    """The process runner for real: `serve` of a random-init model, ready on its state file's
    word, then found by name and as the one running, answering, and stopped by delete."""
    target = LocalTarget(tmp_path / "home")
    model = random_model(tmp_path / "model", CLASSES)
    port = free_port()
    info = target.deploy(DeployRequest(str(model), "ep", port=port, workers=1))
    folder = tmp_path / "home" / "endpoints" / "ep"
    try:
        assert info.state == "healthy" and info.url == f"http://127.0.0.1:{port}"
        record = json.loads((folder / "endpoint.json").read_text())
        assert record["kind"] == "process" and info.runs_as == f"pid={record['pid']}"
        assert json.loads((folder / "state.json").read_text())["state"] == "ready"
        assert info.log == str(folder / "serve.log") and info.model == str(model)
        [listed] = target.endpoints()
        assert (listed.name, listed.state, listed.port) == ("ep", "healthy", port)
        assert target.pick_endpoint(None).url == info.url == target.pick_endpoint("ep").url
        status, answer = target.invoke(
            info, png_bytes(), content_type="image/png", custom_attributes="topk=2"
        )
        assert status == 200 and len(answer["predictions"]) == 2, answer
        assert {p["label"] for p in answer["predictions"]} == {"cat", "dog"}
        with pytest.raises(UserError, match="runs as a process, not a container"):
            target.deploy(DeployRequest(str(model), "ep", port=free_port(), docker="img"))
    finally:
        said = target.delete("ep")
    assert said == ["endpoint ep stopped"]
    assert not folder.exists() and target.endpoints() == []
    assert not os.path.lexists(folder)
    with pytest.raises(UserError, match="none running"):
        target.pick_endpoint(None)


def test_a_container_endpoint_is_listed_picked_and_deleted_from_the_same_record(
    tmp_path, no_engine
):
    """A container endpoint's record sits beside the process endpoints' and answers the same
    verbs; with no engine its container is gone, so it is listed dead and delete removes it."""
    home = tmp_path / "home"
    target = LocalTarget(home)
    folder = write_record(
        home, "dk", kind="container", image="imgclf-serve:dev", container_id="f00", port=8123
    )
    [listed] = target.endpoints()
    assert (listed.name, listed.state, listed.port) == ("dk", "dead", 8123)
    assert listed.runs_as == "container=imgclf-endpoint-dk"
    assert listed.log == "docker logs imgclf-endpoint-dk"
    assert target.pick_endpoint("dk").url == "http://127.0.0.1:8123"
    with pytest.raises(UserError, match=r"name the endpoint with --endpoint \(none running\)"):
        target.pick_endpoint(None)
    assert target.delete("dk") == ["endpoint dk was not running; removed"]
    assert not folder.exists()


def test_a_container_record_missing_its_image_is_skipped_with_a_warning(tmp_path, capsys):
    home = tmp_path / "home"
    write_record(home, "dk", kind="container")
    write_record(home, "odd", kind="vm")
    assert LocalTarget(home).endpoints() == []
    err = capsys.readouterr().err
    assert "skipping endpoint dk:" in err and "'image' is missing or not a str" in err
    assert "skipping endpoint odd:" in err and "unknown kind 'vm' (only process, container)" in err


def test_a_container_endpoint_recorded_by_an_older_imgclf_is_warned_about_and_deleted(
    tmp_path, capsys, no_engine
):
    home = tmp_path / "home"
    old = home / "endpoints-docker" / "dk"
    old.mkdir(parents=True)
    (old / "container.json").write_text(
        json.dumps({"name": "dk", "port": 9, "image": "img", "base": str(old), "model": "m"})
    )
    target = LocalTarget(home)
    assert target.endpoints() == []
    assert "a container endpoint recorded by an older imgclf; `launch.py delete dk`" in (
        capsys.readouterr().err
    )
    with pytest.raises(UserError, match="older imgclf"):
        target.deploy(DeployRequest(str(tmp_path), "dk", port=free_port()))
    assert target.delete("dk") == ["endpoint dk was not running; removed"]
    assert not old.exists()
    old.mkdir(parents=True)
    (old / "container.json").write_text('{"name": "dk", "po')  # truncated: not ours to trust
    [said] = target.delete("dk")
    assert "could not be read: folder removed, no container touched" in said
    assert not old.exists()


def test_deploy_with_docker_and_no_engine_is_one_clear_error_leaving_nothing(tmp_path, no_engine):
    home = tmp_path / "home"
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(UserError, match="drop --docker"):
        LocalTarget(home).deploy(DeployRequest(str(model), "dk", port=free_port(), docker="i"))
    assert not (home / "endpoints" / "dk").exists()


def test_a_running_container_endpoint_refuses_a_model_swap(tmp_path):
    """Its model is a read-only mount: `deploy` to its name says so instead of signalling."""
    from imgclf.targets import endpoints, runners

    home = tmp_path / "home"
    write_record(home, "dk", kind="container", image="img")
    endpoint = endpoints.read_endpoint(home, "dk")
    assert isinstance(runners.runner_of(endpoint), runners.ContainerRunner)
    refusal = endpoints.swap_refusal(endpoint, None)
    assert "read-only mount" in refusal and "delete dk" in refusal
    assert endpoints.swap_refusal(endpoint, "img") == refusal


def test_deploy_over_a_running_process_endpoint_with_docker_signals_nothing(tmp_path, sleeper):
    home = tmp_path / "home"
    write_record(home, "ep", pid=sleeper.pid, start=process_start(sleeper.pid), boot=boot_id())
    with pytest.raises(UserError, match="runs as a process, not a container"):
        LocalTarget(home).deploy(DeployRequest(str(tmp_path), "ep", port=9, docker="img"))
    assert sleeper.poll() is None


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker command")
def test_the_container_runner_opens_only_its_state_folder_to_the_container(tmp_path, no_engine):
    """Root in a container without capabilities writes only where others may: the state folder
    (inside the endpoint's own 0700 folder); a `docker run` that fails is one line."""
    from imgclf.targets.endpoint_record import Endpoint
    from imgclf.targets.runners import ContainerRunner

    base = tmp_path / "ep"
    base.mkdir(mode=0o700)
    (base / "model").mkdir()
    endpoint = Endpoint("ep", 8123, base, "m", kind="container", image="img")
    with pytest.raises(UserError, match="^docker run of img failed: .") as failed:
        ContainerRunner().start(endpoint, {})
    assert "\n" not in str(failed.value)
    assert stat.S_IMODE((base / "state").stat().st_mode) == 0o733
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
    assert ContainerRunner().state_file(base) == base / "state" / "state.json"
