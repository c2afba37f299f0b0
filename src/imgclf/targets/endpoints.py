"""Local endpoints: the serving image's `serve` entry as a background process group on
127.0.0.1, one folder each under <home>/endpoints/. `serve` writes its state to
<folder>/state.json (contract.SERVE_STATE_FILE_ENV): `deploy` waits on that file, not on log
sentences. Also the HTTP client every local endpoint (process or container) is invoked with.

An endpoint's record (endpoint.json) is read as untrusted input: written atomically, skipped
with a warning when it cannot be read, its folder derived from the name (never from the
record), and its pid signalled only while it still names the process `deploy` started (the
pid with its start time and the boot it was read in)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from imgclf import archives
from imgclf.contract import (
    BASE_DIR_ENV,
    RESPONSE_FORMAT_ENV,
    SERVE_BIND_HOST_ENV,
    SERVE_NEXT_MODEL_DIR_ENV,
    SERVE_PORT_ENV,
    SERVE_STATE_FILE_ENV,
    SERVE_WORKERS_ENV,
    check_name,
)
from imgclf.errors import UserError
from imgclf.processes import (
    boot_id,
    group_alive,
    group_members,
    process_start,
    running,
    same_process,
)
from imgclf.util import plain_dir, write_json

READY_TIMEOUT_SECONDS = 300
STATE_FILE = "state.json"  # what `serve` writes where SERVE_STATE_FILE_ENV says
NEXT_MODEL = "model-next"  # where `deploy` stages a model for a running serve (swap_model)
SWAP_LOCK = "swap.lock"  # held (flock) by the `deploy` that swaps the model


@dataclass(frozen=True)
class Endpoint:
    """A local endpoint: the serving image's `serve` entry running in the background."""

    name: str
    port: int
    pid: int
    base: Path
    model: str
    start: str | None = None  # `serve`'s start time (processes.process_start) ...
    boot: str | None = None  # ... in this boot (processes.boot_id): with the pid, one process
    next_model: str | None = None  # the model a `deploy` is swapping in (swap_model)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.base / "serve.log"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "base": str(self.base)}


class BadRecord(UserError):
    """A launcher record that cannot be used: truncated, not ours, or reached through a link."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _endpoints_dir(home: Path) -> Path:
    return home / "endpoints"


def endpoint_folder(home: Path, name: str) -> Path:
    """<home>/endpoints/<name>, for a valid endpoint name only."""
    return _endpoints_dir(home) / check_name("endpoint", name)


def _record(home: Path, name: str) -> Path:
    return endpoint_folder(home, name) / "endpoint.json"


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
    for key, kind in fields.items():
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise BadRecord(f"{path}: {key!r} is missing or not a {kind.__name__}")
    if doc["name"] != folder.name:
        raise BadRecord(f"{path} names endpoint {doc['name']!r}, not {folder.name!r}")
    return doc


def _optional_text(doc: dict, key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) and value else None


def read_endpoint(home: Path, name: str) -> Endpoint | None:
    """The endpoint's record; None when there is no endpoint of that name; BadRecord when
    its record cannot be used."""
    folder = endpoint_folder(home, name)
    doc = read_record(folder, "endpoint.json", {"name": str, "port": int, "pid": int, "model": str})
    if doc is None:
        return None
    return Endpoint(
        name,
        doc["port"],
        doc["pid"],
        folder,  # where the record is, not what it says: a record cannot point delete elsewhere
        doc["model"],
        _optional_text(doc, "start"),
        _optional_text(doc, "boot"),
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
    found = (load_endpoint(home, n) for n in record_names(_endpoints_dir(home)))
    return [e for e in found if e is not None]


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def unpack_model(source: Path, target: Path) -> None:
    """A model dir is linked; a model.tar.gz (what SageMaker makes) is unpacked by
    `archives.unpack` (plain files and folders only, bounded) into `target`."""
    source = source.resolve()
    if source.is_dir():
        target.symlink_to(source, target_is_directory=True)
    elif archives.is_archive(source):
        archives.unpack(source, target)
    else:
        raise UserError(f"--model {source}: not a model directory nor a model.tar.gz")


def ping(port: int, timeout: float = 2.0) -> bool:
    return ping_reason(port, timeout)[0]


def ping_reason(port: int, timeout: float = 2.0) -> tuple[bool, str]:
    """(/ping is 200, why not): the endpoint's own account of whether a worker can answer."""
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{port}/ping"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310
            return r.status == 200, ""
    except urllib.error.HTTPError as exc:
        try:
            why = json.loads(exc.read()).get("why") or f"/ping says {exc.code}"
        except (ValueError, AttributeError):
            why = f"/ping says {exc.code}"
        return False, str(why)
    except OSError as exc:
        return False, f"nothing answers on port {port} ({exc.__class__.__name__})"


def _same_boot(endpoint: Endpoint) -> bool:
    return bool(endpoint.boot) and endpoint.boot == boot_id()


def serve_running(endpoint: Endpoint) -> bool:
    """The `serve` that `deploy` started is running: the pid still names that process."""
    return (
        _same_boot(endpoint)
        and same_process(endpoint.pid, endpoint.start)
        and running(endpoint.pid)
    )


def _orphans_ours(endpoint: Endpoint) -> bool:
    """`serve` is gone and its process group lives on (MMS): ours when this is the boot it was
    started in and every member started after it. (A group id is not given to a new group
    while the old one has members; only after it emptied and the pid came round again could
    it name somebody else's group, and then its members would all have started after ours.)"""
    if not (_same_boot(endpoint) and endpoint.start) or running(endpoint.pid):
        return False
    members = group_members(endpoint.pid)
    starts = [process_start(pid) for pid in members]
    return bool(members) and all(s is not None and int(s) >= int(endpoint.start) for s in starts)


def stale_reason(endpoint: Endpoint) -> str | None:
    """Why the record names no process we may signal (None when it still does, or when its
    pid is simply gone)."""
    if not endpoint.start or not endpoint.boot:
        return (
            "its record has no start time, so its pid names no process we may signal; "
            "delete removes its folder only"
        )
    if not _same_boot(endpoint):
        return "the machine has restarted since it was deployed; delete removes its folder only"
    if running(endpoint.pid) and not same_process(endpoint.pid, endpoint.start):
        return (
            f"pid {endpoint.pid} is another process now, not its serve; delete removes its "
            "folder only"
        )
    return None


def endpoint_state(endpoint: Endpoint) -> str:
    """healthy, unhealthy (why), dead, stale (why), or orphaned (serve gone, its processes
    not)."""
    if serve_running(endpoint):
        ok, why = ping_reason(endpoint.port)
        return "healthy" if ok else f"unhealthy ({why})"
    stale = stale_reason(endpoint)
    if stale:
        return f"stale ({stale})"
    if group_alive(endpoint.pid) and _orphans_ours(endpoint):
        return "orphaned (delete stops it)"
    return "dead"


def deploy(
    home: Path,
    model: Path,
    *,
    name: str,
    port: int,
    workers: int | None = None,
    response_format: str | None = None,
    environment: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT_SECONDS,
) -> Endpoint:
    """Start `serve` over <home>/endpoints/<name>/model on 127.0.0.1:<port> in the background;
    return once it reports itself ready in its state file and /ping agrees. `environment`: more
    of the serving contract's settings (a batch transform's, for one)."""
    _clear_old(home, name)
    if not port_free(port):
        raise UserError(f"port {port} is in use; pick another with --port")
    base = endpoint_folder(home, name)
    plain_dir(_endpoints_dir(home), "endpoints folder")
    base.mkdir(mode=0o700)  # the staged model and the state file: ours alone
    try:
        unpack_model(Path(model), base / "model")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            BASE_DIR_ENV: str(base),
            SERVE_PORT_ENV: str(port),
            SERVE_BIND_HOST_ENV: "127.0.0.1",
            SERVE_STATE_FILE_ENV: str(base / STATE_FILE),
            SERVE_NEXT_MODEL_DIR_ENV: str(base / NEXT_MODEL),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if workers:
        env[SERVE_WORKERS_ENV] = str(workers)
    if response_format:
        env[RESPONSE_FORMAT_ENV] = response_format
    env.update(environment or {})
    serve = Path(sys.executable).parent / "serve"
    with open(base / "serve.log", "ab") as log:
        proc = subprocess.Popen(
            [str(serve)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    endpoint = Endpoint(
        name,
        port,
        proc.pid,
        base,
        str(Path(model).resolve()),
        start=process_start(proc.pid),  # the child cannot have been reaped: it is ours to wait
        boot=boot_id(),
    )
    write_json(_record(home, name), endpoint.to_dict())
    _wait_ready(endpoint, proc, timeout)
    return endpoint


def _clear_old(home: Path, name: str) -> None:
    """Refuse a name that is running; clear what is left of one whose `serve` died."""
    try:
        existing = read_endpoint(home, name)
    except BadRecord as exc:
        raise UserError(
            f"endpoint {name} cannot be deployed over: {exc}; `launch.py delete {name}` "
            "removes it, or pick another --name"
        ) from None
    if existing is None:
        if os.path.lexists(endpoint_folder(home, name)):
            raise UserError(
                f"{endpoint_folder(home, name)} is in the way and is not an endpoint folder; "
                "remove it, or pick another --name"
            )
        return
    if serve_running(existing):
        raise UserError(
            f"endpoint {name} is already running on port {existing.port}; "
            f"`launch.py delete {name}` first, or pick another --name"
        )
    stop_endpoint(existing)  # its orphans, if any; nothing that is not ours
    shutil.rmtree(existing.base, ignore_errors=True)


def swap_model(
    home: Path, endpoint: Endpoint, model: Path, *, timeout: float = READY_TIMEOUT_SECONDS
) -> Endpoint:
    """A new model for a running endpoint, its port open all along (serving.serve.Swap does the
    work): the model is staged at <folder>/model-next as `deploy` lays out the first one,
    `serve` is sent SIGHUP, and its state file says when the new model answers and the old one
    is gone, or why the new one was refused; then the old one serves on and this raises a
    UserError with the reason. The channel is private: a signal only serve's own user can send,
    and a folder inside the endpoint's own (mode 0700)."""
    name, base = endpoint.name, endpoint.base
    new = str(Path(model).resolve())
    with _swap_lock(base, name):
        state = read_state(base)
        if state.get("swap_signal") != "SIGHUP" or state.get("state") != "ready":
            raise UserError(
                f"endpoint {name} cannot take a new model while it runs ({_swap_refusal(state)}); "
                f"`launch.py delete {name}` and deploy again, or pick another --name"
            )
        next_dir = base / NEXT_MODEL
        _remove(next_dir)  # left by a deploy that was interrupted
        unpack_model(Path(model), next_dir)
        write_json(_record(home, name), {**endpoint.to_dict(), "next_model": new})
        failed = "the endpoint stopped first"
        try:
            if serve_running(endpoint):
                os.kill(endpoint.pid, signal.SIGHUP)
                failed = _wait_swap(endpoint, _swap_id(state), timeout)
        except BaseException:
            _remove(next_dir)
            write_json(_record(home, name), endpoint.to_dict())
            raise
        if failed is not None:
            _remove(next_dir)
            if not failed.startswith("it did not finish"):  # then serve is still at it
                write_json(_record(home, name), endpoint.to_dict())
            raise UserError(
                f"endpoint {name} still serves {endpoint.model}; the new model {new} was not "
                f"swapped in: {failed.replace(str(next_dir), new)}"
            )
        # The folder holds the model it serves, as after `deploy`.
        old = base / "model-old"
        _remove(old)
        os.rename(base / "model", old)
        os.rename(next_dir, base / "model")
        _remove(old)
        swapped = dataclasses.replace(endpoint, model=new, next_model=None)
        write_json(_record(home, name), swapped.to_dict())
    return swapped


@contextlib.contextmanager
def _swap_lock(base: Path, name: str):
    """One swapping `deploy` per endpoint (flock: released when that deploy dies)."""
    import fcntl

    fd = os.open(base / SWAP_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another deploy is swapping the model of endpoint {name}; wait for it"
            ) from None
        yield
    finally:
        os.close(fd)


def _swap_refusal(state: dict) -> str:
    if state.get("state") != "ready":
        return f"its serve is {state.get('state') or 'not reporting its state'}"
    if state.get("swap_signal") != "SIGHUP":
        return "its serve was started by an imgclf that cannot swap models"
    return "a model swap is under way"


def _swap(state: dict) -> dict:
    swap = state.get("swap")
    return swap if isinstance(swap, dict) and isinstance(swap.get("id"), int) else {}


def _swap_id(state: dict) -> int:
    return _swap(state).get("id", 0)


def _wait_swap(endpoint: Endpoint, before: int, timeout: float) -> str | None:
    """None once serve says swap `before + 1` is done; else why it is not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(endpoint.base)
        swap = _swap(state)
        if swap.get("id", 0) > before and swap.get("state") == "done":
            return None
        if swap.get("id", 0) > before and swap.get("state") == "failed":
            return str(swap.get("reason") or "serve gave no reason; see its log")
        if not serve_running(endpoint) or state.get("state") != "ready":
            return f"the endpoint stopped during the swap ({state.get('state') or 'gone'})"
        time.sleep(0.3)
    return (
        f"it did not finish within {timeout:.0f} s (serve goes on with it: `launch.py "
        f"endpoints` shows when it is done); see {endpoint.log_file}"
    )


def _remove(path: Path) -> None:
    """A file or link (never what it points at), or a folder and what it holds."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def models_served(endpoint: Endpoint) -> str:
    """The model the endpoint serves; during a swap both, as `endpoints` shows them."""
    if not endpoint.next_model:
        return endpoint.model
    swap = _swap(read_state(endpoint.base))
    if swap.get("state") == "loading":
        return f"{endpoint.model} -> {endpoint.next_model} (swapping)"
    # A deploy that stopped waiting: serve finished after it.
    return endpoint.next_model if swap.get("state") == "done" else endpoint.model


def read_state(base: Path) -> dict:
    """What `serve` last wrote to its state file: {"state": starting|ready|failed|stopping|
    stopped, "reason": …, "pid": …}; {} before it wrote one (or if it is half-written: the file
    is replaced atomically, so that is never seen)."""
    try:
        doc = json.loads((base / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _last_line(log_file: Path) -> str:
    """The log's last line (the folder, log included, is removed after a failed start)."""
    try:
        lines = [x for x in log_file.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        lines = []
    return lines[-1][-300:] if lines else "no log"


def _wait_ready(endpoint: Endpoint, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = proc.poll() is not None
        state = read_state(endpoint.base)  # after the exit check: a failed serve wrote it first
        if exited or state.get("state") == "failed":
            if not exited:  # failed, and stopping: let it finish
                stop_endpoint(endpoint, grace=10)
            reason = state.get("reason") or f"it exited: {_last_line(endpoint.log_file)}"
            shutil.rmtree(endpoint.base, ignore_errors=True)
            raise UserError(f"endpoint {endpoint.name} did not start: {reason}")
        if state.get("state") == "ready" and ping(endpoint.port):
            return
        time.sleep(0.3)
    stop_endpoint(endpoint)
    raise UserError(
        f"endpoint {endpoint.name} was not ready within {timeout:.0f} s; see {endpoint.log_file}"
    )


def stop_endpoint(endpoint: Endpoint, grace: float = 60.0) -> bool:
    """SIGTERM to `serve` alone (it drains requests in flight, then stops MMS), then SIGKILL
    to its whole process group after `grace`. `serve` leads that group and MMS stays in it,
    so this stops every process even when `serve` itself has died. Nothing is signalled unless
    the record still names the processes `deploy` started (see `serve_running`,
    `_orphans_ours`). True when any was running."""
    if serve_running(endpoint):
        with contextlib.suppress(ProcessLookupError):
            os.kill(endpoint.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and group_alive(endpoint.pid):
            time.sleep(0.2)
    elif not (group_alive(endpoint.pid) and _orphans_ours(endpoint)):
        return False
    # The group seen alive since `serve` was ours: its id is not reused while it has members.
    if group_alive(endpoint.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(endpoint.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and group_alive(endpoint.pid):
            time.sleep(0.1)
    return True


def drop_unreadable(folder: Path, name: str, exc: BadRecord) -> None:
    """`delete` of an endpoint whose record cannot be used: nothing is signalled and its folder
    is removed, unless the folder is a link (what it points at is not ours to delete)."""
    if folder.is_symlink():
        raise UserError(f"{exc}; nothing was deleted: remove the link yourself") from None
    warn(f"endpoint {name}: {exc}")
    shutil.rmtree(folder, ignore_errors=True)


def delete_endpoint(home: Path, name: str) -> str:
    """Stop the endpoint's processes (only those `deploy` started) and remove its folder;
    what was done, for the user."""
    folder = endpoint_folder(home, name)
    try:
        endpoint = read_endpoint(home, name)
    except BadRecord as exc:
        drop_unreadable(folder, name, exc)
        return "its record could not be read, so nothing was signalled; folder removed"
    if endpoint is None:
        known = ", ".join(e.name for e in list_endpoints(home)) or "none"
        raise UserError(f"no local endpoint named {name} (running: {known})")
    stale = stale_reason(endpoint)
    was_running = stop_endpoint(endpoint)
    shutil.rmtree(endpoint.base, ignore_errors=True)
    if stale:
        return f"not stopped: {stale}"
    return "stopped" if was_running else "was not running; removed"


def invoke(
    url: str,
    body: bytes,
    *,
    content_type: str,
    custom_attributes: str = "",
    timeout: float = 70.0,
) -> tuple[int, object]:
    """POST /invocations as SageMaker's runtime would; returns (status, decoded JSON)."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if custom_attributes:
        headers["X-Amzn-SageMaker-Custom-Attributes"] = custom_attributes
    target = f"{url}/invocations"
    request = urllib.request.Request(target, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            return exc.code, json.loads(payload)
        except ValueError:
            return exc.code, {"error": payload.decode(errors="replace")[:500]}
