"""Every `autoembed`, `dagster` and `dg` command of the README's Components, Dagster and Model
changes sections, run verbatim (one bash session, in order) in a copy of the demo's Dagster
project, against the test database with the local model. Long-running servers are not run in the
session: `autoembed dev` and `dg dev` are each started once and polled until the UI lists the demo's
assets. The quickstart block runs on its own, with zero configuration."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import psutil
import pytest

from autoembed_dagster.demo.corpus import named_long_docs, stdlib_docs
from autoembed_dagster.core.db.server import connect, with_database
from autoembed_dagster.demo.runner import create_demo_table, insert_docs, insert_modules

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECTIONS = ("Components", "Dagster", "Model changes", "Long documents")
SERVERS = ("autoembed dev", "dagster dev", "dg dev", "dagster-daemon", "dagster-webserver", "autoembed demo")
MARK = "@@@ "


def readme_commands() -> list[str]:
    """The command lines of the ```bash blocks in SECTIONS, in order (comment lines dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        if not section.startswith(SECTIONS):
            continue
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
            commands += [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return commands


def quickstart_block() -> str:
    section = (ROOT / "README.md").read_text().split("## 60-second quickstart", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


def test_the_quickstart_runs_verbatim_with_zero_configuration(tmp_path):
    """The quickstart block, as one bash script, in an empty folder: no database URL, no API key, no
    psql on PATH (the wheel's own is used), so the embedded server and the local model do the work."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AUTOEMBED_", "OPENAI_", "PG")) and k not in ("DAGSTER_HOME",)}
    env.update(HOME=str(tmp_path), AUTOEMBED_PROJECT=str(ROOT), PYTHONUNBUFFERED="1",
               PATH=f"{BIN}:{tmp_path / 'bin'}")  # no /usr/bin: no system psql
    (tmp_path / "bin").mkdir()
    for tool in ("cat", "bash", "env", "sed", "head"):  # what a shell session needs, nothing of Postgres
        if shutil.which(tool):
            (tmp_path / "bin" / tool).symlink_to(shutil.which(tool))
    try:
        proc = subprocess.run([shutil.which("bash"), "-e", "-c", quickstart_block()], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        out = proc.stdout
        assert "INSERT 0 2" in out and "documents enrolled; 2 existing rows queued" in out
        assert re.search(r"^2 embedded, .* 0 dead-lettered", out, flags=re.M), out
        hits = [line for line in out.splitlines() if re.match(r"\d+\. \[", line)]
        assert len(hits) == 2 and "public.documents id=1: # Cats" in hits[0], out
        assert re.search(r"^embedding_jobs\s+0\s+0\s+0\s+0\s+0\s+\S+\s+0$", out, flags=re.M), out
        assert (tmp_path / ".autoembed" / "pgdata").is_dir()  # the zero-config server, in this folder
    finally:
        subprocess.run([str(BIN / "autoembed"), "db", "stop"], cwd=tmp_path, env=env, capture_output=True, timeout=120)


def test_readme_lists_the_commands_we_run():
    commands = readme_commands()
    assert any(c.startswith("dg scaffold defs autoembed_dagster.EmbeddingPipeline") for c in commands)
    assert "dagster job launch -w workspace.yaml -j backfill" in commands
    assert any(c.startswith("autoembed dev") for c in commands)


def test_the_docs_name_nothing_a_clone_does_not_have():
    """No files outside the repository (`../shared/...`), no internal issue numbers or branch names;
    the demo project's own description names each of its pipelines."""
    text = (ROOT / "README.md").read_text()
    assert not re.findall(r"(?<!\.)\.\./[\w./-]+", text)  # (`.../x` is an ellipsis)
    assert not re.findall(r"\bissues? \d+", text)
    assert not re.findall(r"\bmain\b", text)
    pipelines = sorted(p.parent.name for p in (ROOT / "demo").glob("*/defs/*/defs.yaml"))
    assert len(pipelines) == 2
    header = "".join(line for line in (ROOT / "demo" / "pyproject.toml").read_text().splitlines(True)
                     if line.startswith("#"))
    assert all(f"defs/{name}/defs.yaml" in header for name in pipelines) and "only" not in header, header


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_copy(db_url, tmp_path, monkeypatch):
    """A copy of demo/ with its tables filled and embedded (20 docstrings; 2 whole modules as
    chunks; the local model)."""
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTOEMBED_PROVIDER", "AUTOEMBED_MODEL"):
        monkeypatch.delenv(var, raising=False)
    project = tmp_path / "demo"
    shutil.copytree(ROOT / "demo", project, ignore=shutil.ignore_patterns("__pycache__"))
    with connect(db_url) as conn:
        create_demo_table(conn)
        insert_docs(conn, stdlib_docs(20))
        insert_modules(conn, named_long_docs(["shutil", "smtplib"]))
    from autoembed_dagster.core import api

    assert api.drain(db_url).embedded == 22  # 20 rows + 2 documents
    return project


def test_readme_commands_run_verbatim_on_the_demo_project(demo_copy, db_url, pg_server_url, dagster_database,
                                                          tmp_path):
    commands = readme_commands()
    session = [c for c in commands if not c.startswith(SERVERS)]
    servers = [c for c in commands if c.startswith(SERVERS)]
    script = "set -e\n" + "".join(f"echo {MARK!r}{i}\n{c}\n" for i, c in enumerate(session))
    env = {**os.environ, "VIRTUAL_ENV": str(BIN.parent), "PATH": f"{BIN}:{os.environ['PATH']}",
           "AUTOEMBED_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    # Dagster's storage is the test's own database (the dagster_database fixture drops it).
    proc = subprocess.run(["bash", "-c", script], cwd=demo_copy, env=env, capture_output=True, text=True,
                          timeout=900)
    outputs = dict(zip(session, re.split(rf"^{MARK}\d+\n", proc.stdout, flags=re.M)[1:]))
    assert proc.returncode == 0, (f"stopped at: {session[len(outputs) - 1] if outputs else '?'}\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    assert len(outputs) == len(session)
    out = {c.split(" --")[0].split(" #")[0]: o for c, o in outputs.items()}
    assert "autoembed_dagster.EmbeddingPipeline" in out["dg list components"]
    assert "notes_embeddings" in out["dg list defs"] and "stdlib_docs_embeddings" in out["dg list defs"]
    assert "stdlib_modules_chunks" in out["dg list defs"]  # the demo's chunked pipeline
    assert "(declared)" in out["autoembed pipelines"] and "stdlib_docs" in out["autoembed pipelines"]
    hits = out['autoembed search "read and write CSV files"'].splitlines()
    assert [h[:3] for h in hits] == ["1. ", "2. ", "3. "] and "autoembed_demo.stdlib_docs id=" in hits[0]
    for command in (c for c in session if c.startswith('autoembed search "recursively delete a directory tree"')):
        passages = outputs[command].splitlines()  # Components (-k 2) and Long documents (--table ... --chunks)
        assert len(passages) == 2 and "autoembed_demo.stdlib_modules id=1 chunk" in passages[0], (command, passages)
        assert "def rmtree(" in passages[0]
    assert "no model migration" in out["autoembed migrate stdlib_docs status"]

    # Long documents: the chunked pipeline through the CLI.
    assert "0 existing rows queued" in out["autoembed enroll autoembed_demo.stdlib_modules"]
    status = json.loads(next(o for c, o in outputs.items() if c.startswith("autoembed status --json")))
    [chunked] = [t for t in status["chunk_targets"] if t["chunk_table"].endswith("stdlib_modules_chunks")]
    assert chunked["coverage"] == 1.0, chunked
    backfill = next(o for c, o in outputs.items() if re.match(r"autoembed backfill stdlib_modules +#", c))
    assert "100.0% (2/2 documents)" in backfill, backfill
    assert "no model migration" in next(o for c, o in outputs.items() if c.startswith("autoembed migrate stdlib_modules"))

    # The two `dagster job launch` commands queued their runs in the project's Dagster storage.
    with psycopg.connect(with_database(pg_server_url, dagster_database)) as conn:
        jobs = {r[0] for r in conn.execute("select pipeline_name from runs")}
    assert {"backfill", "model_migration"} <= jobs

    # The long-running servers, each started once and polled until the UI answers: `autoembed dev`
    # needs nothing; `dg dev` runs after the README's `eval "$(autoembed dagster-env)"`.
    started = {c.split("#")[0].strip(): c for c in servers}
    assert {"autoembed dev", "dg dev"} <= set(started), servers
    env_line = next(c for c in session if c.startswith('eval "$(autoembed dagster-env)"'))
    for command, prelude in (("autoembed dev", ""), ("dg dev", f"{env_line}\n")):
        _serve_ui(f"{prelude}exec {command} --port {{port}}", demo_copy, env)


def _serve_ui(script: str, cwd: Path, env: dict) -> None:
    port = free_port()
    server = subprocess.Popen(["bash", "-c", script.format(port=port)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Answered = the UI lists the demo pipeline's assets (its code location has loaded).
        query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
        deadline, answered = time.monotonic() + 240, False
        while time.monotonic() < deadline and server.poll() is None and not answered:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as resp:
                    answered = "stdlib_docs_embeddings" in resp.read().decode()
            except OSError:
                pass
            if not answered:
                time.sleep(1)
        exited = server.poll()
        output = server.communicate(timeout=60)[0].decode(errors="replace")[-3000:] if exited is not None else ""
        assert answered, f"`{script}` did not serve the UI (exit {exited}):\n{output}"
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(server.pid, sig)
                server.wait(wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        _stop_left_behind(cwd)


def _stop_left_behind(folder) -> None:
    """`dagster dev` starts its code server in a process group of its own: one that outlived the
    server's group is stopped here (only processes working in this test's copy of the demo)."""
    for proc in psutil.process_iter(["cwd"]):
        try:
            if proc.info["cwd"] and Path(proc.info["cwd"]).is_relative_to(folder):
                proc.kill()
        except (psutil.Error, ValueError):
            continue
