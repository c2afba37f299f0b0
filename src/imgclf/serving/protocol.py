"""The endpoint's request protocol, in one place (torch-free: the front and the handler both
read it): the limits a request must keep, the content types it may carry, the answer formats,
and the error body every refusal uses.

Content types. The image types below and JSON (base64 images) are served. Two aliases that real
tools send are taken as what they mean: `image/jpg` (no such registered type, but common) and
`binary/octet-stream` (what some S3 tools set). A body sent as
`application/x-www-form-urlencoded` — curl's default for `--data-binary` without `-H` — is
sniffed: when its first bytes are an image format's signature it is served as that image (a
user who typed `curl --data-binary @dog.jpg URL` meant the image; no form posts an image's bytes
unencoded), otherwise it is a 415 whose hint shows the `-H` to add. Every other type is a 415
decided by the front before anything reaches the model server.

Errors. Every error body is JSON `{"error", "hint", "message"}`: `error` says what was wrong,
`hint` what to do, and `message` (both together) is what botocore and the SageMaker SDKs read
and show in `ClientError`.
"""

from __future__ import annotations

import http
import json
import re
from dataclasses import dataclass

MB = 1024 * 1024
MAX_BODY_BYTES = 6 * MB  # SageMaker's real-time request limit
MAX_IMAGES = 64  # per JSON request
# Decoded pixels per request, all images together (after the JPEG draft): 40 Mpx is one
# 40 Mpx photo, or 64 phone photos drafted to 1/8 scale. Refused before anything is decoded;
# modes that cost more to decode count more (data.decode.PIXEL_WEIGHT).
MAX_PIXELS = 40_000_000
# What the eval transform's resize (short side to resize_size) may produce: per image, the
# pixels of a 16:1 strip; per request, those of 64 images at 4:1. A 65535x1 PNG would resize to
# gigapixels otherwise.
MAX_RESIZE_FACTOR_IMAGE = 16
MAX_RESIZE_FACTOR_REQUEST = 256
DEFAULT_TOPK = 5

# Response formats: "predictions" (top-k objects) or "vectors" (the seed projects' format: one
# list of class probabilities per image, in label order, `[[p0, ..., pN-1]]`).
FORMATS = ("predictions", "vectors")
DEFAULT_FORMAT = "predictions"

# min_confidence=auto: each class's own threshold, chosen on the validation split (best F1; the
# artifact's model_config.json "thresholds"), as Rekognition's "assumed threshold".
AUTO_CONFIDENCE = "auto"

JSON_TYPE = "application/json"
JSONLINES_TYPE = "application/jsonlines"  # one JSON line per image (batch transform's output)
MAX_PAYLOAD_MB = 100  # SageMaker's ceiling on a batch transform's MaxPayloadInMB
FORM_TYPE = "application/x-www-form-urlencoded"  # curl's default for --data-binary
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
TYPE_ALIASES = {"image/jpg": "image/jpeg", "binary/octet-stream": "application/octet-stream"}
ACCEPTED = frozenset({JSON_TYPE, JSONLINES_TYPE, "application/*", "*/*"})
JSON_HINT = 'send {"instances": ["<base64 image>", ...]}'
TYPES_HINT = (
    "use image/jpeg, image/png, application/x-image, application/octet-stream or "
    "application/json (base64 images); application/x-npy is never accepted (no pickles)"
)
CURL_HINT = (
    "name the body's type: curl -H 'Content-Type: image/jpeg' --data-binary @dog.jpg URL "
    "(curl sends application/x-www-form-urlencoded without -H)"
)

# An image format's first bytes → the type it is served as when a form-typed body sniffs so.
_SIGNATURES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the server. Defaults suit SageMaker's real-time contract."""

    max_body_bytes: int = MAX_BODY_BYTES
    linger_bytes: int = 64 * MB  # an over-limit body up to this is read and dropped: JSON 413
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 10.0  # from a connection's first byte to the end of its headers
    body_timeout_s: float = 30.0  # for the whole body to arrive
    idle_timeout_s: float = 75.0  # a keep-alive connection with no request (above SageMaker's 60)
    max_connections: int = 1024
    body_budget_bytes: int = 256 * MB  # bodies held in the front and the model server together
    upstream_concurrency: int = 256  # requests handed to the model server at once
    request_timeout_s: float = 60.0  # from the request's arrival to its answer


class RequestError(Exception):
    """A client's mistake (or the endpoint's state) answered with `status` and the error body.
    `close`: the connection must close afterwards (the front's framing errors)."""

    def __init__(self, status: int, error: str, hint: str, *, close: bool = False) -> None:
        super().__init__(error)
        self.status, self.error, self.hint, self.close = status, error, hint, close

    def body(self) -> bytes:
        return error_body(self.error, self.hint)

    @property
    def reason(self) -> str:
        return reason_phrase(self.status)


def error_body(error: str, hint: str) -> bytes:
    """The one error shape: what was wrong, what to do, and both as `message` (botocore)."""
    return json.dumps({"error": error, "hint": hint, "message": f"{error} ({hint})"}).encode()


def is_error_body(doc) -> bool:
    """A parsed body in our error shape (the handler's answers pass the front unchanged)."""
    return isinstance(doc, dict) and "error" in doc and "hint" in doc


def reason_phrase(status: int) -> str:
    """A fixed ASCII reason phrase: never the client's text (MMS frames the phrase by its
    length in characters but writes UTF-8 bytes, so a non-ASCII phrase kills the worker)."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def shown(text: str | None, limit: int = 60) -> str:
    """A client's value quoted for an error message: ASCII only, bounded."""
    value = (text or "")[:limit]
    return ascii(value) + ("..." if text and len(text) > limit else "")


def media_type(header: str | None) -> str:
    """The header's media type, lower-case, parameters dropped, aliases resolved."""
    media = (header or "").split(";", 1)[0].strip().lower()
    return TYPE_ALIASES.get(media, media)


def sniff_image(body: bytes) -> str | None:
    """The image type a body's first bytes announce, or None."""
    for signature, media in _SIGNATURES:
        if body.startswith(signature):
            return media
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "image/webp"
    return None


def request_type(content_type: str | None, body: bytes) -> str:
    """The content type a request is served as (what the handler is given), or a 415: the
    image types, JSON, no type at all (the body is read as an image), the aliases, and curl's
    form type when the body is an image (see the module docstring)."""
    media = media_type(content_type)
    if media in IMAGE_TYPES or media == JSON_TYPE:
        return media
    if media == "":
        return "application/octet-stream"
    if media == FORM_TYPE:
        sniffed = sniff_image(body)
        if sniffed is not None:
            return sniffed
        raise RequestError(
            415, f"content type {shown(content_type)} is not an image type", CURL_HINT
        )
    raise RequestError(415, f"content type {shown(content_type)} is not supported", TYPES_HINT)


def check_accept(accept: str | None) -> str | None:
    """406 unless JSON is acceptable; returns the `format=` parameter given with it, if any
    (`Accept: application/json; format=vectors`)."""
    chosen = None
    acceptable = False
    for part in (accept or "").split(","):
        media, *params = part.split(";")
        media = media.strip().lower()
        if not media:
            continue
        if media in ACCEPTED:
            acceptable = True
            for param in params:
                key, _, value = param.partition("=")
                if key.strip().lower() == "format":
                    chosen = answer_format(value)
    if (accept or "").strip(" ,") and not acceptable:
        hint = "accept application/json or application/jsonlines (or leave Accept out)"
        raise RequestError(406, f"cannot answer in {shown(accept)}", hint)
    return chosen


def answer_type(accept: str | None) -> str:
    """The media type of a 200 answer: JSON Lines when it is the first acceptable type the
    client lists, JSON otherwise (the default, and what `*/*` gets)."""
    for part in (accept or "").split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media in ACCEPTED:
            return JSONLINES_TYPE if media == JSONLINES_TYPE else JSON_TYPE
    return JSON_TYPE


def answer_format(value: str) -> str:
    """A `format=` value, checked."""
    value = value.strip().strip('"').lower()
    if value not in FORMATS:
        raise RequestError(
            400,
            f"format={shown(value)} is not a response format",
            f"use format={' or format='.join(FORMATS)}",
        )
    return value


_PROBABILITY = re.compile(r"(?:0(?:\.[0-9]{1,9})?|1(?:\.0{1,9})?|\.[0-9]{1,9})")


def min_confidence(value: str) -> float | str | None:
    """A `min_confidence=` value, checked: a probability from 0 to 1, `auto` (each class's own
    threshold), or `off` / 0 (None: every image gets its best label, as without it)."""
    value = value.strip().strip('"').lower()
    if value == AUTO_CONFIDENCE:
        return AUTO_CONFIDENCE
    if value in ("off", "none", ""):
        return None
    if not _PROBABILITY.fullmatch(value):
        raise RequestError(
            400,
            f"min_confidence={shown(value)} is not a probability",
            "use min_confidence=0.8 (0 to 1) or min_confidence=auto (each class's threshold)",
        )
    return float(value) or None
