"""The one metric-line format: printed once per epoch by training, parsed by SageMaker's
MetricDefinitions and by the local tuner with the same regexes."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

PREFIX = "#metrics"

# name → printf format; the order is the order on the line.
EPOCH_METRICS: dict[str, str] = {
    "epoch": "{:d}",
    "train_loss": "{:.6f}",
    "train_acc": "{:.6f}",
    "valid_loss": "{:.6f}",
    "valid_acc": "{:.6f}",
    "lr": "{:.6g}",
    "epoch_time": "{:.3f}",
    "images_per_s": "{:.1f}",
}
TEST_METRICS: dict[str, str] = {
    "test_loss": "{:.6f}",
    "test_acc": "{:.6f}",
    "test_top5": "{:.6f}",
}
ALL_METRICS = {**EPOCH_METRICS, **TEST_METRICS}

_NUMBER = r"([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf))"


def metric_regex(name: str) -> str:
    """The regex whose first group is the metric's value (SageMaker MetricDefinitions syntax)."""
    if name not in ALL_METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(ALL_METRICS)}")
    return rf"{re.escape(PREFIX)}.*\b{name}={_NUMBER}"


def metric_definitions(names: Sequence[str] | None = None) -> list[dict[str, str]]:
    """`MetricDefinitions` for CreateTrainingJob / tuning jobs."""
    return [{"Name": n, "Regex": metric_regex(n)} for n in (names or list(ALL_METRICS))]


def _format(formats: Mapping[str, str], values: Mapping[str, float]) -> str:
    parts = [PREFIX]
    for name, fmt in formats.items():
        if name in values:
            value = values[name]
            if isinstance(value, float) and not math.isfinite(value):
                parts.append(f"{name}={'nan' if math.isnan(value) else 'inf'}")
            else:
                parts.append(f"{name}={fmt.format(value)}")
    return " ".join(parts)


def format_epoch_line(values: Mapping[str, float]) -> str:
    """`#metrics epoch=1 train_loss=... valid_acc=... lr=... epoch_time=... images_per_s=...`"""
    missing = [n for n in EPOCH_METRICS if n not in values]
    if missing:
        raise ValueError(f"epoch line lacks {missing}")
    return _format(EPOCH_METRICS, values)


def format_test_line(values: Mapping[str, float]) -> str:
    return _format(TEST_METRICS, values)


_COMPILED = {name: re.compile(metric_regex(name)) for name in ALL_METRICS}


def parse_metric_line(line: str) -> dict[str, float]:
    """Every metric found on one log line, parsed with the MetricDefinitions regexes."""
    if PREFIX not in line:
        return {}
    out = {}
    for name, pattern in _COMPILED.items():
        match = pattern.search(line)
        if match:
            out[name] = float(match.group(1))
    return out
