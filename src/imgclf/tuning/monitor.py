"""Tables of trials: the live one the tuner draws while trials run, and the one of a whole
study (`tune --status`, and after a tuning job)."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field


@dataclass
class TrialRow:
    number: int
    params: dict
    epoch: int = 0
    value: float | None = None
    state: str = "RUNNING"


@dataclass
class Monitor:
    """The live table: redrawn in place on a terminal, one line per event otherwise."""

    metric: str
    live: bool = field(default_factory=lambda: sys.stdout.isatty())
    rows: dict[int, TrialRow] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    drawn: int = 0

    def update(self, number: int, **changes) -> None:
        with self.lock:
            row = self.rows.setdefault(number, TrialRow(number, changes.pop("params", {})))
            for key, value in changes.items():
                setattr(row, key, value)
            if self.live:
                self._redraw()
            elif "state" in changes or "epoch" in changes:
                print(self._line(row), flush=True)

    def _line(self, row: TrialRow) -> str:
        params = " ".join(f"{k}={short(v)}" for k, v in row.params.items())
        value = "" if row.value is None else f"{row.value:.5f}"
        return (
            f"trial {row.number:>3}  {row.state:<8} epoch {row.epoch:>3}  "
            f"{self.metric} {value:<9}  {params}"
        )

    def _redraw(self) -> None:
        lines = [self._line(r) for r in sorted(self.rows.values(), key=lambda r: r.number)]
        if self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F\x1b[J")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self.drawn = len(lines)


def short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_table(study, metric: str, direction: str) -> list[list[str]]:
    """All trials, best first: number, state, last epoch, objective, parameters."""
    import optuna

    sign = 1.0 if direction == "minimize" else -1.0

    def key(t):
        ok = t.state == optuna.trial.TrialState.COMPLETE and t.value is not None
        return (0 if ok else 1, sign * t.value if ok else 0.0, t.number)

    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=key):
        epochs = max(t.intermediate_values) if t.intermediate_values else 0
        value = "" if t.value is None else f"{t.value:.5f}"
        params = " ".join(f"{k}={short(v)}" for k, v in t.params.items())
        rows.append([str(t.number), t.state.name, str(epochs), value, params])
    return rows
