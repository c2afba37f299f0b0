"""`launch.py transform --target sagemaker`: a batch transform job over an S3 prefix (a local
folder is uploaded first, unchanged files skipped), followed to its end, its `.out` files
downloaded beside each other in a local folder and `predictions.csv` written from them, the
same way the local target writes it.

Resumable as locally: the objects that already have a `.out` under the output prefix (and any
file over the payload limit, which would fail the whole job) are left out through a manifest
file, so a second run sends only the rest."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imgclf import transform as batch
from imgclf.contract import RESPONSE_FORMAT_ENV
from imgclf.errors import UserError
from imgclf.targets.base import TransformRequest, TransformResult
from imgclf.targets.sagemaker.aws import (
    AwsOptions,
    Clients,
    aws_errors,
    default_bucket,
    resolve_image,
    resolve_role,
)
from imgclf.targets.sagemaker.follow import LOG_GROUP_TRANSFORM, wait_for_transform
from imgclf.targets.sagemaker.requests import (
    DEFAULT_TRANSFORM_INSTANCE,
    model_request,
    transform_job_request,
    transform_manifest,
)
from imgclf.targets.sagemaker.s3 import downloaded, split_s3_uri, upload_tree
from imgclf.util import plain_dir

MAX_OUT_BYTES = 64 * 1024 * 1024  # one answer (a vectors row of 100000 classes is ~1 MB)


@dataclass(frozen=True)
class Place:
    """Where a transform reads or writes in S3 (prefix without slashes at either end)."""

    bucket: str
    prefix: str

    @classmethod
    def of(cls, uri: str) -> Place:
        bucket, key = split_s3_uri(uri)
        return cls(bucket, key.strip("/"))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/" if self.prefix else f"s3://{self.bucket}/"

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def objects(self, s3) -> dict[str, int]:
        """{key relative to the prefix: size} of every object under it (folders' markers
        left out)."""
        found = {}
        start = f"{self.prefix}/" if self.prefix else ""
        with aws_errors():
            for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            ):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        found[obj["Key"][len(start) :]] = obj["Size"]
        return found


def input_items(c: Clients, source: str, bucket: str) -> tuple[Place, list[batch.Item]]:
    """The input prefix and its files: an s3:// prefix as it is, a local folder uploaded to
    s3://BUCKET/imgclf/transform-input/<folder name>/ (files already there unchanged are not
    sent again)."""
    if source.startswith("s3://"):
        place = Place.of(source)
        items = [
            batch.Item(batch.check_rel(rel, place.uri), size)
            for rel, size in sorted(place.objects(c.s3).items())
        ]
        if not items:
            raise UserError(f"--input {source} holds no objects")
        return place, items
    folder = Path(source)
    items = batch.scan_folder(folder)
    place = Place(bucket, f"imgclf/transform-input/{folder.resolve().name}")
    sent = upload_tree(c.s3, folder, bucket, place.prefix)
    print(f"input at {place.uri}: {sent.uploaded} files uploaded, {sent.skipped} unchanged")
    return place, items


def output_places(output: str, bucket: str, home: Path) -> tuple[Place, Path]:
    """The S3 output prefix and the local folder the `.out` files and predictions.csv go to.
    An s3:// output is mirrored under <home>/sagemaker/transform/<bucket>/<prefix>; a local
    folder gets a prefix of its own in the default bucket (named from its path, so that the
    same command finds it again)."""
    if output.startswith("s3://"):
        place = Place.of(output)
        return place, home / "sagemaker" / "transform" / place.bucket / (place.prefix or "_")
    local = Path(output).resolve()
    tag = hashlib.sha256(str(local).encode()).hexdigest()[:8]
    return Place(bucket, f"imgclf/transform-output/{local.name}-{tag}"), local


def _model_labels(c: Clients, options: AwsOptions, model: str, name: str) -> list[str]:
    """The class names, for reading vectors answers: from the local model, else its tarball."""
    from imgclf.targets.sagemaker import resolve_model_s3

    if Path(model).exists():
        return batch.model_labels(Path(model))
    model_s3 = resolve_model_s3(c, options, model, name)  # a job's or an s3:// model: no upload
    with tempfile.TemporaryDirectory(prefix="imgclf-model-") as tmp:
        with downloaded(c.s3, model_s3, folder=Path(tmp)) as archive:
            named = archive.with_name("model.tar.gz")
            os.replace(archive, named)
            return batch.model_labels(named)


def download_outputs(c: Clients, place: Place, items: list[batch.Item], dest: Path) -> int:
    """Each item's `.out` under the output prefix into `dest` (those already there are kept);
    how many were downloaded."""
    have = place.objects(c.s3)
    count = 0
    for item in items:
        name = item.rel + batch.OUT_SUFFIX
        target = batch.out_path(dest, item.rel)
        if name not in have or target.is_file():
            continue
        plain_dir(target.parent, "output folder")
        uri = f"s3://{place.bucket}/{place.key(name)}"
        with downloaded(c.s3, uri, max_bytes=MAX_OUT_BYTES, folder=target.parent) as part:
            os.replace(part, target)
        count += 1
    return count


def run_transform(
    c: Clients, options: AwsOptions, request: TransformRequest, name: str
) -> TransformResult:
    image, role = resolve_image(options, "serve"), resolve_role(options)
    bucket = default_bucket(c, options)
    source, items = input_items(c, request.input, bucket)
    out, local = output_places(request.output, bucket, options.home)
    plain_dir(local, "output folder")
    answered = {rel.removesuffix(batch.OUT_SUFFIX) for rel in out.objects(c.s3)}
    big = {
        i.rel: batch.too_big_reason(i, request.max_payload_mb)
        for i in batch.oversized(items, request.max_payload_mb)
    }
    todo = [i for i in items if i.rel not in answered and i.rel not in big]
    labels = None
    details = [f"outputs at {out.uri}"]
    errors = dict(big)
    if todo:
        from imgclf.targets.sagemaker import resolve_model_s3

        model_s3 = resolve_model_s3(c, options, request.model, name)
        desc = _run_job(c, options, request, name, image, role, model_s3, source, out, todo, items)
        if desc is None:
            follow = (
                f"  follow: aws sagemaker describe-transform-job --transform-job-name {name}; "
                "then run the same command again to download the answers"
            )
            return TransformResult(
                name, len(items), 0, 0, "", out.uri, waited=False, details=(*details, follow)
            )
        status = desc["TransformJobStatus"]
        why = desc.get("FailureReason") or f"see CloudWatch {LOG_GROUP_TRANSFORM} {name}/"
        missing = f"no answer: transform job {name} {status} ({why})"
        errors.update({i.rel: missing for i in todo})  # for those that have no .out after all
        if status != "Completed":
            details.append(f"transform job {name} {status}: {why}")
    else:
        details.append(f"every file already has its answer in {out.uri}; no job created")
    if request.response_format == "vectors":
        labels = _model_labels(c, options, request.model, name)
    got = download_outputs(c, out, items, local)
    details.append(f"{got} answers downloaded to {local}")
    summary = batch.write_predictions(items, local, errors=errors, labels=labels)
    return TransformResult.of(name, summary, f"{local} (from {out.uri})", details)


def _run_job(
    c: Clients,
    options: AwsOptions,
    request: TransformRequest,
    name: str,
    image: str,
    role: str,
    model_s3: str,
    source: Place,
    out: Place,
    todo: list[batch.Item],
    items: list[batch.Item],
) -> dict | None:
    """Create the job's model and the job (a manifest of `todo` when it is not every item),
    follow it, then delete the model; None when not waiting (the model is left for the job)."""
    input_s3, manifest = source.uri, len(todo) != len(items)
    if manifest:
        key = f"imgclf/transform-manifests/{name}.manifest"
        body = transform_manifest(source.uri, [i.rel for i in todo]).encode()
        with aws_errors():
            c.s3.put_object(Bucket=out.bucket, Key=key, Body=body)
        input_s3 = f"s3://{out.bucket}/{key}"
    environment = (
        {RESPONSE_FORMAT_ENV: request.response_format} if request.response_format else None
    )
    job = transform_job_request(
        job_name=name,
        model_name=name,
        input_s3=input_s3,
        output_s3=out.uri,
        manifest=manifest,
        max_payload_mb=request.max_payload_mb,
        max_concurrent=request.concurrency,
        accept=request.accept,
        environment=environment,
        instance_type=options.instance_type or DEFAULT_TRANSFORM_INSTANCE,
        instance_count=options.instance_count,
    )
    with aws_errors():
        c.sagemaker.create_model(
            **model_request(name=name, image=image, model_s3=model_s3, role_arn=role)
        )
    try:
        with aws_errors():
            c.sagemaker.create_transform_job(**job)
    except BaseException:
        c.sagemaker.delete_model(ModelName=name)
        raise
    resources = job["TransformResources"]
    print(
        f"transform job {name} created: {len(todo)} of {len(items)} files, "
        f"{resources['InstanceCount']} x {resources['InstanceType']}, image {image}",
        flush=True,
    )
    if not options.wait:
        return None
    desc = wait_for_transform(c, name, poll_s=options.poll_s)
    with aws_errors():  # the job has ended: its model is no longer needed
        c.sagemaker.delete_model(ModelName=name)
    return desc
