"""The CPU runtime path (imgclf.serving.runtime): ONNX Runtime stands in for eager PyTorch only
where it gives the same answers, and the model directory is only read."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf import artifacts, models
from imgclf.data.decode import open_image
from imgclf.data.transforms import eval_transform
from imgclf.errors import UserError
from imgclf.serving import inference, runtime

IMAGE_SIZE = 32


def _features(net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The penultimate activations (what the head sees)."""
    head, net.fc = net.fc, torch.nn.Identity()
    try:
        with torch.inference_mode():
            return net(batch)
    finally:
        net.fc = head


@pytest.fixture(scope="module")
def digits_model(digits_dir, tmp_path_factory) -> Path:
    """A real classifier of the digits: a ResNet-18 body (seeded, not trained) under a linear
    head fitted by ridge regression on the train split, so its answers are confident and mostly
    right (the top-1 and probability checks below then have something to disagree on)."""
    torch.manual_seed(0)
    classes = sorted(p.name for p in (digits_dir / "train").iterdir())
    net = models.build_model("resnet18", len(classes)).eval()
    pre = models.get_architecture("resnet18").preprocess(IMAGE_SIZE)
    transform = eval_transform(pre)
    images, targets = [], []
    for index, name in enumerate(classes):
        for path in sorted((digits_dir / "train" / name).iterdir()):
            images.append(transform(open_image(path)))
            targets.append(index)
    feats = _features(net, torch.stack(images)).double()
    feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype)], 1)
    onehot = torch.nn.functional.one_hot(torch.tensor(targets), len(classes)).double()
    solution = torch.linalg.solve(
        feats.T @ feats + 1e-2 * torch.eye(feats.shape[1], dtype=feats.dtype), feats.T @ onehot
    )
    temperature = 20.0  # ridge scores live in [0, 1]; sharpen them into confident logits
    with torch.no_grad():
        net.fc.weight.copy_(solution[:-1].T * temperature)
        net.fc.bias.copy_(solution[-1] * temperature)
    path = tmp_path_factory.mktemp("digits_model")
    artifacts.save_artifact(
        path,
        state_dict=net.state_dict(),
        labels=[name.split(".", 1)[1] for name in classes],
        config={"arch": "resnet18", "classes": classes, "preprocess": pre.to_dict()},
    )
    return path


def _test_images(digits_dir: Path) -> list[tuple[str, bytes, int | None]]:
    """Every digits test image (with its class index) and scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_image

    classes = sorted(p.name for p in (digits_dir / "test").iterdir())
    out = [
        (path.name, path.read_bytes(), index)
        for index, name in enumerate(classes)
        for path in sorted((digits_dir / "test" / name).iterdir())
    ]
    for name in ("china.jpg", "flower.jpg"):
        buf = io.BytesIO()
        Image.fromarray(load_sample_image(name)).save(buf, format="JPEG", quality=90)
        out.append((name, buf.getvalue(), None))
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        p.name: (p.stat().st_mode, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.iterdir())
    }


def test_onnxruntime_gives_eager_pytorchs_answers_on_every_test_image(digits_model, digits_dir):
    before = _snapshot(digits_model)
    cpu = torch.device("cpu")
    eager = inference.model_fn(digits_model, device=cpu, cpu_runtime="torch")
    onnx = inference.model_fn(digits_model, device=cpu, cpu_runtime="onnxruntime")
    assert (eager.forward.runtime, onnx.forward.runtime) == ("torch", "onnxruntime")
    assert _snapshot(digits_model) == before  # read, never written to

    cases = _test_images(digits_dir)
    images = [
        inference.input_fn(body, "application/x-image", draft=eager.preprocess.resize_size)[0]
        for _, body, _ in cases
    ]
    # In request-sized batches (one image, and JSON batches up to the request limit)
    chunks = [images[:1]] + [
        images[i : i + inference.MAX_IMAGES] for i in range(1, len(images), inference.MAX_IMAGES)
    ]
    reference = torch.cat([torch.from_numpy(inference.predict_fn(c, eager)) for c in chunks])
    candidate = torch.cat([torch.from_numpy(inference.predict_fn(c, onnx)) for c in chunks])

    labelled = torch.tensor([label is not None for _, _, label in cases])
    targets = torch.tensor([label or 0 for _, _, label in cases])
    accuracy = float((reference.argmax(1) == targets)[labelled].float().mean())
    assert accuracy > 0.5, f"the fixture is not a real classifier (top-1 {accuracy:.2f})"

    differs = (reference.argmax(1) != candidate.argmax(1)).nonzero().flatten().tolist()
    assert not differs, f"top-1 differs on {[cases[i][0] for i in differs]}"
    worst = (reference - candidate).abs().max(dim=1).values
    assert float(worst.max()) <= 1e-3, f"{cases[int(worst.argmax())][0]}: {float(worst.max())}"


def test_auto_serves_with_onnxruntime_on_cpu(digits_model):
    loaded = inference.model_fn(digits_model, device=torch.device("cpu"))
    assert loaded.forward.runtime == "onnxruntime"


@pytest.mark.parametrize(
    ("choice", "device", "installed", "expected"),
    [
        ("auto", "cpu", True, "onnxruntime"),
        ("auto", "cpu", False, "torch"),
        ("torch", "cpu", True, "torch"),
        ("onnxruntime", "cpu", True, "onnxruntime"),
        ("auto", "cuda", True, "torch"),  # GPU endpoints keep torch on the GPU
        ("onnxruntime", "cuda", True, "torch"),
    ],
)
def test_resolve_picks_the_runtime(choice, device, installed, expected):
    got = runtime.resolve(choice, torch.device(device), onnxruntime_available=installed)
    assert got == expected


def test_resolve_rejects_unknown_or_missing_runtimes_with_the_fix():
    with pytest.raises(UserError, match="auto, torch, onnxruntime.*IMGCLF_CPU_RUNTIME"):
        runtime.resolve("tensorrt", torch.device("cpu"), onnxruntime_available=True)
    with pytest.raises(UserError, match="not installed.*IMGCLF_CPU_RUNTIME=torch"):
        runtime.resolve("onnxruntime", torch.device("cpu"), onnxruntime_available=False)


class _Unexportable(torch.nn.Module):
    """A network the ONNX exporter cannot translate (no ONNX operator for eigh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gram = x.flatten(2) @ x.flatten(2).transpose(1, 2)
        return torch.linalg.eigh(gram).eigenvalues


def test_a_network_onnxruntime_cannot_run_falls_back_to_torch_or_fails_when_asked_for(caplog):
    net, cpu = _Unexportable().eval(), torch.device("cpu")
    forward = runtime.build_forward(net, cpu, choice="auto", image_size=8)
    assert forward.runtime == "torch"
    assert "ONNX Runtime path not used" in caplog.text
    batch = runtime.probe_batch(8)
    with torch.inference_mode():
        assert torch.allclose(torch.from_numpy(forward(batch)), net(batch))
    with pytest.raises(UserError, match="cannot run on ONNX Runtime.*IMGCLF_CPU_RUNTIME=torch"):
        runtime.build_forward(net, cpu, choice="onnxruntime", image_size=8)


def test_parity_problem_names_what_differs():
    logits = torch.tensor([[4.0, 1.0, 0.0], [0.0, 0.5, 3.0]])
    assert runtime.parity_problem(logits, logits + 1e-5) is None
    assert "differ by" in runtime.parity_problem(logits, logits * 1.2)
    assert "differ by" in runtime.parity_problem(logits, torch.full_like(logits, float("nan")))
    assert runtime.parity_problem(logits, logits[:, [1, 0, 2]]) is not None
    assert "shape" in runtime.parity_problem(logits, logits[:, :2])
    near_tie = torch.tensor([[1.0, 1.0 + 1e-4, 0.0]])
    assert "top-1" in runtime.parity_problem(near_tie, near_tie[:, [1, 0, 2]])


@pytest.mark.gpu
def test_gpu_endpoints_keep_torch_on_the_gpu(digits_model):
    loaded = inference.model_fn(digits_model, device=torch.device("cuda"))
    assert loaded.forward.runtime == "torch"
    assert next(loaded.model.parameters()).is_cuda
    probs = inference.predict_fn([Image.fromarray(np.zeros((40, 40, 3), np.uint8))], loaded)
    assert probs.shape == (1, loaded.num_classes)
