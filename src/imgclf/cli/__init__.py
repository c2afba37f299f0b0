"""launch.py's commands: `build_parser` turns the command line into a verb, `main` runs it.
The verbs live in cli.data (datasets) and cli.commands (what runs on a target). Importing this
package does not import torch: `--help` is instant."""

from __future__ import annotations

import argparse
import sys

from imgclf.cli import commands
from imgclf.cli.data import cmd_data_check, cmd_data_prepare, cmd_data_sample
from imgclf.config import describe
from imgclf.errors import UserError
from imgclf.transform import ACCEPT_TYPES

# ---------------------------------------------------------------- parser


TARGETS = ["local", "sagemaker"]
# What `open_target` reads, for the verbs that do not declare all of it (one place, so that
# it reads attributes instead of probing for them).
TARGET_DEFAULTS = {
    "target": "local",
    "home": None,
    "region": None,
    "role": None,
    "bucket": None,
    "image": None,
    "instance_type": None,
    "instance_count": 1,
    "no_wait": False,
    "sagemaker_debugger": False,
    "spot": False,
    "max_runtime_hours": 24.0,
}


def _home_parent() -> argparse.ArgumentParser:
    """--home, shared by every verb that keeps or reads local files."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--home",
        help="where imgclf keeps its jobs, endpoints and caches (default .imgclf, or $IMGCLF_HOME)",
    )
    return parent


HOME = _home_parent()


def _add_target(parser, *, image: bool = False, resources: bool = False, wait: bool = False):
    parser.add_argument(
        "--target", choices=TARGETS, default="local", help="local (default) or sagemaker (boto3)"
    )
    aws = parser.add_argument_group("--target sagemaker")
    aws.add_argument("--region", help="AWS region (default: AWS_REGION / the profile's)")
    if image:
        aws.add_argument("--role", help="SageMaker execution role ARN ($IMGCLF_SAGEMAKER_ROLE)")
        aws.add_argument("--bucket", help="S3 bucket (default sagemaker-REGION-ACCOUNT)")
        aws.add_argument(
            "--image", help="image URI (default: the one build_and_push.sh last pushed)"
        )
    if resources:
        aws.add_argument("--instance-type", help="e.g. ml.g5.xlarge (the default)")
        aws.add_argument("--instance-count", type=int, default=1)
    if wait:
        aws.add_argument("--no-wait", action="store_true", help="return once it is created")


def _add_init_from(parser, *, every_trial: bool = False) -> None:
    parser.add_argument(
        "--init-from",
        metavar="JOB|MODEL_DIR|model.tar.gz|s3://...",
        help=("every trial starts" if every_trial else "start")
        + " from this model's weights instead of ImageNet's (its `model` channel): a job "
        "name, a model dir, a model.tar.gz (sagemaker also: s3://...); same arch, new classes "
        "get fresh head rows, a class the data lacks needs --hp init_drop_classes=true",
    )


def _data_parsers(sub) -> None:
    data = sub.add_parser("data", help="sample datasets and dataset checks")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    sample = data_sub.add_parser("sample", help="write scikit-learn's digits as an ImageFolder")
    sample.add_argument("dir")
    sample.add_argument("--size", type=int, default=32, help="image side in pixels (32)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--force", action="store_true", help="write into a non-empty folder")
    sample.set_defaults(func=cmd_data_sample)
    check = data_sub.add_parser("check", help="classes, counts, imbalance, unreadable images")
    check.add_argument("dir", help="a folder holding train/ valid/ [test/]")
    check.add_argument("--strict", action="store_true", help="exit 1 if any image is unreadable")
    check.add_argument("--max-rows", type=int, default=40, help="print per-class rows up to this")
    check.add_argument(
        "--max-image-pixels",
        help="bound on one image's decode cost, as training's max_image_pixels (default: its "
        "default)",
    )
    check.set_defaults(func=cmd_data_check)
    prep = data_sub.add_parser(
        "prepare",
        parents=[HOME],
        help="decode and resize every image once into a fast-loading copy",
    )
    prep.add_argument("dir", help="a folder holding train/ valid/ [test/]")
    prep.add_argument("--size", type=int, default=256, help="short side in pixels (256)")
    prep.add_argument(
        "--out", help="where (default .imgclf/prepared/<name>-<size>-<format>-<hash>)"
    )
    prep.add_argument(
        "--format",
        choices=("raw", "jpeg"),
        default="raw",
        help="raw: RGB (binary PPM), nothing to decode when read (default); jpeg: quality 95, "
        "~5x smaller, for uploading as a SageMaker channel",
    )
    prep.set_defaults(func=cmd_data_prepare)


def _train_parser(sub) -> None:
    train = sub.add_parser(
        "train",
        parents=[HOME],
        help="run a training job",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="hyperparameters (--hp key=value):\n" + describe(),
    )
    train.add_argument("--data", required=True, help="folder with train/ valid/ [test/]")
    train.add_argument(
        "--hp", nargs="*", action="extend", metavar="KEY=VALUE", help="hyperparameters"
    )
    train.add_argument("--hp-from", help="JSON file of hyperparameters (e.g. a tuner's best.json)")
    train.add_argument(
        "--job-name", help="job name; an existing local job resumes from its checkpoint"
    )
    _add_init_from(train)
    _add_target(train, image=True, resources=True, wait=True)
    train.add_argument(
        "--sagemaker-debugger",
        action="store_true",
        help="also send SageMaker Debugger's hook, built-in rules and profiler (accounts that "
        "still have it)",
    )
    train.add_argument(
        "--debug",
        action="store_true",
        help="record tensors with smdebug and run the debugging rules (verdicts in the log, "
        "output/data/rules.json and the report)",
    )
    train.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler window, data-wait vs compute per step, system usage",
    )
    train.add_argument(
        "--prepare",
        type=int,
        nargs="?",
        const=256,
        metavar="SIZE",
        help="train on a prepared copy of --data (short side SIZE, default 256; rebuilt only "
        "where files changed)",
    )
    train.add_argument(
        "--prepare-format",
        choices=("raw", "jpeg"),
        help="format of the prepared copy (default: raw locally, jpeg for --target sagemaker)",
    )
    train.add_argument(
        "--features-cache",
        action="store_true",
        help="frozen backbone: embed the images once (kept in .imgclf/features), train only "
        "the head on the embeddings (hyperparameter features_cache)",
    )
    train.add_argument("--spot", action="store_true", help="managed spot training (sagemaker)")
    train.add_argument("--max-runtime-hours", type=float, default=24, help="sagemaker stop limit")
    train.add_argument("--nproc", type=int, default=1, help="processes under torchrun (local)")
    train.add_argument("--docker", metavar="IMAGE", help="run the training image under Docker")
    train.set_defaults(func=commands.cmd_train)


def _tune_parser(sub) -> None:
    tune = sub.add_parser(
        "tune", parents=[HOME], help="hyperparameter tuning (local: Optuna, trials are jobs)"
    )
    tune.add_argument("--data", help="folder with train/ valid/ [test/]")
    tune.add_argument("--space", help="tuning.yaml: search space and objective")
    tune.add_argument("--max-trials", type=int, help="overrides max_trials of the space")
    tune.add_argument("--parallel", type=int, help="overrides parallel_trials of the space")
    tune.add_argument(
        "--out", help="tuning dir (default .imgclf/tuning/tune-<time>); an existing one resumes"
    )
    tune.add_argument(
        "--hp", nargs="*", action="extend", metavar="KEY=VALUE", help="fixed for every trial"
    )
    tune.add_argument("--storage", help="Optuna storage URL (default: SQLite in the tuning dir)")
    _add_init_from(tune, every_trial=True)
    tune.add_argument("--status", metavar="DIR", help="print the trial table of a tuning dir")
    tune.add_argument(
        "--features-cache",
        action="store_true",
        help="cheap trials: frozen backbone, head trained on features embedded once per "
        "tuning job (hyperparameter features_cache)",
    )
    tune.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="K",
        help="afterwards, run the K best trials as full fine-tunes; best.json names the best",
    )
    tune.add_argument("--job-name", help="tuning job name (sagemaker, <= 32 characters)")
    _add_target(tune, image=True, resources=True, wait=True)
    tune.add_argument("--max-runtime-hours", type=float, default=24, help="per training job")
    tune.set_defaults(func=commands.cmd_tune)


def _deploy_parser(sub) -> None:
    deploy = sub.add_parser(
        "deploy", parents=[HOME], help="start an endpoint for a model (local: MMS process)"
    )
    deploy.add_argument(
        "--model",
        required=True,
        help="a model dir or model.tar.gz (sagemaker also: s3://... or a training job name)",
    )
    deploy.add_argument("--name", default="local", help="endpoint name (local)")
    deploy.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (8080)")
    deploy.add_argument("--workers", type=int, help="MMS workers (default: from the machine)")
    deploy.add_argument(
        "--response-format",
        choices=("predictions", "vectors"),
        help="default answer: top-k predictions (default), or vectors: "
        "[[p0, ..., pN-1]] per image in label order, what the seed notebooks' clients read",
    )
    deploy.add_argument(
        "--docker",
        metavar="IMAGE",
        help="run the serving image under Docker, as SageMaker runs it (local)",
    )
    _add_target(deploy, image=True, resources=True, wait=True)
    deploy.add_argument(
        "--serverless-mb", type=int, help="serverless endpoint with this memory (sagemaker)"
    )
    _deploy_production_arguments(deploy)
    deploy.set_defaults(func=commands.cmd_deploy)


def _deploy_production_arguments(deploy) -> None:
    """deploy's SageMaker settings for an endpoint that lives on: updates, autoscaling, async."""
    from imgclf.targets.sagemaker import requests as rq

    update = deploy.add_argument_group(
        "--target sagemaker, --name of a running endpoint: a new model by UpdateEndpoint "
        "(blue/green), then the old config and model are removed"
    )
    update.add_argument(
        "--rollout",
        default="all-at-once",
        metavar="|".join(rq.ROLLOUTS),
        help="how traffic moves to the new model: all at once (default), a canary of PCT%% of "
        "capacity baked MINUTES before the rest, or PCT%% more every MINUTES",
    )
    update.add_argument(
        "--rollback-alarm",
        action="append",
        default=[],
        metavar="ALARM",
        help="a CloudWatch alarm name; if one fires during the rollout, SageMaker shifts "
        f"the traffic back (repeatable, up to {rq.MAX_ROLLBACK_ALARMS})",
    )
    scaling = deploy.add_argument_group(
        "--target sagemaker autoscaling (Application Auto Scaling, target tracking; "
        f"scale-out cooldown {rq.SCALE_OUT_COOLDOWN_S} s, scale-in {rq.SCALE_IN_COOLDOWN_S} s)"
    )
    scaling.add_argument("--min-instances", type=int, help="fewest instances (0: async only)")
    scaling.add_argument("--max-instances", type=int, help="most instances")
    scaling.add_argument(
        "--target-invocations",
        type=int,
        metavar="N",
        help="invocations a minute per instance to hold (default "
        f"{rq.DEFAULT_TARGET_INVOCATIONS}: {rq.TARGET_FRACTION * 100:.0f}%% of the "
        f"{rq.MEASURED_REQUESTS_PER_S} req/s benchmarks/serve.py measured for ResNet-50 at "
        "concurrency 16 on 2 CPUs, benchmarks/README.md; measure yours with it)",
    )
    deploy.add_argument(
        "--async-output",
        metavar="s3://BUCKET/PREFIX",
        help="an asynchronous endpoint (sagemaker): requests up to 1 GB and an hour, answers "
        "written here (failures under PREFIX/failures); with --min-instances 0 it scales to "
        "zero when idle",
    )
    deploy.add_argument(
        "--startup-timeout",
        type=int,
        metavar="S",
        help="the variant's container health-check timeout (sagemaker; default "
        f"{rq.STARTUP_MARGIN}x the cold start benchmarks/startup.py measured for a ResNet-50 on "
        f"2 CPUs, in whole minutes: {rq.startup_timeouts(None, graph=True)[0]} s for a local "
        f"model folder with its ONNX graph on a CPU instance ({rq.MEASURED_COLD_START_S:g} s), "
        f"else {rq.startup_timeouts(None)[0]} s ({rq.MEASURED_COLD_START_EXPORT_S:g} s))",
    )
    deploy.add_argument(
        "--download-timeout",
        type=int,
        metavar="S",
        help="the variant's model-download timeout (sagemaker; default from the model's size "
        f"at {rq.DOWNLOAD_BYTES_PER_S // 2**20} MB/s, at least 60 s)",
    )


def _transform_parser(sub) -> None:
    transform = sub.add_parser(
        "transform",
        parents=[HOME],
        help="classify every image of a folder or S3 prefix (batch transform)",
        description="Every file under --input is sent to the serving program in batch mode, one "
        "request each; its answer goes to OUTPUT/<path>.out (SageMaker's naming) and one row "
        "per file to OUTPUT/predictions.csv (file,label,index,probability,error). Running the "
        "same command again sends only the files with no .out yet. Exit status 1 when any "
        "file could not be classified.",
    )
    transform.add_argument(
        "--model",
        required=True,
        help="a model dir or model.tar.gz (sagemaker also: s3://... or a training job name)",
    )
    transform.add_argument("--input", required=True, help="a folder of images (or s3://...)")
    transform.add_argument("--output", required=True, help="a folder (or s3://...)")
    transform.add_argument(
        "--max-payload-mb",
        type=int,
        default=6,
        help="largest file sent, in MB (6, SageMaker's default; at most 100)",
    )
    transform.add_argument(
        "--concurrency",
        type=int,
        help="requests in flight (default: the server's /execution-parameters)",
    )
    transform.add_argument(
        "--response-format",
        choices=("predictions", "vectors"),
        help="what each .out holds: top-k predictions (default) or vectors [[p0, ...]]",
    )
    transform.add_argument(
        "--accept",
        choices=tuple(ACCEPT_TYPES),
        default="json",
        help="each .out as JSON (default) or JSON Lines",
    )
    transform.add_argument(
        "--docker", metavar="IMAGE", help="run the serving image under Docker (local)"
    )
    transform.add_argument("--job-name", help="transform job name (default transform-<time>)")
    _add_target(transform, image=True, resources=True, wait=True)
    transform.set_defaults(func=commands.cmd_transform)


def _endpoint_parsers(sub) -> None:
    endpoints = sub.add_parser("endpoints", parents=[HOME], help="list endpoints")
    _add_target(endpoints)
    endpoints.set_defaults(func=commands.cmd_endpoints)

    delete = sub.add_parser("delete", parents=[HOME], help="stop an endpoint and remove it")
    delete.add_argument("name")
    _add_target(delete)
    delete.set_defaults(func=commands.cmd_delete)

    invoke = sub.add_parser(
        "invoke", parents=[HOME], help="send images to an endpoint, print top-k labels"
    )
    invoke.add_argument("images", nargs="+", metavar="IMAGE")
    invoke.add_argument("--endpoint", help="endpoint name (default: the one running)")
    invoke.add_argument("--topk", type=int, default=3)
    invoke.add_argument(
        "--probabilities", action="store_true", help="also print every class's probability"
    )
    invoke.add_argument(
        "--batch", action="store_true", help="all images in one JSON request (one forward pass)"
    )
    invoke.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="an asynchronous endpoint (sagemaker): each image is uploaded to S3, sent with "
        "InvokeEndpointAsync, and its answer read back",
    )
    invoke.add_argument(
        "--no-wait", action="store_true", help="with --async: print where each answer will be"
    )
    invoke.add_argument("--bucket", help="with --async: where inputs go (sagemaker-REGION-ACCOUNT)")
    _add_target(invoke)
    invoke.set_defaults(func=commands.cmd_invoke)
    debug = sub.add_parser(
        "debug", parents=[HOME], help="run the debugging rules over a job's tensors"
    )
    debug.add_argument("job", help="a local job dir or name (sagemaker: a training job name)")
    _add_target(debug)
    debug.set_defaults(func=commands.cmd_debug)

    rep = sub.add_parser("report", parents=[HOME], help="write a job's report.html")
    rep.add_argument("job", help="a local job dir or name (sagemaker: a training job name)")
    rep.add_argument("--out", help="where to write it (default: the job's output/data/)")
    _add_target(rep)
    rep.set_defaults(func=commands.cmd_report)


def _evaluate_parser(sub) -> None:
    ev = sub.add_parser(
        "evaluate",
        parents=[HOME],
        help="a model's metrics, predictions and report on any ImageFolder split, no training",
    )
    ev.add_argument(
        "--model", required=True, help="a model dir, a model.tar.gz or a local job's name"
    )
    ev.add_argument("--data", required=True, help="an ImageFolder root (train/ valid/ test/)")
    ev.add_argument("--split", default="test", help="the split folder to evaluate (test)")
    ev.add_argument("--out", help="where to write (default: .imgclf/evaluations/<model>-<split>)")
    ev.add_argument("--batch-size", type=int, default=64, help="images per forward pass (64)")
    ev.set_defaults(func=commands.cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Fine-tune torchvision classifiers through the SageMaker container "
        "contract, locally (default) or on SageMaker.",
    )
    parser.set_defaults(**TARGET_DEFAULTS)
    sub = parser.add_subparsers(dest="command", required=True)

    _data_parsers(sub)
    _train_parser(sub)
    _evaluate_parser(sub)
    _tune_parser(sub)
    _deploy_parser(sub)
    _transform_parser(sub)
    _endpoint_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
