"""The local tuner: an Optuna study whose trials are real local training jobs.

Each trial is the same `train` entry as `launch.py train`, in its own job dir under the tuning
dir. The tuner reads each job's metric lines with the regexes SageMaker's MetricDefinitions use,
reports them to Optuna per epoch, and stops (SIGTERM) the jobs Optuna prunes. The study lives in
SQLite in the tuning dir (or any Optuna storage URL), so a killed tuner resumes where it was.

Trials on cached features (`features_cache=true`) train a head for about a second: they run in
long-lived trial workers (`imgclf.tuning.worker`, one per parallel slot) that pay the imports
once per tuning job, not ~5.5 s per trial. Every other trial is a `train` process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imgclf import jobs
from imgclf.artifacts import write_json
from imgclf.config import FIELDS, parse_hyperparameters
from imgclf.contract import NO_REPORT_ENV
from imgclf.errors import ConfigError, UserError
from imgclf.metrics import parse_metric_line
from imgclf.tuning import worker as trial_worker
from imgclf.tuning.space import (
    TuningSpace,
    metric_direction,
    optuna_distributions,
    sampler_and_pruner,
    trial_hyperparameters,
)
from imgclf.util import cpu_count

STUDY_NAME = "imgclf"
LOCK_FILE = "tuner.pid"
BEST_FILE = "best.json"


class TrialJobFailed(Exception):
    """A trial's training job failed (its reason is in the trial's output/failure)."""


@dataclass
class TrialRow:
    number: int
    params: dict
    epoch: int = 0
    value: float | None = None
    state: str = "RUNNING"


@dataclass
class Monitor:
    """The live table: redrawn in place on a terminal, one line per event otherwise."""

    metric: str
    live: bool = field(default_factory=lambda: sys.stdout.isatty())
    rows: dict[int, TrialRow] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    drawn: int = 0

    def update(self, number: int, **changes) -> None:
        with self.lock:
            row = self.rows.setdefault(number, TrialRow(number, changes.pop("params", {})))
            for key, value in changes.items():
                setattr(row, key, value)
            if self.live:
                self._redraw()
            elif "state" in changes or "epoch" in changes:
                print(self._line(row), flush=True)

    def _line(self, row: TrialRow) -> str:
        params = " ".join(f"{k}={_short(v)}" for k, v in row.params.items())
        value = "" if row.value is None else f"{row.value:.5f}"
        return (
            f"trial {row.number:>3}  {row.state:<8} epoch {row.epoch:>3}  "
            f"{self.metric} {value:<9}  {params}"
        )

    def _redraw(self) -> None:
        lines = [self._line(r) for r in sorted(self.rows.values(), key=lambda r: r.number)]
        if self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F\x1b[J")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self.drawn = len(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{out_dir / 'study.db'}"


def _claim(out_dir: Path) -> None:
    """One tuner per tuning dir; a dead tuner's lock is taken over."""
    lock = out_dir / LOCK_FILE
    if lock.exists():
        try:
            pid = int(lock.read_text().strip())
        except ValueError:
            pid = 0
        if pid and pid != os.getpid() and jobs.process_alive(pid):
            raise UserError(f"a tuner (pid {pid}) is already running in {out_dir}")
    lock.write_text(str(os.getpid()))


def _recover_interrupted(study) -> int:
    """Trials left RUNNING by a tuner that died: mark them failed and queue their parameters
    again, so the study neither counts them as done nor loses them."""
    import optuna

    count = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        count += 1
    return count


def finished_count(study) -> int:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=done))


def _storage(url: str):
    """SQLite has no SELECT ... FOR UPDATE, so two tuner threads can both take the same
    queued (WAITING) trial and run it twice; a lock around the state change makes the second
    one see it RUNNING. (Several machines on one study need a server database anyway.)"""
    import optuna

    if not url.startswith("sqlite"):
        return url

    class LockedSQLiteStorage(optuna.storages.RDBStorage):
        _lock = threading.Lock()

        def set_trial_state_values(self, trial_id, state, values=None):
            with self._lock:
                return super().set_trial_state_values(trial_id, state, values)

    return LockedSQLiteStorage(url)


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


def open_study(space: TuningSpace, storage: str, *, max_epochs: int, create: bool = True):
    import optuna

    # Optuna logs every failed trial with a traceback; the tuner reports failures itself.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler, pruner = sampler_and_pruner(space, max_epochs=max_epochs)
    if not create:
        return optuna.load_study(
            study_name=STUDY_NAME, storage=_storage(storage), sampler=sampler, pruner=pruner
        )
    return optuna.create_study(
        study_name=STUDY_NAME,
        storage=_storage(storage),
        load_if_exists=True,
        direction=space.direction,
        sampler=sampler,
        pruner=pruner,
    )


def run_tuning(
    space: TuningSpace,
    *,
    data_dir: Path,
    out_dir: Path,
    storage: str | None = None,
    max_trials: int | None = None,
    parallel: int | None = None,
) -> dict:
    """Run (or resume) the study until it holds `max_trials` finished trials; write best.json."""
    import optuna

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
    recovered = _recover_interrupted(study)
    done = finished_count(study)
    if recovered or done:
        print(
            f"resuming the study in {storage}: {done} trials finished"
            + (f", {recovered} interrupted trials queued again" if recovered else "")
        )
    monitor = Monitor(space.metric)
    running: dict[int, Callable[[], None]] = {}  # trial number -> how to stop it
    workers = WorkerPool()
    stop = threading.Event()

    def on_sigterm(signum, frame):
        stop.set()
        for stop_trial in list(running.values()):
            stop_trial()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    distributions = optuna_distributions(space)
    sign = 1.0 if space.direction == "minimize" else -1.0
    judge_metric = space.stopping_metric()
    judge_sign = 1.0 if metric_direction(judge_metric) == space.direction else -1.0
    if space.early_stopping and space.strategy != "hyperband":
        print(
            f"early stopping: {space.early_stopping_rule} rule on {judge_metric}, first "
            f"judged after epoch {space.min_epochs_before_stopping() + 1}",
            flush=True,
        )

    def objective(trial) -> float:
        if stop.is_set():
            raise KeyboardInterrupt
        params = {name: _suggest(trial, name, dist) for name, dist in distributions.items()}
        hps = trial_hyperparameters(space, params)
        job = jobs.prepare_job(
            out_dir, f"trial-{trial.number:03d}", data_dir=data_dir, hyperparameters=hps
        )
        trial.set_user_attr("job_dir", str(job.layout.base))
        monitor.update(trial.number, params=params, state="RUNNING")
        best: list[float] = []
        pruned = threading.Event()
        last_epoch = int(hps.get("epochs", FIELDS["epochs"].default))

        def on_line(line: str) -> None:
            values = parse_metric_line(line)
            if "epoch" not in values or space.metric not in values:
                return
            epoch, value = int(values["epoch"]), values[space.metric]
            if math.isfinite(value):
                best.append(value)
            # What early stopping compares trials by, as the study's direction reads it.
            judged = values.get(judge_metric, math.nan) * judge_sign
            trial.report(judged if math.isfinite(judged) else sign * math.inf, epoch)
            monitor.update(
                trial.number, epoch=epoch, value=min(best, key=lambda v: sign * v) if best else None
            )
            # Stopping a trial at its last epoch saves nothing: let it finish.
            if not pruned.is_set() and epoch < last_epoch and trial.should_prune():
                pruned.set()
                running[trial.number]()

        def on_start(stop_trial: Callable[[], None]) -> None:
            running[trial.number] = stop_trial
            if stop.is_set():  # the stop came while this job was starting
                stop_trial()

        env = jobs.job_environment(job)
        # Trials share the CPUs: without a thread budget each one's OpenMP threads spin against
        # the others' and a CPU trial runs ~20x slower (seen: 8 vs 160 images/s on 2 cores).
        threads = str(max(1, cpu_count() // parallel))
        env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        # ~1.3 s a trial (matplotlib and the plots): only the best trial's report is written.
        env[NO_REPORT_ENV] = "1"
        if runs_in_worker(hps):
            worker = workers.acquire(env)
            try:
                on_start(worker.stop_trial)
                code = worker.run(job, env, on_line=on_line)
            finally:
                workers.release(worker)
        else:
            code = jobs.run_job(
                job,
                jobs.train_command(),
                env,
                echo=False,
                on_line=on_line,
                on_start=lambda proc: on_start(lambda: jobs.signal_group(proc, signal.SIGTERM)),
            )
        running.pop(trial.number, None)
        # A trial's checkpoints (the whole model, twice, and the optimizer: ~170 MB for a
        # ResNet-18) are never read again: a trial queued again runs as a new trial in a new
        # job dir. The model/ artifact stays.
        shutil.rmtree(job.layout.checkpoint_dir, ignore_errors=True)
        if pruned.is_set():
            monitor.update(trial.number, state="PRUNED")
            raise optuna.TrialPruned()
        if stop.is_set():
            # Optuna records the trial as failed; queue its parameters so a resume runs it.
            trial.study.enqueue_trial(trial.params, skip_if_exists=False)
            monitor.update(trial.number, state="STOPPED")
            raise KeyboardInterrupt
        if code != 0 or not best:
            monitor.update(trial.number, state="FAILED")
            reason = jobs.read_failure(job) or f"exit {code}, see {job.log_file}"
            trial.set_user_attr("failure", reason[:500])
            print(f"trial {trial.number} failed: {reason.strip()[:500]}", flush=True)
            raise TrialJobFailed(reason)
        value = min(best, key=lambda v: sign * v)  # the best epoch: the weights the job keeps
        monitor.update(trial.number, state="COMPLETE", value=value)
        return value

    try:
        while not stop.is_set():
            before = finished_count(study)
            if before >= max_trials:
                break
            study.optimize(
                objective,
                n_trials=max_trials - before,
                n_jobs=parallel,
                catch=(TrialJobFailed,),
                gc_after_trial=False,
            )
            if finished_count(study) == before and not stop.is_set():
                raise UserError(
                    f"no trial finished in the last round (all failed or the grid "
                    f"is exhausted); see {out_dir}/trial-*/train.log"
                )
    except KeyboardInterrupt:
        pass
    finally:
        workers.close()
        signal.signal(signal.SIGTERM, previous)
        (out_dir / LOCK_FILE).unlink(missing_ok=True)
    if stop.is_set():
        raise UserError(f"tuning stopped; run the same command again to resume ({out_dir})")
    return write_best(study, space, out_dir)


def _suggest(trial, name: str, distribution):
    import optuna.distributions as d

    if isinstance(distribution, d.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, d.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)


def write_best(study, space: TuningSpace, out_dir: Path) -> dict:
    try:
        best = study.best_trial
    except ValueError:
        raise UserError(f"no trial completed; see {out_dir}/trial-*/train.log") from None
    doc = {
        "hyperparameters": trial_hyperparameters(space, best.params),
        "objective": {"metric": space.metric, "type": space.direction, "value": best.value},
        "trial": best.number,
        "job_dir": best.user_attrs.get("job_dir"),
    }
    write_json(out_dir / BEST_FILE, doc)
    if doc["job_dir"]:
        _write_report(Path(doc["job_dir"]))
    return doc


def _write_report(job_dir: Path) -> None:
    """The trials ran without their reports: the best one gets its report now."""
    from imgclf import report

    path = report.write_report_or_warn(job_dir, print)
    if path is not None:
        print(f"best trial's report: {path}")


REFINED_FILE = "refined.json"


def refine(space: TuningSpace, *, data_dir: Path, out_dir: Path, count: int) -> dict:
    """The `count` best trials again as full fine-tunes (features_cache off, the rest as the
    trial had it), one after another; best.json then names the best full fine-tune. Used after
    a study on cached features: cheap trials rank, the full runs decide. Runs already finished
    are not repeated on resume."""
    import optuna

    study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(default_storage(out_dir)))
    sign = 1.0 if space.direction == "minimize" else -1.0
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    done.sort(key=lambda t: sign * t.value)
    results = []
    for trial in done[:count]:
        hps = trial_hyperparameters(space, trial.params)
        hps["features_cache"] = "false"
        hps.pop("features_dir", None)
        name = f"refine-{trial.number:03d}"
        history_file = out_dir / "jobs" / name / "output" / "data" / "history.json"
        if not history_file.exists():
            job = jobs.prepare_job(out_dir, name, data_dir=data_dir, hyperparameters=hps)
            print(f"refining trial {trial.number} as a full fine-tune ({job.layout.base})")
            code = jobs.run_job(job, jobs.train_command(), jobs.job_environment(job), echo=False)
            if code != 0 or not history_file.exists():
                reason = jobs.read_failure(job) or f"exit {code}, see {job.log_file}"
                print(f"refine of trial {trial.number} failed: {reason.strip()[:500]}")
                continue
        history = json.loads(history_file.read_text())
        values = [row[space.metric] for row in history if math.isfinite(row[space.metric])]
        if not values:
            continue
        value = min(values, key=lambda v: sign * v)
        results.append(
            {
                "trial": trial.number,
                "cached_value": trial.value,
                "value": value,
                "hyperparameters": hps,
                "job_dir": str(out_dir / "jobs" / name),
            }
        )
    if not results:
        raise UserError(f"no refine run finished; see {out_dir}/jobs/refine-*/train.log")
    write_json(out_dir / REFINED_FILE, results)
    best = min(results, key=lambda r: sign * r["value"])
    doc = {
        "hyperparameters": best["hyperparameters"],
        "objective": {"metric": space.metric, "type": space.direction, "value": best["value"]},
        "trial": best["trial"],
        "job_dir": best["job_dir"],
        "refined_from_cached_features": True,
    }
    write_json(out_dir / BEST_FILE, doc)
    return doc


def trial_table(study, metric: str, direction: str) -> list[list[str]]:
    """All trials, best first: number, state, last epoch, objective, parameters."""
    import optuna

    sign = 1.0 if direction == "minimize" else -1.0

    def key(t):
        ok = t.state == optuna.trial.TrialState.COMPLETE and t.value is not None
        return (0 if ok else 1, sign * t.value if ok else 0.0, t.number)

    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=key):
        epochs = max(t.intermediate_values) if t.intermediate_values else 0
        value = "" if t.value is None else f"{t.value:.5f}"
        params = " ".join(f"{k}={_short(v)}" for k, v in t.params.items())
        rows.append([str(t.number), t.state.name, str(epochs), value, params])
    return rows


def load_status(out_dir: Path, storage: str | None = None) -> tuple[dict, list[list[str]]]:
    import optuna

    meta_file = out_dir / "space.json"
    if not meta_file.exists():
        raise UserError(f"{out_dir} is not a tuning dir (no space.json)")
    meta = json.loads(meta_file.read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage or default_storage(out_dir))
    return meta, trial_table(study, meta["metric"], meta["direction"])
