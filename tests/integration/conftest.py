"""Integration fixtures: the bundled redis-server on a free port, and real gunicorn processes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from tests.support.processes import Gunicorn, RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.client().flushall()
    return redis_server.url


StartGunicorn = Callable[..., Gunicorn]


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[StartGunicorn]:
    """Start gunicorn instances: `gunicorn(config, env={...}, workers=2)`; all are stopped after the test."""
    started: list[Gunicorn] = []

    def start(config: Mapping[str, Any] | None, env: Mapping[str, str] | None = None, workers: int = 2) -> Gunicorn:
        instance = Gunicorn(tmp_path, config, env or {}, workers=workers)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()
