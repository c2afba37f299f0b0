"""The local tuner: an Optuna study whose trials are real local training jobs.

Each trial is the same `train` entry as `launch.py train`, in its own job dir under the tuning
dir. The tuner reads each job's metric lines with the regexes SageMaker's MetricDefinitions use,
reports them to Optuna per epoch, and stops (SIGTERM) the jobs Optuna prunes. The study lives in
SQLite in the tuning dir (or any Optuna storage URL; `imgclf.tuning.study`), so a killed tuner
resumes where it was.

Trials on cached features (`features_cache=true`) train a head for about a second: they run in
long-lived trial workers (`imgclf.tuning.worker_pool`, one per parallel slot) that pay the
imports once per tuning job, not ~5.5 s per trial. Every other trial is a `train` process.
What the study found is written by `imgclf.tuning.results`.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from imgclf import jobs, processes
from imgclf.config import FIELDS
from imgclf.contract import NO_REPORT_ENV
from imgclf.errors import UserError
from imgclf.metrics import parse_metric_line
from imgclf.tuning.monitor import Monitor
from imgclf.tuning.optuna_setup import optuna_distributions, suggest
from imgclf.tuning.results import write_best
from imgclf.tuning.space import TuningSpace, metric_direction, trial_hyperparameters
from imgclf.tuning.study import default_storage, finished_count, open_study, recover_interrupted
from imgclf.tuning.worker_pool import WorkerPool, runs_in_worker
from imgclf.util import atomic_write, cpu_count, mask_secrets, write_json

LOCK_FILE = "tuner.pid"


class TrialJobFailed(Exception):
    """A trial's training job failed (its reason is in the trial's output/failure)."""


def _claim(out_dir: Path) -> None:
    """One tuner per tuning dir; a dead tuner's lock is taken over."""
    lock = out_dir / LOCK_FILE
    if lock.exists():
        try:
            pid = int(lock.read_text().strip())
        except ValueError:
            pid = 0
        if pid and pid != os.getpid() and processes.process_alive(pid):
            raise UserError(f"a tuner (pid {pid}) is already running in {out_dir}")
    atomic_write(lock, str(os.getpid()))  # replaces a link placed there, never writes through it


def run_tuning(
    space: TuningSpace,
    *,
    data_dir: Path,
    out_dir: Path,
    storage: str | None = None,
    max_trials: int | None = None,
    parallel: int | None = None,
    init_model: Path | None = None,
) -> dict:
    """Run (or resume) the study until it holds `max_trials` finished trials; write best.json.
    With `init_model` (`tune --init-from`) every trial starts from that model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim(out_dir)
    storage = storage or default_storage(out_dir)
    max_trials = max_trials or space.max_trials
    parallel = parallel or space.parallel_trials
    study = open_study(space, storage, max_epochs=space.max_epochs())
    write_json(
        out_dir / "space.json",
        {
            "metric": space.metric,
            "direction": space.direction,
            "strategy": space.strategy,
            "static": space.static,
        },
    )
    recovered = recover_interrupted(study)
    done = finished_count(study)
    if recovered or done:
        print(
            f"resuming the study in {mask_secrets(storage)}: {done} trials finished"
            + (f", {recovered} interrupted trials queued again" if recovered else "")
        )
    tuner = _Tuner(
        space, study, data_dir=data_dir, out_dir=out_dir, parallel=parallel, init_model=init_model
    )
    previous = signal.signal(signal.SIGTERM, tuner.on_sigterm)
    tuner.announce_early_stopping()
    try:
        tuner.optimize(max_trials)
    except KeyboardInterrupt:
        pass
    finally:
        tuner.workers.close()
        signal.signal(signal.SIGTERM, previous)
        (out_dir / LOCK_FILE).unlink(missing_ok=True)
    if tuner.stop.is_set():
        raise UserError(f"tuning stopped; run the same command again to resume ({out_dir})")
    return write_best(study, space, out_dir)


class _Tuner:
    """One run of the tuner over a study: its objective (each trial a job in the tuning dir),
    the trials running now and how to stop each, and the SIGTERM that stops them all."""

    def __init__(
        self,
        space: TuningSpace,
        study,
        *,
        data_dir: Path,
        out_dir: Path,
        parallel: int,
        init_model: Path | None = None,
    ) -> None:
        self.space, self.study = space, study
        self.data_dir, self.out_dir, self.parallel = data_dir, out_dir, parallel
        self.init_model = init_model
        self.monitor = Monitor(space.metric)
        self.running: dict[int, Callable[[], None]] = {}  # trial number -> how to stop it
        self.workers = WorkerPool()
        self.stop = threading.Event()
        self.distributions = optuna_distributions(space)
        self.sign = 1.0 if space.direction == "minimize" else -1.0
        self.judge_metric = space.stopping_metric()
        self.judge_sign = 1.0 if metric_direction(self.judge_metric) == space.direction else -1.0

    def on_sigterm(self, signum, frame) -> None:
        self.stop.set()
        for stop_trial in list(self.running.values()):
            stop_trial()

    def announce_early_stopping(self) -> None:
        space = self.space
        if space.early_stopping and space.strategy != "hyperband":
            print(
                f"early stopping: {space.early_stopping_rule} rule on {self.judge_metric}, first "
                f"judged after epoch {space.min_epochs_before_stopping() + 1}",
                flush=True,
            )

    def optimize(self, max_trials: int) -> None:
        """Rounds of study.optimize until `max_trials` trials finished or the tuner is stopped."""
        while not self.stop.is_set():
            before = finished_count(self.study)
            if before >= max_trials:
                break
            self.study.optimize(
                self.objective,
                n_trials=max_trials - before,
                n_jobs=self.parallel,
                catch=(TrialJobFailed,),
                gc_after_trial=False,
            )
            if finished_count(self.study) == before and not self.stop.is_set():
                raise UserError(
                    f"no trial finished in the last round (all failed or the grid "
                    f"is exhausted); see {self.out_dir}/trial-*/train.log"
                )

    def objective(self, trial) -> float:
        if self.stop.is_set():
            raise KeyboardInterrupt
        params = {name: suggest(trial, name, dist) for name, dist in self.distributions.items()}
        hps = trial_hyperparameters(self.space, params)
        job = jobs.prepare_job(
            self.out_dir,
            f"trial-{trial.number:03d}",
            data_dir=self.data_dir,
            hyperparameters=hps,
            init_model=self.init_model,
        )
        trial.set_user_attr("job_dir", str(job.layout.base))
        self.monitor.update(trial.number, params=params, state="RUNNING")
        watch = _TrialWatch(
            self, trial, last_epoch=int(hps.get("epochs", FIELDS["epochs"].default))
        )
        code = self._run(trial.number, job, hps, watch.on_line)
        self.running.pop(trial.number, None)
        # A trial's checkpoints (the whole model, twice, and the optimizer: ~170 MB for a
        # ResNet-18) are never read again: a trial queued again runs as a new trial in a new
        # job dir. The model/ artifact stays.
        shutil.rmtree(job.layout.checkpoint_dir, ignore_errors=True)
        return self._outcome(trial, job, code, watch)

    def _environment(self, job: jobs.LocalJob) -> dict[str, str]:
        env = jobs.job_environment(job)
        # Trials share the CPUs: without a thread budget each one's OpenMP threads spin against
        # the others' and a CPU trial runs ~20x slower (seen: 8 vs 160 images/s on 2 cores).
        threads = str(max(1, cpu_count() // self.parallel))
        env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        # ~1.3 s a trial (matplotlib and the plots): only the best trial's report is written.
        env[NO_REPORT_ENV] = "1"
        return env

    def _on_start(self, number: int, stop_trial: Callable[[], None]) -> None:
        self.running[number] = stop_trial
        if self.stop.is_set():  # the stop came while this job was starting
            stop_trial()

    def _run(self, number: int, job: jobs.LocalJob, hps: dict[str, str], on_line) -> int:
        """Run the trial's job (in a trial worker or as a `train` process): its exit code."""
        env = self._environment(job)
        if runs_in_worker(hps):
            worker = self.workers.acquire(env)
            try:
                self._on_start(number, worker.stop_trial)
                return worker.run(job, env, on_line=on_line)
            finally:
                self.workers.release(worker)
        return jobs.run_job(
            job,
            jobs.train_command(),
            env,
            echo=False,
            on_line=on_line,
            on_start=lambda proc: self._on_start(
                number, lambda: jobs.signal_group(proc, signal.SIGTERM)
            ),
        )

    def _outcome(self, trial, job: jobs.LocalJob, code: int, watch: _TrialWatch) -> float:
        """The trial's value, or the exception that tells Optuna how it ended."""
        import optuna

        if watch.pruned.is_set():
            self.monitor.update(trial.number, state="PRUNED")
            raise optuna.TrialPruned()
        if self.stop.is_set():
            # Optuna records the trial as failed; queue its parameters so a resume runs it.
            trial.study.enqueue_trial(trial.params, skip_if_exists=False)
            self.monitor.update(trial.number, state="STOPPED")
            raise KeyboardInterrupt
        value = watch.best_value()
        if code != 0 or value is None:
            self.monitor.update(trial.number, state="FAILED")
            reason = jobs.read_failure(job) or f"exit {code}, see {job.log_file}"
            trial.set_user_attr("failure", reason[:500])
            print(f"trial {trial.number} failed: {reason.strip()[:500]}", flush=True)
            raise TrialJobFailed(reason)
        # The best epoch: the weights the job keeps.
        self.monitor.update(trial.number, state="COMPLETE", value=value)
        return value


class _TrialWatch:
    """One trial's metric lines: each epoch reported to Optuna and shown in the monitor; the
    trial stopped when Optuna prunes it."""

    def __init__(self, tuner: _Tuner, trial, *, last_epoch: int) -> None:
        self.tuner, self.trial, self.last_epoch = tuner, trial, last_epoch
        self.best: list[float] = []  # the finite values of the objective metric, by epoch
        self.pruned = threading.Event()

    def best_value(self) -> float | None:
        return min(self.best, key=lambda v: self.tuner.sign * v) if self.best else None

    def on_line(self, line: str) -> None:
        tuner, trial = self.tuner, self.trial
        values = parse_metric_line(line)
        if "epoch" not in values or tuner.space.metric not in values:
            return
        epoch, value = int(values["epoch"]), values[tuner.space.metric]
        if math.isfinite(value):
            self.best.append(value)
        # What early stopping compares trials by, as the study's direction reads it.
        judged = values.get(tuner.judge_metric, math.nan) * tuner.judge_sign
        trial.report(judged if math.isfinite(judged) else tuner.sign * math.inf, epoch)
        tuner.monitor.update(trial.number, epoch=epoch, value=self.best_value())
        # Stopping a trial at its last epoch saves nothing: let it finish.
        if not self.pruned.is_set() and epoch < self.last_epoch and trial.should_prune():
            self.pruned.set()
            tuner.running[trial.number]()
