"""Debugging rules, written on smdebug's `Rule` API and run in-process over a job's tensors.

SageMaker Debugger's rule containers are closed to new customers, so these run inside our own
training container (and locally): after training, over `output/tensors`, and the fatal ones on
every step while it trains (`debug_stop_on`). Each gives a verdict with the step where it
fired and what to try. Thresholds default to those of SageMaker's built-in rules of the same
names (named below).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imgclf.errors import UserError

log = logging.getLogger("imgclf.rules")


# SageMaker built-in rule defaults (rule_parameters of smdebug_rulesconfig).
LOSS_NOT_DECREASING = {"num_steps": 20, "diff_percent": 0.1, "patience": 2}
OVERFIT = {"patience": 1, "ratio_threshold": 0.1}
VANISHING_GRADIENT = {"threshold": 0.0000001}
EXPLODING_TENSOR = {"only_nan": False}
POOR_WEIGHT_INITIALIZATION = {"threshold": 10.0, "distribution_range": 0.001, "steps": 1}
CLASS_IMBALANCE = {"threshold_imbalance": 10.0, "threshold_misprediction": 0.7}

ADVICE = {
    "LossNotDecreasing": "raise lr (or check the labels: a loss that never moves often means "
    "the targets do not match the images), or lower it if the loss is oscillating",
    "Overfit": "add augmentation (hflip, lower min_crop_scale), weight_decay, label_smoothing, "
    "fewer epochs (patience stops early), or freeze=true with little data",
    "VanishingGradient": "raise lr, drop freeze=true, or check that the loss reaches the model",
    "ExplodingTensor": "lower lr (try 10x lower), amp=off, or a longer warmup_epochs",
    "PoorWeightInitialization": "start from pretrained weights (pretrained=true) or a "
    "normalised architecture",
    "ClassImbalance": "class_weights=true, more images of the rare classes, or a per-class "
    "look at the report's worst classes",
}
RULE_NAMES = tuple(ADVICE)


@dataclass
class Verdict:
    rule: str
    status: str  # fired | quiet | skipped
    step: int | None = None
    message: str = ""
    advice: str = ""
    parameters: dict = field(default_factory=dict)

    def line(self) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        text = f"rule {self.rule}: {self.status.upper()}{where}"
        if self.message:
            text += f": {self.message}"
        if self.status == "fired":
            text += f". Try: {self.advice}"
        return text


class RuleStop(UserError):
    """A `debug_stop_on` rule fired while training: the job stops with this reason."""


# ---------------------------------------------------------------- pure checks (shared)


def first_non_finite(values) -> int | None:
    for i, v in enumerate(values):
        if not math.isfinite(v):
            return i
    return None


def overfit_index(
    train: list[float], valid: list[float], *, patience: int, ratio_threshold: float
) -> int | None:
    """The first evaluation (index) where validation loss has risen for more than `patience`
    evaluations while training loss fell, and sits `ratio_threshold` above it."""
    rising = 0
    for i in range(1, min(len(train), len(valid))):
        gap = (valid[i] - train[i]) / max(abs(train[i]), 1e-12)
        if valid[i] > valid[i - 1] and train[i] < train[i - 1] and gap > ratio_threshold:
            rising += 1
            if rising >= patience:
                return i
        else:
            rising = 0
    return None


def check_finite_loss(loss: float, *, step: int, epoch: int, lr: float) -> None:
    """ExplodingTensor while training: a NaN/Inf loss stops the job with the reason."""
    if not math.isfinite(loss):
        raise RuleStop(
            f"ExplodingTensor: the training loss is {loss} at step {step} (epoch {epoch}, "
            f"lr {lr:.3g}); {ADVICE['ExplodingTensor']}"
        )


def check_overfit_history(history: list[dict]) -> None:
    index = overfit_index(
        [h["train_loss"] for h in history], [h["valid_loss"] for h in history], **OVERFIT
    )
    if index is not None:
        h = history[index]
        raise RuleStop(
            f"Overfit: valid loss rose to {h['valid_loss']:.4f} at epoch {h['epoch']} while "
            f"train loss fell to {h['train_loss']:.4f}; {ADVICE['Overfit']}"
        )


# ---------------------------------------------------------------- smdebug rules


def _rule_base():
    from smdebug.rules.rule import Rule

    return Rule


def stat(tensor, step: int, name: str, *, absolute: bool = False) -> float:
    """A reduction of a saved tensor at a global step: the stored reduction when the hook saved
    reductions, else computed from the full value."""
    try:
        value = tensor.reduction_value(step, name, abs=absolute)
    except Exception:  # noqa: BLE001 - saved in full: compute it
        value = None
    if value is None:
        array = np.asarray(tensor.value(step), dtype=np.float64)
        if absolute:
            array = np.abs(array)
        value = {"mean": np.mean, "max": np.max, "variance": np.var}[name](array)
    return float(np.asarray(value, dtype=np.float64))


def make_rules(trial, context: dict) -> list:
    """smdebug Rule objects over `trial` (a smdebug trial of the job's tensors)."""
    from smdebug import modes

    Rule = _rule_base()

    class OurRule(Rule):
        """Parameters as attributes, the tensor names of `collections`, a `message` for the
        verdict."""

        collections: tuple[str, ...] = ()

        def __init__(self, base_trial, **params):
            super().__init__(base_trial, action_str="")
            self.__dict__.update(params)
            self.names = [
                n for c in self.collections for n in base_trial.tensor_names(collection=c)
            ]
            self.message = ""

    class LossNotDecreasing(OurRule):
        """The mean TRAIN loss of each window of `num_steps` saved steps must beat the best
        earlier window by `diff_percent` percent; fires when `patience` windows in a row do not
        (SageMaker's rule compares single steps, which fires on ordinary batch noise)."""

        collections = ("losses",)

        def invoke_at_step(self, step):
            for name in self.names:
                tensor = self.base_trial.tensor(name)
                steps = tensor.steps(mode=modes.TRAIN)
                global_steps = [self.base_trial.global_step(modes.TRAIN, s) for s in steps]
                if step not in global_steps:
                    return False
                count = global_steps.index(step) + 1
                n = self.num_steps
                if count % n or count < n * (self.patience + 1):
                    return False
                values = [float(tensor.value(s, mode=modes.TRAIN)) for s in steps[:count]]
                means = [float(np.mean(values[i : i + n])) for i in range(0, count, n)]
                stalled = 0
                for k in range(1, len(means)):
                    best = min(means[:k])
                    improved = means[k] <= best * (1 - self.diff_percent / 100)  # NaN: no
                    stalled = 0 if improved else stalled + 1
                if stalled >= self.patience:
                    self.message = (
                        f"the mean loss of the last {self.patience} windows of {n} steps "
                        f"({means[-1]:.4f}) did not beat the best earlier window "
                        f"({min(means[: -self.patience]):.4f}) by {self.diff_percent}%"
                    )
                    return True
            return False

    class Overfit(OurRule):
        """Per evaluation pass: valid loss rising while train loss falls (means per pass)."""

        def __init__(self, base_trial, **params):
            super().__init__(base_trial, **params)
            self.phases = _phase_means(base_trial)

        def invoke_at_step(self, step):
            train, valid, ends = self.phases
            index = overfit_index(
                train, valid, patience=self.patience, ratio_threshold=self.ratio_threshold
            )
            if index is not None and ends[index] == step:
                self.message = (
                    f"valid loss {valid[index]:.4f} rose (from {valid[index - 1]:.4f}) while "
                    f"train loss fell to {train[index]:.4f}, in evaluation {index + 1}"
                )
                return True
            return False

    class VanishingGradient(OurRule):
        collections = ("gradients",)

        def invoke_at_step(self, step):
            for name in self.names:
                tensor = self.base_trial.tensor(name)
                if step not in tensor.steps():
                    continue
                value = stat(tensor, step, "mean", absolute=True)
                if value < self.threshold:
                    self.message = f"mean |gradient| of {name} is {value:.3g}"
                    return True
            return False

    class ExplodingTensor(OurRule):
        collections = ("losses", "gradients", "weights")

        def invoke_at_step(self, step):
            for name in self.names:
                tensor = self.base_trial.tensor(name)
                if step not in tensor.steps():
                    continue
                # NaN/Inf anywhere in a tensor shows in its mean and its largest |value|.
                values = np.array(
                    [stat(tensor, step, "mean"), stat(tensor, step, "max", absolute=True)]
                )
                bad = np.isnan(values) if self.only_nan else ~np.isfinite(values)
                if bad.any():
                    self.message = f"{name} holds NaN/Inf values"
                    return True
            return False

    class PoorWeightInitialization(OurRule):
        """At the first saved steps: the spread of activation variances across layers."""

        collections = ("activations",)

        def invoke_at_step(self, step):
            if step >= self.steps or not self.names:
                return False
            variances = []
            for name in self.names:
                tensor = self.base_trial.tensor(name)
                if step in tensor.steps():
                    variances.append(stat(tensor, step, "variance"))
            if len(variances) < 2:
                return False
            low, high = min(variances), max(variances)
            if high < self.distribution_range:
                self.message = (
                    f"every layer's activation variance is below {self.distribution_range}"
                )
                return True
            if low <= 0 or high / low > self.threshold:
                self.message = (
                    f"activation variance spans {low:.3g} to {high:.3g} across "
                    f"{len(variances)} layers (ratio over {self.threshold})"
                )
                return True
            return False

    return [
        LossNotDecreasing(trial, **LOSS_NOT_DECREASING),
        Overfit(trial, **OVERFIT),
        VanishingGradient(trial, **VANISHING_GRADIENT),
        ExplodingTensor(trial, **EXPLODING_TENSOR),
        PoorWeightInitialization(trial, **POOR_WEIGHT_INITIALIZATION),
    ]


def _phase_means(trial) -> tuple[list[float], list[float], list[int]]:
    """Mean loss of each TRAIN pass and the EVAL pass after it (passes = runs of consecutive
    global steps in one mode), and the last global step of each EVAL pass."""
    from smdebug import modes

    names = trial.tensor_names(collection="losses")
    if not names:
        return [], [], []
    tensor = trial.tensor(names[0])
    runs: list[tuple[object, list[float], int]] = []
    points = []
    for mode in (modes.TRAIN, modes.EVAL):
        for s in tensor.steps(mode=mode):
            points.append((trial.global_step(mode, s), mode, float(tensor.value(s, mode=mode))))
    for g, mode, value in sorted(points, key=lambda p: p[0]):
        if runs and runs[-1][0] == mode:
            runs[-1][1].append(value)
            runs[-1] = (mode, runs[-1][1], g)
        else:
            runs.append((mode, [value], g))
    train, valid, ends = [], [], []
    last_train = None
    for mode, values, end in runs:
        if mode == modes.TRAIN:
            last_train = float(np.mean(values))
        elif last_train is not None:
            train.append(last_train)
            valid.append(float(np.mean(values)))
            ends.append(end)
    return train, valid, ends


def class_imbalance(context: dict) -> Verdict:
    counts = context.get("train_counts") or []
    params = dict(CLASS_IMBALANCE)
    verdict = Verdict("ClassImbalance", "quiet", advice=ADVICE["ClassImbalance"], parameters=params)
    nonzero = [c for c in counts if c > 0]
    if not nonzero:
        verdict.status, verdict.message = "skipped", "no training counts"
        return verdict
    ratio = max(nonzero) / min(nonzero)
    labels = context.get("labels") or [str(i) for i in range(len(counts))]
    if ratio > params["threshold_imbalance"]:
        verdict.status = "fired"
        verdict.message = (
            f"the largest class has {ratio:.1f}x the images of the smallest "
            f"({labels[counts.index(max(nonzero))]} vs {labels[counts.index(min(nonzero))]})"
        )
        return verdict
    # Underrepresented classes (under half the largest) that the model mostly gets wrong.
    per_class = context.get("per_class_accuracy") or {}
    rare = {labels[i] for i, c in enumerate(counts) if 0 < c < 0.5 * max(nonzero)}
    limit = params["threshold_misprediction"]
    worst = [(n, a) for n, a in per_class.items() if n in rare and 1 - a > limit]
    if worst:
        verdict.status = "fired"
        names = ", ".join(
            f"{n} ({1 - a:.0%} wrong)" for n, a in sorted(worst, key=lambda x: x[1])[:5]
        )
        verdict.message = f"underrepresented classes mostly mispredicted on test: {names}"
        return verdict
    verdict.message = f"largest/smallest class ratio {ratio:.1f}"
    return verdict


def run_rules(tensor_dir: Path, context: dict) -> list[Verdict]:
    """Every rule over the job's tensors (plus the dataset-level class imbalance check)."""
    verdicts = []
    try:
        from smdebug.exceptions import NoMoreData, RuleEvaluationConditionMet
        from smdebug.rules.rule_invoker import invoke_rule
        from smdebug.trials import create_trial
    except Exception as exc:  # smdebug missing: the dataset check still runs
        reason = f"smdebug could not be imported ({type(exc).__name__})"
        verdicts = [Verdict(n, "skipped", message=reason) for n in RULE_NAMES[:-1]]
        return [*verdicts, class_imbalance(context)]
    if not tensor_dir.is_dir():
        verdicts = [
            Verdict(n, "skipped", message="no tensors recorded (train with --debug)")
            for n in RULE_NAMES[:-1]
        ]
        return [*verdicts, class_imbalance(context)]
    logging.getLogger("smdebug").setLevel(logging.ERROR)
    trial = create_trial(str(tensor_dir))
    steps = trial.steps()
    last = max(steps) if steps else -1
    for rule in make_rules(trial, context):
        name = type(rule).__name__
        params = {
            "LossNotDecreasing": LOSS_NOT_DECREASING,
            "Overfit": OVERFIT,
            "VanishingGradient": VANISHING_GRADIENT,
            "ExplodingTensor": EXPLODING_TENSOR,
            "PoorWeightInitialization": POOR_WEIGHT_INITIALIZATION,
        }[name]
        verdict = Verdict(name, "quiet", advice=ADVICE[name], parameters=dict(params))
        if name == "PoorWeightInitialization" and context.get("pretrained"):
            verdict.status, verdict.message = "skipped", "the model starts from pretrained weights"
            verdicts.append(verdict)
            continue
        try:
            invoke_rule(rule, start_step=0, end_step=last + 1, raise_eval_cond=True)
        except RuleEvaluationConditionMet as met:
            verdict.status, verdict.step = "fired", met.step
            verdict.message = getattr(rule, "message", "")
        except NoMoreData:
            pass
        verdicts.append(verdict)
    verdicts.append(class_imbalance(context))
    return verdicts


def verdicts_to_json(verdicts: list[Verdict]) -> list[dict]:
    return [asdict(v) for v in verdicts]
