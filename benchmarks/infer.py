"""The endpoint's per-request work in one process (no HTTP server): naive vs ours, split by stage.

Run: .venv/bin/python benchmarks/infer.py [--requests N]
For machines where multi-model-server cannot run (a lent GPU machine has no Java): the same
ResNet-50 (random weights, 133 classes) and 1600x1200 JPEGs as benchmarks/serve.py, one image a
request, sequentially. Naive: the seed handler's steps (full-size PIL decode, torchvision
Resize/CenterCrop/ToTensor/Normalize, fp32 NCHW, autograd on). Ours: `inference.input_fn`
(JPEG draft decode), `predict_fn` (inference mode, channels_last; on the device `model_fn`
picks), `output_fn`. Prints the p50 of each stage and requests/s, with the machine.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe
from PIL import Image
from serve import make_images, make_model
from torchvision import transforms

from imgclf.serving import inference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_request(body: bytes, model, transform, device) -> dict[str, float]:
    t0 = time.perf_counter()
    batch = transform(Image.open(io.BytesIO(body)).convert("RGB")).unsqueeze(0).to(device)
    _sync(device)
    t1 = time.perf_counter()
    logits = model(batch)
    probs = torch.softmax(logits, 1)[0].tolist()
    t2 = time.perf_counter()
    str(probs)
    return {"decode+pre": t1 - t0, "model": t2 - t1, "post": time.perf_counter() - t2}


def our_request(body: bytes, loaded) -> dict[str, float]:
    t0 = time.perf_counter()
    images = inference.input_fn(body, "image/jpeg", draft=loaded.preprocess.resize_size)
    t1 = time.perf_counter()
    probs = inference.predict_fn(images, loaded)
    t2 = time.perf_counter()
    options = inference.parse_options("topk=5", loaded.num_classes)
    inference.output_fn(probs, loaded.labels, accept=None, options=options, batch=False)
    return {"decode+pre": t1 - t0, "model": t2 - t1, "post": time.perf_counter() - t2}


def run(fn, bodies: list[bytes], requests: int) -> dict[str, float]:
    for body in bodies:  # warm-up: lazy init, cuDNN kernel choice
        fn(body)
    splits = [fn(bodies[i % len(bodies)]) for i in range(requests)]
    out = {k: statistics.median(s[k] for s in splits) * 1000 for k in splits[0]}
    out["total"] = statistics.median(sum(s.values()) for s in splits) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bodies = make_images()
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-infer-") as tmp:
        model_dir = make_model(Path(tmp))
        loaded = inference.model_fn(model_dir, device)
        naive_model = inference.model_fn(model_dir, device).model.to(
            memory_format=torch.contiguous_format
        )
    transform = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    rows = [
        (
            "naive",
            run(lambda b: naive_request(b, naive_model, transform, device), bodies, args.requests),
        ),
        ("ours", run(lambda b: our_request(b, loaded), bodies, args.requests)),
    ]
    print(
        f"\nmachine: {describe()}; on {device.type}; ResNet-50, 1600x1200 JPEG q90, one image a "
        f"request, {args.requests} requests, p50 ms per stage"
    )
    print(f"{'handler':<8}{'decode+pre':>12}{'model':>9}{'post':>8}{'total':>9}{'req/s':>9}")
    base = rows[0][1]["total"]
    for name, r in rows:
        print(
            f"{name:<8}{r['decode+pre']:>12.2f}{r['model']:>9.2f}{r['post']:>8.2f}"
            f"{r['total']:>9.2f}{1000 / r['total']:>9.1f}  {base / r['total']:.2f}x"
        )


if __name__ == "__main__":
    main()
