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
    check_in_flight,
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


def input_items(c: Clients, source: str, bucket: str) -> tuple[Place, list[batch.Item], bool]:
    """The input prefix, its files, and whether they came from a local folder: an s3:// prefix
    as it is; a folder uploaded to s3://BUCKET/imgclf/transform-input/<name>-<hash of its
    path>/ (files already there unchanged are not sent again). A folder's job always lists its
    files in a manifest: the prefix may hold files since deleted here."""
    if source.startswith("s3://"):
        place = Place.of(source)
        items = [
            batch.Item(batch.check_rel(rel, place.uri), size)
            for rel, size in sorted(place.objects(c.s3).items())
        ]
        if not items:
            raise UserError(f"--input {source} holds no objects")
        return place, items, False
    folder = Path(source)
    items = batch.scan_folder(folder)
    place = Place(bucket, f"imgclf/transform-input/{_path_tag(folder)}")
    sent = upload_tree(c.s3, folder, bucket, place.prefix)
    print(f"input at {place.uri}: {sent.uploaded} files uploaded, {sent.skipped} unchanged")
    return place, items, True


def _path_tag(folder: Path) -> str:
    """<folder name>-<8 hex of its absolute path>: two folders of one name stay apart."""
    local = folder.resolve()
    return f"{local.name}-{hashlib.sha256(str(local).encode()).hexdigest()[:8]}"


def check_places(source: str, output: str) -> None:
    """Before anything is uploaded: an output folder that is a file, or an output that
    overlaps the input (its answers would become inputs of the next run)."""
    if "://" not in output:
        if "://" not in source:
            batch.check_folders(Path(source), Path(output))
        batch.check_output_folder(Path(output))
        return
    out = Place.of(output)
    if out.prefix:
        batch.check_rel(out.prefix, "--output")
    if source.startswith("s3://"):
        into = Place.of(source)
        a, b = f"{into.prefix}/", f"{out.prefix}/"
        if into.bucket == out.bucket and (a.startswith(b) or b.startswith(a)):
            raise UserError(
                f"--output {output} and --input {source} overlap; write the answers under a "
                "prefix outside the input"
            )


def output_places(output: str, bucket: str, home: Path) -> tuple[Place, Path]:
    """The S3 output prefix and the local folder the `.out` files and predictions.csv go to.
    An s3:// output is mirrored under <home>/sagemaker/transform/<bucket>/<prefix>; a local
    folder gets a prefix of its own in the default bucket (named from its path, so that the
    same command finds it again)."""
    if output.startswith("s3://"):
        place = Place.of(output)
        return place, home / "sagemaker" / "transform" / place.bucket / (place.prefix or "_")
    return Place(bucket, f"imgclf/transform-output/{_path_tag(Path(output))}"), Path(output)


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


def download_outputs(
    c: Clients, place: Place, answers: dict[str, str], dest: Path
) -> tuple[int, dict[str, str]]:
    """Each answer (input path -> its key under the output prefix) into `dest` as
    `<path>.out`, those already there kept: how many were downloaded, and the reason for each
    that could not be."""
    count, errors = 0, {}
    for rel, key in sorted(answers.items()):
        target = batch.out_path(dest, rel)
        if target.is_file():
            continue
        plain_dir(target.parent, "output folder")
        uri = f"s3://{place.bucket}/{place.key(key)}"
        try:
            with downloaded(c.s3, uri, max_bytes=MAX_OUT_BYTES, folder=target.parent) as part:
                os.replace(part, target)
        except UserError as exc:  # one answer too large (or gone): its row says so
            errors[rel] = f"its answer {uri} was not downloaded: {exc}"
            continue
        count += 1
    return count, errors


def running_job(c: Clients, out: Place) -> str | None:
    """A transform job still writing under this output prefix (a --no-wait run's, or one left
    running after Ctrl-C): a rerun follows it instead of sending the same files again."""
    with aws_errors():
        pages = c.sagemaker.get_paginator("list_transform_jobs").paginate(StatusEquals="InProgress")
        for page in pages:
            for job in page.get("TransformJobSummaries", []):
                name = job["TransformJobName"]
                desc = c.sagemaker.describe_transform_job(TransformJobName=name)
                path = desc.get("TransformOutput", {}).get("S3OutputPath", "")
                if Place.of(path) == out:
                    return name
    return None


def free_name(c: Clients, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... when a job of that name exists (a job name is
    unique in a region for good: a rerun of the same command needs another)."""
    from botocore.exceptions import ClientError

    for n in range(1, 100):
        candidate = name if n == 1 else f"{name[: 63 - len(str(n)) - 1]}-{n}"
        try:
            c.sagemaker.describe_transform_job(TransformJobName=candidate)
        except ClientError:
            return candidate
    raise UserError(f"transform jobs {name} to {name}-99 exist; pass another --job-name")


def _drop_model(c: Clients, name: str) -> None:
    """The model made for job `name`, removed once the job has ended (or is stopping)."""
    from botocore.exceptions import ClientError

    try:
        status = c.sagemaker.describe_transform_job(TransformJobName=name)["TransformJobStatus"]
        if status == "InProgress":
            print(
                f"model {name} is left for the running job; after it ends: "
                f"aws sagemaker delete-model --model-name {name}"
            )
            return
        c.sagemaker.delete_model(ModelName=name)
    except ClientError:
        pass  # already gone


def run_transform(
    c: Clients, options: AwsOptions, request: TransformRequest, name: str
) -> TransformResult:
    check_places(request.input, request.output)
    check_in_flight(request.concurrency, request.max_payload_mb)
    image, role = resolve_image(options, "serve"), resolve_role(options)
    bucket = default_bucket(c, options)
    out, local = output_places(request.output, bucket, options.home)
    details = [f"outputs at {out.uri}"]
    running = running_job(c, out)
    if running:  # nothing is uploaded or sent again: follow it, then download
        print(f"transform job {running} is still writing to {out.uri}: following it")
        if not options.wait:
            return _not_waited(running, out, details)
        _ended(wait_for_transform(c, running, poll_s=options.poll_s), details)
        _drop_model(c, running)  # then what it left without an answer is sent below
    source, items, listed = input_items(c, request.input, bucket)
    plain_dir(local, "output folder")
    answers = batch.answer_keys(out.objects(c.s3), (i.rel for i in items))
    big = {
        i.rel: batch.too_big_reason(i, request.max_payload_mb)
        for i in batch.oversized(items, request.max_payload_mb)
    }
    todo = [i for i in items if i.rel not in answers and i.rel not in big]
    errors = dict(big)
    if todo:
        from imgclf.targets.sagemaker import resolve_model_s3

        name = free_name(c, name)
        model_s3 = resolve_model_s3(c, options, request.model, name)
        manifest = listed or len(todo) != len(items)
        job = _run_job(
            c, options, request, name, (image, role, model_s3), source, out, todo, manifest
        )
        if job is None:
            return _not_waited(name, out, details)
        errors.update({i.rel: _ended(job, details) for i in todo})  # if no .out after all
    else:
        details.append(f"every file already has its answer in {out.uri}; no job created")
    labels = (
        _model_labels(c, options, request.model, name)
        if request.response_format == "vectors"
        else None
    )
    answers = batch.answer_keys(out.objects(c.s3), (i.rel for i in items))
    got, failed = download_outputs(c, out, answers, local)
    errors.update(failed)
    details.append(f"{got} answers downloaded to {local}")
    summary = batch.write_predictions(items, local, errors=errors, labels=labels)
    return TransformResult.of(name, summary, f"{local} (from {out.uri})", details)


def _ended(desc: dict, details: list[str]) -> str:
    """A followed job's end, said in `details` when it did not complete; the reason a file it
    was sent has no answer."""
    name, status = desc["TransformJobName"], desc["TransformJobStatus"]
    why = desc.get("FailureReason") or f"see CloudWatch {LOG_GROUP_TRANSFORM} {name}/"
    if status != "Completed":
        details.append(f"transform job {name} {status}: {why}")
    return f"no answer: transform job {name} {status} ({why})"


def _not_waited(name: str, out: Place, details: list[str]) -> TransformResult:
    follow = (
        f"  follow: aws sagemaker describe-transform-job --transform-job-name {name}; the same "
        "command again follows it, then downloads the answers and writes predictions.csv"
    )
    return TransformResult(name, 0, 0, 0, "", out.uri, waited=False, details=(*details, follow))


def _run_job(
    c: Clients,
    options: AwsOptions,
    request: TransformRequest,
    name: str,
    made_of: tuple[str, str, str],
    source: Place,
    out: Place,
    todo: list[batch.Item],
    manifest: bool,
) -> dict | None:
    """Create the job's model (image, role, model data) and the job over `source` (or a
    manifest of `todo`), follow it, then delete the model; None when not waiting (the model is
    left for the job)."""
    image, role, model_s3 = made_of
    input_s3 = source.uri
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
        f"transform job {name} created: {len(todo)} files, "
        f"{resources['InstanceCount']} x {resources['InstanceType']}, image {image}",
        flush=True,
    )
    if not options.wait:
        return None
    try:
        return wait_for_transform(c, name, poll_s=options.poll_s)
    finally:  # ended, or Ctrl-C (stopped, or left running: then the model stays)
        _drop_model(c, name)
