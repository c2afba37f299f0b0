import json
import os
import stat

import pytest
import torch

from imgclf import artifacts
from imgclf.errors import UserError


def test_artifact_round_trip_is_weights_only(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(2)}
    artifacts.save_artifact(
        tmp_path,
        state_dict=state,
        labels=["cat", "dog"],
        config={"arch": "resnet18"},
        metrics={"test_acc": 0.5},
    )
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"])
    art = artifacts.load_artifact(tmp_path)
    assert art.labels == ["cat", "dog"]
    assert art.config["num_classes"] == 2 and art.config["arch"] == "resnet18"
    assert json.loads((tmp_path / "labels.json").read_text()) == {"0": "cat", "1": "dog"}


def test_artifact_files_are_readable_by_any_user_whatever_the_umask(tmp_path):
    # SageMaker tars model/ with its modes; a server of another uid must read the files.
    previous = os.umask(0o077)
    try:
        artifacts.save_artifact(
            tmp_path, state_dict={"w": torch.ones(1)}, labels=["a"], config={}, metrics={}
        )
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {
        "model.pt": 0o644,
        "labels.json": 0o644,
        "model_config.json": 0o644,
        "metrics.json": 0o644,
    }


def test_missing_or_corrupt_artifact_files_are_named(tmp_path):
    artifacts.save_artifact(tmp_path, state_dict={"w": torch.ones(1)}, labels=["a"], config={})
    (tmp_path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="model.pt"):
        artifacts.load_artifact(tmp_path)
    (tmp_path / "labels.json").unlink()
    with pytest.raises(UserError, match="labels.json"):
        artifacts.load_artifact(tmp_path)


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.pt"
    artifacts.atomic_save({"x": torch.ones(1)}, path)

    def broken(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        artifacts.atomic_write_bytes(path, broken)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_checkpoint_with_rng_state_loads_weights_only(tmp_path):
    torch.manual_seed(5)
    state = {"rng": artifacts.rng_state(), "epoch": 2}
    expected = torch.rand(3)
    artifacts.save_checkpoint(tmp_path, state)
    loaded = artifacts.load_checkpoint(tmp_path)
    artifacts.set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert artifacts.load_checkpoint(tmp_path / "none") is None
