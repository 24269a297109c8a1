"""The deployment files: docker-compose.yml, deploy/Dockerfile and the broker/database config.

Nothing is started here (no Docker engine is needed). The compose file is always checked
structurally, after resolving its `${VAR}` references the way Compose does; where a Compose
binary is installed (`docker-compose` 1.29 from Debian, or the `docker compose` plugin), the
binary's own `config` must accept the file and resolve it to the same facts.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

INFRA = ("rabbitmq", "mysql", "ses")
WORKERS = {
    "callbacks-worker": "callbacks",
    "expiry-worker": "expiry",
    "email-worker": "email",
    "ses-events-worker": "ses-events",
    "reconciler": "reconciler",
}
LONG_RUNNING_APP = ("gateway", *WORKERS)
APP = ("migrate", *LONG_RUNNING_APP)

# --- resolving ${VAR} the way Compose does -----------------------------------------------------

_VAR = re.compile(
    r"\$\$"  # an escaped dollar
    r"|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def _substitute(text: str, env: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        # ":-" / ":?" treat an empty value as missing; "-" / "?" only an unset one.
        missing = not value if op in (":-", ":?") else value is None
        if missing and op and op.endswith("?"):
            raise ValueError(f"{name} is required: {arg}")
        if missing and op and op.endswith("-"):
            return arg
        return value or ""

    return _VAR.sub(one, text)


def _resolve(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return _substitute(node, env)
    if isinstance(node, dict):
        return {key: _resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(item, env) for item in node]
    return node


def _load(env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return _resolve(raw, env or {})


def _env_of(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment", {})
    if isinstance(env, list):  # "KEY=value" / "KEY" list form
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


# --- services and commands ---------------------------------------------------------------------


def test_every_component_is_a_service(services: dict[str, Any]) -> None:
    missing = {*INFRA, *APP} - set(services)
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


@pytest.mark.parametrize(("service", "worker"), sorted(WORKERS.items()))
def test_each_worker_runs_its_own_command(
    services: dict[str, Any], service: str, worker: str
) -> None:
    assert services[service]["command"] == ["worker", worker]


def test_gateway_runs_the_gateway(services: dict[str, Any]) -> None:
    assert services["gateway"]["command"] == ["gateway"]


def test_migrate_migrates_then_sets_up_the_broker_and_exits(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    script = " ".join([*migrate.get("entrypoint", []), *migrate["command"]])
    assert re.search(r"queue-server migrate\s*&&\s*queue-server setup-broker", script), script
    # A one-shot: restarting it would re-run it forever and block its dependants.
    assert str(migrate.get("restart", "no")) == "no"
    assert "ports" not in migrate


def test_app_services_share_one_image_built_from_deploy_dockerfile(
    services: dict[str, Any],
) -> None:
    images = set()
    for name in APP:
        build = services[name]["build"]
        assert build["context"] == "."
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        images.add(services[name]["image"])
    assert len(images) == 1, f"app services should share one image, got {images}"


# --- scaling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("service", sorted(WORKERS))
def test_workers_can_be_scaled(services: dict[str, Any], service: str) -> None:
    """`docker compose up --scale NAME=N` needs no fixed name and no fixed host port."""
    spec = services[service]
    assert "container_name" not in spec
    assert "ports" not in spec
    assert "hostname" not in spec


def test_no_app_service_has_a_fixed_container_name(services: dict[str, Any]) -> None:
    named = [name for name in APP if "container_name" in services[name]]
    assert not named


def test_gateway_publishes_port_from_env(services: dict[str, Any]) -> None:
    assert services["gateway"]["ports"] == ["3852:3852"]
    resolved = _load({"PORT": "4000"})["services"]["gateway"]
    assert resolved["ports"] == ["4000:3852"]
    # ... while inside the container it always listens where its healthcheck looks.
    assert _env_of(resolved)["PORT"] == "3852"
    assert "3852" in " ".join(resolved["healthcheck"]["test"])


# --- start order and health --------------------------------------------------------------------


@pytest.mark.parametrize("service", LONG_RUNNING_APP)
def test_app_service_waits_for_healthy_infra_and_migrations(
    services: dict[str, Any], service: str
) -> None:
    depends = services[service]["depends_on"]
    assert depends["mysql"] == {"condition": "service_healthy"}
    assert depends["rabbitmq"] == {"condition": "service_healthy"}
    assert depends["migrate"] == {"condition": "service_completed_successfully"}


def test_migrate_waits_for_healthy_infra(services: dict[str, Any]) -> None:
    depends = services["migrate"]["depends_on"]
    assert depends == {
        "mysql": {"condition": "service_healthy"},
        "rabbitmq": {"condition": "service_healthy"},
    }


def test_email_worker_waits_for_the_ses_emulator(services: dict[str, Any]) -> None:
    assert services["email-worker"]["depends_on"]["ses"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("service", ["rabbitmq", "mysql", "ses", "gateway"])
def test_healthcheck_defined(services: dict[str, Any], service: str) -> None:
    check = services[service]["healthcheck"]
    assert not check.get("disable", False)
    test = check["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1 and all(test)
    for key in ("interval", "timeout"):
        assert _seconds(check[key]) > 0
    assert int(check["retries"]) >= 1


def test_every_healthy_dependency_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, spec in services.items():
        for target, rule in spec.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if rule.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits on {target}'s health"


def test_no_dependency_cycles(services: dict[str, Any]) -> None:
    seen: dict[str, str] = {}

    def visit(name: str) -> None:
        assert seen.get(name) != "active", f"dependency cycle through {name}"
        if seen.get(name) == "done":
            return
        seen[name] = "active"
        for target in services[name].get("depends_on", {}):
            visit(target)
        seen[name] = "done"

    for name in services:
        visit(name)


@pytest.mark.parametrize("service", LONG_RUNNING_APP)
def test_app_processes_restart_and_drain(services: dict[str, Any], service: str) -> None:
    spec = services[service]
    assert spec["restart"] == "unless-stopped"
    assert spec["init"] is True  # tini as PID 1 forwards SIGTERM and reaps children
    # Longer than the app's own drain bound, so a draining process is not SIGKILLed.
    assert _seconds(spec["stop_grace_period"]) >= 30
    assert _seconds(spec["stop_grace_period"]) > _shutdown_grace_default()


def _shutdown_grace_default() -> float:
    settings = pytest.importorskip("shared.infra.settings")
    return float(settings.Settings.model_fields["SHUTDOWN_GRACE_SECONDS"].default)


@pytest.mark.parametrize("service", ["rabbitmq", "mysql", "ses"])
def test_infra_restarts(services: dict[str, Any], service: str) -> None:
    assert services[service]["restart"] == "unless-stopped"


# --- environment -------------------------------------------------------------------------------


@pytest.mark.parametrize("service", APP)
def test_app_reaches_the_stack_by_service_name(services: dict[str, Any], service: str) -> None:
    env = _env_of(services[service])
    assert env["MYSQL_HOST"] == "mysql"
    assert env["MYSQL_PORT"] == "3306"
    url = urlsplit(env["RABBITMQ_URL"])
    assert (url.scheme, url.hostname, url.port) == ("amqp", "rabbitmq", 5672)
    assert url.username and url.username != "guest"  # guest is loopback-only
    assert url.path.strip("/"), "the stack uses its own vhost"
    assert env["EMAIL_TRANSPORT"] == "ses"
    assert env["AWS_ENDPOINT_URL"] == "http://ses:5000"


def test_app_credentials_match_what_infra_creates(services: dict[str, Any]) -> None:
    app_env = _env_of(services["gateway"])
    mysql_env = _env_of(services["mysql"])
    assert app_env["MYSQL_USER"] == mysql_env["MYSQL_USER"]
    assert app_env["MYSQL_PASS"] == mysql_env["MYSQL_PASSWORD"]
    assert app_env["MYSQL_DB"] == mysql_env["MYSQL_DATABASE"]
    assert app_env["MYSQL_USER"] != "root"  # the mysql image refuses MYSQL_USER=root
    url = urlsplit(app_env["RABBITMQ_URL"])
    rabbit_env = _env_of(services["rabbitmq"])
    assert url.username == rabbit_env["RABBITMQ_DEFAULT_USER"]
    assert url.password == rabbit_env["RABBITMQ_DEFAULT_PASS"]
    assert url.path.strip("/") == rabbit_env["RABBITMQ_DEFAULT_VHOST"]


def test_a_host_style_env_cannot_redirect_the_containers() -> None:
    """A .env written for running on the host must not point the containers at 127.0.0.1."""
    host_env = {
        "MYSQL_HOST": "127.0.0.1",
        "MYSQL_USER": "root",
        "MYSQL_PASS": "",
        "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672/",
        "EMAIL_TRANSPORT": "outbox",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
        "PORT": "4000",
    }
    env = _env_of(_load(host_env)["services"]["email-worker"])
    assert env["MYSQL_HOST"] == "mysql"
    assert env["MYSQL_USER"] != "root"
    assert urlsplit(env["RABBITMQ_URL"]).hostname == "rabbitmq"
    assert env["AWS_ENDPOINT_URL"] == "http://ses:5000"
    assert env["PORT"] == "3852"


def test_stack_settings_come_from_env(services: dict[str, Any]) -> None:
    env = _env_of(
        _load(
            {
                "STACK_RABBITMQ_USER": "u1",
                "STACK_RABBITMQ_PASSWORD": "p1",
                "STACK_RABBITMQ_VHOST": "v1",
                "STACK_EMAIL_TRANSPORT": "outbox",
                "STACK_AWS_ENDPOINT_URL": "",
            }
        )["services"]["gateway"]
    )
    assert env["RABBITMQ_URL"] == "amqp://u1:p1@rabbitmq:5672/v1"
    assert env["EMAIL_TRANSPORT"] == "outbox"
    assert env["AWS_ENDPOINT_URL"] == ""  # empty = the real SES endpoint


def test_secrets_have_no_default(services: dict[str, Any]) -> None:
    """ADMIN_API_KEY and SALT come from the operator (.env or shell), never from the file.

    A key with no value is passed through by Compose: unset, the app refuses to start.
    """
    for name in APP:
        env = _env_of(services[name])
        assert env.get("ADMIN_API_KEY") is None
        assert env.get("SALT") is None


def test_every_setting_reaches_the_containers(services: dict[str, Any]) -> None:
    settings = pytest.importorskip("shared.infra.settings")
    missing = set(settings.Settings.model_fields) - set(_env_of(services["gateway"]))
    assert not missing, f"add to x-app-environment in docker-compose.yml: {sorted(missing)}"


def test_compose_file_needs_no_env_file(compose: dict[str, Any]) -> None:
    """docker-compose 1.29 fails on a missing env_file and `.env` does not exist in CI."""
    for name, spec in compose["services"].items():
        assert "env_file" not in spec, f"{name} has env_file"
    required = re.findall(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?\?", COMPOSE_FILE.read_text())
    assert not required, f"required variables break `config` without .env: {required}"
    _load({})  # every reference resolves with an empty environment


# --- infrastructure configuration ----------------------------------------------------------------


def _mounts(spec: dict[str, Any]) -> dict[str, str]:
    """container path -> host source, for short-syntax volumes."""
    result = {}
    for volume in spec.get("volumes", []):
        source, target, *_ = volume.split(":")
        result[target] = source
    return result


def test_rabbitmq_image_config_and_data(compose: dict[str, Any]) -> None:
    rabbit = compose["services"]["rabbitmq"]
    assert re.fullmatch(r"rabbitmq:3\.13(\.\d+)?-management", rabbit["image"])
    assert rabbit["hostname"] == "rabbitmq"  # node name, hence data dir, survives re-creation
    mounts = _mounts(rabbit)
    assert mounts["/etc/rabbitmq/enabled_plugins"] == "./deploy/rabbitmq/enabled_plugins"
    conf_targets = [t for t, s in mounts.items() if s == "./deploy/rabbitmq/rabbitmq.conf"]
    assert conf_targets and conf_targets[0].startswith("/etc/rabbitmq/conf.d/")
    assert mounts["/var/lib/rabbitmq"] in compose["volumes"]
    assert any(port.endswith(":15672") for port in rabbit["ports"])


def test_mysql_image_config_and_named_volume(compose: dict[str, Any]) -> None:
    mysql = compose["services"]["mysql"]
    assert re.fullmatch(r"mysql:8(\.\d+)*", mysql["image"])
    mounts = _mounts(mysql)
    assert mounts["/var/lib/mysql"] in compose["volumes"]  # a named volume, not a bind
    cnf = [t for t, s in mounts.items() if s == "./deploy/mysql/my.cnf"]
    assert cnf and cnf[0].startswith("/etc/mysql/conf.d/") and cnf[0].endswith(".cnf")
    assert "ports" not in mysql


def test_ses_emulator_is_moto_server(services: dict[str, Any]) -> None:
    ses = services["ses"]
    assert ses["image"].startswith("motoserver/moto")
    args = [*ses.get("entrypoint", []), *ses.get("command", [])]
    assert args[0] == "moto_server"
    assert args[args.index("-p") + 1] == "5000"
    assert args[args.index("-H") + 1] == "0.0.0.0"


def test_ses_emulator_verifies_the_stack_senders(tmp_path: Path) -> None:
    """moto rejects unverified senders: the emulator's healthcheck verifies STACK_SES_SENDERS
    (default example.com) in the app's region. Run here against a real moto server."""
    ses_emulator = pytest.importorskip("ses_emulator")
    env = {"STACK_SES_SENDERS": "example.com, ops@corp.test", "AWS_REGION": "eu-west-1"}
    check = _load(env)["services"]["ses"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python3", "-c"]
    assert _load({})["services"]["ses"]["healthcheck"]["test"][3].count('"example.com"') == 1
    emulator = ses_emulator.SesEmulator.start_sync()
    try:
        script = check[3].replace("http://127.0.0.1:5000", emulator.moto_url)
        ran = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert ran.returncode == 0, ran.stderr
        import boto3

        ses = boto3.client(
            "ses",
            endpoint_url=emulator.moto_url,
            region_name="eu-west-1",
            aws_access_key_id="other",
            aws_secret_access_key="other",
        )
        assert set(ses.list_identities()["Identities"]) == {"example.com", "ops@corp.test"}
    finally:
        emulator.stop()


def test_bind_mounted_files_exist(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        for target, source in _mounts(spec).items():
            if source.startswith("."):
                assert (ROOT / source).is_file(), f"{name}: {source} -> {target} is missing"


def test_mysql_config_is_utf8mb4_utc_strict() -> None:
    parser = configparser.ConfigParser(allow_no_value=True, interpolation=None, strict=True)
    parser.read(ROOT / "deploy" / "mysql" / "my.cnf")
    server = {key.replace("_", "-"): value for key, value in parser["mysqld"].items()}
    assert server["character-set-server"] == "utf8mb4"
    assert server["collation-server"].startswith("utf8mb4_")
    assert server["default-time-zone"].strip("'\"") == "+00:00"
    modes = set(server["sql-mode"].strip("'\"").split(","))
    assert {"STRICT_TRANS_TABLES", "NO_ZERO_DATE", "ERROR_FOR_DIVISION_BY_ZERO"} <= modes
    assert server["innodb-flush-log-at-trx-commit"] == "1"
    assert "innodb-buffer-pool-size" in server
    assert parser["client"]["default-character-set"] == "utf8mb4"


def _rabbitmq_conf() -> dict[str, str]:
    conf = {}
    for line in (ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, sep, value = line.partition("=")
            assert sep, f"not a key = value line: {line!r}"
            assert key.strip() not in conf, f"{key.strip()} set twice"
            conf[key.strip()] = value.strip()
    return conf


def test_rabbitmq_config_limits() -> None:
    conf = _rabbitmq_conf()
    assert 60_000 <= int(conf["consumer_timeout"]) <= 3_600_000
    assert 0.2 <= float(conf["vm_memory_high_watermark.relative"]) <= 0.8
    assert re.fullmatch(r"\d+(\.\d+)?\s*(GB|GiB|MB|MiB)", conf["disk_free_limit.absolute"])
    assert conf["loopback_users.guest"] == "true"
    assert conf["management.tcp.port"] == "15672"
    # No credentials in the repository: the compose file passes them by environment.
    assert not {"default_user", "default_pass"} & set(conf)


def test_rabbitmq_plugins() -> None:
    text = (ROOT / "deploy" / "rabbitmq" / "enabled_plugins").read_text().strip()
    match = re.fullmatch(r"\[([a-z_,\s]*)\]\.", text)
    assert match, "enabled_plugins must be one Erlang list term ending in '.'"
    plugins = {name.strip() for name in match.group(1).split(",")}
    assert "rabbitmq_management" in plugins


# --- the image ---------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            result.append((op.upper(), rest.strip()))
    return result


def test_dockerfile_is_multi_stage_slim_non_root() -> None:
    instructions = _dockerfile_instructions()
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    stages = [_substitute(rest, args).split()[0] for op, rest in instructions if op == "FROM"]
    assert len(stages) >= 2
    assert all(image.startswith("python:3.11-slim") for image in stages)
    final_stage = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    users = [rest for op, rest in instructions[final_stage:] if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    copies = [rest for op, rest in instructions[final_stage:] if op == "COPY"]
    assert any(rest.startswith("--from=") for rest in copies)


def test_dockerfile_entrypoint_and_no_healthcheck() -> None:
    instructions = _dockerfile_instructions()
    ops = [op for op, _ in instructions]
    assert "HEALTHCHECK" not in ops
    entrypoint = [rest for op, rest in instructions if op == "ENTRYPOINT"]
    cmd = [rest for op, rest in instructions if op == "CMD"]
    assert yaml.safe_load(entrypoint[-1]) == ["queue-server"]
    assert yaml.safe_load(cmd[-1]) == ["gateway"]


def test_dockerfile_installs_runtime_deps_only() -> None:
    runs = " ".join(rest for op, rest in _dockerfile_instructions() if op == "RUN")
    installs = re.findall(r"pip install ([^&;]*)", runs)
    assert installs
    for args in installs:
        assert "[dev]" not in args and "-e " not in args and "--editable" not in args
        assert args.split()[-1] == "."


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".git", ".venv"} <= patterns
    for needed in ("pyproject.toml", "gateway", "workers", "shared", "schemas"):
        assert needed not in patterns


# --- the Compose binaries themselves -------------------------------------------------------------


def _compose_binaries() -> list[Any]:
    params = []
    for argv in (["docker-compose"], ["docker", "compose"]):
        available = shutil.which(argv[0]) is not None
        if available and argv[0] == "docker":
            probe = subprocess.run([*argv, "version"], capture_output=True, check=False)
            available = probe.returncode == 0
        params.append(
            pytest.param(
                argv,
                id=" ".join(argv),
                marks=pytest.mark.skipif(not available, reason=f"{' '.join(argv)} not installed"),
            )
        )
    return params


def _run_config(argv: list[str], env_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # A clean environment and an explicit --env-file: neither the caller's shell nor a
    # developer's ./.env may decide the result.
    clean_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(env_file.parent)}
    return subprocess.run(
        [*argv, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", *extra],
        capture_output=True,
        text=True,
        env=clean_env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("argv", _compose_binaries())
def test_compose_binary_accepts_the_file_without_env(argv: list[str], tmp_path: Path) -> None:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    result = _run_config(argv, env_file, "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv", _compose_binaries())
def test_compose_binary_resolves_env_like_the_structural_checks(
    argv: list[str], tmp_path: Path
) -> None:
    env_file = tmp_path / "host-style.env"
    env_file.write_text(
        "ADMIN_API_KEY=admin-key-from-dotenv-0001\n"
        "LOG_LEVEL=DEBUG\n"
        "MYSQL_HOST=127.0.0.1\n"
        "MYSQL_USER=root\n"
        "RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/\n"
        "PORT=4000\n"
    )
    result = _run_config(argv, env_file)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]

    gateway = resolved["gateway"]
    assert [str(port["published"]) for port in gateway["ports"]] == ["4000"]
    assert [int(port["target"]) for port in gateway["ports"]] == [3852]
    env = gateway["environment"]
    assert env["ADMIN_API_KEY"] == "admin-key-from-dotenv-0001"  # passed through from .env
    assert env["LOG_LEVEL"] == "DEBUG"
    assert env["MYSQL_HOST"] == "mysql"  # ...but never the host-style connection settings
    assert env["MYSQL_USER"] == resolved["mysql"]["environment"]["MYSQL_USER"] != "root"
    assert urlsplit(env["RABBITMQ_URL"]).hostname == "rabbitmq"
    for name in WORKERS:
        assert resolved[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
        assert "ports" not in resolved[name]


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    included = {name.rstrip("*") for name in packages["packages"]["find"]["include"]}
    copied = {
        rest.split()[0].rstrip("/") for op, rest in _dockerfile_instructions() if op == "COPY"
    }
    assert included <= copied
