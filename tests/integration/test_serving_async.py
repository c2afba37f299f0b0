"""The serving entry as an asynchronous endpoint's container (IMGCLF_ASYNC=true, which
`deploy --async-output` writes into the model): bodies over the real-time 6 MB limit up to its
own, every other guard as on a real-time endpoint (a bad image is a 4xx: SageMaker writes it to
the failure path)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import random_model, run_launch
from tests.integration.serving_client import deploy, post

LABELS = [f"{i:03d}.class{i}" for i in range(4)]
# 20 MB instead of the 1 GB default: the test machine's memory, the same code path.
ASYNC_ENV = {"IMGCLF_ASYNC": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20"}


@pytest.fixture(scope="module")
def endpoint(home, tmp_path_factory):
    model = random_model(tmp_path_factory.mktemp("async") / "model", LABELS)
    ep = deploy(home, model, "async", env=ASYNC_ENV)
    yield ep
    stop = run_launch("delete", "async", home=home)
    assert stop.returncode == 0, stop.stdout + stop.stderr


def _big_png() -> bytes:
    """Noise does not compress: a 2000x1500 PNG of about 9 MB (3 Mpx, within the pixel budget)."""
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_photo_over_6_mb_is_classified_and_the_guards_still_hold(endpoint):
    big = _big_png()
    assert 6 * 1024 * 1024 < len(big) < 20 * 1024 * 1024
    status, raw = post(endpoint["url"], big, "image/png")
    assert status == 200, raw[:300]
    assert json.loads(raw)["predictions"][0]["label"] in [name[4:] for name in LABELS]
    # A bad image is a 4xx as on a real-time endpoint (no batch placeholder).
    status, raw = post(endpoint["url"], b"\xff\xd8\xff broken", "image/jpeg")
    assert status == 400 and json.loads(raw)["error"]
    # Over the endpoint's own limit: a 413 that names it.
    status, raw = post(endpoint["url"], b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024), "image/png")
    assert status == 413 and "20 MB" in json.loads(raw)["error"], raw[:300]
