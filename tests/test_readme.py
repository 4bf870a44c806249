"""The README, verbatim. Every ```bash / ```python / ```sql block of README.md is either run by
`test_every_readme_block_runs_in_order_on_a_fresh_copy` or marked `<!-- illustration: why -->` on
the line before it. The runnable blocks run in README order, each in its own shell started at the
root of a fresh copy of the repository (a block that needs another folder says `cd` itself),
against the test database with the local model; a long-running server (`autoembed demo`,
`autoembed dev`, `dg dev`, `dagster dev`) is started by tests/readme_serve.py, polled until its UI
lists assets and stopped with SIGTERM to its pid. The quickstart block also runs on its own with
zero configuration."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

from autoembed_dagster.core.db.server import with_database

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVERS = ("autoembed dev", "dagster dev", "dg dev", "autoembed demo")
MARK = "@@@ "
RUNNABLE = ("bash", "python", "sql")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    illustration: bool


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README, in order (indented ones in lists too)."""
    lines = (text if text is not None else (ROOT / "README.md").read_text()).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w+)\s*$", lines[i])
        if fence:
            indent, j = fence.group(1), i + 1
            while lines[j].strip() != "```":
                j += 1
            body = "\n".join(line[len(indent):] for line in lines[i + 1:j]) + "\n"
            marked = i > 0 and lines[i - 1].strip().startswith("<!-- illustration")
            blocks.append(Block(i + 1, fence.group(2), body, marked))
            i = j
        i += 1
    return blocks


def runnable_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang in RUNNABLE and not b.illustration]


def readme_commands() -> list[str]:
    """The command lines of the runnable bash blocks, in order (comments and heredoc bodies dropped)."""
    return [c for b in runnable_blocks() if b.lang == "bash" for c, _ in _bash_lines(b.body)]


def _bash_lines(body: str) -> list[tuple[str, str]]:
    """(command line, its text with any heredoc body) for each command of a bash block."""
    out, heredoc = [], None
    for raw in body.splitlines():
        if heredoc is not None:
            out[-1] = (out[-1][0], out[-1][1] + raw + "\n")
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        out.append((line, raw + "\n"))
        tag = re.search(r"<<-?\s*'?(\w+)'?", line)
        if tag:
            heredoc = tag.group(1)
    return out


def block_script(block: Block, python: str, serve: str) -> tuple[list[str], str]:
    """The commands of `block` and a bash script running them, each preceded by a marker line."""
    if block.lang == "python":
        command = f"python block at README line {block.line}"
        return [command], f"echo {shlex.quote(MARK + command)}\n{shlex.quote(python)} - <<'PYEOF'\n{block.body}PYEOF\n"
    if block.lang == "sql":
        command = f"sql block at README line {block.line}"
        return [command], (f"echo {shlex.quote(MARK + command)}\n{shlex.quote(str(BIN / 'autoembed'))} db psql "
                           f"<<'SQLEOF'\n{block.body}SQLEOF\n")
    commands, script = [], ""
    for command, text in _bash_lines(block.body):
        commands.append(command)
        if command.startswith(SERVERS):
            text = f"{shlex.quote(python)} {shlex.quote(serve)} {shlex.quote(command)}\n"
        script += f"echo {shlex.quote(MARK + command)}\n{text}"
    return commands, script


def test_every_command_block_runs_or_is_marked_as_an_illustration():
    blocks = readme_blocks()
    runnable = runnable_blocks()
    assert [b for b in blocks if b.lang not in RUNNABLE + ("yaml", "")] == [], "unknown block language"
    assert len(runnable) >= 9 and {b.lang for b in runnable} == {"bash", "python"}
    # The mechanism itself: a marked block is skipped, an unmarked one of each language runs.
    sample = "x\n<!-- illustration: why -->\n```bash\nrm -rf /\n```\n\n```python\nprint(1)\n```\n  ```sql\n  select 1;\n  ```\n"
    assert [(b.lang, b.illustration, b.body) for b in readme_blocks(sample)] == [
        ("bash", True, "rm -rf /\n"), ("python", False, "print(1)\n"), ("sql", False, "select 1;\n")]
    assert _bash_lines("a <<'SQL'\nselect 1;\nSQL\n# c\nb  # d\n") == [("a <<'SQL'", "a <<'SQL'\nselect 1;\nSQL\n"),
                                                                       ("b  # d", "b  # d\n")]


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
    assert [c for c in commands if c.startswith(SERVERS)] == [
        "autoembed demo", "dg dev                            # the UI on http://127.0.0.1:3000: this project's pipelines",
        "autoembed dev                     # embedded Postgres + `dagster dev` on this project, nothing to eval",
        "dagster dev -w workspace.yaml     # UI on http://127.0.0.1:3000 (`dg dev` works too)"]


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


def fresh_copy(dest: Path) -> Path:
    """The repository as a clone has it: its tracked files (plus this change's new ones), no local
    state (.autoembed, caches, a venv)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_symlink():  # the package's links to sql/, demo/, dagster_home/ (a clone has them)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(ROOT / name), dest / name)
        elif (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_every_readme_block_runs_in_order_on_a_fresh_copy(db_url, pg_server_url, dagster_database, tmp_path,
                                                          monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTOEMBED_PROVIDER", "AUTOEMBED_MODEL", "DAGSTER_HOME"):
        monkeypatch.delenv(var, raising=False)
    copy = fresh_copy(tmp_path / "autoembed-dagster")
    env = {**os.environ, "VIRTUAL_ENV": str(BIN.parent), "PATH": f"{BIN}:{os.environ['PATH']}",
           "PYTHONPATH": str(copy),  # the copy's code, not the checkout's
           "AUTOEMBED_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    python, serve = str(BIN / "python"), str(ROOT / "tests" / "readme_serve.py")
    outputs: list[tuple[str, str]] = []
    for block in runnable_blocks():
        commands, script = block_script(block, python, serve)
        # Each block in a shell of its own, from the copy's root (Dagster's storage: the test's own database).
        proc = subprocess.run(["bash", "-e", "-c", script], cwd=copy, env=env, capture_output=True, text=True,
                              timeout=1200)
        parts = re.split(rf"^{re.escape(MARK)}.*\n", proc.stdout, flags=re.M)[1:]
        assert proc.returncode == 0, (f"README line {block.line}, stopped at: "
                                      f"{commands[len(parts) - 1] if parts else '?'}\n{proc.stdout[-5000:]}\n"
                                      f"{proc.stderr[-5000:]}")
        assert len(parts) == len(commands), (commands, proc.stdout)
        outputs += list(zip(commands, parts))

    def out(prefix: str) -> str:
        found = [o for c, o in outputs if c.startswith(prefix)]
        assert found, f"no README command starts with {prefix!r}"
        return found[0]

    # `autoembed demo` ran first, filled and drained the demo's tables and answered its searches.
    assert "all 22 rows settled" in out("autoembed demo") and "shutil chunk" in out("autoembed demo")
    assert "left running: nothing" in out("autoembed demo")
    # Components, in demo/
    assert "autoembed_dagster.EmbeddingPipeline" in out("dg list components")
    listed = out("dg list defs")
    assert "notes_embeddings" in listed and "stdlib_docs_embeddings" in listed and "stdlib_modules_chunks" in listed
    assert "(declared)" in out("autoembed pipelines") and "stdlib_docs" in out("autoembed pipelines")
    hits = out('autoembed search "read and write CSV files"').splitlines()
    assert [h[:3] for h in hits] == ["1. ", "2. ", "3. "] and "autoembed_demo.stdlib_docs id=" in hits[0]
    for command, o in outputs:
        if command.startswith('autoembed search "recursively delete a directory tree"'):
            passages = o.splitlines()  # Components (-k 2) and Long documents (--table ... --chunks)
            assert len(passages) >= 2 and "autoembed_demo.stdlib_modules id=1 chunk" in passages[0], (command, o)
            assert "def rmtree(" in passages[0]
    for server in ("dg dev", "autoembed dev", "dagster dev"):
        assert "left running: nothing" in out(server), out(server)
    # The quickstart, from the root (this repository's own project: the pipeline `documents`)
    assert re.search(r"^2 embedded, .* 0 dead-lettered", out("autoembed drain "), flags=re.M)
    assert "public.documents id=1: # Cats" in out('autoembed search "kittens"')
    # Model changes, in demo/
    assert "no model migration" in out("autoembed migrate stdlib_docs status")
    with psycopg.connect(with_database(pg_server_url, dagster_database)) as conn:
        jobs = {r[0] for r in conn.execute("select pipeline_name from runs")}
    assert {"backfill", "model_migration"} <= jobs  # the two `dagster job launch` commands queued their runs
    # Long documents, in demo/
    assert "0 existing rows queued" in out("autoembed enroll autoembed_demo.stdlib_modules")
    status = json.loads(out("autoembed status --json"))
    [chunked] = [t for t in status["chunk_targets"] if t["chunk_table"].endswith("stdlib_modules_chunks")]
    assert chunked["coverage"] == 1.0, chunked
    backfill = next(o for c, o in outputs if re.match(r"autoembed backfill stdlib_modules +#", c))
    assert "100% (2/2 documents)" in backfill, backfill
    assert "no model migration" in out("autoembed migrate stdlib_modules")
    python_blocks = [o for c, o in outputs if c.startswith("python block")]
    assert len(python_blocks) == 2 and "def rmtree(" in python_blocks[0], python_blocks
