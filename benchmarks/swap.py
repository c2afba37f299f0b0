"""What a model swap on a running local endpoint costs, two ways: a second model registered in
the running multi-model-server (what `serve` does, serving.serve.Swap) vs a second MMS started
beside the first (what ARCHITECTURE.md first sketched).

Run: .venv/bin/python benchmarks/swap.py [--arch resnet50] [--classes 133] [--workers 1]
       [--rounds 3]
Prints, for random-weight models of `--arch`: the first start (MMS and its workers), what a
separate preflight of the new model would add (the swap makes none: the worker's load is that
check, see serving.serve.Swap), then the seconds until the new model's workers have loaded it and
the memory the endpoint's processes hold meanwhile (PSS summed over serve's process group, so
shared pages count once), for each way. Both ways run under this process, which plays serve
(the same ModelServer code); nothing else of the machine is measured, so a quiet machine gives
the fairest numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
from machine import describe

from imgclf import artifacts, models
from imgclf.processes import group_members, lead_own_group
from imgclf.serving import serve
from imgclf.serving.mms import ModelServer
from imgclf.serving.settings import read_settings


def make_model(path: Path, arch: str, classes: int, seed: int) -> Path:
    torch.manual_seed(seed)
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


def group_pss_mb() -> float:
    """PSS of every process in our group (this one included), in MB."""
    total = 0
    for pid in group_members(os.getpgid(0)):
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except (psutil.Error, OSError):
            pass
    return total / 2**20


def stop_tree(pid: int) -> None:
    """A second MMS alone (ModelServer.stop would stop every MMS of the group)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def seconds(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f} s ({', '.join(f'{v:.1f}' for v in values)})"


def megabytes(values: list[float]) -> str:
    return f"median {statistics.median(values):+.0f} MB ({', '.join(f'{v:+.0f}' for v in values)})"


async def run(args, work: Path) -> list[tuple[str, str]]:
    old = make_model(work / "old", args.arch, args.classes, 0)
    new = make_model(work / "new", args.arch, args.classes, 1)
    environ = {
        **os.environ,
        "IMGCLF_MODEL_DIR": str(old),
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(args.workers),
    }
    settings = read_settings(environ)
    rows = []
    first = ModelServer(settings, environ, work / "first")
    (work / "first").mkdir()
    first.prepare(old)
    started = time.perf_counter()
    await first.start(settings.startup_timeout_s)
    rows.append(
        ("first start: MMS and its workers loaded", f"{time.perf_counter() - started:.1f} s")
    )
    try:
        copy = first.stage(new, "model-2")
        started = time.perf_counter()
        serve.preflight(copy, cpu_runtime=settings.cpu_runtime)
        took = time.perf_counter() - started
        rows.append(("a separate preflight, as at start (not done)", f"{took:.1f} s"))
        await asyncio.sleep(2)
        base = group_pss_mb()  # after the preflight: what it left in this process counts once
        rows.append(("memory of the group, one model", f"{base:.0f} MB"))

        a_times, a_mem, b_times, b_mem = [], [], [], []
        for n in range(args.rounds):  # the two ways take turns: a busy machine slows both
            name = f"model-{n + 2}"
            first.stage(new, name)
            started = time.perf_counter()
            await first.add_model(name, settings.startup_timeout_s)
            a_times.append(time.perf_counter() - started)
            await asyncio.sleep(2)
            a_mem.append(group_pss_mb() - base)
            await first.remove_model(name, 0)
            await asyncio.sleep(3)

            second = ModelServer(settings, environ, work / f"second-{n}")
            (work / f"second-{n}").mkdir()
            second.prepare(new)
            started = time.perf_counter()
            await second.start(settings.startup_timeout_s)
            b_times.append(time.perf_counter() - started)
            await asyncio.sleep(2)
            b_mem.append(group_pss_mb() - base)
            stop_tree(second.proc.pid)
            await asyncio.sleep(3)
        rows.append(("A: second model in the same MMS, loaded", seconds(a_times)))
        rows.append(("  memory added while both are loaded", megabytes(a_mem)))
        rows.append(("B: a second MMS, its workers loaded", seconds(b_times)))
        rows.append(("  memory added while both run", megabytes(b_mem)))
    finally:
        await first.stop()  # every process of the group but this one: both MMS
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--classes", type=int, default=133)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="turns of each way (3)")
    args = parser.parse_args()
    lead_own_group()
    with tempfile.TemporaryDirectory(prefix="imgclf-swap-") as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    print(f"{args.arch}, {args.classes} classes, {args.workers} worker(s); {describe()}")
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
