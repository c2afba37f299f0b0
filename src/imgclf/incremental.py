"""Incremental training (`train --init-from`): the model a job starts from instead of ImageNet.

The model arrives in the job's `model` channel, as SageMaker's built-in algorithms take it: a
model dir (a local job) or the one model.tar.gz SageMaker downloads there, unpacked by
`archives.unpack` and read by `artifacts.load_artifact` (checked before anything is allocated,
`weights_only`). Its weights go into the new network: all of them for the same class set; for
a grown one every weight but the head, whose rows follow the classes by label name, a new class
keeping its fresh row. A class the data no longer has is refused unless `init_drop_classes`.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf import archives, artifacts, models
from imgclf.data.scan import label_name
from imgclf.errors import UserError

MODEL_FILES = (artifacts.MODEL_FILE, artifacts.LABELS_FILE, artifacts.CONFIG_FILE)


@dataclass(frozen=True)
class StartModel:
    """The artifact a job starts from, and the digest of its weights file (what it was)."""

    artifact: artifacts.ModelArtifact
    sha256: str

    @property
    def folders(self) -> list[str]:
        """Its class folders in label order (labels.json's names for one that lacks them)."""
        return list(self.artifact.config.get("classes") or self.artifact.labels)


def channel_model_dir(channel: Path, scratch: Path) -> Path:
    """The model dir in the `model` channel: the channel itself when it holds the model's files,
    else the one archive in it (SageMaker's model.tar.gz), unpacked into `scratch`."""
    channel = Path(channel)
    if all((channel / name).is_file() for name in MODEL_FILES):
        return channel
    entries = []
    if channel.is_dir():
        entries = sorted(p for p in channel.iterdir() if not p.name.startswith("."))
    tars = [p for p in entries if archives.is_archive(p)]
    if len(entries) == 1 and len(tars) == 1:
        return archives.unpack(tars[0], Path(scratch) / "model")
    found = ", ".join(p.name for p in entries[:5]) or "nothing"
    raise UserError(
        f"the model channel ({channel}) holds {found}: --init-from needs a model dir "
        f"({', '.join(MODEL_FILES)}) or one model.tar.gz, as a training job writes them"
    )


def load_start_model(channel: Path) -> StartModel:
    """The artifact in the `model` channel, checked whole (artifacts.load_artifact)."""
    with tempfile.TemporaryDirectory(prefix="imgclf-init-from-") as scratch:
        model_dir = channel_model_dir(channel, Path(scratch))
        art = artifacts.load_artifact(model_dir)
        digest = _sha256(model_dir / artifacts.MODEL_FILE)
    return StartModel(art, digest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def head_rows(old: list[str], new: list[str]) -> list[int | None]:
    """For each class of `new`, the row of `old`'s head it keeps (None: a new class)."""
    index = {key: i for i, key in enumerate(old)}
    return [index.get(key) for key in new]


@dataclass(frozen=True)
class Plan:
    """How the start model's head maps onto the new class set."""

    rows: list[int | None]  # per new class: the old row, or None
    kept: list[str]
    added: list[str]
    dropped: list[str]


def plan_head(
    start: StartModel, folders: list[str], *, arch: str, allow_dropped: bool = False
) -> Plan:
    """Check that `start` fits a job training `arch` on class `folders` and map its head:
    another architecture is refused, and so is a class the data lacks unless `allow_dropped`."""
    art = start.artifact
    if art.arch != arch:
        raise UserError(
            f"--init-from model is {art.arch} but this job trains {arch}: its weights fit only "
            f"its own architecture; set --hp arch={art.arch}"
        )
    labels = [label_name(f) for f in folders]
    old_folders = start.folders
    if len(set(labels)) == len(labels) and len(set(art.labels)) == len(art.labels):
        old_keys, new_keys = art.labels, labels
    else:  # label names repeat (`001.cat`, `002.cat`): the folder names tell classes apart
        old_keys, new_keys = old_folders, list(folders)
    rows = head_rows(old_keys, new_keys)
    taken = {r for r in rows if r is not None}
    dropped = [art.labels[i] for i in range(len(art.labels)) if i not in taken]
    if dropped and not allow_dropped:
        shown = ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else "")
        raise UserError(
            f"the --init-from model knows {len(dropped)} classes the data lacks ({shown}); give "
            "the data every class, or set --hp init_drop_classes=true to drop their head rows"
        )
    return Plan(
        rows=rows,
        kept=[labels[i] for i, r in enumerate(rows) if r is not None],
        added=[labels[i] for i, r in enumerate(rows) if r is None],
        dropped=dropped,
    )


def initial_state(
    fresh: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    *,
    head: str,
    rows: list[int | None],
) -> dict[str, torch.Tensor]:
    """The new network's state: every tensor from `start` except the head's, whose rows are
    `start`'s where `rows` names one and `fresh`'s (a new class) elsewhere."""
    out = {}
    head_keys = {f"{head}.weight", f"{head}.bias"}
    for name, tensor in fresh.items():
        if name not in head_keys:
            out[name] = start[name]
            continue
        rows_out = tensor.detach().clone()
        for i, row in enumerate(rows):
            if row is not None:
                rows_out[i] = start[name][row]
        out[name] = rows_out
    return out


def start_network(model: nn.Module, start: StartModel, plan: Plan, *, arch: str) -> None:
    """Load `start`'s weights into `model` (built for the new class set) by `plan`."""
    head = models.get_architecture(arch).head
    state = initial_state(model.state_dict(), start.artifact.state_dict, head=head, rows=plan.rows)
    model.load_state_dict(state)


def record(start: StartModel, plan: Plan) -> dict[str, Any]:
    """What the new artifact says it started from (model_config.json and metrics.json)."""
    config = start.artifact.config
    return {
        "arch": start.artifact.arch,
        "model_sha256": start.sha256,
        "training_job": config.get("training_job"),
        "version": config.get("version"),
        "classes": start.folders,
        "kept": plan.kept,
        "added": plan.added,
        "dropped": plan.dropped,
    }


def describe(start: StartModel, plan: Plan) -> str:
    """One log line: what the job starts from and what its head keeps."""
    job = start.artifact.config.get("training_job")
    parts = [f"{len(plan.kept)} classes keep their head rows"]
    if plan.added:
        parts.append(f"{len(plan.added)} new ({', '.join(plan.added[:10])})")
    if plan.dropped:
        parts.append(f"{len(plan.dropped)} dropped ({', '.join(plan.dropped[:10])})")
    return (
        f"init-from: {start.artifact.arch} model{f' of job {job}' if job else ''} "
        f"(model.pt sha256 {start.sha256[:12]}): " + ", ".join(parts)
    )
