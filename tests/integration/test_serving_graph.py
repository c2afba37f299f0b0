"""`serve` over an artifact that carries its ONNX graph (imgclf.graph): the worker serves the graph
as it is and answers as eager PyTorch does; with a graph gone stale (model.pt replaced) it
exports its own from the new weights and answers as they do, never with the old graph."""

import json

import numpy as np
import pytest
import torch

from imgclf import artifacts, graph, models
from imgclf.contract import MODEL_FILE
from imgclf.serving import inference
from tests.conftest import jpeg_bytes, random_model, run_launch
from tests.integration.serving_client import deploy, post

CLASSES = ["001.cat", "002.dog", "003.fox", "004.owl"]


def _served(home, model, name: str) -> tuple[np.ndarray, str]:
    """The endpoint's probabilities for a few images, and its log."""
    endpoint = deploy(home, model, name)
    try:
        rows = []
        for seed in range(3):
            status, raw = post(
                endpoint["url"],
                jpeg_bytes(seed),
                "image/jpeg",
                {"X-Amzn-SageMaker-Custom-Attributes": "format=vectors"},
            )
            assert status == 200, raw
            rows += json.loads(raw)
        log = (home / "endpoints" / name / "serve.log").read_text()
    finally:
        stop = run_launch("delete", name, home=home)
        assert stop.returncode == 0, stop.stdout + stop.stderr
    return np.asarray(rows), log


def _eager(model) -> np.ndarray:
    loaded = inference.model_fn(model, device="cpu", cpu_runtime="torch")
    images = [inference.input_fn(jpeg_bytes(seed), "image/jpeg")[0] for seed in range(3)]
    return inference.predict_fn(images, loaded)


@pytest.mark.parametrize("stale", [False, True], ids=["current", "stale"])
def test_serve_uses_the_graph_only_while_it_is_current(home, tmp_path, stale):
    model = random_model(tmp_path / "model", CLASSES)
    assert graph.write_graph(model) is None
    if stale:
        torch.manual_seed(3)
        state = models.build_model("resnet18", len(CLASSES)).state_dict()
        artifacts.atomic_save(state, model / MODEL_FILE)
    served, log = _served(home, model, f"graph-{'stale' if stale else 'current'}")
    expected = _eager(model)
    assert np.array_equal(served.argmax(1), expected.argmax(1))
    assert np.abs(served - expected).max() <= 1e-3
    assert ("serving the artifact's own ONNX graph" in log) is not stale
    if stale:  # the preflight loads model.pt itself, and the worker exports its own graph
        assert "preflight on eager PyTorch (the graph was made from another model.pt)" in log
        assert "exporting the network to ONNX here: the graph was made from another" in log
    else:
        assert "an ONNX graph recorded for it (preflight done" in log
