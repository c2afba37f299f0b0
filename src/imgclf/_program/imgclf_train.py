"""SAGEMAKER_PROGRAM: the script sagemaker-training runs (alone or under torchrun).

It is copied into the job's code/ directory; all logic lives in the installed package.
"""

import atexit
import os
import sys

from imgclf.train import main

if __name__ == "__main__":
    code = main()
    # The exit handlers run (loader workers, smdebug's writers, logging), then the process ends
    # without the interpreter's module teardown, which takes ~1 s with torch loaded: a second
    # off every job and tuning trial.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)
