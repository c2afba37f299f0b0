"""Endpoint latency and throughput: a naive seed-style handler vs ours, both on MMS, same model.

Run: .venv/bin/python benchmarks/serve.py [--requests 48] [--warmup 32] [--workers 1]
       [--servers naive,ours]
Prints p50/p99 latency and requests/s at concurrency 1 and 16 (bursts of 16 simultaneous
requests) for a ResNet-50 (random weights, 133 classes like dogImages) on 1600x1200 JPEGs made
from scikit-learn's sample photographs, and the ratios ours/naive. Every server runs the same
`serve` entry; `naive` swaps in the seed-style MMS handler, `ours-torch` is ours with
IMGCLF_CPU_RUNTIME=torch (eager PyTorch), `ours` is the default (ONNX Runtime on CPU, MMS
batching), `ours-before` is ours imported from --before-src (another checkout's src: before and
after in one run). `naive` runs at MMS batch size 1, as the seed projects did. All servers run
side by side and take turns, one burst each, so a shared machine's changing load falls on each
alike; only one is busy at a time. The client is the same for all: a keep-alive connection per
client thread. The split below is only meaningful on a quiet machine (it is timed apart from
the servers, under whatever load there is then).

Then it splits a request's time at concurrency 1, for each of ours: reading (decode and
preprocessing), the model's forward pass and the answer's encoding as the worker timed them
(our handler logs them per batch as MMS metrics); decode vs preprocessing are apportioned by
timing them apart in this process on the same images, runtime and thread count (with the
servers stopped; also the fallback for a handler that logs no stages). The handler's whole time
is MMS's own PredictionTime metric, the worker round trip is MMS's "Backend response time", and
what is left of the client's latency is MMS's frontend and HTTP. The overhead is the client's
p50 latency less the model's p50 (the issue's goal: at most 2 ms).
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from machine import describe
from PIL import Image

from imgclf import artifacts, models
from imgclf.contract import CPU_RUNTIME_ENV, SERVE_BATCH_SIZE_ENV
from imgclf.serving import inference
from imgclf.util import free_port

HERE = Path(__file__).resolve().parent
# name: (MMS handler module or None for ours, CPU runtime (naive's only runs the entry's
# preflight), environment). Naive runs as the seed projects deployed it: MMS batch size 1.
SERVERS = {
    "naive": ("naive_handler", "torch", {SERVE_BATCH_SIZE_ENV: "1"}),
    "ours-torch": (None, "torch", {}),
    "ours": (None, "auto", {}),
    "ours-before": (None, "auto", {}),  # ours from --before-src (e.g. main's src): before/after
}
# What MMS logs per request: the worker's handler time, the frontend's worker round trip and
# its own total (whole milliseconds).
LOG_TIMES = {
    "handler": re.compile(rb"PredictionTime\.Milliseconds:([0-9.]+)"),
    # Our handler's own stages, per batch (handler_service._record_times).
    "read": re.compile(rb"ImgclfReadTime\.Milliseconds:([0-9.]+)"),
    "model": re.compile(rb"ImgclfModelTime\.Milliseconds:([0-9.]+)"),
    "encode": re.compile(rb"ImgclfEncodeTime\.Milliseconds:([0-9.]+)"),
    "worker round trip": re.compile(rb"Backend response time: ([0-9]+)"),
    "frontend total": re.compile(
        rb'ACCESS_LOG - \S+ "POST /(?:invocations|predictions/model)[^"]*" 200 ([0-9]+)'
    ),
}


def make_model(root: Path, arch: str = "resnet50") -> Path:
    model_dir = root / "model"
    torch.manual_seed(0)
    net = models.build_model(arch, 133)
    pre = models.get_architecture(arch).preprocess(224)
    artifacts.save_artifact(
        model_dir,
        state_dict=net.state_dict(),
        labels=[f"breed {i}" for i in range(133)],
        config={
            "arch": arch,
            "classes": [str(i) for i in range(133)],
            "preprocess": pre.to_dict(),
        },
    )
    return model_dir


def make_images() -> list[bytes]:
    from sklearn.datasets import load_sample_image

    out = []
    for name in ("china.jpg", "flower.jpg"):
        photo = Image.fromarray(load_sample_image(name)).resize((1600, 1200), Image.BICUBIC)
        for angle in (0, 90):
            buf = io.BytesIO()
            photo.rotate(angle, expand=False).save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def start(
    base: Path,
    port: int,
    workers: int,
    handler: str | None,
    cpu_runtime: str | None,
    extra: dict[str, str],
    src: str | None = None,
) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (src, str(HERE), os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        **extra,
        "SAGEMAKER_BASE_DIR": str(base),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "IMGCLF_BIND_HOST": "127.0.0.1",
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers),
        "PYTHONPATH": path,
    }
    if handler:
        env["IMGCLF_MMS_HANDLER"] = handler
    if cpu_runtime:
        env[CPU_RUNTIME_ENV] = cpu_runtime
    log = open(base / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server failed: see {base / 'serve.log'}")
        text = (base / "serve.log").read_bytes()
        if b"endpoint ready" in text:
            batching = re.search(rb"model registered in multi-model-server: ([^\n]*)", text)
            shown = batching.group(1).decode() if batching else "MMS start-up model, batch size 1"
            print(f"{base.name}: {shown}", flush=True)
            return proc
        time.sleep(0.5)
    raise SystemExit("server did not start")


_local = threading.local()


def post(port: int, body: bytes) -> float:
    """One request on this thread's keep-alive connection to `port` (the same client for every
    server: a connection per client thread, as a load balancer or SDK client keeps them)."""
    connections = _local.__dict__.setdefault("connections", {})
    start_time = time.perf_counter()
    for attempt in range(2):
        conn = connections.get(port)
        if conn is None:
            conn = connections[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            response.read()
            break
        except (ConnectionError, http.client.HTTPException):
            conn.close()
            del connections[port]
            if attempt:
                raise
    assert response.status == 200, response.status
    if response.getheader("Connection", "").lower() == "close":
        conn.close()
        del connections[port]
    return time.perf_counter() - start_time


def measure(
    ports: dict[str, int],
    images: list[bytes],
    concurrency: int,
    requests: int,
    logs: dict,
    warmup: int = 0,
) -> dict:
    """Every server in turn, a burst of `concurrency` requests each, until each has answered
    `requests`: load from other processes on a shared machine falls on all servers alike.
    `warmup` requests first, one at a time, to each server (MMS's JVM compiles its hot paths
    over the first few dozen requests: a serving endpoint is measured warm)."""
    for port in ports.values():
        for index in range(max(warmup, 2)):
            post(port, images[index % len(images)])
    time.sleep(1.0)  # MMS logs asynchronously: let the warm-up's lines land first
    offsets = {name: logs[name].stat().st_size for name in ports}
    latencies: dict[str, list[float]] = {name: [] for name in ports}
    busy = dict.fromkeys(ports, 0.0)
    with ThreadPoolExecutor(concurrency) as pool:
        for first in range(0, requests, concurrency):
            indices = range(first, min(requests, first + concurrency))
            for name, port in ports.items():
                started = time.perf_counter()
                latencies[name] += pool.map(
                    lambda i, port=port: post(port, images[i % len(images)]), indices
                )
                busy[name] += time.perf_counter() - started
    time.sleep(1.0)
    out = {}
    for name, values in latencies.items():
        values.sort()
        out[name] = {
            "p50": statistics.median(values) * 1000,
            "p99": values[min(len(values) - 1, int(0.99 * len(values)))] * 1000,
            "rps": len(values) / busy[name],
            "logged": logged_times(logs[name].read_bytes()[offsets[name] :]),
        }
    return out


def logged_times(text: bytes) -> dict[str, float]:
    """p50 of each per-request time MMS logged (ms); absent ones are left out."""
    out = {}
    for name, pattern in LOG_TIMES.items():
        values = [float(v) for v in pattern.findall(text)]
        if values:
            out[name] = statistics.median(values)
    return out


def stage_times(model_dir: Path, images: list[bytes], cpu_runtime: str, rounds: int) -> dict:
    """p50 ms of each stage of our handler, run here as a worker runs it (same threads)."""
    loaded = inference.model_fn(model_dir, device=torch.device("cpu"), cpu_runtime=cpu_runtime)
    threads = torch.get_num_threads()
    if loaded.forward.runtime == "onnxruntime":
        torch.set_num_threads(1)  # as the handler does beside ONNX Runtime
    options = inference.Options()
    stages: dict[str, list[float]] = {"decode": [], "preprocess": [], "model": [], "encode": []}
    with torch.inference_mode():
        for index in range(rounds * len(images)):
            body = images[index % len(images)]
            t0 = time.perf_counter()
            decoded = inference.input_fn(body, "image/jpeg", draft=loaded.preprocess.resize_size)
            t1 = time.perf_counter()
            batch = inference.prepare(decoded, loaded)
            t2 = time.perf_counter()
            logits = loaded.forward(batch)
            t3 = time.perf_counter()
            probs = inference.softmax(logits)
            inference.output_fn(probs, loaded.labels, accept=None, options=options, batch=False)
            t4 = time.perf_counter()
            if index >= len(images):  # the first round warms up
                for name, (a, b) in zip(stages, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                    stages[name].append((b - a) * 1000)
    torch.set_num_threads(threads)
    return {"runtime": loaded.forward.runtime} | {
        name: statistics.median(values) for name, values in stages.items()
    }


def print_split(name: str, latency: float, stages: dict, logged: dict) -> None:
    """The client's p50 latency at concurrency 1, split into where the time goes. The handler's
    stages come from the worker itself (its metrics in MMS's log) when it logs them; decode vs
    preprocessing, which run together per request in the worker, are apportioned by the
    timings taken in this process."""
    apart = stages["decode"] + stages["preprocess"]
    read = logged.get("read", apart)
    model = logged.get("model", stages["model"])
    encode = logged.get("encode", stages["encode"])
    inside = read + model + encode
    handler = logged.get("handler", inside)
    trip = logged.get("worker round trip", handler)
    frontend = logged.get("frontend total", trip)
    where = "in the worker" if "model" in logged else "timed in this process"
    share = stages["decode"] / apart if apart else 0.5
    rows = [
        (f"decode (JPEG, draft) ~{share:.0%} of reading", read * share),
        ("preprocess (resize, crop)", read * (1 - share)),
        (f"model ({stages['runtime']})", model),
        ("encode (softmax, top-k, JSON)", encode),
        ("rest of the handler (handler - stages above)", handler - inside),
        ("MMS worker hop (round trip - handler)", trip - handler),
        ("MMS frontend (its total - round trip)", frontend - trip),
        ("HTTP client, our front, loopback (client - MMS)", latency - frontend),
    ]
    print(f"\n{name}: where a request's p50 of {latency:.1f} ms goes (concurrency 1; {where})")
    for label, ms in rows:
        print(f"  {label:<48}{ms:>8.1f} ms")
    print(
        f"  overhead over the model's own time: {latency - model:.1f} ms "
        f"(decode + preprocess {read:.1f} ms, server {latency - inside:.1f} ms); goal <= 2 ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--servers",
        help="from " + ",".join(SERVERS) + " (default: all; ours-before only with --before-src)",
    )
    parser.add_argument(
        "--warmup", type=int, default=32, help="requests to each server before measuring"
    )
    parser.add_argument("--split-rounds", type=int, default=8, help="rounds of the stage timing")
    parser.add_argument(
        "--before-src", help="the src folder `ours-before` imports imgclf from (e.g. main's)"
    )
    args = parser.parse_args()
    if args.servers:
        names = [n for n in args.servers.split(",") if n]
    else:  # every server that can run with the arguments given
        names = [n for n in SERVERS if n != "ours-before" or args.before_src]
    unknown = set(names) - set(SERVERS)
    if unknown or "naive" not in names:
        raise SystemExit(f"--servers takes naive and some of {', '.join(SERVERS)}")
    if ("ours-before" in names) != bool(args.before_src):
        raise SystemExit("ours-before and --before-src go together")
    images = make_images()
    stages = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model(root / "shared")
        procs, ports, logs = [], {}, {}
        try:
            for name in names:
                handler, cpu_runtime, extra = SERVERS[name]
                base = root / name
                base.mkdir()
                (base / "model").symlink_to(model_dir)
                ports[name], logs[name] = free_port(), base / "serve.log"
                src = args.before_src if name == "ours-before" else None
                procs.append(
                    start(base, ports[name], args.workers, handler, cpu_runtime, extra, src)
                )
            by_conc = {
                c: measure(ports, images, c, args.requests, logs, args.warmup if c == 1 else 0)
                for c in (1, 16)
            }
        finally:
            for proc in procs:
                proc.terminate()  # SIGTERM to serve alone, as SageMaker sends it: it drains
            for proc in procs:
                proc.wait(timeout=90)
        results = {name: {c: by_conc[c][name] for c in by_conc} for name in names}
        # The stages, timed with the servers stopped, on a worker's share of the CPUs.
        torch.set_num_threads(inference.torch_threads(args.workers))
        for name in names:
            if name not in ("naive", "ours-before"):
                stages[name] = stage_times(model_dir, images, SERVERS[name][1], args.split_rounds)
    print(
        f"machine: {describe()}, "
        f"{args.workers} MMS worker(s), ResNet-50 at 224 px, 1600x1200 JPEG q90 requests"
    )
    print(f"{'server':<11}{'conc':>5}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>9}")
    for name, by_conc in results.items():
        for conc, r in by_conc.items():
            print(f"{name:<11}{conc:>5}{r['p50']:>10.1f}{r['p99']:>10.1f}{r['rps']:>9.2f}")
    for name in results:
        if name == "naive":
            continue
        for conc in (1, 16):
            n, o = results["naive"][conc], results[name][conc]
            print(
                f"{name} concurrency {conc}: {name}/naive throughput "
                f"{o['rps'] / n['rps']:.2f}x, p50 latency {n['p50'] / o['p50']:.2f}x lower, "
                f"p99 {n['p99'] / o['p99']:.2f}x lower"
            )
    for name, stage in stages.items():
        print_split(name, results[name][1]["p50"], stage, results[name][1]["logged"])


if __name__ == "__main__":
    main()
