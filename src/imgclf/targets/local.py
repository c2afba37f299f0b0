"""The local target: a job directory shaped like /opt/ml and the image's own `train` entry
(sagemaker-training) run over it as a child process, or the image itself under Docker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imgclf.contract import (
    BASE_DIR_ENV,
    COMBINED_CHANNEL,
    PROCESSES_PER_HOST_KEY,
    TORCH_DISTRIBUTED_KEY,
    TRAIN_IMAGE_ENV,
    Layout,
)
from imgclf.errors import UserError

HOST = "algo-1"
STOP_GRACE_SECONDS = 120  # what SageMaker gives a stopped job


def default_home() -> Path:
    return Path(os.environ.get("IMGCLF_HOME", ".imgclf")).resolve()


@dataclass(frozen=True)
class LocalJob:
    name: str
    layout: Layout
    data_dir: Path

    @property
    def log_file(self) -> Path:
        return self.layout.base / "train.log"


def new_job_name(prefix: str = "imgclf") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


DEBUG_HOOK_CONFIG = {
    "LocalPath": "/opt/ml/output/tensors",
    "HookParameters": {"save_interval": "10"},
    "CollectionConfigurations": [
        {"CollectionName": "losses", "CollectionParameters": {"save_interval": "1"}},
        {"CollectionName": "gradients", "CollectionParameters": {"save_interval": "10"}},
        {"CollectionName": "weights", "CollectionParameters": {"save_interval": "10"}},
    ],
}


def prepare_job(
    home: Path,
    name: str,
    *,
    data_dir: Path,
    hyperparameters: dict[str, str],
    nproc: int = 1,
    link_data: bool = True,
    debug: bool = False,
) -> LocalJob:
    """Lay out jobs/<name>/ as SageMaker lays out /opt/ml. A job dir that exists keeps its
    checkpoints/ (so the job resumes) and gets fresh config, model/ and output/."""
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise UserError(f"--data {data_dir} is not a directory")
    layout = Layout(home / "jobs" / name)
    for stale in (layout.base / "input", layout.model_dir, layout.output_dir, layout.code_dir):
        if stale.is_symlink() or stale.is_file():
            stale.unlink()
        elif stale.exists():
            shutil.rmtree(stale)
    for folder in (
        layout.config_dir,
        layout.data_dir,
        layout.model_dir,
        layout.output_data_dir,
        layout.checkpoint_dir,
    ):
        folder.mkdir(parents=True, exist_ok=True)
    hps = {str(k): str(v) for k, v in hyperparameters.items()}
    if nproc > 1:
        hps[TORCH_DISTRIBUTED_KEY] = "true"
        hps[PROCESSES_PER_HOST_KEY] = str(nproc)
    _write(layout.config_dir / "hyperparameters.json", hps)
    _write(
        layout.config_dir / "resourceconfig.json",
        {"current_host": HOST, "hosts": [HOST], "network_interface_name": "lo"},
    )
    _write(
        layout.config_dir / "inputdataconfig.json",
        {
            COMBINED_CHANNEL: {
                "TrainingInputMode": "File",
                "S3DistributionType": "FullyReplicated",
                "RecordWrapperType": "None",
            }
        },
    )
    if debug:  # the file SageMaker writes for a DebugHookConfig (container paths)
        _write(layout.config_dir / "debughookconfig.json", DEBUG_HOOK_CONFIG)
    channel = layout.data_dir / COMBINED_CHANNEL
    if link_data:
        channel.symlink_to(data_dir, target_is_directory=True)
    else:
        channel.mkdir()
    return LocalJob(name, layout, data_dir)


def _write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def job_environment(job: LocalJob, base_env: dict[str, str] | None = None) -> dict[str, str]:
    """The image's environment over the job dir; AWS credentials are not passed to the job."""
    env = {k: v for k, v in (base_env or os.environ).items() if not k.startswith("AWS_")}
    bindir = str(Path(sys.executable).parent)
    env.update(TRAIN_IMAGE_ENV)
    env.update(
        {
            BASE_DIR_ENV: str(job.layout.base),
            "TRAINING_JOB_NAME": job.name,
            "SM_CURRENT_HOST": HOST,
            # sagemaker-training waits until every host name resolves; there is one host, here.
            "SM_STUDIO_LOCAL_MODE": "true",
            "PATH": bindir + os.pathsep + env.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
            # Jobs under one home (or one tuning dir) share their image-check verdicts.
            "IMGCLF_SCAN_CACHE": str(job.layout.base.parent.parent / "scans"),
        }
    )
    return env


def train_command() -> list[str]:
    """sagemaker-training's `train` console script: what the image's ENTRYPOINT runs."""
    script = Path(sys.executable).parent / "train"
    if not script.exists():
        raise UserError(
            f"{script} is missing: sagemaker-training is not installed in this "
            "Python environment; run `make setup`"
        )
    return [str(script)]


def run_job(
    job: LocalJob,
    command: list[str],
    env: dict[str, str] | None,
    *,
    echo: bool = True,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> int:
    """Run the job's process group, copying its output to train.log (and the console, and
    `on_line`). Ctrl-C or SIGTERM stops it the way SageMaker does: SIGTERM, then SIGKILL after
    the grace period."""
    interactive = echo and sys.stderr.isatty()
    with open(job.log_file, "ab") as log:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=None if interactive else subprocess.STDOUT,  # keep the progress bar live
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if on_start is not None:
            on_start(proc)
        previous = None
        if threading.current_thread() is threading.main_thread():
            # `kill` of the launcher stops the job the same way (SIGTERM to its group), and
            # whoever handled SIGTERM before (the tuner) still hears it.
            def on_sigterm(signum, frame):
                signal_group(proc, signal.SIGTERM)
                if callable(previous):
                    previous(signum, frame)

            previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
                if on_line is not None:
                    on_line(line.decode("utf-8", "replace"))
            return proc.wait()
        except KeyboardInterrupt:
            stop_process_group(proc)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if proc.poll() is None:
                stop_process_group(proc)


def signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def stop_process_group(proc: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> int:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return proc.wait()
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


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


def read_failure(job: LocalJob) -> str | None:
    path = job.layout.failure_file
    return path.read_text().strip() if path.exists() else None


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


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=timeout) as r:  # noqa: S310
            return r.status == 200
    except OSError:
        return False


def deploy(
    home: Path,
    model: Path,
    *,
    name: str,
    port: int,
    workers: int | None = None,
    timeout: float = READY_TIMEOUT_SECONDS,
) -> Endpoint:
    """Start `serve` over <home>/endpoints/<name>/model on 127.0.0.1:<port> in the background;
    return once it answers a real prediction."""
    existing = load_endpoint(home, name)
    if existing is not None:
        if process_alive(existing.pid):
            raise UserError(
                f"endpoint {name} is already running on port {existing.port}; "
                f"`launch.py delete {name}` first, or pick another --name"
            )
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
            "SAGEMAKER_BIND_TO_PORT": str(port),
            "IMGCLF_BIND_HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if workers:
        env["SAGEMAKER_MODEL_SERVER_WORKERS"] = str(workers)
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
    """SIGTERM (MMS drains), then SIGKILL after `grace`; True when it had been running."""
    if not process_alive(endpoint.pid):
        return False
    try:
        os.killpg(endpoint.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(endpoint.pid):
        time.sleep(0.2)
    if _group_alive(endpoint.pid):
        os.killpg(endpoint.pid, signal.SIGKILL)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap it if it is our own child that has exited
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def delete_endpoint(home: Path, name: str) -> Endpoint:
    endpoint = load_endpoint(home, name)
    if endpoint is None:
        known = ", ".join(e.name for e in list_endpoints(home)) or "none"
        raise UserError(f"no local endpoint named {name} (running: {known})")
    stop_endpoint(endpoint)
    shutil.rmtree(endpoint.base, ignore_errors=True)
    return endpoint


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
