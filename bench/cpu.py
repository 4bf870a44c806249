"""Where the two cores went during a measurement: this process, its children (the fake
provider), and the Postgres server processes."""

from __future__ import annotations

import os

import psutil

from common import connect


def _postgres_procs(url: str) -> list[psutil.Process]:
    with connect(url) as c:
        pid = c.info.backend_pid
    try:
        postmaster = psutil.Process(pid).parent()
    except psutil.Error:
        return []
    return [postmaster] + postmaster.children()


class CpuMeter:
    def __init__(self, url: str) -> None:
        self.me = psutil.Process(os.getpid())
        self.url = url
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        def cpu(procs):
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            return total
        sys_cpu = psutil.cpu_times()
        busy = sys_cpu.user + sys_cpu.system + getattr(sys_cpu, "nice", 0) + getattr(sys_cpu, "irq", 0) + getattr(sys_cpu, "softirq", 0)
        return {
            "py": cpu([self.me]),
            "provider": cpu(self.me.children(recursive=True)),
            "busy": busy,
        }

    def stop(self) -> str:
        end = self._sample()
        d = {k: max(end[k] - self.start[k], 0.0) for k in end}
        # Postgres (and anything else on the machine) = all busy CPU less the two known processes;
        # backends that exit during the run are counted this way too.
        d["pg+other"] = max(d["busy"] - d["py"] - d["provider"], 0.0)
        return " ".join(f"{k} {d[k]:.1f}s" for k in ("py", "pg+other", "provider"))
