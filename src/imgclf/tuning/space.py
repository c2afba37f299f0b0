"""tuning.yaml: the search space and objective, in SageMaker's terms, read and checked, and
turned into SageMaker's parameter ranges. Optuna's distributions, sampler and pruner are built
from it in `tuning.optuna_setup`; the CreateHyperParameterTuningJob request that carries the
ranges in `targets.sagemaker.requests`.

Importing this module does not import torch or optuna."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgclf.config import FIELDS, canonical_key, parse_hyperparameters
from imgclf.errors import ConfigError, UserError
from imgclf.metrics import EPOCH_METRICS

STRATEGIES = {"bayesian": "Bayesian", "random": "Random", "hyperband": "Hyperband", "grid": "Grid"}
SCALINGS = {
    "auto": "Auto",
    "linear": "Linear",
    "log": "Logarithmic",
    "reverse_log": "ReverseLogarithmic",
}
TYPES = ("continuous", "integer", "categorical")
# Metrics a tuning objective may use: the per-epoch ones that carry a value to optimise.
OBJECTIVE_METRICS = tuple(m for m in EPOCH_METRICS if m not in ("epoch", "lr"))
# Local early stopping. asha: successive halving (Optuna's SuccessiveHalvingPruner): a trial
# goes on past epoch r, 2r, 4r, ... only while it is in the better half of the trials that
# reached that epoch. median: stop a trial that trails the median of finished trials at the
# same epoch (SageMaker's rule). benchmarks/tune.py measured both (benchmarks/README.md).
EARLY_STOPPING_RULES = ("asha", "median")
# Hyperparameters that change what the training loss measures (a smoothed target, weighted
# classes, harder crops, embeddings instead of images): trials tuned over them cannot be ranked
# by their training loss, so "auto" judges them by the objective metric instead.
CHANGE_TRAIN_LOSS = (
    "label_smoothing",
    "class_weights",
    "min_crop_scale",
    "hflip",
    "features_cache",
    "freeze",
)


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # continuous | integer | categorical
    min: float | None = None
    max: float | None = None
    scaling: str = "auto"
    values: tuple[str, ...] = ()

    @property
    def log(self) -> bool:
        return self.scaling == "log"


@dataclass(frozen=True)
class TuningSpace:
    parameters: tuple[Parameter, ...]
    metric: str = "valid_loss"
    direction: str = "minimize"
    strategy: str = "bayesian"
    max_trials: int = 10
    parallel_trials: int = 1
    early_stopping: bool = True
    seed: int | None = None
    static: dict[str, str] = field(default_factory=dict)
    # Epochs every trial runs before it may be stopped (None: the rule's default).
    early_stopping_min_epochs: int | None = None
    early_stopping_rule: str = "asha"
    # The per-epoch metric trials are compared by to stop them early ("auto": see below).
    early_stopping_metric: str = "auto"

    def min_epochs_before_stopping(self) -> int:
        """Epochs a trial runs before the first judgement (after the next one). asha: 0;
        median: half the most epochs (benchmarks/README.md: judged earlier on the validation
        loss, it stopped the eventual best trial)."""
        if self.early_stopping_min_epochs is not None:
            return self.early_stopping_min_epochs
        return 0 if self.early_stopping_rule == "asha" else self.max_epochs() // 2

    def stopping_metric(self) -> str:
        """What early stopping ranks trials by. auto: the training loss (the mean over a whole
        epoch ranks trials the way their final validation loss does, where one validation pass
        early on, at a high learning rate, does not), unless a tuned hyperparameter changes
        what the training loss measures; then the objective metric."""
        if self.early_stopping_metric != "auto":
            return self.early_stopping_metric
        if any(name in CHANGE_TRAIN_LOSS for name in self.names):
            return self.metric
        return "train_loss"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def max_epochs(self) -> int:
        """The most epochs a trial can run: hyperband's resource budget."""
        for p in self.parameters:
            if p.name == "epochs":
                return int(max(float(v) for v in p.values) if p.values else p.max)
        return int(self.static.get("epochs", FIELDS["epochs"].default))


# ---------------------------------------------------------------- reading tuning.yaml


class _Located:
    """Line numbers of a YAML mapping's keys, for error messages that point at the file."""

    def __init__(self, path: str, node) -> None:
        self.path, self.node = path, node

    def line(self, *keys: str) -> int:
        node = self.node
        line = node.start_mark.line + 1
        for key in keys:
            if getattr(node, "id", "") != "mapping":
                break
            for key_node, value_node in node.value:
                if key_node.value == key:
                    line, node = key_node.start_mark.line + 1, value_node
                    break
            else:
                break
        return line

    def error(self, message: str, *keys: str) -> ConfigError:
        return ConfigError(f"{self.path}, line {self.line(*keys)}: {message}")


def load_space(path: str | Path, *, fixed: dict[str, str] | None = None) -> TuningSpace:
    """Read and check tuning.yaml; `fixed` are --hp values every trial gets."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read the tuning space {path}: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with objective:, parameters:, ...")
    return parse_space(doc, _Located(str(path), node), fixed=fixed or {})


_TOP_KEYS = {
    "objective",
    "strategy",
    "max_trials",
    "parallel_trials",
    "early_stopping",
    "early_stopping_min_epochs",
    "early_stopping_rule",
    "early_stopping_metric",
    "parameters",
    "seed",
    "static",
}


def parse_space(doc: dict, where: _Located, *, fixed: dict[str, str]) -> TuningSpace:
    for key in doc:
        if key not in _TOP_KEYS:
            raise where.error(f"unknown key {key!r}; valid: {', '.join(sorted(_TOP_KEYS))}", key)
    metric, direction = _objective(doc, where)
    strategy = str(doc.get("strategy", "bayesian")).lower()
    if strategy not in STRATEGIES:
        raise where.error(f"unknown strategy {strategy!r}; use {', '.join(STRATEGIES)}", "strategy")
    max_trials = _positive_int(doc.get("max_trials", 10), where, "max_trials")
    parallel = _positive_int(doc.get("parallel_trials", 1), where, "parallel_trials")
    early = doc.get("early_stopping", True)
    if not isinstance(early, bool):
        raise where.error("early_stopping must be true or false", "early_stopping")
    seed = doc.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise where.error("seed must be an integer", "seed")
    min_epochs, rule, stopping_metric = _early_stopping_settings(doc, where)
    params, static = _parameters(doc, where, fixed)
    if strategy == "grid":
        max_trials = _grid_trials(params, max_trials, where)
    return TuningSpace(
        tuple(params),
        metric,
        direction,
        strategy,
        max_trials,
        parallel,
        early,
        seed,
        static,
        min_epochs,
        rule,
        stopping_metric,
    )


def _objective(doc: dict, where: _Located) -> tuple[str, str]:
    """objective: {metric, type}: the metric and the direction (minimize or maximize)."""
    objective = doc.get("objective") or {}
    if not isinstance(objective, dict):
        raise where.error("objective must be a mapping with metric: and type:", "objective")
    metric = str(objective.get("metric", "valid_loss"))
    if metric not in OBJECTIVE_METRICS:
        raise where.error(
            f"unknown objective metric {metric!r}; the metric lines carry "
            f"{', '.join(OBJECTIVE_METRICS)}",
            "objective",
            "metric",
        )
    direction = str(objective.get("type", "minimize")).lower()
    if direction not in ("minimize", "maximize"):
        raise where.error(
            f"objective type {direction!r}: use minimize or maximize", "objective", "type"
        )
    return metric, direction


def _early_stopping_settings(doc: dict, where: _Located) -> tuple[int | None, str, str]:
    """early_stopping_min_epochs, early_stopping_rule and early_stopping_metric."""
    min_epochs = doc.get("early_stopping_min_epochs")
    if min_epochs is not None and (
        not isinstance(min_epochs, int) or isinstance(min_epochs, bool) or min_epochs < 0
    ):
        raise where.error(
            "early_stopping_min_epochs must be an integer >= 0", "early_stopping_min_epochs"
        )
    rule = str(doc.get("early_stopping_rule", "asha")).lower()
    if rule not in EARLY_STOPPING_RULES:
        raise where.error(
            f"unknown early_stopping_rule {rule!r}; use {', '.join(EARLY_STOPPING_RULES)}",
            "early_stopping_rule",
        )
    stopping_metric = str(doc.get("early_stopping_metric", "auto"))
    if stopping_metric not in ("auto", *OBJECTIVE_METRICS):
        raise where.error(
            f"unknown early_stopping_metric {stopping_metric!r}; use auto or one of "
            f"{', '.join(OBJECTIVE_METRICS)}",
            "early_stopping_metric",
        )
    return min_epochs, rule, stopping_metric


def _parameters(
    doc: dict, where: _Located, fixed: dict[str, str]
) -> tuple[list[Parameter], dict[str, str]]:
    """The tuned ranges (parameters:) and the fixed values (static: and --hp), checked."""
    raw_params = doc.get("parameters")
    if not isinstance(raw_params, dict) or not raw_params:
        raise where.error("parameters must map hyperparameter names to ranges", "parameters")
    static = {canonical_key(str(k)): str(v) for k, v in (doc.get("static") or {}).items()}
    static.update(fixed)
    params = []
    for raw_name, spec in raw_params.items():
        name = canonical_key(str(raw_name))
        params.append(_parameter(name, spec, where, str(raw_name)))
        if name in static:
            raise where.error(
                f"{name} is both tuned and fixed (--hp or static:); drop one",
                "parameters",
                str(raw_name),
            )
    try:
        parse_hyperparameters(static)
    except ConfigError as exc:
        raise where.error(f"fixed hyperparameters: {exc}", "static") from None
    return params, static


def _grid_trials(params: list[Parameter], max_trials: int, where: _Located) -> int:
    """A grid search runs at most every point of the grid once."""
    for p in params:
        if p.type == "continuous":
            raise where.error(
                f"grid search needs integer or categorical ranges; {p.name} is continuous",
                "parameters",
                p.name,
            )
    size = math.prod(len(v) for v in grid(TuningSpace(tuple(params))).values())
    return min(max_trials, size)


def _positive_int(value, where: _Located, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise where.error(f"{key} must be a positive integer, not {value!r}", key)
    return value


def _number(value, where: _Located, *keys: str) -> float:
    try:
        number = float(value)  # PyYAML reads 1e-4 (no dot) as text
    except (TypeError, ValueError):
        raise where.error(f"{keys[-1]} must be a number, not {value!r}", *keys) from None
    if not math.isfinite(number):
        raise where.error(f"{keys[-1]} must be finite", *keys)
    return number


def _parameter(name: str, spec, where: _Located, key: str) -> Parameter:
    at = ("parameters", key)
    if name not in FIELDS:
        raise where.error(
            f"unknown hyperparameter {key!r}; valid: {', '.join(sorted(FIELDS))}", *at
        )
    if not isinstance(spec, dict):
        raise where.error("a range is a mapping: {type: continuous, min: ..., max: ...}", *at)
    kind = str(spec.get("type", "")).lower()
    if kind not in TYPES:
        raise where.error(
            f"range type {spec.get('type')!r} of {name}: use {', '.join(TYPES)}", *at, "type"
        )
    if kind == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise where.error(f"{name}: categorical needs a non-empty values: list", *at)
        texts = tuple(_to_text(v) for v in values)
        for text in texts:
            _check_value(name, text, where, *at, "values")
        return Parameter(name, kind, values=texts)
    low, high = (
        _number(spec.get("min"), where, *at, "min"),
        _number(spec.get("max"), where, *at, "max"),
    )
    if low > high:
        raise where.error(f"{name}: min {low:g} is above max {high:g}", *at, "min")
    scaling = str(spec.get("scaling", "auto")).lower()
    if scaling not in SCALINGS:
        raise where.error(f"{name}: scaling {scaling!r}: use {', '.join(SCALINGS)}", *at, "scaling")
    if scaling in ("log", "reverse_log") and low <= 0:
        raise where.error(f"{name}: a log range needs min > 0, not {low:g}", *at, "min")
    if kind == "integer":
        if not (low.is_integer() and high.is_integer()):
            raise where.error(f"{name}: integer range bounds must be whole numbers", *at)
        low, high = int(low), int(high)
    if isinstance(FIELDS[name].default, str | bool):
        raise where.error(f"{name} takes text or true/false: tune it as categorical", *at, "type")
    for bound in (low, high):
        _check_value(name, _to_text(bound), where, *at)
    return Parameter(name, kind, low, high, scaling)


def _to_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_value(name: str, text: str, where: _Located, *keys: str) -> None:
    try:
        parse_hyperparameters({name: text})
    except ConfigError as exc:
        raise where.error(str(exc), *keys) from None


# ---------------------------------------------------------------- trials


def grid(space: TuningSpace) -> dict[str, list]:
    """Every value of each range, for Optuna's GridSampler (integer and categorical only)."""
    out: dict[str, list] = {}
    for p in space.parameters:
        out[p.name] = (
            list(p.values) if p.type == "categorical" else list(range(int(p.min), int(p.max) + 1))
        )
    return out


def metric_direction(metric: str) -> str:
    """Losses and times go down, accuracies and throughput up."""
    return "maximize" if metric.endswith(("_acc", "_per_s")) else "minimize"


def trial_hyperparameters(space: TuningSpace, params: dict[str, Any]) -> dict[str, str]:
    return {**space.static, **{k: _to_text(v) for k, v in params.items()}}


# ---------------------------------------------------------------- SageMaker


def sagemaker_parameter_ranges(space: TuningSpace) -> dict[str, list]:
    ranges: dict[str, list] = {
        "IntegerParameterRanges": [],
        "ContinuousParameterRanges": [],
        "CategoricalParameterRanges": [],
    }
    for p in space.parameters:
        if p.type == "categorical":
            ranges["CategoricalParameterRanges"].append({"Name": p.name, "Values": list(p.values)})
        else:
            key = "IntegerParameterRanges" if p.type == "integer" else "ContinuousParameterRanges"
            low, high = (int(p.min), int(p.max)) if p.type == "integer" else (p.min, p.max)
            ranges[key].append(
                {
                    "Name": p.name,
                    "MinValue": str(low),
                    "MaxValue": str(high),
                    "ScalingType": SCALINGS[p.scaling],
                }
            )
    return ranges
