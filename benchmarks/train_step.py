"""Training step throughput: ResNet-50, fp32 NCHW (the naive fine-tune) vs our step options.

Run: .venv/bin/python benchmarks/train_step.py [--batch B] [--steps N] [--size 224] [--compile]
(defaults: batch 16, 6 steps on a CPU; batch 128, 20 steps on a GPU)
On synthetic batches already in memory (the data pipeline is benchmarks/data.py), full forward
+ backward + AdamW step through `imgclf.engine.train_one_epoch`, for each of: fp32 NCHW,
channels_last, bf16 autocast, bf16 + channels_last, and fused AdamW where the device has it.
Prints images/s and the ratio against fp32 NCHW, with the device named. On a GPU add fp16.
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import describe
from torch import nn

from imgclf import engine, models


def run(device, *, batch, steps, size, amp, channels_last, fused, compiled=False) -> float:
    torch.manual_seed(0)
    model = models.build_model("resnet50", 133).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    kwargs = {"fused": True} if fused else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **kwargs)
    images = torch.randn(batch, 3, size, size)
    targets = torch.randint(0, 133, (batch,))
    loader = [(images, targets)] * steps
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    common = dict(device=device, amp_dtype=amp, channels_last=channels_last, scaler=scaler)
    engine.train_one_epoch(net, loader[:2], nn.CrossEntropyLoss(), optimizer, **common)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine.train_one_epoch(net, loader, nn.CrossEntropyLoss(), optimizer, **common)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    # A GPU needs large batches and enough steps to be measured; a CPU takes seconds a step.
    parser.add_argument("--batch", type=int, default=128 if gpu else 16)
    parser.add_argument("--steps", type=int, default=20 if gpu else 6)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--cpu-bf16", action="store_true", help="also time bf16 on a CPU")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile (compiling is not timed)"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    configs = [
        ("fp32 NCHW (naive)", None, False, False, False),
        ("fp32 channels_last", None, True, False, False),
        ("fp32 channels_last + fused AdamW", None, True, True, False),
    ]
    if device.type == "cuda" or args.cpu_bf16:
        # On CPUs without native bf16 (no AMX / AVX512-BF16) autocast is emulated and far
        # slower (measured on the 2-CPU dev machine: under 0.4 img/s): amp=auto stays off there.
        configs += [
            ("bf16 autocast", torch.bfloat16, False, False, False),
            ("bf16 + channels_last", torch.bfloat16, True, False, False),
        ]
    if device.type == "cuda":
        configs += [
            ("fp16 + channels_last", torch.float16, True, False, False),
            ("bf16 + channels_last + fused AdamW", torch.bfloat16, True, True, False),
        ]
    if args.compile:
        amp = torch.bfloat16 if device.type == "cuda" else None
        configs.append(("channels_last + torch.compile", amp, True, False, True))
    rows = []
    for label, amp, cl, fused, compiled in configs:
        rate = run(
            device,
            batch=args.batch,
            steps=args.steps,
            size=args.size,
            amp=amp,
            channels_last=cl,
            fused=fused,
            compiled=compiled,
        )
        rows.append((label, rate))
        print(f"{label:<40}{rate:>9.1f} img/s", flush=True)
    base = rows[0][1]
    print(
        f"\nmachine: {describe()}; on {device.type}; ResNet-50, {args.size} px, batch "
        f"{args.batch}, {args.steps} timed steps"
    )
    for label, rate in rows:
        print(f"{label:<40}{rate:>9.1f} img/s{rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
