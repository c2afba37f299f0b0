"""The launcher's target verbs: arguments → a request → `target.verb(request)` → printed lines.
Which target runs them is decided once, in `open_target`; nothing here branches on it."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from imgclf.cli.common import home, print_table
from imgclf.config import (
    canonical_key,
    parse_assignments,
    parse_hyperparameters,
    refuse_platform_key,
)
from imgclf.contract import METRICS_FILE, REPORT_FILE, SAGEMAKER_ROLE_ENV
from imgclf.errors import UserError
from imgclf.job_outputs import JobOutputs
from imgclf.targets.base import (
    DeployRequest,
    EndpointInfo,
    JobResult,
    Target,
    TrainRequest,
    TransformRequest,
    TuneRequest,
    TuningResult,
)
from imgclf.transform import ACCEPT_TYPES, check_payload_mb, content_type
from imgclf.util import write_json


def open_target(args) -> Target:
    """--target local (default) or sagemaker, with what the command line says about it (the
    parser gives every verb cli.TARGET_DEFAULTS for what it does not declare)."""
    if args.target != "sagemaker":
        from imgclf.targets.local import LocalTarget

        return LocalTarget(home(args))
    from imgclf.targets.sagemaker import AwsOptions
    from imgclf.targets.sagemaker.target import SageMakerTarget

    return SageMakerTarget(
        AwsOptions(
            region=args.region,
            role=args.role or os.environ.get(SAGEMAKER_ROLE_ENV),
            bucket=args.bucket,
            instance_type=args.instance_type,
            instance_count=args.instance_count,
            image=args.image,
            wait=not args.no_wait,
            sagemaker_debugger=args.sagemaker_debugger,
            spot=args.spot,
            max_runtime_s=int(args.max_runtime_hours * 3600),
            poll_s=float(os.environ.get("IMGCLF_POLL_SECONDS", "30")),
            home=home(args),
        )
    )


def _on(target: Target) -> str:
    """The `--target` words of a follow-up command line."""
    return "" if target.name == "local" else f" --target {target.name}"


# ---------------------------------------------------------------- train


def _hyperparameters(args) -> dict[str, str]:
    hps: dict[str, str] = {}
    if args.hp_from:
        hps.update(_read_hp_file(args.hp_from))
    hps.update(parse_assignments(args.hp or []))
    if args.profile:
        hps["profile"] = "true"
    if args.features_cache:
        hps["features_cache"] = "true"
    if args.debug:  # our hook and rules, the same way on every target
        hps["debug"] = "true"
    parse_hyperparameters(hps)  # fail here, before a job is laid out
    return hps


def _read_hp_file(path: str) -> dict[str, str]:
    try:
        loaded = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(
            f"--hp-from {path} cannot be read ({exc.strerror or exc}); give the path "
            "of a JSON file such as a tuning run's best.json"
        ) from None
    except ValueError as exc:
        raise UserError(
            f"--hp-from {path} is not valid JSON ({exc}); it must hold an object "
            'such as {"lr": 0.001, "batch_size": 64}'
        ) from None
    loaded = loaded.get("hyperparameters", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(loaded, dict):
        raise UserError(f"--hp-from {path} must hold a JSON object of hyperparameters")
    hps = {canonical_key(str(k)): str(v) for k, v in loaded.items()}
    for key in hps:
        refuse_platform_key(key, f"--hp-from {path}:")
    return hps


def cmd_train(args) -> int:
    hps = _hyperparameters(args)
    target = open_target(args)
    request = TrainRequest(
        str(args.data),
        hps,
        args.job_name,
        nproc=args.nproc,
        docker=args.docker,
        prepare=args.prepare,
        prepare_format=args.prepare_format,
        init_from=args.init_from,
    )
    result = target.train(request)
    print_job(result, target)
    return 0 if result.ok else result.code or 1


def print_job(result: JobResult, target: Target) -> None:
    if not result.ok:
        print(f"\njob {result.name} failed ({result.failure})", file=sys.stderr)
    elif result.waited and result.model and not result.details:
        print(f"\njob {result.name} finished")
    for line in result.details:
        print(line)
    if not result.ok or not result.waited:
        return
    for label, value in (
        ("model", result.model if not result.details else None),
        ("outputs", result.outputs),
        ("report", result.report),
        ("log", result.log),
    ):
        if value:
            print(f"  {label + ':':<8} {value}")
    m = result.metrics
    if "test_acc" in m:
        print(
            f"  test accuracy {m['test_acc']:.2%}, top-5 {m['test_top5']:.2%} "
            f"on {m['test_images']} images (best epoch {m['best_epoch']})"
        )
    model = result.model if target.name == "local" else result.name
    print(f"  deploy: python launch.py deploy{_on(target)} --model {model} --name NAME")


# ---------------------------------------------------------------- tune


def cmd_tune(args) -> int:
    from imgclf.tuning.space import load_space

    if args.status:
        from imgclf.targets.local import LocalTarget

        status = LocalTarget(home(args)).tuning_status(Path(args.status), args.storage)
        print_table(status.rows, status.header)
        return 0
    if not (args.data and args.space):
        raise UserError("tune needs --data DIR and --space tuning.yaml (or --status DIR)")
    fixed = parse_assignments(args.hp or [])
    if args.features_cache:
        fixed["features_cache"] = "true"
    space = load_space(args.space, fixed=fixed)
    if args.max_trials:
        space = dataclasses.replace(space, max_trials=args.max_trials)
    if args.parallel:
        space = dataclasses.replace(space, parallel_trials=args.parallel)
    target = open_target(args)
    result = target.tune(
        TuneRequest(
            space,
            args.data,
            out=Path(args.out) if args.out else None,
            storage=args.storage,
            refine=args.refine,
            job_name=args.job_name,
            init_from=args.init_from,
        )
    )
    print_tuning(result, args.data, target)
    return 0 if result.ok else 1


def print_tuning(result: TuningResult, data: str, target: Target) -> None:
    if result.rows:
        print()
        print_table(result.rows, result.header)
    if not result.ok:
        print(result.failure, file=sys.stderr)
    if result.refined:
        print(f"\nfull fine-tunes of the {len(result.refined)} best trials:")
        for r in result.refined:
            print(
                f"  trial {r['trial']}: {r['cached_value']:.5f} on cached features, "
                f"{r['value']:.5f} fine-tuned"
            )
    best = result.best
    if best is None:
        return
    value = f"{best.value:.5f}" if isinstance(best.value, float) else str(best.value)
    print(f"\nbest: trial {best.trial}, {best.metric} {value}")
    print(f"  {best.file}")
    print(f"  retrain: python launch.py train{_on(target)} --data {data} --hp-from {best.file}")


# ---------------------------------------------------------------- endpoints


def cmd_deploy(args) -> int:
    target = open_target(args)
    request = DeployRequest(
        args.model,
        args.name,
        port=args.port,
        workers=args.workers,
        response_format=args.response_format,
        docker=args.docker,
        serverless_mb=args.serverless_mb,
        rollout=args.rollout,
        rollback_alarms=tuple(args.rollback_alarm),
        min_instances=args.min_instances,
        max_instances=args.max_instances,
        target_invocations=args.target_invocations,
        async_output=args.async_output,
        startup_timeout_s=args.startup_timeout,
        download_timeout_s=args.download_timeout,
    )
    e = target.deploy(request)
    where = f"{e.url}/invocations" if e.url else e.state
    print(f"endpoint {e.name} is {'up: ' if e.url else ''}{where} ({e.runs_as}; log: {e.log})")
    if e.state not in ("Creating", "Updating"):
        print(f"  python launch.py invoke{_on(target)} --endpoint {e.name} IMAGE...")
    if e.url:
        print(f"  curl --data-binary @IMAGE -H 'Content-Type: image/jpeg' {e.url}/invocations")
    if e.bills:
        print(f"  it bills until deleted: python launch.py delete {e.name}{_on(target)}")
    return 0


def cmd_endpoints(args) -> int:
    target = open_target(args)
    found = target.endpoints()
    if not found:
        print(f"no {target.name} endpoints")
        return 0
    header = ["name", "port", "runs as", "state", "age", "model"]
    rows = [[e.name, str(e.port or ""), e.runs_as, e.state, e.age, e.model] for e in found]
    kept = [i for i in range(len(header)) if any(row[i] for row in rows)]  # none empty
    print_table([[row[i] for i in kept] for row in rows], [header[i] for i in kept])
    if any(e.bills for e in found):
        print("each InService endpoint bills per instance-hour until deleted")
    return 0


def cmd_delete(args) -> int:
    for line in open_target(args).delete(args.name):
        print(line)
    return 0


def cmd_invoke(args) -> int:
    from imgclf.data.scan import label_name

    target = open_target(args)
    endpoint = target.pick_endpoint(args.endpoint)
    # The format this command reads, whatever the endpoint's default (`--response-format`).
    attributes = f"topk={args.topk},format=predictions" + (
        ",probabilities=true" if args.probabilities else ""
    )

    def show(path: Path, status: int, answer: dict) -> bool:
        print(f"{path}  (folder: {label_name(path.parent.name)})")
        if status == 202:  # --async --no-wait: where the answer will be
            print(f"  answer: {answer['output']}\n  failure: {answer['failure']}")
            return True
        if status != 200:
            print(f"  {_error_line(status, answer)}")
            return False
        rows = [[f"  {p['label']}", f"{p['probability']:.4f}"] for p in answer["predictions"]]
        print_table(rows, ["  label", "probability"])
        if args.probabilities:
            print("  probabilities: " + json.dumps(answer["probabilities"]))
        return True

    paths = [Path(image) for image in args.images]
    send = target.invoke_async if args.asynchronous else target.invoke
    sent = _send_all(send, endpoint, paths, attributes, batch=args.batch)
    # each answer is printed as it comes (one request per image unless --batch)
    results = [show(p, status, answer) for p, (status, answer) in zip(paths, sent, strict=False)]
    return 0 if len(results) == len(paths) and all(results) else 1


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def _send_all(
    send, endpoint: EndpointInfo, paths: list[Path], attributes: str, *, batch: bool
) -> Iterator[tuple[int, dict]]:
    """(status, answer) per image, as each comes back: one request each, or with `batch` one
    JSON request (one forward pass) of {"instances": [base64 image, ...]}, which yields nothing
    when it failed (said here)."""
    if not batch:
        for p in paths:
            yield send(
                endpoint, _read(p), content_type=content_type(p.name), custom_attributes=attributes
            )
        return
    images = [base64.b64encode(_read(p)).decode("ascii") for p in paths]
    status, answer = send(
        endpoint,
        json.dumps({"instances": images}).encode(),
        content_type="application/json",
        custom_attributes=attributes,
    )
    if status == 202:  # --async --no-wait: one answer for them all, still to come
        yield from ((202, answer) for _ in paths)
        return
    if status != 200:
        print(_error_line(status, answer))
        return
    yield from ((200, a) for a in answer)


def _error_line(status: int, answer: dict) -> str:
    code = f" {status}" if status else ""  # an async request's failure carries no status
    return f"error{code}: {answer.get('error')} ({answer.get('hint')})"


# ---------------------------------------------------------------- batch transform


def cmd_transform(args) -> int:
    if args.concurrency is not None and args.concurrency < 1:
        raise UserError(f"--concurrency {args.concurrency}: give 1 or more requests in flight")
    target = open_target(args)
    request = TransformRequest(
        args.model,
        args.input,
        args.output,
        max_payload_mb=check_payload_mb(args.max_payload_mb),
        concurrency=args.concurrency,
        response_format=args.response_format,
        accept=ACCEPT_TYPES[args.accept],
        docker=args.docker,
        job_name=args.job_name,
    )
    result = target.transform(request)
    for line in result.details:
        print(line)
    if not result.waited:
        return 0
    print(f"answers: {result.outputs} (one <file>.out per input file)")
    print(result.line())
    return 1 if result.failed else 0


# ---------------------------------------------------------------- debug / report


def cmd_debug(args) -> int:
    from imgclf.debugging import rules
    from imgclf.debugging.hook import find_tensor_dir

    job = open_target(args).job_dir(args.job)
    outputs = JobOutputs.of(job)
    tensors = find_tensor_dir(job) or outputs.layout.output_dir / "tensors"
    verdicts = rules.run_rules(tensors, outputs.rules_context())
    for verdict in verdicts:
        print(verdict.line())
    write_json(outputs.layout.rules_file, rules.verdicts_to_json(verdicts))
    return 1 if any(v.status == "fired" for v in verdicts) else 0


def cmd_evaluate(args) -> int:
    """A model on a split without training: the test section of a job, for any data."""
    from imgclf.evaluate import evaluate_model

    model = Path(args.model)
    if not model.exists() and (home(args) / "jobs" / args.model / "model").is_dir():
        model = home(args) / "jobs" / args.model / "model"  # a local job's name
    name = model.parent.name if model.name == "model" else model.name.split(".")[0]
    out = Path(args.out) if args.out else home(args) / "evaluations" / f"{name}-{args.split}"
    metrics = evaluate_model(
        model, Path(args.data), split=args.split, out=out, batch_size=args.batch_size
    )
    split = args.split
    print(
        f"{split} accuracy {metrics[f'{split}_acc']:.2%}, top-5 {metrics[f'{split}_top5']:.2%}, "
        f"macro F1 {metrics['macro_avg']['f1']:.3f}, ECE {metrics[f'{split}_ece']:.4f} on "
        f"{metrics[f'{split}_images']} images"
    )
    print(f"  metrics:     {out / METRICS_FILE}")
    print(f"  predictions: {out / (split + '_predictions.csv')}")
    print(f"  report:      {out / REPORT_FILE}")
    return 0


def cmd_report(args) -> int:
    from imgclf import report

    job = open_target(args).job_dir(args.job)
    path = report.write_report(job, Path(args.out) if args.out else None)
    print(f"report: {path}")
    return 0
