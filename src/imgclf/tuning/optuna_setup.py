"""The Optuna side of a tuning space: its distributions, each trial's suggestions from them,
and the sampler and pruner its strategy and early stopping rule name (tuning.yaml itself is
read in `imgclf.tuning.space`, which imports no Optuna). The early stopping rules are
described at `space.EARLY_STOPPING_RULES`."""

from __future__ import annotations

from typing import Any

from imgclf.tuning.space import TuningSpace, grid

# asha: a trial goes on past epoch r, 2r, 4r, ... only in the better half (1/2) of the trials
# that reached it.
ASHA_REDUCTION_FACTOR = 2


def optuna_distributions(space: TuningSpace) -> dict[str, Any]:
    import optuna.distributions as d

    out: dict[str, Any] = {}
    for p in space.parameters:
        if p.type == "categorical":
            out[p.name] = d.CategoricalDistribution(list(p.values))
        elif p.type == "integer":
            out[p.name] = d.IntDistribution(int(p.min), int(p.max), log=p.log)
        else:
            out[p.name] = d.FloatDistribution(float(p.min), float(p.max), log=p.log)
    return out


def suggest(trial, name: str, distribution):
    """trial.suggest_* for one of optuna_distributions' distributions."""
    import optuna.distributions as d

    if isinstance(distribution, d.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, d.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)


def sampler_and_pruner(space: TuningSpace, *, max_epochs: int):
    import optuna

    seed = space.seed
    if space.strategy == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    elif space.strategy == "grid":
        sampler = optuna.samplers.GridSampler(grid(space), seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, space.max_trials))
    if not space.early_stopping:
        pruner = optuna.pruners.NopPruner()
    elif space.strategy == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs)
    elif space.early_stopping_rule == "asha":
        # Rungs at epochs r, 2r, 4r, ... (r: one more than the minimum epochs): a trial that
        # reaches one in the worse half of the trials that reached it so far stops.
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=space.min_epochs_before_stopping() + 1,
            reduction_factor=ASHA_REDUCTION_FACTOR,
        )
    else:
        # SageMaker's early stopping: stop a job whose metric is worse than the median of
        # earlier jobs' at the same epoch, after `early_stopping_min_epochs` (default: half).
        # Steps are epoch numbers (from 1); Optuna judges steps >= n_warmup_steps.
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=2, n_warmup_steps=space.min_epochs_before_stopping() + 1
        )
    return sampler, pruner
