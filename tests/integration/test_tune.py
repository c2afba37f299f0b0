"""The local tuner end to end: real trials (training jobs) on digits, pruning, best.json, resume."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import LAUNCH, ROOT, hp_args, run_launch

TRIAL_HPS = {
    "arch": "resnet18",
    "pretrained": "false",
    "image_size": "16",
    "hflip": "false",
    "epochs": "4",
    "workers": "0",
}


def write_space(path, **overrides):
    space = {
        "objective": {"metric": "valid_loss", "type": "minimize"},
        "strategy": "bayesian",
        "max_trials": 6,
        "parallel_trials": 2,
        "early_stopping": True,
        "early_stopping_min_epochs": 1,
        "seed": 0,
        "parameters": {
            "lr": {"type": "continuous", "min": 0.0005, "max": 0.01, "scaling": "log"},
            "batch_size": {"type": "categorical", "values": [32, 64]},
        },
        **overrides,
    }
    path.write_text(yaml.safe_dump(space))
    return path


def study_trials(out):
    """(number, state, epochs reported, value) of every trial, read from the study's SQLite."""
    with sqlite3.connect(out / "study.db") as db:
        rows = db.execute(
            "SELECT t.number, t.state, COUNT(iv.step), v.value FROM trials t "
            "LEFT JOIN trial_intermediate_values iv ON iv.trial_id = t.trial_id "
            "LEFT JOIN trial_values v ON v.trial_id = t.trial_id "
            "GROUP BY t.trial_id ORDER BY t.number"
        ).fetchall()
    return rows


def test_six_trials_two_parallel_prune_and_the_best_retrains_to_95_percent(tmp_path, digits_dir):
    space = write_space(tmp_path / "space.yaml")
    out = tmp_path / "tune"
    proc = run_launch(
        "tune",
        "--data",
        str(digits_dir),
        "--space",
        str(space),
        "--out",
        str(out),
        *hp_args(TRIAL_HPS),
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = study_trials(out)
    assert len(trials) == 6, trials
    states = [t[1] for t in trials]
    assert set(states) <= {"COMPLETE", "PRUNED"}, trials
    pruned = [t for t in trials if t[1] == "PRUNED"]
    assert pruned, f"no trial was pruned: {trials}"
    assert all(epochs < 4 for _, _, epochs, _ in pruned), pruned
    # Two ran at once: some trial started before another one ended.
    jobs = sorted(out.glob("jobs/trial-*"))
    spans = [
        (
            (j / "input/config/hyperparameters.json").stat().st_mtime,
            (j / "train.log").stat().st_mtime,
        )
        for j in jobs
    ]
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans for b in spans if a is not b), spans

    best = json.loads((out / "best.json").read_text())
    completed = {n: v for n, s, _, v in trials if s == "COMPLETE"}
    assert best["trial"] == min(completed, key=completed.get)
    assert best["objective"]["value"] == pytest.approx(min(completed.values()))
    assert best["objective"]["metric"] == "valid_loss"
    assert {"lr", "batch_size", "arch", "epochs"} <= set(best["hyperparameters"])
    assert "best: trial" in proc.stdout and "PRUNED" in proc.stdout
    # Trials skip their reports (~1.3 s each); the best trial's is written at the end.
    reports = sorted(j.name for j in jobs if (j / "output/data/report.html").exists())
    assert reports == [Path(best["job_dir"]).name], reports

    status = run_launch("tune", "--status", str(out), home=tmp_path)
    assert status.returncode == 0, status.stderr
    table = status.stdout.strip().splitlines()[1:]
    assert len(table) == 6 and table[0].split()[0] == str(best["trial"])

    retrain = run_launch(
        "train",
        "--data",
        str(digits_dir),
        "--job-name",
        "best",
        "--hp-from",
        str(out / "best.json"),
        home=tmp_path,
    )
    assert retrain.returncode == 0, retrain.stdout[-3000:] + retrain.stderr[-3000:]
    metrics = json.loads((tmp_path / "jobs" / "best" / "model" / "metrics.json").read_text())
    assert metrics["test_acc"] >= 0.95, metrics


def _wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_a_killed_tuner_resumes_without_rerunning_finished_trials(tmp_path, tiny_digits):
    space = write_space(
        tmp_path / "space.yaml", max_trials=3, parallel_trials=1, early_stopping=False
    )
    out = tmp_path / "tune"
    args = ["tune", "--data", str(tiny_digits), "--space", str(space), "--out", str(out)]
    args += hp_args({**TRIAL_HPS, "epochs": "2"})
    proc = subprocess.Popen(
        [*LAUNCH, *args],
        cwd=ROOT,
        env={**os.environ, "IMGCLF_HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Stop it while trial 1 trains, after trial 0 finished.
        _wait_for(lambda: (out / "jobs" / "trial-001" / "train.log").exists(), proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, output
    assert "run the same command again to resume" in output and "Traceback" not in output
    first = study_trials(out)
    assert [t[1] for t in first[:2]] == ["COMPLETE", "FAIL"], first
    finished_log = out / "jobs" / "trial-000" / "train.log"
    finished_mtime = finished_log.stat().st_mtime

    again = run_launch(*args, home=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the study" in again.stdout and "1 trials finished" in again.stdout
    second = study_trials(out)
    assert finished_log.stat().st_mtime == finished_mtime  # trial 0 did not run again
    assert sum(t[1] == "COMPLETE" for t in second) == 3, second
    assert second[0] == first[0]
    # The stopped trial's parameters ran again, not lost.
    with sqlite3.connect(out / "study.db") as db:
        params = db.execute(
            "SELECT t.number, p.param_name, p.param_value FROM trial_params p "
            "JOIN trials t ON t.trial_id = p.trial_id ORDER BY t.number, p.param_name"
        ).fetchall()
    by_trial = {}
    for number, name, value in params:
        by_trial.setdefault(number, {})[name] = value
    completed = [n for n, s, _, _ in second if s == "COMPLETE"]
    assert any(by_trial[n] == by_trial[1] for n in completed if n != 1), by_trial


def test_trials_on_cached_features_share_one_cache_and_the_best_are_refined(tmp_path, tiny_digits):
    space = write_space(
        tmp_path / "space.yaml", max_trials=4, early_stopping=False, strategy="random"
    )
    out = tmp_path / "tune"
    proc = run_launch(
        "tune",
        "--data",
        str(tiny_digits),
        "--space",
        str(space),
        "--out",
        str(out),
        "--features-cache",
        "--refine",
        "2",
        *hp_args({**TRIAL_HPS, "epochs": "2"}),
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = study_trials(out)
    assert [t[1] for t in trials] == ["COMPLETE"] * 4, trials
    # One embedding for the whole study: the trials after the first read it back.
    assert len([p for p in (out / "features").iterdir() if p.is_dir()]) == 1
    reused = [
        json.loads((job / "model" / "metrics.json").read_text())["features"]["reused"]
        for job in sorted(out.glob("jobs/trial-*"))
    ]
    assert sorted(reused) == [False, True, True, True], reused
    # They ran in trial workers that paid the imports once each: one per parallel slot at most.
    logs = [(job / "train.log").read_text() for job in sorted(out.glob("jobs/trial-*"))]
    pids = {re.search(r"trial worker (\d+): running", log).group(1) for log in logs}
    assert 1 <= len(pids) <= 2, pids
    assert "trial worker" in proc.stdout and "ready in" in proc.stdout
    # A trial in a worker is the job a `train` process runs: the same job as a process gives
    # the same result.
    trial_dir = out / "jobs" / "trial-003"
    again = run_launch(
        "train",
        "--data",
        str(tiny_digits),
        "--job-name",
        "as-a-process",
        "--hp-from",
        str(trial_dir / "input" / "config" / "hyperparameters.json"),
        home=tmp_path,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    in_worker = json.loads((trial_dir / "model" / "metrics.json").read_text())
    as_process = json.loads(
        (tmp_path / "jobs" / "as-a-process" / "model" / "metrics.json").read_text()
    )
    assert as_process["features"]["reused"] and as_process["best_epoch"] == in_worker["best_epoch"]
    for key in ("valid_loss", "test_loss", "test_acc"):
        assert as_process[key] == pytest.approx(in_worker[key], rel=1e-4), key
    # The two best trials ran again as full fine-tunes; best.json is the best of those.
    refined = json.loads((out / "refined.json").read_text())
    by_value = sorted((t for t in trials), key=lambda t: t[3])
    assert [r["trial"] for r in refined] == [t[0] for t in by_value[:2]]
    best = json.loads((out / "best.json").read_text())
    assert best["hyperparameters"]["features_cache"] == "false"
    assert best["objective"]["value"] == min(r["value"] for r in refined)
    # The full fine-tunes are `train` processes, as on SageMaker, not worker trials.
    for r in refined:
        log = (out / "jobs" / f"refine-{r['trial']:03d}" / "train.log").read_text()
        assert "trial worker" not in log and "#metrics epoch=" in log
    for r in refined:
        config = json.loads(
            (
                out / "jobs" / f"refine-{r['trial']:03d}" / "output" / "data" / "config.json"
            ).read_text()
        )
        assert config["features_cache"] is False and config["lr"] == float(
            r["hyperparameters"]["lr"]
        )
    assert "fine-tuned" in proc.stdout
