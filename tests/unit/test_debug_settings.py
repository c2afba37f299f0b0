"""When the smdebug hook turns on: one path (debug=true) on every target, and SageMaker's own
DebugHookConfig file only when it names collections."""

import json

from imgclf.contract import DEBUG_COLLECTIONS, Layout
from imgclf.debugging.hook import read_settings
from imgclf.targets.sagemaker.requests import debugger_configs


def _layout(tmp_path, doc=None) -> Layout:
    layout = Layout(tmp_path / "ml")
    layout.config_dir.mkdir(parents=True)
    if doc is not None:
        (layout.config_dir / "debughookconfig.json").write_text(json.dumps(doc))
    return layout


def test_debug_true_records_into_output_data_on_every_target(tmp_path):
    layout = _layout(tmp_path)
    assert read_settings(layout, debug=False) is None
    settings = read_settings(layout, debug=True)
    assert settings.out_dir == layout.output_data_dir / "tensors"  # in output.tar.gz
    assert settings.collections == DEBUG_COLLECTIONS


def test_the_sdks_default_hook_config_alone_leaves_the_hook_off(tmp_path):
    # What a plain Estimator makes SageMaker write: a path and no collections.
    default = {"S3OutputPath": "s3://b/debug", "LocalPath": "/opt/ml/output/tensors"}
    assert read_settings(_layout(tmp_path / "a", default), debug=False) is None
    on = read_settings(_layout(tmp_path / "b", default), debug=True)
    assert on is not None and on.out_dir == tmp_path / "b" / "ml" / "output" / "tensors"
    named = {**default, "CollectionConfigurations": [{"CollectionName": "losses"}]}
    settings = read_settings(_layout(tmp_path / "c", named), debug=False)
    assert settings is not None and settings.source == "debughookconfig.json"


def test_sagemaker_debugger_asks_for_the_same_save_intervals():
    hook = debugger_configs("eu-west-1", "s3://b/out")["DebugHookConfig"]
    sent = {
        c["CollectionName"]: int(c["CollectionParameters"]["save_interval"])
        for c in hook["CollectionConfigurations"]
    }
    assert sent == DEBUG_COLLECTIONS
