"""report.html: one self-contained page (figures inline, opens offline) about a training job.

Built from what the job leaves in its directory: output/data/history.json (per epoch),
model/metrics.json (test evaluation), output/data/evaluation.json (labels, reliability bins),
output/data/test_predictions.csv, output/data/rules.json,
output/data/debug.json, the smdebug tensors and output/data/profiler/. Sections whose inputs are
missing say so instead of failing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

from imgclf import scores
from imgclf.contract import EVALUATION_FILE, METRICS_FILE, REPORT_FILE
from imgclf.job_outputs import JobOutputs, read_json

MAX_HEATMAP_CLASSES = 40
MAX_SCORE_ROWS = 30  # classes listed in the precision / recall / F1 table, worst F1 first
GALLERY_SIZE = 12  # the most confident mistakes shown
THUMBNAIL_PX = 96


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def step_losses(tensor_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{'train'|'valid': (global steps, loss values)} from the smdebug tensor store."""
    if not tensor_dir.is_dir():
        return {}
    try:
        from smdebug import modes
        from smdebug.trials import create_trial
    except Exception:  # noqa: BLE001 - no smdebug: the epoch curves still show
        return {}
    logging.getLogger("smdebug").setLevel(logging.ERROR)
    trial = create_trial(str(tensor_dir))
    names = trial.tensor_names(collection="losses")
    if not names:
        return {}
    tensor = trial.tensor(names[0])
    out = {}
    for key, mode in (("train", modes.TRAIN), ("valid", modes.EVAL)):
        steps = tensor.steps(mode=mode)
        out[key] = (
            [trial.global_step(mode, s) for s in steps],
            [float(tensor.value(s, mode=mode)) for s in steps],
        )
    return out


# ---------------------------------------------------------------- figures


def fig_curves(history: list[dict], losses: dict) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    epochs = [h["epoch"] for h in history]
    ax = axes[0]
    if losses.get("train") and losses["train"][0]:
        ax.plot(*losses["train"], lw=0.8, alpha=0.6, label="train loss (per step, smdebug)")
        if losses.get("valid") and losses["valid"][0]:
            ax.plot(*losses["valid"], ".", ms=3, alpha=0.6, label="valid loss (per step)")
        ax.set_xlabel("global step")
    else:
        ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
        ax.plot(epochs, [h["valid_loss"] for h in history], "o-", label="valid loss")
        ax.set_xlabel("epoch")
    ax.set_title("loss")
    if all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
        ax.set_yscale("log")  # one bad early validation pass otherwise flattens the rest
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["valid_acc"] for h in history], "o-", label="valid")
    ax.set_title("accuracy per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax = axes[2]
    ax.plot(epochs, [h["lr"] for h in history], "o-", color="tab:purple")
    ax.set_title("learning rate (end of epoch)")
    ax.set_xlabel("epoch")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _png(fig)


def fig_per_class(per_class: dict[str, float]) -> str:
    import matplotlib.pyplot as plt

    items = sorted(per_class.items(), key=lambda kv: kv[1])[:30]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(items))))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="tab:orange")
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy")
    ax.set_title(f"per-class accuracy, worst {len(items)} first")
    return _png(fig)


def confused_pairs(confusion: list[list[int]], labels: list[str], top: int = 10) -> list[list]:
    pairs = []
    for i, row in enumerate(confusion):
        total = sum(row) or 1
        for j, count in enumerate(row):
            if i != j and count:
                pairs.append([labels[i], labels[j], count, f"{count / total:.0%}"])
    return sorted(pairs, key=lambda p: -p[2])[:top]


def fig_confusion(confusion: list[list[int]], labels: list[str]) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.asarray(confusion, dtype=float)
    index = list(range(len(labels)))
    if len(labels) > MAX_HEATMAP_CLASSES:  # the classes with the most mistakes
        errors = matrix.sum(axis=1) - np.diag(matrix) + matrix.sum(axis=0) - np.diag(matrix)
        index = sorted(np.argsort(-errors)[:MAX_HEATMAP_CLASSES].tolist())
        matrix = matrix[np.ix_(index, index)]
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4, 0.3 * len(index))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    names = [labels[i] for i in index]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def fig_reliability(reliability: dict[str, list[dict]], title: str) -> str:
    """Accuracy against confidence per bin, before and after the temperature: bars on the
    diagonal are what calibrated probabilities look like."""
    import matplotlib.pyplot as plt

    panels = [(k, v) for k, v in (reliability or {}).items() if v]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (name, bins) in zip(axes[0], panels):
        width = bins[0]["high"] - bins[0]["low"]
        filled = [b for b in bins if b["count"]]
        ax.bar(
            [b["low"] for b in filled],
            [b["accuracy"] for b in filled],
            width=width,
            align="edge",
            edgecolor="k",
            color="tab:blue",
            label="accuracy",
        )
        ax.bar(
            [b["low"] for b in filled],
            [abs(b["confidence"] - b["accuracy"]) for b in filled],
            bottom=[min(b["confidence"], b["accuracy"]) for b in filled],
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.5,
            label="gap to the mean confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}, {name}: ECE {scores.expected_calibration_error(bins):.3f}")
        ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def fig_mistakes(mistakes: list[dict], root: Path | None) -> str | None:
    """Thumbnails of the most confident mistakes, each titled true -> predicted (p); None when
    none of their files can be read (the report was written where the data is not)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    images = []
    for row in mistakes:
        try:
            with Image.open(root / row["file"]) as image:
                image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))
                thumb = image.convert("RGB")
                thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                images.append((row, thumb))
        except (OSError, TypeError, ValueError):
            continue
    if not images:
        return None
    cols = min(6, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (row, thumb) in zip(axes.flat, images):
        ax.imshow(thumb)
        ax.set_title(
            f"{row['true_label']}\n→ {row['predicted_label']} ({row['probability']:.2f})",
            fontsize=8,
        )
    return _png(fig)


def fig_time_split(history: list[dict]) -> str:
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    wait = [h.get("data_wait_s", 0.0) for h in history]
    compute = [max(h["epoch_time"] - w, 0.0) for h, w in zip(history, wait)]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(epochs, compute, label="compute", color="tab:blue")
    ax.bar(epochs, wait, bottom=compute, label="waiting for data", color="tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds")
    ax.set_title("training time per epoch")
    ax.legend()
    return _png(fig)


def fig_system(samples: list[dict]) -> str:
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.plot(t, [s["cpu_percent"] for s in samples], label="CPU %")
    ax.plot(t, [s["memory_percent"] for s in samples], label="memory %")
    if any(s.get("gpu_percent") is not None for s in samples):
        ax.plot(t, [s.get("gpu_percent") or 0 for s in samples], label="GPU %")
    ax.set_ylim(0, 105)
    ax.set_xlabel("seconds since start")
    ax.set_title("utilisation (every 0.5 s)")
    ax.legend()
    return _png(fig)


# ---------------------------------------------------------------- page


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:0}section{margin:2em 0}img{max-width:100%}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}.fired td:nth-child(2){font-weight:bold}.note{color:#666}
.bad{color:#b00;font-weight:bold}.ok{color:#070}
"""


def build_report(job_dir: Path) -> str:
    outputs = JobOutputs.of(job_dir)
    data_dir = outputs.layout.output_data_dir
    history, metrics, evaluation = outputs.history(), outputs.metrics(), outputs.evaluation()
    parts = [
        f"<h1>Training report: {html.escape(job_dir.name)}</h1>",
        _summary_section(metrics, outputs.run_config(), history),
        *_curves_section(job_dir, history, outputs.debug_status()),
        *evaluation_sections(metrics, evaluation, data_dir, "test"),
        _rules_section(outputs.rules()),
        *_time_section(history, evaluation.get("device", "cpu")),
        *_profile_sections(data_dir),
    ]
    return page(job_dir.name, parts)


def page(title: str, parts: list[str]) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>imgclf report {html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>"
    )


def evaluation_sections(metrics: dict, evaluation: dict, data_dir: Path, split: str) -> list[str]:
    """What a model's answers on one split are worth: per-class accuracy, precision, recall
    and F1, the confusions, the calibration and the most confident mistakes. The training
    report and `launch.py evaluate`'s report share them."""
    labels = evaluation.get("labels") or list((metrics.get("per_class_accuracy") or {}).keys())
    root = evaluation.get(f"{split}_root")
    return [
        *_class_sections(metrics, labels, split),
        *_scores_section(metrics, split),
        *_calibration_section(metrics, evaluation, split),
        *_mistakes_section(
            scores.read_predictions(data_dir / scores.predictions_file(split)),
            Path(root) if root else None,
            split,
        ),
    ]


def _scores_section(metrics: dict, split: str) -> list[str]:
    per_class = metrics.get("per_class")
    if not per_class:
        return []
    worst = sorted(per_class.items(), key=lambda kv: (kv[1]["f1"], kv[0]))[:MAX_SCORE_ROWS]

    def row(name: str, s: dict) -> list:
        return [name, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}", s["support"]]

    rows = [row(name, s) for name, s in worst]
    for key, name in (("macro_avg", "macro average"), ("weighted_avg", "weighted average")):
        if key in metrics:
            rows.append(row(name, metrics[key]))
    shown = "" if len(per_class) <= MAX_SCORE_ROWS else f" (the worst {MAX_SCORE_ROWS})"
    return [
        f"<section id='scores'><h2>Precision, recall and F1 per class ({split}), worst F1 "
        f"first{shown}</h2>"
        + _table(["class", "precision", "recall", "F1", "images"], rows)
        + "<p class='note'>Precision: of the images given this label, the share that are this "
        "class. Recall: of this class's images, the share given its label. Macro: the mean over "
        "classes; weighted: weighted by their images.</p></section>"
    ]


def _calibration_section(metrics: dict, evaluation: dict, split: str) -> list[str]:
    calibration = metrics.get("calibration") or {}
    reliability = evaluation.get("reliability") or {}
    if not calibration and not reliability:
        return []
    rows = []
    if "temperature" in calibration:
        rows.append(
            ["temperature (fitted on the validation split)", f"{calibration['temperature']:.3f}"]
        )
    for name, key in (
        ("validation ECE, before", "valid_ece_uncalibrated"),
        ("validation ECE, after", "valid_ece"),
        (f"{split} ECE, before", f"{split}_ece_uncalibrated"),
        (f"{split} ECE, after", f"{split}_ece"),
    ):
        value = calibration.get(key, metrics.get(key))
        if isinstance(value, float):
            rows.append([name, f"{value:.4f}"])
    figures = "".join(
        _img(fig_reliability(reliability[name], title), f"reliability diagram, {title}")
        for name, title in (("valid", "validation"), (split, split))
        if reliability.get(name)
    )
    return [
        "<section id='calibration'><h2>Calibration</h2>"
        "<p class='note'>The endpoint divides the logits by the temperature before the softmax, "
        "so that of the answers given with probability p, a share p is right. ECE: the mean gap "
        "between confidence and accuracy (15 bins).</p>"
        + _table(["", ""], rows)
        + figures
        + "</section>"
    ]


def _mistakes_section(predictions: list[dict], root: Path | None, split: str) -> list[str]:
    if not predictions:
        return []
    mistakes = sorted(
        (p for p in predictions if not p["correct"]), key=lambda p: -p["probability"]
    )[:GALLERY_SIZE]
    title = f"<h2>The most confident mistakes ({split})</h2>"
    if not mistakes:
        return [f"<section id='mistakes'>{title}<p>No mistakes.</p></section>"]
    table = _table(
        ["file", "true", "predicted", "probability"],
        [
            [m["file"], m["true_label"], m["predicted_label"], f"{m['probability']:.3f}"]
            for m in mistakes
        ],
    )
    figure = fig_mistakes(mistakes, root) if root is not None else None
    note = "" if figure else "<p class='note'>The images are not readable here.</p>"
    return [
        f"<section id='mistakes'>{title}"
        + (_img(figure, "most confident mistakes") if figure else note)
        + table
        + "</section>"
    ]


def _summary_section(metrics: dict, config: dict, history: list) -> str:
    summary = [
        ["architecture", config.get("arch", "?")],
        ["epochs run", metrics.get("epochs_run", len(history))],
        ["best epoch", metrics.get("best_epoch", "?")],
    ]
    for key in ("valid_loss", "valid_acc", "test_loss", "test_acc", "test_top5"):
        if isinstance(metrics.get(key), float):
            summary.append([key, f"{metrics[key]:.4f}"])
    return f"<section id='summary'><h2>Summary</h2>{_table(['', ''], summary)}</section>"


def _curves_section(job_dir: Path, history: list, debug: dict | None) -> list[str]:
    from imgclf.debugging.hook import find_tensor_dir

    if not history:
        return []
    tensor_dir = find_tensor_dir(job_dir)
    losses = step_losses(tensor_dir) if tensor_dir is not None else {}
    note = ""
    if debug is None:
        note = "No smdebug tensors: the job ran without --debug; curves are per epoch."
    elif not debug.get("tensors"):
        note = f"The smdebug tensors are missing: {debug.get('reason', 'unknown reason')}."
    return [
        "<section id='curves'><h2>Loss, accuracy and learning rate</h2>"
        f"<p class='note'>{html.escape(note)}</p>"
        f"{_img(fig_curves(history, losses), 'loss and accuracy curves')}</section>"
    ]


def _class_sections(metrics: dict, labels: list[str], split: str = "test") -> list[str]:
    parts = []
    per_class = metrics.get("per_class_accuracy")
    if per_class:
        worst = sorted(per_class.items(), key=lambda kv: kv[1])[:5]
        parts.append(
            f"<section id='classes'><h2>Per-class accuracy ({split})</h2>"
            + _table(["class", "accuracy"], [[k, f"{v:.3f}"] for k, v in worst])
            + _img(fig_per_class(per_class), "per-class accuracy")
            + "</section>"
        )
    confusion = metrics.get("confusion_matrix")
    if confusion and labels:
        pairs = confused_pairs(confusion, labels)
        parts.append(
            f"<section id='confusion'><h2>Most confused classes ({split})</h2>"
            + (
                _table(["true", "predicted as", "images", "of the class"], pairs)
                if pairs
                else "<p>No mistakes on the test split.</p>"
            )
            + _img(fig_confusion(confusion, labels), "confusion matrix")
            + "</section>"
        )
    return parts


def _rules_section(verdicts: list | None) -> str:
    if verdicts is None:
        return (
            "<section id='rules'><h2>Debugging rules</h2><p class='note'>Not run: train with "
            "--debug (or debug=true) to record tensors and run the rules.</p></section>"
        )
    rows = [
        [v["rule"], v["status"], "" if v["step"] is None else v["step"], v["message"]]
        for v in verdicts
    ]
    advice = "".join(
        f"<li><b>{html.escape(v['rule'])}</b>: {html.escape(v['advice'])}</li>"
        for v in verdicts
        if v["status"] == "fired"
    )
    return (
        "<section id='rules'><h2>Debugging rules</h2>"
        + _table(["rule", "verdict", "step", "detail"], rows)
        + (f"<ul>{advice}</ul>" if advice else "<p class='ok'>No rule fired.</p>")
        + "</section>"
    )


def _time_section(history: list, device: str) -> list[str]:
    from imgclf.debugging.profiling import bottleneck_sentence

    if not history:
        return []
    wait = sum(h.get("data_wait_s", 0.0) for h in history)
    total = sum(h["epoch_time"] for h in history)
    sentence = bottleneck_sentence(wait, max(total - wait, 0.0), device)
    return [
        "<section id='time'><h2>Where the time went</h2>"
        f"<p>{html.escape(sentence[0].upper() + sentence[1:])}.</p>"
        f"{_img(fig_time_split(history), 'data wait vs compute')}</section>"
    ]


def _profile_sections(data_dir: Path) -> list[str]:
    from imgclf.debugging.profiling import PROFILER_DIR

    profiler_dir = data_dir / PROFILER_DIR
    parts, samples = [], []
    if (profiler_dir / "system.jsonl").exists():
        samples = [
            json.loads(x) for x in (profiler_dir / "system.jsonl").read_text().split("\n") if x
        ]
    if samples:
        parts.append(
            "<section id='system'><h2>Utilisation</h2>"
            f"{_img(fig_system(samples), 'utilisation timeline')}</section>"
        )
    ops = read_json(profiler_dir / "top_ops.json")
    if ops:
        rows = [
            [o["name"], o["calls"], f"{o['self_cpu_ms']:.1f}", f"{o['self_device_ms']:.1f}"]
            for o in ops[:15]
        ]
        parts.append(
            "<section id='operators'><h2>Top operators (torch.profiler window)</h2>"
            + _table(["operator", "calls", "self CPU ms", "self device ms"], rows)
            + f"<p class='note'>Trace: {html.escape(str(profiler_dir / 'trace.json'))} (open it "
            "in Perfetto or chrome://tracing).</p></section>"
        )
    elif not samples:
        parts.append(
            "<section id='profile'><h2>Profile</h2><p class='note'>Not profiled: train with "
            "--profile (or profile=true).</p></section>"
        )
    return parts


def write_report(job_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    out = out or JobOutputs.of(job_dir).layout.report_file
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(job_dir))
    return out


def write_evaluation_report(out_dir: Path, split: str, title: str) -> Path:
    """`launch.py evaluate`'s report.html, from the metrics.json, evaluation.json and
    <split>_predictions.csv it wrote to `out_dir`: its numbers, then the training report's
    evaluation sections."""
    import matplotlib

    matplotlib.use("Agg")
    metrics = read_json(out_dir / METRICS_FILE, {})
    rows = [
        [key, f"{metrics[key]:.4f}"]
        for key in (f"{split}_loss", f"{split}_acc", f"{split}_top5", f"{split}_ece")
        if isinstance(metrics.get(key), float)
    ]
    rows.append([f"{split} images", metrics.get(f"{split}_images", "?")])
    text = page(
        title,
        [
            f"<h1>{html.escape(title)}</h1>",
            f"<section id='summary'><h2>Summary</h2>{_table(['', ''], rows)}</section>",
            *evaluation_sections(metrics, read_json(out_dir / EVALUATION_FILE, {}), out_dir, split),
        ],
    )
    out = out_dir / REPORT_FILE
    out.write_text(text)
    return out


def write_report_or_warn(job_dir: Path, warn: Callable[[str], object]) -> Path | None:
    """After a job or a study, where the model and the results are already saved: a failing
    report is `warn`ed about (one line) instead of failing what ran."""
    try:
        return write_report(job_dir)
    except Exception as exc:  # noqa: BLE001 - a report bug must not fail a finished job
        warn(f"could not write the report of {job_dir}: {type(exc).__name__}: {exc}")
        return None
