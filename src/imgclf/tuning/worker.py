"""A long-lived trial worker: runs cached-feature trials one after another in one process.

A trial on cached features trains a linear head for a second or so; as a process of its own it
would pay ~5.5 s of imports (torch, torchvision) each time. The tuner starts one worker per
parallel slot for the whole tuning job instead, and hands it trials: each one is the training
program's `main` over the trial's job dir, with the job's environment, exactly what the program
runs as in a `train` process. Full fine-tunes never come here: they stay `train` processes over
a job dir, as SageMaker runs them.

Protocol (`python -m imgclf.tuning.worker`): after the imports the worker prints READY; then
for each line on stdin (a JSON object {"env": {...}}, the job's environment) it runs that job,
its output on stdout, and ends it with a line `DONE <exit code>`. SIGTERM stops the running
trial as it stops a job (the last epoch's checkpoint is kept, output/failure says why). EOF on
stdin ends the worker.
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
