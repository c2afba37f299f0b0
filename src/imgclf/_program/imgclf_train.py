"""SAGEMAKER_PROGRAM: the script sagemaker-training runs (alone or under torchrun).

It is copied into the job's code/ directory; all logic lives in the installed package.
"""

import sys

from imgclf.train import main

if __name__ == "__main__":
    sys.exit(main())
