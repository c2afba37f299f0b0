"""S3: incremental upload of a dataset (size + ETag), model packing, job output download
(streamed to a temporary file within a size bound, then unpacked by `archives.unpack`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgclf import archives
from imgclf.contract import MODEL_FILE, Layout
from imgclf.errors import UserError
from imgclf.targets.sagemaker.aws import Clients, aws_errors
from imgclf.util import plain_dir

log = logging.getLogger("imgclf.sagemaker")

MULTIPART_BYTES = 64 * 1024 * 1024  # upload part size; also how the ETag is computed


# ---------------------------------------------------------------- S3 upload


def s3_etag(path: Path, part_size: int = MULTIPART_BYTES) -> str:
    """The ETag S3 gives an upload of this file made with `part_size` parts (no SSE-KMS)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= part_size:
            return hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
        digests = []
        while chunk := f.read(part_size):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    joined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{joined}-{len(digests)}"


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise UserError(f"{uri} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


@dataclass
class UploadResult:
    uri: str
    uploaded: int
    skipped: int
    bytes_sent: int


def upload_tree(
    s3, local_dir: Path, bucket: str, prefix: str, *, progress: bool = True
) -> UploadResult:
    """Upload every file under `local_dir` to s3://bucket/prefix/, skipping files already there
    with the same size and ETag (a re-run of an unchanged dataset sends nothing), and hidden
    ones."""
    from boto3.s3.transfer import TransferConfig
    from tqdm import tqdm

    prefix = prefix.strip("/")
    files = sorted(  # hidden files and folders (.DS_Store, .git) are left out
        p
        for p in local_dir.rglob("*")
        if p.is_file() and not any(x.startswith(".") for x in p.relative_to(local_dir).parts)
    )
    if not files:
        raise UserError(f"{local_dir} holds no files to upload")
    existing: dict[str, tuple[int, str]] = {}
    with aws_errors():
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/"
        ):
            for obj in page.get("Contents", []):
                existing[obj["Key"]] = (obj["Size"], obj["ETag"].strip('"'))
    todo = []
    for path in files:
        key = f"{prefix}/{path.relative_to(local_dir).as_posix()}"
        size = path.stat().st_size
        have = existing.get(key)
        if have and have[0] == size and have[1] == s3_etag(path):
            continue
        todo.append((path, key, size))
    config = TransferConfig(
        multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES
    )
    total = sum(size for _, _, size in todo)
    with (
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"upload to s3://{bucket}/{prefix}",
            disable=not progress or not todo,
            file=sys.stderr,
        ) as bar,
        aws_errors(),
    ):
        for path, key, _ in todo:
            s3.upload_file(str(path), bucket, key, Config=config, Callback=bar.update)
    return UploadResult(f"s3://{bucket}/{prefix}/", len(todo), len(files) - len(todo), total)


def pack_model(model_dir: Path, *, make_graph: bool = True) -> bytes:
    """model.tar.gz of a local model dir (the layout SageMaker unpacks into /opt/ml/model).
    A folder without an ONNX graph recorded for its model.pt (made before graphs were, or by
    a job whose image lacked `onnx`) gets one in the archive, made here once (imgclf.graph;
    torch, seconds) rather than by every endpoint at every start; the folder is not changed.
    Where it cannot be made, the archive goes without it (the endpoint then exports it)."""
    if not (model_dir / MODEL_FILE).is_file():
        raise UserError(f"{model_dir} is not a model dir (no {MODEL_FILE}); pass a job's model/")
    with tempfile.TemporaryDirectory(prefix="imgclf-graph-") as extra:
        made = _graph_for(model_dir, Path(extra)) if make_graph else {}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in sorted(model_dir.iterdir()):
                if path.is_file() and path.name not in made:
                    tar.add(path, arcname=path.name)
            for name, path in sorted(made.items()):
                tar.add(path, arcname=name)
        return buf.getvalue()


def _graph_for(model_dir: Path, extra: Path) -> dict[str, Path]:
    """{name: file} of a graph and record made into `extra` for `model_dir`, or {} where the
    folder's own are current (or none can be made: logged)."""
    from imgclf import artifacts, graph
    from imgclf.contract import GRAPH_FILE, GRAPH_RECORD_FILE

    try:
        config, _ = artifacts.read_description(model_dir)
    except UserError:
        return {}  # the endpoint's preflight names what is wrong with it
    if graph.graph_record_problem(model_dir, config) is None:
        return {}
    why_not = graph.write_graph(model_dir, into=extra)
    if why_not is not None:
        log.warning("model.tar.gz without an ONNX graph (endpoints export it): %s", why_not)
        return {}
    return {name: extra / name for name in (GRAPH_FILE, GRAPH_RECORD_FILE)}


@contextlib.contextmanager
def downloaded(
    s3, uri: str, *, max_bytes: int = archives.LIMITS.max_bytes, folder: Path | None = None
) -> Iterator[Path]:
    """The S3 object at `uri` streamed into a temporary file (in `folder`), removed afterwards.
    Read in chunks, never whole into memory; refused past `max_bytes`, by its stated length
    and by the bytes really received."""
    bucket, key = split_s3_uri(uri)
    with aws_errors():
        response = s3.get_object(Bucket=bucket, Key=key)
    body = response["Body"]
    too_big = UserError(f"{uri} is larger than {max_bytes} bytes; not downloaded")
    if response.get("ContentLength", 0) > max_bytes:
        body.close()
        raise too_big
    fd, name = tempfile.mkstemp(prefix=".download.", suffix=".part", dir=folder)
    path = Path(name)
    try:
        received = 0
        with os.fdopen(fd, "wb") as out, aws_errors():
            for chunk in body.iter_chunks(archives.CHUNK_BYTES):
                received += len(chunk)
                if received > max_bytes:
                    raise too_big
                out.write(chunk)
        yield path
    finally:
        body.close()
        path.unlink(missing_ok=True)


def download_archive(
    s3, uri: str, dest: Path, *, limits: archives.Limits = archives.LIMITS
) -> Path:
    """The tar.gz at `uri` unpacked into `dest` (replaced when it exists: a re-download)."""
    plain_dir(dest.parent)
    with downloaded(s3, uri, max_bytes=limits.max_bytes, folder=dest.parent) as archive:
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif dest.exists():
            shutil.rmtree(dest)
        return archives.unpack(archive, dest, limits=limits)


def download_job_output(c: Clients, job_name: str, dest: Path) -> Path:
    """A SageMaker job's model.tar.gz and output.tar.gz unpacked into a local job dir
    (model/ and output/data/), for `launch.py report` and `debug`."""
    with aws_errors():
        desc = c.sagemaker.describe_training_job(TrainingJobName=job_name)
    model_uri = desc.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if not model_uri:
        raise UserError(f"training job {job_name} has no output yet ({desc['TrainingJobStatus']})")
    output_uri = model_uri.rsplit("/", 1)[0] + "/output.tar.gz"
    layout = Layout(dest)  # laid out as a local job dir: JobOutputs reads both alike
    for uri, folder in ((model_uri, layout.model_dir), (output_uri, layout.output_data_dir)):
        download_archive(c.s3, uri, folder)
    return dest
