"""Real redis-server and gunicorn processes in their own process groups, stopped with SIGTERM then SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import redis
import requests

from buddy.embedded import redis_server_binary
from tests.support.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


def stop_group(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


class RedisServer:
    """The bundled redis-server on a free TCP port, nothing persisted."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for_port(self.port, alive=lambda: self.process.poll() is None)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        stop_group(self.process)


class Gunicorn:
    """`gunicorn wsgi:app` from the project root, on a free port, with the given config dict and environment."""

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any] | None,
        env: Mapping[str, str],
        workers: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"gunicorn-{self.port}.log"
        full_env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BUDDY_CONFIG", "BUDDY_DATA_DIR")}
        if config is not None:
            config_path = workdir / f"config-{self.port}.json"
            config_path.write_text(json.dumps(config))
            full_env["BUDDY_CONFIG"] = str(config_path)
        full_env.update(env)
        self.env = full_env
        args = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{self.port}",
                "-w", str(workers), *extra_args, "wsgi:app"]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port(self.port, timeout=30, alive=lambda: self.process.poll() is None)
        except Exception:
            self.stop()
            raise RuntimeError(f"gunicorn did not start:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_serving(self, path: str, tries: int = 100) -> None:
        """Wait for the workers, not just the master's socket: GET `path` until an answer comes."""
        for _ in range(tries):
            try:
                requests.get(f"{self.url}{path}", timeout=5)
                return
            except requests.RequestException:
                time.sleep(0.1)

    def stop(self) -> None:
        stop_group(self.process, timeout=20)
        self._log.close()
