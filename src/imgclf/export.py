"""The network as an ONNX graph (torch's exporter; needs the `onnx` package): what an endpoint
runs on ONNX Runtime, exported from the artifact's weights once (imgclf.graph) or, for an
artifact without a current graph, by the endpoint's worker (imgclf.serving.runtime)."""

from __future__ import annotations

import io
import warnings

import torch

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"


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


def export_onnx(model: torch.nn.Module, image_size: int, *, dtype=torch.float32) -> bytes:
    """The eval-mode network as an ONNX graph with a dynamic batch axis, in memory.

    torch's TorchScript-based exporter: measured here it readies a ResNet-50 several times
    faster than the torch.export-based one (which also needs onnxscript). torch marks it
    deprecated; should a later torch drop it, `auto` serves with eager PyTorch (the parity test
    in tests/unit/test_runtime.py then fails)."""
    example = torch.zeros(1, 3, image_size, image_size, dtype=dtype)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice, once per export
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    return buffer.getvalue()
