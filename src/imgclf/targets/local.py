"""The local target: training jobs (imgclf.jobs) as processes or under Docker, tuning with Optuna
(imgclf.tuning), endpoints (targets.endpoints: `serve` as a process group or the serving image as
a container, one record and one readiness path for both). Everything lives under one home folder
(.imgclf, or $IMGCLF_HOME)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from imgclf import jobs
from imgclf import transform as batch
from imgclf.contract import (
    BEST_FILE,
    HOME_ENV,
    SERVE_BATCH_ENV,
    SERVE_MAX_PAYLOAD_ENV,
    check_name,
)
from imgclf.errors import UserError
from imgclf.job_outputs import JobOutputs
from imgclf.targets import docker, endpoints
from imgclf.targets.base import (
    BestTrial,
    DeployRequest,
    EndpointInfo,
    JobResult,
    TrainRequest,
    TransformRequest,
    TransformResult,
    TuneRequest,
    TuningResult,
)
from imgclf.targets.runners import runner_of
from imgclf.util import free_port, new_job_name, parse_bool, plain_dir

TRIAL_HEADER = ("trial", "state", "epochs")  # then the metric, then the hyperparameters


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV, ".imgclf")).resolve()


def tuning_header(metric: str) -> tuple[str, ...]:
    return (*TRIAL_HEADER, metric, "hyperparameters")


class LocalTarget:
    name = "local"

    def __init__(self, home: Path) -> None:
        self.home = home

    # ------------------------------------------------------------ jobs

    def train(self, request: TrainRequest) -> JobResult:
        name = check_name("job", request.job_name or new_job_name())
        if request.docker:
            docker.require_docker()
        data = Path(request.data)
        if request.prepare:  # raw RGB: nothing to decode when read
            from imgclf.prepare import prepared_copy

            data = prepared_copy(self.home, data, request.prepare, request.prepare_format or "raw")
        hps = dict(request.hyperparameters)
        if parse_bool(hps.get("features_cache", "false")) and not (
            request.docker or "features_dir" in hps
        ):
            hps["features_dir"] = str((self.home / "features").resolve())  # shared by jobs
        init_model = None
        if request.init_from:
            init_model = jobs.init_model_path(self.home, request.init_from)
        job = jobs.prepare_job(
            self.home,
            name,
            data_dir=data,
            hyperparameters=hps,
            nproc=request.nproc,
            link_data=not request.docker,
            init_model=init_model,
        )
        print(f"job {name}: {job.layout.base}", flush=True)
        if request.docker:
            command, env = docker.docker_command(job, request.docker), None
        else:
            command, env = jobs.train_command(), jobs.job_environment(job)
        code = jobs.run_job(job, command, env)
        failure = jobs.read_failure(job)
        log = str(job.log_file)
        if code != 0 or failure:
            why = f"exit {code}: {failure or 'see ' + log}"
            return JobResult(name, ok=False, code=code or 1, failure=why, log=log)
        outputs = JobOutputs(job.layout)
        report = outputs.report()
        return JobResult(
            name,
            ok=True,
            model=str(job.layout.model_dir),
            outputs=str(job.layout.output_data_dir),
            report=str(report) if report else None,
            log=log,
            metrics=outputs.metrics(),
        )

    def job_dir(self, job: str) -> Path:
        path = Path(job)
        if path.is_dir():  # a job dir the user names by its path
            return path
        named = self.home / "jobs" / check_name("job", job)
        if named.is_dir():
            return named
        raise UserError(f"{job} is neither a job dir nor a local job name (see {named.parent})")

    # ------------------------------------------------------------ tuning

    def tune(self, request: TuneRequest) -> TuningResult:
        from imgclf.tuning import local as tuner
        from imgclf.tuning import results

        if request.refine and request.storage:
            raise UserError("--refine works with the default storage (SQLite in the tuning dir)")
        out = request.out or self.home / "tuning" / new_job_name("tune")
        init_model = None
        if request.init_from:  # every trial (and refined one) starts from this model
            init_model = jobs.init_model_path(self.home, request.init_from)
        space = request.space
        if parse_bool(space.static.get("features_cache", "false")):  # one cache for all trials
            static = {"features_dir": str((out / "features").resolve()), **space.static}
            space = dataclasses.replace(space, static=static)
        early = "on" if space.early_stopping else "off"
        print(
            f"tuning {', '.join(space.names)} for {space.direction} {space.metric} "
            f"({space.strategy}, early stopping {early}) in {out}"
        )
        print(f"  (stopped? run the same command with --out {out} to resume)", flush=True)
        best = tuner.run_tuning(
            space,
            data_dir=Path(request.data),
            out_dir=out,
            storage=request.storage,
            init_model=init_model,
        )
        refined: tuple[dict, ...] = ()
        if request.refine:
            best = results.refine(
                space,
                data_dir=Path(request.data),
                out_dir=out,
                count=request.refine,
                init_model=init_model,
            )
            refined = tuple(json.loads((out / results.REFINED_FILE).read_text()))
        status = self.tuning_status(out, request.storage)
        return dataclasses.replace(
            status, best=BestTrial.from_doc(best, out / BEST_FILE), refined=refined
        )

    def tuning_status(self, out: Path, storage: str | None = None) -> TuningResult:
        """The trial table of a tuning dir, running or done."""
        from imgclf.tuning import results

        meta, rows = results.load_status(out, storage)
        return TuningResult(
            str(out),
            ok=True,
            header=tuning_header(meta["metric"]),
            rows=tuple(tuple(r) for r in rows),
        )

    # ------------------------------------------------------------ endpoints

    def deploy(
        self, request: DeployRequest, *, environment: dict[str, str] | None = None
    ) -> EndpointInfo:
        check_name("endpoint", request.name)
        sagemaker_only = request.sagemaker_only()
        if sagemaker_only:
            raise UserError(
                f"{', '.join(sagemaker_only)}: SageMaker endpoint settings; add --target sagemaker "
                "or drop them"
            )
        swapped = self._swap(request)
        if swapped is not None:
            return swapped
        print(f"starting endpoint {request.name} on 127.0.0.1:{request.port} ...", flush=True)
        endpoint = endpoints.deploy(
            self.home,
            Path(request.model),
            name=request.name,
            port=request.port,
            image=request.docker,
            workers=request.workers,
            response_format=request.response_format,
            environment=environment,
        )
        return _endpoint_info(endpoint, "healthy")

    def _swap(self, request: DeployRequest) -> EndpointInfo | None:
        """`deploy` to the name of a running endpoint: its model is swapped with the port open,
        or refused saying why (a container's, or one of the other kind); None for a new
        endpoint."""
        running = endpoints.running_endpoint(self.home, request.name)
        if running is None:
            return None
        refusal = endpoints.swap_refusal(running, request.docker)
        if refusal:
            raise UserError(refusal)
        print(
            f"swapping the model of endpoint {request.name} on 127.0.0.1:{running.port} (the "
            "port stays open; its workers and settings are kept) ...",
            flush=True,
        )
        return _endpoint_info(endpoints.swap_model(self.home, running, Path(request.model)))

    # ------------------------------------------------------------ batch transform

    def transform(self, request: TransformRequest) -> TransformResult:
        """Every file of a folder through the serving program in batch mode (a process, or the
        image with --docker), started as `deploy` starts it on a free port and stopped at the
        end; only the files with no `.out` yet are sent."""
        if "://" in request.input or "://" in request.output:
            raise UserError(
                "the local target reads a folder and writes a folder; for s3:// add "
                "--target sagemaker (or copy it here first: aws s3 sync)"
            )
        source, out = Path(request.input), Path(request.output)
        items = batch.scan_folder(source)
        batch.check_folders(source, out)
        plain_dir(out, "output folder")
        todo = batch.pending(items, out)
        big = {
            i.rel: batch.too_big_reason(i, request.max_payload_mb)
            for i in batch.oversized(todo, request.max_payload_mb)
        }
        todo = [i for i in todo if i.rel not in big]
        labels = (
            batch.model_labels(Path(request.model))
            if request.response_format == "vectors"
            else None
        )
        name = check_name("endpoint", request.job_name or new_job_name("transform"))
        done = len(items) - len(todo) - len(big)
        print(
            f"transform {name}: {len(items)} files in {source}"
            + (f", {done} already answered in {out}" if done else "")
            + (f", {len(big)} over {request.max_payload_mb} MB" if big else ""),
            flush=True,
        )
        errors = dict(big)
        details = []
        if todo:
            started = time.perf_counter()
            failed, sending = self._send(name, request, todo, out)
            errors.update(failed)
            rest = time.perf_counter() - started - sending
            details.append(
                f"sent {len(todo)} files in {sending:.1f} s ({len(todo) / sending:.1f} images/s; "
                f"the server's start and stop took {rest:.1f} s more)"
            )
        summary = batch.write_predictions(items, out, errors=errors, labels=labels)
        return TransformResult.of(name, summary, str(out), details)

    def _send(
        self, name: str, request: TransformRequest, todo: list[batch.Item], out: Path
    ) -> tuple[dict[str, str], float]:
        """Start the server in batch mode, send `todo`, stop it (also on Ctrl-C); the reason
        for each file that got no answer, and the seconds the sending took."""
        settings = {SERVE_BATCH_ENV: "true", SERVE_MAX_PAYLOAD_ENV: str(request.max_payload_mb)}
        if endpoints.name_taken(self.home, name):
            raise UserError(
                f"an endpoint named {name} exists; pick another --job-name for the transform"
            )
        try:  # from here on, whatever runs under `name` is this transform's server
            info = self.deploy(
                DeployRequest(
                    request.model,
                    name,
                    port=free_port(),
                    response_format=request.response_format,
                    docker=request.docker,
                ),
                environment=settings,
            )
            assert info.url is not None
            params = batch.execution_parameters(info.url)
            concurrency = request.concurrency or params["MaxConcurrentTransforms"]
            print(
                f"  {len(todo)} to send, {concurrency} at a time "
                f"(the server takes {params['MaxConcurrentTransforms']})",
                flush=True,
            )
            started = time.perf_counter()
            outcomes = batch.send_all(
                info.url,
                todo,
                out,
                concurrency=concurrency,
                accept=request.accept,
                max_payload_mb=request.max_payload_mb,
            )
            sending = time.perf_counter() - started
        finally:  # also while it starts: a Ctrl-C there leaves nothing running
            self._stop_server(name)
        return {o.rel: o.error for o in outcomes if o.error}, sending

    def _stop_server(self, name: str) -> None:
        """Stop and remove the transform's own server (if it got that far)."""
        if endpoints.name_taken(self.home, name):
            endpoints.delete_endpoint(self.home, name)

    def endpoints(self) -> list[EndpointInfo]:
        return [_endpoint_info(e) for e in endpoints.list_endpoints(self.home)]

    def delete(self, name: str) -> list[str]:
        check_name("endpoint", name)  # before any path is made of it
        return [f"endpoint {name} {endpoints.delete_endpoint(self.home, name)}"]

    def pick_endpoint(self, name: str | None) -> EndpointInfo:
        if name:
            check_name("endpoint", name)
            endpoint = endpoints.load_endpoint(self.home, name)
            if endpoint is None:
                raise UserError(f"no local endpoint named {name}; `launch.py endpoints` lists them")
            return _endpoint_info(endpoint, "")
        running = endpoints.running_endpoints(self.home)
        if len(running) != 1:
            names = ", ".join(e.name for e in running) or "none running"
            raise UserError(f"name the endpoint with --endpoint ({names})")
        return _endpoint_info(running[0], "")

    def invoke(
        self, endpoint: EndpointInfo, body: bytes, *, content_type: str, custom_attributes: str
    ) -> tuple[int, Any]:
        assert endpoint.url is not None
        return endpoints.invoke(
            endpoint.url, body, content_type=content_type, custom_attributes=custom_attributes
        )

    def invoke_async(
        self, endpoint: EndpointInfo, body: bytes, *, content_type: str, custom_attributes: str
    ) -> tuple[int, Any]:
        raise UserError(
            "--async is for SageMaker asynchronous endpoints (deploy --async-output); a local "
            "endpoint answers each request directly: drop --async"
        )


def _endpoint_info(endpoint: endpoints.Endpoint, state: str | None = None) -> EndpointInfo:
    runner = runner_of(endpoint)
    return EndpointInfo(
        endpoint.name,
        state=endpoints.endpoint_state(endpoint) if state is None else state,
        model=endpoints.models_served(endpoint),
        runs_as=runner.runs_as(endpoint),
        url=endpoint.url,
        log=runner.log(endpoint),
        port=endpoint.port,
    )
