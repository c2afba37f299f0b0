import math
import re

import pytest

from imgclf import metrics

ROW = {
    "epoch": 3,
    "train_loss": 0.123456,
    "train_acc": 0.9,
    "valid_loss": 0.2,
    "valid_acc": 0.85,
    "lr": 0.00123,
    "epoch_time": 12.5,
    "images_per_s": 456.7,
}


def test_epoch_line_parses_back_with_the_same_regexes():
    line = metrics.format_epoch_line(ROW)
    parsed = metrics.parse_metric_line(line)
    assert set(parsed) == set(ROW)
    for name, value in ROW.items():
        assert parsed[name] == pytest.approx(value, rel=1e-3)


def test_metric_definitions_match_the_printed_line():
    line = "2026-01-01 algo-1 stdout " + metrics.format_epoch_line(ROW)
    for definition in metrics.metric_definitions(list(metrics.EPOCH_METRICS)):
        match = re.search(definition["Regex"], line)
        assert match, definition
        assert float(match.group(1)) == pytest.approx(ROW[definition["Name"]], rel=1e-3)


def test_loss_regex_does_not_pick_up_a_longer_name():
    line = metrics.format_test_line({"test_loss": 0.5, "test_acc": 0.75, "test_top5": 1.0})
    assert metrics.parse_metric_line(line) == {"test_loss": 0.5, "test_acc": 0.75, "test_top5": 1.0}
    assert "valid_loss" not in metrics.parse_metric_line(line)


def test_non_finite_values_are_printed_and_parsed():
    line = metrics.format_epoch_line({**ROW, "train_loss": float("nan"), "valid_loss": math.inf})
    parsed = metrics.parse_metric_line(line)
    assert math.isnan(parsed["train_loss"]) and math.isinf(parsed["valid_loss"])


def test_other_lines_are_ignored_and_missing_values_refused():
    assert metrics.parse_metric_line("INFO train_loss=1.0 without the prefix") == {}
    with pytest.raises(ValueError):
        metrics.format_epoch_line({"epoch": 1})
