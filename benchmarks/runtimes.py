"""The endpoint's network on each CPU runtime: eager PyTorch (NCHW, and channels_last as the
endpoint ran it before), ONNX Runtime and OpenVINO over the same exported graph, and optionally
torch.compile.

Run: .venv/bin/python benchmarks/runtimes.py [--threads 2] [--rounds 20] [--batch 1] [--compile]
ResNet-50 (random weights, 133 classes) at 224 px. The runtimes take turns, one forward pass
each per round, so load from other processes falls on all of them alike. Prints p50 and minimum
ms per forward pass, the ratio against eager NCHW, the time to get each runtime ready, and the
largest probability difference against eager PyTorch. OpenVINO is measured when installed
(`pip install openvino`); it is not a serving dependency.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from machine import describe

from imgclf import models
from imgclf.serving import runtime


def openvino_forward(graph: bytes, threads: int) -> runtime.Forward:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(graph, b""),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",  # as exact as the other runtimes
        },
    )
    request = compiled.create_infer_request()

    def run(batch: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: batch.contiguous().numpy()})
        return torch.from_numpy(out[0].copy())

    return runtime.Forward("openvino", run)


def compiled_forward(model: torch.nn.Module) -> runtime.Forward:
    compiled = torch.compile(model)

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        return compiled(batch.contiguous(memory_format=torch.channels_last))

    return runtime.Forward("torch.compile", run)


def eager_nchw(model: torch.nn.Module) -> runtime.Forward:
    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        return model(batch)

    return runtime.Forward("eager NCHW", run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow start)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.build_model("resnet50", 133).eval()
    batch = runtime.probe_batch(224)[:1].repeat(args.batch, 1, 1, 1)

    ready: dict[str, float] = {}
    candidates: list[runtime.Forward] = [eager_nchw(model)]
    with torch.inference_mode():
        reference = torch.softmax(model(batch), 1)

    started = time.perf_counter()
    graph = runtime.export_onnx(model, 224)
    exported = time.perf_counter() - started
    ready["export to ONNX"] = exported
    started = time.perf_counter()
    candidates.append(runtime.onnxruntime_forward(graph, args.threads))
    ready["onnxruntime"] = exported + time.perf_counter() - started
    if importlib.util.find_spec("openvino"):
        started = time.perf_counter()
        candidates.append(openvino_forward(graph, args.threads))
        ready["openvino"] = exported + time.perf_counter() - started
    if args.compile:
        cl_model = models.build_model("resnet50", 133).eval()
        cl_model.load_state_dict(model.state_dict())
        cl_model = cl_model.to(memory_format=torch.channels_last)
        started = time.perf_counter()
        forward = compiled_forward(cl_model)
        forward(batch)  # compiles
        ready["torch.compile"] = time.perf_counter() - started
        candidates.append(forward)
    channels_last = models.build_model("resnet50", 133).eval()
    channels_last.load_state_dict(model.state_dict())
    candidates.insert(1, runtime.torch_forward(channels_last, torch.device("cpu")))

    diffs, times = {}, {f.runtime: [] for f in candidates}
    for forward in candidates:
        probs = torch.softmax(torch.as_tensor(forward(batch)).float(), 1)
        diffs[forward.runtime] = float((probs - reference).abs().max())
        forward(batch)
    for _ in range(args.rounds):
        for forward in candidates:
            started = time.perf_counter()
            forward(batch)
            times[forward.runtime].append(time.perf_counter() - started)

    print(
        f"machine: {describe()}; ResNet-50 at 224 px, batch {args.batch}, "
        f"{args.threads} threads, {args.rounds} rounds"
    )
    print(f"{'runtime':<16}{'p50 ms':>9}{'min ms':>9}{'vs eager':>10}{'max |dp|':>11}")
    base = statistics.median(times["eager NCHW"])
    for name, values in times.items():
        p50 = statistics.median(values)
        print(
            f"{name:<16}{p50 * 1000:>9.1f}{min(values) * 1000:>9.1f}"
            f"{base / p50:>9.2f}x{diffs[name]:>11.1e}"
        )
    for name, seconds in ready.items():
        print(f"ready: {name} {seconds:.1f} s")


if __name__ == "__main__":
    main()
