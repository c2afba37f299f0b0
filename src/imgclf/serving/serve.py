"""The serving image's `serve` entry (and the local target's endpoint): a supervisor that runs
the model server (multi-model-server with our handler, serving.mms) behind our front
(serving.front) and makes the endpoint's promises true whatever MMS does.

MMS alone cannot keep them (serving/mms.py says what it lacks), so MMS listens on private Unix
sockets only, and the public port is served by the front, which enforces the limits, queues,
answers /ping from the workers' real state, and drains on SIGTERM. This module reads the
settings, checks and copies the model into MMS's private store, starts MMS, watches its workers,
restarts it when no worker can answer for a while (or its backend process is gone), and exits
non-zero when it cannot bring it back, so the platform replaces the container.

Process tree: serve leads its own process group, and MMS (launcher, Java, Python workers) stays
in it, so `killpg` of serve's pid stops everything even after serve itself was killed. A tiny
watchdog child kills the group the moment serve dies, so nothing outlives it.

Why not sagemaker-inference's `start_model_server`: it writes /etc/sagemaker-mms.properties
(root only), binds the management API to 0.0.0.0, pip-installs a requirements.txt found in the
model at start-up, and its Transformer puts tracebacks in error responses (and its decoder can
unpickle NumPy payloads); settings.py says why its `Environment` is not used either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgclf.contract import SERVE_STATE_FILE_ENV
from imgclf.processes import lead_own_group
from imgclf.serving import front
from imgclf.serving.mms import MODEL_NAME, ModelServer
from imgclf.serving.settings import Settings, SettingsError, read_settings
from imgclf.util import write_json

log = logging.getLogger("imgclf.serve")

BACKEND_GRACE_S = 3.0  # MMS's worker parent gone this long: restart MMS


def preflight(model_dir: Path, *, cpu_runtime: str = "auto") -> None:
    """Check the model in this process before MMS starts: a broken artifact (or an unknown
    runtime) fails the endpoint's creation instead of answering 500s.

    An artifact that carries an ONNX graph recorded for its model_config.json and model.pt
    (imgclf.graph) is checked here without torch: model_config.json and labels.json, the
    graph's record, and model.pt's sha256 against it (the weights the graph was made and
    checked from, so a damaged model.pt is caught here, as on the eager path). Each worker then
    checks the graph itself (its hash, no external data), loads it, checks it on the recorded
    probe on this CPU and predicts once; with a graph that fails there it exports its own from
    model.pt or serves eager PyTorch, as without one; a worker that cannot load the model at
    all fails the start at once with its reason (ModelServer.start). This is what took a
    ResNet-50's cold start from 17 s to the figure in benchmarks/README.md (startup.py): no
    torch import nor load in serve, no torch nor export in the worker.

    Otherwise the network is loaded and predicts once here, as before: on eager PyTorch under
    `auto` (the worker exports and probes the ONNX graph itself, falling back to PyTorch as it
    would here), exported under an explicit `onnxruntime`, so a model that cannot run on it
    fails the start with the reason."""
    from imgclf import artifacts, graph
    from imgclf.serving import runtime

    # The choice is checked (an unknown one, or onnxruntime not installed) before any load.
    installed = runtime.onnxruntime_installed()
    runtime.check_choice(cpu_runtime, onnxruntime_available=installed)
    if cpu_runtime != runtime.TORCH and installed:
        config, labels = artifacts.read_description(model_dir)
        problem = graph.graph_record_problem(model_dir, config)
        if problem is None:
            log.info(
                "model at %s: %d classes, an ONNX graph recorded for it (preflight done; each "
                "worker checks the graph and its parity on this CPU)",
                model_dir,
                len(labels),
            )
            return
        log.info("preflight on eager PyTorch (%s)", problem)
    from imgclf.serving import inference

    chosen = runtime.resolve(cpu_runtime, torch_device(), onnxruntime_available=installed)
    if cpu_runtime == runtime.AUTO and chosen == runtime.ONNXRUNTIME:
        cpu_runtime = runtime.TORCH
    loaded = inference.model_fn(model_dir, cpu_runtime=cpu_runtime)
    inference.check_prediction(loaded)
    log.info(
        "model at %s loads and predicts on %s: %s, %d classes",
        model_dir,
        loaded.forward.runtime,
        loaded.preprocess,
        loaded.num_classes,
    )


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


class Supervisor:
    """Restart MMS when it exits, when its backend is gone, or when no worker is ready for
    recover_after_s (a worker still loading its model is given the start-up timeout)."""

    def __init__(self, settings: Settings, server: ModelServer) -> None:
        self.settings, self.server = settings, server
        self.failed_restarts = 0
        self._last_ready = time.monotonic()  # a worker was ready, or connected and loading
        self._last_loaded = self._last_ready  # a worker was ready
        self._backend_missing_since: float | None = None

    def ready_again(self) -> None:
        self.server.serving()
        self._last_ready = self._last_loaded = time.monotonic()
        self._backend_missing_since = None

    async def _why_restart(self) -> str | None:
        server, now = self.server, time.monotonic()
        if server.exited():
            return "multi-model-server exited"
        ok, _ = await server.probe()
        why = None
        if ok and server.restarting:  # came up after its start-up timeout after all
            self.ready_again()
        if ok:
            self._last_ready = self._last_loaded = now
        elif server.connected_count:
            # A worker loading its model is not stuck, for as long as a start may take.
            self._last_ready = now
            if now - self._last_loaded > self.settings.startup_timeout_s:
                why = f"no worker finished loading the model in {self.settings.startup_timeout_s} s"
        elif now - self._last_ready > self.settings.recover_after_s:
            why = f"no worker was ready for {self.settings.recover_after_s:.0f} s"
        if server.backend_seen:
            self._backend_missing_since = None
        elif self._backend_missing_since is None:
            self._backend_missing_since = now
        elif now - self._backend_missing_since > BACKEND_GRACE_S:
            why = "the workers' parent process is gone"
        return why

    async def watch(self, stopping: asyncio.Event) -> int:
        """Until `stopping`; returns 1 when restarts stop bringing MMS back."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1.0)
            if stopping.is_set():
                break
            self.server.reap()
            why = await self._why_restart()
            if why is None:
                continue
            log.error("%s: restarting multi-model-server", why)
            await self.server.stop(grace_s=1.0)
            try:
                await self.server.start(self.settings.startup_timeout_s)
                self.failed_restarts = 0
                self.ready_again()
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
    contract.SERVE_STATE_FILE_ENV, replaced atomically at each change; nothing when unset.
    {"state", "reason", "pid"}, and where models can be swapped in (Swap) "swap_signal":
    "SIGHUP" and, after the first, "swap": {"id", "state": loading|done|failed, "reason"}."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.extra: dict = {}
        self._last = ("starting", "")

    def set(self, state: str, reason: str = "") -> None:
        self._last = (state, reason)
        if self.path is None:
            return
        doc = {"state": state, "reason": reason, "pid": os.getpid(), **self.extra}
        try:
            write_json(self.path, doc)
        except OSError as exc:  # the launcher then times out and names the log
            log.warning("cannot write the state file %s: %s", self.path, exc.strerror)

    def update(self, **extra) -> None:
        """Add to (or replace in) the document, and write it again."""
        self.extra.update(extra)
        self.set(*self._last)

    def failed(self, message: str, *args) -> int:
        """Log the reason and record it: the exit code 1."""
        log.error(message, *args)
        self.set("failed", message % args)
        return 1


class Swap:
    """A new model for the running endpoint, on SIGHUP (the launcher's `deploy` to a running
    local endpoint), with the public port open all along: the model staged at
    `settings.next_model_dir` is copied into the private store beside the served one (the
    checks of `private_store`, as at start), registered in the same multi-model-server under
    its own name, and once as many workers as serve runs have loaded it (each load is the
    preflight's: weights, network, runtime with its ONNX parity probe, one prediction), new
    requests go to it; the old model is unregistered when MMS holds none of its requests (at
    most a request's timeout later). A worker that cannot load the new model says why in its
    mark (mms.load_failure): it is removed and the old one serves on. Progress and the reason
    of a failure go to the state file's "swap". (A separate preflight, as at start, would load
    and export the model once more: 2.5 to 19 s for a ResNet-50 on 2 CPUs, benchmarks/swap.py.)"""

    def __init__(self, settings: Settings, server: ModelServer, state: StateFile) -> None:
        self.settings, self.server, self.state = settings, server, state
        self.count = 0
        self.task: asyncio.Task | None = None
        self.accepting = False  # the endpoint is ready, not stopping

    def requested(self) -> None:
        """The SIGHUP handler."""
        if self.settings.next_model_dir is None:
            log.warning("SIGHUP ignored: this endpoint swaps no models (no next model folder)")
        elif not self.accepting:
            log.warning("SIGHUP ignored: the endpoint is not serving (starting or stopping)")
        elif self.task is not None and not self.task.done():
            log.warning("SIGHUP ignored: a model swap is under way")
        else:
            self.count += 1
            self.task = asyncio.ensure_future(self.run(self.count))

    async def run(self, n: int) -> None:
        source = self.settings.next_model_dir
        assert source is not None
        name = f"{MODEL_NAME}-{n}"
        self.state.update(swap={"id": n, "state": "loading", "reason": ""})
        log.info("model swap %d: loading %s beside the served model", n, source)
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.server.stage, source, name)
            await self.server.add_model(name, self.settings.startup_timeout_s)
        except Exception as exc:
            why = reason(exc).replace(str(self.server.workdir / "store" / name), str(source))
            log.error("model swap %d failed, the old model serves on: %s", n, why)
            await self.server.remove_model(name, 0)
            self.state.update(swap={"id": n, "state": "failed", "reason": why})
            return
        old = self.server.switch(name)
        log.info(
            "model swap %d: the new model answers (loaded in %.1f s); draining the old one",
            n,
            time.monotonic() - started,
        )
        drained = await self.server.remove_model(old, self.settings.timeout_s + 5)
        log.info("model swap %d: done, the old model %s", n, "drained" if drained else "cut off")
        self.state.update(swap={"id": n, "state": "done", "reason": ""})

    async def cancel(self) -> None:
        self.accepting = False
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


async def _serve(settings: Settings, server: ModelServer, state: StateFile) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    swap = Swap(settings, server, state)
    loop.add_signal_handler(signal.SIGHUP, swap.requested)
    supervisor = Supervisor(settings, server)
    watchdog = start_watchdog()
    server.keep = (watchdog.pid,)
    gate = front.Front(
        settings.limits, server, execution_parameters=settings.execution_parameters()
    )
    code = 0
    try:
        try:
            await gate.start(settings.bind_host, settings.port)
        except OSError as exc:
            return state.failed(
                "cannot listen on %s:%d: %s", settings.bind_host, settings.port, exc.strerror
            )
        starting = asyncio.ensure_future(server.start(settings.startup_timeout_s))
        stop_wait = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        elif starting.exception() is not None:
            return state.failed("endpoint failed to start: %s", reason(starting.exception()))
        if not stopping.is_set():
            supervisor.ready_again()
            log.info(
                "endpoint ready on %s:%d (%d workers)",
                settings.bind_host,
                settings.port,
                settings.worker_count,
            )
            if settings.next_model_dir is not None:
                state.extra["swap_signal"] = "SIGHUP"  # the launcher may signal from now on
            swap.accepting = True
            state.set("ready")
            code = await supervisor.watch(stopping)
        await swap.cancel()
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
        await server.stop()
        with contextlib.suppress(OSError):
            watchdog.stdin.write(b"q")
            watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=5)
    return code


def reason(exc: BaseException) -> str:
    """An exception as one line that is never empty (a MemoryError has no message)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, MemoryError):
        return "out of memory" + (f" ({text})" if text else "")
    return text or type(exc).__name__


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
    except SettingsError as exc:
        return state.failed("cannot serve: %s", exc)
    workdir = Path(tempfile.mkdtemp(prefix="imgclf-serve-"))  # mode 0700: ours alone
    try:
        server = ModelServer(settings, environ, workdir)
        try:
            # MMS and the preflight see the same private copy of the artifact's own files.
            log.info("preflight of the model at %s", settings.model_dir)
            model_dir = settings.model_dir
            model_dir = server.prepare(model_dir)
            preflight(model_dir, cpu_runtime=settings.cpu_runtime)
        except Exception as exc:  # a broken artifact: say so in one line, open no port
            why = reason(exc).replace(str(model_dir), str(settings.model_dir))
            return state.failed("cannot serve the model at %s: %s", settings.model_dir, why)
        lead_own_group()
        raise_fd_limit()
        code = asyncio.run(_serve(settings, server, state))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if code == 0:
        state.set("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
