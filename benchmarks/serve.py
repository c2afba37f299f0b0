"""Endpoint latency and throughput: a naive seed-style handler vs ours, both on MMS, same model.

Run: .venv/bin/python benchmarks/serve.py [--requests 48] [--workers 1]
Prints p50/p99 latency and requests/s at concurrency 1 and 16 for a ResNet-50 (random weights,
133 classes like dogImages) on 1600x1200 JPEGs made from scikit-learn's sample photographs, and
the ratios ours/naive. Both servers run the same `serve` entry; only the MMS handler differs.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from machine import describe
from PIL import Image

from imgclf import artifacts, models
from imgclf.serving.serve import free_port

HERE = Path(__file__).resolve().parent


def make_model(root: Path) -> Path:
    model_dir = root / "model"
    torch.manual_seed(0)
    net = models.build_model("resnet50", 133)
    pre = models.get_architecture("resnet50").preprocess(224)
    artifacts.save_artifact(
        model_dir,
        state_dict=net.state_dict(),
        labels=[f"breed {i}" for i in range(133)],
        config={
            "arch": "resnet50",
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


def start(base: Path, port: int, workers: int, handler: str | None) -> subprocess.Popen:
    env = {
        **os.environ,
        "SAGEMAKER_BASE_DIR": str(base),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "IMGCLF_BIND_HOST": "127.0.0.1",
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers),
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    if handler:
        env["IMGCLF_MMS_HANDLER"] = handler
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
        if b"endpoint ready" in (base / "serve.log").read_bytes():
            return proc
        time.sleep(0.5)
    raise SystemExit("server did not start")


def post(port: int, body: bytes) -> float:
    start_time = time.perf_counter()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=body,
        headers={"Content-Type": "image/jpeg"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - start_time


def load(port: int, images: list[bytes], concurrency: int, requests: int) -> dict:
    for body in images[:2]:  # warm-up
        post(port, body)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda i: post(port, images[i % len(images)]), range(requests)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
        "rps": requests / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    images = make_images()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model(root / "shared")
        for name, handler in (("naive", "naive_handler"), ("ours", None)):
            base = root / name
            base.mkdir()
            (base / "model").symlink_to(root / "shared" / "model")
            port = free_port()
            proc = start(base, port, args.workers, handler)
            try:
                results[name] = {
                    c: load(port, images, c, args.requests if c > 1 else max(8, args.requests // 3))
                    for c in (1, 16)
                }
            finally:
                proc.terminate()  # SIGTERM to serve alone, as SageMaker sends it: it drains
                proc.wait(timeout=90)
    print(
        f"machine: {describe()}, "
        f"{args.workers} MMS worker(s), ResNet-50 at 224 px, 1600x1200 JPEG q90 requests"
    )
    print(f"{'server':<7}{'conc':>5}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>9}")
    for name, by_conc in results.items():
        for conc, r in by_conc.items():
            print(f"{name:<7}{conc:>5}{r['p50']:>10.1f}{r['p99']:>10.1f}{r['rps']:>9.2f}")
    for conc in (1, 16):
        n, o = results["naive"][conc], results["ours"][conc]
        print(
            f"concurrency {conc}: ours/naive throughput {o['rps'] / n['rps']:.2f}x, "
            f"p50 latency {n['p50'] / o['p50']:.2f}x lower, p99 {n['p99'] / o['p99']:.2f}x lower"
        )


if __name__ == "__main__":
    main()
