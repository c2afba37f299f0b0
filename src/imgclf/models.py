"""Architecture registry: build a torchvision classifier with a new head, optionally frozen,
starting from pretrained weights found offline (torch cache or a file)."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from imgclf.config import ARCHITECTURES
from imgclf.data.transforms import Preprocess
from imgclf.errors import ConfigError, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[..., nn.Module]
    weights: tvm.WeightsEnum
    head: str  # dotted path of the final Linear layer

    def preprocess(self, image_size: int) -> Preprocess:
        """Normalisation, resize ratio and interpolation from the pretrained weights' own config."""
        t = self.weights.transforms()
        ratio = t.resize_size[0] / t.crop_size[0]
        return Preprocess(
            image_size=image_size,
            resize_size=max(image_size, round(image_size * ratio)),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=t.interpolation.value,
        )


REGISTRY: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("resnet18", tvm.resnet18, tvm.ResNet18_Weights.DEFAULT, "fc"),
        Architecture("resnet34", tvm.resnet34, tvm.ResNet34_Weights.DEFAULT, "fc"),
        Architecture("resnet50", tvm.resnet50, tvm.ResNet50_Weights.DEFAULT, "fc"),
        Architecture("resnet101", tvm.resnet101, tvm.ResNet101_Weights.DEFAULT, "fc"),
        Architecture("resnet152", tvm.resnet152, tvm.ResNet152_Weights.DEFAULT, "fc"),
        Architecture(
            "efficientnet_b0",
            tvm.efficientnet_b0,
            tvm.EfficientNet_B0_Weights.DEFAULT,
            "classifier.1",
        ),
        Architecture(
            "convnext_tiny", tvm.convnext_tiny, tvm.ConvNeXt_Tiny_Weights.DEFAULT, "classifier.2"
        ),
        Architecture(
            "mobilenet_v3_large",
            tvm.mobilenet_v3_large,
            tvm.MobileNet_V3_Large_Weights.DEFAULT,
            "classifier.3",
        ),
    )
}
assert tuple(REGISTRY) == ARCHITECTURES, "config.ARCHITECTURES and models.REGISTRY disagree"


def get_architecture(name: str) -> Architecture:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}; supported: {', '.join(REGISTRY)}"
        ) from None


def cached_weights_path(arch: Architecture) -> Path:
    """Where torchvision keeps this architecture's weights in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(arch.weights.url).name


def load_pretrained_state(
    arch: Architecture, weights_path: str = "", *, download_timeout: float = 20.0
) -> dict[str, torch.Tensor]:
    """ImageNet weights from `weights_path`, else the torch cache, else a download; a clear
    one-line error when none of these works (no network in the job, say)."""
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise UserError(f"weights_path {weights_path} does not exist or is not a file")
        return _load_state(path)
    cached = cached_weights_path(arch)
    if cached.is_file():
        return _load_state(cached)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(download_timeout)
    try:
        torch.hub.load_state_dict_from_url(arch.weights.url, progress=False, check_hash=True)
    except Exception as exc:  # any network or hash failure: tell the user how to fix it
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"pretrained weights for {arch.name} are not in the torch cache ({cached}) and could "
            f"not be downloaded ({reason}). Fix: copy {Path(arch.weights.url).name} there (set "
            "TORCH_HOME to move the cache), pass --hp weights_path=FILE, or --hp pretrained=false"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return _load_state(cached)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"weights file {path} could not be loaded as a state_dict: {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state_dict")
    return state


def _replace_head(model: nn.Module, path: str, num_classes: int) -> nn.Linear:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)  # Sequential children are attributes named "0", "1", ...
    if not isinstance(old, nn.Linear):
        raise TypeError(f"head {path} is {type(old).__name__}, expected Linear")
    new = nn.Linear(old.in_features, num_classes)
    setattr(parent, attr, new)
    return new


def build_model(
    arch_name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights_path: str = "",
    freeze: bool = False,
) -> nn.Module:
    """A classifier with a fresh `num_classes` head; with `freeze`, only the head trains."""
    arch = get_architecture(arch_name)
    model = arch.build(weights=None)
    if pretrained or weights_path:
        state = load_pretrained_state(arch, weights_path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"weights do not fit {arch.name}: {len(missing)} missing keys (e.g. "
                f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
    head = _replace_head(model, arch.head, num_classes)
    if freeze:
        for param in model.parameters():
            param.requires_grad_(False)
        for param in head.parameters():
            param.requires_grad_(True)
    return model


def state_layout(
    arch_name: str, num_classes: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every entry of build_model(arch_name, num_classes)'s
    state_dict, from a model built on the meta device: nothing is allocated, whatever the
    class count."""
    arch = get_architecture(arch_name)
    with torch.device("meta"):
        model = arch.build(weights=None)
        _replace_head(model, arch.head, num_classes)
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def state_bytes(layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """What the tensors of a state_layout hold, in bytes."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())


def state_mismatch(state: object, arch_name: str, num_classes: int) -> str | None:
    """Why `state` is not a state_dict of build_model(arch_name, num_classes) (missing or
    unexpected names, another shape or dtype), in one line; None when it is one."""
    if not isinstance(state, dict):
        return f"it holds {type(state).__name__}, not a state_dict"
    expected = state_layout(arch_name, num_classes)
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    if missing or unexpected:
        return (
            f"{len(missing)} entries missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:3]})"
        )
    for name, (shape, dtype) in expected.items():
        value = state[name]
        if not isinstance(value, torch.Tensor):
            return f"{name} is {type(value).__name__}, not a tensor"
        if tuple(value.shape) != shape or value.dtype != dtype:
            return (
                f"{name} is {_shape(value.shape)} {value.dtype}, expected {_shape(shape)} {dtype}"
            )
    return None


def _shape(shape) -> str:
    return "x".join(str(n) for n in shape) or "a scalar"


def head_module(model: nn.Module, arch_name: str) -> nn.Module:
    return model.get_submodule(get_architecture(arch_name).head)


def download_weights(names: list[str]) -> list[Path]:
    """Fetch ImageNet weights into the torch cache (the training image does this at build time,
    so its jobs run with network isolation). `all` means every registered architecture."""
    wanted = list(ARCHITECTURES) if names in ([], ["all"]) else names
    paths = []
    for name in wanted:
        arch = get_architecture(name)
        load_pretrained_state(arch, download_timeout=300.0)
        paths.append(cached_weights_path(arch))
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m imgclf.models", description="Download pretrained weights."
    )
    parser.add_argument("command", choices=["download"])
    parser.add_argument("names", nargs="*", help=f"architectures ({', '.join(ARCHITECTURES)}|all)")
    args = parser.parse_args(argv)
    try:
        for path in download_weights(args.names):
            print(path)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
