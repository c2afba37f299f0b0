"""What a training job left in its directory, read without torch: the launcher's report,
debug, tuner and targets read a job's results here, at the paths `contract.Layout` names (the
training program writes them there). A file that is missing or cannot be read reads as its
empty default, so a reader shows what there is instead of failing on what is not."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.contract import Layout


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when the file is missing, unreadable, not JSON, or not
    of `default`'s type (a list where an object is expected)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return default
    if default is not None and not isinstance(value, type(default)):
        return default
    return value


@dataclass(frozen=True)
class JobOutputs:
    """One job directory's results (a local job dir, or a SageMaker job's downloaded outputs
    laid out the same way)."""

    layout: Layout

    @classmethod
    def of(cls, job_dir: Path | str) -> JobOutputs:
        return cls(Layout(Path(job_dir)))

    def metrics(self) -> dict:
        """model/metrics.json: the job's summary (test accuracy, loss, calibration...)."""
        return read_json(self.layout.metrics_file, {})

    def history(self) -> list[dict]:
        """output/data/history.json: one row per epoch."""
        return read_json(self.layout.history_file, [])

    def run_config(self) -> dict:
        """output/data/config.json: the hyperparameters the job ran with, resolved."""
        return read_json(self.layout.run_config_file, {})

    def evaluation(self) -> dict:
        """output/data/evaluation.json: labels, per-class figures, train counts, reliability."""
        return read_json(self.layout.evaluation_file, {})

    def debug_status(self) -> dict | None:
        """output/data/debug.json: whether smdebug tensors were recorded (None: no record)."""
        status = read_json(self.layout.debug_status_file)
        return status if isinstance(status, dict) else None

    def rules(self) -> list | None:
        """output/data/rules.json: the rules' verdicts (None: the rules did not run)."""
        verdicts = read_json(self.layout.rules_file)
        return verdicts if isinstance(verdicts, list) else None

    def report(self) -> Path | None:
        """output/data/report.html when it was written."""
        return self.layout.report_file if self.layout.report_file.is_file() else None

    def rules_context(self) -> dict:
        """What the debugging rules know of the job besides its tensors (the training program
        and `launch.py debug` both pass this)."""
        config, evaluation = self.run_config(), self.evaluation()
        return {
            # ImageNet weights (or a trained model's: --init-from) are not an initialisation to
            # judge; a weights_path file is.
            "pretrained": bool(config.get("pretrained", False) and not config.get("weights_path"))
            or "init_from" in self.metrics(),
            "train_counts": evaluation.get("train_counts"),
            "labels": evaluation.get("labels"),
            "per_class_accuracy": evaluation.get("per_class_accuracy"),
        }
