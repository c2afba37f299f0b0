import torch

from imgclf import features, models
from imgclf.data.device import DeviceNormalize
from imgclf.data.loaders import EpochSampler
from imgclf.data.scan import scan_dataset
from imgclf.data.transforms import Preprocess


def test_feature_batches_follow_the_epoch_sampler_and_cover_every_sample():
    split = features.SplitFeatures(torch.arange(10.0)[:, None].repeat(1, 3), torch.arange(10))
    sampler = EpochSampler(10, seed=4)
    batches = features.FeatureBatches(split, sampler, batch_size=4)
    assert len(batches) == 3
    sampler.set_epoch(1)
    first = torch.cat([t for _, t in batches])
    sampler.set_epoch(2)
    second = torch.cat([t for _, t in batches])
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() != second.tolist()
    assert first.tolist() == [i for i, _ in _epoch(sampler, 1)]
    for x, t in batches:
        assert torch.equal(x[:, 0], t.float())  # rows stay with their targets


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_backbone_only_returns_the_heads_input_and_puts_the_head_back():
    model = models.build_model("mobilenet_v3_large", 7).eval()
    head = models.head_module(model, "mobilenet_v3_large")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with features.backbone_only(model, "mobilenet_v3_large") as backbone:
            embedded = backbone(x)
        assert embedded.shape == (2, head.in_features)
        assert models.head_module(model, "mobilenet_v3_large") is head
        assert torch.allclose(head(embedded), model(x), atol=1e-5)


def test_cache_key_follows_the_backbone_not_the_head(tiny_digits):
    scan = scan_dataset({"train": tiny_digits / "train", "valid": tiny_digits / "valid"})
    pre = Preprocess(32, 36, (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    model = models.build_model("resnet18", 10)
    key = features.cache_key(model, "resnet18", pre, scan)
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # the head trains: same embeddings
    assert features.cache_key(model, "resnet18", pre, scan) == key
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(0.5)  # other backbone weights: other embeddings
    assert features.cache_key(model, "resnet18", pre, scan) != key
    other = Preprocess(32, 40, (0.5,) * 3, (0.5,) * 3)
    assert features.cache_key(model, "resnet18", other, scan) != key


def test_embed_runs_the_backbone_in_eval_mode_and_restores_train_mode():
    arch_model = models.build_model("resnet18", 3)
    arch_model.train()
    loader = [(torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 2]))]
    out = features.embed(
        arch_model,
        "resnet18",
        loader,
        device=torch.device("cpu"),
        normalize=DeviceNormalize((0.5,) * 3, (0.5,) * 3),
        amp_dtype=None,
        channels_last=False,
    )
    assert out.features.shape == (2, 512) and out.targets.tolist() == [0, 2]
    assert arch_model.training  # given back as it came
    again = features.embed(
        arch_model,
        "resnet18",
        loader,
        device=torch.device("cpu"),
        normalize=DeviceNormalize((0.5,) * 3, (0.5,) * 3),
        amp_dtype=None,
        channels_last=False,
    )
    assert torch.equal(out.features, again.features)  # eval mode: BN statistics untouched
