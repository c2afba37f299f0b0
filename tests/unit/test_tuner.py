"""The local tuner's study: queued trials run once each, even with parallel workers on SQLite."""

import threading
import time

from imgclf.tuning import local as tuner
from imgclf.tuning.space import load_space
from tests.conftest import ROOT


def test_queued_trials_run_once_each_with_parallel_workers(tmp_path):
    space = load_space(ROOT / "tuning.yaml")
    study = tuner.open_study(space, tuner.default_storage(tmp_path), max_epochs=5)
    for i in range(8):
        study.enqueue_trial({"lr": 0.001 * (i + 1)})
    seen, lock = [], threading.Lock()

    def objective(trial):
        with lock:
            seen.append(trial.number)
        time.sleep(0.1)
        return trial.suggest_float("lr", 1e-4, 0.1, log=True)

    study.optimize(objective, n_trials=8, n_jobs=4)
    assert sorted(seen) == list(range(8))
    assert sorted(t.params["lr"] for t in study.trials) == [0.001 * (i + 1) for i in range(8)]
    assert tuner.finished_count(study) == 8
