import json

import pytest

from imgclf.config import (
    ARCHITECTURES,
    FIELDS,
    TrainConfig,
    parse_assignments,
    parse_hyperparameters,
)
from imgclf.errors import ConfigError


def test_defaults_parse_from_an_empty_mapping():
    assert parse_hyperparameters({}) == TrainConfig()


def test_string_values_as_sagemaker_delivers_them():
    cfg = parse_hyperparameters(
        {"arch": "resnet18", "epochs": "3", "lr": "0.01", "batch-size": "64", "pretrained": "False"}
    )
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.batch_size, cfg.pretrained) == (
        "resnet18",
        3,
        0.01,
        64,
        False,
    )


def test_json_encoded_values_from_the_python_sdk():
    raw = {
        k: json.dumps(v)
        for k, v in {
            "arch": "convnext_tiny",
            "epochs": 2,
            "lr": 1e-4,
            "class_weights": True,
        }.items()
    }
    cfg = parse_hyperparameters(raw)
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.class_weights) == ("convnext_tiny", 2, 1e-4, True)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("False", False),
        ("false", False),
        ("0", False),
        ("no", False),
        ("True", True),
        ("1", True),
        ('"true"', True),
        ("true", True),
    ],
)
def test_booleans(text, expected):
    assert parse_hyperparameters({"freeze": "false", "pretrained": text}).pretrained is expected


def test_platform_keys_are_ignored():
    cfg = parse_hyperparameters(
        {
            "sagemaker_program": '"x.py"',
            "_tuning_objective_metric": '"valid_loss"',
            "sagemaker_region": '"eu-west-1"',
        }
    )
    assert cfg == TrainConfig()


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        parse_hyperparameters({"learning_rate": "0.1"})
    message = str(err.value)
    assert "learning_rate" in message and "lr" in message and "batch_size" in message


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("epochs", "ten", "an integer"),
        ("epochs", "2.5", "an integer"),
        ("epochs", "0", "out of range"),
        ("lr", "fast", "a number"),
        ("lr", "nan", "a number"),
        ("pretrained", "maybe", "true or false"),
        ("optimizer", "sgdd", "adamw, sgd"),
        ("arch", "resnet19", "resnet18"),
        ("amp", "fp8", "auto, bf16, fp16, off"),
    ],
)
def test_bad_values_name_key_and_what_is_accepted(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        parse_hyperparameters({key: value})
    assert key in str(err.value) and fragment in str(err.value)


def test_duplicate_spellings_are_an_error():
    with pytest.raises(ConfigError, match="twice"):
        parse_hyperparameters({"batch_size": "8", "batch-size": "16"})


def test_freeze_without_pretrained_weights_is_an_error():
    with pytest.raises(ConfigError, match="freeze"):
        parse_hyperparameters({"freeze": "true", "pretrained": "false"})


def test_config_is_frozen_and_round_trips_through_strings():
    cfg = parse_hyperparameters({"arch": "resnet34", "lr": "0.05", "hflip": "false"})
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]
    assert parse_hyperparameters(cfg.to_hyperparameters()) == cfg


def test_every_field_has_help_and_arch_choices_are_the_registry():
    assert all(f.metadata["help"] for f in FIELDS.values())
    assert FIELDS["arch"].metadata["choices"] == ARCHITECTURES


def test_parse_assignments():
    assert parse_assignments(["lr=0.1", "batch-size=8", "weights_path=/a=b"]) == {
        "lr": "0.1",
        "batch_size": "8",
        "weights_path": "/a=b",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["lr"])


def test_debug_stop_on_is_checked_when_the_config_is_parsed():
    from imgclf.config import DEBUG_RULES
    from imgclf.debugging.rules import RULE_NAMES

    assert DEBUG_RULES == RULE_NAMES  # one list of names, the rules' own
    assert parse_hyperparameters({"debug_stop_on": "ExplodingTensor, Overfit"}).debug_stop_on
    with pytest.raises(
        ConfigError, match=r"unknown rules \['Overfitt'\].*known: LossNotDecreasing"
    ):
        parse_hyperparameters({"debug_stop_on": "Overfitt"})
