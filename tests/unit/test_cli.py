import subprocess
import sys

import pytest

from tests.conftest import finished_study, imported_by, launch_imports, run_launch


def test_the_launcher_starts_without_importing_torch():
    code = "import sys, imgclf.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_light_verbs_import_no_torch(tmp_path):
    """The verbs that only read records, send images or print tables answer without paying
    for torch (seconds of imports); a live endpoint's `invoke` and `endpoints` are checked in
    tests/integration/test_endpoint.py."""
    tuning = finished_study(tmp_path / "tuning")
    image = tmp_path / "dog.jpg"
    image.write_bytes(b"not sent")
    verbs = {
        "--help": (["--help"], 0),
        "endpoints": (["endpoints"], 0),
        "delete": (["delete", "nothing-here"], 2),  # no such endpoint: one line
        "invoke": (["invoke", "--endpoint", "nothing-here", str(image)], 2),
        "tune --status": (["tune", "--status", str(tuning)], 0),
    }
    for verb, (args, code) in verbs.items():
        proc, imported = launch_imports(*args, home=tmp_path)
        assert proc.returncode == code, (verb, proc.stdout, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (verb, proc.stderr[-2000:])
        assert "torch" not in imported, f"launch.py {verb} imports torch"
        if verb == "tune --status":
            assert "0.30000" in proc.stdout and "lr=0.003" in proc.stdout, proc.stdout
    # The check sees torch when it is imported (the network's module needs it; the artifact's
    # own no longer does: imgclf.artifacts imports torch where tensors are read or written).
    _, imported = imported_by("-c", "import imgclf.models")
    assert "torch" in imported


def test_help_lists_the_hyperparameters(tmp_path):
    proc = run_launch("train", "--help", home=tmp_path)
    assert proc.returncode == 0
    assert "batch_size=32" in proc.stdout and "class_weights" in proc.stdout


def test_data_sample_writes_dogimages_style_folders(tmp_path):
    proc = run_launch("data", "sample", str(tmp_path / "d"), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    classes = sorted(p.name for p in (tmp_path / "d" / "train").iterdir())
    assert classes[:2] == ["001.zero", "002.one"] and len(classes) == 10
    total = sum(1 for _ in (tmp_path / "d").rglob("*.png"))
    assert total == 1797


def test_data_check_lists_unreadable_images_with_their_paths(tmp_path, odd_dataset):
    root, bad = odd_dataset
    proc = run_launch("data", "check", str(root), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 classes" in proc.stdout and "3 unreadable images" in proc.stdout
    for name in bad:
        assert str(root / name) in proc.stdout
    assert run_launch("data", "check", "--strict", str(root), home=tmp_path).returncode == 1


def test_data_check_lists_images_over_the_decode_bound_as_training_does(tmp_path, odd_dataset):
    root, _ = odd_dataset
    proc = run_launch("data", "check", str(root), "--max-image-pixels", "3000", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 unreadable images" in proc.stdout
    assert f"{root / 'train/001.cats/deep16.png'}: too costly to decode: 30x40 I;16" in proc.stdout
    proc = run_launch("data", "check", str(root), "--max-image-pixels", "0", home=tmp_path)
    assert proc.returncode == 2 and "max_image_pixels='0' is out of range" in proc.stderr


def test_data_check_fails_on_a_broken_layout(tmp_path):
    (tmp_path / "flat" / "train").mkdir(parents=True)
    proc = run_launch("data", "check", str(tmp_path / "flat"), home=tmp_path)
    assert proc.returncode == 2
    assert "valid" in proc.stderr and "Traceback" not in proc.stderr


def test_repeated_hp_flags_merge_and_a_key_set_twice_is_refused(tmp_path):
    data_dir = str(tmp_path / "nowhere")
    # both groups reach the check: an unknown key in either one is named
    for groups in (
        ["--hp", "arch=resnet18", "--hp", "bogus=1"],
        ["--hp", "bogus=1", "--hp", "lr=0.1"],
    ):
        proc = run_launch("train", "--data", data_dir, *groups, home=tmp_path)
        assert proc.returncode == 2 and "bogus" in proc.stderr, proc.stderr
    proc = run_launch(
        "train", "--data", data_dir, "--hp", "lr=0.1", "epochs=2", "--hp", "lr=0.05", home=tmp_path
    )
    assert proc.returncode == 2
    assert "lr twice" in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_or_malformed_hp_from_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "best.json"
    bad.write_text("{not json")
    for path, words in ((tmp_path / "absent.json", "cannot be read"), (bad, "not valid JSON")):
        proc = run_launch("train", "--data", str(tmp_path), "--hp-from", str(path), home=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and str(path) in proc.stderr
        assert "Traceback" not in proc.stderr


def _tree(root):
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("name", ["../..", "../../poetry", "../x", "ABSOLUTE"])
def test_job_and_endpoint_names_that_are_paths_are_refused_before_anything_is_touched(
    tmp_path, name
):
    """The audit's cases: `--job-name ../..` made the user's project the job dir (its model/
    and output/ deleted, poetry.lock truncated by the job's lock); `--name ../x` put endpoint
    records outside the home. Each is one line, and the project is left as it was."""
    project = tmp_path / "project"
    home = project / ".imgclf"
    home.mkdir(parents=True)
    (project / "model").mkdir()
    (project / "model" / "model.pt").write_bytes(b"the user's weights")
    (project / "output").mkdir()
    (project / "poetry.lock").write_text("pinned\n")
    (project / "launch.py").write_text("the user's launcher\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    image = tmp_path / "dog.jpg"
    image.write_bytes(b"\xff\xd8")
    name = str(project) if name == "ABSOLUTE" else name
    before = _tree(project)
    for args in (
        ["train", "--data", str(empty), "--job-name", name],
        ["deploy", "--model", str(tmp_path / "model.tar.gz"), "--name", name, "--port", "1"],
        ["delete", name],
        ["invoke", "--endpoint", name, str(image)],
    ):
        proc = run_launch(*args, home=home)
        assert _tree(project) == before, args
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert f"name {name!r} is not valid" in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_sagemaker_keys_are_refused_on_the_command_line_and_in_hp_files(tmp_path):
    hp_file = tmp_path / "hps.json"
    hp_file.write_text('{"lr": 0.01, "sagemaker_program": "x.py"}')
    for args in (
        ["--hp", f"sagemaker_submit_directory={tmp_path / 'code'}"],
        ["--hp-from", str(hp_file)],
    ):
        proc = run_launch("train", "--data", str(tmp_path / "nowhere"), *args, home=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "set by SageMaker and the launcher" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_storage_url_password_is_never_printed(tmp_path, tiny_digits):
    from tests.conftest import ROOT

    url = "postgresql://tuner:SECRET@127.0.0.1:1/optuna"  # no driver here: it cannot open
    proc = run_launch(
        "tune",
        "--data",
        str(tiny_digits),
        "--space",
        str(ROOT / "tuning.yaml"),
        "--storage",
        url,
        "--out",
        str(tmp_path / "t"),
        home=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "SECRET" not in proc.stdout + proc.stderr
    assert "postgresql://tuner:***@127.0.0.1:1/optuna cannot be opened" in proc.stderr
    assert "Traceback" not in proc.stderr
