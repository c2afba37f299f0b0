"""Shared fixtures: real data (scikit-learn digits, generated odd images) and job helpers."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.sample import write_digits

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(ROOT / "launch.py")]

# Small, fast settings for CPU tests; each test adds what it needs.
FAST_HPS = {
    "arch": "resnet18",
    "pretrained": "false",
    "image_size": "32",
    "batch_size": "64",
    "lr": "0.003",
    "hflip": "false",
    "min_crop_scale": "0.6",
}


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits(root)
    return root


@pytest.fixture(scope="session")
def tiny_digits(digits_dir, tmp_path_factory) -> Path:
    """A few digits per class and split: for tests of the mechanics, not of accuracy."""
    root = tmp_path_factory.mktemp("tiny_digits")
    per_split = {"train": 12, "valid": 4, "test": 4}
    for split, n in per_split.items():
        for cls in sorted((digits_dir / split).iterdir()):
            out = root / split / cls.name
            out.mkdir(parents=True)
            for image in sorted(cls.iterdir())[:n]:
                shutil.copy(image, out / image.name)
    return root


def random_model(path: Path, classes: list[str], *, image_size: int = 32) -> Path:
    """A real artifact of a randomly initialised ResNet-18 over `classes` (folder names such as
    "001.cat"; the labels are what follows the dot): the answers need not be right, only made
    the way a trained model's are."""
    import torch

    from imgclf import artifacts, models

    torch.manual_seed(0)
    artifacts.save_artifact(
        path,
        state_dict=models.build_model("resnet18", len(classes)).state_dict(),
        labels=[name.split(".", 1)[1] for name in classes],
        config={
            "arch": "resnet18",
            "classes": list(classes),
            "preprocess": models.get_architecture("resnet18").preprocess(image_size).to_dict(),
        },
    )
    return path


def png_bytes(size=(40, 30), color=(200, 10, 10), mode="RGB") -> bytes:
    """A flat-coloured PNG (`mode` other than RGB: black)."""
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed=0, size=(64, 48)) -> bytes:
    """A JPEG (quality 90) of seeded noise."""
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return _jpeg_bytes(Image.fromarray(arr), quality=90)


def _jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def write_odd_images(folder: Path, rng: np.random.Generator) -> dict[str, str]:
    """Every image mode a user's folder may hold, plus files that are not usable images.
    Returns {file name: 'ok' | 'bad' | 'ignored'}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8), "RGB")
    made: dict[str, str] = {}

    rgb.convert("L").save(folder / "gray.png")
    made["gray.png"] = "ok"
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    made["cmyk.jpg"] = "ok"
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    made["rgba.png"] = "ok"
    rgb.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.gif")
    made["palette.gif"] = "ok"
    sixteen = (rng.integers(0, 65535, (40, 30))).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "deep16.png")
    made["deep16.png"] = "ok"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    rgb.save(folder / "rotated.jpg", exif=exif)
    made["rotated.jpg"] = "ok"
    rgb.save(folder / "plain.jpg")
    made["plain.jpg"] = "ok"

    data = _jpeg_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    made["truncated.jpg"] = "bad"
    (folder / "empty.jpg").write_bytes(b"")
    made["empty.jpg"] = "bad"
    (folder / "text.jpg").write_text("this is not an image\n")
    made["text.jpg"] = "bad"
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    made[".DS_Store"] = "ignored"
    return made


@pytest.fixture
def odd_dataset(tmp_path) -> tuple[Path, set[str]]:
    """Two classes per split; train/001.cats holds every odd image. Returns the root and the
    split-relative paths of the files training must skip."""
    rng = np.random.default_rng(0)
    root = tmp_path / "odd"
    bad: set[str] = set()
    for split in ("train", "valid", "test"):
        for cls in ("001.cats", "002.dogs"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(6):
                arr = rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)
                arr[..., 0 if cls == "001.cats" else 2] = 255  # learnable: red vs blue
                Image.fromarray(arr).save(folder / f"{i}.png")
    made = write_odd_images(root / "train" / "001.cats", rng)
    bad = {f"train/001.cats/{name}" for name, kind in made.items() if kind == "bad"}
    (root / ".DS_Store").write_bytes(b"\x00")  # macOS leaves these at every level
    return root, bad


def make_sagemaker_job(
    base: Path,
    *,
    hyperparameters: dict[str, str],
    channels: dict[str, Path],
    json_encode: bool = True,
) -> Path:
    """A job dir made the way SageMaker makes /opt/ml: string hyperparameters (JSON-encoded as
    the Python SDK sends them), resourceconfig, inputdataconfig and channel folders."""
    config = base / "input" / "config"
    config.mkdir(parents=True)
    hps = {k: (json.dumps(v) if json_encode else v) for k, v in hyperparameters.items()}
    hps.update(
        {"sagemaker_job_name": json.dumps("test-job"), "sagemaker_region": json.dumps("us-east-1")}
    )
    (config / "hyperparameters.json").write_text(json.dumps(hps))
    (config / "resourceconfig.json").write_text(
        json.dumps(
            {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}
        )
    )
    (config / "inputdataconfig.json").write_text(
        json.dumps({name: {"TrainingInputMode": "File"} for name in channels})
    )
    for name, source in channels.items():
        shutil.copytree(source, base / "input" / "data" / name)
    for folder in ("model", "output/data", "checkpoints"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    return base


def dockerfile_runtime(kind: str) -> tuple[dict[str, str], list[str]]:
    """The final stage's ENV (values without $-references) and exec-form ENTRYPOINT of
    docker/<kind>/Dockerfile, so the entry tests run what the image runs."""
    import shlex

    text = (ROOT / "docker" / kind / "Dockerfile").read_text()
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    stage = [
        line
        for i, line in enumerate(lines)
        if i >= max(j for j, x in enumerate(lines) if x.upper().startswith("FROM "))
    ]
    env: dict[str, str] = {}
    entry: list[str] = []
    for line in stage:
        word, _, rest = line.partition(" ")
        if word.upper() == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                if "$" not in value:
                    env[key] = value
        elif word.upper() == "ENTRYPOINT":
            entry = json.loads(rest)
    return env, entry


def train_entry_env(base: Path) -> dict[str, str]:
    """The training image's environment (read from its Dockerfile), over `base` instead of
    /opt/ml."""
    image_env, _ = dockerfile_runtime("train")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SM_"))}
    env.update({k: v for k, v in image_env.items() if k.startswith("SAGEMAKER_")})
    env.update(
        {
            "SAGEMAKER_BASE_DIR": str(base),
            "SM_STUDIO_LOCAL_MODE": "true",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


def run_train_entry(base: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The image's ENTRYPOINT (sagemaker-training's `train`) with the argument SageMaker adds."""
    _, entry = dockerfile_runtime("train")
    return subprocess.run(
        [str(Path(sys.executable).parent / entry[0]), *entry[1:], "train"],
        env=train_entry_env(base),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def sleeper():
    """A live process that is not an endpoint: leader of its own process group, as serve is."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def run_launch(
    *args: str, home: Path, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "IMGCLF_HOME": str(home)}
    return subprocess.run(
        [*LAUNCH, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def imported_by(*argv: str, env: dict[str, str] | None = None, timeout: float = 300):
    """`python -X importtime ARGV` in a fresh interpreter: (the finished process, the names of
    every module it imported, dotted names included)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    return proc, imported


def launch_imports(*args: str, home: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`launch.py ARGS` run as run_launch runs it, with the modules it imported (imported_by)."""
    return imported_by(str(ROOT / "launch.py"), *args, env={**os.environ, "IMGCLF_HOME": str(home)})


def finished_study(out: Path) -> Path:
    """A tuning dir as the local tuner leaves it: space.json and a SQLite study of two trials."""
    import optuna

    from imgclf.tuning.study import STUDY_NAME, default_storage, study_storage

    out.mkdir(parents=True)
    (out / "space.json").write_text(json.dumps({"metric": "valid_loss", "direction": "minimize"}))
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=study_storage(default_storage(out)), direction="minimize"
    )
    lr = optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)
    for value, rate in ((0.4, 0.01), (0.3, 0.003)):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": rate},
                distributions={"lr": lr},
                value=value,
                intermediate_values={1: value + 0.1, 2: value},
            )
        )
    return out


def hp_args(hps: dict[str, str]) -> list[str]:
    return ["--hp", *(f"{k}={v}" for k, v in hps.items())]


# ---------------------------------------------------------------- AWS: moto's server


class MotoServer:
    """moto's server on 127.0.0.1, recording every request that reaches it."""

    def __init__(self, url: str, recording: Path) -> None:
        self.url, self.recording = url, recording

    def env(self) -> dict[str, str]:
        """The environment a user's shell would have, pointed at this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            {
                "AWS_ENDPOINT_URL": self.url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "IMGCLF_POLL_SECONDS": "0.05",
            }
        )
        return env

    def client(self, service: str):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def post(self, path: str, payload: dict | None = None) -> None:
        import urllib.request

        data = json.dumps(payload or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        request.add_header("Content-Type", "application/json")
        urllib.request.urlopen(request, timeout=10).read()  # noqa: S310 - our local server

    def reset(self) -> None:
        self.post("/moto-api/reset")
        self.recording.write_text("")

    def requests(self, target: str | None = None) -> list[dict]:
        """Recorded requests; `target` filters JSON-protocol calls by their X-Amz-Target
        (e.g. 'SageMaker.CreateTrainingJob') and decodes their bodies."""
        import base64

        out = []
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            headers = {k.lower(): v for k, v in entry["headers"].items()}
            if target is not None and not headers.get("x-amz-target", "").endswith(target):
                continue
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body)
            entry["body"] = body
            if target is not None:
                entry["json"] = json.loads(body)
            out.append(entry)
        return out


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    import socket
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("moto")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recording = root / "recording.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording)})
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=(root / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).read()  # noqa: S310
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "server.log").read_text()) from None
            time.sleep(0.2)
    yield MotoServer(url, recording)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def aws(moto_server):
    moto_server.reset()
    return moto_server
