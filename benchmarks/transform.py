"""Batch transform vs the naive client, and vs the endpoint's own peak, in one run.

Run: .venv/bin/python benchmarks/transform.py [--images 500] [--workers N]

The same model (a ResNet-50 with random weights and 133 classes, like dogImages, as
benchmarks/serve.py uses; --arch for another) and the same real-size JPEGs (1600x1200 crops
and turns of scikit-learn's sample photographs, quality 90), three ways:
- naive: the seed notebook's client, one `invoke_endpoint` after another (boto3's
  sagemaker-runtime client, as the SageMaker SDK's Predictor calls it) against an endpoint
  deployed with `launch.py deploy`, each image read from its file;
- peak: the same endpoint's throughput at concurrency 16 (benchmarks/serve.py's client: a
  keep-alive connection per client thread, bodies already in memory), over the same images;
- transform: `launch.py transform` of the folder (its own server in batch mode, files read and
  every `.out` and predictions.csv written), its sending rate as it prints it, and its whole
  wall time with the server's start and stop.
Prints images/s of each, transform/naive and transform/peak, and the machine.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import describe
from PIL import Image
from serve import make_model, post

from imgclf.util import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(ROOT / "launch.py")]


def make_images(folder: Path, count: int) -> list[Path]:
    """`count` different 1600x1200 JPEGs: crops of the sample photos at several offsets and
    scales, some turned, in 8 folders."""
    from sklearn.datasets import load_sample_image

    photos = [Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")]
    paths = []
    for i in range(count):
        photo = photos[i % 2]
        w, h = photo.size
        scale = 0.6 + 0.4 * ((i * 7) % 11) / 10
        cw, ch = int(w * scale), int(h * scale)
        left, top = (i * 13) % (w - cw + 1), (i * 5) % (h - ch + 1)
        image = photo.crop((left, top, left + cw, top + ch)).resize((1600, 1200), Image.BICUBIC)
        if i % 3 == 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"shelter-{i % 8}" / f"photo-{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def launch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([*LAUNCH, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"launch.py {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def naive(url: str, paths: list[Path]) -> float:
    """images/s of one invoke_endpoint after another, each image read from its file."""
    import boto3

    runtime = boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",  # noqa: S106 - a local endpoint checks none
    )
    started = time.perf_counter()
    for path in paths:
        answer = runtime.invoke_endpoint(
            EndpointName="bench", ContentType="image/jpeg", Body=path.read_bytes()
        )
        answer["Body"].read()
    return len(paths) / (time.perf_counter() - started)


def peak(port: int, paths: list[Path], concurrency: int = 16) -> float:
    bodies = [p.read_bytes() for p in paths]
    with ThreadPoolExecutor(concurrency) as pool:  # warm every connection first
        list(pool.map(lambda b: post(port, b), bodies[:concurrency]))
        started = time.perf_counter()
        list(pool.map(lambda b: post(port, b), bodies))
    return len(bodies) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, help="MMS workers (default: from the machine)")
    parser.add_argument(
        "--arch", default="resnet50", help="torchvision architecture (resnet50, as serve.py)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="imgclf-bench-transform-"))
    env = {**os.environ, "IMGCLF_HOME": str(root / "home")}
    workers = ["--workers", str(args.workers)] if args.workers else []
    try:
        model = make_model(root, args.arch)
        paths = make_images(root / "in", args.images)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} JPEGs, 1600x1200, {mb:.0f} MB; {args.arch}, 133 classes", flush=True)

        port = free_port()
        launch("deploy", "--model", str(model), "--name", "bench", "--port", str(port), *workers,
               env=env)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            for path in paths[:32]:  # warm: MMS's JVM compiles its hot paths first
                post(port, path.read_bytes())
            naive_rate = naive(url, paths)
            print(f"naive loop:  {naive_rate:6.2f} images/s", flush=True)
            peak_rate = peak(port, paths)
            print(f"peak (c16):  {peak_rate:6.2f} images/s", flush=True)
        finally:
            launch("delete", "bench", env=env)

        started = time.perf_counter()
        env_transform = dict(env)
        if args.workers:
            env_transform["SAGEMAKER_MODEL_SERVER_WORKERS"] = str(args.workers)
        done = launch(
            "transform", "--model", str(model), "--input", str(root / "in"),
            "--output", str(root / "out"), env=env_transform,
        )  # fmt: skip
        wall = time.perf_counter() - started
        sent = re.search(r"sent (\d+) files in ([0-9.]+) s", done.stdout)
        if not sent or int(sent.group(1)) != len(paths):
            raise SystemExit(f"transform did not say what it sent:\n{done.stdout}")
        rate = len(paths) / float(sent.group(2))
        print(f"transform:   {rate:6.2f} images/s sending; {wall:.1f} s in all "
              f"({len(paths) / wall:.2f} images/s with the server's start and stop)")  # fmt: skip
        print(done.stdout.strip().splitlines()[-1])
        print(f"\ntransform / naive loop: {rate / naive_rate:.2f}x  (goal >= 3x)")
        print(f"transform / endpoint peak: {rate / peak_rate:.0%}  (goal >= 90%)")
        print(f"machine: {describe()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
