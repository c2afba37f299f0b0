"""`train --init-from`: the model channel read (a model dir or the model.tar.gz SageMaker puts
there), the head's rows carried over by label name, and what is refused."""

import tarfile

import pytest
import torch

from imgclf import incremental, models
from imgclf.errors import UserError
from tests.conftest import random_model

OLD = ["001.zero", "002.one", "003.two"]


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("start") / "model", OLD)


def test_head_rows_follow_the_label_names():
    assert incremental.head_rows(["zero", "one", "two"], ["two", "new", "zero"]) == [2, None, 0]
    assert incremental.head_rows(["a", "b"], ["a", "b"]) == [0, 1]


def test_a_grown_class_set_keeps_every_old_answer_and_a_fresh_row_for_the_new_class(start_dir):
    """Renumbered folders (a class added in front) still find their rows by label name; the
    network answers for the old classes exactly as the start model did."""
    start = incremental.load_start_model(start_dir)
    new = ["001.three", "002.zero", "003.one", "004.two"]
    plan = incremental.plan_head(start, new, arch="resnet18")
    assert plan.rows == [None, 0, 1, 2]
    assert (plan.kept, plan.added, plan.dropped) == (["zero", "one", "two"], ["three"], [])

    torch.manual_seed(1)
    model = models.build_model("resnet18", len(new))
    fresh_row = model.fc.weight[0].detach().clone()
    incremental.start_network(model, start, plan, arch="resnet18")
    old_model = models.build_model("resnet18", len(OLD))
    old_model.load_state_dict(start.artifact.state_dict)
    for name, tensor in old_model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model.fc.weight[0], fresh_row)  # the new class starts fresh

    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        got = model.eval()(images)
        expected = old_model.eval()(images)
    assert torch.allclose(got[:, 1:], expected, atol=1e-5)

    record = incremental.record(start, plan)
    assert record["classes"] == OLD and record["added"] == ["three"]
    assert len(record["model_sha256"]) == 64


def test_the_same_class_set_loads_every_weight(start_dir):
    start = incremental.load_start_model(start_dir)
    plan = incremental.plan_head(start, OLD, arch="resnet18")
    model = models.build_model("resnet18", 3)
    incremental.start_network(model, start, plan, arch="resnet18")
    for name, tensor in start.artifact.state_dict.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_removed_class_is_refused_unless_asked_for(start_dir):
    start = incremental.load_start_model(start_dir)
    with pytest.raises(UserError, match=r"1 classes the data lacks \(two\).*init_drop_classes"):
        incremental.plan_head(start, ["001.zero", "002.one"], arch="resnet18")
    plan = incremental.plan_head(
        start, ["001.zero", "002.one"], arch="resnet18", allow_dropped=True
    )
    assert plan.rows == [0, 1] and plan.dropped == ["two"]


def test_another_architecture_is_refused_in_one_line(start_dir):
    start = incremental.load_start_model(start_dir)
    with pytest.raises(UserError) as caught:
        incremental.plan_head(start, OLD, arch="resnet50")
    message = str(caught.value)
    assert "\n" not in message
    assert "resnet18" in message and "resnet50" in message and "--hp arch=resnet18" in message


def test_repeated_label_names_match_by_folder_name(tmp_path):
    start = incremental.load_start_model(random_model(tmp_path / "m", ["001.cat", "002.cat"]))
    plan = incremental.plan_head(start, ["002.cat", "001.cat", "003.dog"], arch="resnet18")
    assert plan.rows == [1, 0, None]


def test_the_channel_may_hold_the_model_tar_gz_sagemaker_downloads(tmp_path, start_dir):
    channel = tmp_path / "channel"
    channel.mkdir()
    with tarfile.open(channel / "model.tar.gz", "w:gz") as tar:
        for path in sorted(start_dir.iterdir()):
            tar.add(path, arcname=path.name)
    start = incremental.load_start_model(channel)
    assert start.artifact.labels == ["zero", "one", "two"]
    assert start.sha256 == incremental.load_start_model(start_dir).sha256
    assert list(channel.iterdir()) == [channel / "model.tar.gz"]  # unpacked elsewhere


def test_a_channel_without_a_model_is_refused_naming_what_it_holds(tmp_path):
    channel = tmp_path / "channel"
    channel.mkdir()
    (channel / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match=r"holds weights\.bin: --init-from needs a model dir"):
        incremental.load_start_model(channel)
