"""What the Dagster UI shows, read through Dagster's GraphQL API (what the webserver serves the UI):
the re-embed asset's partitions say what the database holds, and the embeddings asset is stale
after a model change until the re-embed completes. A project on disk, loaded by a real code server
(dagster_graphql's out-of-process workspace), real Postgres, the fake OpenAI HTTP server."""

from __future__ import annotations

from contextlib import contextmanager

import dagster as dg
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

from autoembed_dagster.core.pipelines import Pipeline
from autoembed_dagster.core.targets.models import ModelSpec
from autoembed_dagster.defs.assets import MODEL_NAME_CHARS, embeddings_key, model_partition_key
from autoembed_dagster.defs.backfill import shards_key

from .dg_project import load_project_defs, make_project, write_pipeline
from .test_backfill import register_models
from .test_dagster_layer import QUICK, insert_docs

DOCS = Pipeline(name="documents", schema="public", table="documents", shards=2)
NODE = """
query ($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      description
      staleStatus
      staleCauses { reason category }
      partitionStats { numMaterialized numPartitions numFailed }
      partitionKeysByDimension { name partitionKeys }
      targetingInstigators { ... on Sensor { name } }
    }
  }
}"""


@contextmanager
def ui(project, instance):
    with define_out_of_process_context(str(project / "workspace.yaml"), None, instance) as context:
        yield context


def node(context, key: dg.AssetKey) -> dict:
    result = execute_dagster_graphql(context, NODE, {"key": {"path": list(key.path)}})
    assert not result.errors, result.errors
    return result.data["assetNodeOrError"]


def queue_tick(project, instance, cursor: list) -> list:
    """The refresh run requests of one tick of the queue sensor (the code location's definitions);
    `cursor`: the sensor's cursors so far (its state across ticks)."""
    defs = load_project_defs(project)
    context = dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs,
                                      cursor=cursor[-1] if cursor else None)
    result = defs.resolve_sensor_def("embedding_jobs_sensor").evaluate_tick(context)
    cursor.append(result.cursor)
    return [r for r in result.run_requests or [] if r.job_name.startswith("refresh_")]


def run(project, instance, job: str, **kwargs):
    result = load_project_defs(project).resolve_job_def(job).execute_in_process(instance=instance, **kwargs)
    assert result.success
    return result


def test_partitions_and_staleness_say_what_the_database_holds(supabase_docs, fake_openai, tmp_path, monkeypatch):
    conn = supabase_docs
    monkeypatch.setenv("AUTOEMBED_SENSOR_WAIT", "0")  # a sensor tick does not wait for a first write
    cursors: list = []
    monkeypatch.chdir(tmp_path)  # the code server loads the project from its folder, as `dg dev` does
    project = make_project(tmp_path, {"documents": {"table": "public.documents", "shards": 2}})
    insert_docs(conn, 6)
    with dg.instance_for_test() as instance:
        # The drain embeds every row: both shard partitions of the model hold it (not "Missing (2)").
        run(project, instance, "drain_embedding_jobs", run_config=QUICK)
        with ui(project, instance) as context:
            embeddings, shards = node(context, embeddings_key(DOCS)), node(context, shards_key(DOCS))
        assert embeddings["staleStatus"] == "FRESH", embeddings
        # the asset page names the sensor that keeps it fresh (it said "No automations") ...
        assert {"name": "embedding_jobs_sensor"} in embeddings["targetingInstigators"], embeddings
        assert queue_tick(project, instance, cursors) == []  # ... which starts no refresh run of a current asset
        assert shards["partitionStats"] == {"numMaterialized": 2, "numPartitions": 2, "numFailed": 0}, shards
        assert "shadow column embedding__next" in shards["description"]
        # The model is named in full where the page starts (the partition list cuts its key in the middle).
        assert embeddings["description"].startswith("Model: text-embedding-3-small (openai, "), embeddings
        assert shards["description"].startswith("Model: text-embedding-3-small (openai, "), shards

        # A model change: the asset is stale, with the reason, until the re-embed completes.
        write_pipeline(project, "documents", {"table": "public.documents", "shards": 2, "dimensions": 512})
        with ui(project, instance) as context:
            embeddings, shards = node(context, embeddings_key(DOCS)), node(context, shards_key(DOCS))
        assert embeddings["staleStatus"] == "STALE", embeddings
        assert embeddings["description"].startswith("Model: text-embedding-3-small (openai, 512 dimensions)."), embeddings
        model = model_partition_key(ModelSpec.parse("openai:text-embedding-3-small:512:embedding_input"))
        assert (f"(the code's: {model} = openai:text-embedding-3-small:512:embedding_input;"
                in shards["description"]), shards
        assert {"reason": "has a new code version", "category": "CODE"} in embeddings["staleCauses"]

        # The sensor really starts the refresh job it targets: one check-only run for the changed asset, which
        # records nothing (the table holds the old model) and starts no re-embed.
        [refresh] = queue_tick(project, instance, cursors)
        assert refresh.job_name == "refresh_embedding_jobs" and refresh.asset_selection == [embeddings_key(DOCS)]
        ran = run(project, instance, "refresh_embedding_jobs", run_config=refresh.run_config,
                  asset_selection=refresh.asset_selection)
        assert not ran.get_asset_materialization_events()
        assert conn.execute("select count(*) from autoembed.model_migrations").fetchone()[0] == 0
        assert queue_tick(project, instance, cursors) == []  # once per code version

        assert register_models(load_project_defs(project), instance) == [model]  # the model-partitions sensor
        run(project, instance, "backfill")  # starts the migration (a shadow column), queues the shard runs
        insert_docs(conn, 1, prefix="meanwhile")
        run(project, instance, "drain_embedding_jobs", run_config=QUICK)  # a drain meanwhile: still stale
        with ui(project, instance) as context:
            assert node(context, embeddings_key(DOCS))["staleStatus"] == "STALE"

        for shard in ("0", "1"):  # what the backfill daemon runs, one run per shard
            run(project, instance, "reembed_documents", partition_key=f"{model}|{shard}")
        assert conn.execute("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = "
                            "'documents'::regclass and attname = 'embedding'").fetchone()[0] == "halfvec(512)"
        with ui(project, instance) as context:
            embeddings = node(context, embeddings_key(DOCS))
        assert embeddings["staleStatus"] == "FRESH", embeddings  # the shard that completed it recorded the version


def test_a_new_instance_shows_no_community_pop_up(tmp_path, pg_server_url, monkeypatch):
    """The instance the tool writes for a project (.autoembed/dagster_home/dagster.yaml) turns off
    Dagster's "join the community" pop-up (`nux: enabled: false`): the UI asks `shouldShowNux`."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import EmptyWorkspaceTarget

    from autoembed_dagster.demo.runner import dagster_storage_url, write_instance_config

    from .conftest import drop_database, unique_database_name

    home = tmp_path / ".autoembed" / "dagster_home"
    write_instance_config(home)
    name = unique_database_name("dagster_nux")
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # where Dagster looks for the "seen" file
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_storage_url(pg_server_url, name))
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance, \
                WorkspaceProcessContext(instance, EmptyWorkspaceTarget()) as process:
            result = execute_dagster_graphql(process.create_request_context(), "{ shouldShowNux }")
        assert not result.errors, result.errors
        assert result.data == {"shouldShowNux": False}
        assert not (home / ".nux").exists() or not any((home / ".nux").iterdir())  # not by a "seen" mark
    finally:
        drop_database(pg_server_url, name)


def model_keys(shards: dict) -> list[str]:
    return next(d["partitionKeys"] for d in shards["partitionKeysByDimension"] if d["name"] == "model")


def test_model_partition_keys_are_short_and_an_older_instances_full_keys_are_renamed(
        supabase_docs, fake_openai, tmp_path, monkeypatch):
    """The UI cut the model partition `local:all-Mini…mbedding_input` in its middle (and the overview's
    status row overlapped the next column): a model partition is the model's name and 4 digits of
    its whole identity. An instance made before that holds full keys: a shard run still accepts
    them, and the model-partitions sensor renames them, the renamed partitions materialized as the
    table is."""
    conn = supabase_docs
    monkeypatch.chdir(tmp_path)
    project = make_project(tmp_path, {"documents": {"table": "public.documents", "shards": 2}})
    insert_docs(conn, 4)
    full = "openai:text-embedding-3-small:1536:embedding_input"
    short = model_partition_key(ModelSpec.parse(full))
    assert short.startswith("text-embedding-3-small@") and len(short) <= MODEL_NAME_CHARS + 5
    assert len({short, *(model_partition_key(ModelSpec.parse(k)) for k in (
        "openai:text-embedding-3-small:512:embedding_input", "openai:text-embedding-3-small:1536:other_input",
        "local:text-embedding-3-small:1536:embedding_input"))}) == 4  # one per identity
    with dg.instance_for_test() as instance:
        # An older instance: its model partition is the full identity, its shards materialized with it.
        instance.add_dynamic_partitions("documents_models", [full])
        for shard in ("0", "1"):
            run(project, instance, "reembed_documents", partition_key=f"{full}|{shard}")
        with ui(project, instance) as context:
            assert model_keys(node(context, shards_key(DOCS))) == [full]

        events = []
        defs = load_project_defs(project)
        sensor = defs.resolve_sensor_def("autoembed_model_partitions")
        result = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=defs.resources,
                                                              definitions=defs))
        for event in result.asset_events or []:  # what the daemon records
            instance.report_runless_asset_event(event)
            events.append(event)
        with ui(project, instance) as context:
            shards = node(context, shards_key(DOCS))
        assert model_keys(shards) == [short], shards
        assert shards["partitionStats"] == {"numMaterialized": 2, "numPartitions": 2, "numFailed": 0}, shards
        assert any(getattr(e, "metadata", {}).get("model") == dg.MetadataValue.text(full) for e in events), events

        # New shard runs name the short key; a retired model's short key is skipped, not an error.
        run(project, instance, "reembed_documents", partition_key=f"{short}|0")
        retired = model_partition_key(ModelSpec.parse("openai:text-embedding-3-large:256:embedding_input"))
        instance.add_dynamic_partitions("documents_models", [retired])
        skipped = run(project, instance, "reembed_documents", partition_key=f"{retired}|0")
        assert not skipped.asset_materializations_for_node(skipped.dagster_run.step_keys_to_execute[0])


LINEAGE_NAME_CHARS = 31  # the longest name a lineage node showed whole (`stdlib_docs_embeddings_by_shard`)


def test_asset_names_fit_the_lineage_graph_and_an_older_instances_history_carries_over(
        supabase_docs, fake_openai, tmp_path, monkeypatch):
    """The lineage graph cut `stdlib_modules_embedd…_by_shard`: every asset of the demo's pipelines
    is named within what a node shows whole (the re-embed asset is `<pipeline>_reembed` now). An
    instance whose re-embed history is under the old key gets its shards reported materialized
    under the new one (the model-partitions sensor), when the table is current."""
    from autoembed_dagster.defs.assets import legacy_shards_key
    from autoembed_dagster.defs.autoembed import build_defs

    demo = [Pipeline(name="stdlib_docs", schema="autoembed_demo", table="stdlib_docs"),
            Pipeline(name="stdlib_modules", schema="autoembed_demo", table="stdlib_modules", chunk_tokens=200)]
    names = {key.path[-1] for key in build_defs(demo).resolve_asset_graph().get_all_asset_keys()}
    assert "stdlib_modules_reembed" in names
    assert all(len(name) <= LINEAGE_NAME_CHARS for name in names), sorted(names, key=len)[-3:]

    conn = supabase_docs
    monkeypatch.chdir(tmp_path)
    project = make_project(tmp_path, {"documents": {"table": "public.documents", "shards": 2}})
    insert_docs(conn, 4)
    no_checks = {"ops": {"drain_queue_embedding_jobs": {"config": {"idle_timeout": 0.0, "time_budget": 60.0,
                                                                     "checks": False}}}}
    with dg.instance_for_test() as instance:
        run(project, instance, "drain_embedding_jobs", run_config=no_checks)  # embedded, nothing reported
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=legacy_shards_key(DOCS)))
        defs = load_project_defs(project)
        sensor = defs.resolve_sensor_def("autoembed_model_partitions")
        result = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=defs.resources,
                                                              definitions=defs))
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        for event in result.asset_events or []:  # what the daemon records
            instance.report_runless_asset_event(event)
        with ui(project, instance) as context:
            shards = node(context, shards_key(DOCS))
        assert shards["partitionStats"] == {"numMaterialized": 2, "numPartitions": 2, "numFailed": 0}, shards
        again = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=defs.resources,
                                                             definitions=defs, cursor=result.cursor))
        assert not again.asset_events  # once
