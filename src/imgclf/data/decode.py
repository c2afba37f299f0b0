"""Decoding any image file to upright 8-bit RGB, bounded by what the decode costs. Training's
datasets, the scan and the endpoint all decode through here. No torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgclf.config import FIELDS

# What one pixel of a mode costs to decode and turn into RGB, against 8-bit RGB (measured peak
# memory: RGB ~8 bytes a pixel, RGBA ~15, 16-bit or float ~25 through to_rgb's float64 scaling).
# Training's bound on one image and the endpoint's bound on one request both count this way.
PIXEL_WEIGHT = {"RGBA": 2, "LA": 2, "PA": 2, "RGBa": 2, "La": 2, "CMYK": 2}
PIXEL_WEIGHT.update(dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N", "I", "F"), 3))
# Training's default bound on one image's decode cost (weighted pixels): Pillow's own warning
# threshold, ~0.7 GB of peak memory for an RGB image, ~30 Mpx of 16-bit (per loader worker).
MAX_DECODE_COST = FIELDS["max_image_pixels"].default


def decode_cost(mode: str, width: int, height: int) -> int:
    """Weighted pixels an image of `mode` and size takes to decode to RGB (see PIXEL_WEIGHT)."""
    return width * height * PIXEL_WEIGHT.get(mode, 1)


class ImageTooCostly(ValueError):
    """An image whose decode would cost more than the bound it was opened with."""


def check_decode_cost(mode: str, width: int, height: int, max_cost: int) -> None:
    """ImageTooCostly, saying what the image is and the bound, when its decode costs too much."""
    cost = decode_cost(mode, width, height)
    if cost > max_cost:
        weight = PIXEL_WEIGHT.get(mode, 1)
        counted = f" (each {mode} pixel counts {weight}x)" if weight > 1 else ""
        raise ImageTooCostly(
            f"{width}x{height} {mode} pixels cost {cost} to decode{counted}, over the bound of "
            f"{max_cost} (hyperparameter max_image_pixels)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → upright 8-bit RGB: EXIF rotation applied, 16-bit and float scaled,
    transparency composited on white, CMYK/palette/grayscale converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode != "F" and array.max() > 255 else 255.0
        if image.mode == "F":
            peak = max(float(array.max()), 1.0) if array.max() > 1.0 else 1.0
        scaled = np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8)
        image = Image.fromarray(scaled)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def open_image(source, *, draft: int | None = None, max_cost: int | None = None) -> Image.Image:
    """Decode a path or file object to RGB. `draft` lets JPEGs decode at a reduced scale whose
    short side is still at least `draft` pixels (much faster for large photos). With
    `max_cost`, an image whose full size costs more (decode_cost) is refused from its header,
    before anything is decoded: ImageTooCostly."""
    with Image.open(source) as image:
        if max_cost is not None:
            # The full size, whatever the draft: the scan (small draft) and training (larger
            # draft) then take and refuse the same images.
            check_decode_cost(image.mode, *image.size, max_cost)
        if draft and image.format == "JPEG":
            image.draft(image.mode, (draft, draft))
        image.load()
        return to_rgb(image)


def try_open_image(
    path: Path, *, draft: int | None, max_cost: int = MAX_DECODE_COST
) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, why the file cannot be used)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        return open_image(path, draft=draft, max_cost=max_cost), None
    except ImageTooCostly as exc:
        return None, f"too costly to decode: {exc}"
    except UnidentifiedImageError:
        return None, "not an image PIL can read"
    except Image.DecompressionBombError:
        limit = Image.MAX_IMAGE_PIXELS * 2
        return None, f"too many pixels (over {limit}): likely a decompression bomb"
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"cannot be decoded: {exc}"
