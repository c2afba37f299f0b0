"""Following what runs on SageMaker: status lines, CloudWatch logs, waiters."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from imgclf.errors import UserError
from imgclf.targets.sagemaker.aws import Clients, aws_errors

LOG_GROUP_TRAINING = "/aws/sagemaker/TrainingJobs"
LOG_GROUP_TRANSFORM = "/aws/sagemaker/TransformJobs"


class LogStreamer:
    """Prints new CloudWatch log events of a job's streams (`<job>/algo-N-...`)."""

    def __init__(self, logs, group: str, prefix: str, out=None) -> None:
        self.logs, self.group, self.prefix = logs, group, prefix
        self.tokens: dict[str, int] = {}
        self.out = out or sys.stdout

    def poll(self) -> int:
        from botocore.exceptions import ClientError

        printed = 0
        try:
            streams = self.logs.describe_log_streams(
                logGroupName=self.group, logStreamNamePrefix=self.prefix
            ).get("logStreams", [])
        except ClientError:
            return 0  # the group appears when the first instance starts
        for stream in streams:
            name = stream["logStreamName"]
            start = self.tokens.get(name, 0)
            events = self.logs.get_log_events(
                logGroupName=self.group, logStreamName=name, startTime=start, startFromHead=True
            ).get("events", [])
            for event in events:
                if event["timestamp"] < start:
                    continue
                host = name[len(self.prefix) :].split("-")[:2]
                print(f"[{'-'.join(host)}] {event['message'].rstrip()}", file=self.out)
                printed += 1
                self.tokens[name] = event["timestamp"] + 1
        self.out.flush()
        return printed


def wait_for_training(
    c: Clients,
    job_name: str,
    *,
    poll_s: float = 30.0,
    ask: Callable[[str], str] | None = None,
) -> dict:
    """Follow the job: a line per status change, its CloudWatch log, until it ends. Ctrl-C
    offers to stop it (it keeps running, and billing, otherwise)."""
    return follow_job(
        f"training job {job_name}",
        describe=lambda: c.sagemaker.describe_training_job(TrainingJobName=job_name),
        status=lambda d: (d["TrainingJobStatus"], d.get("SecondaryStatus")),
        streamer=LogStreamer(c.logs, LOG_GROUP_TRAINING, f"{job_name}/"),
        stop=lambda: c.sagemaker.stop_training_job(TrainingJobName=job_name),
        stopped="its last checkpoint stays in S3",
        cli_stop=f"aws sagemaker stop-training-job --training-job-name {job_name}",
        poll_s=poll_s,
        ask=ask,
    )


def wait_for_transform(
    c: Clients,
    job_name: str,
    *,
    poll_s: float = 30.0,
    ask: Callable[[str], str] | None = None,
) -> dict:
    """Follow a batch transform job as `wait_for_training` follows a training job."""
    return follow_job(
        f"transform job {job_name}",
        describe=lambda: c.sagemaker.describe_transform_job(TransformJobName=job_name),
        status=lambda d: (d["TransformJobStatus"], None),
        streamer=LogStreamer(c.logs, LOG_GROUP_TRANSFORM, f"{job_name}/"),
        stop=lambda: c.sagemaker.stop_transform_job(TransformJobName=job_name),
        stopped="the .out files written so far stay in S3; the same command resumes",
        cli_stop=f"aws sagemaker stop-transform-job --transform-job-name {job_name}",
        poll_s=poll_s,
        ask=ask,
    )


def follow_job(
    what: str,
    *,
    describe: Callable[[], dict],
    status: Callable[[dict], tuple[str, str | None]],
    streamer: LogStreamer,
    stop: Callable[[], object],
    stopped: str,
    cli_stop: str,
    poll_s: float,
    ask: Callable[[str], str] | None = None,
) -> dict:
    """A line per status change and the job's CloudWatch log until it ends (Completed, Failed,
    Stopped); Ctrl-C offers to stop it (it keeps running, and billing, otherwise)."""
    last = None
    while True:
        try:
            with aws_errors():
                desc = describe()
                now = status(desc)
                if now != last:
                    print(f"{what}: {' / '.join(s for s in now if s)}", flush=True)
                    last = now
                streamer.poll()
            if now[0] in ("Completed", "Failed", "Stopped"):
                return desc
            time.sleep(poll_s)
        except KeyboardInterrupt:
            answer = "n"
            if ask is not None or sys.stdin.isatty():
                answer = (ask or input)(f"\nstop {what}? [y/N] ").strip().lower()
            if answer.startswith("y"):
                with aws_errors():
                    stop()
                print(f"stopping {what}; {stopped}")
            else:
                print(f"{what} keeps running (and billing); stop it with: {cli_stop}")
            raise


def training_summary(desc: dict) -> list[str]:
    lines = [f"job {desc['TrainingJobName']}: {desc['TrainingJobStatus']}"]
    if desc.get("FailureReason"):
        lines.append(f"  reason: {desc['FailureReason']}")
    model = desc.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if model:
        lines.append(f"  model: {model}")
    for metric in desc.get("FinalMetricDataList", []) or []:
        lines.append(f"  {metric['MetricName']}: {metric['Value']:.4f}")
    seconds = desc.get("BillableTimeInSeconds")
    if seconds:
        lines.append(f"  billable: {seconds} s on {desc['ResourceConfig']['InstanceType']}")
    return lines


def wait_for_tuning(c: Clients, job_name: str, *, poll_s: float = 60.0) -> dict:
    last = None
    while True:
        with aws_errors():
            desc = c.sagemaker.describe_hyper_parameter_tuning_job(
                HyperParameterTuningJobName=job_name
            )
        status = desc["HyperParameterTuningJobStatus"]
        counters = desc.get("TrainingJobStatusCounters", {})
        line = f"{job_name}: {status} " + ", ".join(f"{k} {v}" for k, v in counters.items())
        if line != last:
            print(line, flush=True)
            last = line
        if status in ("Completed", "Failed", "Stopped"):
            return desc
        time.sleep(poll_s)


def wait_for_endpoint(c: Clients, name: str, *, poll_s: float = 30.0) -> dict:
    last = None
    while True:
        with aws_errors():
            desc = c.sagemaker.describe_endpoint(EndpointName=name)
        status = desc["EndpointStatus"]
        if status != last:
            print(f"endpoint {name}: {status}", flush=True)
            last = status
        if status == "InService":
            return desc
        if status in ("Failed", "OutOfService", "UpdateRollbackFailed"):
            reason = desc.get("FailureReason") or f"see log /aws/sagemaker/Endpoints/{name}"
            raise UserError(
                f"endpoint {name} is {status}: {reason}; delete it with "
                f"launch.py delete {name} --target sagemaker"
            )
        time.sleep(poll_s)
