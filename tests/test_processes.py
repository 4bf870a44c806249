"""`autoembed dev` and `autoembed demo` stop everything they started when SIGTERM is sent to their
pid alone (not to the terminal's process group): `dagster dev` / the webserver and the daemon, the
code servers those start in process groups of their own, and the embedded Postgres they started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_lists(port: int, asset: str) -> bool:
    query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return asset in resp.read().decode()
    except OSError:
        return False


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture
def workdir():
    """Not under pytest's tmp_path (see tests/test_cli.py's server_dir: pgserver as root)."""
    path = Path(tempfile.mkdtemp(prefix="autoembed-proc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("command", ["dev", "demo"])
def test_sigterm_to_the_pid_stops_every_child_and_the_postgres_it_started(workdir, command):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOEMBED_", "OPENAI_", "DAGSTER_"))}
    env.update(AUTOEMBED_HOME=str(workdir / "home"), PYTHONUNBUFFERED="1", PATH=f"{BIN}:{env['PATH']}")
    port = free_port()
    if command == "dev":
        cwd = workdir / "demo"
        shutil.copytree(ROOT / "demo", cwd, ignore=shutil.ignore_patterns("__pycache__", ".autoembed"))
        argv = [str(BIN / "autoembed"), "dev", "--port", str(port)]
    else:
        cwd = workdir
        argv = [str(BIN / "autoembed"), "demo", "--rows", "10", "--modules", "1", "--port", str(port),
                "--dagster-home", str(workdir / "dagster_home")]
    log = open(workdir / "out.log", "wb")
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: the test signals the pid, never the group
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 400
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            text = (workdir / "out.log").read_text(errors="replace")
            ready = ("Dagster UI:" in text) if command == "demo" else ui_lists(port, "stdlib_docs_embeddings")
            if not ready:
                time.sleep(1)
        assert ready, f"exit {proc.poll()}:\n{(workdir / 'out.log').read_text(errors='replace')[-3000:]}"
        tree = psutil.Process(proc.pid).children(recursive=True)
        pg = postmaster_pid(workdir / "home" / "pgdata")
        assert pg is not None
        tree.append(psutil.Process(pg))
        names = " ".join(" ".join(p.cmdline()[:3]) for p in tree)
        assert "dagster" in names and "postgres" in names, names

        os.kill(proc.pid, signal.SIGTERM)  # the pid only
        proc.wait(timeout=180)
        gone, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
        assert postmaster_pid(workdir / "home" / "pgdata") is None  # the server it started: stopped
        assert "stopping" in (workdir / "out.log").read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass
        subprocess.run([str(BIN / "autoembed"), "db", "stop"], cwd=cwd, env=env, capture_output=True, timeout=120)
        log.close()
