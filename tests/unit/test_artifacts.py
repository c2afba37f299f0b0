import json
import os
import stat

import pytest
import torch

from imgclf import artifacts
from imgclf.errors import UserError
from tests.conftest import random_model


def test_artifact_round_trip_is_weights_only(tmp_path):
    random_model(tmp_path, ["001.cat", "002.dog"])
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert loaded["fc.weight"].shape == (2, 512)
    art = artifacts.load_artifact(tmp_path)
    assert art.labels == ["cat", "dog"]
    assert art.config["num_classes"] == 2 and art.arch == "resnet18"
    assert art.preprocess.image_size == 32
    assert torch.equal(art.state_dict["fc.weight"], loaded["fc.weight"])
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
    random_model(tmp_path, ["001.a", "002.b"])
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


# ---------------------------------------------------------------- absurd artifacts
# Each is refused by load_artifact (and so by the endpoint's model_fn) in one line that names
# the file, the key and what is accepted, before model.pt is read or a model is built.


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("good"), ["001.cat", "002.dog"])


def _copy(good_model, tmp_path, *, config=None, labels=None, weights=None):
    """The good artifact with model_config.json / labels.json changed by a function of the
    parsed JSON, or replaced by text; model.pt replaced by `weights` (bytes), if given."""
    import shutil

    folder = shutil.copytree(good_model, tmp_path / "model")
    for name, change in (("model_config.json", config), ("labels.json", labels)):
        if change is None:
            continue
        path = folder / name
        value = change(json.loads(path.read_text())) if callable(change) else change
        path.write_text(value if isinstance(value, str) else json.dumps(value))
    if weights is not None:
        (folder / "model.pt").write_bytes(weights)
    return folder


def _preprocess(**changes):
    def change(config):
        config["preprocess"].update(changes)
        return config

    return change


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        # the audit's 10.8 GB allocation
        (_preprocess(image_size=60000), ["preprocess.image_size is 60000", "16 to 2048"]),
        (_preprocess(image_size="224"), ["preprocess.image_size is '224'", "an integer"]),
        (_preprocess(image_size=True), ["preprocess.image_size is True", "an integer"]),
        (_preprocess(resize_size=10**6), ["preprocess.resize_size is 1000000", "32 to 64"]),
        (_preprocess(std=[0.2, 0.0, 0.2]), ["preprocess.std is [0.2, 0.0, 0.2]", "0.001 to 1"]),
        (_preprocess(mean=[0.5, 0.5]), ["preprocess.mean", "a list of 3 numbers"]),
        (_preprocess(mean=[0.5, float("nan"), 0.5]), ["preprocess.mean", "0 to 1"]),
        (_preprocess(interpolation="lanczos"), ["interpolation is 'lanczos'", "bilinear"]),
        (lambda c: {**c, "preprocess": [224]}, ["preprocess is a list", "expected an object"]),
        (lambda c: {k: v for k, v in c.items() if k != "preprocess"}, ["preprocess is None"]),
        (lambda c: {**c, "arch": "os.system"}, ["arch is 'os.system'", "resnet18, resnet34"]),
        (lambda c: {**c, "num_classes": 1_500_000}, ["num_classes is 1500000", "1 to 100000"]),
        (lambda c: {**c, "format": 7}, ["format is 7", "reads format 1"]),
        (lambda c: {**c, "classes": ["x"]}, ["classes is not a list of 2 folder names"]),
        (lambda c: {**c, "temperature": 0}, ["temperature is 0", "0.01 to 100"]),
        (lambda c: {**c, "temperature": "2"}, ["temperature is '2'", "0.01 to 100"]),
        (lambda c: {**c, "thresholds": [0.5]}, ["thresholds is not a list of 2 numbers"]),
        (lambda c: {**c, "thresholds": [0.5, 1.5]}, ["thresholds", "from 0 to 1"]),
        (lambda c: [c], ["model_config.json is a list", "expected an object"]),
        ("{not json", ["model_config.json is not valid JSON"]),
    ],
)
def test_absurd_model_configs_are_refused(good_model, tmp_path, change, fragments):
    _assert_refused(_copy(good_model, tmp_path, config=change), "model_config.json", fragments)


@pytest.mark.parametrize(
    ("labels", "fragments"),
    [
        # the audit's "list indices must be integers"
        (["cat", "dog"], ["labels.json is a list", 'expected an object {"0"']),
        ({"0": "cat", "x": "dog"}, ["key 'x' is not accepted", '"0" to "1"']),
        ({"0": "cat", "1": ""}, ["\"1\" is ''", "1 to 256 characters"]),
        ({"0": "cat", "1": "d" * 300}, ['"1" is', "1 to 256 characters"]),
        ({"0": "cat", "1": ["dog"]}, ["\"1\" is ['dog']", "accepted text"]),
        ({}, ["holds 0 labels", "1 to 100000"]),
        ("[[[[[[", ["labels.json is not valid JSON"]),
    ],
)
def test_absurd_labels_are_refused(good_model, tmp_path, labels, fragments):
    _assert_refused(_copy(good_model, tmp_path, labels=labels), "labels.json", fragments)


def _assert_refused(folder, file_name, fragments):
    """load_artifact refuses `folder` in one line naming `file_name` and every fragment."""
    with pytest.raises(UserError) as err:
        artifacts.load_artifact(folder)
    message = str(err.value)
    assert file_name in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_the_files_are_checked_before_model_pt_is_read(good_model, tmp_path):
    # model.pt is not a torch file at all: the JSON files' refusals come first
    broken = _copy(
        good_model, tmp_path, config=_preprocess(image_size=60000), weights=b"never read"
    )
    with pytest.raises(UserError, match="preprocess.image_size is 60000"):
        artifacts.load_artifact(broken)
    (broken / "model_config.json").write_text((good_model / "model_config.json").read_text())
    (broken / "labels.json").write_text('["cat", "dog"]')
    with pytest.raises(UserError, match="labels.json is a list"):
        artifacts.load_artifact(broken)


def test_a_million_and_a_half_labels_are_refused_before_parsing(good_model, tmp_path):
    # the audit's 12.3 GB: 1.5 M labels, and num_classes to match
    text = "{" + ",".join(f'"{i}":"x"' for i in range(1_500_000)) + "}"
    broken = _copy(
        good_model, tmp_path, config=lambda c: {**c, "num_classes": 1_500_000}, labels=text
    )
    with pytest.raises(UserError, match="num_classes is 1500000: accepted an integer from 1 to"):
        artifacts.load_artifact(broken)
    # the file alone: refused by its size, never read whole nor parsed
    (broken / "model_config.json").write_text((good_model / "model_config.json").read_text())
    with pytest.raises(UserError, match=r"labels.json is 19888891 bytes: accepted up to 16777216"):
        artifacts.load_artifact(broken)


def test_more_labels_than_the_bound_are_refused(good_model, tmp_path):
    many = {str(i): f"class {i}" for i in range(artifacts.MAX_LABELS + 1)}
    broken = _copy(good_model, tmp_path, labels=many)
    with pytest.raises(UserError, match="labels.json holds 100001 labels: accepted 1 to 100000"):
        artifacts.load_artifact(broken)


def test_labels_and_num_classes_must_agree(good_model, tmp_path):
    broken = _copy(good_model, tmp_path, labels={"0": "cat", "1": "dog", "2": "eel"})
    with pytest.raises(UserError, match="names 3 labels but model_config.json says num_classes 2"):
        artifacts.load_artifact(broken)


def test_a_model_file_larger_than_its_architecture_is_refused_unread(good_model, tmp_path):
    broken = _copy(good_model, tmp_path)
    with (broken / "model.pt").open("r+b") as handle:
        handle.truncate(10 * 1024**3)  # sparse: 10 GiB that cost nothing to make
    with pytest.raises(UserError) as err:
        artifacts.load_artifact(broken)
    message = str(err.value)
    assert "model.pt is 10737418240 bytes: accepted up to" in message, message
    assert "what resnet18 with 2 classes holds" in message


def _three_classes(config):
    return {**config, "num_classes": 3, "classes": ["001.cat", "002.dog", "003.eel"]}


def test_weights_that_do_not_fit_the_architecture_are_refused_before_any_model_is_built(
    good_model, tmp_path
):
    broken = _copy(
        good_model,
        tmp_path,
        config=_three_classes,
        labels={"0": "cat", "1": "dog", "2": "eel"},
    )
    with pytest.raises(UserError) as err:
        artifacts.load_artifact(broken)
    assert "model.pt does not fit resnet18 with 3 classes: fc.weight is 2x512 torch.float32, " + (
        "expected 3x512 torch.float32"
    ) in str(err.value)

    artifacts.atomic_save({"w": torch.ones(2)}, broken / "model.pt")
    with pytest.raises(UserError, match=r"missing \(e.g. \['conv1.weight'.*1 unexpected"):
        artifacts.load_artifact(broken)
    state = torch.load(good_model / "model.pt", weights_only=True)
    state["fc.bias"] = state["fc.bias"].double()
    artifacts.atomic_save(state, broken / "model.pt")
    (broken / "model_config.json").write_text((good_model / "model_config.json").read_text())
    (broken / "labels.json").write_text((good_model / "labels.json").read_text())
    with pytest.raises(UserError, match="fc.bias is 2 torch.float64, expected 2 torch.float32"):
        artifacts.load_artifact(broken)
    artifacts.atomic_save([1, 2], broken / "model.pt")
    with pytest.raises(UserError, match="model.pt does not fit resnet18 with 2 classes: it holds"):
        artifacts.load_artifact(broken)


def test_the_endpoint_inherits_the_checks(good_model, tmp_path):
    from imgclf.serving import inference

    # (model.pt unreadable: the code before this change would build the 60000 px model)
    broken = _copy(good_model, tmp_path, config=_preprocess(image_size=60000), weights=b"-")
    with pytest.raises(UserError, match="preprocess.image_size is 60000"):
        inference.model_fn(broken)


def test_an_exception_without_text_is_still_named():
    from imgclf.errors import reason

    assert reason(MemoryError()) == "MemoryError"
    assert reason(ValueError("bad\n  value")) == "ValueError: bad value"
