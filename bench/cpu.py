"""Where the two cores went during a measurement: this process, its children (the fake
provider), and the Postgres server processes.

The server's share is summed over the server's own processes (the postmaster and every child:
backends, WAL writer, checkpointer, autovacuum), sampled in a thread so that a backend that exits
during the measurement still counts up to its last sample. Unlike the machine's busy time, that
sum is barely moved by other work on a shared machine: it is what the ratios of CPU per row use.
"""

from __future__ import annotations

import os
import threading

import psutil

from common import connect


def _postmaster(url: str) -> psutil.Process | None:
    with connect(url) as c:  # (while the backend lives: it exits when the connection closes)
        try:
            return psutil.Process(c.info.backend_pid).parent()
        except psutil.Error:
            return None


def _cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return -1.0


class CpuMeter:
    SAMPLE_SECONDS = 0.05

    def __init__(self, url: str) -> None:
        self.me = psutil.Process(os.getpid())
        self.postmaster = _postmaster(url)
        self._first: dict[int, float] = {}  # pid -> CPU seconds when first seen (0 for one born later)
        self._last: dict[int, float] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._sample_server(initial=True)
        self.start = self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample_server(self, initial: bool = False) -> None:
        if self.postmaster is None:
            return
        try:
            procs = [self.postmaster] + self.postmaster.children()
        except psutil.Error:
            return
        for p in procs:
            key = p.pid
            proc = self._procs.setdefault(key, p)
            used = _cpu(proc)
            if used < 0:
                continue
            if key not in self._first:
                self._first[key] = used if initial else 0.0
            self._last[key] = used

    def _run(self) -> None:
        while not self._stop.wait(self.SAMPLE_SECONDS):
            self._sample_server()

    def _sample(self) -> dict[str, float]:
        def cpu(procs):
            return sum(max(_cpu(p), 0.0) for p in procs)
        sys_cpu = psutil.cpu_times()
        busy = sys_cpu.user + sys_cpu.system + getattr(sys_cpu, "nice", 0) + getattr(sys_cpu, "irq", 0) + getattr(sys_cpu, "softirq", 0)
        return {
            "py": cpu([self.me]),
            "provider": cpu(self.me.children(recursive=True)),
            "busy": busy,
        }

    def seconds(self) -> dict[str, float]:
        """Stop; CPU seconds of this process (py), its children (provider), the server's own
        processes (pg) and everything else on the machine (other)."""
        self._stop.set()
        self._thread.join()
        self._sample_server()
        end = self._sample()
        d = {k: max(end[k] - self.start[k], 0.0) for k in end}
        d["pg"] = sum(self._last[k] - self._first[k] for k in self._last)
        d["other"] = max(d["busy"] - d["py"] - d["provider"] - d["pg"], 0.0)
        return d

    def stop(self) -> str:
        d = self.seconds()
        return " ".join(f"{k} {d[k]:.1f}s" for k in ("py", "pg", "provider", "other"))
