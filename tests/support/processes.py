"""Real redis-server and gunicorn processes in their own process groups, stopped with SIGTERM then SIGKILL.

Each starts on a free port and counts as started only once it listens there itself: a port that another process
took between `free_port()` and the bind (parallel test runs start many servers) means another port, never
talking to someone else's server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import psutil
import redis
import requests

from buddy.embedded import redis_server_binary
from tests.support.ports import free_port

ATTEMPTS = 3  # ports tried before giving up

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


def stop_groups(processes: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """`stop_group` for several at once: all get SIGTERM first, so that they shut down side by side."""
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def listens(process: subprocess.Popen, port: int) -> bool:
    """Whether `process` itself (not whoever else) has a socket listening on `port`."""
    try:
        found = psutil.Process(process.pid)
        connections = found.net_connections("tcp") if hasattr(found, "net_connections") else found.connections("tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def wait_for_listener(process: subprocess.Popen, port: int, timeout: float = 20.0) -> bool:
    """Wait until `process` listens on `port`: True; False if it exits first (the port was taken, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if listens(process, port):
            return True
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


class RedisServer:
    """The bundled redis-server on a free TCP port (or the given one), nothing persisted."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        for _ in range(ATTEMPTS if port is None else 1):
            self.port = port or free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self.process = subprocess.Popen(
                [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            if wait_for_listener(self.process, self.port):
                return
        raise RuntimeError(f"redis-server did not start (port {self.port} taken?); see {workdir / 'redis.log'}")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        stop_group(self.process)


class Gunicorn:
    """`gunicorn wsgi:app` (or another `app`) from the project root, on a free port, with the given config dict and
    environment. `root`: another checkout of the project to serve instead (bench/hits.py --against): its wsgi.py,
    gunicorn.conf.py and `buddy` package, first on PYTHONPATH so that it wins over the installed one."""

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any] | None,
        env: Mapping[str, str],
        workers: int = 2,
        extra_args: tuple[str, ...] = (),
        app: str = "wsgi:app",
        root: Path = ROOT,
    ) -> None:
        for attempt in range(ATTEMPTS):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log_path = workdir / f"gunicorn-{self.port}.log"
            full_env = {k: v for k, v in os.environ.items()
                        if k not in ("REDIS_URL", "BUDDY_CONFIG", "BUDDY_DATA_DIR")}
            if config is not None:
                config_path = workdir / f"config-{self.port}.json"
                config_path.write_text(json.dumps(config))
                full_env["BUDDY_CONFIG"] = str(config_path)
            full_env.update(env)
            if root != ROOT:
                full_env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(root), full_env.get("PYTHONPATH"))))
            self.env = full_env
            args = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{self.port}",
                    "-w", str(workers), *extra_args, app]
            self._log = open(self.log_path, "ab")
            self.process = subprocess.Popen(
                args, cwd=root, env=full_env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                if wait_for_listener(self.process, self.port, timeout=30):
                    return
            except Exception:
                self.stop()
                raise RuntimeError(f"gunicorn did not start:\n{self.log()}") from None
            self.stop()
            if attempt == ATTEMPTS - 1 or "Connection in use" not in self.log():
                raise RuntimeError(f"gunicorn did not start:\n{self.log()}")

    def log(self, since: int = 0) -> str:
        """The output so far, or only what came after the first `since` bytes (see `log_size`)."""
        with open(self.log_path, "rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

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


class SharedProxy:
    """A gunicorn that a module's tests share, as one test sees it: `url`, `port`, `env`, `process`, and `log()`
    with only what was written since the test began."""

    def __init__(self, instance: Gunicorn) -> None:
        self.instance = instance
        self.url, self.port, self.env, self.process = instance.url, instance.port, instance.env, instance.process
        self._since = instance.log_size()

    def log(self) -> str:
        return self.instance.log(since=self._since)
