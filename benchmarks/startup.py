"""Where a cold start of `serve` spends its seconds, for a ResNet-50 (133 classes, random
weights): from the process's start to a healthy /ping.

Run: .venv/bin/python benchmarks/startup.py [--arch resnet50] [--runs 3]
       [--before-src /work/main/src] [--no-graph]
Starts the `serve` entry (as the serving image's ENTRYPOINT and the local target do) on a free
port with one worker, polls /ping every 50 ms, and splits the time by the timestamps of its own
log: imports and settings (to the preflight's start), the preflight (the graph's checks, or a
load and one prediction), MMS's start (JVM up, model registered), the worker's start (Python,
MMS's worker, our imports: torch) and its model (the artifact's ONNX graph and its parity probe,
or weights, network and export), and the rest (serve's poll of the workers, /ping). The model
carries its ONNX graph (imgclf.graph, made once here as training makes it, timed). With
--before-src another checkout's src (e.g. main's) serves the same folder in turn with this one,
so a busy machine slows both alike; --no-graph adds this checkout on a copy without the graph
(the fallback: export in the worker). `docker run` adds the container's own start to these.
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

from imgclf import artifacts, graph, models
from imgclf.util import free_port

SRC = Path(__file__).resolve().parent.parent / "src"
SERVE = Path(sys.executable).parent / "serve"
# (stage, the log line that ends it): serve's own lines, and MMS's for the worker.
MARKS = (
    ("imports, settings, store copy", ("preflight of",)),  # main logs none: see cold_start
    ("preflight (graph check | load, predict)", ("loads and predicts", "preflight done")),
    ("MMS start (JVM, registration)", ("registered in multi-model-server",)),
    ("worker load", ("model loaded from",)),
    ("serve sees it, /ping 200", None),
)
WORKER_UP, WORKER_MODEL = "  worker start (Python, MMS, imports)", "  worker model (graph | export)"
_STAMP = re.compile(r"(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)[,.](\d{3})")
_WORKER = re.compile(r"worker up ([0-9.]+) s, model ([0-9.]+) s")


def make_model(path: Path, arch: str, classes: int, *, with_graph: bool = True) -> float:
    """The artifact at `path`; returns the seconds its ONNX graph took to make (0 without)."""
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
    if not with_graph:
        return 0.0
    began = time.perf_counter()
    why_not = graph.write_graph(path)
    if why_not is not None:
        raise RuntimeError(f"no graph: {why_not}")
    return time.perf_counter() - began


def stamp(line: str) -> float | None:
    m = _STAMP.search(line)
    if not m:
        return None
    return datetime.strptime(f"{m[1]} {m[2]}.{m[3]}", "%Y-%m-%d %H:%M:%S.%f").timestamp()


def first_at(lines: list[str], texts: tuple[str, ...]) -> float | None:
    for line in lines:
        if any(text in line for text in texts):
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
    worker = next((m for m in map(_WORKER.search, lines) if m), None)
    if worker:  # the worker's own split of its load (this checkout's handler logs it)
        out[WORKER_UP], out[WORKER_MODEL] = float(worker[1]), float(worker[2])
    out["total to a healthy /ping"] = healthy - began
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--classes", type=int, default=133)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before-src", type=Path, help="another checkout's src, run in turn")
    parser.add_argument("--no-graph", action="store_true", help="also ours without the graph")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgclf-startup-") as tmp:
        model, bare = Path(tmp) / "model", Path(tmp) / "bare"
        made_s = make_model(model, args.arch, args.classes)
        runs = {"ours": (SRC, model)}
        if args.before_src:
            runs = {"before": (args.before_src, model), **runs}
        if args.no_graph:
            make_model(bare, args.arch, args.classes, with_graph=False)
            runs["no graph"] = (SRC, bare)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        for _ in range(args.runs):
            for name, (src, folder) in runs.items():
                results[name].append(cold_start(folder, src, Path(tmp)))
    print(f"{args.arch}, {args.classes} classes, 1 worker, {args.runs} runs; {describe()}")
    print(f"the ONNX graph, made once with the artifact: {made_s:.1f} s")
    stages = [s for s, _ in MARKS]
    stages[4:4] = [WORKER_UP, WORKER_MODEL]
    stages.append("total to a healthy /ping")
    ratio = "before" in results
    print(
        f"{'median seconds':<40}"
        + "".join(f"{n:>10}" for n in runs)
        + (f"{'before/ours':>13}" if ratio else "")
    )
    for stage in stages:
        medians = {}
        for name in runs:
            values = [r[stage] for r in results[name] if stage in r]
            medians[name] = statistics.median(values) if values else None
        cells = "".join(f"{m:>10.1f}" if m is not None else f"{'-':>10}" for m in medians.values())
        if ratio and medians["before"] and medians["ours"]:
            cells += f"{medians['before'] / medians['ours']:>12.1f}x"
        print(f"{stage:<40}{cells}")
    print(
        "every run's total:",
        {n: [round(r["total to a healthy /ping"], 1) for r in v] for n, v in results.items()},
    )


if __name__ == "__main__":
    main()
