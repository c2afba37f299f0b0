import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.contract import resolve_splits
from imgclf.data import scan as scan_module
from imgclf.data.decode import MAX_DECODE_COST, ImageTooCostly, decode_cost, open_image
from imgclf.data.device import DeviceNormalize
from imgclf.data.loaders import (
    EpochSampler,
    ImageListDataset,
    class_weights,
)
from imgclf.data.scan import image_problem, label_name, list_split, scan_dataset, scan_split
from imgclf.data.transforms import Preprocess, eval_crop, eval_transform, train_transform
from imgclf.errors import DataError
from tests.conftest import write_odd_images


@pytest.fixture
def odd_folder(tmp_path):
    made = write_odd_images(tmp_path / "imgs", np.random.default_rng(1))
    return tmp_path / "imgs", made


def test_every_usable_mode_becomes_rgb_and_bad_files_are_named(odd_folder):
    folder, made = odd_folder
    for name, kind in made.items():
        problem = image_problem(folder / name)
        if kind == "ok":
            assert problem is None, (name, problem)
            image = open_image(folder / name)
            assert image.mode == "RGB"
        elif kind == "bad":
            assert problem, name


def test_exif_rotation_is_applied(odd_folder):
    folder, _ = odd_folder
    assert open_image(folder / "plain.jpg").size == (30, 40)
    assert open_image(folder / "rotated.jpg").size == (40, 30)


def test_sixteen_bit_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "d.png")
    rgb = np.asarray(open_image(tmp_path / "d.png"))
    assert rgb.min() == 0 and rgb.max() == 255


def test_transparency_is_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(open_image(tmp_path / "clear.png")).min() == 255


def test_scan_skips_exactly_the_unreadable_files(odd_dataset):
    root, bad = odd_dataset
    scan = scan_dataset(resolve_splits({"training": root}))
    assert {f"{b.split}/{b.path}" for b in scan.bad} == bad
    assert scan.classes == ("001.cats", "002.dogs")
    assert scan.splits["train"].counts() == [6 + 7, 6]
    assert "001.cats/.DS_Store" in scan.splits["train"].ignored


def test_class_sets_that_differ_are_named(tiny_digits, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(tiny_digits, root)
    shutil.rmtree(root / "valid" / "003.two")
    (root / "test" / "011.extra").mkdir()
    Image.new("L", (8, 8)).save(root / "test" / "011.extra" / "a.png")
    with pytest.raises(DataError) as err:
        scan_dataset(resolve_splits({"training": root}))
    assert "valid lacks 003.two" in str(err.value)
    assert "test has 011.extra" in str(err.value)


def test_wrong_layout_errors_say_what_is_expected(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="valid"):
        resolve_splits({"training": tmp_path})
    (tmp_path / "valid").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan_dataset(resolve_splits({"training": tmp_path}))


def test_separate_channels_or_one_training_channel(tiny_digits):
    combined = resolve_splits({"training": tiny_digits})
    separate = resolve_splits({n: tiny_digits / n for n in ("train", "valid", "test")})
    assert combined == separate


def test_label_names():
    assert label_name("001.Affenpinscher") == "Affenpinscher"
    assert label_name("002.Afghan_hound") == "Afghan hound"
    assert label_name("cats") == "cats"


def test_class_weights_are_balanced():
    w = class_weights([10, 30])
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3]))


def test_epoch_sampler_is_a_fixed_permutation_per_epoch_and_shards_evenly():
    a = EpochSampler(10, seed=3)
    a.set_epoch(2)
    first = list(a)
    a.set_epoch(2)
    assert list(a) == first
    a.set_epoch(3)
    assert [i for i, _ in a] != [i for i, _ in first]
    shards = []
    for rank in range(3):
        s = EpochSampler(10, seed=3, rank=rank, world_size=3)
        s.set_epoch(2)
        shards.append([i for i, _ in s])
    assert all(len(s) == 4 for s in shards)
    assert set(sum(shards, [])) == set(range(10))


def test_augmentation_depends_only_on_seed_epoch_and_index(tiny_digits):
    samples = scan_split("train", tiny_digits / "train").samples
    pre = Preprocess(32, 36, (0.5,) * 3, (0.5,) * 3)
    ds = ImageListDataset(
        samples, train_transform(pre, hflip=True, min_crop_scale=0.2), draft=None, seed=7
    )
    x1, _ = ds[(5, 1)]
    ds[(6, 1)]
    x2, _ = ds[(5, 1)]
    x3, _ = ds[(5, 2)]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_eval_transform_shape_and_normalisation(tmp_path):
    Image.new("RGB", (50, 40), (255, 255, 255)).save(tmp_path / "w.png")
    pre = Preprocess(24, 28, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = eval_transform(pre)(open_image(Path(tmp_path / "w.png")))
    assert x.shape == (3, 24, 24)
    assert torch.allclose(x, torch.full_like(x, 2.0))


def test_uint8_batches_normalised_on_the_device_equal_the_float_transforms(tiny_digits):
    """Training ships uint8 crops and normalises after the copy: the model must see the same
    numbers the float pipeline (and the endpoint) produce."""
    samples = scan_split("train", tiny_digits / "train").samples[:6]
    pre = Preprocess(32, 36, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    normalize = DeviceNormalize.of(pre)
    for make in (
        lambda n: eval_transform(pre, normalize=n),
        lambda n: train_transform(pre, hflip=True, min_crop_scale=0.2, normalize=n),
    ):
        as_float = ImageListDataset(samples, make(True), draft=None, seed=3)
        as_uint8 = ImageListDataset(samples, make(False), draft=None, seed=3)
        for i in range(len(samples)):
            x, target = as_float[(i, 2)]
            u, target_u = as_uint8[(i, 2)]
            assert u.dtype == torch.uint8 and target == target_u
            y = normalize(u[None])[0]
            assert y.dtype == torch.float32
            assert torch.allclose(x, y, atol=1e-5), (i, (x - y).abs().max())
    floats = torch.randn(2, 3, 4, 4)
    assert normalize(floats) is floats  # float batches pass through untouched


def test_a_process_with_live_loader_workers_still_exits(tmp_path):
    """Workers ignore SIGTERM (so `docker stop` reaches the trainer first); a script that keeps
    its loader alive until exit must still end, not wait on them."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from imgclf.data.loaders import ShardSampler, make_loader\n"
        "ds = torch.utils.data.TensorDataset(torch.arange(64.0))\n"
        "loader = make_loader(ds, ShardSampler(64), batch_size=8, workers=2,"
        " pin_memory=False)\n"
        "assert sum(b[0].numel() for b in loader) == 64\n"
        "print('done', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr


def test_scan_verdicts_are_kept_so_the_next_job_decodes_only_changed_files(
    tmp_path, tiny_digits, monkeypatch
):
    import shutil

    root = shutil.copytree(tiny_digits, tmp_path / "data")
    splits = resolve_splits({"training": root})
    cache = tmp_path / "scans"
    decoded = []
    real_problem = image_problem
    monkeypatch.setattr(
        scan_module, "image_problem", lambda p, **kw: decoded.append(p) or real_problem(p, **kw)
    )

    first = scan_dataset(splits, cache_dir=cache)
    total = sum(len(s.samples) for s in first.splits.values())
    assert len(decoded) == total == 200 and len(list(cache.glob("*.json"))) == 3

    decoded.clear()
    again = scan_dataset(splits, cache_dir=cache)
    assert decoded == [] and again.splits["train"].samples == first.splits["train"].samples

    broken = sorted((root / "train").rglob("*.png"))[3]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # new size: checked again, found bad
    third = scan_dataset(splits, cache_dir=cache)
    assert decoded == [broken]
    assert [b.path for b in third.bad] == [str(broken.relative_to(root / "train"))]
    decoded.clear()
    assert [b.path for b in scan_dataset(splits, cache_dir=cache).bad] == [
        str(broken.relative_to(root / "train"))
    ] and decoded == []  # a bad verdict is remembered too


def test_a_symbolic_link_loop_is_read_once_and_named(tmp_path):
    root = tmp_path / "train"
    for cls in ("001.a", "002.b"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(root / cls / "x.png")
    (root / "001.a" / "loop").symlink_to("..")  # back to the split: every class again
    (root / "001.a" / "self").symlink_to(".")
    (root / "002.b" / "sub").mkdir()
    Image.new("RGB", (8, 8), "blue").save(root / "002.b" / "sub" / "y.png")
    (root / "002.b" / "sub" / "up").symlink_to("..")  # back to its own class folder
    classes, files, ignored = list_split("train", root)
    assert classes == ("001.a", "002.b")
    assert sorted((p.relative_to(root).as_posix(), t) for p, t in files) == [
        ("001.a/x.png", 0),
        ("002.b/sub/y.png", 1),
        ("002.b/x.png", 1),
    ]
    skipped = sorted(i.split(" ")[0] for i in ignored)
    assert skipped == ["001.a/loop", "001.a/self", "002.b/sub/up"]
    assert all("not followed" in i for i in ignored)


# ---------------------------------------------------------------- what one image may cost


def test_decode_cost_weights_deep_and_alpha_modes():
    assert decode_cost("RGB", 30, 20) == 600
    assert decode_cost("L", 30, 20) == 600
    assert decode_cost("RGBA", 30, 20) == decode_cost("CMYK", 30, 20) == 1200
    for mode in ("I;16", "I;16B", "I", "F"):
        assert decode_cost(mode, 30, 20) == 1800, mode
    # a 16-bit PNG at Pillow's limit (the ~4.9 GB decode) is over the default bound
    assert decode_cost("I;16", 10_000, 17_895) > MAX_DECODE_COST


def _deep_images(folder: Path) -> None:
    """20x20 images: 400 pixels of RGB, 1200 of cost for 16-bit and float."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.arange(400, dtype=np.uint16).reshape(20, 20) * 100
    Image.fromarray(ramp).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode == "I;16"
    Image.fromarray(ramp.astype(np.float32) / 40000, mode="F").save(folder / "float.tif")
    assert Image.open(folder / "float.tif").mode == "F"
    Image.new("RGB", (20, 20), "red").save(folder / "plain.png")


def test_an_image_over_the_bound_is_refused_from_its_header(tmp_path):
    _deep_images(tmp_path)
    with pytest.raises(ImageTooCostly, match=r"20x20 I;16 pixels cost 1200 .* counts 3x"):
        open_image(tmp_path / "deep16.png", max_cost=1000)
    with pytest.raises(ImageTooCostly, match="20x20 F pixels cost 1200"):
        open_image(tmp_path / "float.tif", max_cost=1000)
    assert open_image(tmp_path / "plain.png", max_cost=1000).size == (20, 20)
    assert open_image(tmp_path / "deep16.png", max_cost=1200).mode == "RGB"
    assert image_problem(tmp_path / "deep16.png", max_cost=1000).startswith(
        "too costly to decode: 20x20 I;16 pixels"
    )
    assert image_problem(tmp_path / "deep16.png") is None  # the default bound


def test_the_scan_lists_over_bound_images_as_bad_and_remembers_the_bound(tmp_path):
    for split in ("train", "valid"):
        for cls in ("001.a", "002.b"):
            Image.new("RGB", (20, 20), "blue").save(_folder(tmp_path / split / cls) / "ok.png")
    _deep_images(tmp_path / "train" / "001.a")
    splits = resolve_splits({"training": tmp_path})
    cache = tmp_path / "scans"

    scan = scan_dataset(splits, cache_dir=cache, max_cost=1000)
    bad = {b.path: b.reason for b in scan.bad}
    assert set(bad) == {"001.a/deep16.png", "001.a/float.tif"}
    assert all(
        r.startswith("too costly to decode") and "max_image_pixels" in r for r in bad.values()
    )
    assert scan.splits["train"].counts() == [2, 1]
    # verdicts found under another bound are not taken for this one
    assert scan_dataset(splits, cache_dir=cache, max_cost=1200).bad == []
    assert len(scan_dataset(splits, cache_dir=cache, max_cost=1000).bad) == 2


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_training_reads_no_image_over_the_bound(tmp_path):
    _deep_images(tmp_path)
    samples = [(str(tmp_path / "plain.png"), 0), (str(tmp_path / "deep16.png"), 1)]
    dataset = ImageListDataset(samples, lambda image: image.size, draft=None, max_cost=1000)
    assert dataset[0] == ((20, 20), 0)
    with pytest.raises(DataError, match=r"deep16.png could not be read .* over the bound of 1000"):
        dataset[1]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(40, 40), (300, 197), (97, 512), (224, 256), (1001, 3)])
def test_the_torch_free_eval_crop_is_torchvisions_resize_and_center_crop(interpolation, size):
    from torchvision import transforms as tvt

    pre = Preprocess(224, 256, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), interpolation)
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = tvt.Compose(
        [
            tvt.Resize(pre.resize_size, interpolation=pre.mode, antialias=True),
            tvt.CenterCrop(pre.image_size),
            tvt.PILToTensor(),
        ]
    )(image)
    ours = eval_crop(pre)(image)
    assert ours.dtype == np.uint8 and ours.shape == (3, 224, 224)
    assert np.array_equal(ours, reference.numpy())


def test_the_endpoints_preprocessing_imports_no_torch():
    code = (
        "import sys; from PIL import Image; from imgclf.data.transforms import Preprocess, "
        "eval_crop; pre = Preprocess(32, 36, (0.5,) * 3, (0.25,) * 3); "
        "eval_crop(pre)(Image.new('RGB', (50, 40))); "
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
