"""What the runtime images hold, in the manner of AWS's DLC sanity tests: consistent packages,
no compilers, pip caches, .git, credentials or keys, and no build-time pip settings."""

from __future__ import annotations

import json

import pytest

from tests.docker.conftest import NOTES

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

KINDS = ("train", "serve")
WHY_ROOT = {
    "train": "SageMaker runs training containers as root; /opt/ml and its mounts belong to root",
    "serve": "SageMaker expects serving containers to run as root (AWS's custom inference "
    "code page) and unpacks model.tar.gz as root with the archive's modes",
}

# Run inside the image: prints one line per thing that should not be there.
SCAN = r"""
for tool in gcc cc c++ g++ clang make ld as; do
    command -v "$tool" >/dev/null 2>&1 && echo "compiler: $(command -v "$tool")"
done
for cache in /root/.cache/pip /tmp/pip-* /root/.cache/uv /tmp/build-pip /src; do
    [ -e "$cache" ] && echo "leftover: $cache"
done
find / -xdev \( -name .git -o -name .netrc -o -name .pypirc -o -name pip.conf \
    -o -name 'id_rsa*' -o -name 'id_ed25519*' -o -name '*.key' -o -path '*/.aws/*' \
    -o -path '*/.docker/config.json' \) -print 2>/dev/null | sed 's/^/secret-like file: /'
grep -rlE -- '-----BEGIN ([A-Z]+ )?PRIVATE KEY-----' /etc /root /home /opt/ml /tmp 2>/dev/null \
    | sed 's/^/private key: /'
env | grep -E '^(PIP_|AWS_)' | sed 's/^/environment: /'
true
"""


def _config(engine, image: str) -> dict:
    return json.loads(engine.docker("image", "inspect", image).stdout)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_pip_check_passes_inside_the_image(engine, images, kind):
    image = getattr(images, kind)
    proc = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "pip", image, "check", check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_no_compilers_caches_git_credentials_or_build_settings(engine, images, kind):
    image = getattr(images, kind)
    proc = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", SCAN
    )
    assert proc.stdout.strip() == "", proc.stdout
    config = _config(engine, image)["Config"]
    assert not [e for e in config["Env"] if e.startswith(("PIP_", "AWS_"))]
    history = engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "PIP_CERT" not in history and "build-pip" not in history


@pytest.mark.parametrize("kind", KINDS)
def test_the_image_runs_as_root_as_sagemaker_expects_and_says_what_it_carries(engine, images, kind):
    image = getattr(images, kind)
    info = _config(engine, image)
    user = info["Config"]["User"] or "root"
    assert user == "root"
    assert info["Config"]["Entrypoint"] == [kind]
    env = dict(e.split("=", 1) for e in info["Config"]["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "compute" in env["NVIDIA_DRIVER_CAPABILITIES"]
    line = f"{image}: {info['Size'] / 1e9:.2f} GB, runs as {user}: {WHY_ROOT[kind]}"
    if kind == "train":
        carried = engine.docker(
            "run", "--rm", "--network", "none", "--entrypoint", "cat", image,
            "/opt/torch/pretrained.txt",
        ).stdout.split()  # fmt: skip
        line += f"; ImageNet weights for: {', '.join(carried) or 'none (offline build)'}"
    NOTES.append(line)
    print(line)
