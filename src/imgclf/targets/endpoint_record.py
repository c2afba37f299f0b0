"""A local endpoint's record: <home>/endpoints/<name>/endpoint.json, one form for an endpoint
run as a process and one run as a container (its `kind`; targets.runners runs each kind).

A record is read as untrusted input: written atomically, skipped with a warning when it cannot
be read, its folder derived from the name (never from the record), a folder or record placed as
a link refused. What may be signalled is decided by the endpoint's runner, never by the record
alone (a pid with its start time and boot, a container's id)."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from imgclf.contract import check_name
from imgclf.errors import UserError

RECORD_FILE = "endpoint.json"
STATE_FILE = "state.json"  # what `serve` writes where SERVE_STATE_FILE_ENV says
NEXT_MODEL = "model-next"  # where `deploy` stages a model for a running serve (swap_model)
PROCESS, CONTAINER = "process", "container"  # the kinds of endpoint (targets.runners)
# Container endpoints recorded by imgclf before one record served both kinds: listed with a
# warning, removed by `delete` (targets.endpoints).
LEGACY_CONTAINERS_DIR = "endpoints-docker"

# The fields every record holds, and those of each kind, with their types.
_FIELDS: dict[str, type] = {"name": str, "port": int, "model": str}
_KIND_FIELDS: dict[str, dict[str, type]] = {PROCESS: {"pid": int}, CONTAINER: {"image": str}}


@dataclass(frozen=True)
class Endpoint:
    """A local endpoint: the serving image's `serve` entry running in the background, as a
    process group (pid, start, boot) or as a container of `image` (container_id)."""

    name: str
    port: int
    base: Path  # <home>/endpoints/<name>: derived from the name, never read from the record
    model: str
    kind: str = PROCESS
    pid: int | None = None
    start: str | None = None  # `serve`'s start time (processes.process_start) ...
    boot: str | None = None  # ... in this boot (processes.boot_id): with the pid, one process
    image: str | None = None
    container_id: str | None = None  # what `docker run` answered: with the name, one container
    next_model: str | None = None  # the model a `deploy` is swapping in (swap_model)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        """serve's log: written as it runs (a process), or saved when it stops (a container)."""
        return self.base / "serve.log"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "base": str(self.base)}


class BadRecord(UserError):
    """A launcher record that cannot be used: truncated, not ours, or reached through a link."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def endpoints_dir(home: Path) -> Path:
    return home / "endpoints"


def endpoint_folder(home: Path, name: str) -> Path:
    """<home>/endpoints/<name>, for a valid endpoint name only."""
    return endpoints_dir(home) / check_name("endpoint", name)


def legacy_container_folder(home: Path, name: str) -> Path:
    return home / LEGACY_CONTAINERS_DIR / check_name("endpoint", name)


def read_record(folder: Path, file: str, fields: dict[str, type]) -> dict | None:
    """The JSON object in folder/file, with each of `fields` of its type (None where the
    record has no folder; BadRecord, naming the file and why, where it cannot be used)."""
    path = folder / file
    if folder.is_symlink() or path.is_symlink():
        raise BadRecord(f"{path}: a symbolic link, not a record this launcher wrote")
    if not folder.is_dir():
        return None
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadRecord(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise BadRecord(f"{path} cannot be read ({exc})") from None
    if not isinstance(doc, dict):
        raise BadRecord(f"{path} does not hold a JSON object")
    _check_fields(path, doc, fields)
    if doc["name"] != folder.name:
        raise BadRecord(f"{path} names endpoint {doc['name']!r}, not {folder.name!r}")
    return doc


def _check_fields(path: Path, doc: dict, fields: dict[str, type]) -> None:
    for key, kind in fields.items():
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise BadRecord(f"{path}: {key!r} is missing or not a {kind.__name__}")


def _optional_text(doc: dict, key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) and value else None


def read_endpoint(home: Path, name: str) -> Endpoint | None:
    """The endpoint's record; None when there is no endpoint of that name; BadRecord when
    its record cannot be used. A record without a kind (written before there were two) is a
    process endpoint's."""
    folder = endpoint_folder(home, name)
    doc = read_record(folder, RECORD_FILE, _FIELDS)
    if doc is None:
        return None
    kind = doc.get("kind", PROCESS)
    if kind not in _KIND_FIELDS:
        raise BadRecord(
            f"{folder / RECORD_FILE}: unknown kind {kind!r} (only {', '.join(_KIND_FIELDS)})"
        )
    _check_fields(folder / RECORD_FILE, doc, _KIND_FIELDS[kind])
    return Endpoint(
        name,
        doc["port"],
        folder,  # where the record is, not what it says: a record cannot point delete elsewhere
        doc["model"],
        kind,
        doc.get("pid"),
        _optional_text(doc, "start"),
        _optional_text(doc, "boot"),
        _optional_text(doc, "image"),
        _optional_text(doc, "container_id"),
        _optional_text(doc, "next_model"),
    )


def load_endpoint(home: Path, name: str) -> Endpoint | None:
    """The endpoint's record, or None (with a warning naming the file when it is unusable)."""
    try:
        return read_endpoint(home, name)
    except BadRecord as exc:
        warn(f"skipping endpoint {name}: {exc}")
        return None


def record_names(root: Path) -> list[str]:
    """The valid names of the record folders under `root` (others are warned about)."""
    if not root.is_dir():
        return []
    names = []
    for entry in sorted(root.iterdir()):
        if entry.is_symlink() or not entry.is_dir():
            kind = "a symbolic link" if entry.is_symlink() else "a file"
            warn(f"skipping {entry}: {kind}, not a folder this launcher made")
            continue
        try:
            names.append(check_name("endpoint", entry.name))
        except UserError as exc:
            warn(f"skipping {entry}: {exc}")
    return names


def list_endpoints(home: Path) -> list[Endpoint]:
    """Every readable endpoint record (the others, and container endpoints recorded by an
    older imgclf, are warned about)."""
    for name in record_names(home / LEGACY_CONTAINERS_DIR):
        warn(
            f"skipping {legacy_container_folder(home, name)}: a container endpoint recorded by "
            f"an older imgclf; `launch.py delete {name}` stops it and removes its folder"
        )
    found = (load_endpoint(home, n) for n in record_names(endpoints_dir(home)))
    return [e for e in found if e is not None]


def read_state(path: Path) -> dict:
    """What `serve` last wrote to its state file: {"state": starting|ready|failed|stopping|
    stopped, "reason": …, "pid": …}; {} before it wrote one (or if it is half-written: the file
    is replaced atomically, so that is never seen)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
