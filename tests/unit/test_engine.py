"""The training and evaluation loops (imgclf.engine), on small real models and loaders: what
they count, what they return, and when they stop."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgclf import engine
from imgclf.data.device import DeviceNormalize
from imgclf.errors import TrainingStopped

CPU = torch.device("cpu")


def _loader(images: torch.Tensor, targets: torch.Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size)


class _Fixed(nn.Module):
    """Answers the logits it is given for each image index (the image is its index)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.weight = nn.Parameter(torch.zeros(()))  # something for an optimizer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images.flatten(1)[:, 0].long()] + self.weight


def test_evaluate_counts_loss_top1_top5_and_the_confusion_matrix():
    # 6 images, 6 classes: each row's best class, and where the true class ranks
    logits = torch.tensor(
        [
            [9.0, 1, 0, 0, 0, 0],  # true 0: top-1
            [0.0, 9, 0, 0, 0, 1],  # true 1: top-1
            [9.0, 0, 1, 0, 0, 0],  # true 2: second, in the top 5
            [9.0, 8, 7, 6, 5, 0],  # true 5: last, not in the top 5
            [0.0, 0, 0, 0, 9, 0],  # true 4: top-1
            [0.0, 0, 0, 9, 0, 0],  # true 3: top-1
        ]
    )
    targets = torch.tensor([0, 1, 2, 5, 4, 3])
    images = torch.arange(6.0).view(6, 1, 1, 1)
    result = engine.evaluate(
        _Fixed(logits), _loader(images, targets), num_classes=6, device=CPU, keep_outputs=True
    )
    assert result.images == 6
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.top5 == pytest.approx(5 / 6)
    expected_loss = nn.functional.cross_entropy(logits, targets).item()
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    assert result.confusion[2, 0] == 1 and result.confusion[5, 0] == 1
    assert result.confusion.diag().tolist() == [1, 1, 0, 1, 1, 0]
    assert result.per_class_accuracy() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert torch.equal(result.logits, logits) and torch.equal(result.targets, targets)


def test_evaluate_without_outputs_keeps_none_and_an_empty_loader_counts_nothing():
    empty = _loader(torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long))
    result = engine.evaluate(_Fixed(torch.zeros(1, 3)), empty, num_classes=3, device=CPU)
    assert (result.images, result.accuracy, result.logits) == (0, 0.0, None)
    kept = engine.evaluate(
        _Fixed(torch.zeros(1, 3)), empty, num_classes=3, device=CPU, keep_outputs=True
    )
    assert kept.logits.shape == (0, 3) and kept.targets.dtype == torch.long


def test_an_epoch_learns_separable_data_and_reports_what_it_saw():
    torch.manual_seed(0)
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    targets = torch.arange(3).repeat(40)
    points = centres[targets] + 0.1 * torch.randn(120, 2)
    model = nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion = nn.CrossEntropyLoss()
    loader = _loader(points, targets, batch_size=10)
    losses, steps = [], []
    first = engine.train_one_epoch(
        model,
        loader,
        criterion,
        optimizer,
        device=CPU,
        on_batch=lambda step, loss: losses.append(loss),
        on_step_time=lambda step, data_s, compute_s: steps.append((step, data_s, compute_s)),
    )
    assert first.images == 120 and len(losses) == 12
    assert [s for s, _, _ in steps] == list(range(12))
    assert all(d >= 0 and c >= 0 for _, d, c in steps)
    assert first.seconds >= first.data_seconds >= 0 and first.images_per_second > 0
    assert first.loss == pytest.approx(sum(losses) / 12, rel=1e-6)  # equal batches: the mean
    second = engine.train_one_epoch(model, loader, criterion, optimizer, device=CPU)
    assert second.loss < first.loss and second.accuracy == 1.0
    assert engine.evaluate(model, loader, num_classes=3, device=CPU).accuracy == 1.0


def test_the_scheduler_steps_once_per_batch():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    loader = _loader(torch.randn(12, 2), torch.zeros(12, dtype=torch.long), batch_size=4)
    engine.train_one_epoch(
        model, loader, nn.CrossEntropyLoss(), optimizer, device=CPU, scheduler=scheduler
    )
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0 / 4)  # three steps taken


def test_a_stop_request_ends_the_epoch_before_the_next_batch():
    model = nn.Linear(2, 2)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    with pytest.raises(TrainingStopped):
        engine.train_one_epoch(
            model,
            _loader(torch.randn(12, 2), torch.zeros(12, dtype=torch.long)),
            nn.CrossEntropyLoss(),
            torch.optim.SGD(model.parameters(), lr=0.1),
            device=CPU,
            should_stop=lambda: len(seen) == 1,
            on_batch=lambda step, loss: seen.append(step),
        )
    assert seen == [0]  # one batch trained, the second never started
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_uint8_batches_need_a_normalize_and_are_normalised_on_the_device():
    images = torch.full((4, 3, 2, 2), 255, dtype=torch.uint8)
    targets = torch.zeros(4, dtype=torch.long)

    class Mean(nn.Module):
        def forward(self, x):
            self.seen = x
            return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)

    with pytest.raises(TypeError, match="uint8 batches need a `normalize`"):
        engine.evaluate(Mean(), _loader(images, targets), num_classes=2, device=CPU)
    model = Mean()
    normalize = DeviceNormalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    engine.evaluate(model, _loader(images, targets), num_classes=2, device=CPU, normalize=normalize)
    assert model.seen.dtype == torch.float32
    assert torch.allclose(model.seen, torch.full_like(model.seen, (1.0 - 0.5) / 0.25))


def test_sums_go_through_the_reduce_the_caller_passes():
    """What a distributed job's all-reduce does: the totals of every process, here this one's
    twice, so counts double and the means stay."""
    logits = torch.eye(3)
    images = torch.arange(3.0).view(3, 1, 1, 1)
    targets = torch.arange(3)
    one = engine.evaluate(_Fixed(logits), _loader(images, targets), num_classes=3, device=CPU)
    two = engine.evaluate(
        _Fixed(logits),
        _loader(images, targets),
        num_classes=3,
        device=CPU,
        reduce=lambda t: t * 2,
    )
    assert (two.images, two.accuracy, two.loss) == (2 * one.images, one.accuracy, one.loss)
