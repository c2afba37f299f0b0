"""Small torch-free helpers shared across the package: atomic writes, folders and locks that
follow no pre-placed link, booleans from strings, the CPU count, job names, secrets masked in
text that is printed."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from imgclf.errors import UserError

# What SageMaker hyperparameters, environment switches and our CLI accept as true / false.
TRUE_STRINGS = frozenset({"true", "1", "yes", "y", "on"})
FALSE_STRINGS = frozenset({"false", "0", "no", "n", "off"})


def parse_bool(value: Any) -> bool | None:
    """ "True", "1", "yes", "on" (any case, surrounding quotes and spaces ignored) → True; the
    false words → False; anything else → None, for the caller to name as an error."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().strip('"').strip().lower()
    if text in TRUE_STRINGS:
        return True
    if text in FALSE_STRINGS:
        return False
    return None


def atomic_write(
    path: Path, content: bytes | str | Callable[[IO[bytes]], Any], *, mode: int = 0o644
) -> None:
    """Write through a temp file in the same folder, then rename over `path`: a reader (or a
    resumed job) sees the old file or the new one, never half of one. `content` is the bytes,
    the text, or a function that writes to the binary handle. The file gets `mode` (mkstemp's
    0600 would travel in a model.tar.gz and lock out a server of another uid)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """`obj` as JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free loopback TCP port in [low, high) (MMS refused ports above 32767, so tests and
    benchmarks keep below)."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {low} and {high}")


def _not_a_link(path: Path, what: str) -> UserError:
    return UserError(
        f"{what} {path} is a symbolic link; imgclf does not follow links it did not make in its "
        "folders: remove the link"
    )


def plain_dir(path: Path, what: str = "folder") -> Path:
    """`path` as a real folder: made when missing (with its parents), refused when it is a
    symbolic link (a pre-placed link would send a job's writes and deletions elsewhere)."""
    path = Path(path)
    if path.is_symlink():
        raise _not_a_link(path, what)
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():  # placed between the check and the mkdir
        raise _not_a_link(path, what)
    return path


def open_lock(path: Path) -> IO[str]:
    """Open (creating it) a lock file for flock, read/write, without following a link placed
    at its path (O_NOFOLLOW): the lock never truncates or writes a file it points at."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if Path(path).is_symlink():
            raise _not_a_link(Path(path), "lock file") from None
        raise
    return os.fdopen(fd, "r+")


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def new_job_name(prefix: str = "imgclf") -> str:
    """prefix-YYYYmmdd-HHMMSS in UTC: the same form for local and SageMaker jobs."""
    return f"{prefix}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


# scheme://user:PASSWORD@host, the password taken to the last "@" of the URL (an unencoded "@"
# in it must not leave its end shown), and ?password=... style query values.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)\S*(?=@[^\s@]*)")
_QUERY_SECRET = re.compile(
    r"([?&](?:password|passwd|pwd|secret|token|sslpassword|api_key)=)[^&\s#]+", re.IGNORECASE
)
MASK = "***"


def mask_secrets(text: str) -> str:
    """`text` with every password of a URL in it replaced by ***: what a storage URL (or an
    error that quotes one) looks like when printed or logged."""
    return _QUERY_SECRET.sub(rf"\g<1>{MASK}", _URL_PASSWORD.sub(rf"\g<1>{MASK}", text))
