"""Settings: strict casting, one-line errors with exit code 2, dependent defaults."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor import settings as settings_module
from conveyor.settings import (
    ContainerType,
    DbType,
    ExecutionMode,
    RedisType,
    Settings,
    SettingsError,
)

EXTERNAL = {
    "AP_REDIS_URL": "redis://127.0.0.1:6379/0",
    "AP_POSTGRES_URL": "postgresql://postgres@127.0.0.1:5432/test",
}


def test_defaults_follow_the_design() -> None:
    """With nothing set: WORKER_AND_APP on 127.0.0.1:8080, embedded Redis and PostgreSQL."""
    s = Settings.from_env({})
    assert s.container_type is ContainerType.WORKER_AND_APP
    assert (s.host, s.port, s.worker_concurrency) == ("127.0.0.1", 8080, 1)
    assert s.db_type is DbType.EMBEDDED and s.redis_type is RedisType.EMBEDDED
    assert s.execution_mode is ExecutionMode.SANDBOX_CODE_ONLY
    assert s.queue_max_length == 100_000 and s.metrics_port is None
    expected = Path("/var/lib/conveyor") if os.geteuid() == 0 else Path("~/.conveyor").expanduser()
    assert s.config_path == expected


def test_dependent_defaults() -> None:
    """AP_DB_TYPE/AP_REDIS_TYPE follow the URLs; a WORKER gets metrics port 9090."""
    s = Settings.from_env(
        {**EXTERNAL, "AP_CONTAINER_TYPE": "WORKER", "AP_ENCRYPTION_KEY": "a" * 32}
    )
    assert s.db_type is DbType.POSTGRES and s.redis_type is RedisType.STANDALONE
    assert s.metrics_port == 9090
    sentinel = Settings.from_env({"AP_REDIS_SENTINEL_HOSTS": "127.0.0.1:26379,[::1]:26380"})
    assert sentinel.redis_type is RedisType.SENTINEL
    assert sentinel.redis_sentinel_hosts == (("127.0.0.1", 26379), ("::1", 26380))


def test_postgres_parts_build_a_url() -> None:
    """AP_POSTGRES_HOST/PORT/DATABASE/USERNAME/PASSWORD make a URL, password quoted."""
    s = Settings.from_env(
        {
            "AP_POSTGRES_HOST": "db",
            "AP_POSTGRES_PORT": "6432",
            "AP_POSTGRES_DATABASE": "ap",
            "AP_POSTGRES_USERNAME": "u",
            "AP_POSTGRES_PASSWORD": "p@ss",
            "AP_ENCRYPTION_KEY": "ab" * 16,
        }
    )
    assert s.postgres_url == "postgresql://u:p%40ss@db:6432/ap"
    assert s.db_type is DbType.POSTGRES
    assert "p%40ss" not in s.effective()["AP_POSTGRES_URL"]


def test_legacy_sandboxed_mode() -> None:
    """AP_EXECUTION_MODE=SANDBOXED is the legacy name of SANDBOX_PROCESS."""
    assert Settings.from_env({"AP_EXECUTION_MODE": "SANDBOXED"}).execution_mode is (
        ExecutionMode.SANDBOX_PROCESS
    )


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"AP_CONTAINER_TYPE": "BOTH"}, "AP_CONTAINER_TYPE='BOTH' is invalid: expected one of"),
        (
            {"AP_WORKER_CONCURRENCY": "-1"},
            "AP_WORKER_CONCURRENCY='-1' is invalid: expected an integer",
        ),
        ({"AP_POSTGRES_POOL_SIZE": "abc"}, "AP_POSTGRES_POOL_SIZE='abc' is invalid"),
        ({"AP_REDIS_URL": "http://x"}, "AP_REDIS_URL='http://x' is invalid: expected a URL"),
        ({"AP_POSTGRES_URL": "postgres://h:99999/db"}, "AP_POSTGRES_URL='postgres://h:99999/db'"),
        ({"AP_PORT": "0"}, "AP_PORT='0' is invalid: expected an integer from 1 to 65535"),
        ({"AP_PM2_ENABLED": "maybe"}, "AP_PM2_ENABLED='maybe' is invalid: expected true or false"),
        ({"AP_ENCRYPTION_KEY": "xyz"}, "AP_ENCRYPTION_KEY is invalid (length 3)"),
        ({"AP_SSRF_ALLOW_LIST": "10.0.0.0/8,bad host"}, "AP_SSRF_ALLOW_LIST="),
        ({"AP_LOG_LEVEL": "loud"}, "AP_LOG_LEVEL='loud' is invalid"),
        (
            {"AP_CONTAINER_TYPE": "APP"},
            "needs shared servers: set AP_REDIS_URL and AP_POSTGRES_URL",
        ),
        (
            {"AP_CONTAINER_TYPE": "WORKER", "AP_REDIS_URL": "redis://127.0.0.1"},
            "needs shared servers: set AP_POSTGRES_URL",
        ),
        ({"AP_HOST": "0.0.0.0"}, "set AP_API_KEY"),
        ({"AP_HOST": "0.0.0.0", "AP_API_KEY": "k"}, "set AP_QUEUE_UI_USERNAME and"),
        ({"AP_REDIS_TYPE": "CLUSTER"}, "AP_REDIS_TYPE=CLUSTER needs AP_REDIS_URL"),
        ({**EXTERNAL, "AP_CONTAINER_TYPE": "APP"}, "AP_ENCRYPTION_KEY is required"),
        (EXTERNAL, "AP_ENCRYPTION_KEY is required with an external PostgreSQL"),
    ],
)
def test_bad_values_name_variable_and_allowed(env: dict[str, str], needle: str) -> None:
    """Each bad value raises one line naming the variable, the value and what is allowed."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_non_loopback_bind_allowed_with_credentials() -> None:
    """0.0.0.0 is accepted once the API key and board credentials are set (or board off)."""
    s = Settings.from_env({"AP_HOST": "0.0.0.0", "AP_API_KEY": "k", "AP_QUEUE_UI_ENABLED": "false"})
    assert not s.loopback_bind
    Settings.from_env(
        {
            "AP_HOST": "0.0.0.0",
            "AP_API_KEY": "k",
            "AP_QUEUE_UI_USERNAME": "a",
            "AP_QUEUE_UI_PASSWORD": "b",
        }
    )


def test_config_masks_secrets() -> None:
    """`effective()` lists every AP_ variable and never shows a secret."""
    s = Settings.from_env({"AP_API_KEY": "topsecret", "AP_ENCRYPTION_KEY": "ab" * 16})
    shown = s.effective()
    assert shown["AP_API_KEY"] == "****" and shown["AP_ENCRYPTION_KEY"] == "****"
    assert "topsecret" not in repr(shown)
    assert len(shown) >= 40


@pytest.mark.parametrize("value", ["BOTH", "worker_and_ap"])
def test_cli_exits_2_with_one_line(value: str) -> None:
    """`conveyor config` with a bad value: exit 2, one stderr line, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AP_")}
    env["AP_CONTAINER_TYPE"] = value
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "AP_CONTAINER_TYPE" in lines[0] and value in lines[0]
    assert "Traceback" not in proc.stderr


FIELDS = dataclasses.fields(Settings)


def test_each_variable_is_declared_once() -> None:
    """Every field names its variable, kind and help once; settings.py spells each name once."""
    names = [f.metadata["env"] for f in FIELDS]
    assert len(names) == len(set(names)) and all(n.startswith("AP_") for n in names)
    assert all(f.metadata["kind"] is not None and f.metadata["help"] for f in FIELDS)
    source = Path(settings_module.__file__).read_text()
    literals = [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    assert {n: literals.count(n) for n in names} == dict.fromkeys(names, 1)


@pytest.mark.parametrize(
    "field",
    [f for f in FIELDS if f.metadata["kind"].minimum is not None],
    ids=lambda f: f.metadata["env"],
)
def test_integer_bounds_come_from_the_declaration(field: dataclasses.Field[int]) -> None:
    """An integer below its declared minimum (or above its maximum) is refused by name."""
    kind, env = field.metadata["kind"], field.metadata["env"]
    base = {"AP_WORKER_HEARTBEAT_SECONDS": "1"} if env != "AP_WORKER_HEARTBEAT_SECONDS" else {}
    assert getattr(Settings.from_env({**base, env: str(kind.minimum)}), field.name) == kind.minimum
    outside = [kind.minimum - 1] + ([kind.maximum + 1] if kind.maximum is not None else [])
    for value in outside:
        with pytest.raises(SettingsError) as info:
            Settings.from_env({**base, env: str(value)})
        assert str(info.value).startswith(f"{env}='{value}' is invalid: expected an integer")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("https://hooks.example.test/?a=1", "'https://hooks.example.test/?a=1'"),
        ("https://hooks.example.test/#frag", "'https://hooks.example.test/#frag'"),
        ("https://hooks.example.test?", "'https://hooks.example.test?'"),
        ("https://user:pw-s3cret@hooks.example.test", "'https://***@hooks.example.test'"),
        ("https://user@hooks.example.test/base", "'https://***@hooks.example.test/base'"),
    ],
)
def test_frontend_url_refuses_query_fragment_and_credentials(value: str, shown: str) -> None:
    """AP_FRONTEND_URL is the base of every webhook URL the board shows: a query, a fragment
    or a user:password would end up inside them (or on screen), so the setting refuses them,
    naming the variable and never echoing the password."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"AP_FRONTEND_URL": value})
    message = str(info.value)
    assert message.startswith(f"AP_FRONTEND_URL={shown} is invalid: "), message
    assert "without a query (?), fragment (#) or user:password@" in message
    assert "pw-s3cret" not in message and "user" not in message.partition(" is invalid")[0]


def test_frontend_url_with_a_path_is_kept() -> None:
    s = Settings.from_env({"AP_FRONTEND_URL": "https://hooks.example.test:8443/base/"})
    assert s.frontend_url == "https://hooks.example.test:8443/base/"
