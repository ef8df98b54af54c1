"""Shared fixtures: an upstream stub per test, fakeredis per test, and the app wired to both (pytest-flask's `app`)."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterator

import fakeredis
import pytest
from flask import Flask
from hypothesis import HealthCheck, settings

from buddy import create_app
from tests.support.processes import RedisServer
from tests.support.upstream_stub import UpstreamStub

# The tests never depend on the caller's shell, and never touch the caller's own cache: the proxy's
# variables are dropped, and the default data folder is a fresh one of this run's.
for _name in ("REDIS_URL", "BUDDY_CONFIG", "BUDDY_DATA_DIR", "BUDDY_SECURE_KEY", "BUDDY_OFFLINE",
              "BUDDY_WORKERS", "BUDDY_THREADS", "BUDDY_BINDS", "WEB_CONCURRENCY"):
    os.environ.pop(_name, None)
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="buddy-tests-")

# Property tests (hypothesis) run the same bounded set of examples on every run, with no clock in the verdict: a
# loaded machine is slow, not wrong (no deadline, no health check on generation speed). HYPOTHESIS_PROFILE=explore
# looks much further, at random, when one is being worked on.
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ["XDG_DATA_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The bundled redis-server on a free port, shared by the session; a missing binary fails, never skips."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture(params=["fakeredis", "redis-server"])
def any_redis(request: pytest.FixtureRequest) -> Iterator:
    """Contract tests run once on fakeredis[lua] and once on the real bundled Redis."""
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis(server=fakeredis.FakeServer())
    else:
        client = request.getfixturevalue("redis_server").client()
        client.flushall()
        yield client
        client.close()


@pytest.fixture
def upstream() -> Iterator[UpstreamStub]:
    stub = UpstreamStub()
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def stub() -> Iterator[UpstreamStub]:
    """An upstream stub that a module's tests share (with a proxy they share); `upstream` is one per test."""
    shared = UpstreamStub()
    yield shared
    shared.stop()


@pytest.fixture
def redis_server_fake() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def fake_redis(redis_server_fake: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=redis_server_fake)


@pytest.fixture
def buddy_config(upstream: UpstreamStub) -> dict[str, Any]:
    return {
        "domain_mappings": {"up": {"upstream": upstream.url, "connect_timeout": 1, "read_timeout": 1}},
        "cache": {"max_cache_response_size": 64 * 1024},
        "logging": {"enable_console": False},  # records propagate to pytest's caplog
    }


@pytest.fixture
def app(buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis) -> Iterator[Flask]:
    app = create_app(buddy_config, redis_client=fake_redis, environ={})
    yield app
    app.extensions["buddy"].shutdown()
