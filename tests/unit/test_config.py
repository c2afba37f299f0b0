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


def test_the_keys_sagemaker_sets_are_accepted_and_left_to_it():
    # what SageMaker, the SDK (JSON-encoded, or plain) and our launcher write
    cfg = parse_hyperparameters(
        {
            "sagemaker_program": '"imgclf_train.py"',
            "sagemaker_container_log_level": "20",
            "sagemaker_job_name": '"imgclf-20260101-120000"',
            "sagemaker_region": '"eu-west-1"',
            "sagemaker_enable_cloudwatch_metrics": "false",
            "sagemaker_estimator_class_name": '"Estimator"',
            "sagemaker_estimator_module": '"sagemaker.estimator"',
            "sagemaker_instance_type": '"ml.g5.xlarge"',
            "sagemaker_torch_distributed_enabled": "true",
            "sagemaker_mpi_num_of_processes_per_host": "4",
            "sagemaker_distributed_dataparallel_enabled": "false",
            "_tuning_objective_metric": '"valid_loss"',
        }
    )
    assert cfg == TrainConfig()


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        # the audit's: the training entry ran DIR/imgclf_train.py
        ("sagemaker_submit_directory", "/tmp/x", "no value; this image trains only with its own"),
        ("sagemaker_submit_directory", '"s3://b/sourcedir.tar.gz"', "leave entry_point and"),
        ("sagemaker_program", '"train.py"', "only imgclf_train.py"),
        ("sagemaker_mpi_num_of_processes_per_host", "2; touch x", "an integer from 1 to 1024"),
        ("sagemaker_mpi_num_of_processes_per_host", "0", "an integer from 1 to 1024"),
        ("sagemaker_torch_distributed_enabled", "sure", "true or false"),
        ("sagemaker_distributed_dataparallel_enabled", "true", "distributes with torchrun only"),
        ("sagemaker_mpi_enabled", "true", "only false"),
        ("sagemaker_container_log_level", "loud", "a logging level"),
        ("sagemaker_job_name", '"a b"', "a SageMaker job name"),
        ("sagemaker_region", '"../.."', "an AWS region"),
        ("sagemaker_mpi_custom_mpi_options", '"-x A"', "of SageMaker's own keys this image takes"),
        ("sagemaker_s3_output", '"s3://b/x"', "sagemaker_program, sagemaker_submit_directory"),
        ("sagemaker_anything", "1", "is not accepted"),
    ],
)
def test_other_sagemaker_keys_and_values_are_refused_naming_what_is_accepted(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        parse_hyperparameters({key: value})
    message = str(err.value)
    assert key in message and fragment in message and "\n" not in message, message


def test_the_command_line_cannot_set_sagemaker_keys():
    for item in (
        "sagemaker_submit_directory=/tmp/x",
        "sagemaker-program=a.py",
        "_tuning_objective_metric=lr",
    ):
        with pytest.raises(ConfigError, match="set by SageMaker and the launcher"):
            parse_assignments([item])


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


# ---------------------------------------------------------------- what each SDK sends
# The SageMaker Python SDK 2.x sends str(value) ("False", "['a', 'b']", "None"); 3.x's
# ModelTrainer JSON-encodes ("false", "null"); the launcher json.dumps every value ("\"false\"").
# Each spelling of one value must configure the same job.


def _sdk_v2(value) -> str:
    return str(value)


def _sdk_v3(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _launcher(value) -> str:
    return json.dumps(value if isinstance(value, str) else _to_text(value))


def _to_text(value) -> str:
    return "true" if value is True else "false" if value is False else str(value)


@pytest.mark.parametrize("encode", [_sdk_v2, _sdk_v3, _launcher])
def test_every_boolean_reads_the_same_from_each_sdk(encode):
    assert encode(False) in ("False", "false", '"false"')
    booleans = [n for n, f in FIELDS.items() if isinstance(f.default, bool) and n != "pretrained"]
    for value in (False, True):
        raw = {name: encode(value) for name in booleans}
        cfg = parse_hyperparameters({**raw, "pretrained": encode(True)})  # freeze needs weights
        assert all(getattr(cfg, name) is value for name in booleans), (raw, cfg)


@pytest.mark.parametrize(
    "raw",
    [
        "['ExplodingTensor', 'Overfit']",  # SDK v2: str(["ExplodingTensor", "Overfit"])
        '["ExplodingTensor", "Overfit"]',  # SDK v3: json.dumps of the list
        "ExplodingTensor,Overfit",
        json.dumps("ExplodingTensor,Overfit"),  # the launcher
    ],
)
def test_a_list_valued_hyperparameter_reads_from_a_list_or_text(raw):
    assert parse_hyperparameters({"debug_stop_on": raw}).debug_stop_on == "ExplodingTensor,Overfit"


@pytest.mark.parametrize("raw", ["[]", "", json.dumps([])])
def test_an_empty_list_stops_on_no_rule(raw):
    assert parse_hyperparameters({"debug_stop_on": raw}).debug_stop_on == ""


@pytest.mark.parametrize("raw", ["[ExplodingTensor", "['ExplodingTensor', 3]", "[1, 2]"])
def test_a_list_that_cannot_be_read_is_refused_saying_how_to_give_one(raw):
    with pytest.raises(ConfigError) as exc:
        parse_hyperparameters({"debug_stop_on": raw})
    message = str(exc.value)
    assert message.startswith(f"hyperparameter debug_stop_on={raw!r} is not valid")
    assert "ExplodingTensor,Overfit" in message and "unknown rules" not in message


@pytest.mark.parametrize("raw", ["None", "null", json.dumps(None), json.dumps("None")])
def test_none_from_an_sdk_leaves_the_default_not_a_file_named_none(raw):
    cfg = parse_hyperparameters({"weights_path": raw, "features_dir": raw, "lr": raw})
    assert (cfg.weights_path, cfg.features_dir, cfg.lr) == ("", "", TrainConfig().lr)


def test_none_is_still_a_choice_where_the_field_has_one():
    assert parse_hyperparameters({"scheduler": "None"}).scheduler == "none"
    assert parse_hyperparameters({"scheduler": "null"}).scheduler == "cosine"  # unset
