"""Everything about multi-model-server (MMS 1.1.11), behind the two calls the front makes:
`post(headers, body, deadline)` and `ready()`. The supervisor (serve.py) starts, probes and
restarts it through `ModelServer` too; nothing else in the package knows MMS exists.

What MMS gives, and what it does not (read from its Java frontend and measured):
- `default_response_timeout` is in minutes; the seconds key is
  `default_response_timeout_seconds`. When it expires MMS kills the worker and restarts it: a
  last resort, our handler's work limits keep every request far below it.
- `job_queue_size` (default 100) answers 503 at once when full: we set it above what the front
  hands MMS at a time, so requests queue instead of failing.
- Its management API registers models from any http(s) URL and stops workers, with no
  authentication (TorchServe's ShellTorch class, never fixed in MMS); its inference API has no
  timeouts or connection cap. So neither listens on TCP: both are Unix sockets (Netty's epoll
  transport, `use_native_io=true`, bundled in MMS's jar) in serve's private folder (mode 0700),
  where only processes of serve's own user (root in a container) can connect: no other local
  user, no other container. MMS's workers talk to its frontend over Unix sockets in its
  java.io.tmpdir (TEMP), which serve also points at that folder. No TCP port of
  ours is left but the public one; SAGEMAKER_SAFE_PORT_RANGE has nothing else to govern.
- A model loaded at start-up (`--models`) gets a batch size of 1, and MMS honours a model
  folder's MAR-INF/MANIFEST.json handler, runs its workers with the model folder as working
  directory and on PYTHONPATH. So MMS starts with no model and a model store that is a private
  copy of the artifact's own files (nothing importable, no manifest), and the model is
  registered through the management API with our handler named explicitly and with batching.
- Its own errors name Java classes, and a worker that died answers `{"message": "Worker died."}`
  (also for a batch whose answer its decoder could not read): `answer()` rewrites them into
  what happened, and only a real worker death is sent once more and called one.
- Its /ping says 200 while a worker connects but before it has loaded its model: readiness is
  read from the management API *and* from the marks our handler leaves once loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.parse
from collections import deque
from pathlib import Path

import h11

from imgclf.contract import (
    GRAPH_FILE,
    GRAPH_RECORD_FILE,
    LABELS_FILE,
    MMS_WORKERS_ENV,
    MODEL_FILE,
    RESPONSE_FORMAT_ENV,
    WORKER_LOADED_DIR_ENV,
)
from imgclf.contract import MODEL_CONFIG_FILE as CONFIG_FILE
from imgclf.processes import cmdline, group_members, process_start
from imgclf.serving.protocol import MAX_BODY_BYTES, RequestError, error_body, is_error_body
from imgclf.serving.settings import HANDLER, Settings

log = logging.getLogger("imgclf.serve")

MODEL_NAME = "model"
PREDICT_PATH = f"/predictions/{MODEL_NAME}"  # a registered (not start-up) model's path
# The artifact's own files: all that MMS's model store ever holds (the ONNX graph and its record
# when the artifact carries them).
ARTIFACT_FILES = (MODEL_FILE, LABELS_FILE, CONFIG_FILE, GRAPH_FILE, GRAPH_RECORD_FILE)
MAX_ARTIFACT_FILE_BYTES = 4 * 1024**3
# Headroom over the body limit for the framing of a request that is exactly at the limit.
FRAME_HEADROOM = 64 * 1024
JOB_QUEUE_SIZE = 1024  # MMS's queue; the front hands it at most Limits.upstream_concurrency
PROBE_MAX_AGE_S = 0.5  # ready() asks the management API again when its answer is older
STOP_GRACE_S = 5.0  # MMS's processes get SIGTERM, then SIGKILL after this
INFERENCE_SOCKET, MANAGEMENT_SOCKET = "inference.sock", "management.sock"


# ---------------------------------------------------------------- what MMS is given (pure)


def config_properties(settings: Settings, *, run_dir: Path, model_store: Path) -> str:
    """The MMS config file's text. Every key as MMS 1.1.11's ConfigManager reads it."""
    props = {
        # Unix sockets in serve's private folder: no TCP port another process can reach.
        "inference_address": f"unix:{run_dir / INFERENCE_SOCKET}",
        "management_address": f"unix:{run_dir / MANAGEMENT_SOCKET}",
        "use_native_io": "true",  # Netty's epoll transport: Unix sockets need it
        "model_store": str(model_store),
        "default_service_handler": settings.handler,
        "default_workers_per_model": str(settings.worker_count),
        # Seconds (the plain key is read in minutes); when it expires MMS restarts the worker.
        "default_response_timeout_seconds": str(math.ceil(settings.timeout_s)),
        "default_response_timeout": str(max(1, math.ceil(settings.timeout_s / 60))),
        "job_queue_size": str(JOB_QUEUE_SIZE),
        "max_request_size": str(settings.limits.max_body_bytes + FRAME_HEADROOM),
        "max_response_size": str(MAX_BODY_BYTES),
        "decode_input_request": "false",  # our handler reads the raw bytes, JSON included
        "enable_envvars_config": "false",
        "blacklist_env_vars": "AWS_.*",  # workers never see AWS credentials
        "async_logging": "true",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def predict_path(name: str) -> str:
    """Where a registered model answers (MMS's /invocations is its start-up model's only)."""
    return f"/predictions/{name}"


def registration_path(settings: Settings, name: str = MODEL_NAME) -> str:
    """The management API call that loads the model: our handler named explicitly (a manifest
    could name another), with batching (a start-up model gets batch size 1). The response
    timeout is the config file's seconds key (the API's is in minutes); not synchronous:
    the supervisor polls the workers."""
    query = {
        "url": name,  # the folder of that name in the private model store
        "model_name": name,
        "handler": settings.handler,
        "runtime": "python",  # the worker's own interpreter (a manifest could name another)
        "batch_size": settings.batch_size,
        "max_batch_delay": settings.max_batch_delay_ms,
        "initial_workers": settings.worker_count,
        "synchronous": "false",
    }
    return "/models?" + urllib.parse.urlencode(query)


def private_store(model_dir: Path, root: Path, name: str = MODEL_NAME) -> Path:
    """A model store for MMS holding a copy of the artifact's own files and nothing else (a
    model folder can hold a Python package, a MAR-INF manifest, links: none of it reaches MMS).
    Returns the folder the model was copied to (`root/name`: a swapped-in model is a second
    folder beside the first). Only regular files are copied, never through a symbolic link; a
    missing file is left for the artifact's loader to name."""
    target = root / name
    target.mkdir(parents=True, mode=0o700)
    for name in ARTIFACT_FILES:
        try:
            # O_NONBLOCK: a FIFO in a model folder must not hang the start.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(model_dir / name, flags)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ValueError(
                f"{model_dir / name} cannot be read ({exc.strerror}): the artifact's files "
                "must be regular files, not links"
            ) from None
        with os.fdopen(fd, "rb") as source:
            info = os.fstat(source.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{model_dir / name} is not a regular file")
            if info.st_size > MAX_ARTIFACT_FILE_BYTES:
                raise ValueError(
                    f"{model_dir / name} is {info.st_size} bytes, over the limit of "
                    f"{MAX_ARTIFACT_FILE_BYTES}"
                )
            with open(target / name, "xb") as copy:
                shutil.copyfileobj(source, copy, 1024 * 1024)
    return target


def ready_workers(doc) -> int:
    """READY workers in MMS's `GET /models/NAME` answer (a dict, or a list of one)."""
    doc = doc[0] if isinstance(doc, list) and doc else doc
    if not isinstance(doc, dict):
        return 0
    return sum(1 for w in doc.get("workers", []) if w.get("status") == "READY")


def loaded_workers(folder: Path | None, workers: list[int], model: str | None = None) -> list[int]:
    """The worker processes that marked themselves loaded in `folder` (handler_service.
    mark_loaded): a file named by the pid, holding the start time of that very process and,
    on its second line, the name of the model it loaded (`model`: only that one's workers)."""
    if folder is None:
        return []
    loaded = []
    for pid in workers:
        try:
            mark = (folder / str(pid)).read_text()
        except OSError:
            continue
        start, _, name = mark.partition("\n")
        if start and start == process_start(pid) and (model is None or name == model):
            loaded.append(pid)
    return loaded


def load_failure(folder: Path | None, model: str) -> str | None:
    """Why a worker could not load `model`, from the marks handler_service.mark_failed leaves
    in `folder` (None: no worker failed to)."""
    if folder is None:
        return None
    for mark in sorted(folder.glob("*.failed")):
        try:
            name, _, why = mark.read_text().partition("\n")
        except OSError:
            continue
        if name == model:
            return why or "a worker could not load it"
    return None


# ---------------------------------------------------------------- MMS's answers


def worker_died(status: int, body: bytes) -> bool:
    """MMS's own answer for a request whose worker process died (or restarted: MMS 1.1 also
    fails a batch whose answer its decoder could not read) while it was being answered."""
    if status < 500:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and "Worker died" in str(doc.get("message", ""))


def answer(status: int, body: bytes) -> tuple[int, bytes]:
    """MMS's answer in our error shape, saying what happened. Our handler's answers pass
    unchanged; MMS's own errors ({"code", "type", "message"}, the type a Java class) become
    ours; "the worker stopped" only when MMS says a worker died."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if is_error_body(doc):
        return status, body
    message = str(doc.get("message", "")) if isinstance(doc, dict) else ""
    if "Worker died" in message:
        return 503, error_body(
            "the model's worker stopped while answering this request",
            "retry; the endpoint restarts its workers by itself",
        )
    if status == 503:  # MMS's queue full, or no worker registered right now
        return 503, error_body(
            "no worker of the model server could take this request now",
            "retry shortly; the endpoint recovers by itself",
        )
    if status == 404:  # the model is not registered (MMS restarting)
        return 503, error_body(
            "the model is not loaded in the model server right now",
            "retry shortly; the endpoint recovers by itself",
        )
    if status == 413:
        return 413, error_body("the request is too large for the model server", "send less")
    if status == 408:
        return 504, error_body("the model did not answer in time", "retry with a smaller request")
    if 400 <= status < 500:
        return status, error_body(
            f"the model server refused the request ({status})",
            "check the request's headers and body",
        )
    # Its body may echo the request's bytes: only its Java type goes to the log.
    kind = str(doc.get("type", ""))[:80] if isinstance(doc, dict) else "not JSON"
    log.warning("multi-model-server answered %d (%s)", status, kind)
    return 502, error_body(
        f"the model server failed on this request ({status})",
        "retry; the endpoint's log has the details",
    )


class NoWorkerInTime(TimeoutError):
    """A request's deadline passed while no worker could take it (MMS restarting, the model
    reloading): the endpoint's state, not the request, is why."""


# ---------------------------------------------------------------- HTTP over MMS's sockets


async def exchange(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """One request and its whole answer over a client h11 connection: (status, headers with
    lower-case names, body)."""
    request = h11.Request(
        method=method,
        target=path,
        headers=[
            ("Host", "localhost"),
            ("Content-Length", str(len(body))),
            # As the client sent them (latin-1: h11 takes obs-text, MMS passes it on).
            *((name, value.encode("latin-1")) for name, value in headers.items()),
        ],
    )
    writer.write(
        conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    )
    await writer.drain()
    response, chunks = None, []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:  # closed mid-answer, or an answer h11 refused
            raise ConnectionResetError(f"the model server's answer broke off: {exc}") from None
        if event is h11.NEED_DATA:
            data = await reader.read(64 * 1024)
            if not data and conn.their_state is h11.SEND_RESPONSE:
                raise ConnectionResetError("the model server closed the connection")
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage) and response is not None:
            names = {k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers}
            return response.status_code, names, b"".join(chunks)
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionResetError("the model server closed the connection")


async def management(
    socket_path: Path, path: str, timeout: float = 2.0, *, method: str = "GET"
) -> tuple[int, bytes]:
    """One bodiless call to MMS's management API."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            conn = h11.Connection(h11.CLIENT)
            status, _, body = await exchange(conn, reader, writer, method, path, {})
        finally:
            writer.close()
    return status, body


class Upstream:
    """Keep-alive connections to MMS's inference socket."""

    def __init__(self, concurrency: int) -> None:
        self.socket: Path | None = None
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter, h11.Connection, Path]]
        self._idle = deque()
        self.slots = asyncio.Semaphore(concurrency)

    def retarget(self, socket_path: Path | None) -> None:
        """MMS (re)started on `socket_path`, or stopped (None): drop the old connections."""
        self.socket = socket_path
        while self._idle:
            self._idle.popleft()[1].close()

    async def _connection(self):
        while self._idle:
            reader, writer, conn, where = self._idle.pop()
            if where == self.socket and not reader.at_eof() and not writer.is_closing():
                return reader, writer, conn, True
            writer.close()
        if self.socket is None:
            raise ConnectionRefusedError("the model server is not running")
        reader, writer = await asyncio.open_unix_connection(str(self.socket), limit=64 * 1024)
        return reader, writer, h11.Connection(h11.CLIENT), False

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        """POST to MMS: (status, content type, body). A reused connection that turns out to be
        closed is retried once on a fresh one, before any answer was read."""
        for attempt in range(2):
            reader, writer, conn, reused = await self._connection()
            where = self.socket
            try:
                status, rheaders, payload = await exchange(
                    conn, reader, writer, "POST", path, headers, body
                )
            except (ConnectionError, OSError):
                writer.close()
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                writer.close()
                raise
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                self._idle.append((reader, writer, conn, where))
            else:  # MMS said Connection: close
                writer.close()
            return status, rheaders.get("content-type", "application/json"), payload
        raise ConnectionError("unreachable")


# ---------------------------------------------------------------- one model server


class ModelServer:
    """MMS for the front: `post` and `ready`. For the supervisor: `start`, `stop`, `probe` and
    what the last probe saw. One object for the endpoint's life; each `start` is a fresh MMS
    run in its own folder under `workdir`, over the same private model store."""

    def __init__(self, settings: Settings, environ: dict[str, str], workdir: Path) -> None:
        self.settings, self.environ, self.workdir = settings, environ, workdir
        self.keep: tuple[int, ...] = ()  # pids of the group that are not MMS's (the watchdog)
        self.proc: subprocess.Popen | None = None
        self.upstream = Upstream(settings.limits.upstream_concurrency)
        self.restarting = True
        self.runs = 0
        self.store: Path | None = None  # the private model store (set by `prepare`)
        self.model = MODEL_NAME  # the registered model that requests go to
        self.in_flight: dict[str, int] = {}  # requests MMS holds now, by model
        self._management: Path | None = None
        self._inference: Path | None = None
        self._loaded_dir: Path | None = None
        self._probe: tuple[float, bool, str] = (0.0, False, "starting")
        self._probe_task: asyncio.Task | None = None
        self.ready_count = 0  # workers that can answer now (last probe)
        self.connected_count = 0  # workers MMS calls READY (loaded or loading their model)
        self.backend_seen = False  # MMS's backend process (last probe)

    @property
    def pgid(self) -> int:
        """serve's process group, which MMS's processes share (read when used: serve may
        become its group's leader after this object is made)."""
        return os.getpgid(0)

    def prepare(self, model_dir: Path) -> Path:
        """Copy the artifact into the private model store; returns the copy's folder (what is
        preflighted and what MMS serves)."""
        self.store = self.workdir / "store"
        return private_store(model_dir, self.store, self.model)

    def stage(self, model_dir: Path, name: str) -> Path:
        """Copy another artifact into the private store beside the served one, as `prepare`
        does (a folder of that name left by an earlier failed swap is replaced)."""
        if self.store is None:
            raise RuntimeError("prepare() the model store first")
        shutil.rmtree(self.store / name, ignore_errors=True)
        return private_store(model_dir, self.store, name)

    def _command(self, config: Path) -> list[str]:
        return [
            str(Path(sys.executable).parent / "multi-model-server"),
            "--start",
            "--foreground",
            "--mms-config",
            str(config),
            "--model-store",
            str(self.store),
        ]  # no --models: start() registers the model with batching (see the docstring)

    def _environment(self, run_dir: Path, loaded_dir: Path) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if not k.startswith("AWS_")}
        env.update(
            {
                "TMPDIR": str(run_dir),  # the workers' sockets, MMS's temp files
                "TEMP": str(run_dir),
                MMS_WORKERS_ENV: str(self.settings.worker_count),
                WORKER_LOADED_DIR_ENV: str(loaded_dir),
                RESPONSE_FORMAT_ENV: self.settings.response_format,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        return env

    async def start(self, timeout_s: float) -> None:
        """Start MMS in a fresh private folder; return once its workers have loaded the model."""
        if self.store is None:
            raise RuntimeError("prepare() the model store first")
        self.runs += 1
        run_dir = self.workdir / f"run-{self.runs}"  # sockets, pid file, logs: mode 0700
        run_dir.mkdir(mode=0o700)
        # Our handler marks each worker here once its model is loaded; another handler (an A/B
        # benchmark's) does not, and its workers count as ready when MMS says so.
        loaded_dir = run_dir / "loaded"
        loaded_dir.mkdir()
        self._loaded_dir = loaded_dir if self.settings.handler == HANDLER else None
        config = run_dir / "config.properties"
        config.write_text(config_properties(self.settings, run_dir=run_dir, model_store=self.store))
        # Same process group as serve (no new session): killpg(serve) reaches every MMS process.
        self.proc = subprocess.Popen(
            self._command(config),
            cwd=run_dir,
            env=self._environment(run_dir, loaded_dir),
            stdin=subprocess.DEVNULL,
        )
        self._management = run_dir / MANAGEMENT_SOCKET
        self._inference = run_dir / INFERENCE_SOCKET
        deadline = time.monotonic() + timeout_s
        registered = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"multi-model-server exited with {self.proc.returncode}")
            if not registered:
                registered = await self._register(self.model)
                if not registered:
                    await asyncio.sleep(0.25)
                    continue
            ok, _ = await self.probe(max_age=0)
            if ok and self.ready_count >= self.settings.worker_count:
                break
            failed = load_failure(self._loaded_dir, self.model)
            if failed:  # MMS would retry it, with backoff, for ever
                raise RuntimeError(f"a worker could not load the model: {failed}")
            await asyncio.sleep(0.25)
        else:
            raise RuntimeError("the model's workers did not start in time")
        self.serving()

    def serving(self) -> None:
        """Requests go to this run from now on."""
        self.upstream.retarget(self._inference)
        self.restarting = False

    async def _register(self, name: str) -> bool:
        """Register the model `name` of the store; False while the management API is not up."""
        try:
            status, body = await management(
                self._management, registration_path(self.settings, name), 10.0, method="POST"
            )
        except (OSError, TimeoutError, ValueError, IndexError, EOFError):
            return False
        if status not in (200, 202, 409):  # 409: registered already (an answer lost)
            raise RuntimeError(f"multi-model-server refused the model ({status}): {body[:300]!r}")
        log.info(
            "model %s registered in multi-model-server: handler %s, batch size %d, "
            "max batch delay %d ms",
            name,
            self.settings.handler,
            self.settings.batch_size,
            self.settings.max_batch_delay_ms,
        )
        return True

    # -- a second model beside the first (serve.Swap)

    async def add_model(self, name: str, timeout_s: float) -> None:
        """Register `name` (staged in the store) beside the served model and return once its
        workers have loaded it, as `start` does; RuntimeError when they do not in time or the
        model server restarts meanwhile (it then serves the old model only)."""
        runs = self.runs
        if self._loaded_dir is None and self.settings.handler != HANDLER:
            raise RuntimeError("only imgclf's handler can swap models")
        if not await self._register(name):
            raise RuntimeError("the model server does not answer")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.runs != runs or self.exited():
                raise RuntimeError("the model server restarted while the new model was loading")
            count, _, _ = await self._count(name)
            if count >= self.settings.worker_count:
                return
            failed = load_failure(self._loaded_dir, name)
            if failed:
                raise RuntimeError(failed)
            await asyncio.sleep(0.25)
        raise RuntimeError(f"its workers did not load it within {timeout_s:.0f} s")

    def switch(self, name: str) -> str:
        """Send every new request to model `name`; returns the one they went to before."""
        old, self.model = self.model, name
        self._forget_probe()
        return old

    async def remove_model(self, name: str, drain_s: float) -> bool:
        """Unregister `name` once MMS holds none of its requests (waiting up to `drain_s`),
        and remove its copy from the store. True when it was drained first."""
        deadline = time.monotonic() + drain_s
        while self.in_flight.get(name) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        drained = not self.in_flight.get(name)
        try:
            status, body = await management(
                self._management, f"/models/{name}", 30.0, method="DELETE"
            )
            if status not in (200, 202, 404):
                log.warning("multi-model-server kept model %s (%d): %r", name, status, body[:200])
        except (OSError, TimeoutError, ValueError, IndexError, EOFError) as exc:
            log.warning("cannot unregister model %s: %s", name, exc)
        if self.store is not None and name != self.model:
            shutil.rmtree(self.store / name, ignore_errors=True)
        return drained

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Every process of the group but serve and its watchdog: SIGTERM, then SIGKILL."""
        self.restarting = True
        self.upstream.retarget(None)
        keep = {os.getpid(), *self.keep}
        for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            members = [p for p in group_members(self.pgid) if p not in keep]
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self.reap()
                alive = [
                    p
                    for p, (state, _) in group_members(self.pgid).items()
                    if p not in keep and state != "Z"
                ]
                if not alive:
                    break
                await asyncio.sleep(0.1)
        self.reap()

    def reap(self) -> None:
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

    async def probe(self, max_age: float = PROBE_MAX_AGE_S) -> tuple[bool, str]:
        """Whether a worker can answer now, from the management API (one query at a time)."""
        stamp, ok, why = self._probe
        if time.monotonic() - stamp <= max_age:
            return ok, why
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.ensure_future(self._query())
        return await asyncio.shield(self._probe_task)

    async def _query(self) -> tuple[bool, str]:
        count, connected, why = await self._count(self.model)
        self.ready_count, self.connected_count = count, connected
        result = (count > 0, why)
        self._probe = (time.monotonic(), *result)
        return result

    async def _count(self, name: str) -> tuple[int, int, str]:
        """Model `name`'s workers: (loaded, connected, why none can answer)."""
        try:
            status, body = await management(self._management, f"/models/{name}")
            count = ready_workers(json.loads(body)) if status == 200 else 0
            why = "" if count else "no worker has the model loaded"
        except (OSError, TimeoutError, ValueError, IndexError, TypeError, EOFError):
            count, why = 0, "the model server does not answer"
        # MMS marks a worker READY until it notices the process is gone; the processes
        # themselves say so at once.
        backends, workers = self._processes()
        self.backend_seen = bool(backends)
        # MMS also calls a worker READY from the moment it connects, before its model is
        # loaded: only a worker that marked itself loaded (with this model) can answer now.
        connected = min(count, len(workers))
        if connected and self._loaded_dir is not None:
            count = min(connected, len(loaded_workers(self._loaded_dir, workers, name)))
            why = "" if count else "the model is still loading"
        elif count:
            count = connected
            why = "" if count else "no worker process is alive"
        return count, connected, why

    def _processes(self) -> tuple[list[int], list[int]]:
        """(backend processes: children of Java; workers: other model_service_worker ones)."""
        members = group_members(self.pgid)
        javas = {p for p in members if "com.amazonaws.ml.mms.ModelServer" in cmdline(p)}
        backends, workers = [], []
        for pid, (state, ppid) in members.items():
            if state in ("Z", "X") or "model_service_worker" not in cmdline(pid):
                continue
            (backends if ppid in javas else workers).append(pid)
        return backends, workers

    def _can_forward(self) -> bool:
        """From the last probe: a worker was ready (requests wait in the front otherwise)."""
        return not self.restarting and self._probe[1]

    def _forget_probe(self) -> None:
        """A request just failed upstream: the next ready() asks MMS afresh."""
        self._probe = (0.0, False, "")

    async def ready(self) -> tuple[bool, str]:
        """For /ping: True only while MMS runs and one of its workers has the model loaded."""
        if self.restarting or self.exited():
            return False, "the model server is (re)starting"
        return await self.probe()

    # -- requests

    async def post(
        self, headers: dict[str, str], body: bytes, deadline: float
    ) -> tuple[int, str, bytes]:
        """The model's answer to one request, by `deadline` (time.monotonic): (status, content
        type, body), errors already in our shape; RequestError for a 503/504 of the endpoint's
        own state. A request whose worker (or MMS) died while answering it goes once more to
        the restarted one: inference is idempotent, and the client should not pay for a fault
        of the endpoint's own processes. Only once: one that kills its worker twice gets the
        503."""
        timeout_s = self.settings.timeout_s
        for attempt in range(2):
            try:
                status, ctype, payload = await self._post_when_ready(headers, body, deadline)
            except NoWorkerInTime:
                self._forget_probe()
                raise RequestError(
                    503,
                    f"no worker could answer within {timeout_s:.0f} s: "
                    "the model server is restarting or reloading the model",
                    "retry shortly; the endpoint recovers by itself",
                ) from None
            except TimeoutError:
                self._forget_probe()
                raise RequestError(
                    504,
                    f"the model did not answer within {timeout_s:.0f} s",
                    "retry; send fewer images per request",
                ) from None
            except (ConnectionError, OSError):
                self._forget_probe()
                if attempt == 0:
                    continue
                raise RequestError(
                    503,
                    "the model server stopped while answering this request",
                    "retry; the endpoint restarts it by itself",
                ) from None
            if status == 200:
                return status, ctype, payload
            if worker_died(status, payload):
                self._forget_probe()
                if attempt == 0:
                    continue
            break
        status, payload = answer(status, payload)
        if status >= 500:
            self._forget_probe()
        return status, "application/json", payload

    async def _post_when_ready(self, headers: dict[str, str], body: bytes, deadline: float):
        """MMS's answer; NoWorkerInTime when the deadline passed while no worker could take the
        request, TimeoutError when it passed in MMS or in the queue for it."""
        no_worker = True
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                # No worker can answer now (restarting, reloading): wait, within the deadline,
                # rather than hand MMS a request it would fail.
                while not self._can_forward() and not (await self.ready())[0]:
                    await asyncio.sleep(0.1)
                no_worker = False
                async with self.upstream.slots:
                    while True:  # MMS restarting: wait for it, within the request's deadline
                        # The model is read here, at the send: a swap's old model is removed
                        # once no request it was given is left (remove_model).
                        name = self.model
                        self.in_flight[name] = self.in_flight.get(name, 0) + 1
                        try:
                            return await self.upstream.post(predict_path(name), headers, body)
                        except (ConnectionRefusedError, FileNotFoundError):
                            no_worker = True
                            await asyncio.sleep(0.2)
                        finally:
                            self.in_flight[name] -= 1
        except TimeoutError:
            if no_worker:
                raise NoWorkerInTime from None
            raise
