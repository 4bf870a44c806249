"""The processes `autoembed dev` and `autoembed demo` start, and how they all stop.

Each child leads a session of its own (a terminal's Ctrl-C reaches only this process, which then
stops the children in order). Stopping a child stops every process under it, whichever process
group it moved to and whenever it started: `dagster dev` and `dagster-daemon` start code servers
(`dagster api grpc`), which start the run workers, some of them while shutting down. The tree is
recorded while the children run, and at the end every process still in the children's sessions
is found again (not only those seen while polling) and signalled. SIGTERM and SIGHUP sent to this process's pid stop it like Ctrl-C, so `kill
<pid>` leaves nothing running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .core.config import ConfigError

# One `autoembed dev` / `demo` per database: a session advisory lock on the data database, held by
# a connection that lives as long as the command (released by Postgres when the process dies).
_LOCK = (0x61757465, 0x6D626564)  # 'aute', 'mbed'


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGTERM / SIGHUP raise KeyboardInterrupt like Ctrl-C (SIGINT too, even when this process was
    started in the background with SIGINT ignored), so `finally:` blocks stop what was started."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class Children:
    """Processes started here, each in its own session, with every descendant seen under them."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    first_signal: dict[str, int] = field(default_factory=dict)
    _seen: dict[int, psutil.Process] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], *, cwd: Path, env: dict[str, str], log: Path | None = None,
              first_signal: int = signal.SIGTERM) -> subprocess.Popen:
        """Start `argv` (its output to `log`, else this process's); `first_signal` is what asks it
        to stop gracefully (`dagster dev` shuts its children down on SIGINT, like Ctrl-C)."""
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as out:
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        else:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        self.first_signal[name] = first_signal
        self.record()
        return proc

    def record(self) -> None:
        """Remember the descendants of the children now (called while they run: a process whose
        parent died is re-parented to init and could not be found from the child any more)."""
        for proc in self.procs.values():
            try:
                for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                    self._seen.setdefault(p.pid, p)
            except psutil.Error:
                continue

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def wait(self, poll: float = 1.0) -> str:
        """Block until a child exits (its name), recording their descendants as they appear."""
        while True:
            dead = self.dead()
            if dead:
                return dead[0]
            self.record()
            time.sleep(poll)

    def in_sessions(self) -> list[psutil.Process]:
        """Every process now in one of the children's sessions: whatever they started, however late
        (a code server spawned after the last poll, or while they shut down) and wherever it was
        re-parented, unless it left the session (setsid; Dagster's processes do not). A session id
        is not reused while any process of the session lives, so no other process is named."""
        sessions = {proc.pid for proc in self.procs.values()}
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and os.getsid(p.pid) in sessions:
                    found.append(p)
            except (OSError, psutil.Error):  # gone meanwhile
                continue
        return found

    def stop(self, timeout: float = 15.0) -> list[int]:
        """Ask each child to stop (its first signal, to its whole group), wait up to `timeout`, then
        terminate and kill whatever is left of the recorded tree and of the children's sessions,
        scanning them again until none is left (a process may start another while it stops). The
        pids still alive after it (none, unless a process ignores SIGKILL)."""
        self.record()
        for name, proc in self.procs.items():
            _signal_group(proc.pid, self.first_signal.get(name, signal.SIGTERM))
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        left: list[psutil.Process] = []
        for _ in range(5):
            found = {p.pid: p for p in [*self._seen.values(), *self.in_sessions()]}
            left = [p for p in found.values() if _alive(p)]
            if not left:
                break
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                for p in left:
                    try:
                        p.send_signal(sig)  # psutil checks the pid is still the same process
                    except psutil.Error:
                        pass
                _, left = psutil.wait_procs(left, timeout=wait)
                if not left:
                    break
            self._seen = {p.pid: p for p in left}
        for proc in self.procs.values():
            try:
                proc.wait(1)  # reap
            except subprocess.TimeoutExpired:
                pass
        return [p.pid for p in left]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # the session this module created for the child (pgid == its pid)
    except (ProcessLookupError, PermissionError):
        pass


class AlreadyRunning(ConfigError):
    """Another `autoembed dev` / `demo` runs Dagster on this database."""


def hold_the_database(url: str, what: str):
    """Take the database for this command (`what`, e.g. "dev port 3000"): a connection holding a
    session advisory lock, named after this process (close it at exit). Raises AlreadyRunning
    naming the process that holds it: a second copy of the same project would run a second daemon
    on the same tables and Dagster storage."""
    import psycopg

    conn = psycopg.connect(url, autocommit=True, application_name=f"autoembed {what} pid {os.getpid()}"[:63])
    if conn.execute("select pg_try_advisory_lock(%s, %s)", _LOCK).fetchone()[0]:
        return conn
    holder = conn.execute(
        """select a.application_name, a.pid, a.backend_start from pg_locks l join pg_stat_activity a using (pid)
           where l.locktype = 'advisory' and l.classid = %s::oid and l.objid = %s::oid and l.granted
             and l.database = (select oid from pg_database where datname = current_database())""",
        tuple(k & 0xFFFFFFFF for k in _LOCK)).fetchone()
    conn.close()
    who = f"`{holder[0]}` (since {holder[2]:%Y-%m-%d %H:%M:%S %Z})" if holder else "another autoembed command"
    raise AlreadyRunning(
        f"{who} already runs Dagster on this database: a second one would run a second daemon on the same "
        "tables and Dagster storage. Use the one running (its UI), or stop it first (`kill <its pid>`); "
        "another project gets a database of its own with its own .autoembed folder (AUTOEMBED_HOME) "
        "or AUTOEMBED_DATABASE_URL")
