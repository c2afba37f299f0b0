"""What runs a local endpoint: the serving image's `serve` entry as a process group on this
machine (ProcessRunner), or the serving image itself as a container (ContainerRunner).

targets.endpoints keeps one record (targets.endpoint_record) and one readiness path (serve's
state file) for both, and asks the endpoint's runner to start it, say whether it still runs,
why it names nothing that may be stopped, and to stop it. Neither signals anything the record
alone names: a pid only with the start time and boot it was read in, a container only under the
name derived from the endpoint's and, where the record has one, with the id `docker run` gave."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from imgclf.contract import (
    BASE_DIR_ENV,
    SERVE_BIND_HOST_ENV,
    SERVE_NEXT_MODEL_DIR_ENV,
    SERVE_PORT_ENV,
    SERVE_STATE_FILE_ENV,
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
from imgclf.targets import docker
from imgclf.targets.endpoint_record import CONTAINER, NEXT_MODEL, PROCESS, STATE_FILE, Endpoint


class Runner(Protocol):
    """Starts, checks and stops one kind of local endpoint."""

    kind: str

    def check(self) -> None:
        """A UserError where this kind cannot run here."""

    def state_file(self, base: Path) -> Path:
        """Where serve writes its state, for the endpoint in folder `base`."""

    def start(self, endpoint: Endpoint, settings: dict[str, str]) -> Endpoint:
        """Start serve over base/model with the serving `settings`; the record to keep."""

    def alive(self, endpoint: Endpoint) -> bool:
        """What `deploy` started is running."""

    def stale(self, endpoint: Endpoint) -> str | None:
        """Why the record names nothing that may be stopped (None where it does, or where
        what it names is simply gone)."""

    def leftover(self, endpoint: Endpoint) -> str | None:
        """The state to list where serve is gone and something of it is not."""

    def stop(self, endpoint: Endpoint, grace: float = 60.0) -> bool:
        """Stop it (serve drains for `grace` seconds) if it is ours; True when it was running."""

    def swap_refusal(self, endpoint: Endpoint, image: str | None) -> str | None:
        """Why a `deploy` (of `image`, or as a process) cannot swap the model of this running
        endpoint; None where it can."""

    def send_swap(self, endpoint: Endpoint) -> bool:
        """Ask the running serve to swap in the staged model; False when it is not running."""

    def runs_as(self, endpoint: Endpoint) -> str:
        """What `endpoints` shows it runs as."""

    def log(self, endpoint: Endpoint) -> str:
        """Where its log is read."""


def _loopback(endpoint: Endpoint) -> dict[str, str]:
    return {SERVE_PORT_ENV: str(endpoint.port), SERVE_BIND_HOST_ENV: "127.0.0.1"}


class ProcessRunner:
    """`serve` from this Python environment, leading its own process group (MMS stays in it),
    its output in <folder>/serve.log and its state in <folder>/state.json."""

    kind = PROCESS

    def check(self) -> None:
        pass

    def state_file(self, base: Path) -> Path:
        return base / STATE_FILE

    def start(self, endpoint: Endpoint, settings: dict[str, str]) -> Endpoint:
        base = endpoint.base
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            {
                BASE_DIR_ENV: str(base),
                SERVE_STATE_FILE_ENV: str(self.state_file(base)),
                SERVE_NEXT_MODEL_DIR_ENV: str(base / NEXT_MODEL),
                "PYTHONUNBUFFERED": "1",
                **settings,
                **_loopback(endpoint),
            }
        )
        serve = Path(sys.executable).parent / "serve"
        with open(endpoint.log_file, "ab") as log:
            proc = subprocess.Popen(
                [str(serve)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return dataclasses.replace(
            endpoint,
            pid=proc.pid,
            start=process_start(proc.pid),  # the child cannot have been reaped: it is ours
            boot=boot_id(),
        )

    def alive(self, endpoint: Endpoint) -> bool:
        """The `serve` that `deploy` started is running: the pid still names that process."""
        pid = endpoint.pid
        return (
            bool(pid)
            and _same_boot(endpoint)
            and same_process(pid, endpoint.start)
            and running(pid)
        )

    def stale(self, endpoint: Endpoint) -> str | None:
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

    def leftover(self, endpoint: Endpoint) -> str | None:
        if group_alive(endpoint.pid) and _orphans_ours(endpoint):
            return "orphaned (delete stops it)"
        return None

    def stop(self, endpoint: Endpoint, grace: float = 60.0) -> bool:
        """SIGTERM to `serve` alone (it drains requests in flight, then stops MMS), then
        SIGKILL to its whole process group after `grace`. `serve` leads that group and MMS
        stays in it, so this stops every process even when `serve` itself has died. Nothing
        is signalled unless the record still names the processes `deploy` started (`alive`,
        `_orphans_ours`)."""
        pid = endpoint.pid
        if self.alive(endpoint):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and group_alive(pid):
                time.sleep(0.2)
        elif not (group_alive(pid) and _orphans_ours(endpoint)):
            return False
        # The group seen alive since `serve` was ours: its id is not reused while it has members.
        if group_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and group_alive(pid):
                time.sleep(0.1)
        return True

    def swap_refusal(self, endpoint: Endpoint, image: str | None) -> str | None:
        if image:
            return (
                f"endpoint {endpoint.name} runs as a process, not a container: deploy without "
                "--docker to swap its model, or pick another --name"
            )
        return None

    def send_swap(self, endpoint: Endpoint) -> bool:
        if not self.alive(endpoint):
            return False
        os.kill(endpoint.pid, signal.SIGHUP)
        return True

    def runs_as(self, endpoint: Endpoint) -> str:
        return f"pid={endpoint.pid}"

    def log(self, endpoint: Endpoint) -> str:
        return str(endpoint.log_file)


def _same_boot(endpoint: Endpoint) -> bool:
    return bool(endpoint.boot) and endpoint.boot == boot_id()


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


class ContainerRunner:
    """The serving image, `docker run` as SageMaker runs it (targets.docker): the model
    read-only, bound to 127.0.0.1 on the host's network, every capability dropped. serve's
    state file is the one host folder it writes, <folder>/state/, bind-mounted; its log is
    `docker logs` while it runs and <folder>/serve.log once `stop` saved it."""

    kind = CONTAINER

    def check(self) -> None:
        docker.require_docker()

    def state_file(self, base: Path) -> Path:
        return base / "state" / STATE_FILE

    def container(self, endpoint: Endpoint) -> str:
        """Its container's name: from the endpoint's name, never from the record."""
        return docker.CONTAINER_PREFIX + endpoint.name

    def start(self, endpoint: Endpoint, settings: dict[str, str]) -> Endpoint:
        assert endpoint.image is not None
        state_dir = self.state_file(endpoint.base).parent.resolve()  # -v takes absolute paths
        state_dir.mkdir()
        # Root in the container has no DAC_OVERRIDE, so only a folder open to others takes its
        # writes: this one, inside the endpoint's folder (0700), which no other user can enter.
        os.chmod(state_dir, 0o733)  # noqa: S103 (see above)
        command = docker.serve_container_command(
            container=self.container(endpoint),
            image=endpoint.image,
            port=endpoint.port,
            model_dir=(endpoint.base / "model").resolve(),
            state_dir=state_dir,
            state_file=STATE_FILE,
            environment=settings,
        )
        try:
            started = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except BaseException:  # interrupted: what it may have started is this deploy's
            docker.remove_container(self.container(endpoint))
            raise
        if started.returncode != 0:
            reason = (started.stderr.strip().splitlines() or ["no reason given"])[-1]
            raise UserError(f"docker run of {endpoint.image} failed: {reason}")
        return dataclasses.replace(endpoint, container_id=started.stdout.strip() or None)

    def _ours(self, endpoint: Endpoint) -> tuple[str, bool] | None:
        """(id, running) of its container, where that container is the one `deploy` started
        (a record without an id, from an older imgclf: the container of its name)."""
        found = docker.inspect_container(self.container(endpoint))
        if found is None or (endpoint.container_id and found[0] != endpoint.container_id):
            return None
        return found

    def alive(self, endpoint: Endpoint) -> bool:
        found = self._ours(endpoint)
        return found is not None and found[1]

    def stale(self, endpoint: Endpoint) -> str | None:
        if shutil.which("docker") is None:
            return (
                "no docker command is installed to check its container; delete removes its "
                "folder only"
            )
        found = docker.inspect_container(self.container(endpoint))
        if found is not None and endpoint.container_id and found[0] != endpoint.container_id:
            return (
                f"container {self.container(endpoint)} is another container now, not the one "
                "deploy started; delete removes its folder only"
            )
        return None

    def leftover(self, endpoint: Endpoint) -> str | None:
        return None  # a stopped container of ours is removed with the endpoint's folder

    def stop(self, endpoint: Endpoint, grace: float = 60.0) -> bool:
        """`docker stop` (serve drains), its log saved to <folder>/serve.log, then `docker rm`;
        nothing is touched unless the container is the one `deploy` started."""
        found = self._ours(endpoint)
        if found is None:
            return False
        container_id, was_running = found
        if was_running:
            docker.stop_container(container_id, grace)
        with contextlib.suppress(OSError):
            endpoint.log_file.write_text(docker.container_logs(container_id))
        docker.remove_container(container_id)
        return was_running

    def swap_refusal(self, endpoint: Endpoint, image: str | None) -> str | None:
        return (
            f"endpoint {endpoint.name} runs in a container, whose model is a read-only mount "
            "fixed when it started: it cannot be swapped in place. Deploy the new model under "
            f"another --name and move the clients, or `launch.py delete {endpoint.name}` and "
            "deploy again (the port closes meanwhile)"
        )

    def send_swap(self, endpoint: Endpoint) -> bool:
        return False  # never reached: swap_refusal refuses every swap

    def runs_as(self, endpoint: Endpoint) -> str:
        return f"container={self.container(endpoint)}"

    def log(self, endpoint: Endpoint) -> str:
        return f"docker logs {self.container(endpoint)}"


RUNNERS: dict[str, Runner] = {PROCESS: ProcessRunner(), CONTAINER: ContainerRunner()}


def runner_of(endpoint: Endpoint) -> Runner:
    """The runner of the endpoint's kind."""
    return RUNNERS[endpoint.kind]
