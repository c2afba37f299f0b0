"""Where a cold start of `serve` spends its seconds, for a ResNet-50 (133 classes, random
weights): from the process's start to a healthy /ping.

Run: .venv/bin/python benchmarks/startup.py [--arch resnet50] [--runs 3]
       [--before-src /work/main/src]
Starts the `serve` entry (as the serving image's ENTRYPOINT and the local target do) on a free
port with one worker, polls /ping every 50 ms, and splits the time by the timestamps of its own
log: imports and settings (to the preflight's start), the preflight (load, ONNX export when it
makes one, one prediction), MMS's start (JVM up, model registered), the worker's load (Python
and torch imports, weights, ONNX export with its parity probe) and the rest (serve's poll of the
workers, /ping). With --before-src another checkout's src (e.g. main's) runs in turn with this
one, so a busy machine slows both alike. `docker run` adds the container's own start to these.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import torch
from machine import describe

from imgclf import artifacts, models
from imgclf.util import free_port

SRC = Path(__file__).resolve().parent.parent / "src"
SERVE = Path(sys.executable).parent / "serve"
# (stage, the log line that ends it): serve's own lines, and MMS's for the worker.
MARKS = (
    ("imports, settings, store copy", "preflight of"),  # ours; main logs none: see _stages
    ("preflight (load, export, predict)", "loads and predicts"),
    ("MMS start (JVM, registration)", "registered in multi-model-server"),
    ("worker load (imports, weights, ONNX)", "model loaded from"),
    ("serve sees it, /ping 200", None),
)
_STAMP = re.compile(r"(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)[,.](\d{3})")


def make_model(path: Path, arch: str, classes: int) -> Path:
    torch.manual_seed(0)
    names = [f"{i:03d}.class{i}" for i in range(classes)]
    artifacts.save_artifact(
        path,
        state_dict=models.build_model(arch, classes).state_dict(),
        labels=[n.split(".", 1)[1] for n in names],
        config={
            "arch": arch,
            "classes": names,
            "preprocess": models.get_architecture(arch).preprocess(224).to_dict(),
        },
    )
    return path


def stamp(line: str) -> float | None:
    m = _STAMP.search(line)
    if not m:
        return None
    return datetime.strptime(f"{m[1]} {m[2]}.{m[3]}", "%Y-%m-%d %H:%M:%S.%f").timestamp()


def first_at(lines: list[str], text: str) -> float | None:
    for line in lines:
        if text in line:
            return stamp(line)
    return None


def cold_start(model: Path, src: Path, work: Path) -> dict[str, float]:
    """One start of `serve` from `src`: seconds per stage, and the total to /ping 200."""
    port = free_port()
    log_file = work / f"serve-{port}.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(src),
        "IMGCLF_MODEL_DIR": str(model),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "IMGCLF_BIND_HOST": "127.0.0.1",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
    }
    with open(log_file, "wb") as log:
        began = time.time()
        proc = subprocess.Popen(
            [str(SERVE)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited: {log_file.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        healthy = time.time()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    lines = log_file.read_text(errors="replace").splitlines()
    ends = [first_at(lines, text) if text else healthy for _, text in MARKS]
    out, last = {}, began
    for (stage, _), end in zip(MARKS, ends, strict=True):
        if end is None:  # a line this version does not log: its time goes to the next stage
            continue
        out[stage] = end - last
        last = end
    out["total to a healthy /ping"] = healthy - began
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--classes", type=int, default=133)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before-src", type=Path, help="another checkout's src, run in turn")
    args = parser.parse_args()
    sources = {"before": args.before_src, "ours": SRC} if args.before_src else {"ours": SRC}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
    with tempfile.TemporaryDirectory(prefix="imgclf-startup-") as tmp:
        model = make_model(Path(tmp) / "model", args.arch, args.classes)
        for _ in range(args.runs):
            for name, src in sources.items():
                results[name].append(cold_start(model, src, Path(tmp)))
    print(f"{args.arch}, {args.classes} classes, 1 worker, {args.runs} runs; {describe()}")
    stages = [s for s, _ in MARKS] + ["total to a healthy /ping"]
    print(f"{'median seconds':<40}" + "".join(f"{n:>10}" for n in sources))
    for stage in stages:
        cells = []
        for name in sources:
            values = [r[stage] for r in results[name] if stage in r]
            cells.append(f"{statistics.median(values):>10.1f}" if values else f"{'-':>10}")
        print(f"{stage:<40}" + "".join(cells))


if __name__ == "__main__":
    main()
