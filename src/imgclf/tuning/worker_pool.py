"""The tuner's end of the trial workers (imgclf.tuning.worker): cached-feature trials train a
head for about a second, so they run in long-lived worker processes, one per parallel slot,
that pay the imports once per tuning job, not ~5.5 s per trial. Every other trial is a `train`
process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from imgclf import jobs
from imgclf.config import parse_hyperparameters
from imgclf.errors import ConfigError, UserError
from imgclf.tuning import worker as trial_worker


class TrialWorker:
    """The tuner's end of one trial worker process (imgclf.tuning.worker): starts it, waits for
    its imports, hands it one job at a time and copies the job's output to its train.log."""

    def __init__(self, env: dict[str, str]) -> None:
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgclf.tuning.worker"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the tuner, which stops the trial itself
        )
        assert self.proc.stdout is not None
        said = []
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            if line.startswith(trial_worker.READY):
                break
            said.append(line)
        else:
            self.proc.wait()
            raise UserError(
                f"the trial worker ({sys.executable} -m imgclf.tuning.worker) exited with "
                f"{self.proc.returncode} before it was ready; it said:\n{''.join(said)[-2000:]}"
            )
        self.ready_seconds = time.perf_counter() - started

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop_trial(self) -> None:
        """SIGTERM: the running trial stops as a job does (checkpoint kept, output/failure)."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGTERM)

    def run(self, job: jobs.LocalJob, env: dict[str, str], *, on_line) -> int:
        """Run `job` (its environment `env`) and return its exit code, as run_job would."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((json.dumps({"env": env}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self.proc.wait() or 1
        with open(job.log_file, "ab") as log:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace")
                if line.startswith(trial_worker.DONE):
                    return int(line.split()[-1])
                log.write(raw)
                log.flush()
                on_line(line)
        # The worker died during the trial (killed, out of memory): the trial failed.
        return self.proc.wait() or 1

    def close(self, grace: float = jobs.STOP_GRACE_SECONDS) -> None:
        """Stop a running trial, end the worker (EOF), SIGKILL after the grace period."""
        if not self.alive:
            return
        self.stop_trial()
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            jobs.signal_group(self.proc, signal.SIGKILL)
            self.proc.wait()


class WorkerPool:
    """Trial workers for the parallel slots: one is started when a trial finds none idle."""

    def __init__(self) -> None:
        self.idle: list[TrialWorker] = []
        self.started: list[TrialWorker] = []
        self.lock = threading.Lock()

    def acquire(self, env: dict[str, str]) -> TrialWorker:
        with self.lock:
            while self.idle:
                worker = self.idle.pop()
                if worker.alive:
                    return worker
        worker = TrialWorker(env)
        print(
            f"trial worker {worker.proc.pid} ready in {worker.ready_seconds:.1f} s "
            "(cached-feature trials run in it, without a process start each)",
            flush=True,
        )
        with self.lock:
            self.started.append(worker)
        return worker

    def release(self, worker: TrialWorker) -> None:
        with self.lock:
            if worker.alive:
                self.idle.append(worker)

    def close(self) -> None:
        for worker in self.started:
            worker.close()


def runs_in_worker(hyperparameters: dict[str, str]) -> bool:
    """Cached-feature trials run in a trial worker; every other trial is a `train` process
    (so are trials whose hyperparameters do not parse: the job reports why it failed)."""
    try:
        return parse_hyperparameters(hyperparameters).features_cache
    except ConfigError:
        return False
