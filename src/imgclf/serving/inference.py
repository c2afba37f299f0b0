"""The endpoint's four functions, pure and testable alone: model_fn (artifact → model),
input_fn (request body → images), predict_fn (images → probabilities), output_fn
(probabilities → response body). Bad input raises RequestError (a 4xx with a hint).
Crops, logits and probabilities are NumPy arrays: a worker serving the artifact's ONNX graph
imports no torch (1.8 s of its start on 2 CPUs); torch is imported where a network is built.

Work per request is bounded before anything is decoded: the pixels every image will decode to
(after the JPEG draft) and the pixels the eval transform's resize will produce are counted from
the image headers, per image and summed over a JSON batch."""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from imgclf import artifacts
from imgclf.data.decode import PIXEL_WEIGHT, open_image
from imgclf.data.transforms import Preprocess, eval_crop
from imgclf.errors import UserError
from imgclf.serving import runtime
from imgclf.serving.protocol import (
    AUTO_CONFIDENCE,
    DEFAULT_FORMAT,
    DEFAULT_TOPK,
    JSON_HINT,
    JSON_TYPE,
    JSONLINES_TYPE,
    MAX_BODY_BYTES,
    MAX_IMAGES,
    MAX_PIXELS,
    MAX_RESIZE_FACTOR_IMAGE,
    MAX_RESIZE_FACTOR_REQUEST,
    RequestError,
    answer_format,
    answer_type,
    check_accept,
    min_confidence,
    request_type,
    shown,
)
from imgclf.util import cpu_count, parse_bool

if TYPE_CHECKING:
    import torch

log = logging.getLogger("imgclf.serving")


@dataclass(frozen=True)
class LoadedModel:
    # the eager network (what `forward` was built from and checked on); None when `forward` is
    # the artifact's own ONNX graph (checked against the eager logits its record holds)
    model: torch.nn.Module | None
    labels: list[str]
    preprocess: Preprocess
    transform: object  # image → uint8 CHW array (training's eval transform, before Normalize)
    device: torch.device | str  # "cpu" where no torch was needed
    forward: runtime.Forward  # uint8 batch → logits (normalises inside), on the chosen runtime
    temperature: float = 1.0  # the logits are divided by it (fitted on the validation split)
    thresholds: tuple[float, ...] | None = None  # each class's min_confidence=auto threshold

    @property
    def num_classes(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Options:
    topk: int = DEFAULT_TOPK
    probabilities: bool = False  # the full vector, in label order
    format: str = DEFAULT_FORMAT  # one of FORMATS
    # None: every image gets its best label; a probability, or AUTO_CONFIDENCE (each class's
    # own threshold): below it, the answer says there is no confident label
    min_confidence: float | str | None = None


def model_fn(
    model_dir: str | Path,
    device: torch.device | str | None = None,
    *,
    cpu_runtime: str = runtime.AUTO,
    threads: int | None = None,
) -> LoadedModel:
    """Load the artifact and ready its network on the runtime `cpu_runtime` resolves to (see
    imgclf.serving.runtime; GPUs always run torch). On ONNX Runtime, the artifact's own graph
    when it is current (no network is built, nothing exported: imgclf.graph); otherwise the
    weights (weights_only) are built into the network it describes and exported here.
    `device`: None for the GPU when there is one; "cpu" decides without importing torch.
    `threads`: the runtime's threads (torch's and ONNX Runtime's; None: torch's default)."""
    model_dir = Path(model_dir)
    config, labels = artifacts.read_description(model_dir)  # checked before anything is built
    pre = Preprocess.from_dict(config["preprocess"])
    if device is None:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transform = eval_crop(pre)
    thresholds = config.get("thresholds")
    thresholds = tuple(float(t) for t in thresholds) if thresholds is not None else None
    temperature = float(config.get("temperature", 1.0))
    chosen = runtime.resolve(
        cpu_runtime, device, onnxruntime_available=runtime.onnxruntime_installed()
    )
    if chosen == runtime.ONNXRUNTIME:
        forward, why = runtime.prebuilt_forward(model_dir, config, threads=threads or cpu_count())
        if forward is not None:
            log.info("serving the artifact's own ONNX graph")
            return LoadedModel(
                None, labels, pre, transform, device, forward, temperature, thresholds
            )
        log.info("exporting the network to ONNX here: %s", why)
    return _eager(model_dir, device, cpu_runtime, transform, threads)


def _eager(model_dir: Path, device, cpu_runtime: str, transform, threads) -> LoadedModel:
    """The network built from model.pt, on `device`, on the runtime `cpu_runtime` resolves to
    (an ONNX graph exported from it, checked against it)."""
    import torch

    from imgclf import models  # torchvision: only where a network is built

    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    art = artifacts.load_artifact(model_dir)
    arch, pre = art.arch, art.preprocess
    model = models.build_model(arch, len(art.labels))
    try:
        model.load_state_dict(art.state_dict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(
            f"model artifact {model_dir}: model.pt does not fit {arch} with "
            f"{len(art.labels)} classes ({first})"
        ) from None
    model = model.to(device).eval()
    forward = runtime.build_forward(
        model,
        device,
        choice=cpu_runtime,
        image_size=pre.image_size,
        threads=threads,
        normalize=(pre.mean, pre.std),
    )
    thresholds = tuple(art.thresholds) if art.thresholds is not None else None
    return LoadedModel(
        model, art.labels, pre, transform, device, forward, art.temperature, thresholds
    )


@dataclass(frozen=True)
class ImageSize:
    """What one image will cost: its decoded size (after the JPEG draft) and the size the eval
    transform's resize will make of it."""

    width: int
    height: int
    resized_pixels: int
    weight: int = 1  # PIXEL_WEIGHT of its mode: what a pixel costs to decode to RGB

    @property
    def pixels(self) -> int:
        """Decoded pixels, weighted by what their mode costs (PIXEL_WEIGHT)."""
        return self.width * self.height * self.weight


def resized_pixels(width: int, height: int, resize: int | None) -> int:
    """Pixels torchvision's Resize(resize) (short side to `resize`) produces from w x h."""
    if not resize:
        return width * height
    short, long = min(width, height), max(width, height)
    return resize * int(resize * long / max(short, 1))


def probe_image(payload: bytes, *, draft: int | None, where: str = "body") -> ImageSize:
    """Read only the header: the size the image will decode to and resize to."""
    if not payload:
        raise RequestError(
            400,
            f"empty image in the {where}",
            "send the image file's bytes, e.g. curl --data-binary @dog.jpg",
        )
    try:
        with Image.open(io.BytesIO(payload)) as probe:
            if draft and probe.format == "JPEG":
                probe.draft(probe.mode, (draft, draft))
            (width, height), mode = probe.size, probe.mode
    except Image.DecompressionBombError:
        raise _too_many_pixels(where, "an image") from None
    except Exception:  # any decoder's failure on a client's bytes is the client's bad image
        raise RequestError(
            400,
            f"the {where} is not an image that can be read",
            "send JPEG, PNG, WebP, BMP, GIF or TIFF bytes",
        ) from None
    if width < 1 or height < 1:
        raise RequestError(400, f"the image in the {where} has no pixels", "send a real image")
    weight = PIXEL_WEIGHT.get(mode, 1)
    size = ImageSize(width, height, resized_pixels(width, height, draft), weight)
    if size.pixels > MAX_PIXELS:
        shown = f"{mode} image of {width}x{height} pixels"
        if weight > 1:
            shown += f" (its mode counts {weight}x)"
        raise _too_many_pixels(where, shown)
    if draft and size.resized_pixels > MAX_RESIZE_FACTOR_IMAGE * draft * draft:
        raise RequestError(
            413,
            f"image in the {where} is {width}x{height} pixels: its short side resized to "
            f"{draft} px would make {size.resized_pixels} pixels, over the limit of "
            f"{MAX_RESIZE_FACTOR_IMAGE * draft * draft} (aspect ratio over "
            f"{MAX_RESIZE_FACTOR_IMAGE}:1)",
            "crop the image to a less elongated shape before sending it",
        )
    return size


def _too_many_pixels(where: str, what: str) -> RequestError:
    return RequestError(
        413,
        f"{what} in the {where}: over the limit of {MAX_PIXELS} decoded pixels per request",
        "resize the image before sending it (or send fewer images per request)",
    )


def check_request_work(sizes: list[ImageSize], *, draft: int | None) -> None:
    """The whole request's work: decoded and resized pixels summed over its images."""
    total = sum(s.pixels for s in sizes)
    if total > MAX_PIXELS:
        raise RequestError(
            413,
            f"the {len(sizes)} images decode to {total} pixels together (16-bit and alpha "
            f"modes count more), over the limit of {MAX_PIXELS} per request",
            "send fewer or smaller images per request",
        )
    if draft:
        resized = sum(s.resized_pixels for s in sizes)
        limit = MAX_RESIZE_FACTOR_REQUEST * draft * draft
        if resized > limit:
            raise RequestError(
                413,
                f"the {len(sizes)} images resize to {resized} pixels together, over the limit "
                f"of {limit} per request",
                "send fewer or less elongated images per request",
            )


def decode_image(payload: bytes, *, draft: int | None, where: str = "body") -> Image.Image:
    """Bytes → RGB image, refusing oversized (decompression-bomb) and undecodable input."""
    probe_image(payload, draft=draft, where=where)
    return _decode(payload, draft=draft, where=where)


def _decode(payload: bytes, *, draft: int | None, where: str) -> Image.Image:
    try:
        return open_image(io.BytesIO(payload), draft=draft)
    except MemoryError:
        raise
    except Exception as exc:  # truncated, corrupt, or a decoder's own failure: the bytes' fault
        log.info("image in the %s not decoded: %s", where, type(exc).__name__)
        raise RequestError(
            400, f"the image in the {where} is truncated or corrupt", "send the complete image file"
        ) from None


def _json_images(body: bytes) -> list[bytes]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the body is not valid JSON", JSON_HINT) from None
    except RecursionError:
        raise RequestError(400, "the JSON body is nested too deeply", JSON_HINT) from None
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
        try:  # a data: URL's "data:image/png;base64," prefix is dropped
            out.append(base64.b64decode(item.split(",", 1)[-1], validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(
                400,
                f"instances[{index}] is not valid base64",
                "base64-encode each image file's bytes",
            ) from None
    return out


def input_fn(
    body: bytes,
    content_type: str | None,
    *,
    draft: int | None = None,
    max_body: int = MAX_BODY_BYTES,
) -> list[Image.Image]:
    """Request body → RGB images. Raw image bytes or JSON {"instances": [base64, ...]}.
    `max_body`: the endpoint's body limit (a batch transform's is its MaxPayloadInMB)."""
    if len(body) > max_body:
        raise RequestError(
            413,
            f"request body of {len(body)} bytes is over the limit of {max_body} bytes",
            "send a smaller image (resize or recompress it)",
        )
    if request_type(content_type, body) == JSON_TYPE:
        payloads = [(p, f"instances[{i}]") for i, p in enumerate(_json_images(body))]
    else:
        payloads = [(body, "body")]
    # Every header first, so a batch over the request's budget decodes nothing at all.
    sizes = [probe_image(p, draft=draft, where=where) for p, where in payloads]
    check_request_work(sizes, draft=draft)
    return [_decode(p, draft=draft, where=where) for p, where in payloads]


_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes "²"


def parse_options(
    custom_attributes: str | None,
    num_classes: int,
    *,
    accept_format: str | None = None,
    default_format: str = DEFAULT_FORMAT,
    default_min_confidence: float | str | None = None,
    thresholds: tuple[float, ...] | None = None,
) -> Options:
    """`X-Amzn-SageMaker-Custom-Attributes: topk=3,probabilities=true,format=vectors,
    min_confidence=0.8`. The format comes from the attributes, else the Accept header's
    parameter, else the deploy's default; min_confidence from the attributes, else the
    deploy's default (`auto` needs the model's `thresholds`)."""
    topk, full, chosen = DEFAULT_TOPK, False, None
    floor = default_min_confidence
    for part in (custom_attributes or "").replace(";", ",").split(","):
        key, _, value = part.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if key == "topk":
            if not _DIGITS.fullmatch(value) or int(value) < 1:
                raise RequestError(
                    400,
                    f"topk={shown(value)} is not a positive integer",
                    "send X-Amzn-SageMaker-Custom-Attributes: topk=5",
                )
            topk = int(value)
        elif key == "probabilities":
            # "all" is this header's own word for every class; an unknown value means false
            # here (no 400), as it always has.
            full = value == "all" or parse_bool(value) is True
        elif key == "format":
            chosen = answer_format(value)
        elif key == "min_confidence":
            floor = min_confidence(value)
    if floor == AUTO_CONFIDENCE and thresholds is None:
        raise RequestError(
            400,
            "min_confidence=auto: this model carries no per-class thresholds (it was trained "
            "before imgclf chose them)",
            "send min_confidence=P with a probability P, or retrain the model",
        )
    fmt = chosen or accept_format or default_format
    return Options(min(topk, num_classes), full, fmt, floor)


def prepare(images: list[Image.Image], loaded: LoadedModel) -> np.ndarray:
    """Images → the model's uint8 input batch [N, 3, size, size] (small: the decoded images
    can be dropped as soon as this returns)."""
    return np.stack([loaded.transform(image) for image in images])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (what torch.softmax computes, to float32 rounding)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_batch(batch: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """Forward passes of at most MAX_IMAGES images (one pass for one request's images; MMS
    batches of several requests stay within the memory one full JSON request takes):
    softmax probabilities [N, classes], float32."""
    logits = [loaded.forward(batch[i : i + MAX_IMAGES]) for i in range(0, len(batch), MAX_IMAGES)]
    joined = logits[0] if len(logits) == 1 else np.concatenate(logits)
    return softmax(np.asarray(joined, dtype=np.float32) / np.float32(loaded.temperature))


def predict_fn(images: list[Image.Image], loaded: LoadedModel) -> np.ndarray:
    """Probabilities [N, classes] of the images, float32."""
    return predict_batch(prepare(images, loaded), loaded)


def check_prediction(loaded: LoadedModel) -> None:
    """Predict once on a blank image: RuntimeError when the answer is not one finite row of
    the model's classes (what `serve` checks before it serves a model, at start or in a swap)."""
    size = loaded.preprocess.resize_size
    probs = predict_fn([Image.new("RGB", (size, size))], loaded)
    if probs.shape != (1, loaded.num_classes) or not bool(np.isfinite(probs).all()):
        raise RuntimeError(f"the model's output is {tuple(probs.shape)} or not finite")


def confident(
    probs: np.ndarray, options: Options, thresholds: tuple[float, ...] | None
) -> tuple[bool, float]:
    """Whether one image's best class reaches the threshold that applies to it (the request's
    probability, or the class's own with `auto`), and that threshold."""
    best = int(probs.argmax())
    if options.min_confidence == AUTO_CONFIDENCE:
        threshold = thresholds[best] if thresholds is not None else 0.0
    else:
        threshold = float(options.min_confidence or 0.0)
    return float(probs[best]) >= threshold, threshold


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest probabilities of one row, largest first (a tie: the lower index first),
    and their indices."""
    indices = np.argsort(-probs, kind="stable")[:k]
    return probs[indices], indices


def prediction(
    probs: np.ndarray,
    labels: list[str],
    options: Options,
    thresholds: tuple[float, ...] | None = None,
) -> dict:
    probs = np.asarray(probs)
    values, indices = top_k(probs, options.topk)
    out: dict = {
        "predictions": [
            {"label": labels[i], "index": int(i), "probability": round(float(p), 6)}
            for p, i in zip(values.tolist(), indices.tolist())
        ]
    }
    if options.min_confidence is not None:
        sure, threshold = confident(probs, options, thresholds)
        out["label"] = labels[int(indices[0])] if sure else None
        out["confident"] = sure
        out["threshold"] = round(threshold, 6)
    if options.probabilities:
        out["probabilities"] = [round(float(p), 6) for p in probs.tolist()]
        out["labels"] = labels
    return out


def vector(
    probs: np.ndarray, options: Options, thresholds: tuple[float, ...] | None = None
) -> list[float]:
    """One image's row in label order; with min_confidence, one more entry at index N (one past
    the last label): 1.0 when there is no confident label (so an argmax lands on it), else 0."""
    probs = np.asarray(probs)
    row = [round(float(p), 6) for p in probs.tolist()]
    if options.min_confidence is not None:
        row.append(0.0 if confident(probs, options, thresholds)[0] else 1.0)
    return row


def output_fn(
    probs: np.ndarray,
    labels: list[str],
    *,
    accept: str | None,
    options: Options,
    batch: bool,
    thresholds: tuple[float, ...] | None = None,
) -> tuple[bytes, str]:
    """Probabilities → the answer. "predictions": one object for one image, a list of them for
    a JSON batch. "vectors": `[[p0, ..., pN-1], ...]`, one row per image in label order, always a
    list of lists (what `np.argmax(np.asarray(json.loads(body)), 1)` reads). With
    `Accept: application/jsonlines`: one line per image instead (its object, or its row).
    With `options.min_confidence`, an image whose best class is below its threshold says so:
    `"label": null, "confident": false` beside its top-k, or index N of its vector.
    `probs`: an array (or a CPU tensor)."""
    check_accept(accept)
    probs = np.asarray(probs)
    if options.format == "vectors":
        rows: list = [vector(row, options, thresholds) for row in probs]
    else:
        rows = [prediction(row, labels, options, thresholds) for row in probs]
    media = answer_type(accept)
    if media == JSONLINES_TYPE:
        return b"".join(json.dumps(row).encode() + b"\n" for row in rows), media
    doc = rows if batch or options.format == "vectors" else rows[0]
    return json.dumps(doc).encode(), media


def torch_threads(workers: int) -> int:
    """Split the CPUs between MMS workers so they do not oversubscribe the cores."""
    return max(1, cpu_count() // max(1, workers))
