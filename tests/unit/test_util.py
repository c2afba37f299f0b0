import os
import stat

import pytest

from imgclf import util
from imgclf.errors import UserError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("True", True),
        ('"False"', False),
        (" yes ", True),
        ("0", False),
        ("maybe", None),
        ("", None),
    ],
)
def test_parse_bool_reads_what_sagemaker_and_people_write(text, expected):
    assert util.parse_bool(text) is expected


def test_atomic_write_replaces_whole_files_readable_by_anyone(tmp_path):
    target = tmp_path / "deep" / "model.json"
    old_umask = os.umask(0o077)
    try:
        util.write_json(target, {"a": 1})
        util.atomic_write(target, b"new")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["model.json"]  # no temp file left

    def broken(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        util.atomic_write(target, broken)
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["model.json"]


def test_job_names_are_utc_stamped():
    name = util.new_job_name("demo")
    assert name.startswith("demo-") and len(name) == len("demo-20261123-120000")
    assert util.cpu_count() >= 1


def test_a_lock_file_placed_as_a_link_is_not_followed(tmp_path):
    precious = tmp_path / "poetry.lock"
    precious.write_text("pinned\n")
    (tmp_path / "x.lock").symlink_to(precious)
    with pytest.raises(UserError, match="x.lock is a symbolic link"):
        util.open_lock(tmp_path / "x.lock")
    assert precious.read_text() == "pinned\n"
    with util.open_lock(tmp_path / "y.lock") as handle:  # a plain one is made and opened
        handle.write("held")
    assert (tmp_path / "y.lock").read_text() == "held"


def test_plain_dir_makes_folders_and_refuses_a_link(tmp_path):
    assert util.plain_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "jobs").symlink_to(tmp_path / "a", target_is_directory=True)
    with pytest.raises(UserError, match="jobs folder .*jobs is a symbolic link"):
        util.plain_dir(tmp_path / "jobs", "jobs folder")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://user:PASSWORD@db.example/optuna", "postgresql://user:***@db.example/optuna"),
        (
            "mysql+pymysql://u:p%40ss@h:3306/d?charset=utf8",
            "mysql+pymysql://u:***@h:3306/d?charset=utf8",
        ),
        ("http://u:p@ss@h/x", "http://u:***@h/x"),  # an unencoded @: none of it shown
        ("redis://:PASSWORD@r:6379/0", "redis://:***@r:6379/0"),
        ("sqlite:///s.db?password=PASSWORD&mode=ro", "sqlite:///s.db?password=***&mode=ro"),
        (
            "cannot reach postgresql://a:PASSWORD@h/d (timeout)",
            "cannot reach postgresql://a:***@h/d (timeout)",
        ),
        ("mysql://root@h/db", "mysql://root@h/db"),
        ("sqlite:////tmp/a:b/study.db", "sqlite:////tmp/a:b/study.db"),
    ],
)
def test_mask_secrets_hides_every_password_in_a_url(text, shown):
    assert util.mask_secrets(text) == shown
