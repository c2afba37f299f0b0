"""What a model folder and a client can reach in a real endpoint (MMS, our handler, the
launcher): nothing in the model folder runs, MMS's APIs are not reachable by another process,
curl's default content type and the aliases are served, and boto3 shows our error's reason."""

import json
import os
import socket
import subprocess

import botocore.exceptions
import psutil
import pytest

from imgclf.processes import group_members
from tests.conftest import jpeg_bytes, random_model, run_launch
from tests.integration.serving_client import deploy, post, runtime_client

LABELS = [f"{i:03d}.class{i}" for i in range(3)]


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    return tmp_path_factory.mktemp("trace") / "ran"


@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory, marker):
    """A real artifact, plus what would run code if MMS used the folder as it is: a package
    named like ours, a sitecustomize, and a MAR-INF manifest naming a handler in the folder."""
    model = random_model(tmp_path_factory.mktemp("hostile") / "model", LABELS)
    code = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (model / "imgclf").mkdir()
    (model / "imgclf" / "__init__.py").write_text(code)
    (model / "sitecustomize.py").write_text(code)
    (model / "evil_handler.py").write_text(code + "def handle(data, context):\n    return data\n")
    (model / "MAR-INF").mkdir()
    (model / "MAR-INF" / "MANIFEST.json").write_text(
        json.dumps(
            {
                "runtime": "python",
                "model": {"modelName": "model", "handler": "evil_handler:handle"},
                "modelServerVersion": "1.0",
                "implementationVersion": "1.0",
                "specificationVersion": "1.0",
            }
        )
    )
    return model


@pytest.fixture(scope="module")
def endpoint(home, hostile_model):
    ep = deploy(home, hostile_model, "isolated")
    yield ep
    stop = run_launch("delete", "isolated", home=home)
    assert stop.returncode == 0, stop.stdout + stop.stderr


def test_nothing_in_the_model_folder_runs(endpoint, marker):
    status, raw = post(endpoint["url"], jpeg_bytes(), "image/jpeg")
    assert status == 200 and json.loads(raw)["predictions"], raw
    assert not marker.exists(), marker.read_text()


def _tcp_listeners(pgid: int) -> set[int]:
    ports = set()
    for pid in group_members(pgid):
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        ports |= {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    return ports


def test_mms_is_reachable_by_the_endpoints_own_processes_only(endpoint):
    """No TCP port but the public one: MMS's management and inference APIs are Unix sockets in
    a folder only serve's user can enter (another local user or a container on --network host
    cannot load a model from a URL or stop the workers)."""
    assert _tcp_listeners(endpoint["pid"]) == {endpoint["port"]}
    sockets = [
        f"/proc/{pid}/cwd"
        for pid in group_members(endpoint["pid"])
        if "com.amazonaws.ml.mms.ModelServer" in " ".join(psutil.Process(pid).cmdline())
    ]
    assert sockets, "no MMS process found"
    run_dir = os.path.realpath(sockets[0])
    management = os.path.join(run_dir, "management.sock")
    assert os.path.exists(management)
    # serve's own folder: mode 0700 all the way to the sockets.
    assert os.stat(os.path.dirname(run_dir)).st_mode & 0o077 == 0
    # Another user's process: a Python any user may run (the venv's may sit under /root).
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.access(python, os.X_OK):
        return  # becoming a second user needs root
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({management!r})\n"
        "except PermissionError:\n"
        "    sys.exit(3)\n"
        "sys.exit(0)\n"
    )
    other_user = subprocess.run(
        [python, "-I", "-c", probe],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        timeout=30,
        cwd="/",
    )
    assert other_user.returncode == 3, other_user.stderr
    # serve itself can (the same call works for the endpoint's own user).
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(management)


def test_curls_default_type_and_the_aliases_are_served(endpoint):
    image = jpeg_bytes(seed=5)
    answers = [
        post(endpoint["url"], image, content_type)
        for content_type in (
            "application/x-www-form-urlencoded",
            "image/jpg",
            "binary/octet-stream",
        )
    ]
    labels = [json.loads(raw)["predictions"][0]["label"] for status, raw in answers]
    assert [status for status, _ in answers] == [200, 200, 200], answers
    assert len(set(labels)) == 1
    status, raw = post(endpoint["url"], b"name=dog", "application/x-www-form-urlencoded")
    assert status == 415 and "-H 'Content-Type: image/jpeg'" in json.loads(raw)["hint"]


def test_boto3_shows_the_endpoints_reason(endpoint):
    runtime = runtime_client(endpoint["url"])
    with pytest.raises(botocore.exceptions.ClientError) as err:
        runtime.invoke_endpoint(EndpointName="isolated", ContentType="image/png", Body=b"not png")
    text = str(err.value)
    assert "not an image that can be read" in text and "send JPEG" in text, text
