"""The model artifact (model.pt, labels.json, model_config.json, metrics.json) and atomic
training checkpoints. Everything is loadable with `torch.load(weights_only=True)`."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf import __version__
from imgclf.errors import UserError
from imgclf.util import atomic_write, write_json  # noqa: F401 - write_json: re-exported

MODEL_FILE = "model.pt"
LABELS_FILE = "labels.json"
CONFIG_FILE = "model_config.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
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
    atomic_write_bytes(path, lambda handle: torch.save(obj, handle))


@dataclass(frozen=True)
class ModelArtifact:
    state_dict: dict[str, torch.Tensor]
    labels: list[str]
    config: dict[str, Any]


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
    """Read a model dir; a missing or corrupt file is a UserError that names it."""
    model_dir = Path(model_dir)
    for name in (MODEL_FILE, LABELS_FILE, CONFIG_FILE):
        if not (model_dir / name).is_file():
            raise UserError(
                f"model artifact {model_dir} lacks {name}; it needs "
                f"{MODEL_FILE}, {LABELS_FILE} and {CONFIG_FILE}"
            )
    try:
        labels_map = json.loads((model_dir / LABELS_FILE).read_text())
        labels = [labels_map[str(i)] for i in range(len(labels_map))]
        config = json.loads((model_dir / CONFIG_FILE).read_text())
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"model artifact {model_dir}: unreadable labels or config ({exc})"
        ) from None
    try:
        state = torch.load(model_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"model artifact {model_dir}: {MODEL_FILE} cannot be loaded ({exc})"
        ) from None
    if config.get("num_classes") not in (None, len(labels)):
        raise UserError(
            f"model artifact {model_dir}: {len(labels)} labels but config says "
            f"{config['num_classes']} classes"
        )
    return ModelArtifact(state, labels, config)


# ---------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"checkpoint {path} cannot be loaded ({exc}); delete it to start from scratch"
        ) from None
