"""The image's `train` entry (sagemaker-training) over job dirs made the way SageMaker makes
them; nothing of ours is imported in-process except the fixtures that write the job dir."""

import json

import torch

from imgclf.artifacts import load_artifact
from tests.conftest import FAST_HPS, make_sagemaker_job, run_train_entry


def test_separate_channels_produce_the_artifact(tmp_path, tiny_digits):
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters={**FAST_HPS, "epochs": "1", "image_size": "16"},
        channels={n: tiny_digits / n for n in ("train", "valid", "test")},
    )
    proc = run_train_entry(base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (base / "output" / "failure").exists()
    assert (base / "output" / "success").exists()
    model = base / "model"
    state = torch.load(model / "model.pt", weights_only=True)
    assert state["fc.weight"].shape == (10, 512)
    labels = json.loads((model / "labels.json").read_text())
    folders = sorted(p.name for p in (tiny_digits / "train").iterdir())
    assert [labels[str(i)] for i in range(10)] == [f.split(".", 1)[1] for f in folders]
    config = json.loads((model / "model_config.json").read_text())
    assert config["arch"] == "resnet18" and config["classes"] == folders
    assert config["preprocess"]["image_size"] == 16 and config["version"]
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["test_images"] == 40 and len(metrics["confusion_matrix"]) == 10
    assert set(metrics["per_class_accuracy"]) == set(labels.values())
    assert "#metrics epoch=1 " in proc.stdout
    assert (base / "checkpoints" / "checkpoint.pt").exists()
    for name in ("history.json", "config.json", "evaluation.json", "skipped_images.json"):
        assert (base / "output" / "data" / name).exists(), name
    assert load_artifact(model).labels == [labels[str(i)] for i in range(10)]


def test_odd_images_train_and_exactly_the_bad_ones_are_named(tmp_path, odd_dataset):
    root, bad = odd_dataset
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters={**FAST_HPS, "epochs": "1", "image_size": "16", "batch_size": "8"},
        channels={"training": root},
        json_encode=False,
    )
    proc = run_train_entry(base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = json.loads((base / "output" / "data" / "skipped_images.json").read_text())
    assert {f"{s['split']}/{s['path']}" for s in skipped} == bad
    for name in bad:
        assert name.split("/", 1)[1] in proc.stdout  # each named in the job log too
    assert (base / "model" / "model.pt").exists()


def test_an_image_over_the_decode_bound_is_skipped_as_unreadable(tmp_path, odd_dataset):
    """deep16.png (30x40 16-bit: 3600 weighted pixels) is over max_image_pixels=3000; the RGB,
    alpha and CMYK images (1200 to 2592) are not."""
    root, bad = odd_dataset
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters={
            **FAST_HPS,
            "epochs": "1",
            "image_size": "16",
            "batch_size": "8",
            "max_image_pixels": "3000",
        },
        channels={"training": root},
    )
    proc = run_train_entry(base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = json.loads((base / "output" / "data" / "skipped_images.json").read_text())
    reasons = {f"{s['split']}/{s['path']}": s["reason"] for s in skipped}
    assert set(reasons) == bad | {"train/001.cats/deep16.png"}
    assert reasons["train/001.cats/deep16.png"].startswith("too costly to decode: 30x40 I;16")
    assert "deep16.png" in proc.stdout


def test_broken_dataset_writes_failure_and_exits_non_zero(tmp_path, tiny_digits):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    shutil.rmtree(data / "valid")
    base = make_sagemaker_job(
        tmp_path / "ml", hyperparameters={**FAST_HPS, "epochs": "1"}, channels={"training": data}
    )
    proc = run_train_entry(base)
    assert proc.returncode != 0
    failure = (base / "output" / "failure").read_text()
    assert failure.startswith("ClientError:") and "valid" in failure
    assert len(failure) <= 1025
    assert "Traceback" not in failure
    assert not (base / "model" / "model.pt").exists()


def test_too_many_bad_images_fail_with_their_list(tmp_path, odd_dataset):
    root, bad = odd_dataset
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters={**FAST_HPS, "max_bad_images": "2"},
        channels={"training": root},
    )
    proc = run_train_entry(base)
    assert proc.returncode != 0
    failure = (base / "output" / "failure").read_text()
    assert "max_bad_images=2" in failure
    assert all(name in failure for name in bad)


def test_unknown_hyperparameter_fails_naming_the_valid_ones(tmp_path, tiny_digits):
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters={"learning-rate": "0.1"},
        channels={"training": tiny_digits},
    )
    proc = run_train_entry(base)
    assert proc.returncode != 0
    failure = (base / "output" / "failure").read_text()
    assert "learning-rate" in failure and "batch_size" in failure


# ---------------------------------------------------------------- only our program runs

TINY_HPS = {**FAST_HPS, "epochs": "1", "image_size": "16", "workers": "0"}


def _marker_program(folder, marker):
    """A program of our program's name that leaves `marker` when it runs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "imgclf_train.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(0)\n"
    )
    return folder


def test_a_submit_directory_is_refused_and_nothing_in_it_runs(tmp_path, tiny_digits):
    marker = tmp_path / "ran"
    code = _marker_program(tmp_path / "user_code", marker)
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters={**TINY_HPS, "sagemaker_submit_directory": str(code)},
        channels={"training": tiny_digits},
    )
    proc = run_train_entry(base)
    assert proc.returncode != 0 and not marker.exists(), proc.stdout[-3000:]
    failure = (base / "output" / "failure").read_text()
    assert failure.startswith("ClientError: hyperparameter sagemaker_submit_directory=")
    assert "leave entry_point and source_dir out of the estimator" in failure
    assert "\n" not in failure.strip()


def test_the_code_dir_holds_only_our_program(tmp_path, tiny_digits):
    marker = tmp_path / "ran"
    base = make_sagemaker_job(
        tmp_path / "ml", hyperparameters=TINY_HPS, channels={"training": tiny_digits}
    )
    _marker_program(base / "code", marker)  # a program of our name placed there: replaced
    proc = run_train_entry(base)
    assert proc.returncode == 0 and not marker.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (base / "model" / "model.pt").exists()

    (base / "output" / "failure").unlink(missing_ok=True)
    (base / "code" / "torch.py").write_text("raise SystemExit('shadowed')\n")
    proc = run_train_entry(base)
    assert proc.returncode != 0
    failure = (base / "output" / "failure").read_text()
    assert "holds torch.py: this image runs only its own program (imgclf_train.py)" in failure


def test_the_process_count_never_reaches_a_shell(tmp_path, tiny_digits):
    marker = tmp_path / "ran"
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters={
            **TINY_HPS,
            "sagemaker_torch_distributed_enabled": "true",
            "sagemaker_mpi_num_of_processes_per_host": f"1; touch {marker};",
        },
        channels={"training": tiny_digits},
        json_encode=False,
    )
    proc = run_train_entry(base)
    assert proc.returncode != 0 and not marker.exists(), proc.stdout[-3000:]
    failure = (base / "output" / "failure").read_text()
    assert "sagemaker_mpi_num_of_processes_per_host" in failure and "1 to 1024" in failure


def test_a_failed_job_under_torchrun_exits_non_zero(tmp_path, tiny_digits):
    import shutil

    data = shutil.copytree(tiny_digits, tmp_path / "data")
    shutil.rmtree(data / "valid")
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters={
            **TINY_HPS,
            "sagemaker_torch_distributed_enabled": "true",
            "sagemaker_mpi_num_of_processes_per_host": "2",
        },
        channels={"training": data},
    )
    proc = run_train_entry(base)
    # sagemaker-training reported this as a success (exit 0) when torchrun went through /bin/sh
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Reporting training SUCCESS" not in proc.stdout + proc.stderr
    assert (base / "output" / "failure").read_text().startswith("ClientError:")


def test_each_sdks_spelling_of_a_hyperparameter_configures_the_same_job(tmp_path, tiny_digits):
    """What reaches hyperparameters.json: SDK v2 sends str(value) ("False", "['a', 'b']",
    "None"), v3's ModelTrainer JSON ("false", "null"), the launcher json.dumps of its text
    ("\\"false\\""). The three falses of booleans that default to true all train as false; a
    list and None arrive as the SDK sends them and are read as meant."""
    hyperparameters = {
        **TINY_HPS,
        "pretrained": json.dumps("false"),  # the launcher
        "hflip": str(False),  # SDK v2
        "channels_last": json.dumps(False),  # SDK v3
        "debug_stop_on": str(["ExplodingTensor", "Overfit"]),  # SDK v2, a list
        "weights_path": str(None),  # SDK v2, None
        "features_dir": json.dumps(None),  # SDK v3, None
    }
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters=hyperparameters,
        channels={"training": tiny_digits},
        json_encode=False,
    )
    proc = run_train_entry(base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((base / "output" / "data" / "config.json").read_text())
    assert (config["pretrained"], config["hflip"], config["channels_last"]) == (False,) * 3
    assert config["debug_stop_on"] == "ExplodingTensor,Overfit"
    assert (config["weights_path"], config["features_dir"]) == ("", "")


# ---------------------------------------------------------------- incremental training


def _model_channel(folder, model_dir):
    """What SageMaker puts in /opt/ml/input/data/model for a model channel: the model.tar.gz
    as the S3 object is, not unpacked."""
    import tarfile

    folder.mkdir(parents=True)
    with tarfile.open(folder / "model.tar.gz", "w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return folder


def test_the_model_channel_is_where_training_starts_from(tmp_path, tiny_digits):
    """A grown class set: the entry reads /opt/ml/input/data/model, keeps the eight old
    classes' head rows, adds two and says so in the artifact."""
    import hashlib

    from tests.conftest import random_model

    folders = sorted(p.name for p in (tiny_digits / "train").iterdir())
    start = random_model(tmp_path / "start", folders[:8])
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters=TINY_HPS,
        channels={"training": tiny_digits, "model": _model_channel(tmp_path / "ch", start)},
    )
    proc = run_train_entry(base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "init-from: resnet18 model" in proc.stdout
    assert "8 classes keep their head rows, 2 new (eight, nine)" in proc.stdout
    config = json.loads((base / "model" / "model_config.json").read_text())
    started = config["init_from"]
    digest = hashlib.sha256((start / "model.pt").read_bytes()).hexdigest()
    assert started["model_sha256"] == digest
    assert started["classes"] == folders[:8] and started["added"] == ["eight", "nine"]
    assert started["dropped"] == [] and config["classes"] == folders
    metrics = json.loads((base / "model" / "metrics.json").read_text())
    assert metrics["init_from"] == started


def test_a_model_of_another_architecture_fails_the_job_in_one_line(tmp_path, tiny_digits):
    from tests.conftest import random_model

    folders = sorted(p.name for p in (tiny_digits / "train").iterdir())
    start = random_model(tmp_path / "start", folders)
    base = make_sagemaker_job(
        tmp_path / "ml",
        hyperparameters={**TINY_HPS, "arch": "resnet34"},
        channels={"training": tiny_digits, "model": _model_channel(tmp_path / "ch", start)},
    )
    proc = run_train_entry(base)
    assert proc.returncode != 0
    failure = (base / "output" / "failure").read_text().strip()
    assert failure.startswith("ClientError: --init-from model is resnet18 but this job trains ")
    assert "--hp arch=resnet18" in failure and "\n" not in failure
    assert not (base / "model" / "model.pt").exists()
