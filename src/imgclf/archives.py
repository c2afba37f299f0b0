"""Every archive the project opens (a model.tar.gz to deploy, a SageMaker job's model.tar.gz and
output.tar.gz) is unpacked by `unpack`, and nothing else.

An archive is input like any request: it may hold regular files and folders with plain relative
names, within bounds on members and unpacked bytes, and nothing more. `tarfile`'s extraction
filters are not used: on Python 3.11.4-3.11.12 `filter="data"` lets symbolic links walk out of
the destination through paths longer than PATH_MAX (CVE-2025-4517), and every later filter fix
is one more version to trust. Here the members are read one by one from the stream and each file
and folder is created by this module, inside a fresh folder, so no link can ever exist to be
followed, on any Python. Torch-free.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from imgclf.errors import UserError

CHUNK_BYTES = 1 << 20
FILE_MODE = 0o644  # readable by any user (a server of another uid), never setuid
DIR_MODE = 0o755
WHAT_IS_ACCEPTED = "an archive may hold only regular files and folders with plain relative names"


@dataclass(frozen=True)
class Limits:
    """What one archive may unpack to. The byte bound is the smaller of `max_bytes` and
    `max_ratio` times the archive's own size (at least `ratio_floor`): a 1 MB archive does not
    unpack to 1 GB of zeros, a real model (weights barely compress) passes whatever its size."""

    max_members: int = 100_000  # a job's output.tar.gz holds one file per debugger step
    max_bytes: int = 16 << 30
    max_ratio: int = 100
    ratio_floor: int = 64 << 20
    max_name_bytes: int = 1024  # the whole relative name; far below PATH_MAX
    max_component_bytes: int = 255  # NAME_MAX
    max_depth: int = 32

    def byte_bound(self, archive_size: int) -> int:
        return min(self.max_bytes, max(self.max_ratio * archive_size, self.ratio_floor))


LIMITS = Limits()


class Refused(UserError):
    """An archive (or one of its members) that is not unpacked: one line, naming it and why."""


def is_archive(path: Path) -> bool:
    """`path` is a file that reads as a tar archive (plain or compressed)."""
    try:
        return Path(path).is_file() and tarfile.is_tarfile(path)
    except OSError:
        return False


def unpack(archive: Path, dest: Path, *, limits: Limits = LIMITS) -> Path:
    """Unpack `archive` into `dest`, a folder that must not exist yet (its parent must). All or
    nothing: the members land in a temporary folder beside `dest`, renamed to `dest` once every
    one was accepted; a refused archive leaves nothing behind and raises `Refused`."""
    archive, dest = Path(archive), Path(dest)
    if os.path.lexists(dest):
        raise UserError(f"cannot unpack {archive} into {dest}: it exists")
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpacking", dir=dest.parent))
    try:
        _Unpack(archive, scratch, limits).run()
        os.chmod(scratch, DIR_MODE)
        os.rename(scratch, dest)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return dest


class _Unpack:
    """One archive's members, checked and created one at a time under `root`."""

    def __init__(self, archive: Path, root: Path, limits: Limits) -> None:
        self.archive, self.root, self.limits = archive, root, limits
        size = archive.stat().st_size
        self.byte_bound = limits.byte_bound(size)
        self.bound_why = (
            f"{limits.max_bytes} bytes"
            if self.byte_bound == limits.max_bytes
            else f"{limits.max_ratio}x the archive's {size} bytes, at least {limits.ratio_floor}"
        )
        self.total = 0  # bytes written so far

    def run(self) -> None:
        count = 0
        try:
            # Stream mode ("r|*"): one member at a time, no index of every header in memory.
            with tarfile.open(self.archive, mode="r|*") as tar:
                for member in tar:
                    count += 1
                    if count > self.limits.max_members:
                        raise Refused(
                            f"{self.archive}: more than {self.limits.max_members} members; "
                            f"{WHAT_IS_ACCEPTED}, at most {self.limits.max_members} of them"
                        )
                    self.member(tar, member)
        except UserError:
            raise
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise Refused(f"{self.archive}: not a readable tar archive ({exc})") from None
        except OSError as exc:  # gzip's bad CRC, a read error (writes are caught where made)
            raise Refused(f"{self.archive}: not a readable tar archive ({exc})") from None

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        kind = _kind(member)
        if kind is not None:
            raise self.refused(member.name, f"it is {kind}")
        parts = member_parts(member.name, self.limits, folder=member.isdir())
        if isinstance(parts, str):
            raise self.refused(member.name, parts)
        if member.isdir():
            self.make_dirs(member.name, parts)  # [] for "." or "./": the top folder itself
            return
        if not parts:
            raise self.refused(member.name, "a file needs a name")
        if self.total + member.size > self.byte_bound:  # the header says so: stop before reading
            raise self.too_big(member.name)
        self.make_dirs(member.name, parts[:-1])
        source = tar.extractfile(member)
        assert source is not None  # a regular file
        self.write_file(member.name, parts, source)

    def make_dirs(self, name: str, parts: list[str]) -> None:
        """Each folder of `parts` under the root, made here (or made earlier by this unpack)."""
        path = self.root
        for part in parts:
            path = path / part
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise self.refused(name, f"{part!r} is a file earlier in the archive") from None
                continue
            except OSError as exc:
                raise self.cannot_write(path, exc) from None
            os.chmod(path, DIR_MODE)  # whatever the umask

    def write_file(self, name: str, parts: list[str], source) -> None:
        """Copy a member's bytes into a file created here, counting the bytes really read (not
        the header's size)."""
        path = self.root.joinpath(*parts)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise self.refused(name, "it appears twice, or as both a folder and a file") from None
        except OSError as exc:
            raise self.cannot_write(path, exc) from None
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                self.total += len(chunk)
                if self.total > self.byte_bound:
                    raise self.too_big(name)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise self.cannot_write(path, exc) from None
            os.fchmod(out.fileno(), FILE_MODE)

    def cannot_write(self, path: Path, exc: OSError) -> UserError:
        return UserError(f"cannot unpack {self.archive}: writing {path} failed ({exc.strerror})")

    def refused(self, name: str, why: str) -> Refused:
        return Refused(f"{self.archive}: member {name!r} refused: {why}; {WHAT_IS_ACCEPTED}")

    def too_big(self, name: str) -> Refused:
        return Refused(
            f"{self.archive}: member {name!r} refused: the archive unpacks to more than "
            f"{self.byte_bound} bytes (the bound: {self.bound_why})"
        )


def member_parts(name: str, limits: Limits = LIMITS, *, folder: bool = False) -> list[str] | str:
    """A member name's components (leading "./" dropped, and a folder's trailing "/"; [] for the
    top folder itself), or why the name is not a plain relative one."""
    if "\x00" in name:
        return "its name holds a NUL byte"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not UTF-8"
    if len(encoded) > limits.max_name_bytes:
        return f"its name is longer than {limits.max_name_bytes} bytes"
    if name.startswith("/"):
        return "its name is absolute"
    if any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in name):
        return "its name holds a control character or a backslash"
    if folder:
        name = name.rstrip("/")
    while name.startswith("./"):
        name = name[2:]
    if name in ("", "."):
        return []
    parts = name.split("/")
    if len(parts) > limits.max_depth:
        return f"it is more than {limits.max_depth} folders deep"
    for part in parts:
        if part == "..":
            return "its name climbs out with '..'"
        if part in ("", "."):
            return "its name has an empty or '.' component"
        if len(part.encode("utf-8")) > limits.max_component_bytes:
            return f"a component of its name is longer than {limits.max_component_bytes} bytes"
    return parts


def _kind(member: tarfile.TarInfo) -> str | None:
    """What a member is when it is neither a regular file nor a folder (None when it is one)."""
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    if member.isreg() or member.isdir():
        return None
    return f"of tar type {member.type!r}"
