"""A real endpoint: a model trained here, served by multi-model-server through the launcher."""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.serving import inference
from imgclf.util import free_port
from tests.conftest import FAST_HPS, hp_args, launch_imports, run_launch
from tests.integration.serving_client import deploy, ping_status, post


@pytest.fixture(scope="module")
def model_dir(home, tiny_digits):
    proc = run_launch(
        "train",
        "--data",
        str(tiny_digits),
        "--job-name",
        "served",
        *hp_args({**FAST_HPS, "epochs": "1"}),
        home=home,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return home / "jobs" / "served" / "model"


@pytest.fixture(scope="module")
def endpoint(home, model_dir):
    yield deploy(home, model_dir, "ep")["url"]
    stop = run_launch("delete", "ep", home=home)
    assert stop.returncode == 0, stop.stderr
    assert "stopped" in stop.stdout


def _jpeg_of(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_answers_match_predict_fn(endpoint, model_dir, tiny_digits):
    loaded = inference.model_fn(model_dir, device=torch.device("cpu"))
    assert loaded.model is None  # training left its ONNX graph: served as it is, no export
    files = sorted((tiny_digits / "test").rglob("*.png"))[:3]
    payloads = [("image/png", f.read_bytes()) for f in files[:2]] + [
        ("image/jpeg", _jpeg_of(files[2]))
    ]
    for ctype, body in payloads:
        status, raw = post(endpoint, body, ctype)
        assert status == 200, raw
        answer = json.loads(raw)
        expected = inference.predict_fn(
            inference.input_fn(body, ctype, draft=loaded.preprocess.resize_size), loaded
        )[0]
        assert len(answer["predictions"]) == 5
        top = answer["predictions"][0]
        assert top["index"] == int(expected.argmax())
        assert top["probability"] == pytest.approx(float(expected.max()), abs=1e-4)
        assert top["label"] == loaded.labels[top["index"]]

    batch = json.dumps(
        {"instances": [base64.b64encode(f.read_bytes()).decode() for f in files]}
    ).encode()
    status, raw = post(
        endpoint,
        batch,
        "application/json",
        {"X-Amzn-SageMaker-Custom-Attributes": "topk=2,probabilities=true"},
    )
    assert status == 200, raw
    answers = json.loads(raw)
    assert len(answers) == 3
    for answer, f in zip(answers, files):
        assert len(answer["predictions"]) == 2
        full = np.array(answer["probabilities"])
        assert full.shape == (10,) and abs(full.sum() - 1) < 1e-3
        expected = inference.predict_fn(inference.input_fn(f.read_bytes(), "image/png"), loaded)
        assert int(full.argmax()) == int(expected.argmax())


def test_min_confidence_through_the_endpoint(endpoint, model_dir, tiny_digits):
    """The real serving stack: the model's thresholds, and each
    answer format saying "no confident label" for an image below its threshold."""
    config = json.loads((model_dir / "model_config.json").read_text())
    body = sorted((tiny_digits / "test").rglob("*.png"))[0].read_bytes()
    status, raw = post(endpoint, body, "image/png")
    top = json.loads(raw)["predictions"][0]
    assert "confident" not in json.loads(raw)  # nothing asked, nothing changed
    above, below = top["probability"] / 2, min(1.0, top["probability"] + 1e-3)
    for floor, sure in ((above, True), (below, False)):
        attrs = {"X-Amzn-SageMaker-Custom-Attributes": f"min_confidence={floor:.6f}"}
        status, raw = post(endpoint, body, "image/png", attrs)
        answer = json.loads(raw)
        assert status == 200 and answer["confident"] is sure
        assert answer["label"] == (top["label"] if sure else None)
        assert answer["predictions"][0] == top  # the top-k is still there
        vectors = {"X-Amzn-SageMaker-Custom-Attributes": f"min_confidence={floor:.6f}"}
        vectors["Accept"] = "application/jsonlines; format=vectors"
        status, raw = post(endpoint, body, "image/png", vectors)
        row = json.loads(raw.decode().splitlines()[0])
        assert len(row) == 11 and int(np.argmax(row)) == (top["index"] if sure else 10)
    auto = {"X-Amzn-SageMaker-Custom-Attributes": "min_confidence=auto,format=vectors"}
    status, raw = post(endpoint, body, "image/png", auto)
    sure = top["probability"] >= config["thresholds"][top["index"]]
    assert int(np.argmax(json.loads(raw)[0])) == (top["index"] if sure else 10)


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")
    return buf.getvalue()


BAD_REQUESTS = [
    ("empty body", b"", "image/jpeg", {}, 400),
    ("random bytes", os.urandom(2048), "application/octet-stream", {}, 400),
    ("truncated jpeg", None, "image/jpeg", {}, 400),
    ("decompression bomb", None, "image/png", {}, 413),
    ("over 6 MB", b"\xff" * (6 * 1024 * 1024 + 10), "image/jpeg", {}, 413),
    ("unknown content type", b"a,b", "text/csv", {}, 415),
    ("npy never unpickled", b"\x93NUMPY\x01\x00", "application/x-npy", {}, 415),
    ("unknown accept", None, "image/png", {"Accept": "text/csv"}, 406),
    ("malformed json", b'{"instances": [', "application/json", {}, 400),
    ("bad topk", None, "image/png", {"X-Amzn-SageMaker-Custom-Attributes": "topk=-1"}, 400),
]


def test_bad_requests_get_4xx_json_and_the_server_stays_healthy(endpoint, tiny_digits):
    good = sorted((tiny_digits / "test").rglob("*.png"))[0].read_bytes()
    jpeg = _jpeg_of(sorted((tiny_digits / "test").rglob("*.png"))[0])
    for name, body, ctype, headers, expected in BAD_REQUESTS:
        if body is None:
            body = {"truncated jpeg": jpeg[: len(jpeg) // 2], "decompression bomb": _bomb()}.get(
                name, good
            )
        status, raw = post(endpoint, body, ctype, headers)
        assert status == expected, (name, status, raw[:300])
        text = raw.decode(errors="replace")
        assert "Traceback" not in text and "/site-packages/" not in text, name
        doc = json.loads(raw)
        assert doc["error"] and doc["hint"], name
        assert ping_status(endpoint) == 200, name
    status, raw = post(endpoint, good, "image/png")
    assert status == 200 and json.loads(raw)["predictions"]


def test_management_api_is_not_on_the_inference_port(endpoint):
    url = f"{endpoint}/models?url=https://example.com/evil.mar&model_name=evil"
    request = urllib.request.Request(url, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code in (400, 404, 405)
    addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    port = int(endpoint.rsplit(":", 1)[1])
    for address in [a for a in addresses if ":" not in a][:1]:
        with pytest.raises(OSError):  # the local target binds 127.0.0.1 only
            urllib.request.urlopen(f"http://{address}:{port}/ping", timeout=3)


def test_concurrent_clients_and_ping_stays_fast(endpoint, tiny_digits):
    bodies = [f.read_bytes() for f in sorted((tiny_digits / "test").rglob("*.png"))[:8]]
    errors, ping_times = [], []
    done = threading.Event()

    def client(i):
        for _ in range(25):
            status, raw = post(endpoint, bodies[i], "image/png")
            if status != 200:
                errors.append((status, raw[:200]))

    def pinger():
        while not done.is_set():
            start = time.monotonic()
            ok = ping_status(endpoint, timeout=5) == 200
            ping_times.append((ok, time.monotonic() - start))
            time.sleep(0.1)

    watcher = threading.Thread(target=pinger)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert errors == []
    assert ping_times and all(ok for ok, _ in ping_times)
    assert max(seconds for _, seconds in ping_times) < 2.0


def test_launcher_lists_and_invokes_the_endpoint(endpoint, home, tiny_digits):
    # deploy returned on serve's own word: the state file it keeps says ready, with its pid
    record = json.loads((home / "endpoints" / "ep" / "endpoint.json").read_text())
    state = json.loads((home / "endpoints" / "ep" / "state.json").read_text())
    # ... and that it takes a new model on SIGHUP (`deploy` to its name: test_serving_swap.py)
    assert state == {"state": "ready", "reason": "", "pid": record["pid"], "swap_signal": "SIGHUP"}
    # The light verbs answer a live endpoint without importing torch.
    listed, imported = launch_imports("endpoints", home=home)
    assert "torch" not in imported, "launch.py endpoints imports torch"
    row = next(line for line in listed.stdout.splitlines() if line.startswith("ep "))
    assert row.split()[3] == "healthy", listed.stdout
    image = sorted((tiny_digits / "test" / "003.two").glob("*.png"))[0]
    proc, imported = launch_imports(
        "invoke", "--endpoint", "ep", "--topk", "2", str(image), home=home
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch" not in imported, "launch.py invoke imports torch"
    assert "(folder: two)" in proc.stdout and "probability" in proc.stdout

    # The same images one by one and as one JSON batch (one forward pass) print the same.
    images = [sorted((tiny_digits / "test" / c).glob("*.png"))[0] for c in ("003.two", "005.four")]
    single = run_launch("invoke", "--endpoint", "ep", *map(str, images), home=home)
    batch = run_launch("invoke", "--endpoint", "ep", "--batch", *map(str, images), home=home)
    assert single.returncode == 0 and batch.returncode == 0, single.stderr + batch.stderr
    assert batch.stdout == single.stdout
    assert single.stdout.count("(folder: ") == 2


def test_deploy_of_a_broken_model_names_serves_reason_and_leaves_nothing(tmp_path, model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "labels.json").unlink()
    home = tmp_path / "home"
    port = str(free_port())
    proc = run_launch("deploy", "--model", str(broken), "--name", "b", "--port", port, home=home)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # the reason serve recorded in its state file, in one line, not a log sentence to grep
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and "endpoint b did not start: cannot serve the model" in error[0]
    assert "labels.json" in error[0] and "Traceback" not in proc.stderr
    assert not (home / "endpoints" / "b").exists()
    assert "no local endpoints" in run_launch("endpoints", home=home).stdout


@pytest.mark.parametrize("damage", ["corrupt weights", "missing labels"])
def test_broken_artifact_fails_the_serve_entry(tmp_path, model_dir, damage):
    base = tmp_path / "ml"
    shutil.copytree(model_dir, base / "model")
    if damage == "corrupt weights":
        (base / "model" / "model.pt").write_bytes(b"\x00" * 100)
    else:
        (base / "model" / "labels.json").unlink()
    port = free_port()
    env = {
        **os.environ,
        "SAGEMAKER_BASE_DIR": str(base),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "IMGCLF_BIND_HOST": "127.0.0.1",
    }
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "serve")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "cannot serve the model" in proc.stdout
    assert ("model.pt" if damage == "corrupt weights" else "labels.json") in proc.stdout
    assert ping_status(f"http://127.0.0.1:{port}") == 0  # nothing listens
