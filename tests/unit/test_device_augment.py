"""Augmentation on the training device (`device_augment`): the batched crops must behave like
torchvision's RandomResizedCrop + RandomHorizontalFlip + normalisation the CPU workers do."""

import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from imgclf.data.device import DeviceAugment, DeviceNormalize, device_augment_transform, train_input
from imgclf.data.loaders import ImageListDataset
from imgclf.data.transforms import Preprocess

PRE = Preprocess(32, 48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _photo_like(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (blurred noise), uint8 N x 3 x size x size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def test_boxes_follow_random_resized_crop_rules():
    aug = DeviceAugment(PRE, hflip=True, min_crop_scale=0.25, seed=1)
    boxes, flips = aug.boxes(4000, 48, 64)
    x1, y1, x2, y2 = boxes.unbind(1)
    w, h = x2 - x1, y2 - y1
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 64).all() and (y2 <= 48).all()
    whole = (w == 64) & (h == 48)
    area = (w * h / (48 * 64))[~whole]
    ratio = (w / h)[~whole]
    # rounding to whole pixels moves the limits by a pixel's worth
    assert area.min() >= 0.25 - 0.02 and area.max() <= 1.0
    assert ratio.min() >= 0.75 * 0.95 and ratio.max() <= 4 / 3 * 1.05
    # log-uniform ratio: about as many wide as tall crops; crops are spread over the image
    assert 0.4 < (ratio > 1).float().mean() < 0.6
    centres = (x1 + x2) / 2
    assert centres.min() < 20 and centres.max() > 44
    assert 0.45 < flips.float().mean() < 0.55
    _, none = DeviceAugment(PRE, hflip=False, min_crop_scale=0.25).boxes(100, 48, 48)
    assert not none.any()


def test_whole_image_crop_is_an_antialiased_resize_then_normalised():
    """scale=(1, 1) on a square image leaves only the whole image: the result must be the
    eval pipeline's Resize of it (an area filter vs torchvision's antialiased bilinear: close)
    and normalised exactly as DeviceNormalize does."""
    images = _photo_like(6, 48)
    aug = DeviceAugment(PRE, hflip=False, min_crop_scale=1.0, seed=0)
    out = aug(images)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    resize = transforms.Resize(32, antialias=True)
    to_tensor = transforms.PILToTensor()
    resized = [to_tensor(resize(Image.fromarray(im.permute(1, 2, 0).numpy()))) for im in images]
    expected = DeviceNormalize.of(PRE)(torch.stack(resized))
    # one grey level is 1 / (255 * 0.225) ≈ 0.0174 after normalisation
    assert (out - expected).abs().mean() < 0.03, (out - expected).abs().mean()
    assert (out - expected).abs().max() < 0.25


def test_flips_mirror_the_crop():
    images = _photo_like(64, 48, seed=3)
    plain = DeviceAugment(PRE, hflip=False, min_crop_scale=1.0, seed=5)(images)
    aug = DeviceAugment(PRE, hflip=True, min_crop_scale=1.0, seed=5)
    _, flips = aug.boxes(64, 48, 48)
    aug.set_epoch(0)  # the same numbers again
    flipped = aug(images)
    assert 10 < int(flips.sum()) < 54
    assert torch.allclose(flipped[flips], plain[flips].flip(-1), atol=1e-5)
    assert torch.allclose(flipped[~flips], plain[~flips], atol=1e-5)


def test_a_crop_samples_the_box_it_was_given():
    """A box of exactly the output size is a plain copy of those pixels."""
    images = _photo_like(1, 48, seed=4)
    aug = DeviceAugment(PRE, hflip=False, min_crop_scale=1.0)
    torch_boxes = torch.tensor([[8.0, 4.0, 40.0, 36.0]])
    aug.boxes = lambda n, h, w: (torch_boxes, torch.zeros(1, dtype=torch.bool))
    out = aug(images)
    expected = DeviceNormalize.of(PRE)(images[:, :, 4:36, 8:40].contiguous())
    assert torch.allclose(out, expected, atol=1e-4)


def test_same_seed_epoch_and_rank_repeat_others_differ():
    images = _photo_like(8, 48, seed=2)

    def run(epoch: int, rank: int = 0) -> torch.Tensor:
        aug = DeviceAugment(PRE, hflip=True, min_crop_scale=0.2, seed=11, rank=rank)
        aug.set_epoch(epoch)
        return aug(images)

    a = run(3)
    assert torch.equal(a, run(3))  # a resumed job sees the same crops
    assert not torch.equal(a, run(4))
    assert not torch.equal(a, run(3, rank=1))
    floats = torch.randn(2, 3, 4, 4)
    assert DeviceAugment(PRE, hflip=True, min_crop_scale=0.2)(floats) is floats


def test_workers_cut_equal_squares_along_the_long_side(tmp_path):
    """The workers' part: resize the short side, then a square at a random place."""
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :, 0] = np.arange(120, dtype=np.uint8)[None, :] * 2  # red grows to the right
    Image.fromarray(wide).save(tmp_path / "wide.png")
    ds = ImageListDataset(
        [(str(tmp_path / "wide.png"), 0)], device_augment_transform(PRE), draft=None
    )
    lefts = set()
    for epoch in range(12):
        x, _ = ds[(0, epoch)]
        assert x.shape == (3, 48, 48) and x.dtype == torch.uint8
        lefts.add(int(x[0, :, 0].float().mean()))
    assert len(lefts) > 3  # different places along the width
    assert not math.isnan(float(x.float().mean()))


def test_squares_of_a_prepared_copy_are_slices_not_resamples(tmp_path):
    """On a copy stored at the square's side, the workers cut without resampling: every pixel
    of the square is a pixel of the file. Another size is resized to the side."""
    rng = np.random.default_rng(0)
    tall = rng.integers(0, 256, (90, 48, 3), dtype=np.uint8)
    Image.fromarray(tall).save(tmp_path / "tall.png")
    sample = [(str(tmp_path / "tall.png"), 0)]
    exact = ImageListDataset(sample, device_augment_transform(PRE, side=48), draft=None)
    tops = set()
    for epoch in range(10):
        x, _ = exact[(0, epoch)]
        assert x.shape == (3, 48, 48)
        chw = torch.from_numpy(tall).permute(2, 0, 1)
        top = next(t for t in range(90 - 48 + 1) if torch.equal(chw[:, t : t + 48], x))
        tops.add(top)
    assert len(tops) > 3
    resized = ImageListDataset(sample, device_augment_transform(PRE, side=32), draft=None)
    assert resized[(0, 0)][0].shape == (3, 32, 32)


def test_training_on_a_prepared_copy_keeps_its_short_side(tmp_path):
    from imgclf.prepare import prepare_dataset, stored_short_side

    for split in ("train", "valid"):
        (tmp_path / "src" / split / "001.a").mkdir(parents=True)
        Image.new("RGB", (120, 80), "red").save(tmp_path / "src" / split / "001.a" / "x.png")
    copy = prepare_dataset(tmp_path / "src", tmp_path / "copy", short_side=64, fmt="raw").root
    assert stored_short_side(copy / "train") == 64
    assert stored_short_side(tmp_path / "src" / "train") is None
    transform, draft, _ = train_input(
        PRE, hflip=True, min_crop_scale=0.25, on_device=True, stored_side=64
    )
    assert draft == 64 and transform.transforms[0].side == 64
