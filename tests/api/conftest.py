"""An API server on a loopback port, backed by the test Redis DB and PostgreSQL database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from conveyor.app import ServiceFactory, create_app
from conveyor.settings import Settings
from conveyor.store.db import Database

ENCRYPTION_KEY = "ab" * 32


def make_settings(postgres_url: str, redis_url: str, **env: str) -> Settings:
    base = {
        "AP_POSTGRES_URL": postgres_url,
        "AP_REDIS_URL": redis_url,
        "AP_ENCRYPTION_KEY": ENCRYPTION_KEY,
        "AP_LOG_LEVEL": "warning",
    }
    return Settings.from_env({**base, **env})


AppFactory = Callable[..., Any]


@pytest.fixture
async def make_client(
    db: Database, redis: aioredis.Redis, postgres_url: str, redis_url: str
) -> AsyncIterator[AppFactory]:
    """Start an app with extra ``AP_*`` settings (and services); returns its TestClient."""
    clients: list[TestClient[Any, Any]] = []

    async def start(
        services: dict[str, ServiceFactory] | None = None, **env: str
    ) -> TestClient[Any, Any]:
        settings = make_settings(postgres_url, redis_url, **env)
        client = TestClient(TestServer(create_app(settings, services), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: AppFactory) -> TestClient[Any, Any]:
    """An APP-role server (no workers) with default settings."""
    result: TestClient[Any, Any] = await make_client(AP_CONTAINER_TYPE="APP")
    return result
