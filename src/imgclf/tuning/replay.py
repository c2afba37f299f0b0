"""Early stopping replayed on recorded learning curves: which trials a rule would stop, what it
would spend, and whether it keeps the eventual best trial. No training: the rule's Optuna pruner
is fed the epochs a study without early stopping recorded (each trial's history.json), `parallel`
trials at a time with every epoch taking the same time. benchmarks/tune.py and the tests use it
to compare rules; the tuner never does."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from imgclf.tuning.optuna_setup import sampler_and_pruner
from imgclf.tuning.space import TuningSpace, metric_direction


@dataclass(frozen=True)
class Replay:
    trial_epochs: int  # epochs the trials ran under the rule
    all_epochs: int  # epochs they ran without it
    kept_best: bool  # the best trial without the rule is the best with it

    @property
    def ratio(self) -> float:
        return self.trial_epochs / self.all_epochs


def replay(
    space: TuningSpace, histories: list[list[dict]], order: list[int], *, parallel: int
) -> Replay:
    """Run `space`'s early stopping over `histories` (one list of epoch rows per trial) with
    the trials started in `order`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    _, pruner = sampler_and_pruner(space, max_epochs=space.max_epochs())
    study = optuna.create_study(pruner=pruner, direction=space.direction)
    judge = space.stopping_metric()
    judge_sign = 1.0 if metric_direction(judge) == space.direction else -1.0
    sign = 1.0 if space.direction == "minimize" else -1.0
    queue, events, seq = list(order), [], itertools.count()
    spent, completed = 0, {}

    def start(now: int) -> None:
        if queue:
            heapq.heappush(events, (now + 1, next(seq), study.ask(), queue.pop(0), 1))

    def best(n: int) -> float:
        return min((row[space.metric] for row in histories[n]), key=lambda v: sign * v)

    for _ in range(parallel):
        start(0)
    while events:
        now, _, trial, n, epoch = heapq.heappop(events)
        spent += 1
        trial.report(judge_sign * histories[n][epoch - 1][judge], epoch)
        last = epoch == len(histories[n])
        if not last and trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            start(now)
        elif last:
            completed[n] = best(n)
            study.tell(trial, completed[n])
            start(now)
        else:
            heapq.heappush(events, (now + 1, next(seq), trial, n, epoch + 1))
    overall = min(range(len(histories)), key=lambda n: sign * best(n))
    kept = min(completed, key=lambda n: sign * completed[n]) == overall
    return Replay(spent, sum(len(h) for h in histories), kept)
