"""The endpoint's four functions, pure and testable alone: model_fn (artifact → model),
input_fn (request body → images), predict_fn (images → probabilities), output_fn
(probabilities → response body). Bad input raises RequestError (a 4xx with a hint)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from imgclf import artifacts, data, models
from imgclf.errors import UserError
from imgclf.serving import runtime

MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker's real-time request limit
MAX_PIXELS = 40_000_000  # per image; a larger one is refused before it is decoded
MAX_IMAGES = 64  # per JSON request
DEFAULT_TOPK = 5

IMAGE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/png",
        "application/x-image",
        "application/octet-stream",
        "image/webp",
        "image/bmp",
        "image/gif",
        "image/tiff",
    }
)
JSON_TYPE = "application/json"
ACCEPTED = frozenset({JSON_TYPE, "application/*", "*/*"})


class RequestError(Exception):
    """A client's mistake: answered with `status` and a JSON body {"error", "hint"}."""

    def __init__(self, status: int, error: str, hint: str) -> None:
        super().__init__(error)
        self.status, self.error, self.hint = status, error, hint

    def body(self) -> bytes:
        return json.dumps({"error": self.error, "hint": self.hint}).encode()


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module  # the eager network (what `forward` was built from and checked on)
    labels: list[str]
    preprocess: data.Preprocess
    transform: object
    device: torch.device
    forward: runtime.Forward  # batch → logits, on the runtime the deployment chose

    @property
    def num_classes(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Options:
    topk: int = DEFAULT_TOPK
    probabilities: bool = False  # the full vector, in label order


def model_fn(
    model_dir: str | Path,
    device: torch.device | None = None,
    *,
    cpu_runtime: str = runtime.AUTO,
) -> LoadedModel:
    """Load the artifact (weights_only), build the network it describes and ready it on the
    runtime `cpu_runtime` resolves to (see imgclf.serving.runtime; GPUs always run torch)."""
    art = artifacts.load_artifact(Path(model_dir))
    try:
        arch = art.config["arch"]
        pre = data.Preprocess.from_dict(art.config["preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"model artifact {model_dir}: model_config.json lacks {exc}") from None
    model = models.build_model(arch, len(art.labels))
    try:
        model.load_state_dict(art.state_dict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(
            f"model artifact {model_dir}: model.pt does not fit {arch} with "
            f"{len(art.labels)} classes ({first})"
        ) from None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    forward = runtime.build_forward(model, device, choice=cpu_runtime, image_size=pre.image_size)
    return LoadedModel(model, art.labels, pre, data.eval_transform(pre), device, forward)


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def decode_image(payload: bytes, *, draft: int | None, where: str = "body") -> Image.Image:
    """Bytes → RGB image, refusing oversized (decompression-bomb) and undecodable input."""
    if not payload:
        raise RequestError(
            400,
            f"empty image in the {where}",
            "send the image file's bytes, e.g. curl --data-binary @dog.jpg",
        )
    try:
        with Image.open(io.BytesIO(payload)) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(
            400,
            f"the {where} is not an image that can be read",
            "send JPEG, PNG, WebP, BMP, GIF or TIFF bytes",
        ) from None
    if width * height > MAX_PIXELS:
        raise RequestError(
            413,
            f"image in the {where} is {width}x{height} pixels, over the limit of {MAX_PIXELS}",
            "resize the image before sending it",
        )
    try:
        return data.open_image(io.BytesIO(payload), draft=draft)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise RequestError(
            400, f"the image in the {where} is truncated or corrupt", "send the complete image file"
        ) from None


def _json_images(body: bytes) -> list[bytes]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(
            400, "the body is not valid JSON", 'send {"instances": ["<base64 image>", ...]}'
        ) from None
    items = doc.get("instances", doc.get("images")) if isinstance(doc, dict) else doc
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise RequestError(
            400,
            "JSON body holds no list of base64 images",
            'send {"instances": ["<base64 image>", ...]}',
        )
    if len(items) > MAX_IMAGES:
        raise RequestError(
            413,
            f"{len(items)} images in one request, over {MAX_IMAGES}",
            "split the images over several requests",
        )
    out = []
    for index, item in enumerate(items):
        try:
            out.append(base64.b64decode(item.split(",", 1)[-1], validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(
                400,
                f"instances[{index}] is not valid base64",
                "base64-encode each image file's bytes",
            ) from None
    return out


def input_fn(
    body: bytes, content_type: str | None, *, draft: int | None = None
) -> list[Image.Image]:
    """Request body → RGB images. Raw image bytes or JSON {"instances": [base64, ...]}."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(
            413,
            f"request body of {len(body)} bytes is over the 6 MB limit",
            "send a smaller image (resize or recompress it)",
        )
    media = media_type(content_type)
    if media == JSON_TYPE:
        payloads = _json_images(body)
        return [
            decode_image(p, draft=draft, where=f"instances[{i}]") for i, p in enumerate(payloads)
        ]
    if media in IMAGE_TYPES or media == "":
        return [decode_image(body, draft=draft)]
    raise RequestError(
        415,
        f"content type {content_type!r} is not supported",
        "use image/jpeg, image/png, application/x-image, "
        "application/octet-stream or application/json (base64 images); "
        "application/x-npy is never accepted (no pickles)",
    )


def check_accept(accept: str | None) -> None:
    types = {media_type(part) for part in (accept or "").split(",")} - {""}
    if types and not types & ACCEPTED:
        raise RequestError(
            406, f"cannot answer in {accept!r}", "accept application/json (or leave Accept out)"
        )


def parse_options(custom_attributes: str | None, num_classes: int) -> Options:
    """`X-Amzn-SageMaker-Custom-Attributes: topk=3,probabilities=true`."""
    topk, full = DEFAULT_TOPK, False
    for part in (custom_attributes or "").replace(";", ",").split(","):
        key, _, value = part.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if key == "topk":
            if not value.isdigit() or int(value) < 1:
                raise RequestError(
                    400,
                    f"topk={value!r} is not a positive integer",
                    "send X-Amzn-SageMaker-Custom-Attributes: topk=5",
                )
            topk = int(value)
        elif key == "probabilities":
            full = value in ("true", "1", "yes", "all")
    return Options(min(topk, num_classes), full)


@torch.inference_mode()
def predict_fn(images: list[Image.Image], loaded: LoadedModel) -> torch.Tensor:
    """One forward pass over every image: softmax probabilities [N, classes], float32 on CPU."""
    batch = torch.stack([loaded.transform(image) for image in images])
    return torch.softmax(loaded.forward(batch), dim=1)


def prediction(probs: torch.Tensor, labels: list[str], options: Options) -> dict:
    values, indices = probs.topk(options.topk)
    out: dict = {
        "predictions": [
            {"label": labels[i], "index": int(i), "probability": round(float(p), 6)}
            for p, i in zip(values.tolist(), indices.tolist())
        ]
    }
    if options.probabilities:
        out["probabilities"] = [round(float(p), 6) for p in probs.tolist()]
        out["labels"] = labels
    return out


def output_fn(
    probs: torch.Tensor, labels: list[str], *, accept: str | None, options: Options, batch: bool
) -> tuple[bytes, str]:
    """Probabilities → JSON: one object for one image, a list for a JSON batch."""
    check_accept(accept)
    results = [prediction(row, labels, options) for row in probs]
    doc = results if batch else results[0]
    return json.dumps(doc).encode(), JSON_TYPE


def torch_threads(workers: int) -> int:
    """Split the CPUs between MMS workers so they do not oversubscribe the cores."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, workers))
