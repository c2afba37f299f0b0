import pytest
import torch
from torch import nn

from imgclf.config import parse_hyperparameters
from imgclf.train import build_optimizer


def _step(hps: dict) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = build_optimizer(parse_hyperparameters(hps), model)
    for _ in range(3):
        loss = model(torch.randn(8, 6, generator=torch.Generator().manual_seed(1))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimizer_takes_the_same_steps(optimizer):
    base = {"optimizer": optimizer, "lr": "0.1", "weight_decay": "0.01"}
    plain, expected = _step(base)
    fused, got = _step({**base, "fused_optimizer": "true"})
    assert not plain.defaults.get("fused") and fused.defaults["fused"] is True
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weight_decay_skips_biases_and_norm_weights():
    opt, _ = _step({"weight_decay": "0.05"})
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
