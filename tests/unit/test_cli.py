import subprocess
import sys

from tests.conftest import run_launch


def test_the_launcher_starts_without_importing_torch():
    code = "import sys, imgclf.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


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


def test_data_check_fails_on_a_broken_layout(tmp_path):
    (tmp_path / "flat" / "train").mkdir(parents=True)
    proc = run_launch("data", "check", str(tmp_path / "flat"), home=tmp_path)
    assert proc.returncode == 2
    assert "valid" in proc.stderr and "Traceback" not in proc.stderr
