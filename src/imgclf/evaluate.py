"""`launch.py evaluate`: any model artifact on any ImageFolder split, without training. It
writes what a training job writes about its test split — metrics.json (accuracy, top-5,
per-class accuracy and precision/recall/F1, confusions, ECE with the model's own temperature),
<split>_predictions.csv and a report.html with the same sections — so a model can be checked
on new data before it is deployed."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from imgclf import archives, artifacts, engine, models, scores
from imgclf.contract import EVALUATION_FILE, METRICS_FILE
from imgclf.data.device import DeviceNormalize
from imgclf.data.loaders import (
    ImageListDataset,
    ShardSampler,
    default_workers,
    make_loader,
    shutdown_loaders,
)
from imgclf.data.scan import SplitScan, scan_dataset
from imgclf.data.transforms import eval_transform
from imgclf.errors import UserError
from imgclf.util import atomic_write, write_json

log = logging.getLogger("imgclf.evaluate")


def model_folder(model: Path, scratch: Path) -> Path:
    """A model dir as it is; a model.tar.gz unpacked (archives.unpack: plain files, bounded)
    into `scratch`."""
    model = Path(model)
    if model.is_dir():
        return model
    if model.is_file() and archives.is_archive(model):
        return archives.unpack(model, scratch / "model")
    raise UserError(f"--model {model}: not a model directory nor a model.tar.gz")


def load_network(
    model_dir: Path, device: torch.device
) -> tuple[torch.nn.Module, artifacts.ModelArtifact]:
    """The artifact (checked whole, weights_only) and the network it describes, in eval mode."""
    art = artifacts.load_artifact(model_dir)
    network = models.build_model(art.arch, len(art.labels))
    network.load_state_dict(art.state_dict)
    network.to(device).eval()
    if art.config.get("channels_last"):
        network.to(memory_format=torch.channels_last)
    return network, art


def class_folders(art: artifacts.ModelArtifact) -> list[str]:
    """The model's class folders in label order (labels.json's names for an artifact that
    does not list them)."""
    return list(art.config.get("classes") or art.labels)


def evaluate_model(
    model: Path,
    data_dir: Path,
    *,
    split: str = "test",
    out: Path,
    batch_size: int = 64,
    workers: int | None = None,
) -> dict:
    """Evaluate `model` on `data_dir/split` (or `data_dir` itself when it holds the class
    folders) and write out/metrics.json, out/evaluation.json, out/<split>_predictions.csv and
    out/report.html. Returns the metrics."""
    root = Path(data_dir) / split
    if not root.is_dir():
        raise UserError(f"--data {data_dir}: no {split}/ folder in it (--split names the split)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="imgclf-evaluate-") as scratch:
        network, art = load_network(model_folder(model, Path(scratch)), device)
    folders = class_folders(art)
    scan = scan_dataset({split: root}).splits[split]
    unknown = [c for c in scan.classes if c not in folders]
    if unknown:
        raise UserError(
            f"{root} has classes the model does not know: {', '.join(unknown[:10])}"
            f"{' ...' if len(unknown) > 10 else ''}; the model's classes are its "
            "model_config.json 'classes' (evaluate on a split of those classes)"
        )
    index = {c: folders.index(c) for c in scan.classes}
    samples = [(path, index[scan.classes[target]]) for path, target in scan.samples]
    if not samples:
        raise UserError(f"{root} holds no readable images")
    pre = art.preprocess
    dataset = ImageListDataset(samples, eval_transform(pre, normalize=False), draft=pre.resize_size)
    loader = make_loader(
        dataset,
        ShardSampler(len(dataset)),
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
        pin_memory=device.type == "cuda",
    )
    try:
        result = engine.evaluate(
            network,
            loader,
            num_classes=len(art.labels),
            device=device,
            channels_last=bool(art.config.get("channels_last")),
            normalize=DeviceNormalize.of(pre),
            keep_outputs=True,
        )
    finally:
        shutdown_loaders()
    metrics = _write(out, split, art, scan, result)
    log.info("evaluation written to %s", out)
    return metrics


def _write(out: Path, split: str, art, scan: SplitScan, result: engine.EvalResult) -> dict:
    from imgclf import report

    labels = art.labels
    logits, targets = result.logits.numpy(), result.targets.numpy()
    outputs = scores.evaluation(logits, targets, labels, temperature=art.temperature)
    metrics = {
        f"{split}_loss": result.loss,
        f"{split}_acc": result.accuracy,
        f"{split}_top5": result.top5,
        f"{split}_images": result.images,
        "per_class_accuracy": dict(zip(labels, result.per_class_accuracy())),
        "confusion_matrix": result.confusion.tolist(),
        **scores.split_summary(split, outputs),
        "calibration": {"temperature": art.temperature},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / METRICS_FILE, metrics)
    write_json(
        out / EVALUATION_FILE,
        {
            "labels": labels,
            "reliability": {split: outputs["reliability"]},
            f"{split}_root": str(scan.root),
        },
    )
    files = [Path(path).relative_to(scan.root).as_posix() for path, _ in scan.samples]
    probs = scores.softmax(logits, art.temperature)
    atomic_write(
        out / scores.predictions_file(split),
        scores.predictions_csv(files, targets.tolist(), probs, labels),
    )
    report.write_evaluation_report(out, split, f"Evaluation on {scan.root}")
    return metrics
