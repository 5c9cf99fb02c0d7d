"""Every ``AP_*`` variable, read once into one frozen :class:`Settings` object.

Nothing else in Conveyor reads ``os.environ``. :meth:`Settings.from_env` casts strictly and
raises :class:`SettingsError` naming the variable, the value and what is allowed; the CLI turns
that into one line on stderr and exit code 2. Defaults that depend on other variables
(``AP_DB_TYPE``, ``AP_REDIS_TYPE``, ``AP_CONFIG_PATH``) are described in docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from conveyor.errors import ConfigError

_T = TypeVar("_T")


class SettingsError(ConfigError):
    """A variable has a value Conveyor cannot use; the message is one line for the operator."""


class ContainerType(StrEnum):
    WORKER_AND_APP = "WORKER_AND_APP"
    APP = "APP"
    WORKER = "WORKER"

    @property
    def runs_app(self) -> bool:
        return self is not ContainerType.WORKER

    @property
    def runs_worker(self) -> bool:
        return self is not ContainerType.APP


class DbType(StrEnum):
    POSTGRES = "POSTGRES"
    EMBEDDED = "EMBEDDED"


class RedisType(StrEnum):
    STANDALONE = "STANDALONE"
    SENTINEL = "SENTINEL"
    CLUSTER = "CLUSTER"
    EMBEDDED = "EMBEDDED"


class ExecutionMode(StrEnum):
    UNSANDBOXED = "UNSANDBOXED"
    SANDBOX_CODE_ONLY = "SANDBOX_CODE_ONLY"
    SANDBOX_PROCESS = "SANDBOX_PROCESS"
    SANDBOX_CODE_AND_PROCESS = "SANDBOX_CODE_AND_PROCESS"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


#: Variables whose values ``conveyor config`` masks.
SECRET_FIELDS = frozenset({"api_key", "encryption_key", "queue_ui_password"})

_FIELD_VARS: dict[str, str] = {}


def _var(name: str, **kwargs: Any) -> Any:
    """Declare a field bound to environment variable ``name`` (recorded in field metadata)."""
    return dataclasses.field(metadata={"env": name}, **kwargs)


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration of one Conveyor process (docs/configuration.md lists every variable).

    Build it with :meth:`from_env`; the constructor performs no validation of its own.
    Durations carry their unit in the name (``*_seconds``, ``*_ms``), so do sizes (``*_mb``).
    """

    container_type: ContainerType = _var("AP_CONTAINER_TYPE", default=ContainerType.WORKER_AND_APP)
    worker_concurrency: int = _var("AP_WORKER_CONCURRENCY", default=1)
    pm2_enabled: bool = _var("AP_PM2_ENABLED", default=False)
    pm2_instances: int | None = _var("AP_PM2_INSTANCES", default=None)
    host: str = _var("AP_HOST", default="127.0.0.1")
    port: int = _var("AP_PORT", default=8080)
    db_type: DbType = _var("AP_DB_TYPE", default=DbType.EMBEDDED)
    postgres_url: str | None = _var("AP_POSTGRES_URL", default=None)
    postgres_pool_size: int = _var("AP_POSTGRES_POOL_SIZE", default=10)
    postgres_idle_timeout_ms: int = _var("AP_POSTGRES_IDLE_TIMEOUT_MS", default=300_000)
    postgres_read_replica_urls: tuple[str, ...] = _var("AP_POSTGRES_READ_REPLICA_URL", default=())
    postgres_use_pgbouncer: bool = _var("AP_POSTGRES_USE_PGBOUNCER", default=False)
    redis_type: RedisType = _var("AP_REDIS_TYPE", default=RedisType.EMBEDDED)
    redis_url: str | None = _var("AP_REDIS_URL", default=None)
    redis_sentinel_hosts: tuple[tuple[str, int], ...] = _var("AP_REDIS_SENTINEL_HOSTS", default=())
    redis_sentinel_name: str = _var("AP_REDIS_SENTINEL_NAME", default="mymaster")
    redis_sentinel_role: str = _var("AP_REDIS_SENTINEL_ROLE", default="master")
    queue_shards: int = _var("AP_QUEUE_SHARDS", default=1)
    queue_max_length: int = _var("AP_QUEUE_MAX_LENGTH", default=100_000)
    queue_visibility_timeout_seconds: int = _var("AP_QUEUE_VISIBILITY_TIMEOUT_SECONDS", default=6)
    worker_heartbeat_seconds: int = _var("AP_WORKER_HEARTBEAT_SECONDS", default=2)
    worker_drain_seconds: int = _var("AP_WORKER_DRAIN_SECONDS", default=25)
    redis_key_prefix: str = _var("AP_REDIS_KEY_PREFIX", default="conveyor")
    redis_failed_job_retention_days: int = _var("AP_REDIS_FAILED_JOB_RETENTION_DAYS", default=30)
    redis_failed_job_retention_max_count: int = _var(
        "AP_REDIS_FAILED_JOB_RETENTION_MAX_COUNT", default=100_000
    )
    redis_completed_job_retention_max_count: int = _var(
        "AP_REDIS_COMPLETED_JOB_RETENTION_MAX_COUNT", default=1000
    )
    execution_data_retention_days: int = _var("AP_EXECUTION_DATA_RETENTION_DAYS", default=30)
    queue_ui_enabled: bool = _var("AP_QUEUE_UI_ENABLED", default=True)
    queue_ui_username: str | None = _var("AP_QUEUE_UI_USERNAME", default=None)
    queue_ui_password: str | None = _var("AP_QUEUE_UI_PASSWORD", default=None)
    api_key: str | None = _var("AP_API_KEY", default=None)
    frontend_url: str | None = _var("AP_FRONTEND_URL", default=None)
    queue_ui_allowed_hosts: tuple[str, ...] = _var("AP_QUEUE_UI_ALLOWED_HOSTS", default=())
    webhook_legacy_signatures: bool = _var("AP_WEBHOOK_LEGACY_SIGNATURES", default=False)
    encryption_key: str | None = _var("AP_ENCRYPTION_KEY", default=None)
    execution_mode: ExecutionMode = _var(
        "AP_EXECUTION_MODE", default=ExecutionMode.SANDBOX_CODE_ONLY
    )
    sandbox_memory_limit_kb: int = _var("AP_SANDBOX_MEMORY_LIMIT", default=1_048_576)
    sandbox_allow_partial_isolation: bool = _var(
        "AP_SANDBOX_ALLOW_PARTIAL_ISOLATION", default=False
    )
    flow_timeout_seconds: int = _var("AP_FLOW_TIMEOUT_SECONDS", default=600)
    trigger_timeout_seconds: int = _var("AP_TRIGGER_TIMEOUT_SECONDS", default=60)
    webhook_timeout_seconds: int = _var("AP_WEBHOOK_TIMEOUT_SECONDS", default=30)
    max_webhook_payload_size_mb: int = _var("AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB", default=25)
    max_flow_run_log_size_mb: int = _var("AP_MAX_FLOW_RUN_LOG_SIZE_MB", default=50)
    pieces_cache_max_entries: int = _var("AP_PIECES_CACHE_MAX_ENTRIES", default=1000)
    prewarm_cache_on_startup: bool = _var("AP_PREWARM_CACHE_ON_STARTUP", default=True)
    ssrf_protection_enabled: bool = _var("AP_SSRF_PROTECTION_ENABLED", default=True)
    ssrf_allow_list: tuple[str, ...] = _var("AP_SSRF_ALLOW_LIST", default=())
    config_path: Path = _var("AP_CONFIG_PATH", default=Path("~/.conveyor"))
    metrics_port: int | None = _var("AP_METRICS_PORT", default=None)
    log_level: LogLevel = _var("AP_LOG_LEVEL", default=LogLevel.INFO)
    log_pretty: bool = _var("AP_LOG_PRETTY", default=False)

    # ------------------------------------------------------------------ derived
    @property
    def embedded_redis(self) -> bool:
        return self.redis_type is RedisType.EMBEDDED

    @property
    def embedded_postgres(self) -> bool:
        return self.db_type is DbType.EMBEDDED

    @property
    def max_webhook_payload_bytes(self) -> int:
        return self.max_webhook_payload_size_mb * 1024 * 1024

    @property
    def max_flow_run_log_bytes(self) -> int:
        return self.max_flow_run_log_size_mb * 1024 * 1024

    @property
    def loopback_bind(self) -> bool:
        return is_loopback_host(self.host)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (used once the embedded servers know their URLs)."""
        return dataclasses.replace(self, **changes)

    def effective(self) -> dict[str, str]:
        """``{AP_VARIABLE: value}`` for ``conveyor config``, secrets masked."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                shown = "****"
            elif value is None:
                shown = ""
            elif isinstance(value, tuple):
                shown = ",".join(
                    f"{v[0]}:{v[1]}" if isinstance(v, tuple) else _mask_url(str(v)) for v in value
                )
            elif f.name in ("postgres_url", "redis_url"):
                shown = _mask_url(str(value))
            elif isinstance(value, bool):
                shown = "true" if value else "false"
            else:
                shown = str(value)
            out[f.metadata["env"]] = shown
        return out

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse ``env`` (default ``os.environ``); the first bad value raises SettingsError."""
        src = dict(os.environ if env is None else env)
        p = _Parser(src)
        values: dict[str, Any] = {}
        values["container_type"] = p.enum("AP_CONTAINER_TYPE", ContainerType)
        values["worker_concurrency"] = p.integer("AP_WORKER_CONCURRENCY", minimum=1, maximum=10_000)
        values["pm2_enabled"] = p.boolean("AP_PM2_ENABLED")
        values["pm2_instances"] = p.integer("AP_PM2_INSTANCES", minimum=1, maximum=1024)
        values["host"] = p.host("AP_HOST")
        values["port"] = p.integer("AP_PORT", minimum=1, maximum=65535)
        values["postgres_url"] = p.postgres_url()
        values["postgres_pool_size"] = p.integer("AP_POSTGRES_POOL_SIZE", minimum=1, maximum=1000)
        values["postgres_idle_timeout_ms"] = p.integer("AP_POSTGRES_IDLE_TIMEOUT_MS", minimum=0)
        values["postgres_read_replica_urls"] = p.url_list(
            "AP_POSTGRES_READ_REPLICA_URL", ("postgres", "postgresql")
        )
        values["postgres_use_pgbouncer"] = p.boolean("AP_POSTGRES_USE_PGBOUNCER")
        values["redis_url"] = p.url("AP_REDIS_URL", ("redis", "rediss", "unix"))
        values["redis_sentinel_hosts"] = p.host_ports("AP_REDIS_SENTINEL_HOSTS")
        values["redis_sentinel_name"] = p.text("AP_REDIS_SENTINEL_NAME")
        values["redis_sentinel_role"] = p.choice("AP_REDIS_SENTINEL_ROLE", ("master", "slave"))
        if values["redis_sentinel_hosts"]:
            default_redis = RedisType.SENTINEL
        elif values["redis_url"]:
            default_redis = RedisType.STANDALONE
        else:
            default_redis = RedisType.EMBEDDED
        values["redis_type"] = p.enum("AP_REDIS_TYPE", RedisType, default=default_redis)
        has_pg = bool(values["postgres_url"])
        default_db = DbType.POSTGRES if has_pg else DbType.EMBEDDED
        values["db_type"] = p.enum("AP_DB_TYPE", DbType, default=default_db)
        values["queue_shards"] = p.integer("AP_QUEUE_SHARDS", minimum=1, maximum=1024)
        values["queue_max_length"] = p.integer("AP_QUEUE_MAX_LENGTH", minimum=1)
        values["queue_visibility_timeout_seconds"] = p.integer(
            "AP_QUEUE_VISIBILITY_TIMEOUT_SECONDS", minimum=2, maximum=3600
        )
        values["worker_heartbeat_seconds"] = p.integer(
            "AP_WORKER_HEARTBEAT_SECONDS", minimum=1, maximum=1800
        )
        values["worker_drain_seconds"] = p.integer(
            "AP_WORKER_DRAIN_SECONDS", minimum=0, maximum=3600
        )
        values["redis_key_prefix"] = p.key_prefix("AP_REDIS_KEY_PREFIX")
        for name in (
            "AP_REDIS_FAILED_JOB_RETENTION_DAYS",
            "AP_REDIS_FAILED_JOB_RETENTION_MAX_COUNT",
            "AP_REDIS_COMPLETED_JOB_RETENTION_MAX_COUNT",
            "AP_EXECUTION_DATA_RETENTION_DAYS",
            "AP_PIECES_CACHE_MAX_ENTRIES",
        ):
            values[_field_for(name)] = p.integer(name, minimum=0)
        values["queue_ui_enabled"] = p.boolean("AP_QUEUE_UI_ENABLED")
        values["queue_ui_username"] = p.optional_text("AP_QUEUE_UI_USERNAME")
        values["queue_ui_password"] = p.optional_text("AP_QUEUE_UI_PASSWORD")
        values["api_key"] = p.optional_text("AP_API_KEY")
        values["frontend_url"] = p.url("AP_FRONTEND_URL", ("http", "https"))
        values["queue_ui_allowed_hosts"] = p.allow_list("AP_QUEUE_UI_ALLOWED_HOSTS")
        values["webhook_legacy_signatures"] = p.boolean("AP_WEBHOOK_LEGACY_SIGNATURES")
        values["encryption_key"] = p.encryption_key("AP_ENCRYPTION_KEY")
        values["execution_mode"] = p.execution_mode("AP_EXECUTION_MODE")
        values["sandbox_memory_limit_kb"] = p.integer("AP_SANDBOX_MEMORY_LIMIT", minimum=16_384)
        values["sandbox_allow_partial_isolation"] = p.boolean("AP_SANDBOX_ALLOW_PARTIAL_ISOLATION")
        for name in (
            "AP_FLOW_TIMEOUT_SECONDS",
            "AP_TRIGGER_TIMEOUT_SECONDS",
            "AP_WEBHOOK_TIMEOUT_SECONDS",
            "AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB",
            "AP_MAX_FLOW_RUN_LOG_SIZE_MB",
        ):
            values[_field_for(name)] = p.integer(name, minimum=1)
        values["prewarm_cache_on_startup"] = p.boolean("AP_PREWARM_CACHE_ON_STARTUP")
        values["ssrf_protection_enabled"] = p.boolean("AP_SSRF_PROTECTION_ENABLED")
        values["ssrf_allow_list"] = p.allow_list("AP_SSRF_ALLOW_LIST")
        values["config_path"] = p.path("AP_CONFIG_PATH", default=_default_config_path())
        default_metrics = 9090 if values["container_type"] is ContainerType.WORKER else None
        values["metrics_port"] = p.integer(
            "AP_METRICS_PORT", minimum=1, maximum=65535, default=default_metrics
        )
        values["log_level"] = p.enum("AP_LOG_LEVEL", LogLevel, lower=True)
        values["log_pretty"] = p.boolean("AP_LOG_PRETTY")
        settings = cls(**values)
        settings._check_consistency()
        return settings

    def _check_consistency(self) -> None:
        if 2 * self.worker_heartbeat_seconds > self.queue_visibility_timeout_seconds:
            # Fewer than two beats per timeout: one late beat would let live work be taken over.
            raise SettingsError(
                f"AP_WORKER_HEARTBEAT_SECONDS={self.worker_heartbeat_seconds} is invalid: at "
                "most half of AP_QUEUE_VISIBILITY_TIMEOUT_SECONDS "
                f"({self.queue_visibility_timeout_seconds})"
            )
        if self.redis_type is RedisType.EMBEDDED and self.redis_url:
            raise SettingsError(
                "AP_REDIS_TYPE=EMBEDDED conflicts with AP_REDIS_URL: unset one of them"
            )
        if self.redis_type in (RedisType.STANDALONE, RedisType.CLUSTER) and not self.redis_url:
            raise SettingsError(
                f"AP_REDIS_TYPE={self.redis_type} needs AP_REDIS_URL (redis://host:port/db)"
            )
        if self.redis_type is RedisType.SENTINEL and not self.redis_sentinel_hosts:
            raise SettingsError(
                "AP_REDIS_TYPE=SENTINEL needs AP_REDIS_SENTINEL_HOSTS (host:port,host:port)"
            )
        if self.db_type is DbType.POSTGRES and not self.postgres_url:
            raise SettingsError(
                "AP_DB_TYPE=POSTGRES needs AP_POSTGRES_URL or AP_POSTGRES_HOST/PORT/DATABASE/"
                "USERNAME/PASSWORD"
            )
        if self.db_type is DbType.EMBEDDED and self.postgres_url:
            raise SettingsError(
                "AP_DB_TYPE=EMBEDDED conflicts with AP_POSTGRES_URL/AP_POSTGRES_HOST: unset one"
            )
        if self.container_type is not ContainerType.WORKER_AND_APP and (
            self.embedded_redis or self.embedded_postgres
        ):
            missing = [
                v
                for v, emb in (
                    ("AP_REDIS_URL", self.embedded_redis),
                    ("AP_POSTGRES_URL", self.embedded_postgres),
                )
                if emb
            ]
            raise SettingsError(
                f"AP_CONTAINER_TYPE={self.container_type} needs shared servers: set "
                f"{' and '.join(missing)} (the embedded Redis/PostgreSQL serve only "
                "WORKER_AND_APP)"
            )
        if not self.embedded_postgres and not self.encryption_key:
            # A shared database is shared by several containers: a key generated per container
            # would make one container's secrets unreadable to the others (the key
            # is generated for the embedded default only).
            raise SettingsError(
                "AP_ENCRYPTION_KEY is required with an external PostgreSQL: set the same 32 or "
                "64 hex characters in every container"
            )
        if not self.loopback_bind:
            if not self.api_key:
                raise SettingsError(
                    f"AP_HOST={self.host} is not a loopback address: set AP_API_KEY so the API "
                    "is not open to the network"
                )
            if self.queue_ui_enabled and not (self.queue_ui_username and self.queue_ui_password):
                raise SettingsError(
                    f"AP_HOST={self.host} is not a loopback address: set AP_QUEUE_UI_USERNAME and "
                    "AP_QUEUE_UI_PASSWORD, or AP_QUEUE_UI_ENABLED=false"
                )
        if bool(self.queue_ui_username) != bool(self.queue_ui_password):
            raise SettingsError(
                "AP_QUEUE_UI_USERNAME and AP_QUEUE_UI_PASSWORD must be set together"
            )


def _field_for(env_name: str) -> str:
    if not _FIELD_VARS:
        for f in dataclasses.fields(Settings):
            _FIELD_VARS[f.metadata["env"]] = f.name
    return _FIELD_VARS[env_name]


def _default_for(env_name: str) -> Any:
    for f in dataclasses.fields(Settings):
        if f.metadata["env"] == env_name:
            return f.default
    raise KeyError(env_name)


def _default_config_path() -> Path:
    # As root, keep data out of /root: embedded PostgreSQL runs as an unprivileged user and
    # must be able to traverse the data dir's parents, and /root must stay 0700.
    if os.geteuid() == 0:
        return Path("/var/lib/conveyor")
    return Path("~/.conveyor").expanduser()


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (what a non-networked bind looks like)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":****@")
        return parts._replace(netloc=netloc).geturl()
    return url


# Labels separated by dots (each dot required: an optional one makes the regex backtrack
# exponentially on a typo such as a trailing ":8443").
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}\.?$){_LABEL}(?:\.{_LABEL})*\.?$")


class _Parser:
    """Strict casts over one environment mapping; every error names the variable."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def _fail(self, name: str, value: str, allowed: str) -> SettingsError:
        return SettingsError(f"{name}={value!r} is invalid: {allowed}")

    def _cast(self, name: str, allowed: str, fn: Callable[[str], _T], default: Any) -> _T:
        value = self.raw(name)
        if value is None:
            return default  # type: ignore[no-any-return]
        try:
            return fn(value)
        except (ValueError, KeyError):
            raise self._fail(name, value, allowed) from None

    def integer(
        self,
        name: str,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
        default: Any = dataclasses.MISSING,
    ) -> Any:
        if default is dataclasses.MISSING:
            default = _default_for(name)
        bounds = "an integer"
        if minimum is not None and maximum is not None:
            bounds = f"an integer from {minimum} to {maximum}"
        elif minimum is not None:
            bounds = f"an integer >= {minimum}"

        def cast(v: str) -> int:
            if not re.fullmatch(r"[+-]?\d+", v):
                raise ValueError(v)
            n = int(v)
            if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
                raise ValueError(v)
            return n

        return self._cast(name, f"expected {bounds}", cast, default)

    def boolean(self, name: str) -> bool:
        table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        return self._cast(
            name, "expected true or false", lambda v: table[v.lower()], _default_for(name)
        )

    def enum(
        self, name: str, enum: type[StrEnum], *, default: Any = None, lower: bool = False
    ) -> Any:
        allowed = " | ".join(m.value for m in enum)
        dflt = _default_for(name) if default is None else default

        def cast(v: str) -> StrEnum:
            return enum(v.lower() if lower else v.upper())

        return self._cast(name, f"expected one of {allowed}", cast, dflt)

    def execution_mode(self, name: str) -> ExecutionMode:
        allowed = " | ".join(m.value for m in ExecutionMode) + " (legacy SANDBOXED)"

        def cast(v: str) -> ExecutionMode:
            v = v.upper()
            return ExecutionMode.SANDBOX_PROCESS if v == "SANDBOXED" else ExecutionMode(v)

        return self._cast(name, f"expected one of {allowed}", cast, _default_for(name))

    def choice(self, name: str, options: tuple[str, ...]) -> str:
        def cast(v: str) -> str:
            if v.lower() not in options:
                raise ValueError(v)
            return v.lower()

        return self._cast(name, f"expected one of {' | '.join(options)}", cast, _default_for(name))

    def text(self, name: str) -> str:
        return self.raw(name) or str(_default_for(name))

    def optional_text(self, name: str) -> str | None:
        return self.raw(name)

    def key_prefix(self, name: str) -> str:
        def cast(v: str) -> str:
            # No braces: the prefix sits outside every key's {hash tag}.
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", v):
                raise ValueError(v)
            return v

        allowed = "expected 1-64 characters of A-Z a-z 0-9 _ . : - (starting alphanumeric)"
        return self._cast(name, allowed, cast, _default_for(name))

    def host(self, name: str) -> str:
        def cast(v: str) -> str:
            bare = v.strip("[]")
            try:
                ipaddress.ip_address(bare)
                return bare
            except ValueError:
                if _HOSTNAME.match(v):
                    return v
                raise

        return self._cast(name, "expected an IP address or host name", cast, _default_for(name))

    def url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        def cast(v: str) -> str:
            parts = urlsplit(v)
            if parts.scheme not in schemes:
                raise ValueError(v)
            # A PostgreSQL URL may name a unix-socket directory in ?host= instead.
            if parts.scheme != "unix" and not parts.hostname and "host=" not in parts.query:
                raise ValueError(v)
            _ = parts.port  # raises ValueError on a malformed port
            return v

        allowed = f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}"
        return self._cast(name, allowed, cast, None)

    def url_list(self, name: str, schemes: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        out = []
        for item in (i.strip() for i in value.split(",")):
            if not item:
                continue
            single = _Parser({name: item}).url(name, schemes)
            if single is None:
                raise self._fail(name, value, "expected comma-separated URLs")
            out.append(single)
        return tuple(out)

    def postgres_url(self) -> str | None:
        url = self.url("AP_POSTGRES_URL", ("postgres", "postgresql"))
        if url:
            return url
        host = self.raw("AP_POSTGRES_HOST")
        if host is None:
            return None
        port = self.integer("AP_POSTGRES_PORT", minimum=1, maximum=65535, default=5432)
        database = self.raw("AP_POSTGRES_DATABASE") or "conveyor"
        user = self.raw("AP_POSTGRES_USERNAME") or "postgres"
        password = self.raw("AP_POSTGRES_PASSWORD")
        auth = quote(user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        hostpart = f"[{host}]" if ":" in host else host
        return f"postgresql://{auth}@{hostpart}:{port}/{quote(database, safe='')}"

    def host_ports(self, name: str) -> tuple[tuple[str, int], ...]:
        value = self.raw(name)
        if value is None:
            return ()
        out = []
        for item in (i.strip() for i in value.split(",")):
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise self._fail(name, value, "expected comma-separated host:port pairs")
            out.append((host.strip("[]"), int(port)))
        return tuple(out)

    def allow_list(self, name: str) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        out = []
        for item in (i.strip() for i in value.split(",")):
            if not item:
                continue
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                if not _HOSTNAME.match(item):
                    raise self._fail(
                        name, value, "expected comma-separated host names, IPs or CIDRs"
                    ) from None
            out.append(item.lower())
        return tuple(out)

    def encryption_key(self, name: str) -> str | None:
        def cast(v: str) -> str:
            if len(v) not in (32, 64) or not re.fullmatch(r"[0-9a-fA-F]+", v):
                raise ValueError(v)
            return v.lower()

        value = self.raw(name)
        if value is None:
            return None
        try:
            return cast(value)
        except ValueError:
            # Never echo a secret back, even a malformed one.
            raise SettingsError(
                f"{name} is invalid (length {len(value)}): expected 32 or 64 hex characters"
            ) from None

    def path(self, name: str, *, default: Path) -> Path:
        value = self.raw(name)
        return (Path(value) if value else default).expanduser()
