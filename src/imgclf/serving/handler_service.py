"""The multi-model-server adapter. MMS loads this module and wants exactly one class in it.

Thin by design: decode each request of MMS's batch (serve registers the model with a batch size,
so concurrent requests arrive together) into its uint8 crops, on as many threads as the worker
has CPUs, each holding one request's decoded images at a time → one forward pass over all their
crops → encode each answer on its own: a bad request gets its own 4xx and the others their
answers. Every exception a request's bytes or headers can cause is a 4xx JSON answer; our own
bugs in the forward pass are logged here with their traceback and answered with a bare 500,
never with the traceback. Reason phrases are fixed ASCII text (see protocol.reason_phrase).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgclf import processes, util
from imgclf.contract import (
    MMS_WORKERS_ENV,
    WORKER_LOADED_DIR_ENV,
)
from imgclf.serving import inference, protocol, runtime
from imgclf.serving.settings import Settings, read_settings

log = logging.getLogger("imgclf.serving")


def _process_age_s() -> float:
    """Seconds since this process started (psutil's create time; 0 when unknown)."""
    import psutil

    try:
        return max(0.0, time.time() - psutil.Process().create_time())
    except psutil.Error:
        return 0.0


_INTERNAL = protocol.error_body(
    "internal error while predicting", "the endpoint's log has the details"
)


def mark_loaded(folder: str | None, model: str = "") -> None:
    """Tell serve this worker can answer now: a file named by our pid, holding our start time
    (processes.process_start) and the name MMS registered our model under (two models are
    registered while serve swaps one for the other), in `folder`. MMS's own READY comes before
    the model is loaded."""
    if not folder:
        return
    pid = os.getpid()
    mark = (processes.process_start(pid) or "") + (f"\n{model}" if model else "")
    try:
        util.atomic_write(Path(folder) / str(pid), mark)
    except OSError as exc:
        # Unmarked, this worker would never count as ready: fail its load instead, so that
        # MMS starts another and serve's restart rules apply.
        log.error("cannot mark this worker loaded in %s: %s", folder, exc.strerror)
        raise RuntimeError(f"cannot mark this worker loaded: {exc.strerror}") from None


def mark_failed(folder: str | None, model: str, exc: BaseException) -> None:
    """Tell serve why this worker could not load `model` (serve stops waiting for it and says
    so): `<pid>.failed` in `folder`, the model's name, then the reason in one line."""
    if not folder:
        return
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        util.atomic_write(Path(folder) / f"{os.getpid()}.failed", f"{model}\n{text[:500]}")
    except OSError as err:
        log.error("cannot leave the load's failure in %s: %s", folder, err.strerror)


class HandlerService:
    """MMS custom service: `initialize` once per worker, `handle` per batch of requests."""

    def __init__(self) -> None:
        self.loaded: inference.LoadedModel | None = None
        self.settings = Settings()  # serve's own, read again from the worker's environment
        self._pool: ThreadPoolExecutor | None = None  # decodes a batch's requests side by side

    def initialize(self, context) -> None:
        try:
            self._initialize(context)
        except Exception as exc:
            mark_failed(os.environ.get(WORKER_LOADED_DIR_ENV), context.model_name, exc)
            raise

    def _initialize(self, context) -> None:
        # Python, MMS's worker and our imports come before this (no torch for a graph).
        started, began = _process_age_s(), time.perf_counter()
        self.settings = read_settings(os.environ)
        workers = int(os.environ.get(MMS_WORKERS_ENV, "1"))
        threads = inference.torch_threads(workers)
        if threads > 1:
            # At most `threads` requests' decoded images are held at once (one each).
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        model_dir = context.system_properties.get("model_dir")
        gpu = context.system_properties.get("gpu_id")
        device = "cpu"  # decided without torch: MMS names a GPU only where there is one
        if gpu is not None:
            import torch

            if torch.cuda.is_available():
                device = torch.device("cuda", int(gpu))
        self.loaded = inference.model_fn(
            model_dir, device=device, cpu_runtime=self.settings.cpu_runtime, threads=threads
        )
        if self.loaded.forward.runtime == runtime.ONNXRUNTIME and "torch" in sys.modules:
            # ONNX Runtime has its own threads; idle OpenMP threads of a torch loaded for an
            # export would spin and take CPU from it.
            sys.modules["torch"].set_num_threads(1)
        inference.check_prediction(self.loaded)  # as serve's preflight does
        log.info(
            "model loaded from %s on %s (%s): worker up %.2f s, model %.2f s",
            model_dir,
            device,
            self.loaded.forward.runtime,
            started,
            time.perf_counter() - began,
        )
        mark_loaded(os.environ.get(WORKER_LOADED_DIR_ENV), context.model_name)

    def handle(self, data, context):
        if data is None:
            return None
        loaded = self.loaded
        answers: list[bytes | None] = [None] * len(data)
        work = []  # (request index, crops, options, accept, is_batch)
        jobs = list(enumerate(data))
        started = time.perf_counter()
        if self._pool is not None and len(jobs) > 1:
            # The requests of an MMS batch are decoded side by side: the decoder and the resize
            # release the GIL, and the model's threads are idle until they are done.
            results = list(self._pool.map(lambda job: _read_request(self, *job, context), jobs))
        else:
            results = [_read_request(self, idx, request, context) for idx, request in jobs]
        for idx, result in enumerate(results):
            # A batch transform's placeholder is for an image that cannot be classified (a
            # 4xx); a failure of ours (5xx) stays one, so SageMaker retries it.
            if (
                isinstance(result, protocol.RequestError)
                and self.settings.batch
                and (result.status < 500)
            ):
                answers[idx] = placeholder(result)
            elif isinstance(result, protocol.RequestError):
                answers[idx] = result.body()
                context.set_response_status(result.status, result.reason, idx=idx)
            else:
                work.append(result)
        read = time.perf_counter()
        if work:
            try:
                crops = work[0][1] if len(work) == 1 else np.concatenate([w[1] for w in work])
                probs = inference.predict_batch(crops, loaded)
                predicted = time.perf_counter()
                start = 0
                for idx, crops, options, accept, is_batch in work:
                    rows = probs[start : start + len(crops)]
                    start += len(crops)
                    # The answer's type travels no further than this: the front names it from
                    # the request's Accept (protocol.answer_type). MMS 1.1's Java decoder fails
                    # a whole batch's frame when a worker's answer arrives split inside the
                    # per-request header map (seen as "Invalid message size: -3" and a
                    # restarted worker under load), so answers go with an empty map.
                    answers[idx], _ = inference.output_fn(
                        rows,
                        loaded.labels,
                        accept=accept,
                        options=options,
                        batch=is_batch,
                        thresholds=loaded.thresholds,
                    )
            except Exception:
                log.exception("prediction failed")
                for idx, *_ in work:
                    answers[idx] = _INTERNAL
                    context.set_response_status(500, protocol.reason_phrase(500), idx=idx)
            else:
                _record_times(context, started, read, predicted, time.perf_counter())
        return answers


def placeholder(error: protocol.RequestError) -> bytes:
    """A batch transform's answer for a request that cannot be classified (an unreadable or
    over-budget image): a 200 whose body says why, with no predictions. A 4xx would fail the
    user's whole transform job; this way every other image is classified, and the image's
    `.out` file names the problem (`launch.py transform` lists it in predictions.csv)."""
    doc = json.loads(error.body())
    return json.dumps({**doc, "status": error.status, "predictions": []}).encode()


def _record_times(context, started: float, read: float, predicted: float, encoded: float):
    """The batch's stages as MMS metrics (logged beside its PredictionTime, per batch):
    ImgclfReadTime (decoding and cropping every request), ImgclfModelTime (the forward pass),
    ImgclfEncodeTime (the answers). benchmarks/serve.py splits a request's time with them."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:  # called outside MMS's service
        return
    try:
        for name, begin, end in (
            ("ImgclfReadTime", started, read),
            ("ImgclfModelTime", read, predicted),
            ("ImgclfEncodeTime", predicted, encoded),
        ):
            metrics.add_time(name, round((end - begin) * 1000, 2))
    except Exception:  # timings are not worth an answered batch
        log.warning("cannot record the batch's stage times", exc_info=True)


def _read_request(service: HandlerService, idx: int, request, context):
    """One request of the batch → (idx, uint8 crops, options, accept, is_batch), or the
    RequestError to answer it with."""
    loaded = service.loaded
    try:
        headers = _headers(context, idx)
        if loaded is None:
            raise protocol.RequestError(503, "the model is not loaded", "see the endpoint's log")
        body = request.get("body")
        if body is None:
            body = request.get("data") or b""
        body = bytes(body) if not isinstance(body, str) else body.encode()
        content_type = headers.get("content-type")
        accept = headers.get("accept")
        options = inference.parse_options(
            headers.get("x-amzn-sagemaker-custom-attributes"),
            loaded.num_classes,
            accept_format=protocol.check_accept(accept),
            default_format=service.settings.response_format,
            default_min_confidence=service.settings.min_confidence,
            thresholds=loaded.thresholds,
        )
        images = inference.input_fn(
            body,
            content_type,
            draft=loaded.preprocess.resize_size,
            max_body=service.settings.limits.max_body_bytes,
        )
        crops = inference.prepare(images, loaded)  # the decoded images are dropped here
        is_batch = protocol.request_type(content_type, body) == protocol.JSON_TYPE
        return idx, crops, options, accept, is_batch
    except MemoryError:
        raise  # the worker cannot go on; MMS restarts it
    except protocol.RequestError as exc:
        return exc
    except Exception:
        # Caused by this request's bytes or headers, so a 4xx; logged as our bug.
        log.exception("request %d could not be read", idx)
        return protocol.RequestError(
            400, "the request could not be read", "check its headers and body"
        )


def _headers(context, idx: int) -> dict[str, str]:
    """The request's headers with lower-case names (MMS keeps the client's spelling)."""
    raw = context.get_all_request_header(idx) or {}
    out = {}
    for key, value in raw.items():
        if isinstance(value, bytes | bytearray):
            value = value.decode("latin-1")
        if isinstance(value, str):
            out[str(key).lower()] = value
    return out
