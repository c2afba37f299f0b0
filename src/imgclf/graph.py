"""The artifact's ONNX graph, made once beside model.pt so that an endpoint starts without
exporting it: model.onnx (the network with its input normalisation, uint8 NCHW images →
logits, a dynamic batch axis; a protobuf, no pickles) and model_onnx.json, its record: the
sha256 of model.pt and of the graph, the architecture, classes and preprocessing it was made
with, and eager PyTorch's logits on a fixed probe batch. The probe is drawn with NumPy's PCG64
(the same bytes on every machine), so an endpoint checks ONNX Runtime against eager PyTorch on
its own CPU without importing torch.

`write_graph` (torch and onnx: at training's end, and when a local model folder without a
current graph is packed for SageMaker) makes both files; `current_graph` (no torch) says whether
an artifact's graph may be served: both files regular and bounded, the record's hashes those of
model.pt and model.onnx beside it, its description that of model_config.json, and no tensor
stored outside the graph (ONNX's external data is read from wherever its path points: refused).
Anything else, and the endpoint exports the graph itself or serves eager PyTorch, as for an
artifact made before graphs were."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from imgclf import __version__
from imgclf.contract import GRAPH_FILE, GRAPH_RECORD_FILE, MODEL_FILE
from imgclf.errors import reason

log = logging.getLogger("imgclf.graph")

GRAPH_FORMAT = 1
PROBE_SEED, PROBE_IMAGES = 17, 3  # not the export's batch of 1, so the probe proves the axis
PARITY_ATOL = 1e-3  # largest difference in any probability accepted against eager PyTorch
MAX_GRAPH_BYTES = 2 * 1024**3  # protobuf's own limit on one message
MAX_RECORD_BYTES = 16 * 1024 * 1024  # the probe's logits: 3 rows of up to 100,000 classes


def probe_images(image_size: int) -> np.ndarray:
    """The fixed uint8 probe batch [PROBE_IMAGES, 3, size, size], the same on any machine."""
    rng = np.random.Generator(np.random.PCG64(PROBE_SEED))
    shape = (PROBE_IMAGES, 3, image_size, image_size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a CPU tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def softmax(logits) -> np.ndarray:
    values = _numpy(logits).astype(np.float64)
    values = values - values.max(axis=1, keepdims=True)
    exp = np.exp(values)
    return exp / exp.sum(axis=1, keepdims=True)


def parity_problem(reference, candidate) -> str | None:
    """Why `candidate` logits do not stand in for `reference` logits (same top-1, every
    probability within PARITY_ATOL), or None when they do. Arrays or CPU tensors."""
    reference, candidate = _numpy(reference), _numpy(candidate)
    if candidate.shape != reference.shape:
        return f"output shape {tuple(candidate.shape)} instead of {tuple(reference.shape)}"
    ref, cand = softmax(reference), softmax(candidate)
    diff = float(np.abs(ref - cand).max())
    if not diff <= PARITY_ATOL:  # also catches NaN
        return f"probabilities differ by {diff:.2e} (limit {PARITY_ATOL:g})"
    if not np.array_equal(ref.argmax(1), cand.argmax(1)):
        return "top-1 class differs"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def description(config: dict[str, Any]) -> dict[str, Any]:
    """What of model_config.json the graph bakes in: a change to any of it makes it stale."""
    return {k: config.get(k) for k in ("arch", "num_classes", "preprocess")}


def graph_record(
    *, model_sha256: str, graph: bytes, config: dict[str, Any], probe_logits, checked: str
) -> dict[str, Any]:
    """model_onnx.json's content (pure). `checked`: how parity was checked when it was made."""
    return {
        "format": GRAPH_FORMAT,
        "model_sha256": model_sha256,
        "graph_sha256": hashlib.sha256(graph).hexdigest(),
        **description(config),
        "input": {"dtype": "uint8", "layout": "NCHW", "normalized_inside": True},
        "probe": {
            "generator": "numpy PCG64",
            "seed": PROBE_SEED,
            "images": PROBE_IMAGES,
            "logits": np.asarray(probe_logits, dtype=np.float32).tolist(),
        },
        "checked": checked,
        "imgclf": __version__,
    }


def write_graph(model_dir: Path, *, into: Path | None = None) -> str | None:
    """Export the artifact in `model_dir` to model.onnx and write its record (in `model_dir`, or
    in the folder `into`): None when written, else why not (a missing `onnx`, an export or
    parity failure: the endpoint then exports or serves eager PyTorch, as without a graph).
    Checked with ONNX Runtime here when it is installed; every endpoint checks again on its
    own CPU against the recorded logits."""
    model_dir = Path(model_dir)
    out = Path(into) if into is not None else model_dir
    try:
        import torch

        from imgclf import artifacts, export, models

        art = artifacts.load_artifact(model_dir)
        pre = art.preprocess
        network = models.build_model(art.arch, len(art.labels))
        network.load_state_dict(art.state_dict)
        network = export.Normalized(network.eval(), pre.mean, pre.std).eval()
        graph = export.export_onnx(network, pre.image_size, dtype=torch.uint8)
        probe = probe_images(pre.image_size)
        with torch.inference_mode():
            reference = network(torch.from_numpy(probe)).float().numpy()
        checked = "on eager PyTorch's logits at every start"
        ort = _onnxruntime()
        if ort is not None:
            problem = parity_problem(reference, run_graph(ort, graph, probe, threads=0))
            if problem is not None:
                return f"ONNX Runtime does not agree with eager PyTorch: {problem}"
            checked += f"; against ONNX Runtime {ort.__version__} when made"
        record = graph_record(
            model_sha256=file_sha256(model_dir / MODEL_FILE),
            graph=graph,
            config=art.config,
            probe_logits=reference,
            checked=checked,
        )
    except Exception as exc:  # the artifact itself is written; a graph is an optimisation
        return reason(exc)
    from imgclf.artifacts import atomic_write_bytes

    # The record last: until it names this graph, a reader finds a stale pair and ignores it.
    atomic_write_bytes(out / GRAPH_FILE, lambda handle: handle.write(graph))
    atomic_write_bytes(
        out / GRAPH_RECORD_FILE, lambda handle: handle.write(json.dumps(record).encode())
    )
    return None


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def session_options(ort, threads: int):
    """ONNX Runtime options for a graph from a model folder: ONNX format only (no ORT-format
    model), `threads` intra-op threads (0: ORT's default), optimisations on, errors only."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; its warnings on node placement are noise
    options.add_session_config_entry("session.load_model_format", "ONNX")
    return options


def new_session(ort, graph: bytes, threads: int):
    """A CPU session over `graph` (bytes: no model path, and no custom-op library is ever
    registered; external data is refused before, by `external_data_problem`)."""
    return ort.InferenceSession(
        graph, session_options(ort, threads), providers=["CPUExecutionProvider"]
    )


def run_graph(ort, graph: bytes, images: np.ndarray, *, threads: int) -> np.ndarray:
    session = new_session(ort, graph, threads)
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def external_data_problem(graph: bytes) -> str | None:
    """Why `graph` may not be loaded: not an ONNX model, or a tensor stored outside it
    (ONNX Runtime would read it from wherever its path points)."""
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data

        model = onnx.load_model_from_string(graph)
    except Exception as exc:
        return f"{GRAPH_FILE} is not an ONNX model ({reason(exc)})"
    if any(uses_external_data(tensor) for tensor in _get_all_tensors(model)):
        return f"{GRAPH_FILE} stores tensors outside itself (external data is refused)"
    return None


def _read_bounded(path: Path, limit: int) -> bytes:
    """A regular file's bytes, never through a link, at most `limit`; ValueError otherwise."""
    import os
    import stat

    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{path.name} is {info.st_size} bytes, over the limit of {limit}")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is over the limit of {limit} bytes")
    return data


def graph_record_problem(model_dir: Path, config: dict[str, Any]) -> str | None:
    """Why the artifact's graph record does not name this model_config.json and model.pt (or
    is missing, a link, unreadable), else None: the part of `current_graph` that vouches for
    model.pt (serve's preflight; each worker checks the graph itself)."""
    model_dir = Path(model_dir)
    record = _record(model_dir, config)
    if isinstance(record, str):
        return record
    try:
        if record.get("model_sha256") != file_sha256(model_dir / MODEL_FILE):
            return f"the graph was made from another {MODEL_FILE}"
    except OSError as exc:
        return f"{MODEL_FILE} cannot be read ({reason(exc)})"
    return None


def _record(model_dir: Path, config: dict[str, Any]) -> dict[str, Any] | str:
    graph_path, record_path = model_dir / GRAPH_FILE, model_dir / GRAPH_RECORD_FILE
    if not graph_path.exists() and not record_path.exists():
        return "the artifact carries no ONNX graph"
    try:
        record = json.loads(_read_bounded(record_path, MAX_RECORD_BYTES))
    except (OSError, ValueError, TypeError) as exc:  # unreadable, a link, not JSON, too big
        return f"the graph cannot be read ({reason(exc)})"
    if not isinstance(record, dict) or record.get("format") != GRAPH_FORMAT:
        return f"{GRAPH_RECORD_FILE} is not a format {GRAPH_FORMAT} record"
    if {k: record.get(k) for k in description(config)} != description(config):
        return f"{GRAPH_RECORD_FILE} describes another model_config.json"
    return record


def current_graph(model_dir: Path, config: dict[str, Any]) -> tuple[bytes, np.ndarray] | str:
    """(model.onnx's bytes, the recorded probe logits) when the artifact's graph may be served
    for model.pt and `config` (model_config.json, checked), else why not, in a few words."""
    model_dir = Path(model_dir)
    record = _record(model_dir, config)
    if isinstance(record, str):
        return record
    try:
        if record.get("model_sha256") != file_sha256(model_dir / MODEL_FILE):
            return f"the graph was made from another {MODEL_FILE}"
        graph = _read_bounded(model_dir / GRAPH_FILE, MAX_GRAPH_BYTES)
        if record.get("graph_sha256") != hashlib.sha256(graph).hexdigest():
            return f"{GRAPH_FILE} is not the graph its record names"
        probe = record.get("probe") or {}
        logits = np.asarray(probe.get("logits"), dtype=np.float32)
        wanted = (PROBE_IMAGES, config["num_classes"])
        if (probe.get("seed"), logits.shape) != (PROBE_SEED, wanted) or not bool(
            np.isfinite(logits).all()
        ):
            return f"{GRAPH_RECORD_FILE}'s probe is not {wanted[0]} rows of finite logits"
    except (OSError, ValueError, TypeError) as exc:  # unreadable, a link, not numbers, too big
        return f"the graph cannot be read ({reason(exc)})"
    problem = external_data_problem(graph)
    return problem if problem is not None else (graph, logits)
