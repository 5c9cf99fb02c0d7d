"""The asyncpg pools of one process: the primary for writes, read replicas for listings.

:class:`Database` honours ``AP_POSTGRES_POOL_SIZE``, ``AP_POSTGRES_IDLE_TIMEOUT_MS``,
``AP_POSTGRES_USE_PGBOUNCER`` (no prepared-statement cache, so transaction pooling is safe) and
``AP_POSTGRES_READ_REPLICA_URL``. :meth:`Database.reader` hands out a replica connection when
one is healthy and the primary otherwise: a replica that is down at start-up or fails a query
is benched for :attr:`Database.replica_retry_s` seconds, and reads go to the primary meanwhile.
Writes never go to a replica. ``jsonb`` columns are encoded and decoded with orjson.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import structlog

from conveyor.settings import Settings

log = structlog.get_logger(__name__)

# Errors meaning "this server is unreachable", as opposed to a bad query.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
)


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection handed back without asyncpg's reset query.

    asyncpg's pool runs ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``
    on every release — one more round trip, and more server work, than the batched statement
    the connection was taken for. Conveyor leaves no session state behind: locks are
    transaction-level (``pg_advisory_xact_lock``), settings ``SET LOCAL``, cursors live inside
    transactions, nothing LISTENs. An open transaction is still rolled back on release.
    """

    def get_reset_query(self) -> str:
        return ""


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("jsonb", "json"):
        await conn.set_type_codec(
            typ,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


@dataclass
class PoolOptions:
    """Pool parameters: ``max_size`` connections, idle connections closed after
    ``idle_timeout_s`` seconds (0 = never), ``statement_cache`` off behind PgBouncer,
    ``connect_timeout_s`` per connection attempt, ``command_timeout_s`` per statement and
    ``acquire_timeout_s`` to get a pooled connection (a hung server becomes a 503)."""

    max_size: int = 10
    idle_timeout_s: float = 300.0
    statement_cache: bool = True
    connect_timeout_s: float = 5.0
    command_timeout_s: float = 30.0
    acquire_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolOptions:
        return cls(
            max_size=settings.postgres_pool_size,
            idle_timeout_s=settings.postgres_idle_timeout_ms / 1000,
            statement_cache=not settings.postgres_use_pgbouncer,
        )


async def create_pool(url: str, options: PoolOptions) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url,
        min_size=min(1, options.max_size),
        max_size=options.max_size,
        max_inactive_connection_lifetime=options.idle_timeout_s,
        statement_cache_size=100 if options.statement_cache else 0,
        timeout=options.connect_timeout_s,
        # A hung (not refusing) server must end in a 503, not a request that never answers.
        command_timeout=options.command_timeout_s,
        init=_init_connection,
        connection_class=_Connection,
    )


@dataclass
class _Replica:
    url: str
    pool: asyncpg.Pool | None = None
    benched_until: float = 0.0


@dataclass
class Database:
    """Primary pool plus zero or more replica pools; create with :meth:`connect`."""

    primary: asyncpg.Pool
    options: PoolOptions
    replicas: list[_Replica] = field(default_factory=list)
    replica_retry_s: float = 30.0
    _rr: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    async def connect(
        cls, url: str, options: PoolOptions, replica_urls: tuple[str, ...] = ()
    ) -> Database:
        primary = await create_pool(url, options)
        db = cls(primary=primary, options=options)
        for rurl in replica_urls:
            replica = _Replica(rurl)
            await db._open_replica(replica)
            db.replicas.append(replica)
        return db

    @classmethod
    async def from_settings(cls, settings: Settings) -> Database:
        if not settings.postgres_url:
            raise RuntimeError("no PostgreSQL URL: start the embedded servers first")
        return await cls.connect(
            settings.postgres_url,
            PoolOptions.from_settings(settings),
            settings.postgres_read_replica_urls,
        )

    async def _open_replica(self, replica: _Replica) -> bool:
        try:
            replica.pool = await create_pool(replica.url, self.options)
            return True
        except CONNECTION_ERRORS as exc:
            self._bench(replica, exc)
            return False

    def _bench(self, replica: _Replica, exc: BaseException) -> None:
        replica.benched_until = time.monotonic() + self.replica_retry_s
        log.warning("read replica unavailable, reading from primary", error=repr(exc))

    async def _pick_replica(self) -> _Replica | None:
        now = time.monotonic()
        healthy = [r for r in self.replicas if r.benched_until <= now]
        if not healthy:
            return None
        replica = healthy[next(self._rr) % len(healthy)]
        if replica.pool is None and not await self._open_replica(replica):
            return None
        return replica

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for read-only queries: a healthy replica, else the primary.

        Only acquisition falls back: a replica that fails mid-query raises to the caller (the
        query may have had effects on the client side), and is benched for later calls.
        """
        replica = await self._pick_replica()
        if replica is not None and replica.pool is not None:
            try:
                conn_cm = replica.pool.acquire()
                conn = await conn_cm.__aenter__()
            except CONNECTION_ERRORS as exc:
                self._bench(replica, exc)
            else:
                try:
                    yield conn
                except CONNECTION_ERRORS as exc:
                    self._bench(replica, exc)
                    raise
                finally:
                    await conn_cm.__aexit__(None, None, None)
                return
        async with self.primary.acquire(timeout=self.options.acquire_timeout_s) as conn:
            yield conn

    async def fetch_read(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run a read-only query on a replica if possible; on a replica failure, on the primary."""
        try:
            async with self.reader() as conn:
                return list(await conn.fetch(query, *args))
        except CONNECTION_ERRORS:
            if not self.replicas:
                raise
            return list(await self.primary.fetch(query, *args))

    def writer(self) -> Any:
        """``async with db.writer() as conn`` — always the primary."""
        return self.primary.acquire(timeout=self.options.acquire_timeout_s)

    async def server_connections(self) -> tuple[int, int]:
        """``(active connections, max_connections)`` of the primary server (scaling rules)."""
        async with self.primary.acquire() as conn:
            active = await conn.fetchval("SELECT count(*) FROM pg_stat_activity")
            limit = await conn.fetchval("SELECT current_setting('max_connections')::int")
        return int(active), int(limit)

    def pool_stats(self) -> dict[str, int]:
        size = self.primary.get_size()
        return {"size": size, "in_use": size - self.primary.get_idle_size()}

    async def close(self, timeout_s: float = 10.0) -> None:
        pools = [self.primary, *(r.pool for r in self.replicas if r.pool is not None)]
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), timeout_s)
            except TimeoutError:
                pool.terminate()
