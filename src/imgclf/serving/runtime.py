"""How the endpoint runs its network: eager PyTorch, or ONNX Runtime on CPU.

On CPU the artifact's own ONNX graph (model.onnx, made with it: imgclf.graph) is served when it
is current for model.pt (`prebuilt_forward`): no torchvision, no model built, no export, and
its parity is checked on this CPU against the eager logits its record holds. Otherwise the graph
is exported from the network in memory when a worker loads it (nothing is written to the model
directory). Either way, before the ONNX Runtime path is used it must agree with eager PyTorch on
a probe batch (same top-1, probabilities within PARITY_ATOL); otherwise `auto` falls back to
eager PyTorch, and an explicit `onnxruntime` fails with the reason. GPU endpoints always run
PyTorch on the GPU.

With `normalize=(mean, std)` the network takes uint8 images (NCHW, 0..255) and the float
conversion and normalisation run inside it (in the ONNX graph, or in eager PyTorch on the model's
device): the handler then builds only uint8 crops, and no PyTorch elementwise pass runs per
request on the CPU.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf import graph as artifact_graph
from imgclf.contract import CPU_RUNTIME_ENV
from imgclf.errors import UserError
from imgclf.graph import PARITY_ATOL, parity_problem  # noqa: F401 (this module's names too)

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that run it: `resolve` and the choice's check cost `serve`
# no torch import (1.8 s on 2 CPUs).

log = logging.getLogger("imgclf.serving")

AUTO, TORCH, ONNXRUNTIME = "auto", "torch", "onnxruntime"
RUNTIMES = (AUTO, TORCH, ONNXRUNTIME)
PROBE_BATCH = artifact_graph.PROBE_IMAGES  # images in the parity probe


@dataclass(frozen=True)
class Forward:
    """A network ready to run: NCHW batch on the CPU, a NumPy array or a CPU tensor (float32,
    or uint8 when built with `normalize`) → logits, a float32 NumPy array. NumPy on both sides,
    so a worker serving an ONNX graph never imports torch."""

    runtime: str
    run: Callable[[Any], np.ndarray]

    def __call__(self, batch) -> np.ndarray:
        return self.run(batch)


def _array(batch) -> np.ndarray:
    """A CPU tensor or an array → a C-contiguous NumPy array (no copy when it is one)."""
    if hasattr(batch, "detach"):
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch)


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def check_choice(choice: str, *, onnxruntime_available: bool) -> None:
    """UserError for a choice that cannot serve on any device: an unknown one, or `onnxruntime`
    asked for where it is not installed (no torch: serve checks it before anything is loaded)."""
    if choice not in RUNTIMES:
        raise UserError(
            f"CPU runtime {choice!r} is unknown; choose one of {', '.join(RUNTIMES)} "
            f"(environment variable {CPU_RUNTIME_ENV})"
        )
    if choice == ONNXRUNTIME and not onnxruntime_available:
        raise UserError(
            "CPU runtime 'onnxruntime' was asked for but onnxruntime is not installed; "
            f"install requirements/serve.txt, or set {CPU_RUNTIME_ENV}=torch"
        )


def resolve(choice: str, device: torch.device | str, *, onnxruntime_available: bool) -> str:
    """Which runtime serves: `choice` is auto | torch | onnxruntime (CPU_RUNTIME_ENV).
    GPU endpoints keep torch on the GPU; `auto` means ONNX Runtime on CPU when installed.
    `device`: a torch.device, or its type ("cpu")."""
    if choice not in RUNTIMES:
        check_choice(choice, onnxruntime_available=onnxruntime_available)
    if getattr(device, "type", device) != "cpu" or choice == TORCH:
        return TORCH
    check_choice(choice, onnxruntime_available=onnxruntime_available)
    return ONNXRUNTIME if onnxruntime_available else TORCH


def torch_forward(model: torch.nn.Module, device: torch.device) -> Forward:
    """Eager PyTorch in channels_last: the faster convolution layout on CPU (oneDNN) and on
    tensor cores alike. The model must already be on `device` and in eval mode."""
    import torch

    model = model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(batch) -> np.ndarray:
        batch = torch.as_tensor(batch).to(device).contiguous(memory_format=torch.channels_last)
        return model(batch).float().cpu().numpy()

    return Forward(TORCH, run)


def onnxruntime_forward(graph: bytes, threads: int) -> Forward:
    """An ONNX Runtime CPU session over `graph` with `threads` intra-op threads."""
    import onnxruntime as ort

    session = artifact_graph.new_session(ort, graph, threads)
    name = session.get_inputs()[0].name

    def run(batch) -> np.ndarray:
        return session.run(None, {name: _array(batch)})[0]

    return Forward(ONNXRUNTIME, run)


def session_options(ort, threads: int):
    return artifact_graph.session_options(ort, threads)


def probe_batch(image_size: int, *, uint8: bool = False) -> torch.Tensor:
    """Fixed, image-like inputs for the parity probe: normalised values in roughly [-2, 2.6],
    or uint8 pixels."""
    import torch

    generator = torch.Generator().manual_seed(17)
    shape = (PROBE_BATCH, 3, image_size, image_size)
    if uint8:
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch.rand(shape, generator=generator) * 4.6 - 2.0


def prebuilt_forward(
    model_dir: Path, config: dict, *, threads: int
) -> tuple[Forward | None, str | None]:
    """(ONNX Runtime over the artifact's own graph, None) when it is current for model.pt
    (imgclf.graph.current_graph) and agrees on this CPU with the eager logits its record holds;
    else (None, why not)."""

    found = artifact_graph.current_graph(model_dir, config)
    if isinstance(found, str):
        return None, found
    graph, reference = found
    try:
        candidate = onnxruntime_forward(graph, threads)
        probe = artifact_graph.probe_images(config["preprocess"]["image_size"])
        problem = parity_problem(reference, candidate(probe))
    except Exception as exc:  # ONNX Runtime refused the graph: say why, export as without one
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if problem is not None:
        return None, f"the artifact's ONNX graph fails its parity probe here ({problem})"
    return candidate, None


def build_forward(
    model: torch.nn.Module,
    device: torch.device,
    *,
    choice: str = AUTO,
    image_size: int,
    threads: int | None = None,
    normalize: tuple | None = None,
) -> Forward:
    """The runtime `choice` resolves to, checked against eager PyTorch on a probe batch.
    `model` is in eval mode on `device`; `threads` defaults to torch's own thread count.
    `normalize=(mean, std)`: the Forward takes uint8 images and normalises them itself."""
    import torch

    runtime = resolve(choice, device, onnxruntime_available=onnxruntime_installed())
    from imgclf.export import Normalized, export_onnx

    if normalize is not None:
        model = Normalized(model, *normalize).to(device).eval()
    if runtime == TORCH:
        return torch_forward(model, device)
    try:
        uint8 = normalize is not None
        graph = export_onnx(model, image_size, dtype=torch.uint8 if uint8 else torch.float32)
        candidate = onnxruntime_forward(graph, threads or torch.get_num_threads())
        probe = probe_batch(image_size, uint8=uint8)
        with torch.inference_mode():
            reference = model(probe)
        problem = parity_problem(reference, candidate(probe))
    except Exception as exc:  # an export or runtime failure: say which, keep serving with torch
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if problem is None:
        return candidate
    if choice == ONNXRUNTIME:
        raise UserError(
            f"the model cannot run on ONNX Runtime ({problem}); set {CPU_RUNTIME_ENV}=torch"
        )
    log.warning("ONNX Runtime path not used (%s): serving with eager PyTorch", problem)
    return torch_forward(model, device)


def __getattr__(name: str):
    # Normalized and export_onnx live in imgclf.export (torch at import): loaded when asked for.
    if name in ("Normalized", "export_onnx"):
        from imgclf import export

        return getattr(export, name)
    raise AttributeError(name)
