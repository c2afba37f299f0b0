"""Every training hyperparameter: name, type, default, accepted values and help, parsed once.

SageMaker delivers hyperparameters as strings (JSON-encoded by the Python SDK since 2.110,
plain otherwise); `parse_hyperparameters` turns such a mapping into one frozen `TrainConfig`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imgclf.contract import PROCESSES_PER_HOST_KEY, TORCH_DISTRIBUTED_KEY, TRAIN_IMAGE_ENV
from imgclf.errors import ConfigError
from imgclf.util import FALSE_STRINGS, TRUE_STRINGS

# Keys SageMaker, its SDK and our launcher add on their own (PLATFORM_KEYS says which, and what
# each may hold); the user does not set them.
_PLATFORM_PREFIXES = ("sagemaker_", "_tuning_objective_metric")

# The architectures models.py can build; a unit test keeps the two lists equal. Kept here so the
# launcher validates `arch` without importing torch.
ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "efficientnet_b0",
    "convnext_tiny",
    "mobilenet_v3_large",
)


def _hp(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    items: bool = False,
) -> Any:
    """`items`: a list of names, held as comma-separated text (a list is accepted too)."""
    meta = {
        "help": help,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "items": items,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """The training job's hyperparameters, validated. Build it with `parse_hyperparameters`."""

    arch: str = _hp("resnet50", "torchvision architecture", choices=ARCHITECTURES)
    pretrained: bool = _hp(True, "start from ImageNet weights (torch cache or weights_path)")
    weights_path: str = _hp("", "file with pretrained weights (a state_dict) to start from")
    init_drop_classes: bool = _hp(
        False,
        "with --init-from (the model channel): allow the data to lack some of the model's "
        "classes, whose head rows are then dropped (refused otherwise)",
    )
    freeze: bool = _hp(False, "freeze the backbone and train only the new head")
    features_cache: bool = _hp(
        False,
        "frozen backbone on cached features: embed every split once (centre crops, no "
        "augmentation), then train only the head on the stored embeddings (implies freeze)",
    )
    features_dir: str = _hp(
        "", "where cached features are kept (default: checkpoints/features of the job)"
    )
    epochs: int = _hp(10, "number of epochs", minimum=1, maximum=10_000)
    batch_size: int = _hp(32, "images per batch on each process", minimum=1, maximum=65_536)
    lr: float = _hp(1e-3, "peak learning rate", minimum=0.0, maximum=10.0)
    weight_decay: float = _hp(1e-4, "weight decay", minimum=0.0, maximum=1.0)
    optimizer: str = _hp("adamw", "optimizer", choices=("adamw", "sgd"))
    momentum: float = _hp(0.9, "momentum for sgd", minimum=0.0, maximum=1.0)
    scheduler: str = _hp(
        "cosine", "learning-rate schedule (cosine has a linear warmup)", choices=("cosine", "none")
    )
    warmup_epochs: float = _hp(
        1.0, "linear warmup length in epochs (cosine only)", minimum=0.0, maximum=1_000.0
    )
    label_smoothing: float = _hp(
        0.0, "label smoothing of the cross-entropy loss", minimum=0.0, maximum=0.99
    )
    class_weights: bool = _hp(False, "weight the loss by inverse class frequency (balanced)")
    image_size: int = _hp(224, "square input size in pixels", minimum=16, maximum=2048)
    hflip: bool = _hp(True, "random horizontal flips in training")
    min_crop_scale: float = _hp(
        0.25, "smallest area fraction of a random-resized crop", minimum=0.01, maximum=1.0
    )
    device_augment: str = _hp(
        "auto",
        "random-resized crops and flips of whole batches on the training device instead of in "
        "the loader workers: auto (on a GPU: measured 1.10x end to end on an H100), on, off",
        choices=("auto", "on", "off"),
    )
    workers: int = _hp(
        -1, "data loader workers per process (-1: from the CPU count)", minimum=-1, maximum=256
    )
    amp: str = _hp(
        "auto",
        "mixed precision: auto (bf16 on a GPU that has it, else fp16; off on CPU), bf16, "
        "fp16, off (bf16 + channels_last measured 1.76x fp32 NCHW on an H100)",
        choices=("auto", "bf16", "fp16", "off"),
    )
    channels_last: bool = _hp(
        True,
        "channels_last memory format (measured for ResNet-50 at 224 px: 1.08x on CPU, 1.30x "
        "fp32 and 1.51x bf16 on an H100)",
    )
    compile: bool = _hp(
        False,
        "torch.compile the training step's model (inductor; minutes of compiling first, "
        "needs a C compiler; measured no faster than eager bf16 + channels_last on an H100)",
    )
    fused_optimizer: bool = _hp(
        False,
        "fused AdamW/SGD kernels (one kernel for all parameters; measured no gain on CPU and "
        "+2% on an H100, so off unless asked for)",
    )
    seed: int = _hp(0, "random seed (data order, augmentation, init)", minimum=0, maximum=2**31 - 1)
    patience: int = _hp(
        5, "early stopping: epochs without a better valid loss (0: off)", minimum=0, maximum=10_000
    )
    max_bad_images: int = _hp(
        100, "unreadable images skipped before the job fails", minimum=0, maximum=10**9
    )
    max_image_pixels: int = _hp(
        89_478_485,
        "bound on one image's decode: pixels of its full size, a 16-bit or float pixel counting "
        "3x and an alpha or CMYK one 2x; a costlier image is skipped as unreadable (default: "
        "Pillow's own warning size, ~0.7 GB of memory per loader worker)",
        minimum=1,
        maximum=178_956_970,  # Pillow refuses over twice its warning size whatever this says
    )
    debug: bool = _hp(
        False,
        "record tensors with smdebug and run the debugging rules (also on when SageMaker "
        "writes an input/config/debughookconfig.json that names collections)",
    )
    debug_stop_on: str = _hp(
        "ExplodingTensor",
        "comma-separated rules whose verdict stops the job (e.g. ExplodingTensor,Overfit; "
        "empty: none)",
        items=True,
    )
    profile: bool = _hp(
        False, "profile: torch.profiler window, data-wait vs compute per step, system usage"
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hyperparameters(self) -> dict[str, str]:
        """The string form SageMaker delivers (and `parse_hyperparameters` reads back)."""
        return {k: _to_string(v) for k, v in self.to_dict().items()}


def _to_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


def canonical_key(key: str) -> str:
    """`batch-size` and `batch_size` name the same hyperparameter."""
    return key.strip().replace("-", "_")


def is_platform_key(key: str) -> bool:
    return key.startswith(_PLATFORM_PREFIXES)


# ---------------------------------------------------------------- SageMaker's own keys

PROGRAM = TRAIN_IMAGE_ENV["SAGEMAKER_PROGRAM"]
_JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")  # CreateTrainingJob's pattern
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
_INSTANCE_TYPE = re.compile(r"ml\.[a-z0-9-]+\.[a-z0-9]+|local|local_gpu")
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,9}")
_METRIC_NAME = re.compile(r"[A-Za-z0-9_.:/ -]{1,255}")
_NOT_RUN = (
    "; this image trains only with its own program (imgclf_train.py): leave entry_point and "
    "source_dir out of the estimator"
)
_TORCHRUN_ONLY = (
    "; this image distributes with torchrun only: sagemaker_torch_distributed_enabled "
    "(the SDK's distribution={'torch_distributed': {'enabled': True}})"
)


def _text_matching(pattern: re.Pattern) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and pattern.fullmatch(v) is not None


def _boolean(value: Any) -> bool:
    return isinstance(value, bool) or str(value).strip().lower() in TRUE_STRINGS | FALSE_STRINGS


def _false(value: Any) -> bool:
    return value is False or str(value).strip().lower() in FALSE_STRINGS


def _integer(lo: int, hi: int) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if isinstance(value, bool):
            return False
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        return number.is_integer() and lo <= number <= hi

    return check


# Every sagemaker_* key SageMaker, its Python SDK, sagemaker-training or our launcher put in
# hyperparameters.json that this image accepts: (what a value must pass, what is accepted).
# sagemaker-training acts on several before our program starts (the submit directory it would
# run code from, the process count it writes into torchrun's command line), so the image's
# entry (container.main) checks them all first; any other sagemaker_* key is refused.
PLATFORM_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "sagemaker_program": (lambda v: v == PROGRAM, f"only {PROGRAM}{_NOT_RUN}"),
    "sagemaker_submit_directory": (lambda v: False, f"no value{_NOT_RUN}"),
    "sagemaker_job_name": (_text_matching(_JOB_NAME), "a SageMaker job name"),
    "sagemaker_region": (_text_matching(_REGION), "an AWS region such as us-east-1"),
    "sagemaker_container_log_level": (_integer(0, 50), "a logging level from 0 to 50"),
    "sagemaker_enable_cloudwatch_metrics": (_boolean, "true or false"),
    "sagemaker_estimator_class_name": (_text_matching(_DOTTED_NAME), "a Python class name"),
    "sagemaker_estimator_module": (_text_matching(_DOTTED_NAME), "a Python module name"),
    "sagemaker_instance_type": (_text_matching(_INSTANCE_TYPE), "an instance type (ml.*)"),
    "_tuning_objective_metric": (_text_matching(_METRIC_NAME), "a metric name"),
    TORCH_DISTRIBUTED_KEY: (_boolean, "true or false"),
    PROCESSES_PER_HOST_KEY: (_integer(1, 1024), "an integer from 1 to 1024"),
    **{
        key: (_false, f"only false{_TORCHRUN_ONLY}")
        for key in (
            "sagemaker_mpi_enabled",
            "sagemaker_distributed_dataparallel_enabled",
            "sagemaker_parameter_server_enabled",
            "sagemaker_pytorch_ddp_enabled",
            "sagemaker_pytorch_xla_multi_worker_enabled",
            "sagemaker_multi_worker_mirrored_strategy_enabled",
        )
    },
}


def check_platform_key(key: str, raw: Any) -> None:
    """A ConfigError unless `key` is one of PLATFORM_KEYS and its value is accepted."""
    if key not in PLATFORM_KEYS:
        raise ConfigError(
            f"hyperparameter {key!r} is not accepted: of SageMaker's own keys this image takes "
            + ", ".join(PLATFORM_KEYS)
        )
    check, accepted = PLATFORM_KEYS[key]
    value = _decode(raw)
    if not check(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
        raise ConfigError(f"hyperparameter {key}={shown} is not accepted: {accepted}")


def check_platform_keys(raw: Mapping[str, Any]) -> None:
    """Every SageMaker key of a hyperparameters mapping checked (check_platform_key)."""
    for key, value in raw.items():
        if is_platform_key(str(key)):
            check_platform_key(str(key), value)


def _decode(raw: Any) -> Any:
    """SageMaker's SDK JSON-encodes each value (`"\\"resnet18\\""`); others send plain text."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except (ValueError, TypeError):
        return raw


def _unset(name: str, raw: Any) -> bool:
    """A value that means "not given": JSON null, or the text "None" that SDK v2 makes of
    Python's None (str(None)); the hyperparameter keeps its default. Not where "none" is one
    of the field's own choices (scheduler=none)."""
    value = _decode(raw)
    if isinstance(value, str) and value.strip() == "None":
        return "none" not in (FIELDS[name].metadata["choices"] or ())
    return value is None


def _items_text(name: str, raw: Any, value: Any) -> str:
    """A list-valued hyperparameter as its comma-separated text, from text (`"a,b"`), a JSON
    list (`["a", "b"]`) or a Python list as SDK v2 sends one (str(list): `"['a', 'b']"`)."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            pass  # refused below, as a list that could not be read
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return ",".join(v.strip() for v in value)
    if isinstance(value, str) and not value.strip().startswith("["):
        return value.strip()
    raise ConfigError(
        f"hyperparameter {name}={raw!r} is not valid: give names separated by commas "
        f'(ExplodingTensor,Overfit) or a list of names (["ExplodingTensor", "Overfit"])'
    )


def _coerce(name: str, raw: Any) -> Any:
    f = FIELDS[name]
    meta = f.metadata
    value = _decode(raw)
    kind = type(f.default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, int | float) and value in (0, 1):
                out = bool(value)
            elif str(value).strip().lower() in TRUE_STRINGS:
                out = True
            elif str(value).strip().lower() in FALSE_STRINGS:
                out = False
            else:
                raise ValueError
        elif kind is int:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not number.is_integer():
                raise ValueError
            out = int(number)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError
        elif meta["items"]:
            out = _items_text(name, raw, value)
        else:
            out = str(value).strip()
            if meta["choices"] is not None:
                out = out.lower()
    except (TypeError, ValueError):
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "text")
        raise ConfigError(
            f"hyperparameter {name}={raw!r} is not valid: expected {expected} ({meta['help']})"
        ) from None
    if meta["choices"] is not None and out not in meta["choices"]:
        raise ConfigError(
            f"hyperparameter {name}={raw!r} is not valid: "
            f"choose one of {', '.join(meta['choices'])}"
        )
    lo, hi = meta["minimum"], meta["maximum"]
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise ConfigError(f"hyperparameter {name}={raw!r} is out of range: accepted {lo} to {hi}")
    return out


# The debugging rules' names (imgclf.debugging.rules keeps their logic; a test holds the two
# equal): debug_stop_on is checked here, before any data is read or weights are loaded.
DEBUG_RULES = (
    "LossNotDecreasing",
    "Overfit",
    "VanishingGradient",
    "ExplodingTensor",
    "PoorWeightInitialization",
    "ClassImbalance",
)


def debug_stop_rules(value: str) -> frozenset[str]:
    """`debug_stop_on` → the set of rule names; an unknown name is a ConfigError naming them."""
    names = frozenset(r.strip() for r in value.split(",") if r.strip())
    unknown = names - set(DEBUG_RULES)
    if unknown:
        raise ConfigError(
            f"debug_stop_on names unknown rules {sorted(unknown)}; known: {', '.join(DEBUG_RULES)}"
        )
    return names


def parse_hyperparameters(raw: Mapping[str, Any]) -> TrainConfig:
    """Validate a mapping of (usually string) hyperparameters into a frozen TrainConfig.

    Each value may come as plain text, JSON (the launcher, SDK v3) or Python's str() of it (SDK
    v2: "False", "['a', 'b']", "None"); null and None leave the default. Unknown keys are an
    error naming the valid ones; SageMaker's own `sagemaker_*` keys and
    `_tuning_objective_metric` are checked (PLATFORM_KEYS) and left to sagemaker-training.
    """
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for key, value in raw.items():
        if is_platform_key(key):
            check_platform_key(key, value)
            continue
        name = canonical_key(key)
        if name not in FIELDS:
            raise ConfigError(
                f"unknown hyperparameter {key!r}; valid hyperparameters are: "
                + ", ".join(sorted(FIELDS))
            )
        if name in seen:
            raise ConfigError(f"hyperparameter {name} is given twice (as {key!r} and another)")
        seen.add(name)
        if not _unset(name, value):
            values[name] = _coerce(name, value)
    config = TrainConfig(**values)
    debug_stop_rules(config.debug_stop_on)
    if config.freeze and not (config.pretrained or config.weights_path):
        raise ConfigError(
            "freeze=true trains only the head on a random backbone: set pretrained=true "
            "(or weights_path) or freeze=false"
        )
    return config


def parse_assignments(items: list[str]) -> dict[str, str]:
    """`["lr=0.01", "batch-size=64"]` from the command line → {"lr": "0.01", "batch_size": "64"}."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--hp {item!r} is not key=value (for example --hp lr=0.01)")
        name = canonical_key(key)
        refuse_platform_key(name, "--hp")
        if name in out and out[name] != value:
            raise ConfigError(
                f"--hp sets {name} twice ({out[name]!r}, then {value!r}); give each "
                "hyperparameter once (repeated --hp flags are merged)"
            )
        out[name] = value
    return out


def refuse_platform_key(key: str, where: str) -> None:
    """SageMaker's own keys come from SageMaker and the launcher's options, never a user's."""
    if is_platform_key(key):
        raise ConfigError(
            f"{where} {key}: keys starting with sagemaker_ or _tuning are set by SageMaker and "
            "the launcher (--nproc, --instance-count), not by hand; valid hyperparameters are: "
            + ", ".join(sorted(FIELDS))
        )


def describe() -> str:
    """One line per hyperparameter, for --help texts and error messages."""
    lines = []
    for name, f in FIELDS.items():
        choices = f" [{'|'.join(f.metadata['choices'])}]" if f.metadata["choices"] else ""
        lines.append(f"  {name}={_to_string(f.default)}{choices}: {f.metadata['help']}")
    return "\n".join(lines)
