"""The local target: jobs (imgclf.jobs) as processes or under Docker, and local endpoints (the
serving image's `serve` entry as a process group)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from imgclf.contract import (
    BASE_DIR_ENV,
    COMBINED_CHANNEL,
    HOME_ENV,
    RESPONSE_FORMAT_ENV,
    SERVE_BIND_HOST_ENV,
    SERVE_PORT_ENV,
    SERVE_WORKERS_ENV,
)
from imgclf.errors import UserError
from imgclf.jobs import (  # noqa: F401 - the local target's job verbs, re-exported
    HOST,
    STOP_GRACE_SECONDS,
    LocalJob,
    job_environment,
    lock_job,
    new_job_name,
    prepare_job,
    process_alive,
    read_failure,
    run_job,
    signal_group,
    stop_process_group,
    train_command,
)


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV, ".imgclf")).resolve()


def docker_command(job: LocalJob, image: str, *, gpus: bool | None = None) -> list[str]:
    """`docker run` of the training image over the job dir, as SageMaker runs it: `algo-1`
    resolvable, no network (which proves the job needs none), the data read-only."""
    if gpus is None:
        gpus = shutil.which("nvidia-smi") is not None
    command = [
        "docker",
        "run",
        "--rm",
        "--name",
        job.name,
        "--network",
        "none",
        "--hostname",
        HOST,
        # sagemaker-training waits until every host in resourceconfig.json resolves.
        "--add-host",
        f"{HOST}:127.0.0.1",
        "--shm-size",
        "2g",  # DataLoader workers share batches through /dev/shm
        "-v",
        f"{job.layout.base}:/opt/ml",
        "-v",
        f"{job.data_dir}:/opt/ml/input/data/{COMBINED_CHANNEL}:ro",
        "-e",
        f"TRAINING_JOB_NAME={job.name}",
    ]
    if gpus:
        command += ["--gpus", "all"]
    return command + [image, "train"]


def require_docker() -> None:
    if shutil.which("docker") is None:
        raise UserError(
            "--docker needs the docker command, which is not installed; drop "
            "--docker to run the same entry point without Docker"
        )
    probe = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
        raise UserError(
            f"no Docker engine is reachable ({reason}); start one, or drop --docker "
            "to run the same entry point without Docker"
        )


# ---------------------------------------------------------------- endpoints

READY_TIMEOUT_SECONDS = 300


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
        return {
            "name": self.name,
            "port": self.port,
            "pid": self.pid,
            "base": str(self.base),
            "model": self.model,
        }


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
    """A model dir is linked; a model.tar.gz (what SageMaker makes) is unpacked safely."""
    import tarfile

    source = source.resolve()
    if source.is_dir():
        target.symlink_to(source, target_is_directory=True)
    elif source.is_file() and tarfile.is_tarfile(source):
        target.mkdir()
        with tarfile.open(source) as archive:
            archive.extractall(target, filter="data")  # no absolute paths, links out, devices
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
    serve_alive = process_alive(endpoint.pid) and _not_zombie(endpoint.pid)
    if not serve_alive:
        return "orphaned (delete stops it)" if _group_alive(endpoint.pid) else "dead"
    ok, why = ping_reason(endpoint.port)
    return "healthy" if ok else f"unhealthy ({why})"


def _not_zombie(pid: int) -> bool:
    from imgclf.serving.serve import proc_stat

    stat = proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")  # no /proc: trust kill(pid, 0)


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
    return once /ping says a worker can answer."""
    existing = load_endpoint(home, name)
    if existing is not None:
        if process_alive(existing.pid) and _not_zombie(existing.pid):
            raise UserError(
                f"endpoint {name} is already running on port {existing.port}; "
                f"`launch.py delete {name}` first, or pick another --name"
            )
        stop_endpoint(existing)  # what is left of it, if `serve` died
        shutil.rmtree(existing.base, ignore_errors=True)
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            reason = _log_reason(endpoint.log_file)
            shutil.rmtree(base, ignore_errors=True)
            raise UserError(f"endpoint {name} did not start: {reason}")
        if _ready(endpoint.log_file) and ping(port):
            return endpoint
        time.sleep(0.3)
    stop_endpoint(endpoint)
    raise UserError(f"endpoint {name} was not ready within {timeout:.0f} s; see {base}/serve.log")


def _ready(log_file: Path) -> bool:
    return b"endpoint ready on" in log_file.read_bytes()


def _log_reason(log_file: Path) -> str:
    lines = log_file.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if "cannot serve" in line or "failed to start" in line:
            return line.split(": ", 1)[-1] if "imgclf.serve" in line else line
    return f"see {log_file}"


def stop_endpoint(endpoint: Endpoint, grace: float = 60.0) -> bool:
    """SIGTERM to `serve` alone (it drains requests in flight, then stops MMS), then SIGKILL
    to its whole process group after `grace`. `serve` leads that group and MMS stays in it,
    so this stops every process even when `serve` itself has died. True when any was running."""
    if not _group_alive(endpoint.pid):
        return False
    if process_alive(endpoint.pid) and _not_zombie(endpoint.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(endpoint.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(endpoint.pid):
            time.sleep(0.2)
    if _group_alive(endpoint.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(endpoint.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(endpoint.pid):
            time.sleep(0.1)
    return True


def _group_alive(pgid: int) -> bool:
    """Any process of the group is running (zombies waiting to be reaped do not count)."""
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap it if it is our own child that has exited
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    from imgclf.serving.serve import group_members

    if not Path("/proc").is_dir():
        return True
    return any(state not in ("Z", "X") for state, _ in group_members(pgid).values())


def delete_endpoint(home: Path, name: str) -> tuple[Endpoint, bool]:
    """Stop the endpoint's processes and remove its folder: (endpoint, whether any ran)."""
    endpoint = load_endpoint(home, name)
    if endpoint is None:
        known = ", ".join(e.name for e in list_endpoints(home)) or "none"
        raise UserError(f"no local endpoint named {name} (running: {known})")
    was_running = stop_endpoint(endpoint)
    shutil.rmtree(endpoint.base, ignore_errors=True)
    return endpoint, was_running


CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


def invoke(
    endpoint: Endpoint,
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
    url = f"{endpoint.url}/invocations"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            return exc.code, json.loads(payload)
        except ValueError:
            return exc.code, {"error": payload.decode(errors="replace")[:500]}


# ---------------------------------------------------------------- endpoints under Docker

CONTAINER_PREFIX = "imgclf-endpoint-"


@dataclass(frozen=True)
class ContainerEndpoint:
    """A local endpoint run by the serving image (`deploy --docker IMAGE`): host network, bound
    to 127.0.0.1, the model read-only at /opt/ml/model, as root as SageMaker runs it."""

    name: str
    port: int
    image: str
    base: Path
    model: str

    @property
    def container(self) -> str:
        return CONTAINER_PREFIX + self.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "port": self.port,
            "image": self.image,
            "base": str(self.base),
            "model": self.model,
        }


def _containers_dir(home: Path) -> Path:
    return home / "endpoints-docker"


def load_container_endpoint(home: Path, name: str) -> ContainerEndpoint | None:
    path = _containers_dir(home) / name / "container.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return ContainerEndpoint(
        doc["name"], int(doc["port"]), doc["image"], Path(doc["base"]), doc["model"]
    )


def list_container_endpoints(home: Path) -> list[ContainerEndpoint]:
    root = _containers_dir(home)
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [e for e in (load_container_endpoint(home, n) for n in names) if e is not None]


def container_running(container: str) -> bool:
    probe = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Running}}", container],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return probe.returncode == 0 and probe.stdout.strip() == "true"


def serve_container_command(
    endpoint: ContainerEndpoint,
    model_dir: Path,
    *,
    workers: int | None = None,
    gpus: bool | None = None,
) -> list[str]:
    """`docker run` of the serving image as SageMaker runs it (`serve`, the model at
    /opt/ml/model, no --user), on the host's network and bound to 127.0.0.1 only."""
    if gpus is None:
        gpus = shutil.which("nvidia-smi") is not None
    command = [
        "docker",
        "run",
        "--detach",
        "--name",
        endpoint.container,
        "--network",
        "host",
        "-v",
        f"{model_dir}:/opt/ml/model:ro",
        "-e",
        f"SAGEMAKER_BIND_TO_PORT={endpoint.port}",
        "-e",
        "IMGCLF_BIND_HOST=127.0.0.1",
    ]
    if workers:
        command += ["-e", f"SAGEMAKER_MODEL_SERVER_WORKERS={workers}"]
    if gpus:
        command += ["--gpus", "all"]
    return command + [endpoint.image, "serve"]


def container_logs(container: str, tail: int = 200) -> str:
    proc = subprocess.run(
        ["docker", "logs", "--tail", str(tail), container],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout + proc.stderr


def _remove_container(container: str, grace: float = 60.0) -> None:
    """SIGTERM (the server drains), SIGKILL after `grace`, then remove the container."""
    for command in (
        ["docker", "stop", "--time", str(int(grace)), container],
        ["docker", "rm", "--force", container],
    ):
        subprocess.run(command, capture_output=True, timeout=grace + 60)


def deploy_container(
    home: Path,
    model: Path,
    *,
    name: str,
    port: int,
    image: str,
    workers: int | None = None,
    timeout: float = READY_TIMEOUT_SECONDS,
) -> ContainerEndpoint:
    """Run the serving image over a model dir or model.tar.gz; return once /ping answers 200."""
    if load_container_endpoint(home, name) is not None or load_endpoint(home, name) is not None:
        raise UserError(
            f"endpoint {name} exists; `launch.py delete {name}` first, or pick another --name"
        )
    if not port_free(port):
        raise UserError(f"port {port} is in use; pick another with --port")
    base = _containers_dir(home) / name
    base.mkdir(parents=True)
    endpoint = ContainerEndpoint(name, port, image, base, str(Path(model).resolve()))
    try:
        source = Path(model).resolve()
        if source.is_dir():
            model_dir = source
        else:
            unpack_model(source, base / "model")  # model.tar.gz, unpacked as SageMaker does
            model_dir = base / "model"
        subprocess.run(["docker", "rm", "--force", endpoint.container], capture_output=True)
        started = subprocess.run(
            serve_container_command(endpoint, model_dir, workers=workers),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if started.returncode != 0:
            reason = (started.stderr.strip().splitlines() or ["no reason given"])[-1]
            raise UserError(f"docker run of {image} failed: {reason}")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    (base / "container.json").write_text(json.dumps(endpoint.to_dict(), indent=2) + "\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(port):
            return endpoint
        if not container_running(endpoint.container):
            lines = container_logs(endpoint.container).strip().splitlines()
            reason = next(
                (line for line in reversed(lines) if "cannot serve" in line),
                lines[-1] if lines else "no log",
            )
            delete_container_endpoint(home, name)
            raise UserError(f"endpoint {name} did not start: {reason}")
        time.sleep(0.5)
    delete_container_endpoint(home, name)
    raise UserError(
        f"endpoint {name} was not ready within {timeout:.0f} s; "
        f"`docker logs {endpoint.container}` says why"
    )


def delete_container_endpoint(home: Path, name: str) -> ContainerEndpoint:
    endpoint = load_container_endpoint(home, name)
    if endpoint is None:
        raise UserError(f"no local container endpoint named {name}")
    _remove_container(endpoint.container)
    shutil.rmtree(endpoint.base, ignore_errors=True)
    return endpoint
