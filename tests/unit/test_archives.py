"""The one unpack of every archive: plain files and folders only, bounded, all or nothing. The
malicious archives are built here with tarfile; each case goes through `endpoints.unpack_model`
(what `deploy --model x.tar.gz` runs, in process and docker mode) or `archives.unpack`."""

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from imgclf import archives
from imgclf.errors import UserError
from imgclf.targets.endpoints import unpack_model


def add_file(tar: tarfile.TarFile, name: str, content: bytes = b"x", mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(content), mode
    tar.addfile(info, io.BytesIO(content))


def add_link(tar: tarfile.TarFile, name: str, target: str, kind=tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o777
    tar.addfile(info)


def make_archive(path: Path, build, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        build(tar)
    return path


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's project with its launch.py, and a home inside it as `.imgclf` is."""
    root = tmp_path / "project"
    (root / ".imgclf" / "endpoints" / "ep").mkdir(parents=True)
    (root / "launch.py").write_text("the user's launcher\n")
    return root


def assert_refused_and_untouched(exc: pytest.ExceptionInfo, member: str, why: str, dest: Path):
    message = str(exc.value)
    assert isinstance(exc.value, UserError)
    assert repr(member) in message and why in message, message
    assert "\n" not in message
    assert not dest.exists() and not dest.is_symlink()
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")] == []


def test_a_plain_model_archive_unpacks_with_modes_readable_by_anyone(tmp_path):
    def build(tar):
        add_dir(tar, "./")
        add_file(tar, "./model.pt", b"weights" * 1000, mode=0o4700)  # setuid, owner-only
        add_file(tar, "./labels.json", b"{}", mode=0o600)
        add_file(tar, "code/extra.txt", b"deep")  # its folder has no member of its own

    archive = make_archive(tmp_path / "model.tar.gz", build)
    dest = tmp_path / "model"
    unpack_model(archive, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "code",
        "code/extra.txt",
        "labels.json",
        "model.pt",
    ]
    assert (dest / "model.pt").read_bytes() == b"weights" * 1000
    assert stat.S_IMODE((dest / "model.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "labels.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "code").stat().st_mode) == 0o755
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755


def test_cve_2025_4517_symlinks_through_a_path_longer_than_path_max_write_nothing(project):
    """The shape of CPython's test_realpath_limit_attack: symbolic links through folders whose
    expanded path passes PATH_MAX, then `escape` pointing above the destination and a file
    written through it. On Python 3.11.7 `filter="data"` let it replace the user's launch.py."""
    dest = project / ".imgclf" / "endpoints" / "ep" / "model"
    steps = "abcdefghijklmnop"
    path_max = os.pathconf(project, "PC_PATH_MAX")
    component = "d" * ((path_max - len(str(dest)) - 1) // (len(steps) + 1))
    levels = len(dest.relative_to(project).parts)

    def build(tar):
        path = ""
        for step in steps:
            add_dir(tar, os.path.join(path, component))
            add_link(tar, os.path.join(path, step), component)
            path = os.path.join(path, component)
        link = os.path.join(*steps, "l" * 254)
        add_link(tar, link, os.path.join(*[".."] * len(steps)))
        add_link(tar, "escape", os.path.join(link, *[".."] * levels))
        add_file(tar, "escape/launch.py", b"the archive's content\n")

    archive = make_archive(project / "x.tar.gz", build, mode="w")
    with pytest.raises(UserError) as exc:
        unpack_model(archive, dest)
    assert_refused_and_untouched(exc, "a", "symbolic link", dest)
    assert (project / "launch.py").read_text() == "the user's launcher\n"


@pytest.mark.parametrize(
    ("build", "member", "why"),
    [
        (lambda t: add_link(t, "model.pt", "../../../launch.py"), "model.pt", "symbolic link"),
        (lambda t: add_link(t, "model.pt", "/etc/passwd"), "model.pt", "symbolic link"),
        (
            lambda t: add_link(t, "model.pt", "/etc/passwd", tarfile.LNKTYPE),
            "model.pt",
            "hard link",
        ),
        (  # even to a member of the archive itself: no link of any kind
            lambda t: (add_file(t, "a.pt"), add_link(t, "b.pt", "a.pt", tarfile.LNKTYPE)),
            "b.pt",
            "hard link",
        ),
        (lambda t: add_file(t, "../launch.py"), "../launch.py", "'..'"),
        (lambda t: add_file(t, "model/../../launch.py"), "model/../../launch.py", "'..'"),
        (lambda t: add_file(t, "/tmp/launch.py"), "/tmp/launch.py", "absolute"),
        (lambda t: add_file(t, "a//b"), "a//b", "empty"),
        (lambda t: add_file(t, "a\nb"), "a\nb", "control character"),
        (lambda t: add_file(t, "d/" * 40 + "f"), "d/" * 40 + "f", "deep"),
        (lambda t: add_file(t, "x" * 300), "x" * 300, "longer than 255"),
        (lambda t: add_link(t, "null", "", tarfile.CHRTYPE), "null", "a device"),
        (lambda t: add_link(t, "sda", "", tarfile.BLKTYPE), "sda", "a device"),
        (lambda t: add_link(t, "pipe", "", tarfile.FIFOTYPE), "pipe", "a FIFO"),
        (lambda t: (add_file(t, "m.pt"), add_file(t, "m.pt")), "m.pt", "appears twice"),
        (lambda t: (add_file(t, "m"), add_file(t, "m/x")), "m/x", "is a file"),
    ],
    ids=[
        "symlink-up",
        "symlink-absolute",
        "hardlink-out",
        "hardlink-in",
        "dotdot",
        "dotdot-inside",
        "absolute",
        "empty-component",
        "newline",
        "too-deep",
        "long-component",
        "char-device",
        "block-device",
        "fifo",
        "twice",
        "file-then-folder",
    ],
)
def test_anything_but_plain_files_and_folders_is_refused_in_one_line(tmp_path, build, member, why):
    def full(tar):
        add_file(tar, "labels.json", b"{}")  # a good member first: it must not be left behind
        build(tar)

    archive = make_archive(tmp_path / "x.tar.gz", full)
    dest = tmp_path / "model"
    with pytest.raises(archives.Refused) as exc:
        archives.unpack(archive, dest)
    assert_refused_and_untouched(exc, member, why, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar.gz"]


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


@pytest.fixture(scope="module")
def gigabyte_of_zeros(tmp_path_factory) -> Path:
    """model.pt of 1 GiB of zeros, ~4.6 MB compressed (the audit's 1 MB: 1 GiB at level 9)."""
    path = tmp_path_factory.mktemp("bomb") / "model.tar.gz"
    info = tarfile.TarInfo("model.pt")
    info.size = 1 << 30
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.addfile(info, io.BufferedReader(_Zeros(info.size), 1 << 20))
    return path


def test_a_gigabyte_of_zeros_stops_at_the_configured_byte_bound(tmp_path, gigabyte_of_zeros):
    dest = tmp_path / "model"
    limits = archives.Limits(max_bytes=8 << 20)
    with pytest.raises(archives.Refused) as exc:
        archives.unpack(gigabyte_of_zeros, dest, limits=limits)
    assert_refused_and_untouched(exc, "model.pt", f"more than {8 << 20} bytes", dest)


def test_a_gigabyte_of_zeros_is_refused_by_the_default_bounds(tmp_path, gigabyte_of_zeros):
    """No limit configured: a small archive may not unpack to a hundred times its size."""
    dest = tmp_path / "model"
    with pytest.raises(archives.Refused) as exc:
        unpack_model(gigabyte_of_zeros, dest)
    assert_refused_and_untouched(exc, "model.pt", "100x the archive's", dest)


def test_real_bytes_are_counted_not_only_the_headers(tmp_path):
    """Many members each under the bound, together over it."""

    def build(tar):
        for i in range(8):
            add_file(tar, f"part{i}", bytes(300_000))

    archive = make_archive(tmp_path / "x.tar.gz", build)
    dest = tmp_path / "model"
    with pytest.raises(archives.Refused) as exc:
        archives.unpack(archive, dest, limits=archives.Limits(max_bytes=1_000_000))
    assert_refused_and_untouched(exc, "part3", "more than 1000000 bytes", dest)


def test_too_many_members_are_refused(tmp_path):
    def build(tar):
        for i in range(50):
            add_file(tar, f"f{i}", b"")

    archive = make_archive(tmp_path / "x.tar.gz", build)
    dest = tmp_path / "model"
    with pytest.raises(archives.Refused, match="more than 20 members") as exc:
        archives.unpack(archive, dest, limits=archives.Limits(max_members=20))
    assert "\n" not in str(exc.value) and not dest.exists()


def test_a_truncated_or_foreign_file_is_one_line_not_a_traceback(tmp_path):
    def build(tar):
        add_file(tar, "model.pt", os.urandom(200_000))

    whole = make_archive(tmp_path / "whole.tar.gz", build).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(archives.Refused, match="not a readable tar archive"):
        archives.unpack(cut, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    with pytest.raises(UserError, match="not a model directory nor a model.tar.gz"):
        unpack_model(text, tmp_path / "model2")


def test_the_destination_must_be_new(tmp_path):
    archive = make_archive(tmp_path / "x.tar", lambda t: add_file(t, "a"), mode="w")
    (tmp_path / "model").mkdir()
    with pytest.raises(UserError, match="it exists"):
        archives.unpack(archive, tmp_path / "model")
