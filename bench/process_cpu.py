"""CPU seconds a server's processes spent in a round: its own process (HTTP) and each process below it.

Read from /proc (Linux; elsewhere `tree_cpu` returns nothing and the bench prints no CPU line). A
process's utime + stime covers all its threads; children are listed through /proc/PID/task/*/children.
With py-spy installed, `Profiler` records the server process's Python stacks during measured rounds
(raw collapsed stacks, one file per round) for finding what the HTTP process spends its time on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[str, float] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, (int(fields[11]) + int(fields[12])) / TICK


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (False where /proc is missing)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of pid and every process below it, by pid (empty where /proc is missing)."""
    out: dict[int, float] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        stat = _stat(p)
        if stat is None:
            continue
        out[p] = stat[1]
        todo += _children(p)
    return out


def cpu_line(pid: int, before: dict[int, float], after: dict[int, float], wall: float) -> str:
    """'HTTP process 0.91 cores, engine process 1.02 cores' over the round's wall time."""
    if not after or wall <= 0:
        return ""
    parts = [f"server process {(after.get(pid, 0) - before.get(pid, 0)) / wall:.2f} cores"]
    others = sorted(p for p in after if p != pid)
    for p in others:
        parts.append(f"child {p} {(after[p] - before.get(p, 0.0)) / wall:.2f} cores")
    return ", ".join(parts)


class Profiler:
    """py-spy recording one process into raw collapsed stacks (no-op without py-spy or a directory)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.binary = shutil.which("py-spy") or str(Path(os.sys.executable).with_name("py-spy"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, pid: int, label: str) -> None:
        if self.directory is None or not Path(self.binary).exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / f"{label}.txt"
        command = [self.binary, "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(out), "--nonblocking"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
