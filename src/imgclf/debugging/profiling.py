"""`profile=true`: a torch.profiler window, the per-step split between waiting for data and
computing, and a system sampler (CPU, memory, GPU), all written under
`output/data/profiler/` (SageMaker uploads output/data)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("imgclf.profile")

PROFILER_DIR = "profiler"
SAMPLE_SECONDS = 0.5
# The torch.profiler window: skip the first steps (loader start-up), warm up, record.
WAIT_STEPS, WARMUP_STEPS, ACTIVE_STEPS = 5, 2, 5


class SystemSampler:
    """Every 0.5 s: CPU %, memory, this process's RSS, and GPU utilisation and memory."""

    def __init__(self, out_file: Path, interval: float = SAMPLE_SECONDS) -> None:
        self.out_file, self.interval = out_file, interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgclf-sampler", daemon=True)

    def start(self) -> SystemSampler:
        self._thread.start()
        return self

    def _sample(self, process, start: float) -> dict:
        import psutil

        row = {
            "t": round(time.monotonic() - start, 3),
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_percent": psutil.virtual_memory().percent,
            "rss_mb": round(process.memory_info().rss / 2**20, 1),
        }
        if torch.cuda.is_available():
            try:
                row["gpu_percent"] = float(torch.cuda.utilization())
            except Exception:  # noqa: BLE001 - needs NVML; memory is still useful
                row["gpu_percent"] = None
            row["gpu_memory_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        return row

    def _run(self) -> None:
        import psutil

        process = psutil.Process()
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline
        start = time.monotonic()
        while not self._stop.wait(self.interval):
            self.samples.append(self._sample(process, start))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        with self.out_file.open("w") as f:
            for row in self.samples:
                f.write(json.dumps(row) + "\n")


class Profiler:
    """Owns the three recorders for one job; `step()` after every training batch."""

    def __init__(self, out_dir: Path, device: torch.device) -> None:
        self.out_dir = out_dir
        self.device = device
        self.steps: list[dict] = []  # epoch, step, data_s, compute_s
        self.sampler = SystemSampler(out_dir / "system.jsonl")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.torch_profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(
                wait=WAIT_STEPS, warmup=WARMUP_STEPS, active=ACTIVE_STEPS, repeat=1
            ),
            on_trace_ready=self._trace_ready,
            record_shapes=False,
        )
        self.traced = False

    def start(self) -> Profiler:
        # Kineto logs every probe (e.g. "gpuGetDeviceCount failed" on a CPU machine) as an
        # ERROR otherwise; keep the job log for real problems.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.sampler.start()
        self.torch_profiler.start()
        return self

    def _trace_ready(self, prof) -> None:
        prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        rows = []
        for event in sorted(
            prof.key_averages(),
            key=lambda e: getattr(e, sort.replace("_total", "_total")),
            reverse=True,
        )[:20]:
            rows.append(
                {
                    "name": event.key,
                    "calls": event.count,
                    "self_cpu_ms": event.self_cpu_time_total / 1000,
                    "cpu_total_ms": event.cpu_time_total / 1000,
                    "self_device_ms": getattr(event, "self_device_time_total", 0) / 1000,
                }
            )
        (self.out_dir / "top_ops.json").write_text(json.dumps(rows, indent=2))
        self.traced = True
        log.info("profiler trace: %s (open in Perfetto or chrome://tracing)", self.out_dir)

    def record_step(self, epoch: int, step: int, data_s: float, compute_s: float) -> None:
        self.steps.append(
            {
                "epoch": epoch,
                "step": step,
                "data_s": round(data_s, 6),
                "compute_s": round(compute_s, 6),
            }
        )
        self.torch_profiler.step()

    def stop(self) -> None:
        try:
            self.torch_profiler.stop()
        except Exception as exc:  # noqa: BLE001 - a short job may end inside the window
            log.warning("torch.profiler did not finish its window: %s", exc)
        self.sampler.stop()
        (self.out_dir / "steps.json").write_text(json.dumps(self.steps))


def bottleneck_sentence(data_s: float, compute_s: float, device: str) -> str:
    """One plain sentence on where a job's step time went."""
    total = data_s + compute_s
    if total <= 0:
        return "no steps were timed"
    share = data_s / total
    who = "the GPU" if device == "cuda" else "the model"
    if share >= 0.3:
        return (
            f"{who} waited for data {share:.0%} of the time: raise workers, pre-resize the "
            "images (launch.py data prepare) or lower image_size"
        )
    return f"compute took {1 - share:.0%} of the time: the data pipeline keeps up"
