"""Integration fixtures: real gunicorn processes (the redis-server fixtures live in tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from tests.support.processes import Gunicorn

StartGunicorn = Callable[..., Gunicorn]


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[StartGunicorn]:
    """Start gunicorn instances: `gunicorn(config, env={...}, workers=2)`; all are stopped after the test."""
    started: list[Gunicorn] = []

    def start(
        config: Mapping[str, Any] | None,
        env: Mapping[str, str] | None = None,
        workers: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> Gunicorn:
        instance = Gunicorn(tmp_path, config, env or {}, workers=workers, extra_args=extra_args)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()
