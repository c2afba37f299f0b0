"""How the endpoint runs its network: eager PyTorch, or ONNX Runtime on CPU.

The artifact stays what training wrote (weights in model.pt, loaded with weights_only); the ONNX
graph is exported from that network in memory when a worker loads it, so nothing but the
artifact's own files is read from the model directory and nothing is written there. Before the
ONNX Runtime path is used it must agree with eager PyTorch on a probe batch (same top-1,
probabilities within PARITY_ATOL); otherwise `auto` falls back to eager PyTorch, and an explicit
`onnxruntime` fails with the reason. GPU endpoints always run PyTorch on the GPU.

With `normalize=(mean, std)` the network takes uint8 images (NCHW, 0..255) and the float
conversion and normalisation run inside it (in the ONNX graph, or in eager PyTorch on the model's
device): the handler then builds only uint8 crops, and no PyTorch elementwise pass runs per
request on the CPU.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from imgclf.contract import CPU_RUNTIME_ENV
from imgclf.errors import UserError

log = logging.getLogger("imgclf.serving")

AUTO, TORCH, ONNXRUNTIME = "auto", "torch", "onnxruntime"
RUNTIMES = (AUTO, TORCH, ONNXRUNTIME)
PARITY_ATOL = 1e-3  # largest difference in any probability we accept against eager PyTorch
PROBE_BATCH = 3  # images in the parity probe: not the export's batch, so it proves the axis


@dataclass(frozen=True)
class Forward:
    """A network ready to run: NCHW batch on the CPU (float32, or uint8 when built with
    `normalize`) → logits, float32 on the CPU."""

    runtime: str
    run: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.run(batch)


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve(choice: str, device: torch.device, *, onnxruntime_available: bool) -> str:
    """Which runtime serves: `choice` is auto | torch | onnxruntime (CPU_RUNTIME_ENV).
    GPU endpoints keep torch on the GPU; `auto` means ONNX Runtime on CPU when installed."""
    if choice not in RUNTIMES:
        raise UserError(
            f"CPU runtime {choice!r} is unknown; choose one of {', '.join(RUNTIMES)} "
            f"(environment variable {CPU_RUNTIME_ENV})"
        )
    if device.type != "cpu" or choice == TORCH:
        return TORCH
    if onnxruntime_available:
        return ONNXRUNTIME
    if choice == ONNXRUNTIME:
        raise UserError(
            "CPU runtime 'onnxruntime' was asked for but onnxruntime is not installed; "
            f"install requirements/serve.txt, or set {CPU_RUNTIME_ENV}=torch"
        )
    return TORCH


class Normalized(torch.nn.Module):
    """uint8 NCHW images → `model` of the normalised float images: ToTensor and Normalize's
    (x / 255 - mean) / std, folded into one multiply-add."""

    def __init__(self, model: torch.nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.float() * self.scale + self.shift)


def torch_forward(model: torch.nn.Module, device: torch.device) -> Forward:
    """Eager PyTorch in channels_last: the faster convolution layout on CPU (oneDNN) and on
    tensor cores alike. The model must already be on `device` and in eval mode."""
    model = model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device).contiguous(memory_format=torch.channels_last)
        return model(batch).float().cpu()

    return Forward(TORCH, run)


def export_onnx(model: torch.nn.Module, image_size: int, *, dtype=torch.float32) -> bytes:
    """The eval-mode network as an ONNX graph with a dynamic batch axis, in memory.

    torch's TorchScript-based exporter: measured here it readies a ResNet-50 several times
    faster than the torch.export-based one (which also needs onnxscript), and a worker pays
    this at every start. torch marks it deprecated; should a later torch drop it, `auto`
    serves with eager PyTorch (the parity test in tests/unit/test_runtime.py then fails)."""
    example = torch.zeros(1, 3, image_size, image_size, dtype=dtype)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice, once per worker
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def onnxruntime_forward(graph: bytes, threads: int) -> Forward:
    """An ONNX Runtime CPU session over `graph` with `threads` intra-op threads."""
    import onnxruntime as ort

    options = session_options(ort, threads)
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().cpu().contiguous().numpy()
        return torch.from_numpy(session.run(None, {name: array})[0])

    return Forward(ONNXRUNTIME, run)


def session_options(ort, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; its warnings on node placement are noise
    return options


def probe_batch(image_size: int, *, uint8: bool = False) -> torch.Tensor:
    """Fixed, image-like inputs for the parity probe: normalised values in roughly [-2, 2.6],
    or uint8 pixels."""
    generator = torch.Generator().manual_seed(17)
    shape = (PROBE_BATCH, 3, image_size, image_size)
    if uint8:
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch.rand(shape, generator=generator) * 4.6 - 2.0


def parity_problem(reference: torch.Tensor, candidate: torch.Tensor) -> str | None:
    """Why `candidate` logits do not stand in for `reference` logits, or None when they do."""
    if candidate.shape != reference.shape:
        return f"output shape {tuple(candidate.shape)} instead of {tuple(reference.shape)}"
    ref, cand = torch.softmax(reference.float(), 1), torch.softmax(candidate.float(), 1)
    diff = float((ref - cand).abs().max())
    if not diff <= PARITY_ATOL:  # also catches NaN
        return f"probabilities differ by {diff:.2e} (limit {PARITY_ATOL:g})"
    if not torch.equal(ref.argmax(1), cand.argmax(1)):
        return "top-1 class differs"
    return None


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
    runtime = resolve(choice, device, onnxruntime_available=onnxruntime_installed())
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
