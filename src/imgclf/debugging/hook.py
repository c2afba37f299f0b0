"""The smdebug hook of the training program.

It is turned on by the `debug=true` hyperparameter (what `launch.py train --debug` sends on
every target), or by an `input/config/debughookconfig.json` that names collections (SageMaker
writes it for a DebugHookConfig with CollectionConfigurations). The SageMaker SDK sends a
default DebugHookConfig with no collections to every plain Estimator: that alone leaves the
hook off (it measured ~1.5x slower epochs on CPU), and the log says how to turn it on.
Off, it costs nothing. smdebug is optional at run time: when it cannot be imported, training
runs and `output/data/debug.json` says why the tensors are missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.contract import DEBUG_COLLECTIONS, DEBUG_STATUS_FILE, DEFAULT_BASE_DIR, Layout
from imgclf.util import write_json

log = logging.getLogger("imgclf.debug")

CONFIG_FILE = "debughookconfig.json"
# Collections and how often (steps) each is saved when the config does not say.
DEFAULT_COLLECTIONS = DEBUG_COLLECTIONS
# Normalisation-layer outputs (what the next ReLU sees) in the first steps: the weight
# initialisation rule compares their spread across layers.
ACTIVATIONS = "activations"
ACTIVATIONS_REGEX = r".*(bn\d*|norm\d*|downsample\.1)_output_0"
ACTIVATION_STEPS = [0, 1, 2, 3, 4]
REDUCTIONS = ["mean", "variance"]
ABS_REDUCTIONS = ["mean", "max"]


@dataclass(frozen=True)
class DebugSettings:
    out_dir: Path
    collections: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_COLLECTIONS))
    source: str = "hyperparameter"


def _rebase(path: str, layout: Layout) -> Path:
    """SageMaker writes container paths (/opt/ml/...); keep them under our base dir."""
    p = Path(path)
    try:
        return layout.base / p.relative_to(DEFAULT_BASE_DIR)
    except ValueError:
        return p


def find_tensor_dir(job_dir: Path) -> Path | None:
    """Where a finished job's tensors are: as debug.json says (rebased to this job dir), or
    the two default places."""
    layout = Layout(job_dir)
    candidates = []
    try:
        out_dir = json.loads(layout.debug_status_file.read_text()).get("out_dir")
        if out_dir:
            candidates.append(Path(out_dir))
    except (OSError, ValueError):
        pass
    candidates += [layout.output_dir / "tensors", layout.output_data_dir / "tensors"]
    return next((c for c in candidates if c.is_dir()), None)


def read_settings(layout: Layout, debug: bool) -> DebugSettings | None:
    path = layout.config_dir / CONFIG_FILE
    # debug=true without SageMaker's file: inside output/data, which SageMaker uploads as
    # output.tar.gz, so `launch.py debug` and `report` can read the tensors afterwards.
    default_dir = layout.output_data_dir / "tensors"
    if not path.exists():
        return DebugSettings(default_dir) if debug else None
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        log.warning("ignoring %s: not JSON (%s)", path, exc)
        return DebugSettings(default_dir) if debug else None
    if not debug and not doc.get("CollectionConfigurations"):
        log.info(
            "%s names no collections (the SageMaker SDK's default): no tensors are recorded; "
            "set the hyperparameter debug=true or pass CollectionConfigurations to record them",
            CONFIG_FILE,
        )
        return None
    out_dir = _rebase(doc["LocalPath"], layout) if doc.get("LocalPath") else default_dir
    default_interval = int((doc.get("HookParameters") or {}).get("save_interval", 10))
    collections = dict(DEFAULT_COLLECTIONS)
    for item in doc.get("CollectionConfigurations") or []:
        params = item.get("CollectionParameters") or {}
        collections[item["CollectionName"]] = int(params.get("save_interval", default_interval))
    return DebugSettings(out_dir, collections, source=CONFIG_FILE)


class DebugHook:
    """The smdebug hook, or a no-op when debugging is off or smdebug is missing."""

    def __init__(self, hook=None, settings: DebugSettings | None = None, reason: str = ""):
        self.hook, self.settings, self.reason = hook, settings, reason

    @property
    def active(self) -> bool:
        return self.hook is not None

    def train_mode(self) -> None:
        if self.hook is not None:
            from smdebug import modes

            self.hook.set_mode(modes.TRAIN)

    def eval_mode(self) -> None:
        if self.hook is not None:
            from smdebug import modes

            self.hook.set_mode(modes.EVAL)

    def predict_mode(self) -> None:
        if self.hook is not None:
            from smdebug import modes

            self.hook.set_mode(modes.PREDICT)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()


def create_hook(
    settings: DebugSettings | None, model, loss_modules, *, status_dir: Path
) -> DebugHook:
    """Register smdebug on the (unwrapped) model and the loss modules. Under DDP only the main
    process calls this: one writer."""
    if settings is None:
        return DebugHook()
    try:
        import smdebug.pytorch as smd
    except Exception as exc:  # any import failure: train without tensors, say so
        reason = f"smdebug could not be imported ({type(exc).__name__}: {exc})"
        log.warning("%s; training runs without recording tensors", reason)
        write_json(status_dir / DEBUG_STATUS_FILE, {"tensors": False, "reason": reason})
        return DebugHook(reason=reason)
    settings.out_dir.parent.mkdir(parents=True, exist_ok=True)
    names = [*settings.collections, ACTIVATIONS]
    hook = smd.Hook(
        out_dir=str(settings.out_dir),
        save_config=smd.SaveConfig(save_interval=10),
        include_collections=names,
        include_workers="one",
    )
    # Big tensors are stored as the few numbers the rules read (a ResNet-18's weights and
    # gradients in full were 90 MB per saved step); losses are stored whole.
    reduced = smd.ReductionConfig(reductions=REDUCTIONS, abs_reductions=ABS_REDUCTIONS)
    for name, interval in settings.collections.items():
        collection = hook.get_collection(name)
        collection.save_config = smd.SaveConfig(save_interval=interval)
        if name != "losses":
            collection.reduction_config = reduced
    activations = hook.get_collection(ACTIVATIONS)
    activations.include(ACTIVATIONS_REGEX)
    activations.save_config = smd.SaveConfig(save_steps=ACTIVATION_STEPS)
    activations.reduction_config = reduced
    hook.register_module(model)
    for module in loss_modules:
        hook.register_loss(module)
    write_json(
        status_dir / DEBUG_STATUS_FILE,
        {
            "tensors": True,
            "out_dir": str(settings.out_dir),
            "collections": {**settings.collections, ACTIVATIONS: ACTIVATION_STEPS},
            "source": settings.source,
        },
    )
    log.info("smdebug hook on: %s -> %s", ", ".join(names), settings.out_dir)
    return DebugHook(hook, settings)
