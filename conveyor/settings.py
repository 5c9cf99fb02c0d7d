"""Every ``AP_*`` variable, read once into one frozen :class:`Settings` object.

Nothing else in Conveyor reads ``os.environ``. :meth:`Settings.from_env` casts strictly and
raises :class:`SettingsError` naming the variable, the value and what is allowed; the CLI turns
that into one line on stderr and exit code 2. Defaults that depend on other variables
(``AP_DB_TYPE``, ``AP_REDIS_TYPE``, ``AP_CONFIG_PATH``) are computed by each field's ``derive``.
The variables table of docs/configuration.md is rendered from these declarations by
:mod:`conveyor.settings_doc`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from conveyor.errors import ConfigError
from conveyor.settings_kinds import (
    BOOL,
    COUNT,
    PORT,
    POSITIVE,
    TEXT,
    ItemInvalid,
    Kind,
    allow_list,
    choice,
    enum_of,
    host_ports,
    integer,
    key_prefix,
    public_url,
    url,
    url_list,
)
from conveyor.settings_kinds import (
    encryption_key as hex_key,
)
from conveyor.settings_kinds import (
    host as host_name,
)


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


def _var(
    env: str,
    kind: Kind,
    default: Any,
    help: str,
    *,
    derive: Callable[[Mapping[str, Any]], Any] | None = None,
    default_doc: str | None = None,
) -> Any:
    """Declare a setting: variable ``env`` read as ``kind``; unset, it is ``default`` or, with
    ``derive``, computed from the other settings' values (e.g. ``AP_DB_TYPE`` from the URL).

    ``help`` is the variable's entry in docs/configuration.md (Markdown, rendered by
    :mod:`conveyor.settings_doc`); ``default_doc`` describes the default there when the value
    alone does not say it (derived, generated, or ``None`` meaning something)."""
    metadata = {
        "env": env,
        "kind": kind,
        "help": help,
        "derive": derive,
        "default_doc": default_doc,
    }
    return dataclasses.field(default=default, metadata=metadata)


#: The parts an unset ``AP_POSTGRES_URL`` is built from: ``{part: (variable, default)}``
#: (``""``: none). Parts of that one setting, not settings of their own.
POSTGRES_PARTS: dict[str, tuple[str, str]] = {
    "host": ("AP_POSTGRES_HOST", ""),
    "port": ("AP_POSTGRES_PORT", "5432"),
    "database": ("AP_POSTGRES_DATABASE", "conveyor"),
    "username": ("AP_POSTGRES_USERNAME", "postgres"),
    "password": ("AP_POSTGRES_PASSWORD", ""),
}
POSTGRES_PARTS_HELP = (
    "alternative to `AP_POSTGRES_URL`, which is then "
    "`postgresql://USERNAME:PASSWORD@HOST:PORT/DATABASE` (user name and password quoted)"
)


def _postgres_from_parts(reader: _Reader) -> str | None:
    """``AP_POSTGRES_URL`` built from :data:`POSTGRES_PARTS`, or ``None`` without a host."""

    def part(name: str) -> str:
        env, default = POSTGRES_PARTS[name]
        return reader.raw(env) or default

    host = part("host")
    if not host:
        return None
    env, default = POSTGRES_PARTS["port"]
    port = reader.read(env, PORT, int(default))
    database, user, password = part("database"), part("username"), part("password")
    auth = quote(user, safe="")
    if password:
        auth += ":" + quote(password, safe="")
    hostpart = f"[{host}]" if ":" in host else host
    return f"postgresql://{auth}@{hostpart}:{port}/{quote(database, safe='')}"


def _redis_type(values: Mapping[str, Any]) -> RedisType:
    if values["redis_sentinel_hosts"]:
        return RedisType.SENTINEL
    return RedisType.STANDALONE if values["redis_url"] else RedisType.EMBEDDED


def _default_config_path(values: Mapping[str, Any]) -> Path:
    # As root, keep data out of /root: embedded PostgreSQL runs as an unprivileged user and
    # must be able to traverse the data dir's parents, and /root must stay 0700.
    if os.geteuid() == 0:
        return Path("/var/lib/conveyor")
    return Path("~/.conveyor").expanduser()


_SANDBOX_MODE = enum_of(ExecutionMode, legacy={"SANDBOXED": ExecutionMode.SANDBOX_PROCESS})
_LISTS = "comma-separated host names, IPs or CIDRs"


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration of one Conveyor process (docs/configuration.md lists every
    variable).

    Each field is declared once: its variable, how it is read (type and bounds), its default
    and a line of help, in the field's metadata; :meth:`from_env` reads them all the same way.
    The constructor performs no validation of its own. Durations carry their unit in the name
    (``*_seconds``, ``*_ms``), so do sizes (``*_mb``, ``*_kb``).
    """

    container_type: ContainerType = _var(
        "AP_CONTAINER_TYPE",
        enum_of(ContainerType),
        ContainerType.WORKER_AND_APP,
        (
            "`WORKER_AND_APP` (API + board + workers) | `APP` (API + board) | `WORKER` "
            "(queue consumers, scheduler; health/metrics port only). `APP`/`WORKER` "
            "need external Redis and PostgreSQL."
        ),
    )
    worker_concurrency: int = _var(
        "AP_WORKER_CONCURRENCY",
        integer(1, 10_000),
        1,
        "flow runs one worker process executes at once",
    )
    pm2_enabled: bool = _var(
        "AP_PM2_ENABLED", BOOL, False, "one process per CPU core sharing the port"
    )
    pm2_instances: int | None = _var(
        "AP_PM2_INSTANCES",
        integer(1, 1024),
        None,
        "overrides the process count of `AP_PM2_ENABLED`",
        default_doc="number of cores",
    )
    host: str = _var(
        "AP_HOST",
        Kind(host_name, "expected an IP address or host name"),
        "127.0.0.1",
        (
            "listen address of the API and board; a non-loopback address requires "
            "`AP_API_KEY` and board credentials (or `AP_QUEUE_UI_ENABLED=false`)"
        ),
    )
    port: int = _var("AP_PORT", PORT, 8080, "HTTP port of the API and board")
    db_type: DbType = _var(
        "AP_DB_TYPE",
        enum_of(DbType),
        DbType.EMBEDDED,
        "the database: an external PostgreSQL, or one Conveyor starts itself",
        derive=lambda v: DbType.POSTGRES if v["postgres_url"] else DbType.EMBEDDED,
        default_doc=(
            "`POSTGRES` if `AP_POSTGRES_URL` or `AP_POSTGRES_HOST` is set, else `EMBEDDED`"
        ),
    )
    postgres_url: str | None = _var(
        "AP_POSTGRES_URL",
        url("postgres", "postgresql", fallback=_postgres_from_parts),
        None,
        (
            "the PostgreSQL to use: `postgresql://user:pass@host:port/db` (a "
            "`?host=/socket/dir` URL works too)"
        ),
    )
    postgres_pool_size: int = _var(
        "AP_POSTGRES_POOL_SIZE", integer(1, 1000), 10, "max connections per process"
    )
    postgres_idle_timeout_ms: int = _var(
        "AP_POSTGRES_IDLE_TIMEOUT_MS",
        COUNT,
        300_000,
        "idle pooled connections are closed after this long",
    )
    postgres_read_replica_urls: tuple[str, ...] = _var(
        "AP_POSTGRES_READ_REPLICA_URL",
        url_list("postgres", "postgresql"),
        (),
        (
            "comma-separated replica URLs; listings read there, writes never; a replica "
            "that is down is skipped for 30 s"
        ),
    )
    postgres_use_pgbouncer: bool = _var(
        "AP_POSTGRES_USE_PGBOUNCER",
        BOOL,
        False,
        "no prepared-statement cache (safe with transaction pooling)",
    )
    redis_type: RedisType = _var(
        "AP_REDIS_TYPE",
        enum_of(RedisType),
        RedisType.EMBEDDED,
        (
            "the Redis deployment: one server, Sentinel-managed, a Cluster, or one "
            "Conveyor starts itself"
        ),
        derive=_redis_type,
        default_doc=(
            "`SENTINEL` if `AP_REDIS_SENTINEL_HOSTS`, `STANDALONE` if `AP_REDIS_URL`, "
            "else `EMBEDDED`"
        ),
    )
    redis_url: str | None = _var(
        "AP_REDIS_URL",
        url("redis", "rediss", "unix"),
        None,
        ("the Redis to use: `redis://`, `rediss://` or `unix://`; for `CLUSTER` any seed node"),
    )
    redis_sentinel_hosts: tuple[tuple[str, int], ...] = _var(
        "AP_REDIS_SENTINEL_HOSTS",
        Kind(host_ports, "expected comma-separated host:port pairs"),
        (),
        "the Sentinels, `host:port,host:port`",
    )
    redis_sentinel_name: str = _var(
        "AP_REDIS_SENTINEL_NAME", TEXT, "mymaster", "Sentinel service name"
    )
    redis_sentinel_role: str = _var(
        "AP_REDIS_SENTINEL_ROLE", choice("master", "slave"), "master", "Sentinel role to use"
    )
    queue_shards: int = _var(
        "AP_QUEUE_SHARDS", integer(1, 1024), 1, "streams per queue (hash-tagged for Redis Cluster)"
    )
    queue_max_length: int = _var(
        "AP_QUEUE_MAX_LENGTH",
        POSITIVE,
        100_000,
        "backlog cap; above it webhooks get 429 + `Retry-After: 1`",
    )
    queue_visibility_timeout_seconds: int = _var(
        "AP_QUEUE_VISIBILITY_TIMEOUT_SECONDS",
        integer(2, 3600),
        6,
        (
            "a worker silent this long (killed, hung, cut off) loses its runs to a live "
            "worker; with the defaults a killed worker's runs resume within about 8 s; "
            "after a Redis outage a worker takes over nothing until it has reached "
            "Redis for this + the heartbeat + 1 s, so live runs stay where they are"
        ),
    )
    worker_heartbeat_seconds: int = _var(
        "AP_WORKER_HEARTBEAT_SECONDS",
        integer(1, 1800),
        2,
        (
            "how often a worker tells Redis its runs are still in hand (at most half "
            "the visibility timeout)"
        ),
    )
    worker_drain_seconds: int = _var(
        "AP_WORKER_DRAIN_SECONDS",
        integer(0, 3600),
        25,
        (
            "on SIGTERM, runs still going after this long are stopped and handed back "
            "to the queue at once, resuming on another worker from their last "
            "checkpoint; the queue consumer stops at most 5 s after the drain (up to 4 "
            "s flushing acknowledgements and handing runs back while Redis is "
            "unreachable, 1 s releasing its name; milliseconds otherwise), so keep "
            "drain + 5 s within your orchestrator's kill grace (Kubernetes: 30 s)"
        ),
    )
    redis_key_prefix: str = _var(
        "AP_REDIS_KEY_PREFIX",
        Kind(key_prefix, "expected 1-64 characters of A-Z a-z 0-9 _ . : - (starting alphanumeric)"),
        "conveyor",
        (
            "namespace of every key and channel Conveyor keeps in Redis; two "
            "deployments sharing one Redis database need different prefixes"
        ),
    )
    redis_failed_job_retention_days: int = _var(
        "AP_REDIS_FAILED_JOB_RETENTION_DAYS", COUNT, 30, "dead-lettered jobs kept this long …"
    )
    redis_failed_job_retention_max_count: int = _var(
        "AP_REDIS_FAILED_JOB_RETENTION_MAX_COUNT",
        COUNT,
        100_000,
        "… and at most this many",
    )
    redis_completed_job_retention_max_count: int = _var(
        "AP_REDIS_COMPLETED_JOB_RETENTION_MAX_COUNT",
        COUNT,
        1000,
        "recent completed jobs kept for the board",
    )
    execution_data_retention_days: int = _var(
        "AP_EXECUTION_DATA_RETENTION_DAYS", COUNT, 30, "run history kept in PostgreSQL"
    )
    queue_ui_enabled: bool = _var("AP_QUEUE_UI_ENABLED", BOOL, True, "the board at `/admin/queues`")
    queue_ui_username: str | None = _var(
        "AP_QUEUE_UI_USERNAME",
        TEXT,
        None,
        "HTTP basic-auth user of the board (set both, with `AP_QUEUE_UI_PASSWORD`)",
    )
    queue_ui_password: str | None = _var(
        "AP_QUEUE_UI_PASSWORD",
        TEXT,
        None,
        ("HTTP basic-auth password of the board (set both, with `AP_QUEUE_UI_USERNAME`)"),
    )
    api_key: str | None = _var(
        "AP_API_KEY",
        TEXT,
        None,
        (
            "bearer token for `/api/v1/*` except webhooks; when set, the board requires "
            "credentials too: this key (as the basic-auth password with any user name, "
            "or `Authorization: Bearer`) or the board's own"
        ),
    )
    frontend_url: str | None = _var(
        "AP_FRONTEND_URL",
        public_url("http", "https"),
        None,
        (
            "the public URL of this server (`https://conveyor.example.com`); its host "
            "is accepted by the board (see `AP_QUEUE_UI_ALLOWED_HOSTS`)"
        ),
    )
    queue_ui_allowed_hosts: tuple[str, ...] = _var(
        "AP_QUEUE_UI_ALLOWED_HOSTS",
        Kind(allow_list, f"expected {_LISTS}"),
        (),
        (
            "host names, IPs or CIDRs the board answers to (`Host` and `Origin`), "
            "besides `localhost`, 127.0.0.0/8, ::1 and the host of `AP_FRONTEND_URL`; "
            "with neither set on a non-loopback bind, any `Host` is answered "
            "(credentials are required there)"
        ),
    )
    webhook_legacy_signatures: bool = _var(
        "AP_WEBHOOK_LEGACY_SIGNATURES",
        BOOL,
        False,
        (
            "also accept the untimed `X-Conveyor-Signature: sha256=<hex>` form "
            "(replayable: prefer `t=…,v1=…`)"
        ),
    )
    encryption_key: str | None = _var(
        "AP_ENCRYPTION_KEY",
        Kind(hex_key, "expected 32 or 64 hex characters", secret=True),
        None,
        ("key of the stored secrets (AES-GCM-128 with 32 hex characters, AES-GCM-256 with 64)"),
        default_doc=(
            "generated into `AP_CONFIG_PATH/keys/encryption.key` with the embedded "
            "PostgreSQL; required with an external one (every container must share it)"
        ),
    )
    execution_mode: ExecutionMode = _var(
        "AP_EXECUTION_MODE",
        _SANDBOX_MODE,
        ExecutionMode.SANDBOX_CODE_ONLY,
        "what runs in the sandbox; legacy `SANDBOXED` = `SANDBOX_PROCESS`",
    )
    sandbox_memory_limit_kb: int = _var(
        "AP_SANDBOX_MEMORY_LIMIT",
        integer(minimum=16_384),
        1_048_576,
        (
            "KB of address space per sandboxed process, and — where the host lets "
            "Conveyor write cgroups (v2 delegated, or v1 `memory`/`pids`) — of memory "
            "for the step's whole process tree, forks and memfds included (`/readyz` → "
            "`checks.sandbox.limits`: `cgroup-v2` | `cgroup-v1` | `rlimit`)"
        ),
    )
    sandbox_allow_partial_isolation: bool = _var(
        "AP_SANDBOX_ALLOW_PARTIAL_ISOLATION",
        BOOL,
        False,
        (
            "without bubblewrap, workers with external Redis/PostgreSQL refuse to "
            "start, and the embedded default runs code steps only in a safe fallback "
            "(`unshare`, or `direct` as root: no network, a private read-only root "
            "holding only `/usr`, Python and the package — none of the host's other "
            "files —, private tmpfs, own PID namespace) or refuses them; `true` accepts "
            "whatever isolation the host has (the risk is yours: where no namespace can "
            "be made a step can reach the network)"
        ),
    )
    flow_timeout_seconds: int = _var(
        "AP_FLOW_TIMEOUT_SECONDS", POSITIVE, 600, "wall time of a whole run, then `TIMEOUT`"
    )
    trigger_timeout_seconds: int = _var(
        "AP_TRIGGER_TIMEOUT_SECONDS",
        POSITIVE,
        60,
        "trigger processing (payload extraction, schedule firing)",
    )
    webhook_timeout_seconds: int = _var(
        "AP_WEBHOOK_TIMEOUT_SECONDS", POSITIVE, 30, "how long a sync webhook waits before 408"
    )
    max_webhook_payload_size_mb: int = _var(
        "AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB",
        POSITIVE,
        25,
        "larger bodies get 413 before they are read whole",
    )
    max_flow_run_log_size_mb: int = _var(
        "AP_MAX_FLOW_RUN_LOG_SIZE_MB", POSITIVE, 50, "step-log cap per run"
    )
    pieces_cache_max_entries: int = _var(
        "AP_PIECES_CACHE_MAX_ENTRIES", COUNT, 1000, "piece cache size"
    )
    prewarm_cache_on_startup: bool = _var(
        "AP_PREWARM_CACHE_ON_STARTUP",
        BOOL,
        True,
        "import pieces into the sandbox fork-server at start",
    )
    ssrf_protection_enabled: bool = _var(
        "AP_SSRF_PROTECTION_ENABLED",
        BOOL,
        True,
        ("the `http` step may not reach private, loopback, link-local or metadata addresses …"),
    )
    ssrf_allow_list: tuple[str, ...] = _var(
        "AP_SSRF_ALLOW_LIST",
        Kind(allow_list, f"expected {_LISTS}"),
        (),
        "… except these hosts, IPs or CIDRs",
    )
    config_path: Path = _var(
        "AP_CONFIG_PATH",
        Kind(lambda v: Path(v).expanduser(), "a path"),
        Path("~/.conveyor"),
        "data of the embedded servers and generated keys",
        derive=_default_config_path,
        default_doc="`~/.conveyor`; `/var/lib/conveyor` as root",
    )
    metrics_port: int | None = _var(
        "AP_METRICS_PORT",
        PORT,
        None,
        "health + metrics listener of a worker-only process",
        derive=lambda v: 9090 if v["container_type"] is ContainerType.WORKER else None,
        default_doc="`9090` in the `WORKER` role",
    )
    log_level: LogLevel = _var(
        "AP_LOG_LEVEL", enum_of(LogLevel, lower=True), LogLevel.INFO, "log threshold"
    )
    log_pretty: bool = _var(
        "AP_LOG_PRETTY", BOOL, False, "human-readable console logs instead of JSON lines"
    )

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
        reader = _Reader(dict(os.environ if env is None else env))
        values: dict[str, Any] = {}
        later = []
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta["derive"] is not None and reader.raw(meta["env"]) is None:
                later.append(f)
            else:
                values[f.name] = reader.read(meta["env"], meta["kind"], f.default)
        for f in later:  # defaults that depend on other settings, now all known
            values[f.name] = f.metadata["derive"](values)
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
                    (ENV["redis_url"], self.embedded_redis),
                    (ENV["postgres_url"], self.embedded_postgres),
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


#: ``{field name: AP_* variable}``, from the declarations above.
ENV: dict[str, str] = {f.name: f.metadata["env"] for f in dataclasses.fields(Settings)}


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


class _Reader:
    """Reads variables of one environment mapping by their :class:`Kind`; errors name them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def read(self, name: str, kind: Kind, default: Any) -> Any:
        value = self.raw(name)
        if value is None:
            return kind.fallback(self) if kind.fallback is not None else default
        try:
            return kind.cast(value)
        except ItemInvalid as exc:
            raise SettingsError(f"{name}={exc.item!r} is invalid: {exc.allowed}") from None
        except (ValueError, KeyError):
            if kind.secret:  # never echo a secret back, even a malformed one
                raise SettingsError(
                    f"{name} is invalid (length {len(value)}): {kind.allowed}"
                ) from None
            raise SettingsError(f"{name}={value!r} is invalid: {kind.allowed}") from None
