"""The deployment files, read without a Docker engine: docker-compose.yml (services, images, commands,
environment wiring, the code server behind the webserver and the daemon, health checks, no literal
secret), dagster.yaml and workspace.yaml (loaded by Dagster itself), and `dagster definitions validate`
on the workspace from the repository root. (test_dagster_postgres_instance.py runs the compose file's
own instance and workspace configs against a real PostgreSQL, code server, webserver and daemon.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

dg = pytest.importorskip("dagster")

from dagster._core.instance.config import dagster_instance_config  # noqa: E402

from pcbo_dagster_tests.dagster_harness import REPO_ROOT, executable  # noqa: E402

COMPOSE = REPO_ROOT / "docker-compose.yml"
DAGSTER_YAML = REPO_ROOT / "dagster.yaml"
WORKSPACE_YAML = REPO_ROOT / "workspace.yaml"
APP_SERVICES = ("codeserver", "webserver", "daemon")
MODULE = "pcbo_dagster.dagster_defs.definitions"
PG_VARS = ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB")
PCBO_VARS = ("PCBO_HOME", "PCBO_CATALOG_URL", "PCBO_LAKE_URL", "PCBO_AUDIT_DIR", "PCBO_DATASETS_CONFIG")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PASSWD", re.IGNORECASE)
_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
REQUIRED_VAR = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}$")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (`${V}`, `${V:-default}`, `${V-default}`, `${V:?err}`, `$$`)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        unset = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return arg
        return current or ""

    return _VAR.sub(substitute, value)


def _strings(node: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [item for k, v in node.items() for item in _strings(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [item for i, v in enumerate(node) for item in _strings(v, f"{path}[{i}]")]
    return [(path, node)] if isinstance(node, str) else []


def _secrets(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, value) of every mapping key that names a secret, in a parsed YAML document."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if SECRET_NAME.search(str(key)):
                found.append((where, value))
            else:
                found.extend(_secrets(value, where))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_secrets(value, f"{path}[{index}]"))
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # (SafeLoader resolves the `<<` merge keys)


@pytest.fixture(scope="module")
def configs(compose) -> dict[str, str]:
    return {name: cfg["content"] for name, cfg in compose["configs"].items()}


def _env(compose: dict[str, Any], service: str) -> dict[str, str]:
    return {k: str(v) for k, v in compose["services"][service]["environment"].items()}


def _mounts(compose: dict[str, Any], service: str) -> dict[str, str]:
    """config name -> target path inside the container."""
    return {c["source"]: c["target"] for c in compose["services"][service].get("configs", [])}


def _option(command: list[str], *names: str) -> str:
    for name in names:
        if name in command:
            return command[command.index(name) + 1]
    raise AssertionError(f"none of {names} in {command}")


# --- docker-compose.yml ---------------------------------------------------------------------------


def test_services_images_and_commands(compose):
    services = compose["services"]
    assert set(services) >= {"postgres", *APP_SERVICES}
    assert services["postgres"]["image"].startswith("postgres:")
    images = {services[s]["image"] for s in APP_SERVICES}
    assert len(images) == 1, images  # one image built once for the three
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert build["context"] == "."
        # A regular (not editable) install: the example datasets config is package data.
        assert 'pip install --no-cache-dir ".[dagster]"' in build["dockerfile_inline"]
        assert "COPY pcbo_dagster" in build["dockerfile_inline"]
        assert "examples" not in build["dockerfile_inline"]

    code = services["codeserver"]["command"]
    assert code[:3] == ["dagster", "code-server", "start"]
    assert _option(code, "-m", "--module-name") == MODULE
    assert _option(code, "-h", "--host") == "0.0.0.0"
    web = services["webserver"]["command"]
    assert web[0] == "dagster-webserver" and _option(web, "-h", "--host") == "0.0.0.0"
    daemon = services["daemon"]["command"]
    assert daemon[:2] == ["dagster-daemon", "run"]
    # The UI is the only published port, its host side a variable; PostgreSQL stays off the host.
    assert services["webserver"]["ports"] == [
        "${DAGSTER_WEBSERVER_PORT:-3000}:" + _option(web, "-p", "--port")
    ]
    assert "ports" not in services["postgres"] and "ports" not in services["codeserver"]


def test_the_webserver_and_the_daemon_load_the_code_server(compose, configs):
    services = compose["services"]
    code = services["codeserver"]["command"]
    workspace = yaml.safe_load(configs["dagster-workspace"])
    (entry,) = workspace["load_from"]
    grpc = entry["grpc_server"]
    assert grpc["host"] == "codeserver"  # the service name
    assert str(grpc["port"]) == _option(code, "-p", "--port")
    assert grpc["location_name"] == _option(code, "--location-name", "-l")
    for name in ("webserver", "daemon"):
        target = _mounts(compose, name)["dagster-workspace"]
        assert _option(services[name]["command"], "-w", "--workspace") == target
    # The location name matches the local workspace.yaml's, so runs and assets keep their location.
    local = yaml.safe_load(WORKSPACE_YAML.read_text())["load_from"][0]["python_module"]
    assert local == {"module_name": MODULE, "location_name": grpc["location_name"]}


def test_environment_wiring(compose, configs):
    services = compose["services"]
    instance_text = configs["dagster-instance"]
    instance = yaml.safe_load(instance_text)
    pg = instance["storage"]["postgres"]["postgres_db"]
    # The instance reads every connection setting from the environment...
    assert {k: v for k, v in pg.items() if isinstance(v, dict)} == {
        "hostname": {"env": "DAGSTER_PG_HOST"},
        "username": {"env": "DAGSTER_PG_USER"},
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "db_name": {"env": "DAGSTER_PG_DB"},
    }
    # ...through psycopg2: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, which dagster-postgres
    # 0.29 cannot use (its `NOTIFY run_events, %(id)s` fails server-side binding).
    assert pg["scheme"] == "postgresql+psycopg2"

    full = {"POSTGRES_PASSWORD": "s3cret"}
    for name in APP_SERVICES:
        raw = _env(compose, name)
        assert set(raw) >= {*PG_VARS, *PCBO_VARS, "DAGSTER_HOME"}, name
        env = interpolate(raw, full)
        assert env["DAGSTER_PG_HOST"] == "postgres" and env["DAGSTER_PG_PASSWORD"] == "s3cret"
        mounts = _mounts(compose, name)
        assert mounts["dagster-instance"] == f"{env['DAGSTER_HOME']}/dagster.yaml", name
        catalog = env["PCBO_CATALOG_URL"]
        assert catalog == "postgresql://dagster:s3cret@postgres:5432/pcbo", catalog
        # The catalog is its own database: its tables (runs, ...) must not meet Dagster's.
        assert catalog.rsplit("/", 1)[1] != env["DAGSTER_PG_DB"]
        assert env["PCBO_LAKE_URL"].startswith(env["PCBO_HOME"])
        assert env["PCBO_AUDIT_DIR"].startswith(env["PCBO_HOME"])

    # Every variable is overridable, and renaming the catalog database renames the one created.
    custom = interpolate(
        _env(compose, "codeserver"),
        {**full, "POSTGRES_USER": "u", "PCBO_CATALOG_DB": "cat", "DAGSTER_PG_DB": "d"},
    )
    assert custom["PCBO_CATALOG_URL"] == "postgresql://u:s3cret@postgres:5432/cat"
    assert custom["DAGSTER_PG_USER"] == "u" and custom["DAGSTER_PG_DB"] == "d"
    init_sql = interpolate(configs["pcbo-catalog-db"], {"PCBO_CATALOG_DB": "cat"})
    assert init_sql.strip() == 'CREATE DATABASE "cat";\nCREATE DATABASE "pcbo_staging";'
    assert _mounts(compose, "postgres")["pcbo-catalog-db"].startswith("/docker-entrypoint-initdb.d/")
    postgres_env = interpolate(
        _env(compose, "postgres"), {**full, "POSTGRES_USER": "u", "DAGSTER_PG_DB": "d"}
    )
    assert postgres_env == {"POSTGRES_USER": "u", "POSTGRES_PASSWORD": "s3cret", "POSTGRES_DB": "d"}

    # Runs execute in the code server: it holds PCBO_HOME (a volume), where the packaged example
    # config (PCBO_DATASETS_CONFIG empty unless set) finds the sources `pcbo demo-data` writes.
    code = services["codeserver"]
    env = interpolate(_env(compose, "codeserver"), full)
    volumes = {v.split(":")[1]: v.split(":")[0] for v in code["volumes"]}
    assert volumes[env["PCBO_HOME"]] == "pcbo-home" and "pcbo-home" in compose["volumes"]
    assert env["PCBO_DATASETS_CONFIG"] == ""
    assert "./examples" not in volumes.values()
    assert (
        interpolate(_env(compose, "codeserver"), {**full, "PCBO_DATASETS_CONFIG": "/etc/d.yaml"})[
            "PCBO_DATASETS_CONFIG"
        ]
        == "/etc/d.yaml"
    )


def test_health_checks_and_start_order(compose):
    services = compose["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["codeserver"]["healthcheck"]["test"][1:5] == ["dagster", "api", "grpc-health-check", "-p"]
    assert services["codeserver"]["healthcheck"]["test"][5] == _option(
        services["codeserver"]["command"], "-p"
    )
    assert services["codeserver"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "codeserver": {"condition": "service_healthy"},
        }, name


def test_no_literal_secret_every_password_is_a_required_variable(compose):
    text = COMPOSE.read_text()
    # No default for a password anywhere (`${POSTGRES_PASSWORD:-dagster}` would ship one).
    assert not re.search(r"\$\{[A-Za-z_]*(PASSWORD|SECRET|TOKEN)[A-Za-z_]*:?-", text), (
        "a secret has a default"
    )
    for path, value in _strings(compose):
        key = path.rsplit(".", 1)[-1]
        if SECRET_NAME.search(key):
            assert REQUIRED_VAR.match(value), f"{path}: {value!r} is not a required ${{VAR:?...}}"
        for userinfo in re.findall(r"://[^/@\s]*:([^/@\s]*)@", value):
            assert REQUIRED_VAR.match(userinfo), f"{path}: password {userinfo!r} in a URL"
        if path.startswith("configs."):  # instance configs take secrets from the environment only
            for doc_path, doc_value in _secrets(yaml.safe_load(value)):
                assert isinstance(doc_value, dict) and set(doc_value) == {"env"}, f"{path}: {doc_path}"
    # Without POSTGRES_PASSWORD, compose refuses to start (the interpolation fails).
    for name in ("postgres", *APP_SERVICES):
        with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
            interpolate(_env(compose, name), {})


# --- dagster.yaml, workspace.yaml --------------------------------------------------------------------


def test_the_repository_dagster_yaml_loads_as_an_instance(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(DAGSTER_YAML, home / "dagster.yaml")
    config, _ = dagster_instance_config(str(home))
    assert "storage" not in config  # SQLite under $DAGSTER_HOME
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.pool_config.pool_granularity.value == "op"
        assert concurrency.run_queue_config.max_concurrent_runs == 4
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert not instance.run_retries_retry_on_asset_or_op_failure


def test_the_compose_instance_config_validates_and_matches_the_repository_settings(
    tmp_path, configs, monkeypatch
):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(configs["dagster-instance"])
    for name, value in zip(PG_VARS, ("postgres", "dagster", "s3cret", "dagster"), strict=True):
        monkeypatch.setenv(name, value)
    config, _ = dagster_instance_config(str(home))  # the schema check (connecting is another test's job)
    assert set(config["storage"]) == {"postgres"}
    local = yaml.safe_load(DAGSTER_YAML.read_text())
    compose_instance = yaml.safe_load(configs["dagster-instance"])
    for section in ("run_retries", "concurrency", "telemetry"):
        assert compose_instance[section] == local[section], section
    # The storage settings resolve (from the environment) to a psycopg2 URL of the `postgres` service.
    from dagster._config import process_config
    from dagster_postgres import DagsterPostgresStorage
    from dagster_postgres.utils import pg_url_from_config

    processed = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert processed.success, processed.errors
    url = pg_url_from_config(processed.value)
    assert url == "postgresql+psycopg2://dagster:s3cret@postgres:5432/dagster"


def test_dagster_definitions_validate_on_the_workspace_from_the_repository_root(tmp_path):
    # The definitions only name the demo sources (no read at load time): no demo data needed.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCBO_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(tmp_path), PCBO_HOME=str(tmp_path / "pcbo"))
    done = subprocess.run(
        [executable("dagster"), "definitions", "validate", "-w", str(WORKSPACE_YAML.relative_to(REPO_ROOT))],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Validation successful for code location pcbo" in output
    assert "All code locations passed validation" in output
    assert not (Path(tmp_path) / "pcbo").exists()  # loading the definitions writes nothing


# --- the docker-launcher profile (docker-compose.docker-launcher.yml) ------------------------------

LAUNCHER_OVERRIDE = REPO_ROOT / "docker-compose.docker-launcher.yml"
HELM_VALUES = REPO_ROOT / "deploy" / "helm" / "values.yaml"


def _merge(base: Any, override: Any, key: str = "") -> Any:
    """`docker compose -f base -f override`'s merge, as far as these files use it: mappings merged key by
    key, a service's `configs` and `volumes` merged by target, other values replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            merged[k] = _merge(base[k], v, k) if k in base else v
        return merged
    if key in ("configs", "volumes") and isinstance(base, list) and isinstance(override, list):

        def target(item: Any) -> str:
            return item["target"] if isinstance(item, dict) else str(item).split(":")[1]

        by_target = {target(item): item for item in base}
        by_target.update({target(item): item for item in override})
        return list(by_target.values())
    return override


@pytest.fixture(scope="module")
def launcher_compose(compose) -> dict[str, Any]:
    return _merge(compose, yaml.safe_load(LAUNCHER_OVERRIDE.read_text()))


def test_the_docker_launcher_profile_renders(launcher_compose):
    env = {
        "POSTGRES_PASSWORD": "pw",
        "PCBO_LAKE_URL": "s3://b/lake",
        "PCBO_AUDIT_DIR": "s3://b/pas",
        "PCBO_STAGING_LAKE_URL": "s3://b/staging-lake",
        "PCBO_STAGING_AUDIT_DIR": "s3://b/staging-pas",
    }
    rendered = interpolate(launcher_compose, env)
    services = rendered["services"]
    assert set(services) == {"postgres", *APP_SERVICES}
    for name in ("webserver", "daemon"):
        # the launcher's instance config replaces the base one at the same path, the socket is mounted
        mounts = _mounts(rendered, name)
        assert mounts["dagster-instance-docker"] == "/opt/dagster/home/dagster.yaml"
        assert "dagster-instance" not in mounts
        assert "/var/run/docker.sock:/var/run/docker.sock" in services[name]["volumes"]
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert environment["PCBO_MULTI_HOST"] == "true"
        assert environment["PCBO_LAKE_URL"] == "s3://b/lake" and environment["PCBO_AUDIT_DIR"] == "s3://b/pas"
        assert environment["PCBO_CATALOG_URL"].startswith("postgresql://")
        # a rollout's staging runs on the same hosts: shared stores of its own (rollout/environments.py)
        staging = {k: environment[k] for k in ("PCBO_STAGING_LAKE_URL", "PCBO_STAGING_AUDIT_DIR")}
        assert staging == {
            "PCBO_STAGING_LAKE_URL": "s3://b/staging-lake",
            "PCBO_STAGING_AUDIT_DIR": "s3://b/staging-pas",
        }
        assert environment["PCBO_STAGING_CATALOG_URL"].endswith("@postgres:5432/pcbo_staging")
    assert services["codeserver"]["environment"]["DAGSTER_CURRENT_IMAGE"] == services["codeserver"]["image"]
    assert rendered["networks"]["default"]["name"] == "pcbo"
    # The lake and the audit store have no local default here: a run container's disk is thrown away.
    for missing in ("PCBO_LAKE_URL", "PCBO_AUDIT_DIR", "PCBO_STAGING_LAKE_URL", "PCBO_STAGING_AUDIT_DIR"):
        with pytest.raises(MissingVariable, match=missing):
            interpolate(launcher_compose, {k: v for k, v in env.items() if k != missing})


def test_the_docker_launcher_instance_config_validates(launcher_compose, tmp_path, monkeypatch):
    pytest.importorskip("dagster_docker")
    from dagster._config import process_config
    from dagster_docker import DockerRunLauncher

    content = launcher_compose["configs"]["dagster-instance-docker"]["content"]
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(content)
    for name, value in zip(PG_VARS, ("postgres", "dagster", "s3cret", "dagster"), strict=True):
        monkeypatch.setenv(name, value)
    config, _ = dagster_instance_config(str(home))
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    processed = process_config(DockerRunLauncher.config_type(), launcher["config"])
    assert processed.success, processed.errors
    # Run containers get what a run needs (the values come from the daemon's own environment).
    assert set(launcher["config"]["env_vars"]) >= {
        *PG_VARS,
        *PCBO_VARS,
        "PCBO_MULTI_HOST",
        "PCBO_STAGING_CATALOG_URL",
        "PCBO_STAGING_LAKE_URL",
        "PCBO_STAGING_AUDIT_DIR",
    } - {"PCBO_HOME"}
    assert launcher["config"]["network"] == launcher_compose["networks"]["default"]["name"]
    # Everything else as docker-compose.yml's instance config.
    base = yaml.safe_load(launcher_compose["configs"]["dagster-instance"]["content"])
    ours = yaml.safe_load(content)
    assert {k: v for k, v in ours.items() if k != "run_launcher"} == base


# --- Helm values for Dagster's chart (deploy/helm/values.yaml) -------------------------------------


@pytest.fixture(scope="module")
def helm() -> dict[str, Any]:
    return yaml.safe_load(HELM_VALUES.read_text())


def test_helm_values_launch_runs_and_steps_on_kubernetes(helm):
    assert helm["runLauncher"]["type"] == "K8sRunLauncher"
    (deployment,) = helm["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", MODULE]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert env["PCBO_EXECUTOR"] == "k8s" and env["PCBO_MULTI_HOST"] == "true"
    assert env["PCBO_LAKE_URL"].startswith(("s3://", "gs://"))
    assert env["PCBO_AUDIT_DIR"].startswith(("s3://", "gs://"))
    assert (
        env["PCBO_STAGING_LAKE_URL"].startswith(("s3://", "gs://"))
        and env["PCBO_STAGING_LAKE_URL"] != env["PCBO_LAKE_URL"]
    )
    assert env["PCBO_STAGING_AUDIT_DIR"].startswith(("s3://", "gs://"))
    # PostgreSQL outside the chart, its password from a Kubernetes secret, not from these values.
    assert helm["postgresql"]["enabled"] is False and "postgresqlPassword" not in helm["postgresql"]
    assert helm["generatePostgresqlPasswordSecret"] is False and helm["global"]["postgresqlSecretName"]
    # The catalog URL (it holds a password) and the object store's keys come from the pcbo-secrets secret
    # in every pod that runs pcbo code.
    assert "PCBO_CATALOG_URL" not in env and not any(SECRET_NAME.search(name) for name in env)
    holders = (
        deployment,
        helm["runLauncher"]["config"]["k8sRunLauncher"],
        helm["dagsterDaemon"],
        helm["dagsterWebserver"],
    )
    for holder in holders:
        assert {"name": "pcbo-secrets"} in holder["envSecrets"]
    assert helm["dagsterDaemon"]["runRetries"] == {
        "enabled": True,
        "maxRetries": 2,
        "retryOnAssetOrOpFailure": False,
    }


def _chart_instance_config(helm: dict[str, Any]) -> dict[str, Any]:
    """The run launcher and storage sections of the dagster.yaml the chart renders from these values (its
    configmap-instance.yaml template, the fields these values set)."""
    launcher = helm["runLauncher"]["config"]["k8sRunLauncher"]
    pg = helm["postgresql"]
    run_k8s = launcher["runK8sConfig"]
    return {
        "storage": {
            "postgres": {
                "postgres_db": {
                    "username": pg["postgresqlUsername"],
                    "password": {"env": "DAGSTER_PG_PASSWORD"},
                    "hostname": pg["postgresqlHost"],
                    "db_name": pg["postgresqlDatabase"],
                    "port": pg["service"]["port"],
                }
            }
        },
        "run_launcher": {
            "module": "dagster_k8s",
            "class": "K8sRunLauncher",
            "config": {
                "load_incluster_config": launcher["loadInclusterConfig"],
                "job_namespace": "pcbo",
                "image_pull_policy": launcher["imagePullPolicy"],
                "service_account_name": "pcbo-dagster",
                "dagster_home": "/opt/dagster/dagster_home",
                "instance_config_map": "pcbo-dagster-instance",
                "postgres_password_secret": helm["global"]["postgresqlSecretName"],
                "env_secrets": [s["name"] for s in launcher["envSecrets"]],
                "run_k8s_config": {"container_config": run_k8s["containerConfig"]},
            },
        },
        "run_retries": {
            "enabled": helm["dagsterDaemon"]["runRetries"]["enabled"],
            "max_retries": helm["dagsterDaemon"]["runRetries"]["maxRetries"],
            "retry_on_asset_or_op_failure": helm["dagsterDaemon"]["runRetries"]["retryOnAssetOrOpFailure"],
        },
    }


def test_helm_values_render_an_instance_config_dagster_accepts(helm, tmp_path, monkeypatch):
    pytest.importorskip("dagster_k8s")
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher, k8s_job_executor

    from pcbo_dagster.dagster_defs.definitions import executor_from_env

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(_chart_instance_config(helm)))
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "s3cret")
    config, _ = dagster_instance_config(str(home))
    processed = process_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert processed.success, processed.errors
    # PCBO_EXECUTOR=k8s (the user deployment's env) gives every job dagster-k8s's step executor,
    # configured empty (its settings the run launcher's, none from a launch's run config).
    (deployment,) = helm["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    executor = executor_from_env(env)
    assert executor.name == k8s_job_executor.name
    assert executor.executor_creation_fn is k8s_job_executor.executor_creation_fn
