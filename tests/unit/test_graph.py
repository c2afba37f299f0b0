"""The artifact's own ONNX graph (imgclf.graph): made once, served only while it is current for
model.pt, checked on the serving CPU, never with data from outside itself; and the endpoint's
path over it imports neither torchvision (worker) nor torch (serve's preflight)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf import artifacts, graph, models
from imgclf.contract import GRAPH_FILE, GRAPH_RECORD_FILE, MODEL_FILE
from imgclf.serving import inference, runtime
from tests.conftest import jpeg_bytes, random_model

CLASSES = ["001.cat", "002.dog", "003.fox"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """An artifact with its graph, written once; tests copy it before changing anything."""
    model = random_model(tmp_path_factory.mktemp("graph") / "model", CLASSES)
    assert graph.write_graph(model) is None
    return model


@pytest.fixture
def model(made, tmp_path) -> Path:
    copy = tmp_path / "model"
    copy.mkdir()
    for path in made.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def _record(model: Path) -> dict:
    return json.loads((model / GRAPH_RECORD_FILE).read_text())


def test_the_graph_and_its_record_name_the_model_they_were_made_from(made):
    record = _record(made)
    assert record["model_sha256"] == graph.file_sha256(made / MODEL_FILE)
    assert record["graph_sha256"] == graph.file_sha256(made / GRAPH_FILE)
    assert (record["arch"], record["num_classes"]) == ("resnet18", 3)
    assert np.asarray(record["probe"]["logits"]).shape == (graph.PROBE_IMAGES, 3)
    assert "ONNX Runtime" in record["checked"]
    assert (made / GRAPH_FILE).stat().st_mode & 0o777 == artifacts.FILE_MODE
    config, _ = artifacts.read_description(made)
    found = graph.current_graph(made, config)
    assert not isinstance(found, str), found


def test_the_probe_is_the_same_bytes_everywhere():
    # PCG64 with a fixed seed: a change here would make every recorded probe stale.
    probe = graph.probe_images(4)
    assert probe.shape == (3, 3, 4, 4) and probe.dtype == np.uint8
    assert probe.reshape(-1)[:6].tolist() == graph.probe_images(4).reshape(-1)[:6].tolist()
    assert (
        probe.sum()
        == np.random.Generator(np.random.PCG64(17))
        .integers(0, 256, (3, 3, 4, 4), dtype=np.uint8)
        .sum()
    )


def test_a_current_graph_is_served_as_it_is_and_answers_as_eager_pytorch(model):
    served = inference.model_fn(model, device=CPU)
    assert served.forward.runtime == "onnxruntime" and served.model is None  # nothing built
    eager = inference.model_fn(model, device=CPU, cpu_runtime="torch")
    images = [inference.input_fn(jpeg_bytes(seed), "image/jpeg")[0] for seed in range(6)]
    ours, theirs = inference.predict_fn(images, served), inference.predict_fn(images, eager)
    assert np.array_equal(ours.argmax(1), theirs.argmax(1))
    assert float(np.abs(ours - theirs).max()) <= graph.PARITY_ATOL


def _rewrite_config(model: Path, **changes) -> None:
    path = model / "model_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _other_weights(model: Path) -> None:
    torch.manual_seed(1)
    state = models.build_model("resnet18", len(CLASSES)).state_dict()
    artifacts.atomic_save(state, model / MODEL_FILE)


def _swap_graph_bytes(model: Path) -> None:
    data = bytearray((model / GRAPH_FILE).read_bytes())
    data[-1] ^= 1
    (model / GRAPH_FILE).write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_other_weights, "another model.pt"),
        (lambda m: _rewrite_config(m, preprocess={**_pre(m), "mean": [0.5, 0.5, 0.5]}), "another"),
        (_swap_graph_bytes, "not the graph its record names"),
        (lambda m: (m / GRAPH_RECORD_FILE).unlink(), "cannot be read"),
        (lambda m: (m / GRAPH_RECORD_FILE).write_text("[]"), "not a format 1 record"),
    ],
)
def test_a_stale_or_broken_graph_is_never_served_and_the_endpoint_exports_its_own(
    model, change, why
):
    change(model)
    config, _ = artifacts.read_description(model)
    found = graph.current_graph(model, config)
    assert isinstance(found, str) and why in found
    loaded = inference.model_fn(model, device=CPU)
    # Exported here from model.pt, checked against eager PyTorch, as without a graph.
    assert loaded.forward.runtime == "onnxruntime" and loaded.model is not None


def _pre(model: Path) -> dict:
    return json.loads((model / "model_config.json").read_text())["preprocess"]


def test_a_graph_that_fails_its_probe_here_is_not_served(model):
    record = _record(model)
    record["probe"]["logits"][0] = [40.0, 0.0, 0.0]  # not what this graph computes
    (model / GRAPH_RECORD_FILE).write_text(json.dumps(record))
    config, _ = artifacts.read_description(model)
    forward, why = runtime.prebuilt_forward(model, config, threads=1)
    assert forward is None and "parity probe" in why
    assert inference.model_fn(model, device=CPU).model is not None  # exported instead


def test_a_graph_reaching_outside_itself_is_refused(model, tmp_path):
    import onnx
    from onnx import external_data_helper

    proto = onnx.load_model_from_string((model / GRAPH_FILE).read_bytes())
    (tmp_path / "weights.bin").write_bytes(b"")
    external_data_helper.convert_model_to_external_data(
        proto, all_tensors_to_one_file=True, location="../weights.bin", size_threshold=0
    )
    for tensor in external_data_helper._get_all_tensors(proto):  # point, don't write
        tensor.ClearField("raw_data")
    data = proto.SerializeToString()
    (model / GRAPH_FILE).write_bytes(data)
    record = _record(model)
    record["graph_sha256"] = graph.file_sha256(model / GRAPH_FILE)
    (model / GRAPH_RECORD_FILE).write_text(json.dumps(record))
    assert "external data is refused" in graph.external_data_problem(data)
    config, _ = artifacts.read_description(model)
    assert "external data" in graph.current_graph(model, config)


def test_a_link_in_place_of_the_graph_is_not_followed(model, tmp_path):
    real = tmp_path / "elsewhere.onnx"
    real.write_bytes((model / GRAPH_FILE).read_bytes())
    (model / GRAPH_FILE).unlink()
    (model / GRAPH_FILE).symlink_to(real)
    config, _ = artifacts.read_description(model)
    assert "cannot be read" in graph.current_graph(model, config)


def test_an_explicit_onnxruntime_uses_the_graph_and_torch_never_does(model):
    assert inference.model_fn(model, device=CPU, cpu_runtime="onnxruntime").model is None
    assert inference.model_fn(model, device=CPU, cpu_runtime="torch").forward.runtime == "torch"


def _imports(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "; import json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_worker_serving_the_graph_imports_no_torch(model):
    modules = _imports(
        "from imgclf.serving import handler_service, inference; "
        f"m = inference.model_fn({str(model)!r}, device='cpu'); assert m.model is None; "
        "inference.check_prediction(m)"
    )
    assert not {"torch", "torchvision", "imgclf.models"} & modules


def test_serves_preflight_of_a_graph_imports_no_torch(model):
    modules = _imports(
        "from pathlib import Path; from imgclf.serving import serve; "
        f"serve.preflight(Path({str(model)!r}))"
    )
    assert "torch" not in modules and "onnxruntime" not in modules
