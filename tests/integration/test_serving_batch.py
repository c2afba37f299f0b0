"""The serving entry as a SageMaker batch transform runs it (SAGEMAKER_BATCH=true): its
execution parameters, a payload over the real-time 6 MB limit, JSON Lines, and a bad image
answered with a placeholder instead of failing the job."""

import io
import json
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.conftest import jpeg_bytes, random_model, run_launch
from tests.integration.serving_client import deploy, post

LABELS = [f"{i:03d}.class{i}" for i in range(4)]
BATCH_ENV = {
    "SAGEMAKER_BATCH": "true",
    "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20",
    "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
}


@pytest.fixture(scope="module")
def endpoint(home, tmp_path_factory):
    model = random_model(tmp_path_factory.mktemp("batch") / "model", LABELS)
    ep = deploy(home, model, "batch", env=BATCH_ENV)
    yield ep
    stop = run_launch("delete", "batch", home=home)
    assert stop.returncode == 0, stop.stdout + stop.stderr


def _big_png() -> bytes:
    """Noise does not compress: a 2000x1500 PNG of about 9 MB (3 Mpx, within the pixel
    budget)."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_execution_parameters_say_what_the_container_takes(endpoint):
    with urllib.request.urlopen(f"{endpoint['url']}/execution-parameters", timeout=10) as r:
        doc = json.loads(r.read())
    assert doc == {
        "MaxConcurrentTransforms": 5,  # 1 worker x batch 8, capped: 5 x 20 MB is SageMaker's 100
        "BatchStrategy": "SINGLE_RECORD",
        "MaxPayloadInMB": 20,
    }


def test_a_payload_over_6_mb_is_classified_in_batch_mode(endpoint):
    big = _big_png()
    assert 6 * 1024 * 1024 < len(big) < 20 * 1024 * 1024
    status, raw = post(endpoint["url"], big, "image/png", {"Accept": "application/jsonlines"})
    assert status == 200, raw[:300]
    lines = raw.decode().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["predictions"][0]["label"]


def test_a_bad_image_gets_a_placeholder_and_the_next_is_answered(endpoint):
    status, raw = post(endpoint["url"], b"\xff\xd8\xff broken", "application/x-image")
    doc = json.loads(raw)
    assert status == 200 and doc["predictions"] == [] and doc["status"] == 400, doc
    assert doc["error"] and doc["message"]
    status, raw = post(endpoint["url"], jpeg_bytes(), "application/x-image")
    assert status == 200 and json.loads(raw)["predictions"]
