"""Chunked pipelines in Dagster: the `chunking:` attribute of the EmbeddingPipeline component, the
lineage source table -> chunks -> vector index, the chunking in the code version, a drain run's
chunk numbers, the health checks of a chunk table. Real Dagster (definitions loaded from a project
on disk, jobs executed with an instance, `dg` processes), real Postgres, real HTTP (fake OpenAI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from autoembed_dagster.core.pipelines import Pipeline
from autoembed_dagster.defs.assets import embeddings_key, index_key, queue_key, source_key
from autoembed_dagster.defs.autoembed import _facts_cache
from autoembed_dagster.defs.backfill import shards_key

from .dg_project import load_project_defs, make_project

BIN = Path(sys.executable).parent
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
    ("local", {"tokens": 400, "overlap": 40}, "chunk tokens 400 is more than the model embeds (254 tokens): use 254 or less"),
    ("openai", {"tokens": 100, "overlap": 60}, "chunk overlap 60 is more than half of the chunk tokens 100: use at most 50"),
    ("openai", {"tokens": 4}, "chunk tokens must be an integer of at least 8, got 4"),
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
    assert bad.returncode != 0 and "chunk tokens 300 is more than the model embeds (254 tokens)" in bad.stdout + bad.stderr
