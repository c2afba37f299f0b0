"""A local job dir shaped like /opt/ml (imgclf.jobs): what the `train` entry reads, reruns,
one launcher per job name, and no link followed."""

import json

import pytest

from imgclf import jobs
from imgclf.contract import TRAIN_IMAGE_ENV, read_training_contract
from imgclf.errors import UserError
from imgclf.targets import docker
from tests.conftest import random_model, run_launch


def test_job_dir_is_shaped_like_opt_ml_and_read_back_by_the_contract(tmp_path, tiny_digits):
    job = jobs.prepare_job(
        tmp_path, "j1", data_dir=tiny_digits, hyperparameters={"epochs": "2"}, nproc=2
    )
    base = job.layout.base
    hps = json.loads((base / "input/config/hyperparameters.json").read_text())
    assert hps["epochs"] == "2" and hps["sagemaker_torch_distributed_enabled"] == "true"
    env = jobs.job_environment(job, {"PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "x"})
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["SAGEMAKER_BASE_DIR"] == str(base)
    assert all(env[k] == v for k, v in TRAIN_IMAGE_ENV.items())
    contract = read_training_contract(env)
    assert contract.hosts == ("algo-1",)
    assert contract.splits["train"].resolve() == (tiny_digits / "train").resolve()


def test_rerunning_a_job_keeps_checkpoints_and_clears_old_outputs(tmp_path, tiny_digits):
    job = jobs.prepare_job(tmp_path, "j", data_dir=tiny_digits, hyperparameters={})
    (job.layout.checkpoint_dir / "checkpoint.pt").write_bytes(b"x")
    job.layout.failure_file.write_text("old failure")
    job = jobs.prepare_job(tmp_path, "j", data_dir=tiny_digits, hyperparameters={})
    assert (job.layout.checkpoint_dir / "checkpoint.pt").exists()
    assert not job.layout.failure_file.exists()


def test_a_second_job_with_a_running_jobs_name_is_refused_at_once(tmp_path, tiny_digits):
    """Another launcher holds jobs/<name>.lock: the second is refused before it touches the
    directory, naming the running job; a new name runs."""
    import subprocess
    import sys
    import time

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from imgclf import jobs; "
            f"jobs.lock_job(Path({str(tmp_path / 'jobs')!r}), 'busy'); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "jobs" / "busy" / "model").mkdir(parents=True)
        (tmp_path / "jobs" / "busy" / "model" / "model.pt").write_bytes(b"theirs")
        proc = run_launch("train", "--data", str(tiny_digits), "--job-name", "busy", home=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "job busy is already running" in proc.stderr
        assert f"launcher pid {holder.pid}" in proc.stderr and "Traceback" not in proc.stderr
        assert (tmp_path / "jobs" / "busy" / "model" / "model.pt").read_bytes() == b"theirs"
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    job = jobs.prepare_job(tmp_path, "busy", data_dir=tiny_digits, hyperparameters={})
    assert job.layout.base == tmp_path / "jobs" / "busy"


def test_a_job_folder_or_lock_placed_as_a_link_is_not_followed(tmp_path, tiny_digits):
    """A pre-placed link at jobs/<name> would have the job delete the target's model/ and
    output/; one at locks/<name>.lock would have the lock truncate the file it points at."""
    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    (project / "model" / "model.pt").write_bytes(b"the user's weights")
    (project / "poetry.lock").write_text("pinned\n")
    home = tmp_path / "home"
    (home / "jobs").mkdir(parents=True)
    (home / "jobs" / "j").symlink_to(project, target_is_directory=True)
    with pytest.raises(UserError, match="job folder .*jobs/j is a symbolic link"):
        jobs.prepare_job(home, "j", data_dir=tiny_digits, hyperparameters={})
    assert (project / "model" / "model.pt").read_bytes() == b"the user's weights"
    (home / "locks").mkdir(exist_ok=True)  # the first call made it
    (home / "locks" / "k.lock").symlink_to(project / "poetry.lock")
    with pytest.raises(UserError, match="k.lock is a symbolic link"):
        jobs.prepare_job(home, "k", data_dir=tiny_digits, hyperparameters={})
    assert (project / "poetry.lock").read_text() == "pinned\n"


def test_init_from_lays_out_the_model_channel_as_sagemaker_does(tmp_path, tiny_digits):
    """`train --init-from`: a model dir is the channel; a model.tar.gz lies in the channel's
    folder (where SageMaker downloads it); under Docker each is mounted there read-only."""
    model_dir = random_model(tmp_path / "old" / "model", ["001.zero", "002.one"])
    archive = tmp_path / "old" / "model.tar.gz"
    archive.write_bytes(b"not read here")
    job = jobs.prepare_job(
        tmp_path, "j", data_dir=tiny_digits, hyperparameters={}, init_model=model_dir
    )
    config = json.loads((job.layout.config_dir / "inputdataconfig.json").read_text())
    assert config["model"]["ContentType"] == "application/x-sagemaker-model"
    assert (job.layout.data_dir / "model" / "model.pt").is_file()
    contract = read_training_contract(jobs.job_environment(job))
    assert contract.init_model == job.layout.data_dir / "model"
    assert set(contract.splits) == {"train", "valid", "test"}  # the model is no split
    job = jobs.prepare_job(
        tmp_path, "j", data_dir=tiny_digits, hyperparameters={}, init_model=archive
    )
    assert (job.layout.data_dir / "model" / "model.tar.gz").read_bytes() == b"not read here"
    for source, inside in (
        (model_dir, "/opt/ml/input/data/model"),
        (archive, "/opt/ml/input/data/model/model.tar.gz"),
    ):
        job = jobs.prepare_job(
            tmp_path,
            "j",
            data_dir=tiny_digits,
            hyperparameters={},
            link_data=False,
            init_model=source,
        )
        cmd = docker.docker_command(job, "imgclf-train:abc", gpus=False)
        assert ("-v", f"{source.resolve()}:{inside}:ro") in list(zip(cmd, cmd[1:]))


def test_init_from_a_local_job_name_and_what_is_refused(tmp_path, tiny_digits):
    random_model(tmp_path / "jobs" / "old" / "model", ["001.zero", "002.one"])
    assert jobs.init_model_path(tmp_path, "old") == (tmp_path / "jobs" / "old" / "model").resolve()
    with pytest.raises(UserError, match="for s3:// add --target sagemaker"):
        jobs.init_model_path(tmp_path, "s3://b/model.tar.gz")
    with pytest.raises(UserError, match="neither a model dir, a model.tar.gz nor the name"):
        jobs.init_model_path(tmp_path, "nothing-here")
    with pytest.raises(UserError, match="another --job-name"):  # its model/ is replaced
        jobs.prepare_job(
            tmp_path,
            "old",
            data_dir=tiny_digits,
            hyperparameters={},
            init_model=jobs.init_model_path(tmp_path, "old"),
        )
