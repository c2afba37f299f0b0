"""The serving image's `serve` entry (and the local target's endpoint): a supervisor that runs
multi-model-server with our handler and makes the endpoint's promises true whatever MMS does.

What MMS 1.1.11 gives, and what it does not (read from its Java frontend):
- `default_response_timeout` is in minutes; the seconds key is `default_response_timeout_seconds`.
  When it expires MMS kills the worker and restarts it: it is a last resort, our handler's work
  limits keep every request far below it.
- `job_queue_size` (default 100) answers 503 at once when full: we set it above what the front
  hands MMS at a time, so requests queue instead of failing.
- No header, body or idle timeout and no connection cap; bodies over `max_request_size` get a
  reset or an empty 413; its own errors name Java classes; its /ping says 200 with an
  "Unhealthy" body when no worker can answer; SIGTERM closes every connection at once; after
  the worker's parent process dies it may never start a worker again.
So MMS listens on private loopback ports only, and the public port is served by front.py, a
small HTTP/1.1 server that enforces the limits, queues, answers /ping from the workers' real
state, and drains on SIGTERM. This module starts MMS, watches its workers through the management
API, restarts it when no worker can answer for a while (or its backend process is gone), and
exits non-zero when it cannot bring it back, so the platform replaces the container.

Process tree: serve leads its own process group, and MMS (launcher, Java, Python workers) stays
in it, so `killpg` of serve's pid stops everything even after serve itself was killed. A tiny
watchdog child kills the group the moment serve dies, so nothing outlives it.

Why not sagemaker-inference's `start_model_server`: it writes /etc/sagemaker-mms.properties
(root only), binds the management API to 0.0.0.0, pip-installs a requirements.txt found in the
model at start-up, and its Transformer puts tracebacks in error responses.

MMS 1.1 gives the model it loads at start-up (`--models`) a batch size of 1, so serve starts
MMS with no model and registers it through the management API with `batch_size` and
`max_batch_delay` (IMGCLF_BATCH_SIZE, IMGCLF_MAX_BATCH_DELAY_MS): concurrent requests then reach
a worker together and share one forward pass, each still answered on its own. A model
registered that way is not MMS's start-up model, so the front posts to `/predictions/model`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from imgclf.contract import (
    BASE_DIR_ENV,
    CPU_RUNTIME_ENV,
    DEFAULT_BASE_DIR,
    MMS_WORKERS_ENV,
    RESPONSE_FORMAT_ENV,
    SERVE_BATCH_DELAY_ENV,
    SERVE_BATCH_SIZE_ENV,
    SERVE_BIND_HOST_ENV,
    SERVE_BODY_TIMEOUT_ENV,
    SERVE_DRAIN_ENV,
    SERVE_HANDLER_ENV,
    SERVE_HEADER_TIMEOUT_ENV,
    SERVE_IDLE_TIMEOUT_ENV,
    SERVE_MAX_CONNECTIONS_ENV,
    SERVE_MODEL_DIR_ENV,
    SERVE_PORT_ENV,
    SERVE_RECOVER_ENV,
    SERVE_STARTUP_TIMEOUT_ENV,
    SERVE_STATE_FILE_ENV,
    SERVE_TIMEOUT_ENV,
    SERVE_WORKERS_ENV,
    WORKER_LOADED_DIR_ENV,
)
from imgclf.processes import cmdline, group_members, lead_own_group, process_start
from imgclf.serving import front
from imgclf.util import cpu_count, write_json

log = logging.getLogger("imgclf.serve")

MODEL_NAME = "model"
PREDICT_PATH = f"/predictions/{MODEL_NAME}"  # where the front posts requests in MMS
HANDLER = "imgclf.serving.handler_service"
MAX_REQUEST_BYTES = 6 * 1024 * 1024
# Headroom over the 6 MB limit for the framing of a request that is exactly 6 MB (the front
# enforces the limit on the body itself).
MAX_REQUEST_FRAME = MAX_REQUEST_BYTES + 64 * 1024
JOB_QUEUE_SIZE = 1024  # MMS's queue; the front hands it at most Limits.upstream_concurrency
PROBE_MAX_AGE_S = 0.5  # /ping asks the management API again when its answer is older
BACKEND_GRACE_S = 3.0  # MMS's worker parent gone this long: restart MMS
STOP_GRACE_S = 5.0  # MMS's processes get SIGTERM, then SIGKILL after this


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
    drain_s: float = 30.0  # IMGCLF_DRAIN_SECONDS: SIGTERM waits this long for requests in flight
    recover_after_s: float = 20.0  # IMGCLF_RECOVER_SECONDS: no worker ready this long: restart
    max_restarts: int = 3  # restarts in a row that do not bring a worker back: exit 1
    response_format: str = "predictions"  # IMGCLF_RESPONSE_FORMAT: the default answer format
    batch_size: int = 8  # IMGCLF_BATCH_SIZE: requests per handler call (one forward pass)
    max_batch_delay_ms: int = 1  # IMGCLF_MAX_BATCH_DELAY_MS: wait for more after the first
    limits: front.Limits = front.Limits()  # the front's timeouts and caps (IMGCLF_*, below)


def default_workers() -> int:
    """One per GPU; on CPU one per four cores (each worker uses several threads)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return max(1, cpu_count() // 4)


def _number(environ, name: str, default: str, kind=int):
    raw = environ.get(name) or default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def read_settings(environ) -> ServeSettings:
    base = Path(environ.get(BASE_DIR_ENV, DEFAULT_BASE_DIR))
    fmt = environ.get(RESPONSE_FORMAT_ENV) or "predictions"
    if fmt not in ("predictions", "vectors"):
        raise ValueError(f"{RESPONSE_FORMAT_ENV}={fmt!r}: use predictions or vectors")
    return ServeSettings(
        model_dir=Path(environ.get(SERVE_MODEL_DIR_ENV, str(base / "model"))),
        bind_host=environ.get(SERVE_BIND_HOST_ENV, "0.0.0.0"),  # noqa: S104 - the container port
        port=_number(environ, SERVE_PORT_ENV, "8080"),
        workers=_number(environ, SERVE_WORKERS_ENV, str(default_workers())),
        timeout_s=_number(environ, SERVE_TIMEOUT_ENV, "60"),
        startup_timeout_s=_number(environ, SERVE_STARTUP_TIMEOUT_ENV, "300"),
        handler=environ.get(SERVE_HANDLER_ENV, HANDLER),
        cpu_runtime=environ.get(CPU_RUNTIME_ENV, "auto"),
        drain_s=_number(environ, SERVE_DRAIN_ENV, "30", float),
        recover_after_s=_number(environ, SERVE_RECOVER_ENV, "20", float),
        response_format=fmt,
        batch_size=_number(environ, SERVE_BATCH_SIZE_ENV, "8"),
        max_batch_delay_ms=_number(environ, SERVE_BATCH_DELAY_ENV, "1"),
        limits=front.Limits(
            request_timeout_s=_number(environ, SERVE_TIMEOUT_ENV, "60", float),
            header_timeout_s=_number(environ, SERVE_HEADER_TIMEOUT_ENV, "10", float),
            body_timeout_s=_number(environ, SERVE_BODY_TIMEOUT_ENV, "30", float),
            idle_timeout_s=_number(environ, SERVE_IDLE_TIMEOUT_ENV, "75", float),
            max_connections=_number(environ, SERVE_MAX_CONNECTIONS_ENV, "1024"),
        ),
    )


def front_limits(settings: ServeSettings) -> front.Limits:
    return settings.limits


def mms_config_properties(
    settings: ServeSettings, *, inference_port: int, management_port: int, model_store: Path
) -> str:
    """The MMS config file's text (pure). Every key as MMS 1.1.11's ConfigManager reads it."""
    props = {
        # Both on loopback: the public port is the front's.
        "inference_address": f"http://127.0.0.1:{inference_port}",
        # Management registers models from URLs: never reachable from outside.
        "management_address": f"http://127.0.0.1:{management_port}",
        "model_store": str(model_store),
        "default_service_handler": settings.handler,
        "default_workers_per_model": str(settings.workers),
        # Seconds (the plain key is read in minutes); when it expires MMS restarts the worker.
        "default_response_timeout_seconds": str(settings.timeout_s),
        "default_response_timeout": str(max(1, math.ceil(settings.timeout_s / 60))),
        "job_queue_size": str(JOB_QUEUE_SIZE),
        "max_request_size": str(MAX_REQUEST_FRAME),
        "max_response_size": str(MAX_REQUEST_BYTES),
        "decode_input_request": "false",  # our handler reads the raw bytes, JSON included
        "enable_envvars_config": "false",
        "blacklist_env_vars": "AWS_.*",  # workers never see AWS credentials
        "async_logging": "true",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def registration_path(settings: ServeSettings) -> str:
    """The management API call that loads the model with batching (pure). `url` is the model's
    directory in the model store; the response timeout is left to the config file's seconds
    key (the API's `response_timeout` is in minutes); not synchronous: serve polls the workers.
    """
    query = {
        "url": settings.model_dir.name,
        "model_name": MODEL_NAME,
        "batch_size": settings.batch_size,
        "max_batch_delay": settings.max_batch_delay_ms,
        "initial_workers": settings.workers,
        "synchronous": "false",
    }
    return "/models?" + urllib.parse.urlencode(query)


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


def loaded_workers(folder: Path | None, workers: list[int]) -> list[int]:
    """The worker processes that marked themselves loaded in `folder` (handler_service.
    mark_loaded): a file named by the pid, holding the start time of that very process."""
    if folder is None:
        return []
    loaded = []
    for pid in workers:
        try:
            mark = (folder / str(pid)).read_text()
        except OSError:
            continue
        if mark and mark == process_start(pid):
            loaded.append(pid)
    return loaded


def ready_workers(doc) -> int:
    """READY workers in MMS's `GET /models/NAME` answer (a dict, or a list of one)."""
    doc = doc[0] if isinstance(doc, list) and doc else doc
    if not isinstance(doc, dict):
        return 0
    return sum(1 for w in doc.get("workers", []) if w.get("status") == "READY")


# ---------------------------------------------------------------- processes


WATCHDOG = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
if sys.stdin.buffer.read(1) != b"q":  # EOF: serve died without saying goodbye
    os.killpg(0, signal.SIGKILL)
"""


def start_watchdog() -> subprocess.Popen:
    """A child in serve's group that holds a pipe only serve writes to: when serve dies for any
    reason (SIGKILL included) the pipe closes and the watchdog kills the whole group."""
    return subprocess.Popen(
        [sys.executable, "-c", WATCHDOG], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )


def raise_fd_limit(wanted: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# ---------------------------------------------------------------- the supervisor


async def _get(
    port: int, path: str, timeout: float = 2.0, *, method: str = "GET"
) -> tuple[int, bytes]:
    """GET (or another bodiless method) from MMS's management API (which keeps connections
    open: read by length)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            request = (
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(request.encode())
            status, headers = front.parse_response_head(await reader.readuntil(b"\r\n\r\n"))
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        finally:
            writer.close()
    return status, body


class Supervisor:
    """MMS's life: start, watch through the management API, restart, stop."""

    def __init__(self, settings: ServeSettings, environ: dict[str, str], workdir: Path) -> None:
        self.settings, self.environ, self.workdir = settings, environ, workdir
        self.pgid = os.getpgid(0)
        self.proc: subprocess.Popen | None = None
        self.management_port: int | None = None
        self.upstream = front.Upstream(front_limits(settings), PREDICT_PATH)
        self.restarting = True
        self.runs = 0
        self._probe: tuple[float, bool, str] = (0.0, False, "starting")
        self._probe_task: asyncio.Task | None = None
        self._last_ready = time.monotonic()  # a worker was ready, or connected and loading
        self._last_loaded = self._last_ready  # a worker was ready
        self._backend_missing_since: float | None = None
        self._backend_seen = False  # MMS's backend process, at the last probe
        self._inference_port: int | None = None
        self.failed_restarts = 0

    # -- MMS

    def _command(self, config: Path) -> list[str]:
        return [
            str(Path(sys.executable).parent / "multi-model-server"),
            "--start",
            "--foreground",
            "--mms-config",
            str(config),
            "--model-store",
            str(self.settings.model_dir.parent),
        ]  # no --models: start_mms registers the model with batching (see the docstring)

    async def start_mms(self, timeout_s: float) -> None:
        """Start MMS on fresh private ports; return once its workers have loaded the model."""
        self.runs += 1
        run_dir = self.workdir / f"run-{self.runs}"  # MMS's pid file, sockets and logs
        run_dir.mkdir()
        inference_port, management_port = free_port(), free_port()
        while management_port == inference_port:
            management_port = free_port()
        # Our handler marks each worker here once its model is loaded; another handler (an A/B
        # benchmark's) does not, and its workers count as ready when MMS says so.
        loaded_dir = run_dir / "loaded"
        loaded_dir.mkdir()
        self._loaded_dir = loaded_dir if self.settings.handler == HANDLER else None
        config = run_dir / "config.properties"
        config.write_text(
            mms_config_properties(
                self.settings,
                inference_port=inference_port,
                management_port=management_port,
                model_store=self.settings.model_dir.parent,
            )
        )
        env = {k: v for k, v in self.environ.items() if not k.startswith("AWS_")}
        env.update(
            {
                "TMPDIR": str(run_dir),
                "TEMP": str(run_dir),
                MMS_WORKERS_ENV: str(self.settings.workers),
                WORKER_LOADED_DIR_ENV: str(loaded_dir),
                RESPONSE_FORMAT_ENV: self.settings.response_format,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        # Same process group as serve (no new session): killpg(serve) reaches every MMS process.
        self.proc = subprocess.Popen(
            self._command(config), cwd=run_dir, env=env, stdin=subprocess.DEVNULL
        )
        self.management_port, self._inference_port = management_port, inference_port
        deadline = time.monotonic() + timeout_s
        registered = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"multi-model-server exited with {self.proc.returncode}")
            if not registered:
                registered = await self._register()
                if not registered:
                    await asyncio.sleep(0.25)
                    continue
            ok, _ = await self.probe(max_age=0)
            if ok and self._ready_count >= self.settings.workers:
                break
            await asyncio.sleep(0.25)
        else:
            raise RuntimeError("the model's workers did not start in time")
        self._ready_again()

    async def _register(self) -> bool:
        """Register the model with batching; False while the management API is not up yet."""
        try:
            status, body = await _get(
                self.management_port, registration_path(self.settings), 10.0, method="POST"
            )
        except (OSError, TimeoutError, ValueError, IndexError, EOFError):
            return False
        if status not in (200, 202, 409):  # 409: registered already (an answer lost)
            raise RuntimeError(f"multi-model-server refused the model ({status}): {body[:300]!r}")
        log.info(
            "model registered in multi-model-server: batch size %d, max batch delay %d ms",
            self.settings.batch_size,
            self.settings.max_batch_delay_ms,
        )
        return True

    def _ready_again(self) -> None:
        self.upstream.retarget(self._inference_port)
        self.restarting = False
        self._last_ready = self._last_loaded = time.monotonic()
        self._backend_missing_since = None

    async def stop_mms(self, grace_s: float = STOP_GRACE_S) -> None:
        """Every process of the group but serve and its watchdog: SIGTERM, then SIGKILL."""
        self.upstream.retarget(None)
        keep = {os.getpid(), *self.keep}
        for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            members = [p for p in group_members(self.pgid) if p not in keep]
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self._reap()
                alive = [
                    p
                    for p, (state, _) in group_members(self.pgid).items()
                    if p not in keep and state != "Z"
                ]
                if not alive:
                    break
                await asyncio.sleep(0.1)
        self._reap()

    keep: tuple[int, ...] = ()  # the watchdog's pid, set by main

    def _reap(self) -> None:
        """Collect exited children: MMS's launcher, and orphans when serve is PID 1."""
        if self.proc is not None:
            self.proc.poll()
        if os.getpid() != 1:
            return
        for pid, (state, ppid) in group_members(self.pgid).items():
            if ppid == 1 and state == "Z" and pid not in self.keep:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    # -- health

    _ready_count = 0  # workers that can answer now
    _connected_count = 0  # workers MMS calls READY (loaded or loading their model)
    _loaded_dir: Path | None = None

    async def probe(self, max_age: float = PROBE_MAX_AGE_S) -> tuple[bool, str]:
        """Whether a worker can answer now, from the management API (one query at a time)."""
        stamp, ok, why = self._probe
        if time.monotonic() - stamp <= max_age:
            return ok, why
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.ensure_future(self._query())
        return await asyncio.shield(self._probe_task)

    async def _query(self) -> tuple[bool, str]:
        try:
            status, body = await _get(self.management_port, f"/models/{MODEL_NAME}")
            count = ready_workers(json.loads(body)) if status == 200 else 0
            why = "" if count else "no worker has the model loaded"
        except (OSError, TimeoutError, ValueError, IndexError, TypeError, EOFError):
            count, why = 0, "the model server does not answer"
        # MMS marks a worker READY until it notices the process is gone; the processes
        # themselves say so at once.
        backends, workers = self._mms_processes()
        self._backend_seen = bool(backends)
        # MMS also calls a worker READY from the moment it connects, before its model is
        # loaded: only a worker that marked itself loaded can answer now.
        connected = min(count, len(workers))
        if connected and self._loaded_dir is not None:
            count = min(connected, len(loaded_workers(self._loaded_dir, workers)))
            why = "" if count else "the model is still loading"
        elif count:
            count = connected
            why = "" if count else "no worker process is alive"
        self._ready_count, self._connected_count = count, connected
        result = (count > 0, why)
        self._probe = (time.monotonic(), *result)
        return result

    def can_forward(self) -> bool:
        """From the last probe: a worker was ready (requests wait in the front otherwise)."""
        return not self.restarting and self._probe[1]

    def _mms_processes(self) -> tuple[list[int], list[int]]:
        """(backend processes: children of Java; workers: other model_service_worker ones)."""
        members = group_members(self.pgid)
        javas = {p for p in members if " com.amazonaws.ml.mms.ModelServer" in cmdline(p)}
        backends, workers = [], []
        for pid, (state, ppid) in members.items():
            if state in ("Z", "X") or "model_service_worker" not in cmdline(pid):
                continue
            (backends if ppid in javas else workers).append(pid)
        return backends, workers

    async def ready(self) -> tuple[bool, str]:
        """For /ping: 200 only while MMS runs and one of its workers has the model loaded."""
        if self.restarting or self.proc is None or self.proc.poll() is not None:
            return False, "the model server is (re)starting"
        return await self.probe()

    def forget_probe(self) -> None:
        """A request just failed upstream: the next /ping asks MMS afresh."""
        self._probe = (0.0, False, "")

    async def watch(self, stopping: asyncio.Event) -> int:
        """Restart MMS when it exits, when its backend is gone, or when no worker is ready for
        recover_after_s. Returns 1 when restarts stop bringing it back."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1.0)
            if stopping.is_set():
                break
            self._reap()
            why = None
            now = time.monotonic()
            if self.proc is None or self.proc.poll() is not None:
                why = "multi-model-server exited"
            else:
                ok, _ = await self.probe()
                if ok and self.restarting:  # came up after its start-up timeout after all
                    self._ready_again()
                if ok:
                    self._last_ready = self._last_loaded = now
                elif self._connected_count:
                    # A worker loading its model is not stuck, for as long as a start may take.
                    self._last_ready = now
                    if now - self._last_loaded > self.settings.startup_timeout_s:
                        why = (
                            "no worker finished loading the model in "
                            f"{self.settings.startup_timeout_s} s"
                        )
                elif now - self._last_ready > self.settings.recover_after_s:
                    why = f"no worker was ready for {self.settings.recover_after_s:.0f} s"
                if self._backend_seen:
                    self._backend_missing_since = None
                elif self._backend_missing_since is None:
                    self._backend_missing_since = now
                elif now - self._backend_missing_since > BACKEND_GRACE_S:
                    why = "the workers' parent process is gone"
            if why is None:
                continue
            log.error("%s: restarting multi-model-server", why)
            self.restarting = True
            await self.stop_mms(grace_s=1.0)
            try:
                await self.start_mms(self.settings.startup_timeout_s)
                self.failed_restarts = 0
                log.info("multi-model-server restarted; endpoint ready again")
            except RuntimeError as exc:
                self.failed_restarts += 1
                log.error("restart %d failed: %s", self.failed_restarts, exc)
                if self.failed_restarts >= self.settings.max_restarts:
                    log.error("giving up: the platform should replace this endpoint")
                    return 1
                self._last_ready = self._last_loaded = time.monotonic()
        return 0


class StateFile:
    """`serve`'s state for whoever started it (the launcher's `deploy` waits on it): JSON at
    contract.SERVE_STATE_FILE_ENV, replaced atomically at each change; nothing when unset."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None

    def set(self, state: str, reason: str = "") -> None:
        if self.path is None:
            return
        try:
            write_json(self.path, {"state": state, "reason": reason, "pid": os.getpid()})
        except OSError as exc:  # the launcher then times out and names the log
            log.warning("cannot write the state file %s: %s", self.path, exc.strerror)

    def failed(self, message: str, *args) -> int:
        """Log the reason and record it: the exit code 1."""
        log.error(message, *args)
        self.set("failed", message % args)
        return 1


async def _serve(
    settings: ServeSettings, environ: dict[str, str], workdir: Path, state: StateFile
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    supervisor = Supervisor(settings, environ, workdir)
    watchdog = start_watchdog()
    supervisor.keep = (watchdog.pid,)
    gate = front.Front(
        front_limits(settings),
        supervisor.upstream,
        supervisor.ready,
        can_forward=supervisor.can_forward,
        on_upstream_failure=supervisor.forget_probe,
    )
    code = 0
    try:
        try:
            await gate.start(settings.bind_host, settings.port)
        except OSError as exc:
            return state.failed(
                "cannot listen on %s:%d: %s", settings.bind_host, settings.port, exc.strerror
            )
        starting = asyncio.ensure_future(supervisor.start_mms(settings.startup_timeout_s))
        stop_wait = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        elif starting.exception() is not None:
            return state.failed("endpoint failed to start: %s", starting.exception())
        if not stopping.is_set():
            log.info(
                "endpoint ready on %s:%d (%d workers)",
                settings.bind_host,
                settings.port,
                settings.workers,
            )
            state.set("ready")
            code = await supervisor.watch(stopping)
        if code:
            state.set("failed", "multi-model-server kept failing; replace this endpoint")
        else:
            state.set("stopping")
        log.info("stopping: draining requests in flight (up to %.0f s)", settings.drain_s)
        drained = await gate.drain(settings.drain_s)
        log.info("answers by status: %s", dict(sorted(gate.counters.answered.items())))
        log.info("drain %s; stopping multi-model-server", "done" if drained else "cut short")
        stop_wait.cancel()
    finally:
        await supervisor.stop_mms()
        with contextlib.suppress(OSError):
            watchdog.stdin.write(b"q")
            watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=5)
    return code


def main(environ=None) -> int:
    environ = dict(os.environ if environ is None else environ)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    state = StateFile(environ.get(SERVE_STATE_FILE_ENV))
    state.set("starting")
    try:
        settings = read_settings(environ)
    except ValueError as exc:
        return state.failed("cannot serve: %s", exc)
    try:
        preflight(settings.model_dir, cpu_runtime=settings.cpu_runtime)
    except Exception as exc:  # a broken artifact: say so in one line, open no port
        return state.failed("cannot serve the model at %s: %s", settings.model_dir, exc)
    lead_own_group()
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="imgclf-serve-"))
    try:
        code = asyncio.run(_serve(settings, environ, workdir, state))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if code == 0:
        state.set("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
