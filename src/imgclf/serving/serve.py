"""The serving image's `serve` entry (and the local target's endpoint): multi-model-server with
our handler.

Why not sagemaker-inference's `start_model_server`: it writes /etc/sagemaker-mms.properties
(root only), binds the management API to 0.0.0.0, pip-installs a requirements.txt found in the
model at start-up, and its Transformer puts tracebacks in error responses. This module does the
same job in a few steps instead: prove the model loads (load it and run it once on a blank
image) before any port opens; write the MMS config, made by a pure function, to a private
temporary folder; start MMS with the model; wait until its workers have loaded it; pass SIGTERM
on so MMS drains and exits.

MMS 1.1 routes /invocations to its start-up model and gives that model a batch size of 1 (no
setting changes it; registering the model again through the management API drops it from the
start-up set, and /invocations then fails). Several images share one forward pass when they
come in one JSON request; concurrent requests are spread over the workers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from imgclf.contract import BASE_DIR_ENV, CPU_RUNTIME_ENV, DEFAULT_BASE_DIR

log = logging.getLogger("imgclf.serve")

MODEL_NAME = "model"
HANDLER = "imgclf.serving.handler_service"
MAX_REQUEST_BYTES = 6 * 1024 * 1024
# Headroom over the 6 MB limit for the HTTP framing of a request that is exactly 6 MB; our
# handler enforces the limit on the body itself.
MAX_REQUEST_FRAME = MAX_REQUEST_BYTES + 64 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """Read once from the environment (SageMaker's names where SageMaker has one)."""

    model_dir: Path
    bind_host: str
    port: int
    workers: int
    timeout_s: int
    startup_timeout_s: int
    handler: str = HANDLER  # IMGCLF_MMS_HANDLER: another MMS service module (A/B benchmarks)
    cpu_runtime: str = "auto"  # IMGCLF_CPU_RUNTIME: see imgclf.serving.runtime


def default_workers() -> int:
    """One per GPU; on CPU one per four cores (each worker uses several threads)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // 4)


def read_settings(environ) -> ServeSettings:
    base = Path(environ.get(BASE_DIR_ENV, DEFAULT_BASE_DIR))
    workers = environ.get("SAGEMAKER_MODEL_SERVER_WORKERS")
    return ServeSettings(
        model_dir=Path(environ.get("IMGCLF_MODEL_DIR", str(base / "model"))),
        bind_host=environ.get("IMGCLF_BIND_HOST", "0.0.0.0"),  # noqa: S104 - the container port
        port=int(environ.get("SAGEMAKER_BIND_TO_PORT", "8080")),
        workers=int(workers) if workers else default_workers(),
        timeout_s=int(environ.get("SAGEMAKER_MODEL_SERVER_TIMEOUT", "60")),
        startup_timeout_s=int(environ.get("SAGEMAKER_STARTUP_TIMEOUT", "300")),
        handler=environ.get("IMGCLF_MMS_HANDLER", HANDLER),
        cpu_runtime=environ.get(CPU_RUNTIME_ENV, "auto"),
    )


def mms_config_properties(
    settings: ServeSettings, *, management_port: int, model_store: Path
) -> str:
    """The MMS config file's text (pure)."""
    props = {
        "inference_address": f"http://{settings.bind_host}:{settings.port}",
        # Management registers models from URLs: never reachable from outside.
        "management_address": f"http://127.0.0.1:{management_port}",
        "model_store": str(model_store),
        "default_service_handler": settings.handler,
        "default_workers_per_model": str(settings.workers),
        "default_response_timeout": str(settings.timeout_s),
        "max_request_size": str(MAX_REQUEST_FRAME),
        "max_response_size": str(MAX_REQUEST_BYTES),
        "decode_input_request": "false",  # our handler reads the raw bytes, JSON included
        "enable_envvars_config": "false",
        "blacklist_env_vars": "AWS_.*",  # workers never see AWS credentials
        "async_logging": "true",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free loopback port. MMS refuses ports above 32767, so the kernel's pick won't do."""
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


def preflight(model_dir: Path, *, cpu_runtime: str = "auto") -> None:
    """Load the model and predict once on a blank image, in this process, before MMS starts:
    a broken artifact (or an unknown runtime) fails the endpoint's creation instead of
    answering 500s."""
    from PIL import Image

    from imgclf.serving import inference

    loaded = inference.model_fn(model_dir, cpu_runtime=cpu_runtime)
    size = loaded.preprocess.resize_size
    probs = inference.predict_fn([Image.new("RGB", (size, size))], loaded)
    if probs.shape != (1, loaded.num_classes) or not bool(probs.isfinite().all()):
        raise RuntimeError(f"the model's output is {tuple(probs.shape)} or not finite")
    log.info(
        "model at %s loads and predicts on %s: %s, %d classes",
        model_dir,
        loaded.forward.runtime,
        loaded.preprocess,
        loaded.num_classes,
    )


def _http(method: str, url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 - our own http:// URLs
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for_workers(management_port: int, settings: ServeSettings, deadline: float) -> None:
    """Return once every worker has loaded the model (MMS's /ping says 200 before that)."""
    url = f"http://127.0.0.1:{management_port}/models/{MODEL_NAME}"
    while time.monotonic() < deadline:
        status, body = _http("GET", url)
        if status == 200:
            doc = json.loads(body)
            doc = doc[0] if isinstance(doc, list) else doc
            ready = [w for w in doc.get("workers", []) if w.get("status") == "READY"]
            if len(ready) >= settings.workers:
                return
        time.sleep(0.2)
    raise RuntimeError("the model's workers did not start in time")


def wait_until_up(proc: subprocess.Popen, management_port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"multi-model-server exited with {proc.returncode} at start-up")
        try:
            if _http("GET", f"http://127.0.0.1:{management_port}/models", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError("multi-model-server did not start in time")


def main(environ=None) -> int:
    environ = dict(os.environ if environ is None else environ)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    settings = read_settings(environ)
    try:
        preflight(settings.model_dir, cpu_runtime=settings.cpu_runtime)
    except Exception as exc:  # a broken artifact: say so in one line, open no port
        log.error("cannot serve the model at %s: %s", settings.model_dir, exc)
        return 1

    workdir = Path(tempfile.mkdtemp(prefix="imgclf-serve-"))
    management_port = free_port()
    config = workdir / "config.properties"
    config.write_text(
        mms_config_properties(
            settings, management_port=management_port, model_store=settings.model_dir.parent
        )
    )
    child_env = {k: v for k, v in environ.items() if not k.startswith("AWS_")}
    # MMS keeps its pid file in the temp dir, and its logs in the working dir: both private.
    child_env.update(
        {
            "TMPDIR": str(workdir),
            "TEMP": str(workdir),
            "IMGCLF_WORKERS": str(settings.workers),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{child_env.get('PATH', '')}",
        }
    )
    command = [
        str(Path(sys.executable).parent / "multi-model-server"),
        "--start",
        "--foreground",
        "--mms-config",
        str(config),
        "--model-store",
        str(settings.model_dir.parent),
        "--models",
        f"{MODEL_NAME}={settings.model_dir.name}",
    ]
    proc = subprocess.Popen(command, cwd=workdir, env=child_env, start_new_session=True)

    stopping = False

    def on_sigterm(signum, frame):
        nonlocal stopping
        stopping = True
        log.info("SIGTERM: draining and stopping multi-model-server")
        _signal_group(proc, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    try:
        wait_until_up(proc, management_port, time.monotonic() + settings.startup_timeout_s)
        wait_for_workers(management_port, settings, time.monotonic() + settings.startup_timeout_s)
        log.info(
            "endpoint ready on %s:%d (%d workers)",
            settings.bind_host,
            settings.port,
            settings.workers,
        )
        code = proc.wait()
    except Exception as exc:
        if not stopping:
            log.error("endpoint failed to start: %s", exc)
        _signal_group(proc, signal.SIGTERM)
        code = 0 if stopping else 1
    finally:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if stopping else (code or 0)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main())
