"""launch.py's commands. Importing this module does not import torch: `--help` is instant."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import sys
from pathlib import Path

from imgclf.config import describe, parse_assignments, parse_hyperparameters
from imgclf.contract import SAGEMAKER_ROLE_ENV
from imgclf.errors import UserError
from imgclf.util import parse_bool


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(cell).rjust(w) if i else str(cell).ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            )
        )


# ---------------------------------------------------------------- data


def cmd_data_sample(args) -> int:
    from imgclf.sample import write_digits

    root = Path(args.dir)
    if root.exists() and any(root.iterdir()) and not args.force:
        if (root / "train").is_dir():
            print(f"{root} already holds a dataset (use --force to write it again)")
            return 0
        raise UserError(f"{root} exists and is not empty; choose an empty folder or --force")
    counts = write_digits(root, size=args.size, seed=args.seed)
    print(
        f"wrote scikit-learn digits to {root}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + " images, 10 classes"
    )
    return 0


def _split_dirs(root: Path) -> dict[str, Path]:
    from imgclf.contract import resolve_splits

    return resolve_splits({"training": root})


def cmd_data_check(args) -> int:
    from imgclf.data import scan_dataset

    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    scan = scan_dataset(_split_dirs(root))
    names = list(scan.splits)
    print(f"dataset {root}: {len(scan.classes)} classes, splits: {', '.join(names)}")
    counts = {name: s.counts() for name, s in scan.splits.items()}
    if len(scan.classes) <= args.max_rows:
        rows = [[c, *(counts[n][i] for n in names)] for i, c in enumerate(scan.classes)]
        _print_table(rows, ["class", *names])
    total_row = [["total", *(sum(counts[n]) for n in names)]]
    _print_table(total_row, ["", *names])
    for name in names:
        c = [x for x in counts[name] if x > 0] or [0]
        ratio = max(c) / max(min(c), 1)
        note = "  (consider --hp class_weights=true)" if ratio >= 3 and name == "train" else ""
        print(f"{name}: per class min {min(c)}, max {max(c)}, imbalance {ratio:.1f}x{note}")
    bad = scan.bad
    ignored = [f"{n}/{p}" for n, s in scan.splits.items() for p in s.ignored]
    if ignored:
        print(
            f"{len(ignored)} files ignored (not images by name): "
            + ", ".join(ignored[:10])
            + (" ..." if len(ignored) > 10 else "")
        )
    if bad:
        print(f"{len(bad)} unreadable images (training skips them):")
        for b in bad:
            print(f"  {root / b.split / b.path}: {b.reason}")
        return 1 if args.strict else 0
    print("all images readable")
    return 0


def cmd_data_prepare(args) -> int:
    from imgclf.prepare import cache_dir, prepare_dataset

    source = Path(args.dir)
    if not source.is_dir():
        raise UserError(f"{source} is not a directory")
    out = Path(args.out) if args.out else cache_dir(_home(args), source, args.size, args.format)
    result = prepare_dataset(source, out, short_side=args.size, fmt=args.format)
    print(result.summary())
    for path, why in result.skipped[:20]:
        print(f"  skipped {path}: {why}")
    print(f"  train on it: python launch.py train --data {out} ...")
    return 0


def _prepared_data(args) -> Path:
    """--prepare: the prepared copy of --data (built or brought up to date first)."""
    source = Path(args.data)
    if not args.prepare or str(source).startswith("s3://"):
        return source
    from imgclf.prepare import cache_dir, prepare_dataset  # torch and torchvision: only if used

    if not source.is_dir():
        raise UserError(f"--data {source} is not a directory")
    # Raw RGB reads fastest; a copy that is uploaded to S3 is better small (JPEG).
    fmt = args.prepare_format or ("jpeg" if args.target == "sagemaker" else "raw")
    result = prepare_dataset(
        source, cache_dir(_home(args), source, args.prepare, fmt), short_side=args.prepare, fmt=fmt
    )
    print(result.summary(), flush=True)
    return result.root


# ---------------------------------------------------------------- train


def _hyperparameters(args) -> dict[str, str]:
    hps: dict[str, str] = {}
    if args.hp_from:
        try:
            loaded = json.loads(Path(args.hp_from).read_text())
        except OSError as exc:
            raise UserError(
                f"--hp-from {args.hp_from} cannot be read ({exc.strerror or exc}); give the path "
                "of a JSON file such as a tuning run's best.json"
            ) from None
        except ValueError as exc:
            raise UserError(
                f"--hp-from {args.hp_from} is not valid JSON ({exc}); it must hold an object "
                'such as {"lr": 0.001, "batch_size": 64}'
            ) from None
        loaded = loaded.get("hyperparameters", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(loaded, dict):
            raise UserError(f"--hp-from {args.hp_from} must hold a JSON object of hyperparameters")
        hps.update({str(k).replace("-", "_"): str(v) for k, v in loaded.items()})
    hps.update(parse_assignments(args.hp or []))
    parse_hyperparameters(hps)  # fail here, before a job is laid out
    return hps


def cmd_train(args) -> int:
    from imgclf.targets import local

    hps = _hyperparameters(args)
    args.data = str(_prepared_data(args))
    if args.profile:
        hps["profile"] = "true"
    if args.features_cache:
        hps["features_cache"] = "true"
    if parse_bool(hps.get("features_cache", "false")) and not (
        args.target == "sagemaker" or args.docker or "features_dir" in hps
    ):
        hps["features_dir"] = str((_home(args) / "features").resolve())  # shared by jobs
    if args.debug:  # our hook and rules, the same way on every target
        hps["debug"] = "true"
    if args.target == "sagemaker":
        return _sagemaker_train(args, hps)
    home = _home(args)
    name = args.job_name or local.new_job_name()
    if args.docker:
        local.require_docker()
    job = local.prepare_job(
        home,
        name,
        data_dir=Path(args.data),
        hyperparameters=hps,
        nproc=args.nproc,
        link_data=not args.docker,
    )
    print(f"job {name}: {job.layout.base}")
    if args.docker:
        command = local.docker_command(job, args.docker)
        env = None
    else:
        command = local.train_command()
        env = local.job_environment(job)
    code = local.run_job(job, command, env)
    failure = local.read_failure(job)
    if code != 0 or failure:
        print(
            f"\njob {name} failed (exit {code}): {failure or 'see ' + str(job.log_file)}",
            file=sys.stderr,
        )
        return code or 1
    metrics_file = job.layout.model_dir / "metrics.json"
    summary = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    print(f"\njob {name} finished")
    print(f"  model:   {job.layout.model_dir}")
    print(f"  outputs: {job.layout.output_data_dir}")
    report = job.layout.output_data_dir / "report.html"
    if report.exists():
        print(f"  report:  {report}")
    print(f"  log:     {job.log_file}")
    if "test_acc" in summary:
        print(
            f"  test accuracy {summary['test_acc']:.2%}, top-5 {summary['test_top5']:.2%} "
            f"on {summary['test_images']} images (best epoch {summary['best_epoch']})"
        )
    return 0


def _aws(args):
    from imgclf.targets import sagemaker

    options = sagemaker.AwsOptions(
        region=args.region,
        role=getattr(args, "role", None) or os.environ.get(SAGEMAKER_ROLE_ENV),
        bucket=getattr(args, "bucket", None),
        instance_type=getattr(args, "instance_type", None),
        instance_count=getattr(args, "instance_count", None) or 1,
        image=getattr(args, "image", None),
        wait=not getattr(args, "no_wait", False),
        sagemaker_debugger=getattr(args, "sagemaker_debugger", False),
        spot=getattr(args, "spot", False),
        max_runtime_s=int(getattr(args, "max_runtime_hours", 24) * 3600),
        poll_s=float(os.environ.get("IMGCLF_POLL_SECONDS", "30")),
        home=_home(args),
    )
    return sagemaker, options, sagemaker.clients(options)


def _sagemaker_train(args, hps: dict[str, str]) -> int:
    sm, options, c = _aws(args)
    name = args.job_name or sm.new_job_name()
    request = sm.start_training(c, options, data=args.data, hyperparameters=hps, job_name=name)
    resources = request["ResourceConfig"]
    print(
        f"training job {name} created: {resources['InstanceCount']} x "
        f"{resources['InstanceType']}, image {request['AlgorithmSpecification']['TrainingImage']}"
    )
    print(f"  console: https://console.aws.amazon.com/sagemaker/home#/jobs/{name}")
    if not options.wait:
        print(f"  follow: aws sagemaker describe-training-job --training-job-name {name}")
        return 0
    desc = sm.wait_for_training(c, name, poll_s=options.poll_s)
    for line in sm.training_summary(desc):
        print(line)
    if desc["TrainingJobStatus"] == "Completed":
        print(f"  deploy: python launch.py deploy --target sagemaker --model {name} --name NAME")
        return 0
    return 1


# ---------------------------------------------------------------- tune


def cmd_tune(args) -> int:
    from imgclf.tuning import local as tuner
    from imgclf.tuning import results
    from imgclf.tuning.space import load_space

    if args.status:
        meta, rows = results.load_status(Path(args.status), args.storage)
        _print_table(rows, ["trial", "state", "epochs", meta["metric"], "hyperparameters"])
        return 0
    if not (args.data and args.space):
        raise UserError("tune needs --data DIR and --space tuning.yaml (or --status DIR)")
    fixed = parse_assignments(args.hp or [])
    if args.features_cache:
        fixed["features_cache"] = "true"
    out = None
    if args.target != "sagemaker":
        from imgclf.targets import local

        out = Path(args.out) if args.out else _home(args) / "tuning" / local.new_job_name("tune")
        if args.features_cache:  # one cache for every trial of this tuning job
            fixed.setdefault("features_dir", str((out / "features").resolve()))
    space = load_space(args.space, fixed=fixed)
    if args.max_trials:
        space = dataclasses.replace(space, max_trials=args.max_trials)
    if args.parallel:
        space = dataclasses.replace(space, parallel_trials=args.parallel)
    if args.target == "sagemaker":
        if args.refine:
            raise UserError(
                "--refine runs on the local target only; on SageMaker, tune with "
                "--features-cache, then train the best trials with --hp-from"
            )
        return _sagemaker_tune(args, space)
    assert out is not None
    print(
        f"tuning {', '.join(space.names)} for {space.direction} {space.metric} "
        f"({space.strategy}, early stopping {'on' if space.early_stopping else 'off'}) in {out}"
    )
    print(f"  (stopped? run the same command with --out {out} to resume)", flush=True)
    best = tuner.run_tuning(
        space,
        data_dir=Path(args.data),
        out_dir=out,
        storage=args.storage,
        max_trials=args.max_trials,
        parallel=args.parallel,
    )
    meta, rows = results.load_status(out, args.storage)
    print()
    _print_table(rows, ["trial", "state", "epochs", space.metric, "hyperparameters"])
    if args.refine:
        if args.storage:
            raise UserError("--refine works with the default storage (SQLite in the tuning dir)")
        best = results.refine(space, data_dir=Path(args.data), out_dir=out, count=args.refine)
        print(f"\nfull fine-tunes of the {args.refine} best trials:")
        for r in json.loads((out / results.REFINED_FILE).read_text()):
            print(
                f"  trial {r['trial']}: {space.metric} {r['cached_value']:.5f} on cached "
                f"features, {r['value']:.5f} fine-tuned"
            )
    print(f"\nbest: trial {best['trial']}, {space.metric} {best['objective']['value']:.5f}")
    print(f"  {out / results.BEST_FILE}")
    print(
        f"  retrain: python launch.py train --data {args.data} --hp-from {out / results.BEST_FILE}"
    )
    return 0


def _sagemaker_tune(args, space) -> int:
    sm, options, c = _aws(args)
    name = args.job_name or sm.new_job_name("tune")[:32]
    sm.start_tuning(c, options, space, data=args.data, job_name=name)
    print(
        f"tuning job {name} created: {space.max_trials} trials, {space.parallel_trials} at once, "
        f"{space.strategy}, {space.direction} {space.metric}"
    )
    if not options.wait:
        return 0
    desc = sm.wait_for_tuning(c, name, poll_s=options.poll_s)
    rows = sm.tuning_trials(c, name)
    if rows:
        _print_table(rows, ["training job", "status", space.metric, "hyperparameters"])
    if desc["HyperParameterTuningJobStatus"] != "Completed":
        print(
            f"tuning job {name} {desc['HyperParameterTuningJobStatus']}: "
            f"{desc.get('FailureReason') or ''}",
            file=sys.stderr,
        )
        return 1
    best = sm.best_from_tuning(desc)
    out = Path(args.out) if args.out else _home(args) / "tuning" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    print(f"\nbest: {best['trial']}, {best['objective']['metric']} {best['objective']['value']}")
    print(f"  {out / 'best.json'}")
    print(
        f"  retrain: python launch.py train --target sagemaker --data {args.data} "
        f"--hp-from {out / 'best.json'}"
    )
    return 0


# ---------------------------------------------------------------- endpoints


def _home(args) -> Path:
    from imgclf.targets import local

    return Path(args.home).resolve() if args.home else local.default_home()


def cmd_deploy(args) -> int:
    if args.target == "sagemaker":
        sm, options, c = _aws(args)
        made = sm.deploy(
            c, options, model=args.model, name=args.name, serverless_memory_mb=args.serverless_mb
        )
        print(f"endpoint {args.name} creating: model {made['model']} from {made['model_data']}")
        if options.wait:
            sm.wait_for_endpoint(c, args.name, poll_s=options.poll_s)
            print(f"endpoint {args.name} is InService")
            print(f"  python launch.py invoke --target sagemaker --endpoint {args.name} IMAGE...")
        print(f"  it bills until deleted: python launch.py delete {args.name} --target sagemaker")
        return 0
    from imgclf.targets import local

    print(f"starting endpoint {args.name} on 127.0.0.1:{args.port} ...", flush=True)
    if args.docker:
        return _deploy_container(args)
    endpoint = local.deploy(
        _home(args),
        Path(args.model),
        name=args.name,
        port=args.port,
        workers=args.workers,
        response_format=args.response_format,
    )
    print(
        f"endpoint {endpoint.name} is up: {endpoint.url}/invocations (pid {endpoint.pid}, "
        f"log {endpoint.log_file})"
    )
    print(f"  python launch.py invoke --endpoint {endpoint.name} IMAGE...")
    print(f"  curl --data-binary @IMAGE -H 'Content-Type: image/jpeg' {endpoint.url}/invocations")
    return 0


def _deploy_container(args) -> int:
    from imgclf.targets import local

    local.require_docker()
    endpoint = local.deploy_container(
        _home(args),
        Path(args.model),
        name=args.name,
        port=args.port,
        image=args.docker,
        workers=args.workers,
    )
    print(
        f"endpoint {endpoint.name} is up: {endpoint.url}/invocations (container "
        f"{endpoint.container}, image {endpoint.image}; docker logs {endpoint.container})"
    )
    print(f"  python launch.py invoke --endpoint {endpoint.name} IMAGE...")
    return 0


def cmd_endpoints(args) -> int:
    if args.target == "sagemaker":
        sm, _, c = _aws(args)
        rows = sm.list_endpoints(c)
        if not rows:
            print("no SageMaker endpoints in this region")
            return 0
        _print_table(rows, ["name", "status", "age", "instances"])
        print("each InService endpoint bills per instance-hour until deleted")
        return 0
    from imgclf.targets import local

    endpoints = local.list_endpoints(_home(args))
    containers = local.list_container_endpoints(_home(args))
    if not endpoints and not containers:
        print("no local endpoints")
        return 0
    rows = [[e.name, str(e.port), str(e.pid), local.endpoint_state(e), e.model] for e in endpoints]
    for c in containers:  # deploy --docker: the pid column names the container
        alive = local.container_running(c.container)
        state = "healthy" if alive and local.ping(c.port) else ("starting?" if alive else "dead")
        rows.append([c.name, str(c.port), c.container, state, c.model])
    _print_table(rows, ["name", "port", "pid", "state", "model"])
    return 0


def cmd_delete(args) -> int:
    if args.target == "sagemaker":
        sm, _, c = _aws(args)
        for item in sm.delete_endpoint(c, args.name):
            print(f"deleted {item}")
        return 0
    from imgclf.targets import local

    if local.load_container_endpoint(_home(args), args.name) is not None:
        container = local.delete_container_endpoint(_home(args), args.name)
        print(f"endpoint {container.name} stopped (container {container.container} removed)")
        return 0
    endpoint, was_running = local.delete_endpoint(_home(args), args.name)
    print(f"endpoint {endpoint.name} {'stopped' if was_running else 'was not running; removed'}")
    return 0


def _pick_endpoint(home: Path, name: str | None):
    from imgclf.targets import local

    if name:
        endpoint = local.load_endpoint(home, name) or local.load_container_endpoint(home, name)
        if endpoint is None:
            raise UserError(f"no local endpoint named {name}; `launch.py endpoints` lists them")
        return endpoint
    endpoints = [e for e in local.list_endpoints(home) if local.process_alive(e.pid)]
    endpoints += [
        c for c in local.list_container_endpoints(home) if local.container_running(c.container)
    ]
    if len(endpoints) != 1:
        names = ", ".join(e.name for e in endpoints) or "none running"
        raise UserError(f"name the endpoint with --endpoint ({names})")
    return endpoints[0]


def cmd_invoke(args) -> int:
    from imgclf.data import label_name
    from imgclf.targets import local

    attributes = f"topk={args.topk}" + (",probabilities=true" if args.probabilities else "")
    if args.target == "sagemaker":
        if not args.endpoint:
            raise UserError(
                "name the endpoint with --endpoint (launch.py endpoints --target "
                "sagemaker lists them)"
            )
        sm, _, c = _aws(args)

        def send(body, content_type):
            return sm.invoke(
                c, args.endpoint, body, content_type=content_type, custom_attributes=attributes
            )
    else:
        endpoint = _pick_endpoint(_home(args), args.endpoint)

        def send(body, content_type):
            return local.invoke(
                endpoint, body, content_type=content_type, custom_attributes=attributes
            )

    def read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None

    def show(path: Path, status: int, answer: dict) -> bool:
        print(f"{path}  (folder: {label_name(path.parent.name)})")
        if status != 200:
            print(f"  error {status}: {answer.get('error')} ({answer.get('hint')})")
            return False
        rows = [[p["label"], f"{p['probability']:.4f}"] for p in answer["predictions"]]
        _print_table([["  " + r[0], r[1]] for r in rows], ["  label", "probability"])
        if args.probabilities:
            print("  probabilities: " + json.dumps(answer["probabilities"]))
        return True

    paths = [Path(image) for image in args.images]
    if args.batch:
        # One JSON request, one forward pass: {"instances": [base64 image, ...]}.
        body = json.dumps(
            {"instances": [base64.b64encode(read(p)).decode("ascii") for p in paths]}
        ).encode()
        status, answer = send(body, "application/json")
        if status != 200:
            print(f"error {status}: {answer.get('error')} ({answer.get('hint')})")
            return 1
        results = [show(p, 200, a) for p, a in zip(paths, answer, strict=True)]
        return 0 if all(results) else 1
    failures = 0
    for path in paths:
        content_type = local.CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        status, answer = send(read(path), content_type)
        failures += not show(path, status, answer)
    return 1 if failures else 0


# ---------------------------------------------------------------- debug / report


def _job_dir(args) -> Path:
    """A local job dir, a local job name, or (with --target sagemaker) a SageMaker training
    job name whose output is downloaded first."""
    if getattr(args, "target", "local") == "sagemaker":
        sm, options, c = _aws(args)
        return sm.download_job_output(c, args.job, _home(args) / "sagemaker" / args.job)
    path = Path(args.job)
    if path.is_dir():
        return path
    named = _home(args) / "jobs" / args.job
    if named.is_dir():
        return named
    raise UserError(f"{args.job} is neither a job dir nor a local job name (see {named.parent})")


def cmd_debug(args) -> int:
    from imgclf.debugging import rules
    from imgclf.debugging.hook import find_tensor_dir

    job = _job_dir(args)
    evaluation = (
        json.loads((job / "output/data/evaluation.json").read_text() or "{}")
        if (job / "output/data/evaluation.json").exists()
        else {}
    )
    config = (
        json.loads((job / "output/data/config.json").read_text())
        if (job / "output/data/config.json").exists()
        else {}
    )
    context = {
        "pretrained": config.get("pretrained", False) and not config.get("weights_path"),
        "train_counts": evaluation.get("train_counts"),
        "labels": evaluation.get("labels"),
        "per_class_accuracy": evaluation.get("per_class_accuracy"),
    }
    tensors = find_tensor_dir(job) or job / "output" / "tensors"
    verdicts = rules.run_rules(tensors, context)
    for verdict in verdicts:
        print(verdict.line())
    (job / "output" / "data").mkdir(parents=True, exist_ok=True)
    (job / "output" / "data" / rules.RULES_FILE).write_text(
        json.dumps(rules.verdicts_to_json(verdicts), indent=2)
    )
    return 1 if any(v.status == "fired" for v in verdicts) else 0


def cmd_report(args) -> int:
    from imgclf import report

    job = _job_dir(args)
    path = report.write_report(job, Path(args.out) if args.out else None)
    print(f"report: {path}")
    return 0


# ---------------------------------------------------------------- parser


TARGETS = ["local", "sagemaker"]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Fine-tune torchvision classifiers through the SageMaker container "
        "contract, locally (default) or on SageMaker.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

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
    check.set_defaults(func=cmd_data_check)
    prep = data_sub.add_parser(
        "prepare", help="decode and resize every image once into a fast-loading copy"
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
    prep.add_argument("--home", help="where imgclf keeps its files (default .imgclf)")
    prep.set_defaults(func=cmd_data_prepare)

    train = sub.add_parser(
        "train",
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
    train.add_argument("--home", help="where local jobs live (default .imgclf, or $IMGCLF_HOME)")
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser("tune", help="hyperparameter tuning (local: Optuna, trials are jobs)")
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
    tune.add_argument("--home", help="where local jobs live (default .imgclf)")
    tune.add_argument("--job-name", help="tuning job name (sagemaker, <= 32 characters)")
    _add_target(tune, image=True, resources=True, wait=True)
    tune.add_argument("--max-runtime-hours", type=float, default=24, help="per training job")
    tune.set_defaults(func=cmd_tune)

    deploy = sub.add_parser("deploy", help="start an endpoint for a model (local: MMS process)")
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
        help="default answer (local): top-k predictions (default), or vectors: "
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
    deploy.add_argument("--home", help="where local endpoints live (default .imgclf)")
    deploy.set_defaults(func=cmd_deploy)

    endpoints = sub.add_parser("endpoints", help="list endpoints")
    endpoints.add_argument("--home", help="where local endpoints live (default .imgclf)")
    _add_target(endpoints)
    endpoints.set_defaults(func=cmd_endpoints)

    delete = sub.add_parser("delete", help="stop an endpoint and remove it")
    delete.add_argument("name")
    delete.add_argument("--home", help="where local endpoints live (default .imgclf)")
    _add_target(delete)
    delete.set_defaults(func=cmd_delete)

    invoke = sub.add_parser("invoke", help="send images to an endpoint, print top-k labels")
    invoke.add_argument("images", nargs="+", metavar="IMAGE")
    invoke.add_argument("--endpoint", help="endpoint name (default: the one running)")
    invoke.add_argument("--topk", type=int, default=3)
    invoke.add_argument(
        "--probabilities", action="store_true", help="also print every class's probability"
    )
    invoke.add_argument(
        "--batch", action="store_true", help="all images in one JSON request (one forward pass)"
    )
    invoke.add_argument("--home", help="where local endpoints live (default .imgclf)")
    _add_target(invoke)
    invoke.set_defaults(func=cmd_invoke)
    debug = sub.add_parser("debug", help="run the debugging rules over a job's tensors")
    debug.add_argument("job", help="a local job dir or name (sagemaker: a training job name)")
    debug.add_argument("--home", help="where local jobs live (default .imgclf)")
    _add_target(debug)
    debug.set_defaults(func=cmd_debug)

    rep = sub.add_parser("report", help="write a job's report.html")
    rep.add_argument("job", help="a local job dir or name (sagemaker: a training job name)")
    rep.add_argument("--out", help="where to write it (default: the job's output/data/)")
    rep.add_argument("--home", help="where local jobs live (default .imgclf)")
    _add_target(rep)
    rep.set_defaults(func=cmd_report)
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
