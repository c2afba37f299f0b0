"""The local tuner's Optuna study: where it is stored (SQLite in the tuning dir, or any Optuna
storage URL), how it is opened, and what a tuner that died left in it."""

from __future__ import annotations

import threading
from pathlib import Path

from imgclf.errors import UserError, reason
from imgclf.tuning.optuna_setup import sampler_and_pruner
from imgclf.tuning.space import TuningSpace
from imgclf.util import mask_secrets

STUDY_NAME = "imgclf"


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{out_dir / 'study.db'}"


def recover_interrupted(study) -> int:
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


def study_storage(url: str):
    """The storage behind `url`, opened here so that a URL that cannot be opened is one
    UserError line with its password masked (a driver's error may quote the URL whole).

    SQLite has no SELECT ... FOR UPDATE, so two tuner threads can both take the same
    queued (WAITING) trial and run it twice; a lock around the state change makes the second
    one see it RUNNING. (Several machines on one study need a server database anyway.)"""
    import optuna

    class LockedSQLiteStorage(optuna.storages.RDBStorage):
        _lock = threading.Lock()

        def set_trial_state_values(self, trial_id, state, values=None):
            with self._lock:
                return super().set_trial_state_values(trial_id, state, values)

    try:
        if not url.startswith("sqlite"):
            return optuna.storages.get_storage(url)
        return LockedSQLiteStorage(url)
    except Exception as exc:  # a bad URL, a missing driver, a server that does not answer
        raise UserError(
            f"the study storage {mask_secrets(url)} cannot be opened: {mask_secrets(reason(exc))}"
        ) from None


def open_study(space: TuningSpace, storage: str, *, max_epochs: int, create: bool = True):
    import optuna

    # Optuna logs every failed trial with a traceback; the tuner reports failures itself.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler, pruner = sampler_and_pruner(space, max_epochs=max_epochs)
    if not create:
        return optuna.load_study(
            study_name=STUDY_NAME, storage=study_storage(storage), sampler=sampler, pruner=pruner
        )
    return optuna.create_study(
        study_name=STUDY_NAME,
        storage=study_storage(storage),
        load_if_exists=True,
        direction=space.direction,
        sampler=sampler,
        pruner=pruner,
    )
