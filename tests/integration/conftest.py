"""Integration fixtures: real gunicorn processes (the redis-server fixtures live in tests/conftest.py).

`gunicorn` starts instances for one test. `module_gunicorn` starts instances that a module's tests share (one
proxy per config, not one per test), each test seeing it through `tests.support.processes.SharedProxy`; such a
test starts from an empty Redis (it asks for `redis_url`) and empty upstream logs (the module clears its stubs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from tests.support.processes import Gunicorn, SharedProxy, stop_groups

StartGunicorn = Callable[..., Gunicorn]


def _starter(workdir: Callable[[], Path], started: list[Gunicorn]) -> StartGunicorn:
    def start(
        config: Mapping[str, Any] | None,
        env: Mapping[str, str] | None = None,
        workers: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> Gunicorn:
        instance = Gunicorn(workdir(), config, env or {}, workers=workers, extra_args=extra_args)
        started.append(instance)
        return instance

    return start


def _stop(started: list[Gunicorn]) -> None:
    stop_groups([instance.process for instance in started], timeout=20)  # side by side: one shutdown's wait
    for instance in started:
        instance.stop()  # closes its log file


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[StartGunicorn]:
    """Start gunicorn instances: `gunicorn(config, env={...}, workers=2)`; all are stopped after the test."""
    started: list[Gunicorn] = []
    yield _starter(lambda: tmp_path, started)
    _stop(started)


@pytest.fixture(scope="module")
def module_gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartGunicorn]:
    """`gunicorn` for a module-scoped fixture: the instances live until the module's last test is done."""
    started: list[Gunicorn] = []
    yield _starter(lambda: tmp_path_factory.mktemp("gunicorn"), started)
    _stop(started)


@pytest.fixture
def proxy(shared: Gunicorn, redis_url: str, upstream: Any) -> SharedProxy:
    """The module's `shared` proxy for one test: Redis emptied (`redis_url` flushes it), and the upstream log too
    (the module's `upstream` is its shared stub, cleared for each test)."""
    return SharedProxy(shared)
