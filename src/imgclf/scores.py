"""What a model's answers are worth, from its logits and the true labels: per-class precision,
recall, F1 and support, their macro and weighted averages, the expected calibration error
(ECE) and its reliability bins, a temperature fitted to the validation split (temperature
scaling: one scalar that divides the logits), and per-class confidence thresholds (best F1 on
the validation split, as Rekognition's "assumed threshold"). Pure NumPy functions (no torch):
training, `launch.py evaluate` and the report share them."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ECE_BINS = 15  # the usual choice (Guo et al., "On Calibration of Modern Neural Networks")
TEMPERATURE_RANGE = (0.05, 20.0)
PREDICTIONS_COLUMNS = ("file", "true_label", "predicted_label", "probability", "correct")


def predictions_file(split: str) -> str:
    """output/data/<split>_predictions.csv: one row per image of the split."""
    return f"{split}_predictions.csv"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(targets: Sequence[int], predicted: Sequence[int], n: int) -> np.ndarray:
    """[true, predicted] counts."""
    flat = np.asarray(targets, dtype=np.int64) * n + np.asarray(predicted, dtype=np.int64)
    return np.bincount(flat, minlength=n * n).reshape(n, n)


def _prf(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray):
    """Precision, recall and F1 (0 where undefined, as scikit-learn's zero_division=0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        total = precision + recall
        f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
    return precision, recall, f1


def class_scores(confusion, labels: Sequence[str]) -> dict:
    """{"per_class": {label: {precision, recall, f1, support}}, "macro_avg": {...},
    "weighted_avg": {...}} from a [true, predicted] confusion matrix. Macro: the plain mean
    over classes; weighted: weighted by support (scikit-learn's classification_report)."""
    matrix = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(matrix)
    support = matrix.sum(axis=1)
    precision, recall, f1 = _prf(tp, matrix.sum(axis=0), support)
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    weights = support / max(support.sum(), 1)

    def average(w) -> dict:
        return {
            "precision": float((precision * w).sum()),
            "recall": float((recall * w).sum()),
            "f1": float((f1 * w).sum()),
            "support": int(support.sum()),
        }

    return {
        "per_class": per_class,
        "macro_avg": average(np.full(len(labels), 1 / max(len(labels), 1))),
        "weighted_avg": average(weights),
    }


def reliability(probs: np.ndarray, targets: Sequence[int], bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins of the top probability: each bin's range, image count, mean
    confidence and accuracy (the reliability diagram's bars)."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(targets)
    # bin i holds (i/bins, (i+1)/bins]; a confidence of exactly 0 (impossible after softmax)
    # would land in bin 0
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for i in range(bins):
        mask = index == i
        count = int(mask.sum())
        out.append(
            {
                "low": i / bins,
                "high": (i + 1) / bins,
                "count": count,
                "confidence": float(confidence[mask].mean()) if count else None,
                "accuracy": float(correct[mask].mean()) if count else None,
            }
        )
    return out


def expected_calibration_error(bins: list[dict]) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the bins."""
    total = sum(b["count"] for b in bins)
    if not total:
        return 0.0
    return float(
        sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in bins if b["count"]) / total
    )


def ece(probs: np.ndarray, targets: Sequence[int], bins: int = ECE_BINS) -> float:
    return expected_calibration_error(reliability(probs, targets, bins))


def nll(logits: np.ndarray, targets: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the targets under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(z)), np.asarray(targets)].mean())


def fit_temperature(logits: np.ndarray, targets: Sequence[int]) -> float:
    """The temperature T in TEMPERATURE_RANGE minimising the validation NLL of
    softmax(logits / T): golden-section search over log T (the NLL is unimodal in it).
    1.0 when there is nothing to fit on."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0 or logits.shape[1] < 2:
        return 1.0
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(logits, targets, math.exp(a)), nll(logits, targets, math.exp(b))
    for _ in range(60):  # the bracket shrinks to ~1e-12 of its width
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(logits, targets, math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(logits, targets, math.exp(b))
    best = math.exp((low + high) / 2)
    # never worse than leaving the model alone
    return best if nll(logits, targets, best) <= nll(logits, targets, 1.0) else 1.0


def best_f1_thresholds(probs: np.ndarray, targets: Sequence[int]) -> list[float]:
    """Per class c, the confidence threshold t that maximises c's F1 when an image is labelled c
    only if c is its best class and its probability is at least t (the lowest such t on a tie).
    A class never predicted gets 0.0 (no evidence to raise it)."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    best = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    out = []
    for c in range(probs.shape[1]):
        support = int((targets == c).sum())
        mine = best == c
        if not mine.any() or support == 0:
            out.append(0.0)
            continue
        order = np.argsort(-confidence[mine], kind="stable")
        conf = confidence[mine][order]
        hits = (targets[mine][order] == c).astype(np.float64)
        tp = np.cumsum(hits)  # keeping the k most confident answers
        kept = np.arange(1, len(conf) + 1)
        f1 = 2 * tp / (kept + support)
        # only cut between distinct confidences: the last of each run of equal values
        last = np.r_[conf[1:] != conf[:-1], True]
        f1 = np.where(last, f1, -1.0)
        k = int(np.flatnonzero(f1 >= f1.max() - 1e-12)[-1])  # the lowest t with the best F1
        out.append(float(conf[k]))
    return out


def predictions_csv(
    files: Sequence[str], targets: Sequence[int], probs: np.ndarray, labels: Sequence[str]
) -> str:
    """One row per image: file, true label, predicted label, its probability, correct."""
    probs = np.asarray(probs, dtype=np.float64)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PREDICTIONS_COLUMNS)
    for name, target, row in zip(files, targets, probs):
        index = int(row.argmax())
        writer.writerow(
            [name, labels[target], labels[index], f"{row[index]:.6f}", int(index == target)]
        )
    return buf.getvalue()


def read_predictions(path: Path) -> list[dict]:
    """The rows of a predictions CSV (probability as float, correct as bool); [] if absent."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            rows.append(
                {
                    **row,
                    "probability": float(row["probability"]),
                    "correct": row["correct"] == "1",
                }
            )
        except (KeyError, TypeError, ValueError):
            continue
    return rows


def evaluation(
    logits: np.ndarray,
    targets: Sequence[int],
    labels: Sequence[str],
    *,
    temperature: float = 1.0,
) -> dict:
    """Everything metrics.json says about one split's answers: the class scores, and the ECE
    before and after the temperature, with their reliability bins."""
    logits = np.asarray(logits, dtype=np.float64)
    raw, calibrated = softmax(logits), softmax(logits, temperature)
    confusion = confusion_matrix(targets, logits.argmax(axis=1), len(labels))
    before, after = reliability(raw, targets), reliability(calibrated, targets)
    return {
        **class_scores(confusion, labels),
        "ece": expected_calibration_error(after),
        "ece_uncalibrated": expected_calibration_error(before),
        "reliability": {"uncalibrated": before, "calibrated": after},
    }


def split_summary(split: str, result: dict) -> dict:
    """What metrics.json keeps of `evaluation(...)` for one split (the reliability bins go to
    output/data/evaluation.json)."""
    return {
        "per_class": result["per_class"],
        "macro_avg": result["macro_avg"],
        "weighted_avg": result["weighted_avg"],
        f"{split}_ece": result["ece"],
        f"{split}_ece_uncalibrated": result["ece_uncalibrated"],
    }


@dataclass(frozen=True)
class Calibration:
    """What the validation split decides about the answers: the temperature that divides the
    logits, and each class's confidence threshold (best F1, on the calibrated probabilities),
    in label order."""

    temperature: float = 1.0
    thresholds: list[float] = field(default_factory=list)
    valid_ece: float | None = None
    valid_ece_uncalibrated: float | None = None
    reliability: dict = field(default_factory=dict)

    def model_config(self) -> dict:
        """The part of model_config.json the endpoint applies."""
        out: dict = {"temperature": self.temperature}
        if self.thresholds:
            out["thresholds"] = [round(t, 6) for t in self.thresholds]
        return out

    def summary(self, labels: Sequence[str]) -> dict:
        return {
            "temperature": self.temperature,
            "method": "temperature scaling, fitted on the validation split",
            "valid_ece_uncalibrated": self.valid_ece_uncalibrated,
            "valid_ece": self.valid_ece,
            "thresholds": dict(zip(labels, self.thresholds)),
            "thresholds_rule": "best F1 on the validation split (calibrated probabilities)",
        }


def calibrate(logits: np.ndarray, targets: Sequence[int], labels: Sequence[str]) -> Calibration:
    """Fit the temperature, then the thresholds, on the validation split's logits."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0:
        return Calibration(thresholds=[0.0] * len(labels))
    temperature = fit_temperature(logits, targets)
    calibrated = softmax(logits, temperature)
    before, after = reliability(softmax(logits), targets), reliability(calibrated, targets)
    return Calibration(
        temperature=temperature,
        thresholds=best_f1_thresholds(calibrated, targets),
        valid_ece=expected_calibration_error(after),
        valid_ece_uncalibrated=expected_calibration_error(before),
        reliability={"uncalibrated": before, "calibrated": after},
    )
