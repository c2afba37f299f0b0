"""Local endpoints: the serving image's `serve` entry in the background on 127.0.0.1, as a
process group or as a container (targets.runners), one folder each under <home>/endpoints/ with
one record (targets.endpoint_record). `serve` writes its state to a file (contract.
SERVE_STATE_FILE_ENV): `deploy` waits on that file, whichever runs it, not on log sentences.
Also the HTTP client every local endpoint is invoked with."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from imgclf import archives
from imgclf.contract import RESPONSE_FORMAT_ENV, SERVE_WORKERS_ENV
from imgclf.errors import UserError
from imgclf.targets.docker import CONTAINER_PREFIX
from imgclf.targets.endpoint_record import (
    CONTAINER,
    NEXT_MODEL,
    PROCESS,
    RECORD_FILE,
    BadRecord,
    Endpoint,
    endpoint_folder,
    endpoints_dir,
    legacy_container_folder,
    list_endpoints,
    load_endpoint,
    read_endpoint,
    read_record,
    read_state,
    warn,
)
from imgclf.targets.runners import runner_of
from imgclf.util import plain_dir, write_json

READY_TIMEOUT_SECONDS = 300
SWAP_LOCK = "swap.lock"  # held (flock) by the `deploy` that swaps the model


def _record(home: Path, name: str) -> Path:
    return endpoint_folder(home, name) / RECORD_FILE


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


def endpoint_state(endpoint: Endpoint) -> str:
    """healthy, unhealthy (why), dead, stale (why), or orphaned (serve gone, its processes
    not)."""
    runner = runner_of(endpoint)
    if runner.alive(endpoint):
        ok, why = ping_reason(endpoint.port)
        return "healthy" if ok else f"unhealthy ({why})"
    stale = runner.stale(endpoint)
    if stale:
        return f"stale ({stale})"
    return runner.leftover(endpoint) or "dead"


def running_endpoint(home: Path, name: str) -> Endpoint | None:
    """The endpoint of that name where what `deploy` started still runs (an unusable record
    is warned about and counts as none)."""
    endpoint = load_endpoint(home, name)
    return endpoint if endpoint is not None and runner_of(endpoint).alive(endpoint) else None


def running_endpoints(home: Path) -> list[Endpoint]:
    return [e for e in list_endpoints(home) if runner_of(e).alive(e)]


def name_taken(home: Path, name: str) -> bool:
    """Anything at the endpoint's folder (or where an older imgclf kept a container's)."""
    return os.path.lexists(endpoint_folder(home, name)) or os.path.lexists(
        legacy_container_folder(home, name)
    )


def deploy(
    home: Path,
    model: Path,
    *,
    name: str,
    port: int,
    image: str | None = None,
    workers: int | None = None,
    response_format: str | None = None,
    environment: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT_SECONDS,
) -> Endpoint:
    """Start `serve` over <home>/endpoints/<name>/model on 127.0.0.1:<port> in the background
    (the serving `image` as a container, or a process); return once it reports itself ready in
    its state file and /ping agrees. `environment`: more of the serving contract's settings (a
    batch transform's, for one)."""
    endpoint = Endpoint(
        name, port, endpoint_folder(home, name), str(Path(model).resolve()), kind=PROCESS
    )
    if image:
        endpoint = dataclasses.replace(endpoint, kind=CONTAINER, image=image)
    runner = runner_of(endpoint)
    runner.check()
    _clear_old(home, name)
    if not port_free(port):
        raise UserError(f"port {port} is in use; pick another with --port")
    plain_dir(endpoints_dir(home), "endpoints folder")
    endpoint.base.mkdir(mode=0o700)  # the staged model and the state file: ours alone
    settings = dict(environment or {})
    if workers:
        settings[SERVE_WORKERS_ENV] = str(workers)
    if response_format:
        settings[RESPONSE_FORMAT_ENV] = response_format
    try:
        unpack_model(Path(model), endpoint.base / "model")
        endpoint = runner.start(endpoint, settings)
    except BaseException:
        shutil.rmtree(endpoint.base, ignore_errors=True)
        raise
    write_json(_record(home, name), endpoint.to_dict())
    _wait_ready(endpoint, timeout)
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
    if os.path.lexists(legacy_container_folder(home, name)):
        raise UserError(
            f"endpoint {name} exists (a container endpoint recorded by an older imgclf); "
            f"`launch.py delete {name}` first, or pick another --name"
        )
    if existing is None:
        if os.path.lexists(endpoint_folder(home, name)):
            raise UserError(
                f"{endpoint_folder(home, name)} is in the way and is not an endpoint folder; "
                "remove it, or pick another --name"
            )
        return
    runner = runner_of(existing)
    if runner.alive(existing):
        raise UserError(
            f"endpoint {name} is already running on port {existing.port}; "
            f"`launch.py delete {name}` first, or pick another --name"
        )
    runner.stop(existing)  # what is left of it, if any; nothing that is not ours
    shutil.rmtree(existing.base, ignore_errors=True)


def swap_refusal(endpoint: Endpoint, image: str | None) -> str | None:
    """Why a `deploy` (of `image`, or as a process) cannot swap the model of this running
    endpoint; None where `swap_model` may be tried."""
    return runner_of(endpoint).swap_refusal(endpoint, image)


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
        state = _state(endpoint)
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
            if runner_of(endpoint).send_swap(endpoint):
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
        state = _state(endpoint)
        swap = _swap(state)
        if swap.get("id", 0) > before and swap.get("state") == "done":
            return None
        if swap.get("id", 0) > before and swap.get("state") == "failed":
            return str(swap.get("reason") or "serve gave no reason; see its log")
        if not runner_of(endpoint).alive(endpoint) or state.get("state") != "ready":
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
    swap = _swap(_state(endpoint))
    if swap.get("state") == "loading":
        return f"{endpoint.model} -> {endpoint.next_model} (swapping)"
    # A deploy that stopped waiting: serve finished after it.
    return endpoint.next_model if swap.get("state") == "done" else endpoint.model


def _state(endpoint: Endpoint) -> dict:
    """What the endpoint's serve last wrote to its state file (endpoint_record.read_state)."""
    return read_state(runner_of(endpoint).state_file(endpoint.base))


def _last_line(log_file: Path) -> str:
    """The log's last line (the folder, log included, is removed after a failed start)."""
    try:
        lines = [x for x in log_file.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        lines = []
    return lines[-1][-300:] if lines else "no log"


def _wait_ready(endpoint: Endpoint, timeout: float) -> None:
    """Until serve's state file says ready and /ping agrees; a serve that failed or exited is
    stopped, its folder removed, and its reason raised (the one it recorded, else its log's
    last line)."""
    runner = runner_of(endpoint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = not runner.alive(endpoint)
        state = _state(endpoint)  # after the exit check: a failed serve wrote it first
        if exited or state.get("state") == "failed":
            runner.stop(endpoint, grace=10)  # failed and stopping: let it finish
            reason = state.get("reason") or f"it exited: {_last_line(endpoint.log_file)}"
            shutil.rmtree(endpoint.base, ignore_errors=True)
            raise UserError(f"endpoint {endpoint.name} did not start: {reason}")
        if state.get("state") == "ready" and ping(endpoint.port):
            return
        time.sleep(0.3)
    runner.stop(endpoint)
    raise UserError(
        f"endpoint {endpoint.name} was not ready within {timeout:.0f} s; see {endpoint.log_file}"
    )


def drop_unreadable(folder: Path, name: str, exc: BadRecord) -> None:
    """`delete` of an endpoint whose record cannot be used: nothing is signalled and its folder
    is removed, unless the folder is a link (what it points at is not ours to delete)."""
    if folder.is_symlink():
        raise UserError(f"{exc}; nothing was deleted: remove the link yourself") from None
    warn(f"endpoint {name}: {exc}")
    shutil.rmtree(folder, ignore_errors=True)


def delete_endpoint(home: Path, name: str) -> str:
    """Stop what `deploy` started for the endpoint (nothing else) and remove its folder; what
    was done, for the user."""
    folder = endpoint_folder(home, name)
    if not os.path.lexists(folder) and os.path.lexists(legacy_container_folder(home, name)):
        return _delete_legacy_container(home, name)
    try:
        endpoint = read_endpoint(home, name)
    except BadRecord as exc:
        drop_unreadable(folder, name, exc)
        return (
            "its record could not be read, so nothing was signalled; folder removed (had it "
            f"run in a container: docker rm --force {CONTAINER_PREFIX}{name})"
        )
    if endpoint is None:
        known = ", ".join(e.name for e in list_endpoints(home)) or "none"
        raise UserError(f"no local endpoint named {name} (running: {known})")
    runner = runner_of(endpoint)
    stale = runner.stale(endpoint)
    was_running = runner.stop(endpoint)
    shutil.rmtree(endpoint.base, ignore_errors=True)
    if stale:
        return f"not stopped: {stale}"
    return "stopped" if was_running else "was not running; removed"


def _delete_legacy_container(home: Path, name: str) -> str:
    """`delete` of a container endpoint recorded by an older imgclf (<home>/endpoints-docker/):
    its container, by the name derived from the endpoint's, and its folder."""
    folder = legacy_container_folder(home, name)
    try:
        read_record(folder, "container.json", {"name": str, "image": str})
    except BadRecord as exc:
        drop_unreadable(folder, name, exc)
        return (
            "its record could not be read: folder removed, no container touched (if "
            f"{CONTAINER_PREFIX}{name} is yours: docker rm --force {CONTAINER_PREFIX}{name})"
        )
    old = Endpoint(name, 0, folder, "", kind=CONTAINER)  # no id: its container by name
    was_running = runner_of(old).stop(old)
    shutil.rmtree(folder, ignore_errors=True)
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
