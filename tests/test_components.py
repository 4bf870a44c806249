"""Pipelines as Dagster components, in a user's own project on disk: `dg scaffold defs`, `dg list
components/defs`, `dg check defs` (real `dg` processes), shared drain lanes built once, tables
registered only in SQL discovered, the content function's body in the code version, the CLI
reading the same declarations, and a migration refused when its model cannot embed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest

from autoembed_dagster.core.migrate import migration as mig
from autoembed_dagster.core.pipelines import Pipeline
from autoembed_dagster.defs.assets import LANE_TAG, embeddings_key
from autoembed_dagster.defs.autoembed import _facts_cache, build_defs

from .dg_project import load_project_defs, make_project

BIN = Path(sys.executable).parent
NOTES_SQL = """
create table notes (id int primary key, body text, embedding vector(1536));
create function notes_input(n notes) returns text language sql immutable as $$ select n.body $$;
select autoembed.enroll('notes', 'notes_input', 'embedding');
"""
QUICK = {"ops": {"drain_queue_embedding_jobs": {"config": {"idle_timeout": 0.0, "time_budget": 60.0}}}}


@pytest.fixture(autouse=True)
def fresh_facts():
    _facts_cache.clear()  # each test sees its own database at load time
    yield
    _facts_cache.clear()


def dg_cmd(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIRTUAL_ENV": str(BIN.parent), "PATH": f"{BIN}:{os.environ['PATH']}", **(env_extra or {})}
    proc = subprocess.run([str(BIN / "dg"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"dg {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_scaffold_list_and_check_a_user_project(supabase_docs, tmp_path):
    """A user's project: `dg scaffold defs` writes the defs.yaml, `dg list defs` shows the declared
    pipeline and the table enrolled only through SQL (discovered), `dg check defs` passes."""
    supabase_docs.execute(NOTES_SQL)
    project = make_project(tmp_path, {})
    listed = dg_cmd(["list", "components"], project).stdout
    assert "autoembed_dagster.EmbeddingPipeline" in listed

    dg_cmd(["scaffold", "defs", "autoembed_dagster.EmbeddingPipeline", "documents", "--table", "public.documents",
            "--content-function", "embedding_input"], project)
    text = (project / "my_project" / "defs" / "documents" / "defs.yaml").read_text()
    assert "type: autoembed_dagster.EmbeddingPipeline" in text
    assert "table: public.documents" in text and "content_function: embedding_input" in text

    dg_cmd(["check", "defs"], project)
    defs = json.loads(dg_cmd(["list", "defs", "--json"], project).stdout)
    assets = {a["asset_key"]: a for a in defs["assets"]}
    declared, discovered = assets["embeddings/documents_embeddings"], assets["embeddings/notes_embeddings"]
    assert {"key": "autoembed/origin", "value": "declared"} in declared["tags"]
    assert {"key": "autoembed/origin", "value": "discovered"} in discovered["tags"]
    assert "declared in no defs.yaml" in discovered["description"]
    assert declared["source"].startswith("my_project/defs/documents/defs.yaml")
    jobs = {j["name"] for j in defs["jobs"]}
    assert {"drain_embedding_jobs", "backfill", "model_migration", "health_checks", "reembed_documents",
            "reembed_notes"} <= jobs
    checks = {c["key"] for c in defs["asset_checks"]}
    assert "embeddings/notes_embeddings:coverage" in checks and "embeddings/documents_embeddings:dead_letters" in checks
    assert [s["name"] for s in defs["sensors"] if s["name"].endswith("_sensor")] == ["embedding_jobs_sensor"]


def test_the_repositorys_own_project_and_the_demo_pass_dg_check(db_url):
    root = Path(__file__).resolve().parents[1]
    for project in (root, root / "demo"):
        assert "All definitions loaded successfully" in dg_cmd(["check", "defs"], project).stdout


def test_pipelines_sharing_a_queue_share_one_lane(supabase_docs, fake_openai, tmp_path):
    supabase_docs.execute(NOTES_SQL)
    make_project(tmp_path, {"documents": {"table": "documents"},
                            "notes": {"table": "notes", "content_function": "notes_input"}})
    defs = load_project_defs(tmp_path)
    repo = defs.get_repository_def()
    lanes = [j.name for j in repo.get_all_jobs() if j.name.startswith("drain_")]
    assert lanes == ["drain_embedding_jobs"]
    assert [s.name for s in repo.sensor_defs if s.name.endswith("_sensor")] == ["embedding_jobs_sensor"]
    assert repo.get_job("drain_embedding_jobs").tags[LANE_TAG] == "embedding_jobs"
    # the declared `notes` is not discovered a second time
    assert not [k for k in repo.asset_graph.get_all_asset_keys() if "notes_2" in k.to_user_string()]

    supabase_docs.execute("insert into documents (title, content) values ('a', 'one'), ('b', 'two')")
    supabase_docs.execute("insert into notes values (1, 'three')")
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("drain_embedding_jobs").execute_in_process(instance=instance, run_config=QUICK)
    assert result.success
    mats = {m.asset_key: m.metadata["rows_embedded"].value
            for m in result.asset_materializations_for_node("drain_queue_embedding_jobs")
            if m.asset_key.path[0] == "embeddings"}
    docs = Pipeline(name="documents", schema="public", table="documents")
    assert mats == {embeddings_key(docs): 2, embeddings_key(replace(docs, name="notes")): 1}


def test_declared_pipeline_wins_and_the_function_body_is_in_the_code_version(supabase_docs, tmp_path):
    conn = supabase_docs
    make_project(tmp_path, {"docs": {"table": "documents"}})
    docs = Pipeline(name="docs", schema="public", table="documents")

    def version() -> str:
        _facts_cache.clear()
        graph = load_project_defs(tmp_path).get_repository_def().asset_graph
        assert not [k for k in graph.get_all_asset_keys() if k.path[-1] == "documents_embeddings"], \
            "the SQL triggers of a declared table must not add a discovered pipeline"
        return graph.get(embeddings_key(docs)).code_version

    first = version()
    assert first.startswith("openai:text-embedding-3-small:column:embedding_input@") or \
        first.startswith("local:all-MiniLM-L6-v2:384:embedding_input@"), first
    assert version() == first  # stable while nothing changes
    conn.execute("""create or replace function embedding_input(doc documents) returns text language plpgsql
                    immutable as $$ begin return doc.title || E'\\n' || doc.content; end; $$""")
    edited = version()
    assert edited != first and edited.split("@")[0] == first.split("@")[0]


def test_env_templating_in_defs_yaml(tmp_path, monkeypatch):
    make_project(tmp_path, {"documents": {"table": "documents", "provider": "openai",
                                          "model": "{{ env.MY_EMBEDDING_MODEL }}"}})
    monkeypatch.setenv("MY_EMBEDDING_MODEL", "text-embedding-3-large")
    monkeypatch.delenv("AUTOEMBED_DATABASE_URL", raising=False)
    graph = load_project_defs(tmp_path).get_repository_def().asset_graph
    docs = Pipeline(name="documents", schema="public", table="documents")
    assert graph.get(embeddings_key(docs)).code_version == "openai:text-embedding-3-large:column:embedding_input"

    # An integer attribute from the environment (a rendered template is a string; a pydantic `ge=`
    # on the attribute used to refuse it before it was converted)
    make_project(tmp_path / "ints", {"documents": {"table": "documents", "provider": "openai",
                                                   "dimensions": "{{ env.MY_DIMS }}", "batch_size": "{{ env.MY_BATCH }}"}})
    monkeypatch.setenv("MY_DIMS", "256")
    monkeypatch.setenv("MY_BATCH", "16")
    ints = load_project_defs(tmp_path / "ints").get_repository_def().asset_graph
    assert ints.get(embeddings_key(docs)).code_version == "openai:text-embedding-3-small:256:embedding_input"
    # no database at load: the asset says why its code version has no digest of the function's body
    assert "AUTOEMBED_DATABASE_URL is not set" in str(graph.get(embeddings_key(docs)).metadata["content_function_digest"])


def run_cli(args, cwd, env_extra=None, check=True):
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "autoembed_dagster.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"autoembed {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_cli_reads_the_same_declarations(supabase_docs, tmp_path):
    supabase_docs.execute(NOTES_SQL)
    project = make_project(tmp_path / "project", {"docs": {"table": "documents", "shards": 3}})
    listed = json.loads(run_cli(["pipelines", "--json"], project).stdout)
    assert [(p["name"], p["origin"], p["shards"]) for p in listed] == [("docs", "declared", 3),
                                                                      ("notes", "discovered", 8)]
    # from a subdirectory of the project, and from anywhere with AUTOEMBED_PROJECT
    assert "docs" in run_cli(["pipelines"], project / "my_project").stdout
    assert "docs" in run_cli(["pipelines"], tmp_path, {"AUTOEMBED_PROJECT": str(project)}).stdout

    # autoembed.toml is no longer a source: the CLI prints the defs.yaml that replaces it
    (project / "autoembed.toml").write_text('[pipelines.articles]\ntable = "public.articles"\nshards = 2\n')
    refused = run_cli(["pipelines"], project, check=False)
    assert refused.returncode == 2
    assert "defs/articles/defs.yaml" in refused.stderr and "type: autoembed_dagster.EmbeddingPipeline" in refused.stderr
    assert 'table: "public.articles"' in refused.stderr and "shards: 2" in refused.stderr


def test_search_by_pipeline_name(supabase_docs, fake_openai, tmp_path, settings):
    from autoembed_dagster.core.drain import Drainer, pipeline_resolver

    project = make_project(tmp_path, {"docs": {"table": "documents"}})
    supabase_docs.execute("insert into documents (title, content) values ('Cats', 'purring'), ('Tax', 'april')")
    Drainer(supabase_docs, settings, pipeline_resolver([])).run()
    # the fake provider's vectors are a function of the text: the row's own input is its nearest
    out = run_cli(["search", "# Tax\n\napril", "--pipeline", "docs", "-k", "1"], project).stdout
    assert "[0.000] public.documents id=2" in out, out
    missing = run_cli(["search", "x", "--pipeline", "nope"], project, check=False)
    assert missing.returncode == 2 and "nope" in missing.stderr and "dg scaffold defs" in missing.stderr


def test_an_impossible_target_is_refused_before_anything_is_created(supabase_docs, monkeypatch):
    """The local provider asked for text-embedding-3-large: the probe refuses it, no shadow column."""
    conn = supabase_docs
    monkeypatch.setenv("AUTOEMBED_PROVIDER", "local")
    conn.execute("insert into documents (title, content) values ('a', 'b')")
    spec = mig.ModelSpec("local", "text-embedding-3-large", 384, "embedding_input")
    live = mig.TargetKey("public", "documents", "embedding_input", "embedding")
    with pytest.raises(mig.MigrationError, match="cannot migrate to local:text-embedding-3-large:384"):
        mig.start_migration(conn, live, spec)
    assert conn.execute("select count(*) from autoembed.model_migrations").fetchone()[0] == 0
    assert conn.execute("select count(*) from information_schema.columns where table_name = 'documents' "
                        "and column_name = 'embedding__next'").fetchone()[0] == 0

    # A missing API key is refused the same way, with the client's reason.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    spec = mig.ModelSpec("openai", "text-embedding-3-small", 1536, "embedding_input")
    from autoembed_dagster.core.embed import clear_embedder_cache

    clear_embedder_cache()
    with pytest.raises(mig.MigrationError, match="api_key|API key|OPENAI_API_KEY"):
        mig.start_migration(conn, live, spec)
    assert conn.execute("select count(*) from autoembed.model_migrations").fetchone()[0] == 0


def test_backfill_job_without_config_picks_the_one_stale_pipeline(supabase_docs, fake_openai, settings):
    from autoembed_dagster.core.drain import Drainer, pipeline_resolver

    conn = supabase_docs
    conn.execute(NOTES_SQL)
    conn.execute("insert into documents (title, content) values ('a', 'one'), ('b', 'two')")
    conn.execute("insert into notes values (1, 'three')")
    Drainer(conn, settings, pipeline_resolver([])).run()  # both hold -small:1536 now
    docs = Pipeline(name="documents", schema="public", table="documents", shards=2)
    notes = Pipeline(name="notes", schema="public", table="notes", content_function="notes_input", shards=2)
    with dg.instance_for_test() as instance:
        fresh = build_defs([docs, notes]).resolve_job_def("backfill").execute_in_process(
            instance=instance, raise_on_error=False)
        assert not fresh.success
        [failure] = [e for e in fresh.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "no pipeline is stale" in failure.event_specific_data.error.message

        changed = build_defs([docs, replace(notes, dimensions=512)])  # notes' model changes in code
        result = changed.resolve_job_def("backfill").execute_in_process(instance=instance)
        assert result.success
        [out] = [e for e in result.events_for_node("launch_backfill") if e.event_type_value == "STEP_OUTPUT"]
        meta = out.event_specific_data.metadata
        assert meta["pipeline"].value == "notes" and meta["mode"].value == "migration"
        assert meta["model"].value == "openai:text-embedding-3-small:512:notes_input"


def test_dead_letter_check_counts_shadow_columns_and_purge_removes_orphans(supabase_docs, fake_openai, settings,
                                                                          tmp_path):
    from autoembed_dagster.core import health
    from autoembed_dagster.core.targets.catalog import TargetKey

    conn = supabase_docs
    key = TargetKey("public", "documents", "embedding_input", "embedding")
    for i, column in enumerate(("embedding", "embedding__next", "embedding__next")):
        conn.execute("insert into autoembed.dead_letters (queue_name, msg_id, message, error, attempts) "
                     "values ('embedding_jobs', %s, %s, 'boom', 5)",
                     (100 + i, json.dumps({"id": i, "schema": "public", "table": "documents",
                                           "contentFunction": "embedding_input", "embeddingColumn": column})))
    assert health.dead_letter_count(conn, key) == 3  # the shadow column's count too
    # The shadow column does not exist (an aborted migration): its two dead letters are orphans.
    orphans = health.orphaned_dead_letters(conn, "embedding_jobs")
    assert [(o.msg_id, o.why) for o in orphans] == [(101, "the column no longer exists"),
                                                    (102, "the column no longer exists")]
    refused = run_cli(["dead-letters", "--purge"], tmp_path, check=False)  # no terminal to confirm on
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert health.dead_letter_count(conn, key) == 3
    done = run_cli(["dead-letters", "--purge", "--yes"], tmp_path).stdout
    assert "2 dead letter(s) deleted" in done
    assert health.dead_letter_count(conn, key) == 1


def test_discovered_pipelines_get_names_a_user_would_type():
    """The table's name; the column when it is not `embedding`; the schema only when needed."""
    from autoembed_dagster.core.pipelines import discovered_name

    assert discovered_name("autoembed_demo", "stdlib_docs", "embedding", set()) == "stdlib_docs"
    assert discovered_name("public", "docs", "title_vec", set()) == "docs_title_vec"
    assert discovered_name("sales", "docs", "embedding", {"docs"}) == "sales_docs"
    assert discovered_name("sales", "docs", "embedding", {"docs", "sales_docs"}) == "sales_docs_2"
    assert discovered_name("public", "2024 Notes", "embedding", set()) == "notes"


def test_discovery_reads_the_registry_then_triggers_not_fired_yet(supabase_docs):
    from autoembed_dagster.core.pipelines import discover_pipelines

    conn = supabase_docs
    conn.execute(NOTES_SQL)  # enrolled: in the autoembed.targets registry
    for (name,) in conn.execute("select tgname from pg_trigger where tgrelid = 'notes'::regclass "
                                "and not tgisinternal").fetchall():
        conn.execute(f'drop trigger "{name}" on notes')  # the registry alone names it now
    found = {p.name: p for p in discover_pipelines(conn, [])}
    assert set(found) == {"documents", "notes"}  # documents: Supabase's triggers, no write yet
    assert found["notes"].content_function == "notes_input" and found["notes"].discovered
    assert not conn.execute("select 1 from autoembed.target_catalog where table_name = 'documents'").fetchone()
    declared = Pipeline(name="docs", schema="public", table="documents")
    assert [p.name for p in discover_pipelines(conn, [declared])] == ["notes"]  # a declaration wins
