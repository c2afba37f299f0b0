import pytest
import torch

from imgclf import models
from imgclf.config import ARCHITECTURES
from imgclf.errors import ConfigError, UserError
from imgclf.util import free_port


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_gets_a_head_for_the_dataset(arch):
    model = models.build_model(arch, 7)
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 7)
    assert models.head_module(model, arch).out_features == 7


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ConfigError) as err:
        models.get_architecture("vgg99")
    assert "resnet50" in str(err.value) and "convnext_tiny" in str(err.value)


def test_missing_pretrained_weights_fail_in_one_line_with_the_fix(tmp_path, monkeypatch):
    """An empty torch cache and no way out, on any machine: the download goes through a proxy
    on a loopback port nothing listens on (urllib honours https_proxy), so it is refused at
    once whether or not this machine reaches download.pytorch.org."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    closed = f"http://127.0.0.1:{free_port()}"
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, closed)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError) as err:
        models.build_model("resnet18", 3, pretrained=True)
    message = str(err.value)
    assert "\n" not in message
    assert "weights_path" in message and "pretrained=false" in message
    assert "resnet18-f37072fd.pth" in message


def test_weights_from_the_torch_cache_and_from_a_file(tmp_path, monkeypatch):
    reference = models.build_model("resnet18", 1000)
    reference_state = {k: v for k, v in reference.state_dict().items()}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    cached = models.cached_weights_path(models.get_architecture("resnet18"))
    cached.parent.mkdir(parents=True)
    torch.save(reference_state, cached)
    from_cache = models.build_model("resnet18", 4, pretrained=True)
    assert torch.equal(from_cache.conv1.weight, reference.conv1.weight)
    path = tmp_path / "w.pt"
    torch.save(reference_state, path)
    from_file = models.build_model("resnet18", 4, weights_path=str(path))
    assert torch.equal(from_file.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(models.build_model("resnet34", 1000).state_dict(), path)
    with pytest.raises(UserError, match="do not fit resnet18"):
        models.build_model("resnet18", 4, weights_path=str(path))


def test_freeze_trains_only_the_head(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(models.build_model("resnet18", 1000).state_dict(), path)
    model = models.build_model("resnet18", 5, weights_path=str(path), freeze=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}


def test_preprocessing_comes_from_the_weights_config():
    pre = models.get_architecture("resnet50").preprocess(224)
    assert (pre.image_size, pre.resize_size) == (224, 232)
    assert pre.mean == (0.485, 0.456, 0.406)
    assert models.get_architecture("efficientnet_b0").preprocess(224).interpolation == "bicubic"
