"""Local endpoints: the serving image's `serve` entry as a background process group on
127.0.0.1, one folder each under <home>/endpoints/. `serve` writes its state to
<folder>/state.json (contract.SERVE_STATE_FILE_ENV): `deploy` waits on that file, not on log
sentences. Also the HTTP client every local endpoint (process or container) is invoked with."""

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
    SERVE_PORT_ENV,
    SERVE_STATE_FILE_ENV,
    SERVE_WORKERS_ENV,
)
from imgclf.errors import UserError
from imgclf.processes import group_alive, running

READY_TIMEOUT_SECONDS = 300
STATE_FILE = "state.json"  # what `serve` writes where SERVE_STATE_FILE_ENV says


@dataclass(frozen=True)
class Endpoint:
    """A local endpoint: the serving image's `serve` entry running in the background."""

    name: str
    port: int
    pid: int
    base: Path
    model: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.base / "serve.log"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "base": str(self.base)}


def _endpoints_dir(home: Path) -> Path:
    return home / "endpoints"


def _record(home: Path, name: str) -> Path:
    return _endpoints_dir(home) / name / "endpoint.json"


def load_endpoint(home: Path, name: str) -> Endpoint | None:
    path = _record(home, name)
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return Endpoint(doc["name"], int(doc["port"]), int(doc["pid"]), Path(doc["base"]), doc["model"])


def list_endpoints(home: Path) -> list[Endpoint]:
    root = _endpoints_dir(home)
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [e for e in (load_endpoint(home, n) for n in names) if e is not None]


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
    """healthy, unhealthy (why), dead, or orphaned (serve gone, its processes not)."""
    serve_alive = running(endpoint.pid)
    if not serve_alive:
        return "orphaned (delete stops it)" if group_alive(endpoint.pid) else "dead"
    ok, why = ping_reason(endpoint.port)
    return "healthy" if ok else f"unhealthy ({why})"


def deploy(
    home: Path,
    model: Path,
    *,
    name: str,
    port: int,
    workers: int | None = None,
    response_format: str | None = None,
    timeout: float = READY_TIMEOUT_SECONDS,
) -> Endpoint:
    """Start `serve` over <home>/endpoints/<name>/model on 127.0.0.1:<port> in the background;
    return once it reports itself ready in its state file and /ping agrees."""
    _clear_old(home, name)
    if not port_free(port):
        raise UserError(f"port {port} is in use; pick another with --port")
    base = _endpoints_dir(home) / name
    base.mkdir(parents=True)
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
            "PYTHONUNBUFFERED": "1",
        }
    )
    if workers:
        env[SERVE_WORKERS_ENV] = str(workers)
    if response_format:
        env[RESPONSE_FORMAT_ENV] = response_format
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
    endpoint = Endpoint(name, port, proc.pid, base, str(Path(model).resolve()))
    _record(home, name).write_text(json.dumps(endpoint.to_dict(), indent=2) + "\n")
    _wait_ready(endpoint, proc, timeout)
    return endpoint


def _clear_old(home: Path, name: str) -> None:
    """Refuse a name that is running; clear what is left of one whose `serve` died."""
    existing = load_endpoint(home, name)
    if existing is None:
        return
    if running(existing.pid):
        raise UserError(
            f"endpoint {name} is already running on port {existing.port}; "
            f"`launch.py delete {name}` first, or pick another --name"
        )
    stop_endpoint(existing)
    shutil.rmtree(existing.base, ignore_errors=True)


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
    so this stops every process even when `serve` itself has died. True when any was running."""
    if not group_alive(endpoint.pid):
        return False
    if running(endpoint.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(endpoint.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and group_alive(endpoint.pid):
            time.sleep(0.2)
    if group_alive(endpoint.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(endpoint.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and group_alive(endpoint.pid):
            time.sleep(0.1)
    return True


def delete_endpoint(home: Path, name: str) -> tuple[Endpoint, bool]:
    """Stop the endpoint's processes and remove its folder: (endpoint, whether any ran)."""
    endpoint = load_endpoint(home, name)
    if endpoint is None:
        known = ", ".join(e.name for e in list_endpoints(home)) or "none"
        raise UserError(f"no local endpoint named {name} (running: {known})")
    was_running = stop_endpoint(endpoint)
    shutil.rmtree(endpoint.base, ignore_errors=True)
    return endpoint, was_running


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
