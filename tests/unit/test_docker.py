"""The `--docker` runs of the local target (imgclf.targets.docker): the `docker run` command
lines for a training job and a serving container, as SageMaker runs the images. (The container
runner that uses them: tests/unit/test_local_target.py; the images run: tests/docker/.)"""

import os

from imgclf import jobs
from imgclf.targets import docker
from tests.conftest import run_launch


def test_docker_command_mounts_the_job_and_data_as_sagemaker_does(tmp_path, tiny_digits):
    job = jobs.prepare_job(tmp_path, "j", data_dir=tiny_digits, hyperparameters={}, link_data=False)
    cmd = docker.docker_command(job, "acct.dkr.ecr/imgclf-train:abc", gpus=True)
    assert cmd[:2] == ["docker", "run"] and cmd[-2:] == ["acct.dkr.ecr/imgclf-train:abc", "train"]
    assert f"{job.layout.base}:/opt/ml" in cmd
    assert f"{tiny_digits.resolve()}:/opt/ml/input/data/training:ro" in cmd
    assert "--gpus" in cmd
    pairs = list(zip(cmd, cmd[1:]))
    assert ("--network", "none") in pairs  # training needs no network
    assert ("--add-host", "algo-1:127.0.0.1") in pairs  # sagemaker-training waits for algo-1


def serve_command(tmp_path, **kw) -> list[str]:
    return docker.serve_container_command(
        container="imgclf-endpoint-e",
        image="imgclf-serve:abc",
        port=8123,
        model_dir=tmp_path / "model",
        state_dir=tmp_path / "state",
        state_file="state.json",
        gpus=False,
        **kw,
    )


def test_serving_container_is_bound_to_loopback_with_the_model_read_only(tmp_path):
    cmd = serve_command(tmp_path)
    assert cmd[-2:] == ["imgclf-serve:abc", "serve"] and "--user" not in cmd
    pairs = list(zip(cmd, cmd[1:]))
    assert ("--network", "host") in pairs and ("--name", "imgclf-endpoint-e") in pairs
    assert ("-v", f"{tmp_path / 'model'}:/opt/ml/model:ro") in pairs
    assert ("-e", "IMGCLF_BIND_HOST=127.0.0.1") in pairs
    assert ("-e", "SAGEMAKER_BIND_TO_PORT=8123") in pairs
    assert not any(v.startswith("IMGCLF_RESPONSE_FORMAT=") for v in cmd)  # the image's default
    assert "--gpus" not in cmd


def test_serving_container_writes_its_state_file_to_its_own_folder_only(tmp_path):
    """serve's state file is how `deploy` knows a container is ready or why it failed: one
    writable mount, the endpoint's state folder, and the variable naming the file in it."""
    cmd = serve_command(tmp_path)
    mounts = [value for flag, value in zip(cmd, cmd[1:]) if flag == "-v"]
    assert mounts == [f"{tmp_path / 'model'}:/opt/ml/model:ro", f"{tmp_path / 'state'}:/run/imgclf"]
    pairs = list(zip(cmd, cmd[1:]))
    assert ("-e", "IMGCLF_STATE_FILE=/run/imgclf/state.json") in pairs
    assert not any(v.startswith("IMGCLF_NEXT_MODEL_DIR=") for v in cmd)  # swaps nothing


def test_serving_container_gets_the_deploys_settings_but_keeps_its_port_and_loopback(tmp_path):
    """`deploy --docker --response-format vectors` (and a transform's batch settings) reach
    serve inside the container, as a SageMaker model's Environment carries them; none of them
    moves it off 127.0.0.1 or its port."""
    settings = {
        "IMGCLF_RESPONSE_FORMAT": "vectors",
        "IMGCLF_BIND_HOST": "0.0.0.0",
        "SAGEMAKER_BIND_TO_PORT": "80",
    }
    cmd = serve_command(tmp_path, environment=settings)
    values = [value for flag, value in zip(cmd, cmd[1:]) if flag == "-e"]
    assert "IMGCLF_RESPONSE_FORMAT=vectors" in values
    assert cmd.index("IMGCLF_RESPONSE_FORMAT=vectors") < cmd.index("imgclf-serve:abc")
    assert [v for v in values if v.startswith("IMGCLF_BIND_HOST=")][-1] == (
        "IMGCLF_BIND_HOST=127.0.0.1"
    )
    assert [v for v in values if v.startswith("SAGEMAKER_BIND_TO_PORT=")] == [
        "SAGEMAKER_BIND_TO_PORT=8123"
    ]


def test_docker_without_an_engine_is_a_clear_error(tmp_path, tiny_digits):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}  # even if one runs
    proc = run_launch(
        "train", "--data", str(tiny_digits), "--docker", "img", home=tmp_path, env=env
    )
    assert proc.returncode == 2
    assert "docker" in proc.stderr.lower() and "drop --docker" in proc.stderr


def _added_back(cmd: list[str]) -> list[str]:
    return [value for flag, value in zip(cmd, cmd[1:]) if flag == "--cap-add"]


def test_local_containers_drop_every_capability_and_cannot_gain_any(tmp_path, tiny_digits):
    """Still root, as SageMaker runs images; training gets back only DAC_OVERRIDE (root writes
    into the job dir, owned by the host user), serving nothing."""
    job = jobs.prepare_job(tmp_path, "j", data_dir=tiny_digits, hyperparameters={}, link_data=False)
    train = docker.docker_command(job, "imgclf-train:abc", gpus=True)
    serve = serve_command(tmp_path)
    for cmd, added in ((train, ["DAC_OVERRIDE"]), (serve, [])):
        image = cmd.index(cmd[-2])
        pairs = list(zip(cmd[:image], cmd[1:image]))
        assert ("--cap-drop", "ALL") in pairs
        assert ("--security-opt", "no-new-privileges") in pairs
        assert _added_back(cmd) == added
        assert "--privileged" not in cmd and "--user" not in cmd
