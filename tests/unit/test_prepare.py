"""The prepared-dataset cache: resized once, same layout, only changes rebuilt."""

import os

import numpy as np
from PIL import Image

from imgclf.prepare import MANIFEST, prepare_dataset


def photo_dataset(root, rng):
    for split, per in (("train", 3), ("valid", 1)):
        for cls in ("001.cat", "002.dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per):
                arr = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.jpg", quality=90)
    return root


def test_prepare_resizes_once_keeps_the_layout_and_skips_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    src = photo_dataset(tmp_path / "src", rng)
    (src / "train/001.cat/broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.fromarray(rng.integers(0, 255, (40, 60), dtype=np.uint8)).save(
        src / "train/002.dog/small.png"
    )
    out = tmp_path / "prepared"
    result = prepare_dataset(src, out, short_side=128, fmt="jpeg")
    assert (result.built, result.kept, result.removed) == (9, 0, 0)
    assert [p for p, _ in result.skipped] == [str(src / "train/001.cat/broken.jpg")]
    image = Image.open(out / "train/001.cat/0.jpg.jpg")
    assert image.size == (171, 128) and image.mode == "RGB"
    small = Image.open(out / "train/002.dog/small.png.jpg")
    assert small.size == (60, 40) and small.mode == "RGB"  # never upscaled; gray → RGB
    assert not (out / "train/001.cat/broken.jpg.jpg").exists()
    assert sorted(p.name for p in (out / "valid").iterdir()) == ["001.cat", "002.dog"]


def test_a_rerun_rebuilds_only_what_changed(tmp_path):
    rng = np.random.default_rng(1)
    src = photo_dataset(tmp_path / "src", rng)
    out = tmp_path / "prepared"
    prepare_dataset(src, out, short_side=64, fmt="jpeg")
    again = prepare_dataset(src, out, short_side=64, fmt="jpeg")
    assert (again.built, again.kept, again.removed) == (0, 8, 0)

    changed = src / "train/001.cat/1.jpg"
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(10**18, 10**18))
    (src / "train/002.dog/2.jpg").unlink()
    before = (out / "train/001.cat/0.jpg.jpg").stat().st_mtime_ns
    third = prepare_dataset(src, out, short_side=64, fmt="jpeg")
    assert (third.built, third.kept, third.removed) == (1, 6, 1)
    assert Image.open(out / "train/001.cat/1.jpg.jpg").size == (64, 64)
    assert not (out / "train/002.dog/2.jpg.jpg").exists()
    assert (out / "train/001.cat/0.jpg.jpg").stat().st_mtime_ns == before  # untouched

    resized = prepare_dataset(src, out, short_side=32, fmt="jpeg")  # other settings: all again
    assert resized.built == 7 and (out / MANIFEST).exists()


def test_raw_format_holds_the_exact_resized_pixels_and_replaces_a_jpeg_copy(tmp_path):
    rng = np.random.default_rng(2)
    src = photo_dataset(tmp_path / "src", rng)
    out = tmp_path / "prepared"
    prepare_dataset(src, out, short_side=64, fmt="jpeg")
    raw = prepare_dataset(src, out, short_side=64)  # default: raw
    assert (raw.built, raw.kept, raw.removed) == (8, 0, 8)
    files = [p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST]
    assert sorted(p.suffix for p in files) == [".ppm"] * 8
    with Image.open(src / "train/001.cat/0.jpg") as original:
        original.draft("RGB", (64, 64))
        expected = original.convert("RGB").resize((85, 64), Image.BICUBIC, reducing_gap=2.0)
    stored = Image.open(out / "train/001.cat/0.jpg.ppm")
    assert stored.size == (85, 64) and stored.mode == "RGB"
    assert np.array_equal(np.asarray(stored), np.asarray(expected))  # lossless
