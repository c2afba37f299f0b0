#!/usr/bin/env python3
"""imgclf launcher: data checks, training, tuning, endpoints; local or on SageMaker.

Run `python launch.py --help`. When started with a Python that lacks imgclf, it re-runs itself
with the project's .venv (made by `make setup`).
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _ensure_environment() -> None:
    try:
        import imgclf  # noqa: F401
    except ImportError:
        venv = ROOT / ".venv"
        venv_python = venv / "bin" / "python"
        if venv_python.exists() and Path(sys.prefix).resolve() != venv.resolve():
            os.execv(str(venv_python), [str(venv_python), *sys.argv])  # noqa: S606
        sys.exit("imgclf is not installed: run `make setup` first (creates .venv)")


if __name__ == "__main__":
    _ensure_environment()
    from imgclf.cli import main

    sys.exit(main())
