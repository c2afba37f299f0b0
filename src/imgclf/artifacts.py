"""The model artifact (model.pt, labels.json, model_config.json, metrics.json; model.onnx and
its record from imgclf.graph) and atomic training checkpoints. Everything is loadable with
`torch.load(weights_only=True)`. torch is imported where tensors are read or written, so the
description's checks (`read_description`) cost an endpoint no torch import."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf import __version__
from imgclf.config import ARCHITECTURES
from imgclf.contract import CHECKPOINT_FILE, LABELS_FILE, METRICS_FILE, MODEL_FILE
from imgclf.contract import MODEL_CONFIG_FILE as CONFIG_FILE
from imgclf.data.transforms import Preprocess
from imgclf.errors import UserError, reason
from imgclf.util import atomic_write, write_json

if TYPE_CHECKING:
    import torch

ARTIFACT_FORMAT = 1
# Readable by any user: SageMaker tars model/ with its modes, and whoever serves the unpacked
# model.tar.gz (any uid) must read it. mkstemp alone would leave 0600.
FILE_MODE = 0o644


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename over `path` (util.atomic_write):
    a reader (or a resumed job) sees the old file or the new one, never half of one. The file
    is FILE_MODE."""
    atomic_write(path, write, mode=FILE_MODE)


def atomic_save(obj: Any, path: Path) -> None:
    import torch

    atomic_write_bytes(path, lambda handle: torch.save(obj, handle))


# Bounds on what an artifact may ask of the process that loads it, checked before anything is
# read whole, allocated or built (a served model folder is input like any request).
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 256  # a label comes from a class folder's name (at most 255 bytes)
# labels.json (~170 bytes a label at MAX_LABELS) and model_config.json (which lists the class
# folders too): read whole and parsed, so bounded by their size on disk first.
MAX_JSON_BYTES = 16 * 1024 * 1024
# model.pt may be this much larger than the tensors the architecture holds (torch.save's zip
# records and pickle).
MODEL_FILE_SLACK = 1024 * 1024
MODEL_FILE_SLACK_PER_TENSOR = 4096


@dataclass(frozen=True)
class ModelArtifact:
    state_dict: dict[str, torch.Tensor]
    labels: list[str]
    config: dict[str, Any]

    @property
    def arch(self) -> str:
        return self.config["arch"]

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.config["preprocess"])

    @property
    def temperature(self) -> float:
        """What the logits are divided by before the softmax (1.0: not calibrated)."""
        return float(self.config.get("temperature", 1.0))

    @property
    def thresholds(self) -> list[float] | None:
        """Each class's confidence threshold (best F1 on the validation split), label order."""
        values = self.config.get("thresholds")
        return [float(v) for v in values] if values is not None else None


def save_artifact(
    model_dir: Path,
    *,
    state_dict: dict[str, torch.Tensor],
    labels: list[str],
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> None:
    """The model dir SageMaker tars into model.tar.gz; it carries everything needed to serve."""
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_save(state, model_dir / MODEL_FILE)
    write_json(model_dir / LABELS_FILE, {str(i): name for i, name in enumerate(labels)})
    write_json(
        model_dir / CONFIG_FILE,
        {**config, "num_classes": len(labels), "format": ARTIFACT_FORMAT, "version": __version__},
    )
    if metrics is not None:
        write_json(model_dir / METRICS_FILE, metrics)


def load_artifact(model_dir: Path) -> ModelArtifact:
    """Read a model dir, checking each file before it costs anything: sizes on disk, then
    model_config.json and labels.json against what save_artifact writes (check_config,
    check_labels), then model.pt's size against what its architecture holds, then its tensors'
    names, shapes and dtypes. Any refusal is one UserError line naming the file, the key and
    what is accepted."""
    model_dir = Path(model_dir)
    config, labels = read_description(model_dir)
    where = f"model artifact {model_dir}"
    state = _load_state(model_dir / MODEL_FILE, config["arch"], len(labels), where)
    return ModelArtifact(state, labels, config)


def read_description(model_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """(model_config.json, the labels in order), checked as load_artifact checks them (its
    three files present, sizes, check_config, check_labels, the count agreeing); model.pt's
    tensors are not read. No torch."""
    model_dir = Path(model_dir)
    for name in (MODEL_FILE, LABELS_FILE, CONFIG_FILE):
        if not (model_dir / name).is_file():
            raise UserError(
                f"model artifact {model_dir} lacks {name}; it needs "
                f"{MODEL_FILE}, {LABELS_FILE} and {CONFIG_FILE}"
            )
    where = f"model artifact {model_dir}"
    try:
        config = check_config(_read_json(model_dir / CONFIG_FILE))
        labels = check_labels(_read_json(model_dir / LABELS_FILE))
    except ArtifactProblem as exc:
        raise UserError(f"{where}: {exc}") from None
    if config["num_classes"] != len(labels):
        raise UserError(
            f"{where}: {LABELS_FILE} names {len(labels)} labels but {CONFIG_FILE} says "
            f"num_classes {config['num_classes']}; they must agree"
        )
    return config, labels


class ArtifactProblem(ValueError):
    """What is wrong with one file of an artifact: "<file>: <key> is <value>: accepted ..."."""


def _read_json(path: Path) -> Any:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ArtifactProblem(
            f"{path.name} is {size} bytes: accepted up to {MAX_JSON_BYTES} bytes "
            f"(at most {MAX_LABELS} labels)"
        )
    with path.open("rb") as handle:
        raw = handle.read(MAX_JSON_BYTES + 1)  # the bound holds if the file grew since
    try:
        if len(raw) > MAX_JSON_BYTES:
            raise ValueError(f"over {MAX_JSON_BYTES} bytes")
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ArtifactProblem(f"{path.name} is not valid JSON ({reason(exc)})") from None


def _kind(value: Any) -> str:
    return {list: "a list", dict: "an object", str: "text"}.get(type(value), type(value).__name__)


def check_config(config: Any) -> dict[str, Any]:
    """model_config.json as save_artifact writes it (arch, preprocess, num_classes; format and
    classes when present), or ArtifactProblem naming the key and what is accepted."""
    name = CONFIG_FILE
    if not isinstance(config, dict):
        raise ArtifactProblem(
            f'{name} is {_kind(config)}: expected an object {{"arch": ..., "preprocess": '
            '..., "num_classes": ...}, as training writes it'
        )
    if config.get("format", ARTIFACT_FORMAT) != ARTIFACT_FORMAT:
        raise ArtifactProblem(
            f"{name}: format is {_shown(config['format'])}: this imgclf reads format "
            f"{ARTIFACT_FORMAT} (the model was written by imgclf {_shown(config.get('version'))})"
        )
    arch = config.get("arch")
    if arch not in ARCHITECTURES:
        raise ArtifactProblem(
            f"{name}: arch is {_shown(arch)}: accepted {', '.join(ARCHITECTURES)}"
        )
    try:
        Preprocess.from_dict(config.get("preprocess"), where="preprocess")
    except ValueError as exc:
        raise ArtifactProblem(f"{name}: {exc}") from None
    count = config.get("num_classes")
    if not (isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= MAX_LABELS):
        raise ArtifactProblem(
            f"{name}: num_classes is {_shown(count)}: accepted an integer from 1 to {MAX_LABELS}"
        )
    temperature = config.get("temperature", 1.0)
    if not (_number(temperature) and 0.01 <= temperature <= 100):
        raise ArtifactProblem(
            f"{name}: temperature is {_shown(temperature)}: accepted a number from 0.01 to 100"
        )
    thresholds = config.get("thresholds")
    if thresholds is not None and not (
        isinstance(thresholds, list)
        and len(thresholds) == count
        and all(_number(t) and 0 <= t <= 1 for t in thresholds)
    ):
        raise ArtifactProblem(
            f"{name}: thresholds is not a list of {count} numbers from 0 to 1 (num_classes)"
        )
    classes = config.get("classes")
    if classes is not None and not (
        isinstance(classes, list) and len(classes) == count and all(map(_label_ok, classes))
    ):
        raise ArtifactProblem(
            f"{name}: classes is not a list of {count} folder names of 1 to "
            f"{MAX_LABEL_CHARS} characters (num_classes)"
        )
    return config


def check_labels(labels_map: Any) -> list[str]:
    """labels.json as save_artifact writes it ({"0": name, "1": name, ...}) -> the names in
    order, or ArtifactProblem naming what is wrong and what is accepted."""
    name = LABELS_FILE
    if not isinstance(labels_map, dict):
        raise ArtifactProblem(
            f'{name} is {_kind(labels_map)}: expected an object {{"0": "first label", '
            '"1": ...}, as training writes it'
        )
    if not 1 <= len(labels_map) <= MAX_LABELS:
        raise ArtifactProblem(f"{name} holds {len(labels_map)} labels: accepted 1 to {MAX_LABELS}")
    keys = [str(index) for index in range(len(labels_map))]
    wanted = set(keys)
    if labels_map.keys() != wanted:
        odd = next(k for k in labels_map if k not in wanted)
        raise ArtifactProblem(
            f'{name}: key {_shown(odd)} is not accepted: the keys are "0" to '
            f'"{len(labels_map) - 1}", one per label'
        )
    labels = []
    for index, key in enumerate(keys):
        value = labels_map[key]
        if not _label_ok(value):
            raise ArtifactProblem(
                f'{name}: "{index}" is {_shown(value)}: accepted text of 1 to '
                f"{MAX_LABEL_CHARS} characters"
            )
        labels.append(value)
    return labels


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _label_ok(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= MAX_LABEL_CHARS


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _load_state(path: Path, arch: str, num_classes: int, where: str) -> dict[str, torch.Tensor]:
    """model.pt, refused by its size before it is read and by its tensors before any model
    is built from them."""
    import torch

    from imgclf import models  # torchvision: only where an artifact is loaded

    layout = models.state_layout(arch, num_classes)
    limit = (
        models.state_bytes(layout) + MODEL_FILE_SLACK + MODEL_FILE_SLACK_PER_TENSOR * len(layout)
    )
    size = path.stat().st_size
    if size > limit:
        raise UserError(
            f"{where}: {MODEL_FILE} is {size} bytes: accepted up to {limit} bytes, what {arch} "
            f"with {num_classes} classes holds"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # MemoryError included: named, never an empty reason
        raise UserError(f"{where}: {MODEL_FILE} cannot be loaded ({reason(exc)})") from None
    problem = models.state_mismatch(state, arch, num_classes)
    if problem is not None:
        raise UserError(
            f"{where}: {MODEL_FILE} does not fit {arch} with {num_classes} classes: {problem}"
        )
    return state


# ---------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(checkpoint_dir: Path, state: dict[str, Any]) -> Path:
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    atomic_save(state, path)
    return path


def load_checkpoint(checkpoint_dir: Path) -> dict[str, Any] | None:
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"checkpoint {path} cannot be loaded ({exc}); delete it to start from scratch"
        ) from None
