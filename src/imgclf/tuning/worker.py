"""A long-lived trial worker: runs cached-feature trials one after another in one process.

A trial on cached features trains a linear head for a second or so; as a process of its own it
would pay ~5.5 s of imports (torch, torchvision) each time. The tuner's worker pool
(`imgclf.tuning.worker_pool`) starts a worker when a trial finds none idle, so at most one per
parallel slot, and keeps it for the whole tuning job, handing it trials: each one is the training
program's `main` over the trial's job dir, with the job's environment, exactly what the program
runs as in a `train` process. Every other trial (full fine-tunes, the refine runs, trials whose
hyperparameters do not parse) stays a `train` process over a job dir, as SageMaker runs them.

Protocol (`python -m imgclf.tuning.worker`, stderr joined to stdout): after the imports the
worker prints the line READY; then for each line on stdin (a JSON object {"env": {...}}, the
job's environment) it runs that job, whose output the tuner copies to the trial's train.log,
and ends it with the line `DONE <exit code>` (READY and DONE are the constants below). SIGTERM
stops the running trial as it stops a job (the last epoch's checkpoint is kept, output/failure
says why) and the worker waits for the next line. EOF on stdin ends the worker.
"""

from __future__ import annotations

import json
import os
import sys

READY = "#imgclf-trial-worker ready"
DONE = "#imgclf-trial-worker done"


def serve() -> int:
    from imgclf import train  # torch, torchvision, the program: paid once per worker

    print(READY, flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        env = json.loads(line)["env"]
        # The job's own environment, as its process would have it (the program reads a few
        # settings from os.environ: the scan cache, no report per trial).
        os.environ.update(env)
        print(f"trial worker {os.getpid()}: running {env.get('TRAINING_JOB_NAME')}", flush=True)
        code = train.main(dict(os.environ))
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"{DONE} {code}", flush=True)


if __name__ == "__main__":
    sys.exit(serve())
