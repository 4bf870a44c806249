"""`autoembed deploy scaffold`: the image and the values for Dagster's official Helm chart that
serve a user's Dagster project, here the demo project (demo/).

No cluster, no helm and no chart here (the chart is not on a package registry): the values are
checked for the chart's fields this project relies on and the chart's own consistency rules, and
the instance config the chart renders from them (run launcher, run coordinator, storage,
concurrency) is loaded by a real DagsterInstance with dagster-k8s's K8sRunLauncher, on the test
Postgres. tests/test_install.py repeats the image's install steps in a fresh venv and serves the
demo project with `dagster api grpc`."""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import tomllib
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from autoembed_dagster.core.config import ConfigError, ScalingSettings
from autoembed_dagster.core.db.server import ensure_database
from autoembed_dagster.deploy import scaffold

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.example.com/autoembed-demo"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the demo project with the files `autoembed deploy scaffold` writes."""
    root = tmp_path_factory.mktemp("deploy") / "demo"
    shutil.copytree(ROOT / "demo", root, ignore=shutil.ignore_patterns("__pycache__"))
    written = scaffold(root, image=IMAGE)
    assert sorted(p.name for p in written) == [".dockerignore", "Dockerfile", "values.yaml"]
    return root


@pytest.fixture(scope="module")
def values(project) -> dict:
    return yaml.safe_load((project / "values.yaml").read_text())


def deployment(values: dict) -> dict:
    (dep,) = values["dagster-user-deployments"]["deployments"]
    return dep


def env_of(dep: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in dep.get("env", [])}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), continuation lines joined."""
    out, current = [], ""
    for line in dockerfile.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def grpc_module(dep: dict) -> tuple[str, str]:
    args = dep["dagsterApiGrpcArgs"]
    return args[args.index("-m") + 1], args[args.index("-a") + 1]


# -- the values ------------------------------------------------------------------------------------
def test_values_name_a_user_code_deployment_of_the_users_project(values, project):
    ucd = values["dagster-user-deployments"]
    assert ucd["enabled"] is True and ucd["enableSubchart"] is True
    dep = deployment(values)
    assert dep["name"] == "autoembed-demo"  # the code location autoembed_demo as a Kubernetes name
    assert dep["image"]["repository"] == IMAGE
    # No default tag: `latest` with IfNotPresent would run whatever image a node cached first.
    assert dep["image"]["tag"] == "" and dep["image"]["pullPolicy"] == "IfNotPresent"
    assert "--set-string 'dagster-user-deployments.deployments[0].image.tag='$TAG" in (project / "values.yaml").read_text()
    module, attribute = grpc_module(dep)
    assert module == "autoembed_demo_project.definitions"  # the project's own module, not autoembed_dagster's
    sys.path.insert(0, str(project))
    try:
        assert hasattr(importlib.import_module(module), attribute)  # what the gRPC server will load
    finally:
        sys.path.remove(str(project))
    assert dep["includeConfigInLaunchedRuns"]["enabled"] is True  # run pods get the same env
    assert {"name": "autoembed-env"} in dep["envSecrets"]


def test_values_scale_runs_out_with_the_k8s_launcher_queued_coordinator_and_pools(values):
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert {"name": "autoembed-env"} in values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] is True and coordinator["type"] == "QueuedRunCoordinator"
    concurrency = values["concurrency"]
    assert concurrency["enabled"] is True
    assert concurrency["pools"]["granularity"] in ("run", "op")
    # The sensor asks for AUTOEMBED_MAX_DRAINS drains; the pool admits as many: keep them equal.
    assert concurrency["pools"]["defaultLimit"] == int(env_of(deployment(values))["AUTOEMBED_MAX_DRAINS"])
    assert any(t["key"] == "autoembed/pipeline" for t in concurrency["runs"]["tagConcurrencyLimits"])
    # The chart refuses a limit set in both places (its _concurrency.tpl `fail`s).
    qrc = coordinator["config"]["queuedRunCoordinator"]
    assert not ("maxConcurrentRuns" in qrc and "maxConcurrentRuns" in concurrency["runs"])
    assert not (qrc.get("tagConcurrencyLimits") and concurrency["runs"].get("tagConcurrencyLimits"))


def test_pods_run_as_the_images_non_root_user_with_an_fsgroup(values, project):
    uid = re.search(r"^RUN useradd .*--uid (\d+)", (project / "Dockerfile").read_text(), re.M).group(1)
    assert re.search(rf"^USER {uid}$", (project / "Dockerfile").read_text(), re.M)
    dep = deployment(values)
    run_pod = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["podSpecConfig"]["securityContext"]
    for pod in (dep["podSecurityContext"], run_pod):
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == int(uid) and pod["fsGroup"] == int(uid)
    assert dep["securityContext"]["allowPrivilegeEscalation"] is False
    assert values["telemetry"]["enabled"] is False  # nothing written under DAGSTER_HOME


def test_scaffold_refuses_to_overwrite_and_names_what_a_project_lacks(project, tmp_path):
    with pytest.raises(ConfigError, match="already in .*--force"):
        scaffold(project)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["dagster"]\n'
                                             '[tool.dg.project]\nroot_module = "x"\n')
    with pytest.raises(ConfigError, match="do not name autoembed-dagster"):
        scaffold(tmp_path)


def test_dockerignore_is_the_plain_name_and_leaves_out_tests_bench_and_build_output(project):
    assert [p.name for p in project.glob("*dockerignore")] == [".dockerignore"]  # not Dockerfile.dockerignore: BuildKit only
    patterns = (project / ".dockerignore").read_text().split()
    for excluded in ("tests", "bench", "build", "dist", "*.egg-info", ".venv", ".git", ".autoembed", "**/__pycache__"):
        assert excluded in patterns, excluded


def test_dependency_layer_copies_only_pyproject(project):
    """A README or code edit must not re-run the dependency install: the only file copied before
    it is pyproject.toml."""
    steps = instructions((project / "Dockerfile").read_text())
    install = next(i for i, (k, args) in enumerate(steps) if k == "RUN" and "pip install" in args)
    assert [args for k, args in steps[:install] if k in ("COPY", "ADD")] == ["pyproject.toml ./"]
    assert "-e " not in (project / "Dockerfile").read_text()  # a regular install


def test_values_keep_dagster_storage_in_an_external_postgres_and_no_secret_in_the_file(values, project):
    pg = values["postgresql"]
    assert pg["enabled"] is False
    assert pg["postgresqlHost"] and pg["postgresqlUsername"] and pg["postgresqlDatabase"]
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in pg
    text = (project / "values.yaml").read_text()
    assert not re.search(r"sk-[A-Za-z0-9]{8,}", text)
    names = set(env_of(deployment(values)))
    assert not names & {"OPENAI_API_KEY", "AUTOEMBED_DATABASE_URL", "DAGSTER_PG_PASSWORD"}, names
    # Every autoembed setting in the values is one the code reads.
    for name, value in env_of(deployment(values)).items():
        assert name.startswith("AUTOEMBED_") and value.isdigit(), (name, value)
    scaling = ScalingSettings(max_drains=int(env_of(deployment(values))["AUTOEMBED_MAX_DRAINS"]),
                              rows_per_drain=int(env_of(deployment(values))["AUTOEMBED_ROWS_PER_DRAIN"]))
    assert scaling.max_drains >= 1


# -- the chart's schema ---------------------------------------------------------------------------
SCHEMA = Path(__file__).parent / "data" / "dagster_helm_values_schema.json"


def schema_errors(values: dict) -> list[str]:
    """What the chart's values.schema.json (tests/data: an excerpt, see its $comment) says of
    `values`. Helm validates the values merged with the chart's defaults, which are not here:
    `required` is dropped; types, enums and the keys the chart forbids are checked."""
    import json

    from jsonschema import Draft7Validator

    def drop_required(node):
        if isinstance(node, dict):
            return {k: drop_required(v) for k, v in node.items() if k != "required"}
        if isinstance(node, list):
            return [drop_required(v) for v in node]
        return node

    schema = json.loads(SCHEMA.read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in Draft7Validator(drop_required(schema)).iter_errors(values)]
    errors += [f"{key}: not a key of the chart" for key in values if key not in schema["topLevelKeys"]]
    return errors


def test_values_fit_the_charts_schema_and_a_misspelled_key_would_not(values):
    import copy

    assert schema_errors(values) == []
    broken = copy.deepcopy(values)
    broken["runLauncher"]["config"]["k8sRunLauncher"]["envSecret"] = [{"name": "x"}]  # envSecrets
    broken["dagsterDaemon"]["runCoordinator"]["type"] = "QueuedCoordinator"
    broken["concurrency"]["pools"]["default_limit"] = 8  # dagster.yaml's spelling, not the chart's
    broken["dagster-user-deployments"]["deployments"][0]["image"]["pullPolicy"] = "IfMissing"
    broken["concurency"] = {}
    errors = "\n".join(schema_errors(broken))
    assert re.search(r"^runLauncher\.config\.k8sRunLauncher: .*'envSecret'.* is not valid", errors, re.M), errors
    for part in ("'QueuedCoordinator' is not one of", "'default_limit' was unexpected",
                 "'IfMissing' is not one of", "concurency: not a key of the chart"):
        assert part in errors, errors


# -- the image -------------------------------------------------------------------------------------
def test_dockerfile_serves_the_projects_module_with_the_values_port_and_no_secret(values, project):
    text = (project / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert "'autoembed-dagster[k8s]'" in text and "[standalone]" not in text  # no embedded Postgres, no web UI
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    args = yaml.safe_load(cmd.group(1))
    assert args[:3] == ["dagster", "api", "grpc"]
    dep = deployment(values)
    assert (args[args.index("-m") + 1], args[args.index("-a") + 1]) == grpc_module(dep)
    assert args[args.index("-p") + 1] == str(dep["port"])
    assert re.search(rf"^EXPOSE {dep['port']}$", text, re.M)
    assert "ENV OPENAI_API_KEY" not in text and "AUTOEMBED_DATABASE_URL=" not in text


def test_the_k8s_extra_pins_the_dagster_line():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["k8s"]
    postgres_pin = next(d for d in project["dependencies"] if d.startswith("dagster-postgres=="))
    assert extra == ["dagster-k8s==" + postgres_pin.split("==")[1]]  # dagster-k8s and -postgres share versions


# -- the instance the chart renders ------------------------------------------------------------------
def chart_instance_config(values: dict, kubeconfig: Path, socket_dir: str, db_name: str) -> dict:
    """The dagster.yaml the chart's templates make of `values` (the fields used here), with two
    changes for a test outside a cluster: a kubeconfig file instead of the in-cluster config, and
    the test server's socket for the Postgres host."""
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    qrc = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    pools, runs = values["concurrency"]["pools"], values["concurrency"]["runs"]
    pg = values["postgresql"]
    daemon = values["dagsterDaemon"]
    return {
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": {
            "instance_config_map": "autoembed-dagster-instance",  # the chart names these after the release
            "service_account_name": "autoembed-dagster",
            "job_namespace": "autoembed",  # the release's namespace (values: no jobNamespace)
            "postgres_password_secret": "dagster-postgresql-secret",
            "dagster_home": "/opt/dagster/dagster_home",
            "load_incluster_config": False,  # values: loadInclusterConfig true (in a cluster)
            "kubeconfig_file": str(kubeconfig),
            "env_secrets": [s["name"] for s in k8s["envSecrets"]],
            "run_k8s_config": {"container_config": k8s["runK8sConfig"]["containerConfig"]},
        }},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator", "config": {
            "dequeue_interval_seconds": qrc["dequeueIntervalSeconds"],
            "dequeue_use_threads": qrc["dequeueUseThreads"],
        }},
        "storage": {"postgres": {"postgres_db": {
            "username": "postgres",  # values: postgresqlUsername, on the test server its superuser
            "password": {"env": "DAGSTER_PG_PASSWORD"},
            "hostname": "",  # values: postgresqlHost; here a unix socket (params.host)
            "db_name": db_name,
            "port": pg["service"]["port"],
            "params": {"host": socket_dir},  # values: postgresqlParams (sslmode: not on a socket)
        }}},
        "concurrency": {
            "pools": {"granularity": pools["granularity"], "default_limit": pools["defaultLimit"]},
            "runs": {"max_concurrent_runs": runs["maxConcurrentRuns"], "tag_concurrency_limits": [
                {"key": t["key"], "value": t["value"], "limit": t["limit"]} for t in runs["tagConcurrencyLimits"]]},
        },
        "run_monitoring": {"enabled": daemon["runMonitoring"]["enabled"],
                           "start_timeout_seconds": daemon["runMonitoring"]["startTimeoutSeconds"],
                           "poll_interval_seconds": daemon["runMonitoring"]["pollIntervalSeconds"]},
        "run_retries": {"enabled": daemon["runRetries"]["enabled"], "max_retries": daemon["runRetries"]["maxRetries"]},
        "telemetry": {"enabled": False},
    }


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: test, user: {token: not-a-real-token}}]
contexts: [{name: test, context: {cluster: test, user: test, namespace: autoembed}}]
current-context: test
"""


def test_the_rendered_instance_loads_with_the_k8s_run_launcher_on_postgres(values, pg_server_url, tmp_path,
                                                                          monkeypatch):
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed: pip install -e '.[k8s]'")
    from dagster import DagsterInstance
    from dagster._core.instance.config import PoolGranularity
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_k8s import K8sRunLauncher

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    socket_dir = parse_qs(urlparse(pg_server_url).query)["host"][0]
    ensure_database(pg_server_url, "dagster_deploy_test")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(
        chart_instance_config(values, kubeconfig, socket_dir, "dagster_deploy_test")))
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "trust-auth-ignores-it")

    with DagsterInstance.from_config(str(home)) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, K8sRunLauncher)
        assert launcher.env_secrets == ["autoembed-env"]
        assert launcher.run_k8s_config["container_config"]["resources"]["requests"]["cpu"] == "1"
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        pool_config = instance.get_concurrency_config().pool_config
        assert pool_config.pool_granularity == PoolGranularity.RUN
        assert pool_config.default_pool_limit == values["concurrency"]["pools"]["defaultLimit"]
        assert instance.get_runs_count() == 0  # the storage is really there (tables created)
