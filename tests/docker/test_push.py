"""build_and_push.sh's push path: the ECR API answered by moto's server and a registry on
127.0.0.1 (Debian's docker-registry) standing in for ECR's (IMGCLF_REGISTRY)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgclf.util import free_port
from tests.conftest import ROOT
from tests.integration.serving_client import http

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]


@pytest.fixture
def registry(tmp_path):
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("Debian's docker-registry is not installed (make engine installs it)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        [binary, "serve", str(config)],
        stdout=(tmp_path / "registry.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while http(url + "/v2/", timeout=2)[0] != 200:
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp_path / "registry.log"
        ).read_text()
        time.sleep(0.2)
    yield f"127.0.0.1:{port}", url
    proc.terminate()
    proc.wait(timeout=30)


def test_push_creates_the_repository_logs_in_and_pushes_both_tags(
    engine, images, aws, registry, tmp_path
):
    address, url = registry
    tag = images.serve.rsplit(":", 1)[1]
    env = engine.env(aws.env())
    env.update(
        {
            "IMGCLF_REGISTRY": address,
            "IMGCLF_ECR_PREFIX": "imgclf-test",
            "IMGCLF_HOME": str(tmp_path / "home"),
            "DOCKER_CONFIG": str(tmp_path / "docker-config"),  # docker login writes here
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
    )
    pushed = [f"{address}/imgclf-test-serve:{t}" for t in (tag, "latest")]
    engine.made_images.extend(pushed)
    proc = subprocess.run(
        [str(ROOT / "build_and_push.sh"), "serve", "--tag", tag],
        env=env,
        capture_output=True,
        text=True,
        timeout=2000,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [f"serve={pushed[0]}"]
    assert "creating ECR repository imgclf-test-serve" in proc.stderr
    repos = aws.client("ecr").describe_repositories()["repositories"]
    assert [r["repositoryName"] for r in repos] == ["imgclf-test-serve"]
    assert repos[0]["imageScanningConfiguration"] == {"scanOnPush": True}
    status, raw = http(url + "/v2/imgclf-test-serve/tags/list")
    assert status == 200 and sorted(json.loads(raw)["tags"]) == sorted([tag, "latest"])
    remembered = json.loads((tmp_path / "home" / "images.json").read_text())
    assert remembered == {"serve": pushed[0]}
    assert len(aws.requests("GetAuthorizationToken")) == 1  # one login for the run
