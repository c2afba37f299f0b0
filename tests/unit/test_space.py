import optuna
import optuna.distributions as d
import pytest

from imgclf.errors import ConfigError
from imgclf.tuning import optuna_setup
from imgclf.tuning import space as sp

ROOT_SPACE = "tuning.yaml"


def _write(tmp_path, text):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


def test_the_shipped_space_loads(tmp_path):
    space = sp.load_space(ROOT_SPACE)
    assert set(space.names) == {"lr", "batch_size", "weight_decay", "epochs"}
    assert (space.metric, space.direction, space.strategy) == ("valid_loss", "minimize", "bayesian")


def test_every_range_type_converts_to_optuna_and_sagemaker(tmp_path):
    space = sp.load_space(
        _write(
            tmp_path,
            """
parameters:
  lr: {type: continuous, min: 1e-4, max: 0.1, scaling: log}
  label_smoothing: {type: continuous, min: 0, max: 0.2}
  epochs: {type: integer, min: 2, max: 9}
  optimizer: {type: categorical, values: [adamw, sgd]}
  class_weights: {type: categorical, values: [true, false]}
""",
        ),
        fixed={"arch": "resnet18"},
    )
    dists = optuna_setup.optuna_distributions(space)
    assert dists["lr"] == d.FloatDistribution(1e-4, 0.1, log=True)
    assert dists["label_smoothing"] == d.FloatDistribution(0.0, 0.2)
    assert dists["epochs"] == d.IntDistribution(2, 9)
    assert dists["optimizer"] == d.CategoricalDistribution(["adamw", "sgd"])
    ranges = sp.sagemaker_parameter_ranges(space)
    assert {
        "Name": "lr",
        "MinValue": "0.0001",
        "MaxValue": "0.1",
        "ScalingType": "Logarithmic",
    } in ranges["ContinuousParameterRanges"]
    assert ranges["IntegerParameterRanges"] == [
        {"Name": "epochs", "MinValue": "2", "MaxValue": "9", "ScalingType": "Auto"}
    ]
    assert {"Name": "class_weights", "Values": ["true", "false"]} in ranges[
        "CategoricalParameterRanges"
    ]
    assert space.static == {"arch": "resnet18"} and space.max_epochs() == 9


@pytest.mark.parametrize(
    "text,fragment,line",
    [
        ("parameters:\n  lr: {type: continuous, min: 0.5, max: 0.1}\n", "above max", 2),
        ("parameters:\n  lr: {type: continuous, min: 0, max: 0.1, scaling: log}\n", "min > 0", 2),
        ("parameters:\n  lr: {type: gaussian, min: 0, max: 1}\n", "range type", 2),
        (
            "objective: {metric: f1}\nparameters:\n  lr: {type: continuous, min: 0, max: 1}\n",
            "unknown objective metric",
            1,
        ),
        (
            "parameters:\n  learning_rate: {type: continuous, min: 0, max: 1}\n",
            "unknown hyperparameter",
            2,
        ),
        (
            "strategy: annealing\nparameters:\n  lr: {type: continuous, min: 0, max: 1}\n",
            "unknown strategy",
            1,
        ),
        ("parameters:\n  optimizer: {type: categorical, values: [adamw, lion]}\n", "adamw, sgd", 2),
        ("parameters: [lr\n", "not valid YAML", 2),  # where the parser found the stream end
        (
            "early_stopping_min_epochs: -1\n"
            "parameters:\n  lr: {type: continuous, min: 0, max: 1}\n",
            "integer >= 0",
            1,
        ),
    ],
)
def test_invalid_spaces_name_the_line_and_the_key(tmp_path, text, fragment, line):
    with pytest.raises(ConfigError) as err:
        sp.load_space(_write(tmp_path, text))
    assert fragment in str(err.value)
    assert f"line {line}" in str(err.value)


def test_a_tuned_name_cannot_also_be_fixed(tmp_path):
    with pytest.raises(ConfigError, match="both tuned and fixed"):
        sp.load_space(
            _write(tmp_path, "parameters:\n  lr: {type: continuous, min: 0, max: 1}\n"),
            fixed={"lr": "0.1"},
        )


def test_the_median_rule_waits_for_the_minimum_epochs(tmp_path):
    text = "early_stopping_rule: median\nparameters:\n  epochs: {type: integer, min: 4, max: 10}\n"
    space = sp.load_space(_write(tmp_path, text))
    assert space.min_epochs_before_stopping() == 5  # half the most epochs
    _, pruner = optuna_setup.sampler_and_pruner(space, max_epochs=10)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert pruner._n_warmup_steps == 6  # epochs 1-5 are never judged
    explicit = sp.load_space(_write(tmp_path, "early_stopping_min_epochs: 2\n" + text))
    _, pruner = optuna_setup.sampler_and_pruner(explicit, max_epochs=10)
    assert pruner._n_warmup_steps == 3


def test_the_default_rule_is_successive_halving_on_the_training_loss(tmp_path):
    space = sp.load_space(ROOT_SPACE)
    assert space.early_stopping and space.early_stopping_rule == "asha"
    assert space.stopping_metric() == "train_loss" and space.min_epochs_before_stopping() == 0
    _, pruner = optuna_setup.sampler_and_pruner(space, max_epochs=15)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert (pruner._min_resource, pruner._reduction_factor) == (
        1,
        optuna_setup.ASHA_REDUCTION_FACTOR,
    )
    later = sp.load_space(_write(tmp_path, "early_stopping_min_epochs: 2\n" + _LR))
    assert optuna_setup.sampler_and_pruner(later, max_epochs=8)[1]._min_resource == 3


_LR = "parameters:\n  lr: {type: continuous, min: 0.001, max: 0.1}\n"


@pytest.mark.parametrize(
    "text, judged_on",
    [
        (_LR, "train_loss"),
        # Tuned over what the training loss measures: the objective ranks trials instead.
        (_LR + "  label_smoothing: {type: continuous, min: 0, max: 0.2}\n", "valid_loss"),
        (_LR + "  min_crop_scale: {type: continuous, min: 0.1, max: 0.9}\n", "valid_loss"),
        ("early_stopping_metric: valid_acc\n" + _LR, "valid_acc"),
    ],
)
def test_early_stopping_judges_by_a_metric_that_ranks_trials_fairly(tmp_path, text, judged_on):
    assert sp.load_space(_write(tmp_path, text)).stopping_metric() == judged_on


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("early_stopping_rule: bohb\n" + _LR, "asha, median"),
        ("early_stopping_metric: f1\n" + _LR, "auto or one of train_loss"),
    ],
)
def test_unknown_early_stopping_settings_name_the_choices(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match="line 1") as err:
        sp.load_space(_write(tmp_path, text))
    assert fragment in str(err.value)
