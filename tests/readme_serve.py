"""Run one long-running command of the README (`autoembed demo`, `autoembed dev`, `dg dev`,
`dagster dev ...`) from tests/test_readme.py's shell session, in the session's folder and
environment: start it on a free port, wait until its Dagster UI lists assets (the code location
loaded; `autoembed demo`: also its searches printed), then send SIGTERM to its pid alone and wait
until every process under it has exited. Prints the command's output; exits non-zero when the
UI never answered or something was left running.

    python tests/readme_serve.py 'autoembed dev'
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil

# The only changes to the README's command: a free port, and a small corpus for the demo.
EXTRA = {"autoembed demo": ["--rows", "20", "--modules", "2"]}
READY_TIMEOUT = 400.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_assets(port: int) -> list[str]:
    query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            nodes = json.loads(resp.read())["data"]["assetNodes"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return ["/".join(n["assetKey"]["path"]) for n in nodes]


def main(command: str) -> int:
    command = command.split(" #")[0].strip()
    port = free_port()
    argv = ["bash", "-c", f'exec {command} "$@"', "bash", *EXTRA.get(command, []), "--port", str(port)]
    with tempfile.NamedTemporaryFile("w+b", suffix=".log") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def output() -> str:
            return open(log.name, "rb").read().decode(errors="replace")

        deadline, assets = time.monotonic() + READY_TIMEOUT, []
        while time.monotonic() < deadline and proc.poll() is None:
            assets = ui_assets(port)
            if assets and (command != "autoembed demo" or "Dagster UI:" in output()):
                break
            time.sleep(1)
        tree = []
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # its pid alone, like `kill <pid>`
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            pass
        _, alive = psutil.wait_procs(tree, timeout=60)
        left = [(p.pid, " ".join(p.cmdline()[:4])) for p in alive if p.is_running()]
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        if proc.poll() is None:
            proc.kill()
        print(output()[-6000:])
        print(f"served `{command}`: UI assets {len(assets)}; left running: {left or 'nothing'}")
        return 0 if assets and not left else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
