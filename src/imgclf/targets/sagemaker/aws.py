"""Settings, boto3 clients and AWS errors as one line a person can act on."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.errors import UserError

IMAGES_FILE = "images.json"  # written by build_and_push.sh


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class AwsOptions:
    """What the user passed (or the defaults): the same for every verb."""

    region: str | None = None
    role: str | None = None
    bucket: str | None = None
    instance_type: str | None = None
    instance_count: int = 1
    image: str | None = None
    wait: bool = True
    sagemaker_debugger: bool = False
    spot: bool = False
    max_runtime_s: int = 24 * 3600
    volume_gb: int = 50
    poll_s: float = 30.0
    home: Path = field(default_factory=lambda: Path(".imgclf"))


def remembered_image(home: Path, kind: str) -> str | None:
    path = home / IMAGES_FILE
    try:
        return json.loads(path.read_text()).get(kind)
    except (OSError, ValueError, AttributeError):
        return None


def resolve_image(options: AwsOptions, kind: str) -> str:
    image = options.image or remembered_image(options.home, kind)
    if not image:
        raise UserError(
            f"no {kind} image: run ./build_and_push.sh {kind} (it remembers the URI in "
            f"{options.home / IMAGES_FILE}) or pass --image URI"
        )
    return image


def resolve_role(options: AwsOptions) -> str:
    role = options.role  # the CLI fills it from --role or $IMGCLF_SAGEMAKER_ROLE
    if not role:
        raise UserError(
            "no SageMaker execution role: pass --role arn:aws:iam::ACCOUNT:role/NAME (or set "
            "IMGCLF_SAGEMAKER_ROLE); the role needs AmazonSageMakerFullAccess and S3 access"
        )
    if not role.startswith("arn:"):
        raise UserError(f"--role {role} is not an ARN (arn:aws:iam::ACCOUNT:role/NAME)")
    return role


# ---------------------------------------------------------------- AWS errors


ERROR_HINTS = {
    "AccessDenied": "the credentials lack a permission for {op}; attach it to the user/role",
    "AccessDeniedException": "the credentials lack a permission for {op}; attach it",
    "UnrecognizedClientException": "the AWS credentials are not valid; run `aws configure`",
    "InvalidClientTokenId": "the AWS credentials are not valid; run `aws configure`",
    "ExpiredToken": "the AWS session token expired; log in again (aws sso login / new keys)",
    "ExpiredTokenException": "the AWS session token expired; log in again",
    "ResourceLimitExceeded": "an account quota is reached ({message}); request more in "
    "Service Quotas (SageMaker, '<instance type> for training job/endpoint usage') or pick "
    "another --instance-type",
    "ResourceInUse": "{message}; choose another name or delete the old one",
    "ResourceNotFound": "{message}",
    "NoSuchBucket": "the bucket does not exist; pass --bucket of one you own",
}


@contextlib.contextmanager
def aws_errors() -> Iterator[None]:
    """botocore failures → one line that says what to do (no traceback, no credentials)."""
    from botocore import exceptions as bx

    try:
        yield
    except bx.NoCredentialsError:
        raise UserError(
            "no AWS credentials: run `aws configure`, set AWS_PROFILE, or export "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        ) from None
    except bx.NoRegionError:
        raise UserError("no AWS region: pass --region R or set AWS_REGION") from None
    except bx.EndpointConnectionError as exc:
        raise UserError(
            f"cannot reach AWS ({exc.kwargs.get('endpoint_url')}); check the network"
        ) from None
    except bx.ParamValidationError as exc:
        raise UserError(f"invalid request: {one_line(str(exc))}") from None
    except bx.ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "Error")
        message = one_line(error.get("Message", ""))
        if not message:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = f"HTTP {status}" if status else "no message"
        op = getattr(exc, "operation_name", "the call")
        hint = ERROR_HINTS.get(code)
        if code == "ValidationException" and "image" in message.lower():
            hint = "{message}; push the image with ./build_and_push.sh or fix --image"
        text = hint.format(op=op, message=message) if hint else message
        raise UserError(f"AWS {op}: {code}: {text}") from None
    except bx.BotoCoreError as exc:  # timeouts, TLS, proxies: still one line
        raise UserError(f"AWS call failed: {one_line(str(exc))}") from None


def one_line(text: str, limit: int = 300) -> str:
    """An error message as one short line: an HTML page (a proxy's, or a gateway's error page)
    becomes its text, whitespace collapses, and the rest is cut at `limit` characters."""
    if "<" in text and ">" in text:
        text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", text)
        text = re.sub(r"(?s)<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def session(region: str | None):
    import boto3

    return boto3.session.Session(region_name=region) if region else boto3.session.Session()


def clients(options: AwsOptions) -> Clients:
    s = session(options.region)
    with aws_errors():
        return Clients(
            sagemaker=s.client("sagemaker"),
            s3=s.client("s3"),
            logs=s.client("logs"),
            runtime=s.client("sagemaker-runtime"),
            sts=s.client("sts"),
            region=s.region_name,
            autoscaling=s.client("application-autoscaling"),
            cloudwatch=s.client("cloudwatch"),
        )


@dataclass
class Clients:
    sagemaker: object
    s3: object
    logs: object
    runtime: object
    sts: object
    region: str | None
    autoscaling: object = None  # application-autoscaling: an endpoint variant's instance count
    cloudwatch: object = None  # the alarm that scales an async endpoint up from zero

    def require_region(self) -> str:
        if not self.region:
            raise UserError("no AWS region: pass --region R or set AWS_REGION")
        return self.region


def default_bucket(c: Clients, options: AwsOptions) -> str:
    """--bucket, else sagemaker-REGION-ACCOUNT (the SageMaker SDK's default), created if
    missing."""
    if options.bucket:
        return options.bucket
    region = c.require_region()
    with aws_errors():
        account = c.sts.get_caller_identity()["Account"]
        bucket = f"sagemaker-{region}-{account}"
        try:
            c.s3.head_bucket(Bucket=bucket)
        except Exception:  # noqa: BLE001 - any miss: try to create it, which says why not
            kwargs = {}
            if region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            c.s3.create_bucket(Bucket=bucket, **kwargs)
    return bucket
