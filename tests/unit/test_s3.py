"""S3 downloads (`report`/`debug --target sagemaker`) against moto's server on 127.0.0.1: streamed
to a temporary file within a bound, unpacked by the one unpack, refused in one line."""

import io
import os
import tarfile
from types import SimpleNamespace

import pytest

from imgclf import archives
from imgclf.errors import UserError
from imgclf.targets.sagemaker.s3 import (
    download_archive,
    download_job_output,
    downloaded,
    pack_model,
)
from tests.unit.test_archives import _Zeros, add_file, add_link

BUCKET = "imgclf-test"


@pytest.fixture
def s3(aws):
    client = aws.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


def tar_gz(build) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as tar:
        build(tar)
    return buf.getvalue()


def zeros(tar, size=128 << 20):
    info = tarfile.TarInfo("model.pt")
    info.size = size
    tar.addfile(info, io.BufferedReader(_Zeros(size), 1 << 20))


def test_an_object_is_streamed_to_a_temporary_file_removed_afterwards(s3, tmp_path):
    body = os.urandom(3 << 20)
    s3.put_object(Bucket=BUCKET, Key="a/model.tar.gz", Body=body)
    with downloaded(s3, f"s3://{BUCKET}/a/model.tar.gz", folder=tmp_path) as path:
        assert path.parent == tmp_path and path.read_bytes() == body
    assert list(tmp_path.iterdir()) == []


def test_an_object_over_the_bound_is_not_downloaded(s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="big", Body=os.urandom(3 << 20))
    with (
        pytest.raises(UserError, match=f"larger than {1 << 20} bytes; not downloaded"),
        downloaded(s3, f"s3://{BUCKET}/big", max_bytes=1 << 20, folder=tmp_path),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_download_replaces_the_folder_of_an_earlier_one(s3, tmp_path):
    dest = tmp_path / "job" / "model"
    for content in (b"old", b"new"):
        s3.put_object(
            Bucket=BUCKET, Key="m.tar.gz", Body=tar_gz(lambda t, c=content: add_file(t, "m.pt", c))
        )
        download_archive(s3, f"s3://{BUCKET}/m.tar.gz", dest)
    assert (dest / "m.pt").read_bytes() == b"new"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]  # no temporary file left


@pytest.mark.parametrize(
    ("model", "said"),
    [
        (lambda t: add_link(t, "model.pt", "../../../../launch.py"), "symbolic link"),
        (zeros, "unpacks to more than"),  # 128 MiB of zeros in ~130 KB
    ],
    ids=["link", "zeros"],
)
def test_a_sagemaker_jobs_hostile_model_archive_is_refused_in_one_line(
    aws, s3, tmp_path, model, said
):
    sagemaker = aws.client("sagemaker")
    sagemaker.create_training_job(
        TrainingJobName="remote",
        AlgorithmSpecification={"TrainingImage": "img", "TrainingInputMode": "File"},
        RoleArn="arn:aws:iam::123456789012:role/imgclf-sagemaker",
        OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/jobs"},
        ResourceConfig={"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 5},
        StoppingCondition={"MaxRuntimeInSeconds": 60},
    )
    s3.put_object(Bucket=BUCKET, Key="jobs/remote/output/model.tar.gz", Body=tar_gz(model))
    s3.put_object(
        Bucket=BUCKET,
        Key="jobs/remote/output/output.tar.gz",
        Body=tar_gz(lambda t: add_file(t, "history.json", b"[]")),
    )
    dest = tmp_path / "home" / "sagemaker" / "remote"
    with pytest.raises(archives.Refused) as exc:
        download_job_output(SimpleNamespace(sagemaker=sagemaker, s3=s3), "remote", dest)
    assert "'model.pt' refused" in str(exc.value) and said in str(exc.value)
    assert "\n" not in str(exc.value)
    assert not (dest / "model").exists()
    assert list(dest.iterdir()) == []  # nothing half-unpacked, no temporary file


def test_a_packed_model_carries_its_onnx_graph_made_once_and_the_folder_is_left_alone(tmp_path):
    from imgclf import artifacts, graph
    from tests.conftest import random_model

    model = random_model(tmp_path / "model", ["001.cat", "002.dog"])
    before = sorted(p.name for p in model.iterdir())
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(pack_model(model))
    assert sorted(p.name for p in model.iterdir()) == before  # nothing written there
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    assert {"model.onnx", "model_onnx.json"} <= {p.name for p in unpacked.iterdir()}
    config, _ = artifacts.read_description(unpacked)
    assert not isinstance(graph.current_graph(unpacked, config), str)
    # A folder whose graph is current is packed as it is (no second export).
    assert graph.write_graph(model) is None
    again = tmp_path / "again.tar.gz"
    again.write_bytes(pack_model(model))
    with tarfile.open(again) as tar:
        packed = tar.extractfile("model.onnx").read()
    assert packed == (model / "model.onnx").read_bytes()
