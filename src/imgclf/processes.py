"""Processes as the launcher and `serve` see them (torch-free): who is alive, which process a
pid names now (its start time), the members of a process group, command lines.

A pid alone names nothing for long: after a reboot or enough forks, the pid recorded for an
endpoint belongs to somebody else. Every record that will be used to signal a process keeps the
pid *and* its start time (`process_start`), and `same_process` checks both before any signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import psutil


def proc_stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first: proc(5)'s field 3 is
    index 0), or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].split()


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, from /proc), or None when there is
    no such process: with the pid, it names one process even after pids are reused."""
    fields = proc_stat_fields(pid)
    return None if fields is None else fields[19].decode()  # field 22: starttime


def boot_id() -> str | None:
    """This boot's random id (Linux): a start time in clock ticks names a process only within
    the boot it was read in."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, process group) of a live process, from /proc."""
    fields = proc_stat_fields(pid)
    if fields is None:
        return None
    return fields[0].decode(), int(fields[1]), int(fields[2])


def process_alive(pid: int) -> bool:
    """A process with this pid exists (a zombie counts: see `running`)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    if not process_alive(pid):
        return False
    stat = proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")  # no /proc: trust kill(pid, 0)


def same_process(pid: int, start: str | None) -> bool:
    """`pid` still names the process that started at `start` (from `process_start`). A record
    without a start time (written before they carried one) names nothing we may signal."""
    return bool(start) and process_start(pid) == start


def group_members(pgid: int) -> dict[int, tuple[str, int]]:
    """{pid: (state, ppid)} of every process in the process group."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[2] == pgid:
                out[int(entry)] = (stat[0], stat[1])
    return out


def group_alive(pgid: int) -> bool:
    """Any process of the group is running (zombies waiting to be reaped do not count)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap it if it is our own child that has exited
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    return any(state not in ("Z", "X") for state, _ in group_members(pgid).values())


def cmdline(pid: int) -> str:
    """The process's command line joined by spaces ("" when it is gone or unreadable)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return ""


def lead_own_group() -> int:
    """Make this process its group's leader (unless it already is) and return the group."""
    if os.getpgid(0) != os.getpid():
        with contextlib.suppress(PermissionError):  # a session leader already leads its group
            os.setpgid(0, 0)
        if os.isatty(0):  # run by hand in a terminal: keep Ctrl-C reaching it
            previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            with contextlib.suppress(OSError):
                os.tcsetpgrp(0, os.getpgid(0))
            signal.signal(signal.SIGTTOU, previous)
    return os.getpgid(0)
