"""Chunked pipelines in Dagster: the `chunking:` attribute of the EmbeddingPipeline component, the
lineage source table -> chunks -> vector index, the chunking in the code version, a drain run's
chunk numbers, the health checks of a chunk table. Real Dagster (definitions loaded from a project
on disk, jobs executed with an instance, `dg` processes), real Postgres, real HTTP (fake OpenAI)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest
import yaml

from autoembed_dagster.core import api
from autoembed_dagster.core.config import ConfigError
from autoembed_dagster.core.pipelines import Pipeline
from autoembed_dagster.core.targets.models import ModelSpec
from autoembed_dagster.defs.assets import embeddings_key, index_key, model_partition_key, queue_key, source_key
from autoembed_dagster.defs.autoembed import _facts_cache, build_defs
from autoembed_dagster.defs.backfill import shards_key

from .dg_project import load_project_defs, make_project, write_pipeline

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
ARTICLES = Pipeline(name="articles", schema="public", table="articles", content_function="article_input",
                    chunk_tokens=64, chunk_overlap=8)


@pytest.fixture(autouse=True)
def fresh_facts():
    _facts_cache.clear()
    yield
    _facts_cache.clear()


def dg_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIRTUAL_ENV": str(BIN.parent), "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "dg"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def graph_of(root: Path):
    return load_project_defs(root).get_repository_def().asset_graph


# -- the component attribute ---------------------------------------------------------------------
def test_chunking_attribute_gives_source_chunks_index_lineage(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOEMBED_DATABASE_URL", raising=False)
    make_project(tmp_path, {
        "articles": {"table": "articles", "content_function": "article_input", "provider": "openai",
                     "chunking": {"tokens": 64, "overlap": 8}},
        "documents": {"table": "documents", "provider": "openai"},
    })
    graph = graph_of(tmp_path)
    chunks = graph.get(embeddings_key(ARTICLES))
    assert chunks.key == embeddings_key(ARTICLES) == dg.AssetKey(["chunks", "articles_chunks"])
    assert chunks.parent_keys == {source_key(ARTICLES), queue_key("embedding_jobs")}
    assert graph.get(index_key(ARTICLES)).parent_keys == {chunks.key}
    assert chunks.metadata["chunk_table"] == "public.articles_chunks"
    assert (chunks.metadata["chunk_tokens"], chunks.metadata["chunk_overlap"]) == (64, 8)
    assert "public.articles_chunks" in chunks.description and "at most 64 tokens" in chunks.description
    assert "public.articles_chunks.embedding" in graph.get(index_key(ARTICLES)).description
    # the column pipeline beside it keeps its embeddings asset; nothing is named twice
    docs = Pipeline(name="documents", schema="public", table="documents")
    assert graph.get(embeddings_key(docs)).key.path == ["embeddings", "documents_embeddings"]
    # the chunked pipeline's checks hang on its chunks asset
    checks = {k.name for k in graph.asset_check_keys if k.asset_key == chunks.key}
    assert checks == {"coverage", "staleness", "dead_letters", "dimensions"}


def test_chunk_sizes_are_part_of_the_code_version(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOEMBED_DATABASE_URL", raising=False)
    versions = {}
    for i, chunking in enumerate(({"tokens": 64, "overlap": 8}, {"tokens": 64, "overlap": 16}, {"tokens": 96})):
        root = tmp_path / str(i)
        make_project(root, {"articles": {"table": "articles", "content_function": "article_input",
                                         "provider": "openai", "chunking": chunking}})
        versions[i] = graph_of(root).get(embeddings_key(ARTICLES)).code_version
    assert versions[0] == "openai:text-embedding-3-small:column:article_input:chunks64/8"
    assert versions[1].endswith(":chunks64/16") and versions[2].endswith(":chunks96/0")
    assert len(set(versions.values())) == 3  # any change of sizes marks the pipeline stale


def test_env_templates_fill_chunking_and_other_integer_attributes(tmp_path, monkeypatch):
    """`{{ env.X }}` renders to a string: integer attributes (chunk tokens, dimensions, shards)
    accept it (no pydantic `ge=` on the template-accepting field) and make_pipeline validates."""
    monkeypatch.delenv("AUTOEMBED_DATABASE_URL", raising=False)
    monkeypatch.setenv("CHUNK_TOKENS", "120")
    monkeypatch.setenv("EMBED_DIMS", "512")
    monkeypatch.setenv("EMBED_SHARDS", "3")
    make_project(tmp_path, {"articles": {
        "table": "articles", "content_function": "article_input", "provider": "openai",
        "dimensions": "{{ env.EMBED_DIMS }}", "shards": "{{ env.EMBED_SHARDS }}",
        "chunking": {"tokens": "{{ env.CHUNK_TOKENS }}", "overlap": 10}}})
    graph = graph_of(tmp_path)
    p = Pipeline(name="articles", schema="public", table="articles", chunk_tokens=120)
    assert graph.get(embeddings_key(p)).code_version == "openai:text-embedding-3-small:512:article_input:chunks120/10"
    shard_keys = graph.get(shards_key(p)).partitions_def.get_partitions_def_for_dimension("shard").get_partition_keys()
    assert len(shard_keys) == 3

    monkeypatch.setenv("EMBED_SHARDS", "0")  # a bad value from the environment: named, with the rule
    _facts_cache.clear()
    with pytest.raises(Exception) as info:
        graph_of(tmp_path)
    assert "shards = 0 must be a positive integer" in chain_text(info.value)


def chain_text(exc: BaseException) -> str:
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("provider, chunking, message", [
    ("local", {"tokens": 400, "overlap": 40},
     "`tokens: 400` is more than the model embeds (254 tokens): use `tokens: 254` or less"),
    ("openai", {"tokens": 100, "overlap": 60}, "`overlap: 60` is more than half of `tokens: 100`: use `overlap: 50` or less"),
    ("openai", {"tokens": 4}, "`tokens: 4`: chunk tokens must be an integer of at least 8"),
    ("openai", {"tokens": 0}, "chunk_tokens = 0 must be a positive integer"),
])
def test_bad_chunking_is_refused_at_load_naming_the_value_and_the_fix(tmp_path, monkeypatch, provider, chunking,
                                                                      message):
    monkeypatch.delenv("AUTOEMBED_DATABASE_URL", raising=False)
    make_project(tmp_path, {"articles": {"table": "articles", "provider": provider, "chunking": chunking}})
    with pytest.raises(Exception) as info:
        graph_of(tmp_path)
    text = chain_text(info.value)
    assert message in text and "articles" in text


@pytest.mark.parametrize("attributes, message", [
    ({"provider": "local", "dimensions": 256},
     "`dimensions: 256`: the local model all-MiniLM-L6-v2 makes 384-dimensional vectors only, not 256"),
    ({"provider": "openai", "model": "text-embedding-3-small", "dimensions": 3072},
     "`dimensions: 3072`: text-embedding-3-small makes at most 1536 dimensions, not 3072"),
    ({"provider": "openai", "model": "text-embedding-ada-002", "dimensions": 512},
     "`dimensions: 512`: text-embedding-ada-002 makes 1536-dimensional vectors only, not 512"),
])
def test_a_size_the_model_cannot_make_is_refused_at_load(tmp_path, monkeypatch, attributes, message):
    """`dimensions: 256` for the 384-dim local model passed `dg check defs` and failed in the backfill."""
    monkeypatch.delenv("AUTOEMBED_DATABASE_URL", raising=False)
    make_project(tmp_path, {"notes": {"table": "notes", **attributes}})
    with pytest.raises(Exception) as info:
        graph_of(tmp_path)
    text = chain_text(info.value)
    assert message in text and "'notes'" in text, text
    write_pipeline(tmp_path, "notes", {"table": "notes", **{k: v for k, v in attributes.items() if k != "dimensions"}})
    graph_of(tmp_path)  # without the size: loads


def test_the_cli_refuses_a_declared_size_the_model_cannot_make(tmp_path):
    """The CLI reads the same declarations: `autoembed pipelines` says why, and exits 2."""
    make_project(tmp_path, {"notes": {"table": "notes", "provider": "local", "dimensions": 256}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOEMBED_", "OPENAI_"))}
    proc = subprocess.run([sys.executable, "-m", "autoembed_dagster.cli", "pipelines"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "`dimensions: 256`: the local model all-MiniLM-L6-v2 makes 384-dimensional vectors only" in proc.stderr


def test_chunk_size_errors_name_what_the_caller_typed(conn):
    """A Python caller sees its keyword, a CLI caller the flag (the component: the YAML key, above)."""
    conn.execute("create table longdocs (id int primary key, body text)")
    conn.execute("create function longdocs_input(d longdocs) returns text language sql immutable as $$ select d.body $$")
    with pytest.raises(ConfigError) as info:
        api.enroll("longdocs", "longdocs_input", chunk_tokens=256, chunk_overlap=32,
                   embedder_settings=Pipeline("x", "public", "longdocs", provider="local").embedder_settings())
    assert "chunk_tokens=256 is more than the model embeds (254 tokens): use chunk_tokens=254 or less" in str(info.value)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOEMBED_PROVIDER", "OPENAI_"))}
    proc = subprocess.run([sys.executable, "-m", "autoembed_dagster.cli", "enroll", "longdocs", "--content-function",
                           "longdocs_input", "--chunk-tokens", "300"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "--chunk-tokens 300 is more than the model embeds (254 tokens): use " \
        "--chunk-tokens 254 or less" in proc.stderr, proc.stderr


def test_scaffold_check_and_list_a_chunked_pipeline(db_url, tmp_path):
    """`dg scaffold defs ... --chunk-tokens N --chunk-overlap M` writes `chunking:`; `dg check defs`
    passes; `dg list defs` shows the chunks asset and its checks."""
    project = make_project(tmp_path, {})
    scaffolded = dg_run(["scaffold", "defs", "autoembed_dagster.EmbeddingPipeline", "articles", "--table",
                         "public.articles", "--content-function", "article_input", "--provider", "local",
                         "--chunk-tokens", "200", "--chunk-overlap", "20"], project)
    assert scaffolded.returncode == 0, scaffolded.stderr
    written = yaml.safe_load((project / "my_project" / "defs" / "articles" / "defs.yaml").read_text())
    assert written["attributes"]["chunking"] == {"tokens": 200, "overlap": 20}
    lone = dg_run(["scaffold", "defs", "autoembed_dagster.EmbeddingPipeline", "notes", "--table", "notes",
                   "--chunk-overlap", "20"], project)
    assert lone.returncode != 0 and "--chunk-overlap 20 needs --chunk-tokens" in lone.stdout + lone.stderr
    assert not (project / "my_project" / "defs" / "notes" / "defs.yaml").exists()
    checked = dg_run(["check", "defs"], project)
    assert checked.returncode == 0 and "All definitions loaded successfully" in checked.stdout, checked.stderr
    listed = json.loads(dg_run(["list", "defs", "--json"], project).stdout)
    assets = {a["asset_key"] for a in listed["assets"]}
    assert {"chunks/articles_chunks", "vector_index/articles_vector_index", "postgres/public/articles"} <= assets
    assert "chunks/articles_chunks:coverage" in {c["key"] for c in listed["asset_checks"]}

    # A bad value fails `dg check defs` with the reason
    (project / "my_project" / "defs" / "articles" / "defs.yaml").write_text(
        (project / "my_project" / "defs" / "articles" / "defs.yaml").read_text().replace("tokens: 200", "tokens: 300"))
    bad = dg_run(["check", "defs"], project)
    assert bad.returncode != 0 and "`tokens: 300` is more than the model embeds (254 tokens)" in bad.stdout + bad.stderr
    # A size the model cannot make fails it too (it passed, and the backfill failed later)
    (project / "my_project" / "defs" / "articles" / "defs.yaml").write_text(
        (project / "my_project" / "defs" / "articles" / "defs.yaml").read_text().replace("tokens: 300", "tokens: 200")
        .replace("attributes:\n", "attributes:\n  provider: local\n  dimensions: 256\n"))
    bad = dg_run(["check", "defs"], project)
    assert bad.returncode != 0 and "`dimensions: 256`: the local model all-MiniLM-L6-v2 makes 384-dimensional " \
        "vectors only" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


# -- drain runs and checks on a chunk table -----------------------------------------------------
QUICK = {"ops": {"drain_queue_embedding_jobs": {"config": {"idle_timeout": 0.0, "time_budget": 60.0}}}}


def _paragraphs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(15, 45))) + "." for _ in range(n)]


@pytest.fixture
def articles(conn, fake_openai, db_url):
    """A table of long articles enrolled as a chunk target (64/8 tokens, the fake OpenAI model)."""
    conn.execute("""
        create table articles (id bigint primary key, body text);
        create function article_input(a articles) returns text language sql immutable as $$ select a.body $$;
    """)
    api.enroll("articles", "article_input", chunk_tokens=64, chunk_overlap=8, url=db_url)
    return conn


def run_job(defs, name: str, instance, **kwargs):
    result = defs.resolve_job_def(name).execute_in_process(instance=instance, **kwargs)
    assert result.success
    return result


def check_evaluations(instance, run_id) -> dict:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return {e.get_dagster_event().event_specific_data.check_name: e.get_dagster_event().event_specific_data
            for e in events if e.get_dagster_event().event_specific_data.asset_key.path[0] != "reembed"}


def chunk_materializations(result) -> list:
    return [m for m in result.asset_materializations_for_node("drain_queue_embedding_jobs")
            if m.asset_key == embeddings_key(ARTICLES)]


def test_a_drain_run_reports_chunks_embedded_and_reused_and_the_checks_follow(articles, fake_openai):
    conn = articles
    paras = {i: _paragraphs(60, seed=i) for i in (1, 2, 3)}
    for i, ps in paras.items():
        conn.execute("insert into articles values (%s, %s)", (i, "\n\n".join(ps)))
    defs = build_defs([ARTICLES])
    with dg.instance_for_test() as instance:
        first = run_job(defs, "drain_embedding_jobs", instance, run_config=QUICK)
        [mat] = chunk_materializations(first)
        chunk_rows = conn.execute("select count(*), count(distinct chunk_hash) from articles_chunks").fetchone()
        sent = [t for r in fake_openai.requests if r["status"] == 200 for t in r["inputs"]]
        assert mat.metadata["rows_embedded"].value == 3  # documents
        assert mat.metadata["chunks_embedded"].value == chunk_rows[0] == len(sent) > 3 * 10
        assert mat.metadata["chunks_reused"].value == 0
        [index] = [m for m in first.asset_materializations_for_node("drain_queue_embedding_jobs")
                   if m.asset_key == index_key(ARTICLES)]
        assert index.metadata["vectors_written"].value == chunk_rows[0]
        checks = check_evaluations(instance, first.run_id)  # evaluated at the end of the drain
        assert set(checks) == {"coverage", "staleness", "dead_letters", "dimensions"}
        assert all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}
        assert "3 of 3 documents with input have the current chunk set" in checks["coverage"].description
        out = [e for e in first.events_for_node("drain_queue_embedding_jobs") if e.event_type_value == "STEP_OUTPUT"]
        assert out[0].event_specific_data.metadata["chunks_embedded"].value == chunk_rows[0]

        # One paragraph of document 2 edited: a few chunks embedded, the rest of its set reused.
        fake_openai.reset()
        paras[2][30] += " A closing sentence about omega."
        conn.execute("update articles set body = %s where id = 2", ("\n\n".join(paras[2]),))
        second = run_job(defs, "drain_embedding_jobs", instance, run_config=QUICK)
        [mat] = chunk_materializations(second)
        doc2 = conn.execute("select count(*) from articles_chunks where id = 2").fetchone()[0]
        sent = [t for r in fake_openai.requests if r["status"] == 200 for t in r["inputs"]]
        assert 1 <= mat.metadata["chunks_embedded"].value == len(sent) <= 3
        assert mat.metadata["chunks_reused"].value == doc2 - len(sent)
        assert mat.metadata["rows_embedded"].value == 1
        assert "1 document(s) given their new chunk set" in mat.description
        table = [e for e in second.events_for_node("drain_queue_embedding_jobs")
                 if e.event_type_value == "STEP_OUTPUT"][0].event_specific_data.metadata["tables"].value
        assert "| public.articles.articles_chunks | articles | 1 | 1 |" in table

        # Document 3 changes and is not drained: the checks say so, with the count.
        conn.execute("update articles set body = body || ' Appended.' where id = 3")
        checks = check_evaluations(instance, run_job(defs, "health_checks", instance).run_id)
        assert not checks["coverage"].passed and not checks["staleness"].passed
        assert "2 of 3 documents with input have the current chunk set" in checks["coverage"].description
        assert checks["coverage"].metadata["stale_documents"].value == 1
        assert checks["staleness"].metadata["stale_documents"].value == 1
        assert checks["dead_letters"].passed and checks["dimensions"].passed

        run_job(defs, "drain_embedding_jobs", instance, run_config=QUICK)
        checks = check_evaluations(instance, run_job(defs, "health_checks", instance).run_id)
        assert all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}


def test_chunk_sets_of_other_sizes_than_declared_are_stale(articles, fake_openai):
    """The registry enrolled 64/8; the code declares 48/8: the checks count every document stale
    (the chunking is part of the pipeline's identity, not only of its code version)."""
    articles.execute("insert into articles values (1, %s)", ("\n\n".join(_paragraphs(20, seed=1)),))
    with dg.instance_for_test() as instance:
        run_job(build_defs([ARTICLES]), "drain_embedding_jobs", instance, run_config=QUICK)
        other = build_defs([replace(ARTICLES, chunk_tokens=48)])
        checks = check_evaluations(instance, run_job(other, "health_checks", instance).run_id)
    assert not checks["staleness"].passed and checks["staleness"].metadata["stale_documents"].value == 1
    assert "chunks of at most 48 tokens, overlap 8" in checks["staleness"].description
    assert ("public.articles is enrolled with chunks of 64 tokens, overlap 8: enrol it again (autoembed enroll "
            "public.articles --content-function article_input --chunk-tokens 48 --chunk-overlap 8), then launch "
            "the `backfill` job") in checks["staleness"].description


def test_a_chunked_pipeline_that_is_not_enrolled_says_how_to_enrol_it(conn, fake_openai):
    conn.execute("create table articles (id bigint primary key, body text)")
    conn.execute("create function article_input(a articles) returns text language sql immutable as $$ select a.body $$")
    with dg.instance_for_test() as instance:
        checks = check_evaluations(instance, run_job(build_defs([ARTICLES]), "health_checks", instance).run_id)
    assert not any(c.passed for c in checks.values())
    assert ("autoembed enroll public.articles --content-function article_input --chunk-tokens 64 --chunk-overlap 8"
            in checks["coverage"].description)


def test_a_chunk_target_enrolled_in_sql_only_is_discovered(articles, fake_openai, db_url):
    """Enrolled with the CLI/SQL, declared nowhere: after a reload it has its chunks asset, checks
    and drain lane, chunked with the registered sizes."""
    articles.execute("insert into articles values (1, %s)", ("\n\n".join(_paragraphs(20, seed=1)),))
    defs = build_defs([], discover=True)
    graph = defs.get_repository_def().asset_graph
    found = Pipeline(name="articles", schema="public", table="articles", chunk_tokens=64, chunk_overlap=8)
    spec = graph.get(embeddings_key(found))
    assert spec.tags["autoembed/origin"] == "discovered"
    assert spec.code_version.startswith("openai:text-embedding-3-small:column:article_input:chunks64/8@")
    assert graph.get(index_key(found)).parent_keys == {spec.key}
    with dg.instance_for_test() as instance:
        result = run_job(defs, "drain_embedding_jobs", instance, run_config=QUICK)
    [mat] = [m for m in result.asset_materializations_for_node("drain_queue_embedding_jobs")
             if m.asset_key == embeddings_key(found)]
    assert mat.metadata["chunks_embedded"].value > 0
    # a declaration of the same chunk table wins: nothing discovered twice
    _facts_cache.clear()
    declared = build_defs([ARTICLES], discover=True).get_repository_def().asset_graph
    assert [k for k in declared.get_all_asset_keys() if k.path[0] == "chunks"] == [embeddings_key(ARTICLES)]


# -- the demo --------------------------------------------------------------------------------------
def test_the_demo_chunks_whole_module_docs_and_search_lands_on_the_passage(conn, monkeypatch):
    """The demo project's chunked pipeline (local model, its defs.yaml's sizes), drained by its own
    Dagster drain job: a question about one passage returns that module with that passage."""
    from autoembed_dagster.demo.corpus import named_long_docs
    from autoembed_dagster.demo.runner import (create_demo_table, demo_pipelines, insert_modules, progress,
                                                      search_modules)

    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTOEMBED_PROVIDER", "AUTOEMBED_MODEL"):
        monkeypatch.delenv(var, raising=False)
    docs, modules = demo_pipelines()
    assert modules.chunked and (modules.chunk_tokens, modules.chunk_overlap) == (200, 20) and not docs.chunked
    create_demo_table(conn)
    # One vector index per table: enrolment made the chunk table's, the demo adds none of its own.
    indexes = conn.execute("""select tablename, count(*) from pg_indexes where schemaname = 'autoembed_demo'
                              and indexdef like '%USING hnsw%' group by 1 order by 1""").fetchall()
    assert indexes == [("stdlib_docs", 1), ("stdlib_modules_chunks", 1)], indexes
    insert_modules(conn, named_long_docs(["shutil", "heapq", "smtplib", "textwrap", "json"]))
    defs = load_project_defs(ROOT / "demo", module="autoembed_demo_project")
    with dg.instance_for_test() as instance:
        result = run_job(defs, "drain_embedding_jobs", instance, run_config=QUICK)
        checks = check_evaluations(instance, result.run_id)
    [mat] = [m for m in result.asset_materializations_for_node("drain_queue_embedding_jobs")
             if m.asset_key == embeddings_key(modules)]
    now = progress(conn)
    assert now.modules == now.chunked == mat.metadata["rows_embedded"].value == 5
    assert mat.metadata["chunks_embedded"].value + mat.metadata["chunks_reused"].value == now.chunks > 50
    assert mat.metadata["model"].value == "local:all-MiniLM-L6-v2:384"
    assert all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}

    [(module, hit), *_] = search_modules(conn, "recursively delete a directory tree")
    assert module == "shutil" and "def rmtree(" in hit.chunk
    [(module, hit), *_] = search_modules(conn, "log in to an SMTP server that requires authentication")
    assert module == "smtplib" and "def login(self, user, password" in hit.chunk
    assert hit.chunk in conn.execute("select content from autoembed_demo.stdlib_modules where module = 'smtplib'"
                                     ).fetchone()[0]  # the exact passage of the document


def test_the_demos_first_drain_batch_is_its_first_rows_alone(conn, monkeypatch):
    """The demo writes its first rows in a statement of their own, so the drain's first batch embeds
    those few rows (not a whole 200-row bulk message) and the first vectors show a moment after
    the drain starts (bench/bench_demo.py)."""
    from autoembed_dagster.core.config import Settings
    from autoembed_dagster.core.drain import Drainer, pipeline_resolver
    from autoembed_dagster.demo.corpus import stdlib_docs
    from autoembed_dagster.demo.runner import FIRST_ROWS, create_demo_table, demo_pipelines, progress, queue_corpus

    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTOEMBED_PROVIDER", "AUTOEMBED_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AUTOEMBED_READ_BATCH", "64")  # the demo's
    create_demo_table(conn)
    queue_corpus(conn, stdlib_docs(300), [])
    drainer = Drainer(conn, Settings.from_env(), pipeline_resolver(list(demo_pipelines())))
    first = drainer.drain_batch()
    assert first.embedded == progress(conn).embedded == FIRST_ROWS
    drainer.run()
    assert progress(conn).embedded == 300


# -- model change of a chunked pipeline through Dagster ------------------------------------------
def test_a_model_change_re_embeds_the_chunks_through_the_partitioned_asset_and_promotes(articles, fake_openai):
    """defs.yaml changes dimensions 1536 -> 512: the model-partitions sensor adds the new model,
    `backfill` (no config) launches one run per shard, the shard runs write the shadow chunk
    table and the last one promotes; the checks are green with the new model."""
    conn = articles
    ARTICLES_2 = replace(ARTICLES, shards=2)
    for i in (1, 2, 3, 4):
        conn.execute("insert into articles values (%s, %s)", (i, "\n\n".join(_paragraphs(12, seed=i))))
    with dg.instance_for_test() as instance:
        run_job(build_defs([ARTICLES_2]), "drain_embedding_jobs", instance, run_config=QUICK)
        new = replace(ARTICLES_2, dimensions=512)
        defs = build_defs([new])
        sensor = defs.resolve_sensor_def("autoembed_model_partitions")
        tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=defs.resources))
        [request] = tick.dynamic_partitions_requests
        identity = "openai:text-embedding-3-small:512:article_input"
        model = model_partition_key(ModelSpec.parse(identity))  # the model's name and 4 digits: shown whole
        assert list(request.partition_keys) == [model]
        instance.add_dynamic_partitions(request.partitions_def_name, [model])

        launched = run_job(defs, "backfill", instance)  # the one stale pipeline: no config
        [out] = [e for e in launched.events_for_node("launch_backfill") if e.event_type_value == "STEP_OUTPUT"]
        meta = out.event_specific_data.metadata
        assert (meta["mode"].value, meta["model"].value, meta["partitions"].value) == ("shadow", identity, 2)
        assert meta["rows_to_embed"].value == 4
        [backfill] = instance.get_backfills()
        partitions = backfill.asset_backfill_data.target_subset.get_partitions_subset(shards_key(new)).get_partition_keys()
        assert set(partitions) == {f"{model}|0", f"{model}|1"}

        promoted = []
        for partition in sorted(partitions):  # what the backfill daemon runs, one run per shard
            result = defs.resolve_job_def("reembed_articles").execute_in_process(instance=instance,
                                                                                 partition_key=partition)
            assert result.success
            mats = result.asset_materializations_for_node("__".join(shards_key(new).path))
            [mat] = [m for m in mats if m.asset_key == shards_key(new)]
            completed = [m for m in mats if m.asset_key == embeddings_key(new)]
            assert len(completed) == (partition == max(partitions))  # the last shard records the new version
            assert mat.metadata["mode"].value == "shadow"
            assert mat.metadata["chunk_table"].value == "public.articles_chunks__next"
            promoted.append(mat.metadata["promoted"].value)
        assert promoted == [False, True]  # the shard completing the shadow promotes it
        dims = conn.execute("select format_type(atttypid, atttypmod) from pg_attribute "
                            "where attrelid = 'articles_chunks'::regclass and attname = 'embedding'").fetchone()[0]
        assert dims == "halfvec(512)"
        checks = check_evaluations(instance, run_job(defs, "health_checks", instance).run_id)
        assert all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}
        assert checks["staleness"].metadata["model"].value == "openai:text-embedding-3-small:512"
