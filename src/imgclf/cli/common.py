"""What every command module of the launcher shares: the home folder and table printing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def home(args) -> Path:
    """--home, else $IMGCLF_HOME, else .imgclf: where local jobs, endpoints and caches live."""
    from imgclf.targets.local import default_home

    return Path(args.home).resolve() if args.home else default_home()


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(cell).rjust(w) if i else str(cell).ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
